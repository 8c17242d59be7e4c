from recbole_vlm2rec.models import vlm2rec_sasrec  # noqa: F401
