"""``VLM2RecObjective``: InfoNCE + WPCL + CRTR on per-modality user and item embeddings, for any model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from recbole_vlm2rec.checks import non_negative, choice
from recbole_vlm2rec.fusion import MODALITIES, fuse, masked_normalize
from .crtr import CRTRLoss
from .detector import WeakModalityDetector, in_batch_retrieval, modality_gradient_norms
from .info_nce import info_nce
from .wpcl import WPCLLoss
from .inputs import check_mask, check_item_ids, check_embeddings

RELATIONS = ("item", "user", "both")


@dataclass
class ObjectiveOutput:
    """What :class:`VLM2RecObjective` computes for one batch.

    ``wpcl``: the contrastive term to minimise (plain InfoNCE on the fused scores when only one modality
    exists). ``crtr``: the raw CRTR value, *not* multiplied by ``crtr_weight``; the caller weights it so
    that RecBole logs the weighted term. ``loss_text``/``loss_image``: detached per-modality InfoNCE
    (``None`` when the modality is absent, NaN when no row of the batch had it). ``weak_index``: the
    modality penalised in this batch as a 0-d index into ``MODALITIES``, on the device (``weak``: its name,
    which reads it), ``None`` with a single modality. ``grad_norm_ratio``: ``||dL/dE^T|| / ||dL/dE^V||`` for
    ``L = wpcl + crtr_weight * crtr``, when asked for and both modalities exist; it is exactly 1 for plain
    fused InfoNCE (``beta = 0``, no CRTR) of unit-norm embeddings, whatever each modality has learned (see
    :func:`modality_gradient_norms`). ``fused_user``, ``fused_item``: the L2-normalised fused embeddings
    (float32). ``accuracy_text``/``accuracy_image``: detached in-batch top-1 accuracy of each modality's
    scores, on the support of ``loss_text``/``loss_image`` (``None`` or NaN where those are; ties are misses,
    see :func:`in_batch_retrieval`). ``positive_score_ratio``: ``P^T / P^V``, ``P^m`` the mean over rows of
    the softmax of ``s^m/tau`` at the positive (OGM-GE's per-modality score), on the same support; ``None``
    with a single modality, NaN when no row had both. Not 1 by construction: > 1 when the text retrieves better (a
    collapsed image has ``P^V`` at chance, ``1/B``).
    """

    wpcl: Tensor
    crtr: Tensor
    loss_text: Optional[Tensor]
    loss_image: Optional[Tensor]
    weak_index: Optional[Tensor]
    grad_norm_ratio: Optional[Tensor]
    fused_user: Tensor
    fused_item: Tensor
    accuracy_text: Optional[Tensor] = None
    accuracy_image: Optional[Tensor] = None
    positive_score_ratio: Optional[Tensor] = None

    @property
    def weak(self) -> Optional[str]:
        """The weak modality's name, ``None`` with a single modality. Reading it synchronises with the device."""
        return None if self.weak_index is None else MODALITIES[int(self.weak_index)]


class VLM2RecObjective(nn.Module):
    r"""InfoNCE + WPCL + CRTR on per-modality user and item embeddings (model-agnostic).

    Per modality ``m``, embeddings are L2-normalised (``e^m = normalize(x^m)``); the fused embedding is
    ``normalize(e^T + e^V)`` where the image exists and ``normalize(e^T)`` where it does not (and
    ``normalize(e^V)`` on image-only data). Scores are cosines: ``s`` fused, ``s^T``, ``s^V`` per modality.
    One call:

    1. ``L^T``, ``L^V`` = InfoNCE on detached ``s^T``, ``s^V``, both on the same support: the users and
       items that have both modalities, so that neither looks weaker merely for having more negatives.
       On the same support, detached: each modality's top-1 accuracy and mean softmax score of the positive
       (``positive_score_ratio``), see :func:`in_batch_retrieval`.
    2. In training mode, the detector is updated (``loss``: from ``L^T``, ``L^V``; ``accuracy``: from the
       accuracies; ``grad``: from the gradient norms of fused InfoNCE ``L_CL`` w.r.t. each modality's input
       embeddings). Evaluation mode leaves its state alone and uses the current decision.
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
        criterion: weak-modality criterion, ``"loss"`` (default), ``"grad"`` or ``"accuracy"``.
        relation: CRTR relation, ``"item"`` (default), ``"user"`` or ``"both"``.
        momentum: EMA momentum of the ``loss`` and ``accuracy`` criteria, in [0, 1) (default 0.9).
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
        self.crtr_weight = non_negative("crtr_weight", crtr_weight)
        self.relation = choice("relation", relation, RELATIONS)
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
        check_item_ids(item_ids, batch)
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
        # Detached, on that support: L^m, the accuracy and the positive's score of each modality, the
        # modalities stacked into one [M, B, B] pass; NaN where no row was valid ("not measured").
        present = [(name, s) for name, s in (("text", text_scores), ("image", image_scores)) if s is not None]
        term = in_batch_retrieval(torch.stack([s for _, s in present]), tau, item_ids, support_rows, support_cols)
        losses, accuracy = _nan_if_empty(term.loss, term.rows), _nan_if_empty(term.accuracy, term.rows)
        detached, accuracies = dict.fromkeys(MODALITIES), dict.fromkeys(MODALITIES)
        for index, (name, _) in enumerate(present):
            detached[name], accuracies[name] = losses[index], accuracy[index]
        positive_ratio = None
        if len(present) == 2:  # text first, image second
            positive_ratio = _nan_if_empty(term.positive_score[0] / term.positive_score[1], term.rows)
        if not (has_text and has_image):
            # Image-only data: a user or item without an image has no embedding at all, so it is masked.
            wpcl = info_nce(scores, tau, item_ids, support_rows, support_cols).value
            return ObjectiveOutput(
                wpcl, scores.new_zeros(()), detached["text"], detached["image"], None, None, fused_u, fused_i,
                accuracies["text"], accuracies["image"], None,
            )

        if self.training:
            self._update_detector(
                detached, accuracies, scores, item_ids, (user_text, item_text), (user_image, item_image)
            )
        # The weak modality's scores and masks picked on the device (no read of the decision: no host sync);
        # a weak text is present everywhere.
        weak_index = self.detector.weak_index.clone()
        image_weak = weak_index == MODALITIES.index("image")
        everywhere = torch.ones_like(user_image_mask)
        wpcl = self.wpcl_loss(
            scores, torch.where(image_weak, image_scores, text_scores), item_ids,
            weak_row_mask=torch.where(image_weak, user_image_mask, everywhere),
            weak_col_mask=torch.where(image_weak, item_image_mask, everywhere),
        ).value
        crtr = self._crtr((text_u, image_u, user_image_mask), (text_i, image_i, item_image_mask))

        ratio = None
        if grad_norm_ratio:
            norm_text, norm_image = modality_gradient_norms(
                wpcl + self.crtr_weight * crtr, (user_text, item_text), (user_image, item_image)
            )
            ratio = norm_text / norm_image
        return ObjectiveOutput(
            wpcl, crtr, detached["text"], detached["image"], weak_index, ratio, fused_u, fused_i,
            accuracies["text"], accuracies["image"], positive_ratio,
        )

    def _update_detector(self, detached, accuracies, scores, item_ids, text_inputs, image_inputs) -> None:
        grads = {}
        if self.detector.criterion == "grad":
            plain = info_nce(scores, self.wpcl_loss.tau, item_ids).value
            grads["grad_text"], grads["grad_image"] = modality_gradient_norms(plain, text_inputs, image_inputs)
        self.detector.record(
            detached["text"], detached["image"],
            accuracy_text=accuracies["text"], accuracy_image=accuracies["image"], **grads,
        )

    def _crtr(self, users, items) -> Tensor:
        """CRTR over items, users or both; each side is ``(text, image, image_mask)`` (normalised rows)."""
        crtr = users[0].new_zeros(())
        if self.relation in ("item", "both"):
            crtr = crtr + self.crtr_loss(*items).value
        if self.relation in ("user", "both"):
            crtr = crtr + self.crtr_loss(*users).value
        return crtr

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
        batch = check_embeddings("user_text" if has_text else "user_image", user_text if has_text else user_image)
        for name, embeddings in (
            ("user_text", user_text),
            ("item_text", item_text),
            ("user_image", user_image),
            ("item_image", item_image),
        ):
            if embeddings is not None:
                check_embeddings(name, embeddings, batch)
        for name, mask in (("user_image_mask", user_image_mask), ("item_image_mask", item_image_mask)):
            if mask is not None and not has_image:
                raise ValueError(f"{name} was given but there are no image embeddings")
            check_mask(name, mask, batch)
        return has_text, has_image, batch

    def extra_repr(self) -> str:
        return f"crtr_weight={self.crtr_weight}, relation={self.relation!r}"


def _nan_if_empty(value: Tensor, rows: Tensor) -> Tensor:
    """``value``, or NaN where no row contributed to it: "not measured", decided on the device."""
    return torch.where(rows > 0, value, torch.full_like(value, float("nan")))
