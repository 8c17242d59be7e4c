"""``vlm2rec-demo``: the small offline multimodal dataset behind the README's first command and the tests.

A synthetic catalog (:mod:`dataset_tools.synthetic`) sized for a tiny randomly initialised Qwen2-VL
trained on CPU in minutes: 360 items generated (about 355 after the 5-core), 1000 users with 5-20
interactions, titles of four to six words, 64 px PNG images (the VLM demo reads them at 56 px:
4 visual tokens). It builds in a few seconds.

:func:`ensure_demo_dataset` is what ``run_recbole --dataset=vlm2rec-demo`` calls: it builds the
dataset in a temporary directory beside the target and renames it into place, so a reader never sees
a partial dataset, and two processes racing to build it both end up using one complete copy.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from .synthetic import SyntheticSpec, build_synthetic

DEMO_NAME = "vlm2rec-demo"
DEMO_SPEC = SyntheticSpec(seed=2026, items=360, users=1000, text_signal=1.0, image_signal=1.0, image_size=64,
                          min_history=5, max_history=20)
_STAGING = f".{DEMO_NAME}.tmp-"      # staging directories: .vlm2rec-demo.tmp-<pid>-<random>


def _remove_abandoned_staging(data_path: pathlib.Path) -> None:
    """Delete staging directories of builds whose process is gone (killed mid-build)."""
    for staging in data_path.glob(f"{_STAGING}*"):
        try:
            pid = int(staging.name[len(_STAGING):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, PermissionError):
            continue      # not ours to judge: a foreign name, or another user's live process


def _complete(dataset_dir: pathlib.Path) -> bool:
    stats = dataset_dir / f"{DEMO_NAME}.stats.json"
    try:
        return json.loads(stats.read_text(encoding="utf-8")).get("dataset") == DEMO_NAME
    except (OSError, ValueError):
        return False


def ensure_demo_dataset(data_path) -> pathlib.Path:
    """Return ``<data_path>/vlm2rec-demo``, building it first (atomically) if it is not there.

    Raises FileExistsError if that directory exists but is not a complete demo build (it is never
    deleted: it may hold someone's files).
    """
    data_path = pathlib.Path(data_path)
    target = data_path / DEMO_NAME
    if _complete(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists but is not a complete {DEMO_NAME} build; remove it and retry")
    data_path.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(data_path)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=data_path))
    try:
        build_synthetic(staging, DEMO_NAME, DEMO_SPEC, kcore=5, image_format="png", progress=False)
        try:
            # Atomic; replaces an empty directory, fails if another process has put a build there.
            os.rename(staging / DEMO_NAME, target)
        except OSError:
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
