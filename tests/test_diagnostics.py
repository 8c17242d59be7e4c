"""Tests of recbole_vlm2rec.diagnostics (expected values worked out by hand)."""
import math

import pytest
import torch

from recbole_vlm2rec.diagnostics import ModalityDiagnostics, modality_dropout_table


def test_summary_on_a_known_sequence():
    diagnostics = ModalityDiagnostics()
    diagnostics.update(1.0, 3.0, "image", 2.0, positive_score_ratio=4.0, accuracy_text=0.75, accuracy_image=0.0)
    diagnostics.update(torch.tensor(2.0), torch.tensor(1.0), "text", torch.tensor(0.5), torch.tensor(0.5),
                       accuracy_text=torch.tensor(0.25), accuracy_image=torch.tensor(0.5))
    diagnostics.update(3.0, None, "image", None)  # a batch without images and without the ratios
    diagnostics.update(2.0, 2.0, "image", 1.0)  # a step that reported no positive-score ratio
    assert diagnostics.summary() == {
        "loss_text": pytest.approx((1 + 2 + 3 + 2) / 4),
        "loss_image": pytest.approx((3 + 1 + 2) / 3),
        "weak_text_share": pytest.approx(1 / 4),
        "weak_image_share": pytest.approx(3 / 4),
        "grad_norm_ratio": pytest.approx((2 + 0.5 + 1) / 3),
        "positive_score_ratio": pytest.approx((4 + 0.5) / 2),
        "accuracy_text": pytest.approx(0.5),
        "accuracy_image": pytest.approx(0.25),
        "steps": 4,
    }
    assert diagnostics.format_line() == (
        "modality: L^T 2.0000 | L^V 2.0000 | acc T 50.0% V 25.0% | weak text 25.0% image 75.0% | grad T/V 1.167 | "
        "pos T/V 2.250 | steps 4"
    )


def test_nan_is_not_measured_and_tensors_are_read_only_by_the_summary():
    """A term no row contributed to arrives as NaN (the objective decides it on the device) and is left out
    of its mean; the weak modality may come as an index tensor; tensor values stay tensors until summary()."""
    diagnostics = ModalityDiagnostics()
    diagnostics.update(torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(1), torch.tensor(2.0),
                       accuracy_text=torch.tensor(0.5), accuracy_image=torch.tensor(float("nan")))
    diagnostics.update(torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0), None,
                       accuracy_text=float("nan"), accuracy_image=torch.tensor(0.25))
    assert all(torch.is_tensor(v) for k, v in diagnostics._sums.items() if k != "positive_score_ratio")
    summary = diagnostics.summary()
    assert summary["loss_text"] == 2.0 and summary["loss_image"] == 2.0 and summary["grad_norm_ratio"] == 2.0
    assert summary["accuracy_text"] == 0.5 and summary["accuracy_image"] == 0.25
    assert summary["weak_text_share"] == 0.5 and summary["weak_image_share"] == 0.5


def test_empty_and_single_modality_give_nan_and_reset_clears():
    diagnostics = ModalityDiagnostics()
    summary = diagnostics.summary()
    assert summary["steps"] == 0 and all(math.isnan(summary[k]) for k in summary if k != "steps")
    diagnostics.update(loss_text=0.5)  # text-only data: no weak modality, no ratio
    summary = diagnostics.summary()
    assert summary["loss_text"] == 0.5 and math.isnan(summary["weak_text_share"])
    assert diagnostics.format_line() == (
        "modality: L^T 0.5000 | L^V n/a | acc T n/a V n/a | weak text n/a image n/a | grad T/V n/a | pos T/V n/a | "
        "steps 1"
    )
    diagnostics.reset()
    assert diagnostics.steps == 0 and math.isnan(diagnostics.summary()["loss_text"])


def test_collapsed_image_batch_shows_in_the_positive_score_ratio_not_the_grad_ratio():
    """One step of the objective on a batch whose image is collapsed, recorded as the models record it: the
    embedding-level ratio is 1 (plain fused InfoNCE of unit vectors), the positive-score ratio is not."""
    from recbole_vlm2rec.losses import VLM2RecObjective

    # B = 4: text users = items = e_0..e_3 (every row a hit, softmax 1/(1 + 3 e^-20) at tau 0.05);
    # image: every user and item e_0, so all image scores are 1 and the image's softmax is 1/4 on every row.
    text = torch.eye(4).requires_grad_()
    image = torch.zeros(4, 4)
    image[:, 0] = 1.0
    image.requires_grad_()
    out = VLM2RecObjective(beta=0.0, crtr_weight=0.0)(text, image, None, text, image, None, grad_norm_ratio=True)
    diagnostics = ModalityDiagnostics()
    diagnostics.update(out.loss_text, out.loss_image, out.weak, out.grad_norm_ratio, out.positive_score_ratio,
                       out.accuracy_text, out.accuracy_image)
    summary = diagnostics.summary()
    # text retrieves every row; the collapsed image ties everywhere, and ties are misses
    assert (summary["accuracy_text"], summary["accuracy_image"]) == (1.0, 0.0)
    assert summary["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert summary["positive_score_ratio"] == pytest.approx(4 / (1 + 3 * math.exp(-20)), rel=1e-6)  # 4.000
    assert summary["loss_image"] == pytest.approx(math.log(4), abs=1e-6)
    assert "| grad T/V 1.000 | pos T/V 4.000 |" in diagnostics.format_line()


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
