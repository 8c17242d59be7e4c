"""Modality-collapse diagnostics (docs/design.md#diagnostics).

:class:`ModalityDiagnostics` turns the per-step values of the objective (``L^T``, ``L^V``, the weak
modality, the gradient-norm ratio ``||dL/dE^T|| / ||dL/dE^V||``, the positive-score ratio ``P^T / P^V``,
the in-batch top-1 accuracy of each modality's scores)
into per-epoch means for the log, and
:func:`modality_dropout_table` lays out text-only / image-only / fused evaluation side by side: the
modality-dropout test that shows a collapsed modality as a column of near-random metrics.

Ground-floor module: standard library only.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping

from recbole_vlm2rec.fusion import MODALITIES as _MODALITIES

__all__ = ["ModalityDiagnostics", "modality_dropout_table"]


_QUANTITIES = ("loss_text", "loss_image", "grad_norm_ratio", "positive_score_ratio", "accuracy_text", "accuracy_image")


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


class ModalityDiagnostics:
    """Accumulates one epoch of modality diagnostics.

    Every :meth:`update` is one training step; any value may be ``None`` (the modality was absent, the
    ratio was not computed) and is then left out of that quantity's mean, so each mean is over the steps
    that reported it. Values may be floats or 0-d tensors (read with ``float``).

    Two imbalance measures, both text over image:

    * ``grad_norm_ratio``, ``||dL/dE^T|| / ||dL/dE^V||`` at the encoder's output embeddings. It is exactly 1
      for plain fused InfoNCE of unit-norm embeddings (VLM2Rec's encoder outputs), collapse or not: with
      ``f = normalize(a + b)``, ``a = normalize(t)``, ``b = normalize(v)``, the gradient ``g`` at ``a + b``
      is orthogonal to ``a + b``, so ``a.g = -b.g``, and each branch receives ``g`` projected off its own
      unit vector: ``||g||^2 - (a.g)^2 = ||g||^2 - (b.g)^2``. Only WPCL (``beta > 0``) and CRTR move it
      (docs/design.md#diagnostics).
    * ``positive_score_ratio``, ``P^T / P^V`` with ``P^m`` the mean over rows of the softmax of ``s^m/tau``
      at the positive (OGM-GE's modality score), from the detached per-modality scores. Not 1 by
      construction: a collapsed image has ``P^V`` at chance (``1/B`` when nothing is masked), and the ratio
      grows with the text's lead.

    And one weak-modality criterion relative to chance: ``accuracy_text`` / ``accuracy_image``, the in-batch
    top-1 retrieval accuracy of each modality's scores (ties are misses: a collapsed modality is at 0, a
    modality at chance near ``1/B``), which is what ``weak_criterion: accuracy`` compares.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: call at the start of each epoch."""
        self.steps = 0
        self._sums: Dict[str, Any] = dict.fromkeys(_QUANTITIES, 0.0)
        self._counts: Dict[str, Any] = dict.fromkeys(self._sums, 0)
        self._weak: Dict[str, Any] = dict.fromkeys(_MODALITIES, 0)

    def update(
        self,
        loss_text=None,
        loss_image=None,
        weak=None,
        grad_norm_ratio=None,
        positive_score_ratio=None,
        accuracy_text=None,
        accuracy_image=None,
    ) -> None:
        """One step. A value that is ``None`` or NaN was not measured in this step. Tensors are summed as
        tensors, on their device, and read once, in :meth:`summary`: a step pays no host synchronisation.
        ``weak``: ``"text"``, ``"image"``, their index in ``MODALITIES`` as a 0-d integer tensor, or ``None``."""
        if isinstance(weak, str) and weak not in self._weak:
            raise ValueError(f"weak must be 'text', 'image' or None, got {weak!r}")
        self.steps += 1
        for key, value in (
            ("loss_text", loss_text),
            ("loss_image", loss_image),
            ("grad_norm_ratio", grad_norm_ratio),
            ("positive_score_ratio", positive_score_ratio),
            ("accuracy_text", accuracy_text),
            ("accuracy_image", accuracy_image),
        ):
            if value is None:
                continue
            if isinstance(value, numbers.Real):
                if not math.isnan(value):
                    self._sums[key] += float(value)
                    self._counts[key] += 1
            else:  # a 0-d tensor, duck-typed (this module does not import torch)
                value = value.detach()
                measured = ~value.isnan()
                self._sums[key] = self._sums[key] + value.nan_to_num(0.0)
                self._counts[key] = self._counts[key] + measured
        if isinstance(weak, str):
            self._weak[weak] += 1
        elif weak is not None:
            for index, modality in enumerate(_MODALITIES):
                self._weak[modality] = self._weak[modality] + (weak == index)

    def summary(self) -> Dict[str, float]:
        """Epoch means; NaN for a quantity no step reported.

        ``weak_text_share`` + ``weak_image_share`` = 1 over the steps that named a weak modality.
        ``grad_norm_ratio`` and ``positive_score_ratio`` are arithmetic means of the per-step ratios,
        ``accuracy_text`` / ``accuracy_image`` of the per-step accuracies.
        ``steps`` counts updates.
        """
        sums = {key: float(value) for key, value in self._sums.items()}  # the epoch's one read of the device
        counts = {key: int(value) for key, value in self._counts.items()}
        weak = {modality: int(value) for modality, value in self._weak.items()}
        decided = sum(weak.values())
        result = {key: _mean(sums[key], counts[key]) for key in ("loss_text", "loss_image")}
        for key in ("accuracy_text", "accuracy_image"):
            result[key] = _mean(sums[key], counts[key])
        for modality in _MODALITIES:
            result[f"weak_{modality}_share"] = _mean(weak[modality], decided)
        for key in ("grad_norm_ratio", "positive_score_ratio"):
            result[key] = _mean(sums[key], counts[key])
        result["steps"] = self.steps
        return result

    def format_line(self) -> str:
        """One log line, e.g. ``modality: L^T 0.4120 | L^V 2.3100 | weak text 25.0% image 75.0% | ...``."""
        s = self.summary()
        return (
            f"modality: L^T {_fmt(s['loss_text'], '.4f')} | L^V {_fmt(s['loss_image'], '.4f')} | "
            f"acc T {_fmt(s['accuracy_text'], '.1%')} V {_fmt(s['accuracy_image'], '.1%')} | "
            f"weak text {_fmt(s['weak_text_share'], '.1%')} image {_fmt(s['weak_image_share'], '.1%')} | "
            f"grad T/V {_fmt(s['grad_norm_ratio'], '.3f')} | pos T/V {_fmt(s['positive_score_ratio'], '.3f')} | "
            f"steps {s['steps']}"
        )


def modality_dropout_table(results: Mapping[str, Mapping[str, float]], precision: int = 4) -> str:
    """Plain-text table: one row per metric, one column per variant (in the order of ``results``).

    ``results`` maps a variant (e.g. ``"text-only"``, ``"image-only"``, ``"fused"``) to ``{metric: value}``.
    Metrics appear in the order first seen; a metric a variant lacks shows as ``-``. Numbers are printed
    with ``precision`` decimals and right-aligned; anything else with ``str``.
    """
    if not results:
        raise ValueError("results must map at least one variant to its metrics, got an empty mapping")
    variants = list(results)
    metrics = list(dict.fromkeys(metric for values in results.values() for metric in values))

    def cell(values: Mapping[str, float], metric: str) -> str:
        if metric not in values:
            return "-"
        value = values[metric]
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{float(value):.{precision}f}"
        return str(value)

    rows = [["metric", *variants]] + [[metric, *(cell(results[v], metric) for v in variants)] for metric in metrics]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [text.rjust(width) for text, width in zip(row[1:], widths[1:])])
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
