"""Tests of recbole_vlm2rec.losses.

Expected values come from hand derivations (written next to them) or from loop-by-loop reference
formulas written here in plain Python, never from the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from recbole_vlm2rec.losses import (
    CRTRLoss,
    InfoNCELoss,
    VLM2RecObjective,
    WeakModalityDetector,
    WPCLLoss,
    cosine_scores,
    in_batch_retrieval,
    info_nce,
    modality_gradient_norms,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- plain-Python references


def ref_wpcl(S, W, tau, beta, item_ids=None, rows=None, cols=None, weak_rows=None, weak_cols=None, form="relative"):
    """-1/|valid| sum_b log(exp(p_b/tau) / (exp(p_b/tau) + sum_{j kept} exp((s_bj + beta_bj w_bj)/tau))),
    p_b = s_bb (absolute form) or s_bb + beta_b w_bb (relative form, rows whose positive has the weak modality)."""
    n = len(S)
    rows = rows or [True] * n
    cols = cols or [True] * n
    weak_rows = weak_rows or [True] * n
    weak_cols = weak_cols or [True] * n
    terms = []
    for b in range(n):
        if not (rows[b] and cols[b]):
            continue
        row_on = weak_rows[b] and (form == "absolute" or weak_cols[b])
        positive = S[b][b] + (beta * W[b][b] if form == "relative" and row_on else 0.0)
        denominator = math.exp(positive / tau)
        for j in range(n):
            if j == b or not cols[j] or (item_ids is not None and item_ids[j] == item_ids[b]):
                continue
            penalty = beta * W[b][j] if (row_on and weak_cols[j]) else 0.0
            denominator += math.exp((S[b][j] + penalty) / tau)
        terms.append(-math.log(math.exp(positive / tau) / denominator))
    return sum(terms) / len(terms) if terms else 0.0


def ref_crtr(X, Y, tau_r, valid=None):
    """1/|valid| sum_b [KL(R^X_b || R^Y_b) + KL(R^Y_b || R^X_b)], R_b = softmax over valid j != b."""
    n = len(X)
    valid = valid or [True] * n

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    def relation(Z, b):
        others = [j for j in range(n) if j != b and valid[j]]
        weights = [math.exp(cos(Z[b], Z[j]) / tau_r) for j in others]
        return [w / sum(weights) for w in weights]

    terms = []
    for b in range(n):
        if not valid[b] or sum(valid) < 2:
            continue
        p, q = relation(X, b), relation(Y, b)
        kl_pq = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        kl_qp = sum(qj * math.log(qj / pj) for pj, qj in zip(p, q))
        terms.append(kl_pq + kl_qp)
    return sum(terms) / len(terms) if terms else 0.0


# ---------------------------------------------------------------------------- InfoNCE


def test_info_nce_2x2_by_hand():
    S = t([[0.9, 0.1], [0.3, 0.6]])
    # tau = 0.5: row 0 = -log(e^1.8 / (e^1.8 + e^0.2)) = log(1 + e^-1.6); row 1 = log(1 + e^(0.6 - 1.2)).
    expected = (math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-0.6))) / 2
    term = info_nce(S, tau=0.5)
    assert term.value.item() == pytest.approx(expected, abs=1e-6)
    assert int(term.rows) == 2 and not term.skipped


def test_info_nce_module_matches_scores_path():
    user = t([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # not normalised: the module works on cosines
    item = t([[0.6, 0.8], [1.0, 1.0], [0.0, -1.0]])
    cos = [[0.6 * 0.6 + 0.8 * 0.8, 0.6 / math.sqrt(2) + 0.8 / math.sqrt(2), -0.8],
           [0.6, 1 / math.sqrt(2), 0.0],
           [0.8, 1 / math.sqrt(2), -1.0]]
    loss = InfoNCELoss(tau=0.2)(user, item).value
    assert loss.item() == pytest.approx(ref_wpcl(cos, cos, 0.2, 0.0), abs=1e-5)
    # A masked row may hold garbage (NaN): it reaches neither the value nor any gradient.
    user = torch.cat([user, torch.full((1, 2), float("nan"))]).requires_grad_()
    item = torch.cat([item, t([[1.0, 0.0]])]).requires_grad_()
    rows = torch.tensor([True, True, True, False])
    term = InfoNCELoss(tau=0.2)(user, item, row_mask=rows, col_mask=rows)
    assert term.value.item() == pytest.approx(ref_wpcl(cos, cos, 0.2, 0.0), abs=1e-5)
    term.value.backward()
    assert torch.isfinite(user.grad).all() and torch.isfinite(item.grad).all()


def test_info_nce_false_negative_masking_by_hand():
    S = t([[0.9, 0.5, 0.2], [0.4, 0.8, 0.1], [0.3, 0.7, 0.6]])
    ids = torch.tensor([5, 7, 5])  # columns 0 and 2 are the same item
    # tau = 1. Row 0 drops column 2: log(1 + e^(0.5-0.9)); row 1 keeps all: log(e^.4 + e^.8 + e^.1) - .8;
    # row 2 drops column 0: log(1 + e^(0.7-0.6)).
    rows = [math.log1p(math.exp(-0.4)), math.log(math.exp(0.4) + math.exp(0.8) + math.exp(0.1)) - 0.8,
            math.log1p(math.exp(0.1))]
    unmasked = [math.log(math.exp(0.9) + math.exp(0.5) + math.exp(0.2)) - 0.9, rows[1],
                math.log(math.exp(0.3) + math.exp(0.7) + math.exp(0.6)) - 0.6]
    assert info_nce(S, 1.0, item_ids=ids).value.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert info_nce(S, 1.0).value.item() == pytest.approx(sum(unmasked) / 3, abs=1e-6)
    assert sum(rows) / 3 < sum(unmasked) / 3 - 0.1


def test_info_nce_row_and_column_masks():
    S = t([[0.9, 0.5, 0.2], [0.4, 0.8, 0.1], [0.3, 0.7, 0.6]])
    # row_mask drops row 1: mean of rows 0 and 2 with all columns.
    expected_rows = (math.log(math.exp(0.9) + math.exp(0.5) + math.exp(0.2)) - 0.9
                     + math.log(math.exp(0.3) + math.exp(0.7) + math.exp(0.6)) - 0.6) / 2
    term = info_nce(S, 1.0, row_mask=torch.tensor([True, False, True]))
    assert term.value.item() == pytest.approx(expected_rows, abs=1e-6) and int(term.rows) == 2
    # col_mask drops item 2: it is no negative for rows 0 and 1, and row 2 loses its positive.
    expected_cols = (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.4))) / 2
    term = info_nce(S, 1.0, col_mask=torch.tensor([True, True, False]))
    assert term.value.item() == pytest.approx(expected_cols, abs=1e-6) and int(term.rows) == 2


def test_info_nce_no_valid_row_is_zero_with_graph():
    S = t([[0.9, float("nan")], [float("inf"), 0.6]]).requires_grad_()
    term = info_nce(S, 0.05, row_mask=torch.tensor([False, False]))
    assert term.skipped and int(term.rows) == 0
    assert term.value.item() == 0.0 and term.value.requires_grad
    term.value.backward()
    assert torch.equal(S.grad, torch.zeros(2, 2))


def test_info_nce_masked_row_garbage_never_reaches_value_or_grad():
    S = t([[0.9, 0.1, 0.2], [float("nan"), float("nan"), float("nan")], [0.3, 0.7, 0.6]]).requires_grad_()
    term = info_nce(S, 0.5, row_mask=torch.tensor([True, False, True]), col_mask=torch.tensor([True, False, True]))
    expected = (math.log1p(math.exp((0.2 - 0.9) / 0.5)) + math.log1p(math.exp((0.3 - 0.6) / 0.5))) / 2
    assert term.value.item() == pytest.approx(expected, abs=1e-6)
    term.value.backward()
    assert torch.isfinite(S.grad).all() and S.grad[1].abs().sum() == 0 and S.grad[:, 1].abs().sum() == 0


# ---------------------------------------------------------------------------- WPCL


def test_wpcl_beta_zero_is_exactly_info_nce():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(6, 6, generator=g) * 2 - 1
    W = torch.rand(6, 6, generator=g) * 2 - 1
    ids = torch.tensor([1, 2, 3, 1, 4, 5])
    rows = torch.tensor([True, True, False, True, True, True])
    for kwargs in ({}, {"item_ids": ids}, {"item_ids": ids, "row_mask": rows, "col_mask": rows}):
        expected = info_nce(S, 0.05, **kwargs).value
        got = WPCLLoss(tau=0.05, beta=0.0)(S, W, **kwargs, weak_row_mask=rows).value
        assert torch.equal(got, expected), kwargs


def test_wpcl_2x2_by_hand():
    S = t([[0.9, 0.1], [0.3, 0.6]])
    W = t([[0.2, -0.5], [0.4, 0.1]])
    # tau = 0.5, beta = 0.5. Row 0: negative logit (0.1 + 0.5 * -0.5) / 0.5 = -0.3 vs positive 1.8;
    # row 1: (0.3 + 0.5 * 0.4) / 0.5 = 1.0 vs 1.2.
    expected = (math.log1p(math.exp(-2.1)) + math.log1p(math.exp(-0.2))) / 2
    assert WPCLLoss(0.5, 0.5, "absolute")(S, W).value.item() == pytest.approx(expected, abs=1e-6)
    # Row 0 lacks the weak modality: beta = 0 there, plain InfoNCE row log(1 + e^-1.6).
    expected_masked = (math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-0.2))) / 2
    got = WPCLLoss(0.5, 0.5, "absolute")(S, W, weak_row_mask=torch.tensor([False, True])).value
    assert got.item() == pytest.approx(expected_masked, abs=1e-6)


def test_wpcl_relative_2x2_by_hand():
    S = t([[0.9, 0.1], [0.3, 0.6]])
    W = t([[0.2, -0.5], [0.4, 0.1]])
    # tau = 0.5, beta = 0.5, the positive gets beta * w_bb too. Row 0: positive (0.9 + 0.1) / 0.5 = 2.0,
    # negative (0.1 - 0.25) / 0.5 = -0.3; row 1: positive (0.6 + 0.05) / 0.5 = 1.3, negative 1.0.
    expected = (math.log1p(math.exp(-2.3)) + math.log1p(math.exp(-0.3))) / 2
    assert WPCLLoss(0.5, 0.5)(S, W).value.item() == pytest.approx(expected, abs=1e-6)
    # Row 0 lacks the weak modality: plain InfoNCE there.
    expected_masked = (math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-0.3))) / 2
    got = WPCLLoss(0.5, 0.5)(S, W, weak_row_mask=torch.tensor([False, True])).value
    assert got.item() == pytest.approx(expected_masked, abs=1e-6)


def test_wpcl_absolute_form_is_gamed_by_anti_aligned_weak_modality_relative_is_not():
    # Nothing is ranked (all fused scores equal), but every weak-modality similarity is -1: the absolute
    # form rewards that with a near-zero loss; the relative form stays at InfoNCE's log(B).
    S, W = torch.zeros(4, 4), -torch.ones(4, 4)
    assert WPCLLoss(0.05, 1.0, "absolute")(S, W).value.item() < 1e-6
    assert WPCLLoss(0.05, 1.0)(S, W).value.item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_wpcl_matches_reference_with_all_masks(form):
    g = torch.Generator().manual_seed(1)
    S = torch.rand(5, 5, generator=g) * 2 - 1
    W = torch.rand(5, 5, generator=g) * 2 - 1
    ids = [3, 1, 3, 2, 9]
    rows, cols = [True, True, True, False, True], [True, True, True, True, False]
    weak_rows, weak_cols = [True, False, True, True, True], [True, True, False, True, True]
    masks = (torch.tensor(m) for m in (rows, cols, weak_rows, weak_cols))
    got = WPCLLoss(0.1, 2.0, form)(S, W, torch.tensor(ids), *masks).value
    expected = ref_wpcl(S.tolist(), W.tolist(), 0.1, 2.0, ids, rows, cols, weak_rows, weak_cols, form)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _dominated_batch(seed=0, batch=16, dim=32):
    """Text nearly perfectly aligned (user = item + 5% noise); image weak (user = 0.2 * item + noise)."""
    g = torch.Generator().manual_seed(seed)
    item_text = torch.randn(batch, dim, generator=g)
    user_text = item_text + 0.05 * torch.randn(batch, dim, generator=g)
    item_image = torch.randn(batch, dim, generator=g)
    user_image = 0.2 * item_image + torch.randn(batch, dim, generator=g)
    return user_text, item_text, user_image, item_image


def _grad_norms(loss_fn):
    """Gradient norms (text, image) reaching the raw embeddings, through per-modality normalisation
    and fusion written out here."""
    leaves = [x.clone().requires_grad_() for x in _dominated_batch()]
    ut, it, uv, iv = (F.normalize(x, dim=-1) for x in leaves)
    fused = F.normalize(ut + uv, dim=-1) @ F.normalize(it + iv, dim=-1).T
    loss_fn(fused, uv @ iv.T).backward()
    norm = lambda a, b: math.sqrt(a.grad.pow(2).sum().item() + b.grad.pow(2).sum().item())  # noqa: E731
    return norm(leaves[0], leaves[1]), norm(leaves[2], leaves[3])


def test_wpcl_sends_more_gradient_to_the_weak_modality():
    text_cl, image_cl = _grad_norms(lambda s, sv: info_nce(s, 0.05).value)
    text_wp, image_wp = _grad_norms(lambda s, sv: WPCLLoss(0.05, 1.0)(s, sv).value)
    boost = image_wp / image_cl
    print(f"image-gradient norm WPCL/InfoNCE = {boost:.3f}; T/V ratio InfoNCE {text_cl / image_cl:.3f} "
          f"-> WPCL {text_wp / image_wp:.3f}")
    # Measured 5.33 (seed 0; seeds 0-5 give 5.3-31.9). Threshold 4 leaves a 25% margin.
    assert boost > 4.0
    # The share moves too: text no longer gets at least as much gradient as the image.
    assert text_wp / image_wp < 0.7 < text_cl / image_cl


# ---------------------------------------------------------------------------- CRTR


def test_crtr_matches_reference():
    X = t([[1.0, 0.0, 0.2], [0.5, 0.5, 0.0], [0.0, 1.0, -0.3], [-0.4, 0.2, 1.0]])
    Y = t([[0.1, 1.0], [1.0, 0.3], [-0.5, 0.5], [0.7, -0.7]])  # another width: D may differ per modality
    got = CRTRLoss(tau_r=0.1)(X, Y).value
    assert got.item() == pytest.approx(ref_crtr(X.tolist(), Y.tolist(), 0.1), rel=1e-5)
    valid = [True, False, True, True]
    got = CRTRLoss(tau_r=0.5)(X, Y, torch.tensor(valid))
    assert got.value.item() == pytest.approx(ref_crtr(X.tolist(), Y.tolist(), 0.5, valid), rel=1e-5)
    assert int(got.rows) == 3


def test_crtr_zero_for_same_geometry_positive_otherwise_symmetric():
    g = torch.Generator().manual_seed(2)
    text = torch.randn(8, 5, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    scale = torch.rand(8, 1, generator=g) + 0.5  # cosines ignore row norms
    image = (text @ rotation) * scale
    assert CRTRLoss(0.1)(text, image).value.abs().item() < 1e-6
    other = torch.randn(8, 5, generator=g)
    forward, backward = CRTRLoss(0.1)(text, other).value, CRTRLoss(0.1)(other, text).value
    assert forward.item() > 0.1
    assert torch.equal(forward, backward)


def test_crtr_fewer_than_two_valid_rows_is_zero_without_nan():
    for mask in ([False, False, False], [False, True, False]):
        valid = torch.tensor(mask)[:, None]
        # Absent rows hold NaN: they must reach neither the value nor any gradient.
        text = torch.where(valid, torch.randn(3, 4), float("nan")).requires_grad_()
        image = torch.where(valid, torch.randn(3, 4), float("nan")).requires_grad_()
        term = CRTRLoss(0.1)(text, image, torch.tensor(mask))
        assert term.skipped and term.value.item() == 0.0 and term.value.requires_grad
        term.value.backward()
        assert torch.equal(text.grad, torch.zeros(3, 4)) and torch.equal(image.grad, torch.zeros(3, 4))


def test_crtr_gradient_is_finite_with_masked_rows():
    text = torch.randn(5, 4)
    text[1] = float("nan")
    text.requires_grad_()
    image = torch.randn(5, 4)
    image[4] = float("inf")
    image.requires_grad_()
    CRTRLoss(0.05)(text, image, torch.tensor([True, False, True, True, False])).value.backward()
    assert torch.isfinite(text.grad).all() and torch.isfinite(image.grad).all()
    assert text.grad[1].abs().sum() == 0 and image.grad[4].abs().sum() == 0


# ---------------------------------------------------------------------------- detector


def test_detector_ema_sequence_and_counts():
    detector = WeakModalityDetector("loss", momentum=0.9)
    assert detector.weak == "image"  # before any evidence
    sequence = [(1.0, 3.0), (2.0, 1.0), (4.0, 0.5), (6.0, 0.5), (10.0, 0.5)]
    # EMA text: 1.0, 1.1, 1.39, 1.851, 2.6659; image: 3.0, 2.8, 2.57, 2.363, 2.1767.
    expected_weak = ["image", "image", "image", "image", "text"]
    got = [detector.update(torch.tensor(lt), li) for lt, li in sequence]
    assert got == expected_weak and detector.weak == "text"
    assert detector.ema.tolist() == pytest.approx([2.6659, 2.1767], abs=1e-5)
    assert detector.counts == {"text": 1, "image": 4}


def test_detector_skipped_modality_keeps_ema_and_decision():
    detector = WeakModalityDetector()
    assert detector.update(5.0, None) == "image"  # image never seen: no comparison yet
    assert detector.ema[0].item() == 5.0 and not bool(detector.seen[1])
    detector.update(None, 1.0)  # now both seen: 5.0 > 1.0 -> text
    assert detector.weak == "text" and detector.ema.tolist() == pytest.approx([5.0, 1.0])


def test_detector_grad_criterion_picks_smaller_norm():
    detector = WeakModalityDetector("grad")
    assert detector.update(grad_text=0.3, grad_image=0.7) == "text"
    assert detector.update(grad_text=torch.tensor(0.9), grad_image=torch.tensor(0.2)) == "image"
    assert detector.update(grad_text=0.5, grad_image=0.5) == "image"  # ties go to the image
    assert detector.counts == {"text": 1, "image": 2}
    with pytest.raises(ValueError, match="grad_text and grad_image"):
        detector.update(1.0, 2.0)


def test_detector_state_dict_round_trip():
    detector = WeakModalityDetector()
    for lt, li in [(3.0, 1.0), (2.5, 1.2), (2.0, 1.1)]:
        detector.update(lt, li)
    restored = WeakModalityDetector()
    restored.load_state_dict(detector.state_dict())
    assert set(detector.state_dict()) == {"ema", "seen", "weak_counts", "weak_index"}
    assert restored.weak == detector.weak == "text" and restored.counts == detector.counts
    assert torch.equal(restored.ema, detector.ema)
    assert restored.update(0.5, 4.0) == detector.update(0.5, 4.0)
    assert torch.equal(restored.ema, detector.ema)


def test_detector_accuracy_criterion_ema_ignores_losses():
    detector = WeakModalityDetector("accuracy", momentum=0.5)
    # The losses passed (text 9.0 >> image 0.1) would make 'loss' call the text weak; 'accuracy' ignores them.
    assert detector.update(9.0, 0.1, accuracy_text=0.5) == "image"  # image accuracy not seen yet: no decision
    accuracies = [(0.0, 0.75), (0.25, 0.0), (0.5, 0.5), (1.0, 0.0), (0.0, 0.46875)]
    # EMA text:  0.5 -> 0.25   -> 0.25  -> 0.375  -> 0.6875  -> 0.34375
    # EMA image: --  -> 0.75   -> 0.375 -> 0.4375 -> 0.21875 -> 0.34375 (first value taken as is)
    # weak = the lower EMA accuracy, the last one a tie, which goes to the image.
    expected = ["text", "text", "text", "image", "image"]
    got = [detector.update(9.0, 0.1, accuracy_text=torch.tensor(at), accuracy_image=ai) for at, ai in accuracies]
    assert got == expected
    assert detector.ema.tolist() == pytest.approx([0.34375, 0.34375])
    assert detector.counts == {"text": 3, "image": 3}


def softmax_at(logits, b):
    """exp(logits[b]) / sum(exp(logits)): the softmax of a list at index b."""
    return math.exp(logits[b]) / sum(math.exp(x) for x in logits)


def test_in_batch_retrieval_by_hand_with_false_negatives_and_masks():
    S = t([[0.9, 0.5, 0.2], [0.4, 0.8, 0.1], [0.65, 0.3, 0.6]])
    ids = torch.tensor([5, 7, 5])  # columns 0 and 2 are the same item
    # tau = 1. No masking: rows 0 and 1 are hits; row 2 misses (0.65 in column 0 beats its 0.6).
    term = in_batch_retrieval(S, 1.0)
    p = [softmax_at([0.9, 0.5, 0.2], 0), softmax_at([0.4, 0.8, 0.1], 1), softmax_at([0.65, 0.3, 0.6], 2)]
    assert term.accuracy.item() == pytest.approx(2 / 3) and int(term.rows) == 3
    assert term.positive_score.item() == pytest.approx(sum(p) / 3, abs=1e-6)
    # False negatives masked as info_nce does: row 0 drops column 2, row 2 drops column 0 and becomes a hit.
    term = in_batch_retrieval(S, 1.0, item_ids=ids)
    p_fn = [softmax_at([0.9, 0.5], 0), p[1], softmax_at([0.3, 0.6], 1)]
    assert term.accuracy.item() == 1.0
    assert term.positive_score.item() == pytest.approx(sum(p_fn) / 3, abs=1e-6)
    # row_mask drops row 1: the mean is over rows 0 and 2.
    term = in_batch_retrieval(S, 1.0, item_ids=ids, row_mask=torch.tensor([True, False, True]))
    assert int(term.rows) == 2 and term.accuracy.item() == 1.0
    assert term.positive_score.item() == pytest.approx((p_fn[0] + p_fn[2]) / 2, abs=1e-6)
    # col_mask drops item 1: row 1 loses its positive; rows 0 and 2 keep only their positive (the other
    # column is a false negative): hits with softmax 1.
    term = in_batch_retrieval(S, 1.0, item_ids=ids, col_mask=torch.tensor([True, False, True]))
    assert int(term.rows) == 2 and term.accuracy.item() == 1.0 and term.positive_score.item() == 1.0
    # tau only sharpens the softmax; accuracy is read on the raw scores.
    sharp = in_batch_retrieval(S, 0.05)
    assert sharp.accuracy.item() == pytest.approx(2 / 3)
    assert sharp.positive_score.item() == pytest.approx(
        sum(softmax_at([x / 0.05 for x in row], b) for b, row in enumerate(S.tolist())) / 3, abs=1e-6)


def test_in_batch_retrieval_of_a_stack_is_each_matrix_and_its_loss_is_info_nce():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(2, 5, 5, generator=g)
    ids = torch.tensor([1, 2, 1, 3, 4])
    rows, cols = torch.tensor([True, True, False, True, True]), torch.tensor([True, True, True, True, False])
    both = in_batch_retrieval(stack, 0.1, ids, rows, cols)
    for m in range(2):
        one = in_batch_retrieval(stack[m], 0.1, ids, rows, cols)
        for field in ("accuracy", "positive_score", "loss"):
            assert torch.allclose(getattr(both, field)[m], getattr(one, field), atol=1e-6), field
        assert torch.allclose(one.loss, info_nce(stack[m], 0.1, ids, rows, cols).value, atol=1e-6)
    assert int(both.rows) == 3


def test_in_batch_retrieval_ties_are_misses_and_masked_garbage_stays_out():
    # A collapsed modality: every score equal. Ties are misses, so accuracy 0; softmax at chance, 1/4.
    term = in_batch_retrieval(torch.full((4, 4), 0.3), 0.05)
    assert term.accuracy.item() == 0.0 and term.positive_score.item() == pytest.approx(1 / 4)
    # Column 3 masked (it holds NaN): rows 0-2 remain, 3 candidates each -> softmax 1/3.
    S = torch.full((4, 4), 0.3)
    S[:, 3] = float("nan")
    S[3] = float("nan")
    present = torch.tensor([True, True, True, False])
    term = in_batch_retrieval(S, 0.05, col_mask=present)
    assert int(term.rows) == 3 and term.accuracy.item() == 0.0
    assert term.positive_score.item() == pytest.approx(1 / 3)
    # No valid row: zeros, rows 0.
    term = in_batch_retrieval(S, 0.05, row_mask=torch.zeros(4, dtype=torch.bool))
    assert int(term.rows) == 0 and term.accuracy.item() == 0.0 and term.positive_score.item() == 0.0


def test_modality_gradient_norms_by_hand_and_backward_still_works():
    x_text = t([[1.0, 2.0], [0.0, 1.0]]).requires_grad_()
    x_image = t([[3.0, 0.0]]).requires_grad_()
    frozen = t([[1.0, 1.0]])  # does not require grad: contributes nothing
    loss = 3 * x_text.sum() + x_image.pow(2).sum()
    norm_text, norm_image = modality_gradient_norms(loss, [x_text], [x_image, frozen])
    # d/dx_text = 3 everywhere (4 entries): 3 * 2 = 6; d/dx_image = 2 * x = (6, 0): 6.
    assert norm_text.item() == pytest.approx(6.0) and norm_image.item() == pytest.approx(6.0)
    loss.backward()
    assert x_image.grad.tolist() == [[6.0, 0.0]]


# ---------------------------------------------------------------------------- the objective


def _batch(seed=3, batch=6, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g).requires_grad_() for _ in range(4)]


def _fused_scores(ut, uv, it, iv, user_mask, item_mask):
    """Reference fusion: normalize(normalize(t) + mask * normalize(v))."""
    def fuse(x_text, x_image, mask):
        image = F.normalize(x_image, dim=-1) * mask[:, None].float()
        return F.normalize(F.normalize(x_text, dim=-1) + image, dim=-1)
    return fuse(ut, uv, user_mask) @ fuse(it, iv, item_mask).T


def test_objective_beta_zero_is_fused_info_nce_and_reports_detached_losses():
    ut, it, uv, iv = _batch()
    user_mask = torch.tensor([True, True, False, True, True, True])
    item_mask = torch.tensor([True, True, True, True, False, True])
    ids = torch.tensor([0, 1, 2, 0, 4, 5])
    out = VLM2RecObjective(beta=0.0)(ut, uv, user_mask, it, iv, item_mask, ids)
    S = _fused_scores(ut, uv, it, iv, user_mask, item_mask)
    assert out.wpcl.item() == pytest.approx(ref_wpcl(S.tolist(), S.tolist(), 0.05, 0.0, ids.tolist()), rel=1e-5)
    # L^T and L^V share the support where images exist (rows with both user and item image).
    cos_text = cosine_scores(ut, it).tolist()
    cos_image = cosine_scores(uv, iv).tolist()
    support = dict(item_ids=ids.tolist(), rows=user_mask.tolist(), cols=item_mask.tolist())
    assert out.loss_text.item() == pytest.approx(ref_wpcl(cos_text, cos_text, 0.05, 0.0, **support), rel=1e-5)
    assert out.loss_image.item() == pytest.approx(ref_wpcl(cos_image, cos_image, 0.05, 0.0, **support), rel=1e-5)
    assert not out.loss_text.requires_grad and out.wpcl.requires_grad
    assert out.fused_user.shape == (6, 8) and torch.allclose(out.fused_user.norm(dim=-1), torch.ones(6))


def test_objective_wpcl_and_crtr_match_references():
    ut, it, uv, iv = _batch(seed=4)
    user_mask = torch.tensor([True, False, True, True, True, True])
    item_mask = torch.tensor([True, True, True, False, True, True])
    objective = VLM2RecObjective(tau=0.1, beta=0.5, tau_r=0.2, relation="both")
    out = objective(ut, uv, user_mask, it, iv, item_mask)
    assert out.weak == objective.detector.weak
    S = _fused_scores(ut, uv, it, iv, user_mask, item_mask).tolist()
    if out.weak == "image":
        W, weak_rows, weak_cols = cosine_scores(uv, iv).tolist(), user_mask.tolist(), item_mask.tolist()
    else:
        W, weak_rows, weak_cols = cosine_scores(ut, it).tolist(), None, None
    expected = ref_wpcl(S, W, 0.1, 0.5, weak_rows=weak_rows, weak_cols=weak_cols)
    assert out.wpcl.item() == pytest.approx(expected, rel=1e-5)
    crtr_items = ref_crtr(it.tolist(), iv.tolist(), 0.2, item_mask.tolist())
    crtr_users = ref_crtr(ut.tolist(), uv.tolist(), 0.2, user_mask.tolist())
    assert out.crtr.item() == pytest.approx(crtr_items + crtr_users, rel=1e-5)  # "both" is the sum
    item_only = VLM2RecObjective(tau=0.1, beta=0.5, tau_r=0.2, relation="item")(ut, uv, user_mask, it, iv, item_mask)
    assert item_only.crtr.item() == pytest.approx(crtr_items, rel=1e-5)


def test_objective_missing_image_garbage_stays_out():
    ut, it, uv, iv = _batch(seed=5)
    user_mask = torch.tensor([True, False, True, True, True, True])
    item_mask = torch.tensor([True, True, False, True, True, True])
    with torch.no_grad():
        uv[1] = float("nan")
        iv[2] = float("inf")
    out = VLM2RecObjective(relation="both")(ut, uv, user_mask, it, iv, item_mask, grad_norm_ratio=True)
    for value in (out.wpcl, out.crtr, out.loss_text, out.loss_image, out.grad_norm_ratio):
        assert math.isfinite(value.item())
    (out.wpcl + 0.1 * out.crtr).backward()
    for x in (ut, it, uv, iv):
        assert torch.isfinite(x.grad).all()
    assert uv.grad[1].abs().sum() == 0 and iv.grad[2].abs().sum() == 0


def test_objective_grad_norm_ratio_and_weak_boost():
    ut, it, uv, iv = (x.clone().requires_grad_() for x in _dominated_batch())
    ratios = {}
    for beta in (0.0, 1.0):
        objective = VLM2RecObjective(beta=beta, crtr_weight=0.1)
        out = objective(ut, uv, None, it, iv, None, grad_norm_ratio=True)
        assert out.weak == "image"  # L^V >> L^T on this batch
        total = out.wpcl + 0.1 * out.crtr
        g_ut, g_it, g_uv, g_iv = torch.autograd.grad(total, [ut, it, uv, iv])
        expected = math.sqrt(g_ut.pow(2).sum() + g_it.pow(2).sum()) / math.sqrt(g_uv.pow(2).sum() + g_iv.pow(2).sum())
        assert out.grad_norm_ratio.item() == pytest.approx(expected, rel=1e-5)
        ratios[beta] = out.grad_norm_ratio.item()
    print(f"grad-norm ratio T/V: beta=0 {ratios[0.0]:.3f}, beta=1 {ratios[1.0]:.3f}")
    assert ratios[1.0] < 0.8 * ratios[0.0]


def test_objective_grad_criterion_uses_fused_info_nce_gradients():
    ut, it, uv, iv = _batch(seed=6)
    objective = VLM2RecObjective(criterion="grad")
    out = objective(ut, uv, None, it, iv, None)
    S = _fused_scores(ut, uv, it, iv, torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    targets = torch.arange(6)
    plain = F.cross_entropy(S / 0.05, targets)
    g_ut, g_it, g_uv, g_iv = torch.autograd.grad(plain, [ut, it, uv, iv])
    norm_text = (g_ut.pow(2).sum() + g_it.pow(2).sum()).sqrt()
    norm_image = (g_uv.pow(2).sum() + g_iv.pow(2).sum()).sqrt()
    assert out.weak == ("text" if norm_text < norm_image else "image")
    assert objective.detector.counts[out.weak] == 1


def _collapsed_image_batch():
    """B = 4, D = 4, unit rows. Text: items e_0..e_3, users e_0, e_1, e_2 and (e_0 - e_3)/sqrt(2), so rows 0-2
    retrieve their positive with cosine 1 against 0, and row 3 ranks item 0 (cos 1/sqrt(2)) first and its own
    item last (cos -1/sqrt(2)): sharp and partly wrong. Image: collapsed, every user and item is e_0, so
    every image score is exactly 1."""
    item_text = torch.eye(4)
    user_text = torch.eye(4)
    user_text[3] = F.normalize(t([1.0, 0.0, 0.0, -1.0]), dim=0)
    image = torch.zeros(4, 4)
    image[:, 0] = 1.0
    return [x.clone().requires_grad_() for x in (user_text, item_text, image, image)]


def test_collapsed_image_loss_criterion_calls_it_strong_accuracy_calls_it_weak():
    ut, it, uv, iv = _collapsed_image_batch()
    c = 1 / math.sqrt(2)
    # tau = 0.05. Text rows 0-2: logits 20 vs three 0s; row 3: logits (20c, 0, 0, -20c), positive last.
    row_hit = math.log1p(3 * math.exp(-20))
    row_miss = math.log(math.exp(20 * c) + 2 + math.exp(-20 * c)) + 20 * c
    loss_text = (3 * row_hit + row_miss) / 4  # 7.071: far above chance, ln 4 = 1.386
    p_hit = 1 / (1 + 3 * math.exp(-20))
    p_miss = math.exp(-20 * c) / (math.exp(20 * c) + 2 + math.exp(-20 * c))
    positive_text, positive_image = (3 * p_hit + p_miss) / 4, 1 / 4  # the image's softmax is 1/4 on every row

    weak = {}
    for criterion in ("loss", "accuracy"):
        out = VLM2RecObjective(beta=0.0, crtr_weight=0.0, criterion=criterion)(
            ut, uv, None, it, iv, None, grad_norm_ratio=True
        )
        weak[criterion] = out.weak
        assert out.loss_text.item() == pytest.approx(loss_text, rel=1e-5)
        assert out.loss_image.item() == pytest.approx(math.log(4), abs=1e-6)  # collapsed: exactly chance
        assert out.accuracy_text.item() == 0.75 and out.accuracy_image.item() == 0.0  # image: ties, misses
        assert out.positive_score_ratio.item() == pytest.approx(positive_text / positive_image, rel=1e-5)  # 2.9999
        # Plain fused InfoNCE of unit vectors (beta = 0, no CRTR): the embedding-level ratio is 1 even with a
        # collapsed image, while the positive-score ratio is about 3.
        assert out.grad_norm_ratio.item() == pytest.approx(1.0, abs=1e-5)
    # 'loss': EMA(L^T) = 7.07 > EMA(L^V) = ln 4, so the collapsed image is called strong. A chance-relative
    # margin ln 4 - L^m would agree (-5.69 < 0): both modalities share one support, hence one chance level.
    # 'accuracy': 0.75 > 0, the image is weak.
    assert weak == {"loss": "text", "accuracy": "image"}


def test_collapsed_image_retrieval_statistics_follow_the_image_masks():
    ut, it, uv, iv = _collapsed_image_batch()
    # User 3 has no image: row 3 (the text's miss) leaves the support; all 4 columns stay candidates.
    out = VLM2RecObjective(criterion="accuracy")(ut, uv, torch.tensor([True, True, True, False]), it, iv, None)
    assert out.accuracy_text.item() == 1.0 and out.accuracy_image.item() == 0.0
    assert out.positive_score_ratio.item() == pytest.approx((1 / (1 + 3 * math.exp(-20))) / (1 / 4), rel=1e-6)
    assert out.weak == "image"
    # Item 3 has no image: row 3 loses its positive and column 3 is no candidate: 3 candidates per row.
    out = VLM2RecObjective()(ut, uv, None, it, iv, torch.tensor([True, True, True, False]))
    assert out.accuracy_text.item() == 1.0 and out.accuracy_image.item() == 0.0
    assert out.loss_image.item() == pytest.approx(math.log(3), abs=1e-6)
    assert out.positive_score_ratio.item() == pytest.approx((1 / (1 + 2 * math.exp(-20))) / (1 / 3), rel=1e-6)
    # Text only: no image to compare with, so no ratio; the text's accuracy is still reported.
    with pytest.warns(UserWarning, match="text embeddings only"):
        out = VLM2RecObjective()(ut, None, None, it, None, None)
    assert out.positive_score_ratio is None and out.accuracy_text.item() == 0.75 and out.accuracy_image is None


def test_a_batch_without_images_reports_nan_and_leaves_the_detector_alone():
    """No row has an image: L^T, L^V, the accuracies and the ratio are "not measured" (NaN, decided on the
    device), and the detector's EMA and decision stay as they were."""
    ut, it, uv, iv = _batch()
    objective = VLM2RecObjective()
    objective(ut, uv, None, it, iv, None)  # one ordinary step: the EMA is seeded
    before = {k: v.clone() for k, v in objective.detector.state_dict().items()}
    none = torch.zeros(6, dtype=torch.bool)
    out = objective(ut, uv, none, it, iv, none)
    for value in (out.loss_text, out.loss_image, out.accuracy_text, out.accuracy_image, out.positive_score_ratio):
        assert torch.isnan(value)
    assert torch.equal(objective.detector.ema, before["ema"]) and torch.equal(objective.detector.seen, before["seen"])
    assert torch.equal(objective.detector.weak_index, before["weak_index"]) and torch.isfinite(out.wpcl)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``,
    ``int(t)``, ``float(t)``): each one a host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("criterion", ["loss", "accuracy", "grad"])
def test_objective_step_reads_no_value_into_python(criterion):
    """The training step's objective (detector update, weak-modality choice, diagnostics) stays on the
    device, so on a GPU it does not synchronise; on CPU the reads are counted directly."""
    from recbole_vlm2rec.diagnostics import ModalityDiagnostics

    ut, it, uv, iv = _batch()
    objective, diagnostics = VLM2RecObjective(criterion=criterion), ModalityDiagnostics()
    mask = torch.tensor([True, True, False, True, True, True])
    with _HostReads() as reads:
        for _ in range(2):
            out = objective(ut, uv, mask, it, iv, mask, item_ids=torch.arange(6), grad_norm_ratio=True)
            (out.wpcl + 0.1 * out.crtr).backward()
            diagnostics.update(out.loss_text, out.loss_image, out.weak_index, out.grad_norm_ratio,
                               out.positive_score_ratio, out.accuracy_text, out.accuracy_image)
    assert reads.count == 0
    assert diagnostics.summary()["steps"] == 2  # read once, at the end of the epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_objective_step_does_not_synchronise_on_a_gpu():
    ut, it, uv, iv = (x.detach().cuda().requires_grad_() for x in _batch())
    objective = VLM2RecObjective().cuda()
    mask = torch.ones(6, dtype=torch.bool, device="cuda")
    objective(ut, uv, mask, it, iv, mask)  # first call: lazy initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = objective(ut, uv, mask, it, iv, mask, item_ids=torch.arange(6, device="cuda"))
        (out.wpcl + out.crtr).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_objective_eval_mode_leaves_detector_alone():
    ut, it, uv, iv = _batch()
    objective = VLM2RecObjective().eval()
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    with torch.no_grad():
        out = objective(ut, uv, None, it, iv, None)
    assert out.weak == "image"
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())
    assert {"detector.ema", "detector.weak_counts"} <= set(before)


def test_objective_text_only_and_image_only(recwarn):
    ut, it, uv, iv = _batch(seed=7)
    objective = VLM2RecObjective()
    with pytest.warns(UserWarning, match="text embeddings only"):
        out = objective(ut, None, None, it, None, None)
    objective(ut, None, None, it, None, None)
    assert len(recwarn) == 0  # once per instance
    cos_text = cosine_scores(ut, it).tolist()
    assert out.wpcl.item() == pytest.approx(ref_wpcl(cos_text, cos_text, 0.05, 0.0), rel=1e-5)
    assert out.crtr.item() == 0.0 and out.weak is None and out.loss_image is None and out.grad_norm_ratio is None
    assert out.loss_text.item() == pytest.approx(out.wpcl.item(), rel=1e-5)

    user_mask = torch.tensor([True, True, False, True, True, True])
    item_mask = torch.tensor([True, True, True, True, True, False])
    with pytest.warns(UserWarning, match="image embeddings only"):
        out = VLM2RecObjective()(None, uv, user_mask, None, iv, item_mask)
    cos_image = cosine_scores(uv, iv).tolist()
    expected = ref_wpcl(cos_image, cos_image, 0.05, 0.0, rows=user_mask.tolist(), cols=item_mask.tolist())
    assert out.wpcl.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss_text is None and out.crtr.item() == 0.0


# ---------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: InfoNCELoss(tau=0), r"tau must be > 0, got 0"),
        (lambda: InfoNCELoss(tau=-0.1), r"tau must be > 0, got -0.1"),
        (lambda: info_nce(torch.eye(2), tau=0.0), r"tau must be > 0, got 0.0"),
        (lambda: WPCLLoss(tau=0.0), r"tau must be > 0"),
        (lambda: WPCLLoss(beta=-1.0), r"beta must be >= 0, got -1.0"),
        (lambda: WPCLLoss(form="abs"), r"form must be one of 'relative', 'absolute'; got 'abs'"),
        (lambda: CRTRLoss(tau_r=0), r"tau_r must be > 0, got 0"),
        (lambda: WeakModalityDetector(criterion="norm"),
         r"criterion must be one of 'loss', 'grad', 'accuracy'; got 'norm'"),
        (lambda: WeakModalityDetector(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (lambda: VLM2RecObjective(relation="items"), r"relation must be one of 'item', 'user', 'both'; got 'items'"),
        (lambda: VLM2RecObjective(crtr_weight=-0.1), r"crtr_weight must be >= 0, got -0.1"),
        (lambda: VLM2RecObjective(tau=float("inf")), r"tau must be finite, got inf"),
    ],
)
def test_argument_errors_name_argument_and_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_argument_type_and_shape_errors():
    with pytest.raises(TypeError, match=r"tau must be a real number, got '0.05' \(str\)"):
        InfoNCELoss(tau="0.05")
    with pytest.raises(TypeError, match=r"beta must be a real number, got True"):
        WPCLLoss(beta=True)
    with pytest.raises(ValueError, match=r"scores must be a square \[B, B\] score matrix, got shape \(2, 3\)"):
        info_nce(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"row_mask must be a bool tensor of shape \[2\], got torch.int64"):
        info_nce(torch.eye(2), row_mask=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"item_ids must be an integer tensor of shape \[2\]"):
        info_nce(torch.eye(2), item_ids=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weak_scores must have the shape of scores \(2, 2\), got \(3, 3\)"):
        WPCLLoss()(torch.eye(2), torch.eye(3))
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"user_image and item_image must both be given or both be None"):
        VLM2RecObjective()(x, x, None, x, None, None)
    with pytest.raises(ValueError, match=r"item_text has 3 rows, expected B=2"):
        VLM2RecObjective()(x, None, None, torch.zeros(3, 4), None, None)
    with pytest.raises(ValueError, match=r"user_image_mask was given but there are no image embeddings"):
        VLM2RecObjective()(x, None, torch.tensor([True, True]), x, None, None)
