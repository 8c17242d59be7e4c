"""Item features from frozen pretrained encoders: ``vlm2rec-data features`` (the paper's BERT/CLIP baselines).

A converted dataset's items (its text sidecar ``NAME.text.jsonl`` and images) are encoded once by

* a **text encoder** through sentence-transformers (any model id or local directory: all-MiniLM-L6-v2,
  BERT-style models with a pooling layer, ...), on the text of ``text_fields`` composed as VLM2Rec's prompts
  compose it (``data.dataset.compose_item_text``);
* optionally an **image encoder** through transformers: any model with ``get_image_features`` (CLIP, SigLIP)
  and its image processor;

and written in the item-embedding format (``recbole_vlm2rec.item_embeddings``): ``<prefix>.text.npy`` and
``<prefix>.image.npy`` with sidecars naming the dataset, the encoder and its settings. VLM2RecSASRec reads them
with ``--feature_prefix=<prefix>``. Rows are L2-normalised. An item without text (every field empty) or
without a usable image (none, missing or unreadable file) gets a zero row, which the format marks as absent
(``masked_rows``); they are counted and logged, never a silent zero vector.

Weights are found by ``recbole_vlm2rec.hub``: a directory, or a hub id already in the Hugging Face cache;
nothing is downloaded unless ``allow_download`` (``--allow-download``). The encoder libraries are the
``features`` extra (``pip install ".[features]"``).
"""
from __future__ import annotations

import os
from logging import getLogger
from typing import Dict, List, Optional, Sequence

import numpy as np

from recbole_vlm2rec.errors import ConfigError, DataError
from recbole_vlm2rec.hub import locate_checkpoint

# Every text field of the sidecar, the description last: a text longer than the encoder's limit loses it first.
DEFAULT_TEXT_FIELDS = ("title", "brand", "categories", "description")
logger = getLogger(__name__)


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{package} is not installed; install the features extra: pip install \".[features]\" "
                          f"(or pip install {package})") from None


def read_catalog(data_dir: str, dataset: str, text_fields: Sequence[str]):
    """``(item_ids, texts, image_paths)`` of every item of the dataset's text sidecar, in its order."""
    from dataset_tools.atomic import SidecarError, read_item_sidecar
    from recbole_vlm2rec.data.dataset import TEXT_FIELDS, compose_item_text

    unknown = [f for f in text_fields if f not in TEXT_FIELDS]
    if unknown or not text_fields:
        raise ConfigError(f"text fields {list(text_fields)}: choose one or more of {list(TEXT_FIELDS)}")
    dataset_dir = os.path.join(data_dir, dataset)
    if not os.path.isdir(dataset_dir):
        raise DataError(f"no dataset directory {dataset_dir}; convert the catalog first (vlm2rec-data amazon ...)")
    try:
        records = read_item_sidecar(dataset_dir, dataset, check_images=False)
    except (SidecarError, FileNotFoundError) as error:
        raise DataError(str(error)) from None
    item_ids = list(records)
    texts = [compose_item_text(records[i], text_fields) for i in item_ids]
    images = [os.path.join(dataset_dir, records[i]["image"]) if records[i].get("image") else None for i in item_ids]
    return item_ids, texts, images


def _normalised(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.where(norms > 0, array / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def encode_texts(texts: List[str], name: str, batch_size: int, device: str, allow_download: bool,
                 progress: bool) -> tuple:
    """``([items, dim] array with zero rows for empty texts, settings for the sidecar)``."""
    sentence_transformers = _require("sentence_transformers", "sentence-transformers")
    source, hub = locate_checkpoint(name, "the text encoder", "--text-encoder", allow_download)
    model = sentence_transformers.SentenceTransformer(source, device=device, **hub)
    present = [k for k, text in enumerate(texts) if text]
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    array = np.zeros((len(texts), dimension()), dtype=np.float32)
    if present:
        encoded = model.encode([texts[k] for k in present], batch_size=batch_size, show_progress_bar=progress,
                               convert_to_numpy=True)
        array[present] = _normalised(np.asarray(encoded, dtype=np.float32))
    settings = {"name": name, "library": "sentence-transformers", "max_seq_length": model.max_seq_length,
                "dim": int(array.shape[1])}
    return array, settings


def encode_images(paths: List[Optional[str]], name: str, batch_size: int, device: str, allow_download: bool,
                  progress: bool) -> tuple:
    """``([items, dim] array with zero rows for items without a usable image, settings, unreadable paths)``."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    transformers = _require("transformers", "transformers")
    source, hub = locate_checkpoint(name, "the image encoder", "--image-encoder", allow_download)
    model = transformers.AutoModel.from_pretrained(source, **hub).to(device).eval()
    if not hasattr(model, "get_image_features"):
        raise ConfigError(f"--image-encoder={name!r} is a {type(model).__name__}, which has no image tower "
                          "(get_image_features); use a CLIP or SigLIP checkpoint")
    processor = transformers.AutoImageProcessor.from_pretrained(source, **hub)
    wanted = [k for k, path in enumerate(paths) if path]
    rows: Dict[int, np.ndarray] = {}
    unreadable: List[str] = []
    with tqdm(total=len(wanted), desc="image features", unit="img", disable=not progress) as bar:
        for start in range(0, len(wanted), batch_size):
            batch, images = wanted[start:start + batch_size], []
            for k in batch:
                try:
                    with Image.open(paths[k]) as image:
                        images.append((k, image.convert("RGB")))
                except OSError as error:  # missing or corrupt: absent, counted
                    unreadable.append(f"{paths[k]} ({type(error).__name__})")
            if images:
                pixels = processor(images=[image for _, image in images], return_tensors="pt")["pixel_values"]
                with torch.no_grad():
                    features = model.get_image_features(pixel_values=pixels.to(device))
                features = getattr(features, "pooler_output", features)  # newer transformers return an output
                for (k, _), row in zip(images, features.float().cpu().numpy()):
                    rows[k] = row
            bar.update(len(batch))
    dim = int(next(iter(rows.values())).shape[0]) if rows else int(model.config.projection_dim)
    array = np.zeros((len(paths), dim), dtype=np.float32)
    if rows:
        keys = sorted(rows)
        array[keys] = _normalised(np.stack([rows[k] for k in keys]))
    settings = {"name": name, "library": "transformers", "model_class": type(model).__name__, "dim": dim}
    return array, settings, unreadable


def write_item_features(data_dir: str, dataset: str, text_encoder: Optional[str] = None,
                        image_encoder: Optional[str] = None, text_fields: Optional[Sequence[str]] = None,
                        batch_size: int = 64, device: str = "cpu", out_prefix: Optional[str] = None,
                        allow_download: bool = False, progress: bool = True) -> dict:
    """Encode the dataset's items and write ``<out_prefix>.<modality>.npy`` + sidecars; returns a summary
    (``prefix``, ``paths``, per modality ``items``/``absent``). Default prefix: ``<data>/<dataset>/features/<dataset>``."""
    from recbole_vlm2rec.item_embeddings import export_item_embeddings

    text_fields = list(DEFAULT_TEXT_FIELDS if text_fields is None else text_fields)
    if not text_encoder and not image_encoder:
        raise ConfigError("give --text-encoder, --image-encoder or both")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    item_ids, texts, images = read_catalog(data_dir, dataset, text_fields)
    prefix = out_prefix or os.path.join(data_dir, dataset, "features", dataset)
    arrays, encoders, summary = {}, {}, {"prefix": prefix, "modalities": {}}
    if text_encoder:
        arrays["text"], encoders["text"] = encode_texts(texts, text_encoder, batch_size, device, allow_download,
                                                        progress)
        encoders["text"]["text_fields"] = list(text_fields)
        absent = sum(1 for t in texts if not t)
        summary["modalities"]["text"] = {"items": len(texts), "absent": absent}
        logger.info(f"text features: {len(texts) - absent:,} of {len(texts):,} items encoded with {text_encoder}; "
                    f"{absent:,} without text ({', '.join(text_fields)} all empty): zero rows, marked absent")
    if image_encoder:
        arrays["image"], encoders["image"], unreadable = encode_images(images, image_encoder, batch_size, device,
                                                                       allow_download, progress)
        no_image = sum(1 for p in images if not p)
        absent = no_image + len(unreadable)
        summary["modalities"]["image"] = {"items": len(images), "absent": absent, "unreadable": unreadable}
        logger.info(f"image features: {len(images) - absent:,} of {len(images):,} items encoded with {image_encoder}; "
                    f"{no_image:,} without an image, {len(unreadable):,} unreadable"
                    + (f" (e.g. {unreadable[0]})" if unreadable else "") + ": zero rows, marked absent")
        if absent == len(images):
            logger.warning("image features: no item has a usable image; the image array is all absent")
    metadata = {"dataset": dataset, "source": "vlm2rec-data features", "encoders": encoders,
                "pooling": "the encoder's own (see encoders)", "normalization": "l2"}
    summary["paths"] = export_item_embeddings(prefix, item_ids, arrays, metadata)
    return summary
