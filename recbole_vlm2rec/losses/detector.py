"""The weak-modality detector and the per-modality gradient norms it (and the diagnostics) use.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from recbole_vlm2rec.checks import choice, real
from recbole_vlm2rec.fusion import MODALITIES

CRITERIA = ("loss", "grad")


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
    (docs/design.md#background). ``weak_counts[m]`` counts the updates after which ``m`` was weak.

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
