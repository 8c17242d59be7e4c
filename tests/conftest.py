"""Shared test set-up.

* One torch thread: on the 2-core CI machine two threads make small ops 30-50x slower.
* ``sys.argv`` is reset for every test: RecBole's ``Config`` reads ``--key=value`` pairs from
  ``sys.argv``, so pytest's own arguments must never reach it.
* Every test runs in its own temporary working directory (RecBole writes log/ and saved/ there).
"""
import os
import sys

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_argv_and_cwd(monkeypatch, tmp_path):
    """RecBole writes log/, log_tensorboard/ and saved/ under the working directory: keep them in tmp."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def image_server():
    """A local HTTP server on 127.0.0.1 for the image-download tests (stops at the end of the test)."""
    from helpers import ImageServer

    server = ImageServer()
    yield server
    server.close()


@pytest.fixture
def trickle_server():
    """The image server for trickling routes (``add(..., interval=1.0)``: one byte per second)."""
    from helpers import ImageServer

    server = ImageServer()
    yield server
    server.close()
