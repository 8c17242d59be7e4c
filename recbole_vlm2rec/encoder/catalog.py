"""Catalog encoding: every item of a catalog once, in batches sorted by text length (little padding).

:meth:`VLMEncoder.encode_catalog` is the only entry point and the only cache of item embeddings: it keeps
the last result, keyed by the catalog's content, the fusion and the encoder's weights version, which
changes on every optimizer step, every ``load_state_dict``, every ``train()`` and every adapter load or
merge. This module holds the parts that need no state: the encoding loop and the catalog digest.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from recbole_vlm2rec.cross_device import gather_rows, world_size
from recbole_vlm2rec.fusion import fuse

from .inputs import image_key

FUSIONS = ("external", "internal")


def check_catalog(item_texts: Sequence[str], item_images: Sequence, fusion: str) -> None:
    if len(item_texts) != len(item_images):
        raise ValueError(f"encode_catalog: {len(item_texts)} texts but {len(item_images)} images")
    if fusion not in FUSIONS:
        raise ValueError(f"encode_catalog: fusion must be 'external' or 'internal', got {fusion!r}")


def catalog_digest(texts: Sequence[str], images: Sequence) -> str:
    """A hash of the catalog's content (texts and image references, in order)."""
    h = hashlib.sha1()
    for t, i in zip(texts, images):
        h.update(str(t).encode("utf-8", "surrogatepass") + b"\0")
        h.update((image_key(i) if isinstance(i, Image.Image) else str(i)).encode("utf-8", "surrogatepass") + b"\1")
    return h.hexdigest()


def encode_in_length_order(encoder, item_texts: Sequence[str], item_images: Sequence, batch_size: int,
                           progress: bool, fusion: str, shard: bool = False) -> Dict[str, torch.Tensor]:
    """Encode the catalog in eval mode without gradients (the encoder's mode is restored afterwards).

    Returns, on the encoder's device, rows in input order: ``text``, ``image`` (float32 ``[N, D]``, zero
    rows where masked), ``text_mask``, ``image_mask`` (bool ``[N]``) and ``fused`` (external fusion), or
    ``interleaved`` (internal fusion).

    ``shard``: under ``torch.distributed``, process ``r`` of ``N`` encodes batches ``r, r + N, ...`` of the
    same length-sorted batches one process would encode, and the rows are gathered: every process gets the
    whole catalog, equal to one process's, for ``1/N`` of the work. A collective: every process must call it.
    """
    from tqdm.auto import tqdm

    order = np.argsort([len(t or "") for t in item_texts], kind="stable")
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shard and world_size() > 1:
        batches = batches[dist.get_rank()::world_size()]
    else:
        shard = False
    names = ("text", "image", "text_mask", "image_mask") if fusion == "external" else ("interleaved",)
    parts: Dict[str, list] = {name: [] for name in names}
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for idx in tqdm(batches, desc="encode catalog", unit="batch", disable=not progress):
                texts = [item_texts[i] for i in idx]
                images = [item_images[i] for i in idx]
                if fusion == "external":
                    out = encoder.encode_items(texts, images)
                    for name in names:
                        parts[name].append(getattr(out, name))
                else:
                    parts["interleaved"].append(encoder.encode_interleaved_items(texts, images))
    finally:
        encoder.train(was_training)
    # Rows stay on the device: a copy to the host per batch would wait for each batch to finish.
    empty = torch.zeros(0, encoder.hidden_size, device=encoder.device)
    rows = {name: torch.cat(chunks) if chunks else (empty if name in ("text", "image", "interleaved")
                                                    else empty[:, 0].bool())
            for name, chunks in parts.items()}
    positions = torch.from_numpy(np.concatenate(batches) if batches else np.zeros(0, np.int64)).to(encoder.device)
    if shard:
        rows = {name: gather_rows(tensor) for name, tensor in rows.items()}
        positions = gather_rows(positions)
    result = {}
    for name, tensor in rows.items():
        result[name] = torch.empty_like(tensor)
        result[name][positions] = tensor
    if fusion == "external":
        result["fused"] = fuse(result["text"], result["image"], result["image_mask"], result["text_mask"])
    return result
