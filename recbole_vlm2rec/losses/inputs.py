"""Tensor argument checks of the loss terms: shapes and dtypes, with messages naming the argument."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

def check_square(name: str, scores: Tensor) -> int:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] score matrix, got shape {tuple(scores.shape)}")
    return scores.shape[0]


def check_mask(name: str, mask: Optional[Tensor], batch: int) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch,):
        raise ValueError(
            f"{name} must be a bool tensor of shape [{batch}], got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def check_item_ids(item_ids: Optional[Tensor], batch: int) -> None:
    if item_ids is None:
        return
    if item_ids.dtype.is_floating_point or item_ids.dtype == torch.bool or tuple(item_ids.shape) != (batch,):
        raise ValueError(
            f"item_ids must be an integer tensor of shape [{batch}], "
            f"got {item_ids.dtype} of shape {tuple(item_ids.shape)}"
        )


def check_embeddings(name: str, embeddings: Tensor, batch: Optional[int] = None) -> int:
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be a [B, D] matrix, got shape {tuple(embeddings.shape)}")
    if batch is not None and embeddings.shape[0] != batch:
        raise ValueError(f"{name} has {embeddings.shape[0]} rows, expected B={batch}")
    return embeddings.shape[0]


def check_score_inputs(scores: Tensor, item_ids: Optional[Tensor], row_mask: Optional[Tensor],
                       col_mask: Optional[Tensor]) -> int:
    """The checks of an in-batch score matrix with its optional item ids and masks; returns ``B``."""
    batch = check_square("scores", scores)
    check_item_ids(item_ids, batch)
    check_mask("row_mask", row_mask, batch)
    check_mask("col_mask", col_mask, batch)
    return batch
