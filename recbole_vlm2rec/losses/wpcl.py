"""WPCL: weak-modality penalized contrastive learning (fused InfoNCE whose negatives are penalised by the weak
modality's similarity).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from recbole_vlm2rec.checks import positive, non_negative, choice
from .info_nce import LossTerm, in_batch_cross_entropy
from .inputs import check_square, check_mask, check_item_ids

WPCL_FORMS = ("relative", "absolute")


class WPCLLoss(nn.Module):
    r"""Weak-modality penalized contrastive loss.

    ``form="absolute"`` (the first reconstruction, docs/design.md#wpcl):

    ``L_WPCL = -1/B sum_b log( exp(s_bb/tau) /
    ( exp(s_bb/tau) + sum_{j in N(b), j != b} exp((s_bj + beta_bj * s^w_bj)/tau) ) )``

    ``form="relative"`` (the default): the positive's weak-modality similarity is the reference,

    ``L_WPCL = -1/B sum_b log( exp((s_bb + beta_b s^w_bb)/tau) /
    ( exp((s_bb + beta_b s^w_bb)/tau) + sum_{j in N(b), j != b} exp((s_bj + beta_b s^w_bj)/tau) ) )``

    i.e. each negative is penalized by ``beta * (s^w_bj - s^w_bb)``. ``s`` is the fused score matrix and
    ``s^w`` the weak modality's. Raising a negative's logit by its weak-modality similarity makes the loss
    push that similarity down, so gradient reaches the weak modality even when the strong one already
    separates the batch. Why the relative form: in the absolute form a *negative* weak similarity is a
    reward, so a model can drive the loss to zero without ranking anything, by making every user's
    weak-modality embedding point away from every item's (``s^w_bj = -1`` for all ``j`` lowers each
    negative's logit by ``beta/tau``); we observed exactly this on the demo (fused loss 0, per-modality
    losses at chance). The relative form is invariant to such a shift of ``s^w``.

    ``beta_bj = beta`` where the weak modality is present for user ``b`` and item ``j`` (in the relative
    form: for user ``b``, its positive item and item ``j``), else 0; with ``beta = 0`` the loss is InfoNCE
    on ``s``, bit for bit, in both forms. ``N(b)`` and ``row_mask``/``col_mask``/``item_ids`` are as in
    :func:`info_nce`.

    Args:
        tau: temperature, > 0 (default 0.05).
        beta: weight of the weak modality's negative similarities, >= 0 (default 1.0).
        form: ``"relative"`` (default) or ``"absolute"``.
    """

    def __init__(self, tau: float = 0.05, beta: float = 1.0, form: str = "relative"):
        super().__init__()
        self.tau = positive("tau", tau)
        self.beta = non_negative("beta", beta)
        self.form = choice("form", form, WPCL_FORMS)

    def forward(
        self,
        scores: Tensor,
        weak_scores: Tensor,
        item_ids: Optional[Tensor] = None,
        row_mask: Optional[Tensor] = None,
        col_mask: Optional[Tensor] = None,
        weak_row_mask: Optional[Tensor] = None,
        weak_col_mask: Optional[Tensor] = None,
    ) -> LossTerm:
        """``weak_row_mask``/``weak_col_mask``: users/items for which the weak modality exists."""
        batch = check_square("scores", scores)
        if weak_scores.shape != scores.shape:
            raise ValueError(
                f"weak_scores must have the shape of scores {tuple(scores.shape)}, got {tuple(weak_scores.shape)}"
            )
        check_item_ids(item_ids, batch)
        for name, mask in (
            ("row_mask", row_mask),
            ("col_mask", col_mask),
            ("weak_row_mask", weak_row_mask),
            ("weak_col_mask", weak_col_mask),
        ):
            check_mask(name, mask, batch)
        eye = torch.eye(batch, dtype=torch.bool, device=scores.device)
        if self.form == "absolute":
            penalized = ~eye
        else:  # the whole row, positive included, and only where the positive has the weak modality
            penalized = torch.ones_like(eye)
            if weak_col_mask is not None:
                penalized = penalized & weak_col_mask[:, None]
        if weak_row_mask is not None:
            penalized = penalized & weak_row_mask[:, None]
        if weak_col_mask is not None:
            penalized = penalized & weak_col_mask[None, :]
        # torch.where, not a product with the mask: an absent modality's scores never reach the value or
        # the gradient. Where nothing is penalised the addend is an exact zero, hence beta=0 == InfoNCE.
        penalty = torch.where(penalized, weak_scores.float(), 0.0) * self.beta
        return in_batch_cross_entropy((scores.float() + penalty) / self.tau, item_ids, row_mask, col_mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}, form={self.form!r}"
