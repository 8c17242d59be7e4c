"""External fusion of text and image embeddings: the one formula every part of the project uses.

    fused = normalize(normalize(text) * text_mask + normalize(image) * image_mask)

A row lacking a modality (mask False, or the modality absent altogether: ``None``) contributes nothing, so an
item without an image is its text alone, an item without text its image alone, and a row with neither is
the zero vector (it scores 0 against everything). Masked rows are replaced by zeros *before* normalising
(``torch.where``), so that their values, even NaN, reach neither the result nor the gradient.

Training (``losses.VLM2RecObjective``), evaluation and export (``models.vlm2rec``) and the encoder's
``ModalityEmbeddings.fused`` all call :func:`fuse`.

Example::

    >>> text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> image = torch.tensor([[0.0, 1.0], [5.0, 5.0]])
    >>> fuse(text, image, image_mask=torch.tensor([True, False]))
    tensor([[0.7071, 0.7071],
            [0.0000, 1.0000]])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MODALITIES = ("text", "image")  # the two modalities of an item and a user, in this order everywhere


def masked_normalize(x: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
    """``normalize(x)`` in float32 with the rows where ``mask`` is False set to zero; ``None`` stays ``None``."""
    if x is None:
        return None
    x = x.float()
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), x, 0.0)
    return F.normalize(x, dim=-1)


def fuse(
    text: Optional[Tensor],
    image: Optional[Tensor],
    image_mask: Optional[Tensor] = None,
    text_mask: Optional[Tensor] = None,
) -> Tensor:
    """The fused embedding ``[B, D]`` (float32, unit rows or zero) of per-modality embeddings ``[B, D]``.

    Args:
        text, image: per-modality embeddings, or ``None`` for a modality that is not used at all.
        image_mask, text_mask: bool ``[B]``, True where the row has that modality (``None``: every row has it).
    """
    parts = [e for e in (masked_normalize(text, text_mask), masked_normalize(image, image_mask)) if e is not None]
    if not parts:
        raise ValueError("fuse: both text and image are None; give at least one modality")
    return F.normalize(sum(parts), dim=-1)
