"""RecBole atomic files and the item-text sidecar: writing them atomically, reading the sidecar back.

Every output goes through :func:`atomic_path`: it is written under a hidden temporary name in the same
directory and renamed into place only when complete (``os.replace`` is atomic on one file system), so a
killed run never leaves a half-written ``NAME.inter`` behind, only a ``.NAME.inter.tmp-*`` file that the
next run removes (:func:`remove_stale_temps`).

Formats (one dataset directory ``DIR/NAME/``):

* ``NAME.inter``: ``user_id:token  item_id:token  [rating:float]  timestamp:float`` (tab separated;
  an empty rating means the review had none).
* ``NAME.item``: ``item_id:token  categories:token_seq  brand:token  image:token``. Tokens cannot hold
  the exact strings (RecBole splits ``token_seq`` on spaces and its CSV reader treats a leading ``"`` as
  quoting), so :func:`as_token` maps whitespace runs to ``_`` and ``"`` to ``'``; categories are
  separated by one space.
* ``NAME.text.jsonl``: the exact item text for prompts, one JSON object per item (UTF-8)::

      {"item_id": "<token as in .inter>", "title": str, "description": str,
       "categories": [str, ...], "brand": str, "image": "images/<file>" or null}

  read back with :func:`read_item_sidecar`.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import uuid
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

SIDECAR_SUFFIX = ".text.jsonl"
# the discrete item features of NAME.item (what FDSA / SASRecF select); their column types follow
ITEM_FEATURES = ("categories", "brand")
SIDECAR_FIELDS = {"item_id": str, "title": str, "description": str, "categories": list, "brand": str}
_TEMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds, else delete it."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(directory: os.PathLike | str) -> None:
    """Delete temporary files left by killed runs in ``directory`` (one writer per directory at a time)."""
    directory = pathlib.Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and _TEMP_MARK in p.name and p.is_file():
                p.unlink()


def write_text(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: os.PathLike | str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: os.PathLike | str, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")


_WS = re.compile(r"\s+")


def as_token(text: str) -> str:
    """A string as one RecBole token: whitespace runs become ``_``, ``"`` becomes ``'``."""
    return _WS.sub("_", text.strip()).replace('"', "'")


def categories_token_seq(categories: Iterable[str]) -> str:
    return " ".join(t for t in (as_token(c) for c in categories) if t)


def write_inter(path: os.PathLike | str, frame: pd.DataFrame) -> None:
    """Write the interaction table (:func:`dataset_tools.preprocess.interactions_frame`) as ``.inter``.

    Timestamps are seconds, written as integers when all are whole (2014/2018 reviews, order indices)
    and with exactly three decimals otherwise (2023 reviews are in milliseconds). Rows are joined by
    hand: ``DataFrame.to_csv`` is several times slower on millions of rows.
    """
    header = ["user_id:token", "item_id:token"]
    columns = [_category_strings(frame["user"]), _category_strings(frame["item"])]
    if "rating" in frame:
        header.append("rating:float")
        ratings = frame["rating"].to_numpy(dtype=np.float64)
        rcodes, runiques = pd.factorize(ratings)       # a handful of distinct values; NaN gets code -1
        rtext = np.array([_number(r) for r in runiques] + [""], dtype=object)
        columns.append(rtext[rcodes].tolist())
    header.append("timestamp:float")
    columns.append(_seconds_strings(frame["timestamp"].to_numpy(dtype=np.float64)))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        for start in range(0, len(frame), 1 << 18):
            rows = zip(*(c[start:start + (1 << 18)] for c in columns))
            f.write("\n".join(map("\t".join, rows)) + "\n")


def _category_strings(column: pd.Series) -> list:
    cats = np.asarray(column.cat.categories, dtype=object)
    return cats[column.cat.codes.to_numpy()].tolist()


def _number(x: float) -> str:
    return str(int(x)) + ".0" if float(x).is_integer() else repr(float(x))


_MILLIS = np.array([f".{k:03d}" for k in range(1000)], dtype=object)


def _seconds_strings(seconds: np.ndarray) -> list:
    ms = np.round(seconds * 1000.0).astype(np.int64)
    whole, frac = np.divmod(np.abs(ms), 1000)
    sign = np.where(ms < 0, "-", "").astype(object)
    text = sign + whole.astype(str).astype(object)
    if frac.any():
        text = text + _MILLIS[frac]
    return text.tolist()


def write_item(path: os.PathLike | str, items: Iterable[dict]) -> None:
    """Write ``.item`` rows from sidecar records (exact strings are tokenised here)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("item_id:token\tcategories:token_seq\tbrand:token\timage:token\n")  # ITEM_FEATURES + image
        for it in items:
            f.write(f"{it['item_id']}\t{categories_token_seq(it['categories'])}\t"
                    f"{as_token(it['brand'])}\t{it['image'] or ''}\n")


def sidecar_path(dataset_dir: os.PathLike | str, name: str) -> pathlib.Path:
    """``<dataset_dir>/<name>.text.jsonl``."""
    return pathlib.Path(dataset_dir) / f"{name}{SIDECAR_SUFFIX}"


def write_item_sidecar(dataset_dir: os.PathLike | str, name: str, records: Iterable[dict]) -> pathlib.Path:
    """Write the text sidecar (one JSON object per item, fields ``SIDECAR_FIELDS`` + ``image``), atomically."""
    path = sidecar_path(dataset_dir, name)
    write_jsonl(path, records)
    return path


class SidecarError(ValueError):
    """The text sidecar is missing or malformed; the message names the file and line."""


def read_item_sidecar(dataset_dir: os.PathLike | str, name: str, check_images: bool = True) -> dict[str, dict]:
    """Read ``<dataset_dir>/<name>.text.jsonl`` into ``{item_id: record}``, validating every line.

    Checks: each line is a JSON object with the fields of the format above and their types; item ids
    are unique; ``image`` is null or a relative path inside the dataset directory (and, with
    ``check_images``, an existing file). Raises :class:`SidecarError` naming ``file:line`` otherwise.
    """
    dataset_dir = pathlib.Path(dataset_dir)
    path = sidecar_path(dataset_dir, name)
    if not path.is_file():
        raise SidecarError(f"{path}: item text file not found; build the dataset with `vlm2rec-data` "
                           f"(amazon, synthetic or demo) or check --data_path and the dataset name")
    root = dataset_dir.resolve()
    items: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SidecarError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise SidecarError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for field, typ in SIDECAR_FIELDS.items():
                if field not in rec:
                    raise SidecarError(f"{where}: field {field!r} is missing")
                if not isinstance(rec[field], typ):
                    raise SidecarError(f"{where}: field {field!r} must be {typ.__name__}, "
                                       f"got {type(rec[field]).__name__}")
            if not all(isinstance(c, str) for c in rec["categories"]):
                raise SidecarError(f"{where}: field 'categories' must be a list of strings")
            item_id = rec["item_id"]
            if not item_id:
                raise SidecarError(f"{where}: field 'item_id' is empty")
            if item_id in items:
                raise SidecarError(f"{where}: item {item_id!r} already appeared on line {first_line[item_id]}")
            if "image" not in rec:
                raise SidecarError(f"{where}: field 'image' is missing (use null for an item without image)")
            image = rec["image"]
            if image is not None:
                if not isinstance(image, str) or not image:
                    raise SidecarError(f"{where}: field 'image' must be a relative path or null")
                full = (dataset_dir / image).resolve()
                if pathlib.PurePath(image).is_absolute() or root not in full.parents:
                    raise SidecarError(f"{where}: image path {image!r} must be relative to {dataset_dir}")
                if check_images and not full.is_file():
                    raise SidecarError(f"{where}: image file {full} does not exist; rerun the conversion "
                                       f"(it resumes) or pass check_images=False")
            items[item_id] = rec
            first_line[item_id] = lineno
    return items
