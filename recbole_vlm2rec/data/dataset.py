"""``VLM2RecDataset``: RecBole's SequentialDataset plus each item's text and image.

The exact item strings and image paths come from the ``<dataset>.text.jsonl`` sidecar that ``vlm2rec-data``
writes beside the atomic files (RecBole's ``token_seq`` fields lose the exact strings). After RecBole has
remapped ids, ``item_texts[i]`` and ``item_images[i]`` belong to the internal item id ``i`` (0 is padding).

Items without text keep an empty string (the encoder masks their text branch: a zero row), items without an
image (none given, or the file is missing) get ``None``: both are counted and logged, never dropped. A dataset with neither text
nor images for any item is an error; one without any image runs text-only (and the reverse), as logged.
"""
from __future__ import annotations

import os
from logging import getLogger
from typing import List, Optional, Sequence

from recbole.data.dataset import SequentialDataset

from dataset_tools.atomic import SIDECAR_FIELDS, sidecar_path
from recbole_vlm2rec.errors import DataError

# the text fields of the sidecar (dataset_tools/atomic.py writes and reads it) that prompts can be built from
TEXT_FIELDS = tuple(field for field in SIDECAR_FIELDS if field != "item_id")


def compose_item_text(record: dict, fields: Sequence[str], max_chars: int = 2000) -> str:
    """One line of item text for the prompts, e.g. ``"Rose lip balm | brand: Acme | categories: Beauty, Lips"``.

    ``title`` and ``description`` are written as they are; ``brand`` and ``categories`` with a label.
    Empty fields are left out. ``max_chars`` bounds the string before tokenisation (the encoder truncates
    by tokens as well).
    """
    parts = []
    for field in fields:
        value = record.get(field)
        if isinstance(value, list):
            value = ", ".join(v for v in value if v)
        value = (value or "").strip()
        if not value:
            continue
        parts.append(value if field in ("title", "description") else f"{field}: {value}")
    return " | ".join(parts)[:max_chars]


class VLM2RecDataset(SequentialDataset):
    """Sequential interactions + ``item_texts`` / ``item_images`` aligned with RecBole's internal item ids."""

    def __init__(self, config):
        super().__init__(config)
        self._load_item_content()

    def _load_item_content(self) -> None:
        from dataset_tools.atomic import SidecarError, read_item_sidecar

        logger = getLogger()
        fields = list(self.config["item_text_fields"] or ())  # default: properties/model/VLM2Rec.yaml
        if not fields:
            raise DataError(f"item_text_fields is empty; choose some of {list(TEXT_FIELDS)}")
        unknown = [f for f in fields if f not in TEXT_FIELDS]
        if unknown:
            raise DataError(f"item_text_fields: unknown field(s) {unknown}; choose from {list(TEXT_FIELDS)}")
        dataset_dir = self.config["data_path"]
        try:
            records = read_item_sidecar(dataset_dir, self.dataset_name, check_images=False)
        except SidecarError as error:
            raise DataError(f"{self.config['model']} needs item text and/or images: {error}") from None

        tokens = self.field2id_token[self.iid_field]
        texts: List[str] = [""]
        images: List[Optional[str]] = [None]
        no_record = no_text = no_image = missing_file = 0
        for token in tokens[1:]:
            record = records.get(str(token))
            if record is None:
                no_record += 1
                texts.append("")
                images.append(None)
                continue
            text = compose_item_text(record, fields)
            no_text += not text
            texts.append(text)
            image = record.get("image")
            if image is None:
                no_image += 1
                images.append(None)
            elif not os.path.isfile(os.path.join(dataset_dir, image)):
                missing_file += 1
                images.append(None)
            else:
                images.append(os.path.join(dataset_dir, image))
        self.item_texts, self.item_images = texts, images
        n_items = len(tokens) - 1
        self.content_stats = {
            "items": n_items,
            "without_sidecar_record": no_record,
            "without_text": no_text + no_record,
            "without_image": no_image + no_record + missing_file,
            "image_file_missing": missing_file,
        }
        logger.info(
            f"[{self.dataset_name}] item content: {n_items} items, "
            f"{n_items - self.content_stats['without_text']} with text, "
            f"{n_items - self.content_stats['without_image']} with an image "
            f"({missing_file} image files missing, {no_record} items absent from the sidecar)"
        )
        if self.content_stats["without_text"] == n_items and self.content_stats["without_image"] == n_items:
            raise DataError(
                f"{sidecar_path(dataset_dir, self.dataset_name)}: no item has text or an image; "
                "VLM2Rec needs at least one modality. Check the conversion (vlm2rec-data) and item_text_fields."
            )
        if missing_file:
            logger.warning(f"{missing_file} image files listed in the sidecar do not exist: those items are text-only")

    @property
    def has_text(self) -> bool:
        return self.content_stats["without_text"] < self.content_stats["items"]

    @property
    def has_images(self) -> bool:
        return self.content_stats["without_image"] < self.content_stats["items"]
