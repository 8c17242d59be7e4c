"""``python -m recbole_vlm2rec.compare``: the ``vlm2rec-compare`` command (and, with ``--child``, one run)."""
import sys

from recbole_vlm2rec.compare.cli import main

sys.exit(main())
