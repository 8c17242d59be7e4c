"""CRTR: cross-modal relational topology regularization (each modality's in-batch relations pulled
towards the other's).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from recbole_vlm2rec.checks import positive
from .info_nce import LossTerm, cosine_scores
from .inputs import check_mask, check_embeddings

def _masked_log_softmax(logits: Tensor, keep: Tensor) -> Tensor:
    """Row-wise log-softmax over the kept entries; excluded entries come back as 0 (not -inf).

    Excluded entries are set to -inf before the softmax so that they get exactly zero probability. A
    row with no kept entry would then be all -inf, and its NaN log-probabilities would turn into NaN
    gradients even behind a mask, so such rows are softmaxed over zeros instead; the caller drops them.
    The -inf results are replaced by 0 afterwards so that products like ``p * log p`` stay 0 * 0.
    """
    fill = torch.where(keep.any(dim=1, keepdim=True), float("-inf"), 0.0)
    log_probs = torch.log_softmax(torch.where(keep, logits, fill), dim=1)
    return log_probs.masked_fill(~keep, 0.0)


class CRTRLoss(nn.Module):
    r"""Cross-modal relational topology regularization (symmetric KL between in-batch relations).

    ``R^m_b = softmax_{j != b}( cos(x^m_b, x^m_j) / tau_r )`` for ``m`` in text, image;

    ``L_CRTR = 1/B sum_b [ KL(R^T_b || R^V_b) + KL(R^V_b || R^T_b) ]
             = 1/B sum_b sum_{j != b} (R^T_bj - R^V_bj) (log R^T_bj - log R^V_bj)``.

    The second form is what is computed: it is exactly symmetric in the two modalities. With ``mask``
    (rows that have both modalities), the softmax runs over the valid ``j != b`` only and ``B`` counts
    the valid rows; with fewer than 2 valid rows there is no relation and the loss is a zero.

    Args:
        tau_r: relation temperature, > 0 (default 0.1).
    """

    def __init__(self, tau_r: float = 0.1):
        super().__init__()
        self.tau_r = positive("tau_r", tau_r)

    def forward(self, text: Tensor, image: Tensor, mask: Optional[Tensor] = None) -> LossTerm:
        """``text``, ``image``: ``[B, D]`` (D may differ); ``mask``: bool ``[B]``, rows having both."""
        batch = check_embeddings("text", text)
        check_embeddings("image", image, batch)
        check_mask("mask", mask, batch)
        valid = torch.ones(batch, dtype=torch.bool, device=text.device) if mask is None else mask
        if mask is not None:
            # Zero the absent rows first: a NaN row would otherwise leak into valid rows' gradients
            # through the matmul backward (0 * NaN), masks on the scores notwithstanding.
            text, image = (torch.where(mask[:, None], x, 0.0) for x in (text, image))
        keep = valid[:, None] & valid[None, :] & ~torch.eye(batch, dtype=torch.bool, device=text.device)
        rows = keep.any(dim=1)  # valid and at least one other valid row
        log_p = _masked_log_softmax(cosine_scores(text, text) / self.tau_r, keep)
        log_q = _masked_log_softmax(cosine_scores(image, image) / self.tau_r, keep)
        # exp(0) = 1 at excluded entries on both sides, so (p - q) is 0 there.
        per_row = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1)
        count = rows.sum()
        value = per_row.masked_fill(~rows, 0.0).sum() / count.clamp_min(1)
        return LossTerm(value, count)

    def extra_repr(self) -> str:
        return f"tau_r={self.tau_r}"
