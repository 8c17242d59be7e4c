"""VLM2Rec's contrastive objective: InfoNCE, WPCL, CRTR and the weak-modality detector.

DESIGN.md section 2.2 gives the equations; every equation is repeated in the docstring of the piece that
computes it. Conventions shared by all pieces:

* In-batch targets: row ``b`` of a score matrix ``S[B, B]`` is user ``b``; column ``j`` is the positive item
  of user ``j``, so the positive of row ``b`` is ``S[b, b]`` and every other column is a negative.
* Masks are bool tensors of shape ``[B]``, ``True`` = present. ``row_mask`` chooses the users (rows) that are
  scored, ``col_mask`` the items (columns) that exist as candidates. A row whose own positive column is
  masked has nothing to score and is dropped as well.
* A loss over masked rows is the mean over the rows that remain. If none remains, the value is a zero that
  is still connected to the graph (so ``backward`` works and gives zero gradients, never NaN), and
  ``LossTerm.rows`` is 0, which is how a caller learns that the term was skipped.
* Losses are computed in float32, whatever the input dtype: under bf16 autocast, ``cos / 0.05`` followed by
  ``exp`` loses too much precision otherwise, and the ``[B, B]`` matrices are small.

This module imports nothing of the package's own: the RecBole models build on it, not the other way round.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recbole_vlm2rec.fusion import fuse, masked_normalize

MODALITIES = ("text", "image")
CRITERIA = ("loss", "grad")
RELATIONS = ("item", "user", "both")
WPCL_FORMS = ("relative", "absolute")

__all__ = [
    "MODALITIES",
    "CRITERIA",
    "RELATIONS",
    "LossTerm",
    "cosine_scores",
    "info_nce",
    "InfoNCELoss",
    "WPCLLoss",
    "CRTRLoss",
    "modality_gradient_norms",
    "WeakModalityDetector",
    "ObjectiveOutput",
    "VLM2RecObjective",
]


# --------------------------------------------------------------------------------------------------------
# argument checks


def _real(name: str, value) -> float:
    # bool is a numbers.Real subclass; `tau: true` in a YAML file is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _positive(name: str, value) -> float:
    checked = _real(name, value)
    if checked <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return checked


def _non_negative(name: str, value) -> float:
    checked = _real(name, value)
    if checked < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return checked


def _choice(name: str, value, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_square(name: str, scores: Tensor) -> int:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] score matrix, got shape {tuple(scores.shape)}")
    return scores.shape[0]


def _check_mask(name: str, mask: Optional[Tensor], batch: int) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch,):
        raise ValueError(
            f"{name} must be a bool tensor of shape [{batch}], got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def _check_item_ids(item_ids: Optional[Tensor], batch: int) -> None:
    if item_ids is None:
        return
    if item_ids.dtype.is_floating_point or item_ids.dtype == torch.bool or tuple(item_ids.shape) != (batch,):
        raise ValueError(
            f"item_ids must be an integer tensor of shape [{batch}], "
            f"got {item_ids.dtype} of shape {tuple(item_ids.shape)}"
        )


def _check_embeddings(name: str, embeddings: Tensor, batch: Optional[int] = None) -> int:
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be a [B, D] matrix, got shape {tuple(embeddings.shape)}")
    if batch is not None and embeddings.shape[0] != batch:
        raise ValueError(f"{name} has {embeddings.shape[0]} rows, expected B={batch}")
    return embeddings.shape[0]


# --------------------------------------------------------------------------------------------------------
# InfoNCE


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


def _in_batch_cross_entropy(
    logits: Tensor,
    item_ids: Optional[Tensor],
    row_mask: Optional[Tensor],
    col_mask: Optional[Tensor],
) -> LossTerm:
    """Mean over valid rows of ``logsumexp_{j kept} logits[b, j] - logits[b, b]``."""
    batch = logits.shape[0]
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
    logits = logits.masked_fill(~rows[:, None], 0.0).masked_fill(excluded, float("-inf"))
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
    tau = _positive("tau", tau)
    batch = _check_square("scores", scores)
    _check_item_ids(item_ids, batch)
    _check_mask("row_mask", row_mask, batch)
    _check_mask("col_mask", col_mask, batch)
    return _in_batch_cross_entropy(scores.float() / tau, item_ids, row_mask, col_mask)


class InfoNCELoss(nn.Module):
    r"""InfoNCE between user and item embeddings over in-batch targets (the internal-fusion loss).

    ``L_CL = -1/B sum_b log( exp(s_bb/tau) / sum_{j in N(b)} exp(s_bj/tau) )``, ``s_bj = cos(u_b, i_j)``;
    see :func:`info_nce` for ``N(b)`` and the masks.

    Args:
        tau: temperature, > 0 (default 0.05).
    """

    def __init__(self, tau: float = 0.05):
        super().__init__()
        self.tau = _positive("tau", tau)

    def forward(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Optional[Tensor] = None,
        row_mask: Optional[Tensor] = None,
        col_mask: Optional[Tensor] = None,
    ) -> LossTerm:
        batch = _check_embeddings("user", user)
        _check_embeddings("item", item, batch)
        _check_mask("row_mask", row_mask, batch)
        _check_mask("col_mask", col_mask, batch)
        # Absent rows are zeroed before scoring so that garbage in them (NaN) cannot leak into the
        # gradients of valid rows through the matmul backward.
        if row_mask is not None:
            user = torch.where(row_mask[:, None], user, 0.0)
        if col_mask is not None:
            item = torch.where(col_mask[:, None], item, 0.0)
        return info_nce(cosine_scores(user, item), self.tau, item_ids, row_mask, col_mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


# --------------------------------------------------------------------------------------------------------
# WPCL


class WPCLLoss(nn.Module):
    r"""Weak-modality penalized contrastive loss.

    ``form="absolute"`` (DESIGN.md 2.2 as written):

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
        self.tau = _positive("tau", tau)
        self.beta = _non_negative("beta", beta)
        self.form = _choice("form", form, WPCL_FORMS)

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
        batch = _check_square("scores", scores)
        if weak_scores.shape != scores.shape:
            raise ValueError(
                f"weak_scores must have the shape of scores {tuple(scores.shape)}, got {tuple(weak_scores.shape)}"
            )
        _check_item_ids(item_ids, batch)
        for name, mask in (
            ("row_mask", row_mask),
            ("col_mask", col_mask),
            ("weak_row_mask", weak_row_mask),
            ("weak_col_mask", weak_col_mask),
        ):
            _check_mask(name, mask, batch)
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
        return _in_batch_cross_entropy((scores.float() + penalty) / self.tau, item_ids, row_mask, col_mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}, form={self.form!r}"


# --------------------------------------------------------------------------------------------------------
# CRTR


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
        self.tau_r = _positive("tau_r", tau_r)

    def forward(self, text: Tensor, image: Tensor, mask: Optional[Tensor] = None) -> LossTerm:
        """``text``, ``image``: ``[B, D]`` (D may differ); ``mask``: bool ``[B]``, rows having both."""
        batch = _check_embeddings("text", text)
        _check_embeddings("image", image, batch)
        _check_mask("mask", mask, batch)
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


# --------------------------------------------------------------------------------------------------------
# weak-modality detection


def modality_gradient_norms(
    loss: Tensor, text: Sequence[Tensor], image: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """``(||dloss/dE^T||, ||dloss/dE^V||)``: Frobenius norms over all tensors of each modality.

    Uses ``torch.autograd.grad(retain_graph=True)``, so ``loss.backward()`` still works afterwards.
    autograd only walks the part of the graph between ``loss`` and the given tensors, which for
    embeddings is the loss head, not the encoder. Tensors that do not require grad contribute 0.
    """
    if not loss.requires_grad:
        raise RuntimeError("modality_gradient_norms: loss does not require grad (computed under no_grad?)")
    groups = [[t for t in tensors if t is not None and t.requires_grad] for tensors in (text, image)]
    inputs = groups[0] + groups[1]
    if not inputs:
        raise RuntimeError("modality_gradient_norms: none of the text or image embeddings requires grad")
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    norms = []
    for start, stop in ((0, len(groups[0])), (len(groups[0]), len(inputs))):
        squared = loss.new_zeros((), dtype=torch.float32)
        for grad in grads[start:stop]:
            if grad is not None:
                squared = squared + grad.float().pow(2).sum()
        norms.append(squared.sqrt())
    return norms[0], norms[1]


class WeakModalityDetector(nn.Module):
    r"""Decides which modality is weak; its state lives in buffers (state_dict, device moves, DDP).

    * ``criterion="loss"``: ``w = argmax_m EMA(L^m)``, ``EMA <- momentum * EMA + (1 - momentum) * L^m``.
      Each modality's EMA starts at its first observed loss; a step where a modality's loss is absent
      (``None``: no valid row in the batch) leaves its EMA alone. The decision is only revised once both
      EMAs have been observed.
    * ``criterion="grad"``: ``w = argmin_m ||dL_CL/dE^m||``, from the norms passed to :meth:`update`
      (see :func:`modality_gradient_norms`).

    Ties, and the state before any evidence, go to ``"image"``: the modality that usually collapses
    (DESIGN.md section 1). ``weak_counts[m]`` counts the updates after which ``m`` was weak.

    Args:
        criterion: ``"loss"`` (default) or ``"grad"``.
        momentum: EMA momentum in [0, 1) (default 0.9).
    """

    ema: Tensor
    seen: Tensor
    weak_counts: Tensor
    weak_index: Tensor

    def __init__(self, criterion: str = "loss", momentum: float = 0.9):
        super().__init__()
        self.criterion = _choice("criterion", criterion, CRITERIA)
        self.momentum = _real("momentum", momentum)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.register_buffer("ema", torch.zeros(len(MODALITIES)))
        self.register_buffer("seen", torch.zeros(len(MODALITIES), dtype=torch.bool))
        self.register_buffer("weak_counts", torch.zeros(len(MODALITIES), dtype=torch.long))
        self.register_buffer("weak_index", torch.tensor(MODALITIES.index("image")))

    @property
    def weak(self) -> str:
        """The current weak modality, ``"text"`` or ``"image"``."""
        return MODALITIES[int(self.weak_index)]

    @property
    def counts(self) -> dict:
        """``{"text": n, "image": n}``: how many updates ended with each modality weak."""
        return dict(zip(MODALITIES, self.weak_counts.tolist()))

    @torch.no_grad()
    def update(
        self,
        loss_text=None,
        loss_image=None,
        grad_text=None,
        grad_image=None,
    ) -> str:
        """Record one step and return the weak modality. Values are floats or 0-d tensors (detached here)."""
        for index, loss in enumerate((loss_text, loss_image)):
            if loss is None:
                continue
            value = torch.as_tensor(loss, dtype=self.ema.dtype, device=self.ema.device)
            if self.seen[index]:
                self.ema[index] = self.momentum * self.ema[index] + (1 - self.momentum) * value
            else:
                self.ema[index] = value
                self.seen[index] = True
        if self.criterion == "loss":
            if bool(self.seen.all()):
                self.weak_index.fill_(0 if bool(self.ema[0] > self.ema[1]) else 1)
        else:
            if grad_text is None or grad_image is None:
                raise ValueError("criterion='grad' needs both grad_text and grad_image")
            self.weak_index.fill_(0 if float(grad_text) < float(grad_image) else 1)
        self.weak_counts[self.weak_index] += 1
        return self.weak

    def extra_repr(self) -> str:
        return f"criterion={self.criterion!r}, momentum={self.momentum}"


# --------------------------------------------------------------------------------------------------------
# the whole objective


@dataclass
class ObjectiveOutput:
    """What :class:`VLM2RecObjective` computes for one batch.

    ``wpcl``: the contrastive term to minimise (plain InfoNCE on the fused scores when only one modality
    exists). ``crtr``: the raw CRTR value, *not* multiplied by ``crtr_weight``; the caller weights it so
    that RecBole logs the weighted term. ``loss_text``/``loss_image``: detached per-modality InfoNCE
    (``None`` when the modality is absent or no row had it). ``weak``: the modality penalised in this
    batch, ``None`` with a single modality. ``grad_norm_ratio``: ``||dL/dE^T|| / ||dL/dE^V||`` for
    ``L = wpcl + crtr_weight * crtr``, when asked for and both modalities exist. ``fused_user``,
    ``fused_item``: the L2-normalised fused embeddings (float32).
    """

    wpcl: Tensor
    crtr: Tensor
    loss_text: Optional[Tensor]
    loss_image: Optional[Tensor]
    weak: Optional[str]
    grad_norm_ratio: Optional[Tensor]
    fused_user: Tensor
    fused_item: Tensor


class VLM2RecObjective(nn.Module):
    r"""InfoNCE + WPCL + CRTR on per-modality user and item embeddings (model-agnostic).

    Per modality ``m``, embeddings are L2-normalised (``e^m = normalize(x^m)``); the fused embedding is
    ``normalize(e^T + e^V)`` where the image exists and ``normalize(e^T)`` where it does not (and
    ``normalize(e^V)`` on image-only data). Scores are cosines: ``s`` fused, ``s^T``, ``s^V`` per modality.
    One call:

    1. ``L^T``, ``L^V`` = InfoNCE on detached ``s^T``, ``s^V``, both on the same support: the users and
       items that have both modalities, so that neither looks weaker merely for having more negatives.
    2. In training mode, the detector is updated (``loss``: from ``L^T``, ``L^V``; ``grad``: from the
       gradient norms of fused InfoNCE ``L_CL`` w.r.t. each modality's input embeddings). Evaluation
       mode leaves its state alone and uses the current decision.
    3. ``L_WPCL`` with the weak modality's scores (``beta = 0`` for users/items lacking it).
    4. ``L_CRTR`` over items, users, or both (``relation="both"`` sums the two terms, each a mean over its
       own valid rows).

    With a single modality (no image at all, or no text at all) WPCL is plain InfoNCE on that modality
    and CRTR is zero; a warning says so once per instance.

    Args:
        tau: InfoNCE/WPCL temperature, > 0 (default 0.05).
        beta: WPCL weight, >= 0 (default 1.0).
        crtr_weight: ``lambda`` in ``L = L_WPCL + lambda * L_CRTR``, >= 0 (default 0.1); only used for
            ``grad_norm_ratio``, the returned ``crtr`` is unweighted.
        tau_r: CRTR relation temperature, > 0 (default 0.1).
        criterion: weak-modality criterion, ``"loss"`` (default) or ``"grad"``.
        relation: CRTR relation, ``"item"`` (default), ``"user"`` or ``"both"``.
        momentum: EMA momentum of the ``loss`` criterion, in [0, 1) (default 0.9).
        wpcl_form: ``"relative"`` (default) or ``"absolute"``, see :class:`WPCLLoss`.
    """

    def __init__(
        self,
        tau: float = 0.05,
        beta: float = 1.0,
        crtr_weight: float = 0.1,
        tau_r: float = 0.1,
        criterion: str = "loss",
        relation: str = "item",
        momentum: float = 0.9,
        wpcl_form: str = "relative",
    ):
        super().__init__()
        self.wpcl_loss = WPCLLoss(tau, beta, wpcl_form)
        self.crtr_loss = CRTRLoss(tau_r)
        self.detector = WeakModalityDetector(criterion, momentum)
        self.crtr_weight = _non_negative("crtr_weight", crtr_weight)
        self.relation = _choice("relation", relation, RELATIONS)
        self._warned_single_modality = False

    @classmethod
    def from_settings(cls, settings, crtr_weight: float) -> "VLM2RecObjective":
        """Build from the models' config keys (``tau``, ``beta``, ``wpcl_form``, ``tau_r``, ``weak_criterion``,
        ``crtr_relation``, ``weak_ema_momentum``), read with ``settings[key]`` (a RecBole Config or a dict)."""
        return cls(
            tau=settings["tau"],
            beta=settings["beta"],
            crtr_weight=crtr_weight,
            tau_r=settings["tau_r"],
            criterion=settings["weak_criterion"],
            relation=settings["crtr_relation"],
            momentum=settings["weak_ema_momentum"],
            wpcl_form=settings["wpcl_form"],
        )

    def forward(
        self,
        user_text: Optional[Tensor],
        user_image: Optional[Tensor],
        user_image_mask: Optional[Tensor],
        item_text: Optional[Tensor],
        item_image: Optional[Tensor],
        item_image_mask: Optional[Tensor],
        item_ids: Optional[Tensor] = None,
        *,
        grad_norm_ratio: bool = False,
    ) -> ObjectiveOutput:
        """Embeddings are ``[B, D_m]`` (``None`` for an absent modality, on both sides); image masks are
        bool ``[B]`` (``None``: every image present); ``item_ids`` integer ``[B]`` for false negatives.
        ``grad_norm_ratio=True`` (and ``criterion="grad"`` in training mode) need embeddings that are
        part of an autograd graph; a RuntimeError says so otherwise."""
        has_text, has_image, batch = self._check_inputs(
            user_text, user_image, user_image_mask, item_text, item_image, item_image_mask
        )
        _check_item_ids(item_ids, batch)
        device = (user_text if has_text else user_image).device
        if has_image:
            present = torch.ones(batch, dtype=torch.bool, device=device)
            user_image_mask = present if user_image_mask is None else user_image_mask
            item_image_mask = present if item_image_mask is None else item_image_mask
        if not (has_text and has_image) and not self._warned_single_modality:
            warnings.warn(
                f"VLM2RecObjective got {'text' if has_text else 'image'} embeddings only: WPCL is plain "
                "InfoNCE and CRTR is zero for such batches",
                stacklevel=2,
            )
            self._warned_single_modality = True

        # Absent images are zeroed before normalising (recbole_vlm2rec.fusion): their values, even NaN,
        # never reach the value or the gradient; a zero vector stays zero through F.normalize.
        text_u, text_i = masked_normalize(user_text, None), masked_normalize(item_text, None)
        image_u, image_i = masked_normalize(user_image, user_image_mask), masked_normalize(item_image, item_image_mask)
        text_scores = text_u @ text_i.T if has_text else None
        image_scores = image_u @ image_i.T if has_image else None
        fused_u = fuse(user_text, user_image, user_image_mask)
        fused_i = fuse(item_text, item_image, item_image_mask)
        scores = fused_u @ fused_i.T
        tau = self.wpcl_loss.tau

        # L^T and L^V share one support: the users/items having every present modality, which is where
        # the images are (text, when present, is there for every row).
        support_rows = user_image_mask if has_image else None
        support_cols = item_image_mask if has_image else None
        detached = {}
        for name, modality_scores in (("text", text_scores), ("image", image_scores)):
            term = None
            if modality_scores is not None:
                term = info_nce(modality_scores.detach(), tau, item_ids, support_rows, support_cols)
            detached[name] = None if term is None or term.skipped else term.value.detach()

        if not (has_text and has_image):
            # Image-only data: a user or item without an image has no embedding at all, so it is masked.
            wpcl = info_nce(scores, tau, item_ids, support_rows, support_cols).value
            return ObjectiveOutput(
                wpcl, scores.new_zeros(()), detached["text"], detached["image"], None, None, fused_u, fused_i
            )

        if self.training:
            grads = {}
            if self.detector.criterion == "grad":
                plain = info_nce(scores, tau, item_ids).value
                grads["grad_text"], grads["grad_image"] = modality_gradient_norms(
                    plain, (user_text, item_text), (user_image, item_image)
                )
            self.detector.update(detached["text"], detached["image"], **grads)
        weak = self.detector.weak
        if weak == "image":
            wpcl = self.wpcl_loss(
                scores, image_scores, item_ids, weak_row_mask=user_image_mask, weak_col_mask=item_image_mask
            ).value
        else:
            wpcl = self.wpcl_loss(scores, text_scores, item_ids).value

        crtr = scores.new_zeros(())
        if self.relation in ("item", "both"):
            crtr = crtr + self.crtr_loss(text_i, image_i, item_image_mask).value
        if self.relation in ("user", "both"):
            crtr = crtr + self.crtr_loss(text_u, image_u, user_image_mask).value

        ratio = None
        if grad_norm_ratio:
            norm_text, norm_image = modality_gradient_norms(
                wpcl + self.crtr_weight * crtr, (user_text, item_text), (user_image, item_image)
            )
            ratio = norm_text / norm_image
        return ObjectiveOutput(wpcl, crtr, detached["text"], detached["image"], weak, ratio, fused_u, fused_i)

    @staticmethod
    def _check_inputs(user_text, user_image, user_image_mask, item_text, item_image, item_image_mask):
        for modality, user, item in (("text", user_text, item_text), ("image", user_image, item_image)):
            if (user is None) != (item is None):
                raise ValueError(
                    f"user_{modality} and item_{modality} must both be given or both be None, got "
                    f"user_{modality}={'None' if user is None else 'a tensor'}, "
                    f"item_{modality}={'None' if item is None else 'a tensor'}"
                )
        has_text, has_image = user_text is not None, user_image is not None
        if not (has_text or has_image):
            raise ValueError("VLM2RecObjective needs text or image embeddings; all four are None")
        batch = _check_embeddings("user_text" if has_text else "user_image", user_text if has_text else user_image)
        for name, embeddings in (
            ("user_text", user_text),
            ("item_text", item_text),
            ("user_image", user_image),
            ("item_image", item_image),
        ):
            if embeddings is not None:
                _check_embeddings(name, embeddings, batch)
        for name, mask in (("user_image_mask", user_image_mask), ("item_image_mask", item_image_mask)):
            if mask is not None and not has_image:
                raise ValueError(f"{name} was given but there are no image embeddings")
            _check_mask(name, mask, batch)
        return has_text, has_image, batch

    def extra_repr(self) -> str:
        return f"crtr_weight={self.crtr_weight}, relation={self.relation!r}"
