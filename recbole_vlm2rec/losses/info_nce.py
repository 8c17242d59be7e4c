"""InfoNCE with in-batch negatives and false-negative masking (the same item as another row's positive).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recbole_vlm2rec.checks import positive
from .inputs import check_embeddings, check_mask, check_score_inputs

class LossTerm(NamedTuple):
    """A loss value and the number of rows that contributed to it (0: skipped, ``value`` is a zero)."""

    value: Tensor
    rows: Tensor

    @property
    def skipped(self) -> bool:
        """True when no row was valid. Reading it synchronises with the device."""
        return int(self.rows) == 0


def cosine_scores(user: Tensor, item: Tensor) -> Tensor:
    """``S[b, j] = cos(user_b, item_j)`` in float32; zero rows (absent embeddings) score 0."""
    return F.normalize(user.float(), dim=-1) @ F.normalize(item.float(), dim=-1).T


def candidate_logits(
    logits: Tensor,
    item_ids: Optional[Tensor],
    row_mask: Optional[Tensor],
    col_mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The in-batch candidate sets: ``(rows [B] bool, logits with non-candidates at -inf)``; ``logits`` is
    ``[B, B]`` or a stack ``[..., B, B]`` sharing the ids and masks.

    A row is valid when it is kept by ``row_mask`` and its own positive column by ``col_mask``. Column ``j``
    is a candidate of row ``b`` when it exists (``col_mask``) and, for ``j != b``, holds another item than
    the row's positive (``item_ids``: the same item again is a false negative). Invalid rows are zeros.
    """
    batch = logits.shape[-1]
    eye = torch.eye(batch, dtype=torch.bool, device=logits.device)
    rows = torch.ones(batch, dtype=torch.bool, device=logits.device)
    excluded = torch.zeros_like(eye)
    if col_mask is not None:
        excluded = excluded | ~col_mask[None, :]
        rows = rows & col_mask
    if row_mask is not None:
        rows = rows & row_mask
    if item_ids is not None:
        excluded = excluded | (item_ids[:, None] == item_ids[None, :])
    # The positive is never excluded, so every row keeps one finite logit and logsumexp stays finite.
    excluded = excluded & ~eye
    # Invalid rows are overwritten (not multiplied) with zeros: masked_fill passes a zero gradient back
    # even where the original score was inf or NaN, whereas 0 * NaN would still be NaN.
    return rows, logits.masked_fill(~rows[:, None], 0.0).masked_fill(excluded, float("-inf"))


def in_batch_cross_entropy(
    logits: Tensor,
    item_ids: Optional[Tensor],
    row_mask: Optional[Tensor],
    col_mask: Optional[Tensor],
) -> LossTerm:
    """Mean over valid rows of ``logsumexp_{j kept} logits[b, j] - logits[b, b]``."""
    rows, logits = candidate_logits(logits, item_ids, row_mask, col_mask)
    per_row = torch.logsumexp(logits, dim=1) - logits.diagonal()
    count = rows.sum()
    value = per_row.masked_fill(~rows, 0.0).sum() / count.clamp_min(1)
    return LossTerm(value, count)


def info_nce(
    scores: Tensor,
    tau: float = 0.05,
    item_ids: Optional[Tensor] = None,
    row_mask: Optional[Tensor] = None,
    col_mask: Optional[Tensor] = None,
) -> LossTerm:
    r"""InfoNCE over in-batch targets, from a precomputed cosine score matrix.

    ``L_CL = -1/B sum_b log( exp(s_bb/tau) / sum_{j in N(b)} exp(s_bj/tau) )``

    where ``N(b)`` holds ``b`` and every present column ``j != b`` whose item id differs from
    ``item_ids[b]`` (a column holding the row's own positive item again is a false negative).

    Args:
        scores: ``S[B, B]``, ``S[b, j] = cos(user_b, item_j)``; positives on the diagonal.
        tau: temperature, > 0.
        item_ids: optional integer ``[B]``, the item id of each column, for false-negative masking.
        row_mask: optional bool ``[B]``, rows to score.
        col_mask: optional bool ``[B]``, columns that exist as candidates.
    """
    tau = positive("tau", tau)
    check_score_inputs(scores, item_ids, row_mask, col_mask)
    return in_batch_cross_entropy(scores.float() / tau, item_ids, row_mask, col_mask)


class InfoNCELoss(nn.Module):
    r"""InfoNCE between user and item embeddings over in-batch targets (the internal-fusion loss).

    ``L_CL = -1/B sum_b log( exp(s_bb/tau) / sum_{j in N(b)} exp(s_bj/tau) )``, ``s_bj = cos(u_b, i_j)``;
    see :func:`info_nce` for ``N(b)`` and the masks.

    Args:
        tau: temperature, > 0 (default 0.05).
    """

    def __init__(self, tau: float = 0.05):
        super().__init__()
        self.tau = positive("tau", tau)

    def forward(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Optional[Tensor] = None,
        row_mask: Optional[Tensor] = None,
        col_mask: Optional[Tensor] = None,
    ) -> LossTerm:
        batch = check_embeddings("user", user)
        check_embeddings("item", item, batch)
        check_mask("row_mask", row_mask, batch)
        check_mask("col_mask", col_mask, batch)
        # Absent rows are zeroed before scoring so that garbage in them (NaN) cannot leak into the
        # gradients of valid rows through the matmul backward.
        if row_mask is not None:
            user = torch.where(row_mask[:, None], user, 0.0)
        if col_mask is not None:
            item = torch.where(col_mask[:, None], item, 0.0)
        return info_nce(cosine_scores(user, item), self.tau, item_ids, row_mask, col_mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
