"""Per-modality item feature arrays for downstream models (VLM2RecSASRec), aligned with RecBole's item ids.

The arrays are VLM2Rec's export (``<prefix>.<modality>.npy`` + ``.json`` sidecar; the format, its reader
and the search for an export are ``recbole_vlm2rec.item_embeddings``) or arrays a user brings in the same
layout: a float ``[rows, dim]`` ``.npy`` and a sidecar holding at least ``{"item_tokens": [...]}``, the item
token of each row. Rows are matched to the dataset by item token, so the file's order and extra items do
not matter. This module adds the alignment with RecBole's item ids and the errors a user can act on.

Where the arrays come from (``feature_prefix``):

* a path prefix: ``<prefix>.<modality>.npy`` is read for every modality;
* a folder: ``<folder>/item_embeddings.<modality>.npy``;
* ``None``: the newest VLM2Rec export of this dataset under ``checkpoint_dir``, i.e. the newest
  ``<checkpoint_dir>/*/item_embeddings.<modality>.npy`` whose sidecar names this dataset (``"dataset"``)
  or, when it names none, lists every item of the dataset.

A row of zeros (or a row listed in the sidecar's ``masked_rows``, or ``false`` in its ``image_mask``) is an
item without that modality (e.g. no image): it is kept, counted, logged and masked, never dropped. An item
of the dataset that the file does not list is an error, or with ``missing_item_policy: zero`` a zero
(absent) row, counted and logged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from logging import getLogger
from typing import Dict, List, Optional, Sequence

import numpy as np

from recbole_vlm2rec.errors import ConfigError, DataError
from recbole_vlm2rec.item_embeddings import (
    export_pattern,
    export_prefix,
    load_item_embeddings,
    newest_export,
    prefix_modalities,
)

MISSING_ITEM_POLICIES = ("error", "zero")

__all__ = [
    "MISSING_ITEM_POLICIES",
    "ItemFeatures",
    "resolve_feature_prefix",
    "load_item_features",
    "modality_list",
]


@dataclass
class ItemFeatures:
    """One modality's features in RecBole's internal item order.

    ``array[i]`` is the feature row of internal item id ``i`` (row 0, the padding item, is zeros);
    ``present[i]`` is False where the item has no such feature (zero row, masked in the file, padding, or
    absent from the file under ``missing_item_policy: zero``).
    """

    modality: str
    path: str
    array: np.ndarray
    present: np.ndarray
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])


def resolve_feature_prefix(
    feature_prefix: Optional[str],
    modalities: Sequence[str],
    checkpoint_dir: str,
    dataset_name: str,
    item_tokens: Sequence[str],
) -> str:
    """The path prefix to read ``<prefix>.<modality>.npy`` from (see the module docstring)."""
    if feature_prefix is not None:
        prefix = str(feature_prefix)
        return export_prefix(prefix) if os.path.isdir(prefix) else prefix
    # Every modality of an export is written together: the first wanted modality that has one finds it.
    searched = modalities[0]
    for modality in modalities:
        try:
            found = newest_export(checkpoint_dir, dataset_name, modality, item_tokens)
        except ValueError as error:  # an unreadable sidecar
            raise DataError(str(error)) from None
        if found is not None:
            return found
    raise DataError(
        f"feature_prefix is not set and no VLM2Rec export of dataset {dataset_name!r} was found under "
        f"checkpoint_dir={checkpoint_dir!r} (looked for {export_pattern(checkpoint_dir, searched)}). Run VLM2Rec on "
        "this dataset first "
        f"(`run_recbole --model=VLM2Rec --dataset={dataset_name}`, it exports the item embeddings there), or set "
        "feature_prefix to the prefix of your own arrays (<prefix>.<modality>.npy + <prefix>.<modality>.json "
        'with {"item_tokens": [...]}).'
    )


def _absent_rows(array: np.ndarray, meta: dict, npy_path: str) -> np.ndarray:
    """Bool [rows]: rows that stand for a missing modality (zeros, ``masked_rows``, ``image_mask`` false)."""
    absent = ~array.any(axis=1)
    masked = meta.get("masked_rows") or []
    if masked:
        masked = np.asarray(masked, dtype=np.int64)
        if masked.min() < 0 or masked.max() >= len(array):
            raise DataError(f"{npy_path}: its sidecar's masked_rows holds row numbers outside 0..{len(array) - 1}")
        absent[masked] = True
    mask = meta.get("image_mask")
    if mask is not None:
        if len(mask) != len(array):
            raise DataError(f"{npy_path}: its sidecar's image_mask has {len(mask)} entries for {len(array)} rows")
        absent |= ~np.asarray(mask, dtype=bool)
    return absent


def _load_one(prefix: str, modality: str, item_tokens: Sequence[str], missing_item_policy: str) -> ItemFeatures:
    npy_path = f"{prefix}.{modality}.npy"
    if not os.path.isfile(npy_path):
        found = prefix_modalities(prefix)
        raise DataError(
            f"{modality} features not found: no file {npy_path}"
            + (f" (this prefix has: {', '.join(found)})" if found else "")
            + ". Set feature_prefix to the prefix of the exported arrays, or feature_modalities to the modalities "
            "you have."
        )
    # The export's loader checks the array (2-D, finite) against its sidecar (dim, num_items, item_tokens).
    try:
        array, meta = load_item_embeddings(npy_path)
    except ValueError as error:
        raise DataError(f"bad {modality} features: {error}") from None
    file_tokens = meta.get("item_tokens")
    if file_tokens is None:
        raise DataError(
            f"{npy_path}: no sidecar {npy_path[:-4]}.json with item_tokens, so its rows cannot be matched to the "
            'dataset\'s items. Write one: {"item_tokens": ["<item token of row 0>", "<row 1>", ...]}.'
        )
    file_tokens = [str(t) for t in file_tokens]
    position = {token: row for row, token in enumerate(file_tokens)}
    if len(position) != len(file_tokens):
        raise DataError(f"{npy_path}: its sidecar lists {len(file_tokens) - len(position)} item tokens more than once")

    absent_rows = _absent_rows(array, meta, npy_path)
    rows = np.array([position.get(str(token), -1) for token in item_tokens], dtype=np.int64)
    rows[0] = -1  # RecBole's padding item
    absent_items = [str(token) for token, row in zip(item_tokens[1:], rows[1:]) if row < 0]
    if absent_items:
        if missing_item_policy == "error":
            raise DataError(
                f"{npy_path}: {len(absent_items)} of the dataset's {len(item_tokens) - 1} items have no row "
                f"(e.g. {absent_items[:5]}). Export features for the whole catalog, or set "
                "missing_item_policy: zero to give them zero (absent) rows."
            )
        getLogger().warning(
            f"{modality} features: {len(absent_items)} of {len(item_tokens) - 1} items are not in {npy_path}; "
            "they get zero rows and are treated as lacking this modality (missing_item_policy: zero)"
        )
    aligned = np.zeros((len(item_tokens), array.shape[1]), dtype=np.float32)
    found = rows >= 0
    aligned[found] = array[rows[found]]
    present = found.copy()
    present[found] = ~absent_rows[rows[found]]
    return ItemFeatures(modality, npy_path, aligned, present, meta)


def load_item_features(
    prefix: str,
    modalities: Sequence[str],
    item_tokens: Sequence[str],
    missing_item_policy: str = "error",
) -> Dict[str, ItemFeatures]:
    """Read and align every modality's features; logs one line per modality with its source and counts.

    ``item_tokens`` is RecBole's ``dataset.field2id_token[item_field]`` (index = internal id, 0 = padding).
    """
    if missing_item_policy not in MISSING_ITEM_POLICIES:
        raise ConfigError(
            f"missing_item_policy must be one of {list(MISSING_ITEM_POLICIES)}, got {missing_item_policy!r}"
        )
    logger = getLogger()
    features: Dict[str, ItemFeatures] = {}
    for modality in modalities:
        loaded = _load_one(prefix, modality, list(item_tokens), missing_item_policy)
        lacking = int((~loaded.present[1:]).sum())
        logger.info(
            f"{modality} features: {loaded.path} [{len(loaded.array) - 1} items x {loaded.dim}], "
            f"{lacking} items without {modality} (zero rows, masked)"
        )
        features[modality] = loaded
    return features


def modality_list(value, allowed: Sequence[str]) -> Optional[List[str]]:
    """``feature_modalities`` as a list of distinct names from ``allowed``; ``[]`` = no features, None = the
    modalities the feature prefix has (:func:`available_modalities`)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise ConfigError(f"feature_modalities must be a list of modality names such as [text, image], got {value!r}")
    unknown = [m for m in value if m not in allowed]
    if unknown or len(set(value)) != len(value):
        raise ConfigError(
            f"feature_modalities must list distinct names from {list(allowed)}, got {list(value)!r}"
        )
    return list(value)


def available_modalities(prefix: str, allowed: Sequence[str]) -> List[str]:
    """The modalities of ``allowed`` (in that order) that ``prefix`` has arrays for; what
    ``feature_modalities: ~`` reads. DataError when it has none of them."""
    found = prefix_modalities(prefix)
    available = [m for m in allowed if m in found]
    if not available:
        raise DataError(
            f"no item features under {prefix}: no {' or '.join(f'{prefix}.{m}.npy' for m in allowed)}"
            + (f" (this prefix has: {', '.join(found)})" if found else "")
            + ". Set feature_prefix to the prefix of the arrays."
        )
    return available
