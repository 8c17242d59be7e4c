"""The weak-modality detector and what it (and the diagnostics) measure: per-modality gradient norms and
in-batch retrieval statistics (top-1 accuracy, softmax score of the positive).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from recbole_vlm2rec.checks import choice, positive, real
from recbole_vlm2rec.fusion import MODALITIES

from .info_nce import candidate_logits
from .inputs import check_score_inputs

CRITERIA = ("loss", "grad", "accuracy")


class RetrievalTerm(NamedTuple):
    """In-batch retrieval statistics of a score matrix (or of each of a stack of them), means over ``rows``
    valid rows (0: skipped, every value is 0)."""

    accuracy: Tensor
    positive_score: Tensor
    rows: Tensor
    loss: Tensor


@torch.no_grad()
def in_batch_retrieval(
    scores: Tensor,
    tau: float = 0.05,
    item_ids: Optional[Tensor] = None,
    row_mask: Optional[Tensor] = None,
    col_mask: Optional[Tensor] = None,
) -> RetrievalTerm:
    r"""Top-1 accuracy, mean softmax score of the positive and InfoNCE, over the candidates :func:`info_nce`
    keeps.

    With ``N(b)`` and the valid rows ``R`` exactly as in :func:`info_nce` (masked columns and false negatives,
    the same item id as the row's positive, are not candidates; a row whose positive column is masked is
    dropped):

    ``accuracy       = (1/|R|) sum_{b in R} [ s_bb > max_{j in N(b), j != b} s_bj ]``
    ``positive_score = (1/|R|) sum_{b in R} exp(s_bb/tau) / sum_{j in N(b)} exp(s_bj/tau)``
    ``loss           = (1/|R|) sum_{b in R} -log( exp(s_bb/tau) / sum_{j in N(b)} exp(s_bj/tau) )`` (=
    :func:`info_nce`'s value)

    **Ties are misses**: a row is a hit only if its positive scores *strictly* above every other candidate,
    so a collapsed modality (every score of a row bitwise equal) has accuracy 0, whatever the order of the
    columns; a row whose only candidate is its positive is a hit. Accuracy is compared on the raw scores
    (it does not depend on ``tau``).
    ``positive_score`` is the per-modality score of OGM-GE (Peng et al., CVPR 2022): at chance (all scores of
    a row equal) it is ``mean_b 1/|N(b)|``. Computed without autograd (the inputs are detached), in float32.

    ``scores`` is ``[B, B]``, or ``[M, B, B]``: M score matrices of the same batch (one per modality) under
    the same ids and masks, done in one pass; the statistics are then ``[M]`` (``rows`` is shared).
    """
    tau = positive("tau", tau)
    if scores.dim() == 3:
        check_score_inputs(scores[0], item_ids, row_mask, col_mask)
    else:
        check_score_inputs(scores, item_ids, row_mask, col_mask)
    batch = scores.shape[-1]
    scores = scores.detach().float()
    eye = torch.eye(batch, dtype=torch.bool, device=scores.device)
    rows, scores = candidate_logits(scores, item_ids, row_mask, col_mask)  # the candidates info_nce keeps
    positive_scores = scores.diagonal(dim1=-2, dim2=-1)
    hits = positive_scores > scores.masked_fill(eye, float("-inf")).amax(dim=-1)
    logits = scores / tau
    per_row = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=-2, dim2=-1)  # -log p(positive)
    count = rows.sum()
    denominator = count.clamp_min(1).float()
    accuracy = (hits & rows).sum(dim=-1).float() / denominator
    positive_score = (-per_row).exp().masked_fill(~rows, 0.0).sum(dim=-1) / denominator
    loss = per_row.masked_fill(~rows, 0.0).sum(dim=-1) / denominator
    return RetrievalTerm(accuracy, positive_score, count, loss)


def modality_gradient_norms(
    loss: Tensor, text: Sequence[Tensor], image: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """``(||dloss/dE^T||, ||dloss/dE^V||)``: Frobenius norms over all tensors of each modality.

    **Under plain InfoNCE of unit-norm embeddings the two norms are equal** (docs/design.md#diagnostics).
    When the loss depends on the embeddings only through the fused ``f = normalize(a + b)``, with
    ``a = normalize(t)`` and ``b = normalize(v)``, the gradient ``g`` reaching ``z = a + b`` is orthogonal
    to ``f``, hence to ``a + b``, so ``a.g = -b.g``. The sum hands the same ``g`` to both branches and each
    normalisation projects it off its own unit vector, so for unit ``t``, ``v``:
    ``||dL/dt||^2 = ||g||^2 - (a.g)^2 = ||g||^2 - (b.g)^2 = ||dL/dv||^2``, for every row with both
    modalities, whatever either modality has learned (inputs of other norms divide each row's gradient by
    that norm). Only terms on the per-modality scores (WPCL with ``beta > 0``, CRTR) move the ratio away
    from 1; the ratio of :func:`in_batch_retrieval`'s ``positive_score`` is an imbalance measure that is
    not 1 by construction.

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
      (see :func:`modality_gradient_norms`; under plain InfoNCE of unit-norm embeddings the two norms
      are equal in exact arithmetic, so this decision is rounding). The EMA still follows the losses.
    * ``criterion="accuracy"``: ``w = argmin_m EMA(acc^m)``, the EMA as above but of the in-batch top-1
      accuracy of each modality's detached scores (:func:`in_batch_retrieval`, ties are misses). A collapsed
      modality scores 0 and is weak, whereas ``loss`` calls it strong whenever the other modality's loss is
      above ``ln B`` (sharp, partly wrong scores). The decision is revised only once both EMAs exist.

    Ties, and the state before any evidence, go to ``"image"``: the modality that usually collapses
    (docs/design.md#background). ``weak_counts[m]`` counts the updates after which ``m`` was weak. ``ema``
    holds losses (``loss``, ``grad``) or accuracies (``accuracy``).

    Args:
        criterion: ``"loss"`` (default), ``"grad"`` or ``"accuracy"``.
        momentum: EMA momentum in [0, 1) (default 0.9).
    """

    ema: Tensor
    seen: Tensor
    weak_counts: Tensor
    weak_index: Tensor

    def __init__(self, criterion: str = "loss", momentum: float = 0.9):
        super().__init__()
        self.criterion = choice("criterion", criterion, CRITERIA)
        self.momentum = real("momentum", momentum)
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

    def update(self, *args, **kwargs) -> str:
        """:meth:`record` one step (the same arguments) and return the weak modality (reading it synchronises
        with the device)."""
        self.record(*args, **kwargs)
        return self.weak

    @torch.no_grad()
    def record(
        self,
        loss_text=None,
        loss_image=None,
        grad_text=None,
        grad_image=None,
        accuracy_text=None,
        accuracy_image=None,
    ) -> None:
        """Record one step. Values are floats or 0-d tensors (detached here); ``None`` or NaN means the
        modality had no valid row in this batch. Everything stays on the device: no value is read into Python
        (on a GPU each read would stall the step), the decision is ``weak_index``."""
        tracked = (accuracy_text, accuracy_image) if self.criterion == "accuracy" else (loss_text, loss_image)
        values = torch.stack([self._as_tensor(value) for value in tracked])
        observed = ~values.isnan()
        updated = torch.where(self.seen, self.momentum * self.ema + (1 - self.momentum) * values, values)
        self.ema.copy_(torch.where(observed, updated, self.ema))
        self.seen.logical_or_(observed)
        text, image = MODALITIES.index("text"), MODALITIES.index("image")
        if self.criterion == "grad":
            if grad_text is None or grad_image is None:
                raise ValueError("criterion='grad' needs both grad_text and grad_image")
            text_weaker = self._as_tensor(grad_text) < self._as_tensor(grad_image)
            decided = torch.ones((), dtype=torch.bool, device=self.ema.device)
        else:  # the decision is only revised once both EMAs exist
            higher_loss, lower_accuracy = self.ema[text] > self.ema[image], self.ema[text] < self.ema[image]
            text_weaker = higher_loss if self.criterion == "loss" else lower_accuracy
            decided = self.seen.all()
        choice = torch.where(text_weaker, text, image)
        self.weak_index.copy_(torch.where(decided, choice, self.weak_index))
        self.weak_counts.add_(torch.arange(len(MODALITIES), device=self.weak_counts.device) == self.weak_index)

    def _as_tensor(self, value) -> Tensor:
        if value is None:
            return torch.full((), float("nan"), dtype=self.ema.dtype, device=self.ema.device)
        return torch.as_tensor(value, dtype=self.ema.dtype, device=self.ema.device).detach().reshape(())

    def extra_repr(self) -> str:
        return f"criterion={self.criterion!r}, momentum={self.momentum}"
