"""Helpers shared by the tests: run the real command in a subprocess, locate fixtures."""
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"
REPO_ROOT = TESTS_DIR.parent


def run_cli(args, cwd, env_extra=None, timeout=600, prelude=None):
    """Run ``python -m recbole_vlm2rec ARGS`` (the ``run_recbole`` command) and return the CompletedProcess.

    ``prelude`` is Python code run first in the child (e.g. importing a test-only plugin model).
    """
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    env.update(env_extra or {})
    code = "import sys, torch; torch.set_num_threads(1)\n"
    if prelude:
        code += prelude + "\n"
    code += "from recbole_vlm2rec.cli import main\nsys.exit(main())\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
