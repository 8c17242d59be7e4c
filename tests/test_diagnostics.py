"""Tests of recbole_vlm2rec.diagnostics (expected values worked out by hand)."""
import math

import pytest
import torch

from recbole_vlm2rec.diagnostics import ModalityDiagnostics, modality_dropout_table


def test_summary_on_a_known_sequence():
    diagnostics = ModalityDiagnostics()
    diagnostics.update(1.0, 3.0, "image", 2.0)
    diagnostics.update(torch.tensor(2.0), torch.tensor(1.0), "text", torch.tensor(0.5))
    diagnostics.update(3.0, None, "image", None)  # a batch without images and without the ratio
    diagnostics.update(2.0, 2.0, "image", 1.0)
    assert diagnostics.summary() == {
        "loss_text": pytest.approx((1 + 2 + 3 + 2) / 4),
        "loss_image": pytest.approx((3 + 1 + 2) / 3),
        "weak_text_share": pytest.approx(1 / 4),
        "weak_image_share": pytest.approx(3 / 4),
        "grad_norm_ratio": pytest.approx((2 + 0.5 + 1) / 3),
        "steps": 4,
    }
    assert diagnostics.format_line() == (
        "modality: L^T 2.0000 | L^V 2.0000 | weak text 25.0% image 75.0% | grad T/V 1.167 | steps 4"
    )


def test_empty_and_single_modality_give_nan_and_reset_clears():
    diagnostics = ModalityDiagnostics()
    summary = diagnostics.summary()
    assert summary["steps"] == 0 and all(math.isnan(summary[k]) for k in summary if k != "steps")
    diagnostics.update(loss_text=0.5)  # text-only data: no weak modality, no ratio
    summary = diagnostics.summary()
    assert summary["loss_text"] == 0.5 and math.isnan(summary["weak_text_share"])
    assert diagnostics.format_line() == (
        "modality: L^T 0.5000 | L^V n/a | weak text n/a image n/a | grad T/V n/a | steps 1"
    )
    diagnostics.reset()
    assert diagnostics.steps == 0 and math.isnan(diagnostics.summary()["loss_text"])


def test_unknown_weak_modality_is_rejected():
    with pytest.raises(ValueError, match="weak must be 'text', 'image' or None, got 'audio'"):
        ModalityDiagnostics().update(weak="audio")


def test_modality_dropout_table_layout():
    table = modality_dropout_table(
        {
            "text-only": {"hit@10": 0.41234, "ndcg@10": 0.2},
            "image-only": {"hit@10": 0.05, "ndcg@10": 0.021},
            "fused": {"hit@10": 0.45, "ndcg@10": 0.25, "mrr@10": 0.2},
        }
    )
    assert table == (
        "metric   text-only  image-only   fused\n"
        "hit@10      0.4123      0.0500  0.4500\n"
        "ndcg@10     0.2000      0.0210  0.2500\n"
        "mrr@10           -           -  0.2000"
    )


def test_modality_dropout_table_rejects_empty_results():
    with pytest.raises(ValueError, match="results must map at least one variant"):
        modality_dropout_table({})
