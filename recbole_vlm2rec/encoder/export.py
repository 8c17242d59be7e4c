"""The item-embedding file format (``.npy`` + ``.json`` sidecar per modality).

``export_item_embeddings`` / ``load_item_embeddings`` write and read::

    <prefix>.<modality>.npy    float32 [num_items, dim], row i = item_tokens[i]
    <prefix>.<modality>.json   {"format": "recbole-vlm2rec/item-embeddings", "version": 1, "modality": ...,
                                "num_items", "dim", "item_tokens": [...], "backbone", "adapter",
                                "pooling", "normalization", "masked_rows": [...], ...}

A user's own arrays load the same way: a ``.npy`` with a sidecar holding at least ``item_tokens``, or
a bare ``.npy`` whose rows follow the ``expected_tokens`` passed to the loader.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

FORMAT = "recbole-vlm2rec/item-embeddings"
VERSION = 1


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
            raise ValueError(f"export_item_embeddings: {modality!r} array must be 2-D [items, dim], got shape {array.shape}")
        if array.shape[0] != len(tokens):
            raise ValueError(f"export_item_embeddings: {modality!r} has {array.shape[0]} rows for {len(tokens)} item tokens")
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


def load_item_embeddings(path_or_prefix: str, modality: Optional[str] = None,
                         expected_tokens: Optional[Sequence[str]] = None, expected_dim: Optional[int] = None,
                         pad_token: Optional[str] = "[PAD]") -> Tuple[np.ndarray, dict]:
    """Read embeddings written by :func:`export_item_embeddings` (or a user's ``.npy``): ``(array, meta)``.

    ``path_or_prefix`` is a ``.npy`` path, its ``.json`` sidecar, or the export prefix (then ``modality``
    picks the file; it may be left out when only one exists). With ``expected_tokens`` the rows are
    returned in that order (``pad_token`` entries, RecBole's row 0, get a zero row). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a row count, dimension or token
    mismatch and for NaN or infinite values.
    """
    npy_path = _resolve_npy(path_or_prefix, modality)
    json_path = npy_path[:-4] + ".json"
    meta = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            meta = json.load(f)
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
        expected = [str(t) for t in expected_tokens]
        if file_tokens is None:
            if array.shape[0] != len(expected):
                raise ValueError(f"{npy_path}: {array.shape[0]} rows for {len(expected)} expected item tokens, and "
                                 f"no sidecar {json_path} with item_tokens to match them by")
        elif list(map(str, file_tokens)) != expected:
            position = {str(t): i for i, t in enumerate(file_tokens)}
            missing = [t for t in expected if t not in position and t != pad_token]
            if missing:
                raise ValueError(f"{npy_path}: {len(missing)} expected item tokens are not in the file, "
                                 f"e.g. {missing[:5]}")
            out = np.zeros((len(expected), array.shape[1]), dtype=np.float32)
            for i, t in enumerate(expected):
                if t in position:
                    out[i] = array[position[t]]
            array = out
            meta = dict(meta, item_tokens=expected)
    return array, meta


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
            found = _modalities(path)
            raise FileNotFoundError(f"item embeddings: no such file {npy}"
                                    + (f"; modalities under this prefix: {found}" if found else ""))
        return npy
    found = _modalities(path)
    if len(found) == 1:
        return f"{path}.{found[0]}.npy"
    if not found:
        raise FileNotFoundError(f"item embeddings: no file {path}.<modality>.npy (nor a .npy path given)")
    raise ValueError(f"item embeddings: {path} has several modalities {found}; pass modality=")


def _modalities(prefix: str) -> list:
    return sorted(p[len(prefix) + 1:-4] for p in glob.glob(glob.escape(prefix) + ".*.npy"))


def _check_finite(array: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{where}: {len(rows)} rows hold NaN or infinite values (first row {rows[0]})")


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask
