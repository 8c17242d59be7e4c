"""The files of a comparison: atomic writes, tolerant reads, config-file hashes and run-log tails.

Every result, request and table is written through a temporary file and a rename (``dataset_tools.atomic``'s
``atomic_path``, the project's one way of doing it), so that a comparison killed at any moment leaves either
the old file or the new one, never half of one (resumption trusts ``result.json``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional

from dataset_tools.atomic import atomic_path


def write_json_atomic(path: Path, content: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())  # resumption trusts result.json: on disk before the rename


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv_atomic(path: Path, fields: List[str], rows: List[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``; None when it is missing, damaged or not an object (the run is redone)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def file_sha1(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()


def yaml_keys(path: str) -> set:
    """The top-level keys of a YAML config file (empty when it holds no mapping)."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        content = yaml.load(handle, Loader=yaml.FullLoader)
    return set(content) if isinstance(content, dict) else set()


def log_tail(path: Path, lines: int = 20) -> List[str]:
    """The last non-blank lines of a run's log (read from its last 16 KiB: logs can be large)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
