"""``python -m recbole_vlm2rec``: the same as the ``run_recbole`` command."""
import sys

from recbole_vlm2rec.cli import main

sys.exit(main())
