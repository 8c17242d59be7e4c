"""The item-embedding file format (``.npy`` + ``.json`` sidecar per modality): writing, reading, finding.

VLM2Rec writes its catalog embeddings in this format (``VLM2Rec.export``) and VLM2RecSASRec reads them
(``recbole_vlm2rec.data.features``); this module is the one place that knows the layout::

    <prefix>.<modality>.npy    float32 [num_items, dim], row i = item_tokens[i]
    <prefix>.<modality>.json   {"format": "recbole-vlm2rec/item-embeddings", "version": 1, "modality": ...,
                                "num_items", "dim", "item_tokens": [...], "backbone", "adapter",
                                "pooling", "normalization", "masked_rows": [...], ...}

VLM2Rec's export also records ``dataset`` (the RecBole dataset name) and ``checkpoint`` (the weights' file),
and puts the files at ``<checkpoint_dir>/<run>/item_embeddings.<modality>.npy``: :func:`newest_export`
finds the newest such export of a dataset.

A user's own arrays load the same way: a ``.npy`` with a sidecar holding at least ``item_tokens``, or
a bare ``.npy`` whose rows follow the ``expected_tokens`` passed to the loader.

Only numpy and the standard library are imported here, so that reading features never pulls in the VLM
encoder.
"""
from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

FORMAT = "recbole-vlm2rec/item-embeddings"
VERSION = 1
EXPORT_STEM = "item_embeddings"  # the file stem of VLM2Rec's export inside its run folder
PAD_TOKEN = "[PAD]"  # RecBole's padding item (internal id 0): never a row of an export

__all__ = [
    "EXPORT_STEM",
    "FORMAT",
    "PAD_TOKEN",
    "VERSION",
    "export_item_embeddings",
    "export_pattern",
    "export_prefix",
    "load_item_embeddings",
    "newest_export",
    "read_sidecar",
]


def export_prefix(directory: str) -> str:
    """The prefix of the export inside a run folder: ``<directory>/item_embeddings``."""
    return os.path.join(directory, EXPORT_STEM)


def export_pattern(checkpoint_dir: str, modality: str) -> str:
    """The glob of every run's export of ``modality`` under ``checkpoint_dir``."""
    return os.path.join(checkpoint_dir, "*", f"{EXPORT_STEM}.{modality}.npy")


def export_item_embeddings(out_prefix: str, item_tokens: Sequence[str], embeddings: Mapping[str, np.ndarray],
                           metadata: Optional[dict] = None) -> Dict[str, str]:
    """Write ``<out_prefix>.<modality>.npy`` and ``.json`` per modality (atomic: temp file + rename).

    ``metadata`` (e.g. ``encoder.describe()``) is stored in every sidecar. Returns modality -> npy path.
    """
    tokens = [str(t) for t in item_tokens]
    directory = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for modality, array in embeddings.items():
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(
                f"export_item_embeddings: {modality!r} array must be 2-D [items, dim], got shape {array.shape}"
            )
        if array.shape[0] != len(tokens):
            raise ValueError(
                f"export_item_embeddings: {modality!r} has {array.shape[0]} rows for {len(tokens)} item tokens"
            )
        _check_finite(array, f"export_item_embeddings: {modality!r}")
        meta = dict(metadata or {})
        meta.update(format=FORMAT, version=VERSION, modality=modality, num_items=len(tokens), dim=int(array.shape[1]),
                    dtype="float32", item_tokens=tokens,
                    masked_rows=np.flatnonzero(~array.any(axis=1)).tolist())
        meta.setdefault("pooling", "last_token")
        meta.setdefault("normalization", "l2")
        npy_path = f"{out_prefix}.{modality}.npy"
        # Array first, sidecar second: a sidecar is only ever beside a complete array.
        _atomic_write(npy_path, lambda f: np.save(f, array))
        _atomic_write(f"{out_prefix}.{modality}.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        paths[modality] = npy_path
    return paths


def read_sidecar(npy_path: str) -> Optional[dict]:
    """The sidecar ``.json`` beside ``npy_path`` (``None`` if there is none); ``ValueError`` if unreadable."""
    json_path = npy_path[:-4] + ".json"
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the feature sidecar {json_path}: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"cannot read the feature sidecar {json_path}: it holds a {type(meta).__name__}, not a dict")
    return meta


def load_item_embeddings(path_or_prefix: str, modality: Optional[str] = None,
                         expected_tokens: Optional[Sequence[str]] = None, expected_dim: Optional[int] = None,
                         pad_token: Optional[str] = PAD_TOKEN) -> Tuple[np.ndarray, dict]:
    """Read embeddings written by :func:`export_item_embeddings` (or a user's ``.npy``): ``(array, meta)``.

    ``path_or_prefix`` is a ``.npy`` path, its ``.json`` sidecar, or the export prefix (then ``modality``
    picks the file; it may be left out when only one exists). With ``expected_tokens`` the rows are
    returned in that order (``pad_token`` entries, RecBole's row 0, get a zero row). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a row count, dimension or token
    mismatch, for NaN or infinite values and for an unreadable sidecar.
    """
    npy_path = _resolve_npy(path_or_prefix, modality)
    meta = read_sidecar(npy_path) or {}
    array = np.load(npy_path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"{npy_path}: expected a 2-D [items, dim] array, got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if "dim" in meta and array.shape[1] != meta["dim"]:
        raise ValueError(f"{npy_path}: dimension {array.shape[1]} but its sidecar says {meta['dim']}")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise ValueError(f"{npy_path}: dimension {array.shape[1]}, expected {expected_dim}")
    file_tokens = meta.get("item_tokens")
    if file_tokens is not None and len(file_tokens) != array.shape[0]:
        raise ValueError(f"{npy_path}: {array.shape[0]} rows but its sidecar lists {len(file_tokens)} item tokens")
    if "num_items" in meta and meta["num_items"] != array.shape[0]:
        raise ValueError(f"{npy_path}: {array.shape[0]} rows but its sidecar says num_items={meta['num_items']}")
    _check_finite(array, npy_path)
    if expected_tokens is not None:
        array, meta = _in_token_order(array, meta, npy_path, [str(t) for t in expected_tokens], pad_token)
    return array, meta


def _in_token_order(array: np.ndarray, meta: dict, npy_path: str, expected: Sequence[str],
                    pad_token: Optional[str]) -> Tuple[np.ndarray, dict]:
    """``array``'s rows reordered to ``expected`` (``pad_token`` rows zero), matched by the sidecar's tokens."""
    file_tokens = meta.get("item_tokens")
    if file_tokens is None:
        if array.shape[0] != len(expected):
            raise ValueError(f"{npy_path}: {array.shape[0]} rows for {len(expected)} expected item tokens, and "
                             f"no sidecar {npy_path[:-4]}.json with item_tokens to match them by")
        return array, meta
    if list(map(str, file_tokens)) == list(expected):
        return array, meta
    position = {str(t): i for i, t in enumerate(file_tokens)}
    missing = [t for t in expected if t not in position and t != pad_token]
    if missing:
        raise ValueError(f"{npy_path}: {len(missing)} expected item tokens are not in the file, e.g. {missing[:5]}")
    out = np.zeros((len(expected), array.shape[1]), dtype=np.float32)
    for i, t in enumerate(expected):
        if t in position:
            out[i] = array[position[t]]
    return out, dict(meta, item_tokens=list(expected))


def newest_export(checkpoint_dir: str, dataset_name: str, modality: str,
                  item_tokens: Sequence[str] = ()) -> Optional[str]:
    """The prefix of the newest (by modification time) export of ``modality`` under ``checkpoint_dir`` that is
    of this dataset, or ``None``.

    An export is of the dataset when its sidecar names it (``"dataset"``) or, when it names no dataset (an
    export written by hand), lists every one of ``item_tokens`` (``PAD_TOKEN`` aside).
    """
    wanted = {str(t) for t in item_tokens if t != PAD_TOKEN}
    suffix = f".{modality}.npy"
    for npy_path in sorted(glob.glob(export_pattern(checkpoint_dir, modality)), key=os.path.getmtime, reverse=True):
        meta = read_sidecar(npy_path) or {}
        named = meta.get("dataset")
        if named == dataset_name or (named is None and wanted <= set(map(str, meta.get("item_tokens") or ()))):
            return npy_path[: -len(suffix)]
    return None


def _resolve_npy(path_or_prefix: str, modality: Optional[str]) -> str:
    path = str(path_or_prefix)
    if path.endswith(".npy") or path.endswith(".json"):
        npy = path[:-5] + ".npy" if path.endswith(".json") else path
        if not os.path.exists(npy):
            raise FileNotFoundError(f"item embeddings: no such file {npy}")
        return npy
    if modality is not None:
        npy = f"{path}.{modality}.npy"
        if not os.path.exists(npy):
            found = prefix_modalities(path)
            raise FileNotFoundError(f"item embeddings: no such file {npy}"
                                    + (f"; modalities under this prefix: {found}" if found else ""))
        return npy
    found = prefix_modalities(path)
    if len(found) == 1:
        return f"{path}.{found[0]}.npy"
    if not found:
        raise FileNotFoundError(f"item embeddings: no file {path}.<modality>.npy (nor a .npy path given)")
    raise ValueError(f"item embeddings: {path} has several modalities {found}; pass modality=")


def prefix_modalities(prefix: str) -> list:
    """The modalities written under ``prefix`` (``<prefix>.<modality>.npy``), sorted."""
    return sorted(p[len(prefix) + 1:-4] for p in glob.glob(glob.escape(prefix) + ".*.npy"))


def _check_finite(array: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{where}: {len(rows)} rows hold NaN or infinite values (first row {rows[0]})")


def _atomic_write(path: str, write) -> None:
    # A new file of its own beside the target (open()'s mode, like any file we write), renamed when complete.
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
