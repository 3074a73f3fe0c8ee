"""Tests for cascade.distill.losses: hand-worked values, references, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.distill.losses import (
    approx_ndcg_loss,
    bpr_pairwise_loss,
    click_bce,
    confidence_ranking_loss,
    graded_relevance,
    hint_loss,
    hinton_kd_loss,
    lambda_ndcg_loss,
    listnet_kl_loss,
    logit_mse,
    mix,
    pointwise_topk_loss,
    relative_confidence_ranking_loss,
    sampled_softmax_loss,
)

LN2, LN3, LN4_3 = math.log(2), math.log(3), math.log(4 / 3)
T, F = True, False


def sp(x: float) -> float:
    """softplus(x) = log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def t(x, dtype=torch.float64, grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def ranks(x):
    return torch.tensor(x, dtype=torch.long)


def mask_(x):
    return torch.tensor(x, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# pointwise top-K


def test_pointwise_topk_inverse_hand_worked():
    student = t([[LN3, 0.0, 0.0], [0.0, LN3, 99.0]])
    rank = ranks([[1, 2, 3], [2, 1, 3]])
    mask = mask_([[T, T, T], [T, T, F]])
    # k=1, w = 1 + 1/rank = 2 for the top item, negatives weight 1.
    # row 0: item 0 positive, BCE(ln3, 1) = log(1 + 1/3) = ln(4/3), weight 2; items 1, 2 negative, BCE(0, 0) = ln 2
    # row 1: item 1 positive (rank 1) ln(4/3) * 2; item 0 negative ln 2; item 2 padded (its 99 must not count)
    # mean over the 5 used entries: (4 ln(4/3) + 3 ln 2) / 5 = (1.150728 + 2.079442) / 5 = 0.646034
    loss = pointwise_topk_loss(student, rank, mask, k=1, weighting="inverse", a=1.0)
    assert loss.item() == pytest.approx((4 * LN4_3 + 3 * LN2) / 5, rel=1e-12)
    assert loss.item() == pytest.approx(0.646034, abs=1e-6)


def test_pointwise_topk_exp_weighting_hand_worked():
    student = t([[LN3, 0.0, 0.0], [0.0, LN3, 99.0]])
    rank = ranks([[1, 2, 3], [2, 1, 3]])
    mask = mask_([[T, T, T], [T, T, F]])
    # exp weighting, lam = 1: positive weight exp(-1/1) = 0.367879 instead of 2:
    # (2 * e^-1 * ln(4/3) + 3 ln 2) / 5 = (0.211662 + 2.079442) / 5 = 0.458221
    loss = pointwise_topk_loss(student, rank, mask, k=1, weighting="exp", lam=1.0)
    assert loss.item() == pytest.approx((2 * math.exp(-1) * LN4_3 + 3 * LN2) / 5, rel=1e-12)


def test_pointwise_topk_tail_sampling_counts_and_reproducibility():
    student = t([[LN3, 0.0, 0.0], [0.0, LN3, 99.0]])
    rank = ranks([[1, 2, 3], [2, 1, 3]])
    mask = mask_([[T, T, T], [T, T, F]])
    # tail_samples = 0: positives only -> (2 ln(4/3) + 2 ln(4/3)) / 2 = 2 ln(4/3)
    only_pos = pointwise_topk_loss(student, rank, mask, k=1, tail_samples=0)
    assert only_pos.item() == pytest.approx(2 * LN4_3, rel=1e-12)
    # tail_samples = 1: one of the two (equal-BCE) negatives in row 0, the only one in row 1
    # -> (4 ln(4/3) + 2 ln 2) / 4 = 0.634401
    g = torch.Generator().manual_seed(0)
    one = pointwise_topk_loss(student, rank, mask, k=1, tail_samples=1, generator=g)
    assert one.item() == pytest.approx((4 * LN4_3 + 2 * LN2) / 4, rel=1e-12)
    # Different negative scores: the sample decides the value; the same seed gives the same value.
    s2 = t([[0.0, 1.0, -3.0, 2.0, 0.5, -1.0]])
    r2 = ranks([[1, 2, 3, 4, 5, 6]])
    vals = [
        pointwise_topk_loss(s2, r2, None, k=1, tail_samples=2, generator=torch.Generator().manual_seed(s)).item()
        for s in (5, 5, 6, 7, 8, 9)
    ]
    assert vals[0] == vals[1]
    assert len(set(vals)) > 1


def test_pointwise_rejects_bad_ranks():
    with pytest.raises(TypeError, match="teacher_rank must be an integer"):
        pointwise_topk_loss(t([[0.0, 1.0]]), t([[1.0, 2.0]]), None)
    with pytest.raises(ValueError, match="teacher_rank must be >= 1"):
        pointwise_topk_loss(t([[0.0, 1.0]]), ranks([[0, 1]]), None)
    with pytest.raises(ValueError, match="mask shape"):
        pointwise_topk_loss(t([[0.0, 1.0]]), ranks([[1, 2]]), mask_([[T, T, T]]))
    with pytest.raises(ValueError, match="weighting"):
        pointwise_topk_loss(t([[0.0, 1.0]]), ranks([[1, 2]]), None, weighting="linear")


# ----------------------------------------------------------------------------------------------------------------
# BPR


BPR_S = [[2.0, 0.0, 1.0], [0.0, 5.0, 7.0]]
BPR_R = [[1, 2, 3], [2, 1, 3]]
BPR_M = [[T, T, T], [T, T, F]]


def test_bpr_all_pairs_hand_worked():
    s, r, m = t(BPR_S), ranks(BPR_R), mask_(BPR_M)
    # row 0 pairs (better, worse): (0,1) d=2, (0,2) d=1, (2 is rank 3, 1 is rank 2) -> (1,2) d=0-1=-1
    # row 1: item 1 (rank 1) above item 0 (rank 2): d = 5; item 2 padded.
    # loss = mean of softplus(-d) = (sp(-2) + sp(-1) + sp(1) + sp(-5)) / 4
    #      = (0.126928 + 0.313262 + 1.313262 + 0.006715) / 4 = 0.440042
    expected = (sp(-2) + sp(-1) + sp(1) + sp(-5)) / 4
    assert bpr_pairwise_loss(s, r, m, strategy="all").item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.440042, abs=1e-6)
    # rank-gap weights |r_i - r_j|: 1, 2, 1, 1 -> (sp(-2) + 2 sp(-1) + sp(1) + sp(-5)) / 5
    weighted = bpr_pairwise_loss(s, r, m, strategy="all", rank_gap_weight=True)
    assert weighted.item() == pytest.approx((sp(-2) + 2 * sp(-1) + sp(1) + sp(-5)) / 5, rel=1e-12)


def test_bpr_topk_vs_tail_hand_worked():
    s, r, m = t(BPR_S), ranks(BPR_R), mask_(BPR_M)
    # k = 1, every (top, tail) pair: row 0: (0,1) d=2, (0,2) d=1; row 1: (1,0) d=5
    # -> (sp(-2) + sp(-1) + sp(-5)) / 3 = (0.126928 + 0.313262 + 0.006715) / 3 = 0.148968
    loss = bpr_pairwise_loss(s, r, m, strategy="topk_vs_tail", k=1, n_pairs=None)
    assert loss.item() == pytest.approx((sp(-2) + sp(-1) + sp(-5)) / 3, rel=1e-12)
    # Sampled: one top item, and a tail whose scores are equal -> every sampled pair is d = 2 - 0 = 2.
    s2, r2 = t([[2.0, 0.0, 0.0]]), ranks([[1, 2, 3]])
    g = torch.Generator().manual_seed(1)
    sampled = bpr_pairwise_loss(s2, r2, None, strategy="topk_vs_tail", k=1, n_pairs=8, generator=g)
    assert sampled.item() == pytest.approx(sp(-2), rel=1e-12)


def test_bpr_random_pairs_are_oriented_by_teacher_rank():
    # Two real entries: every valid sampled pair is (item 1 above item 0) whatever the draw order: d = 0 - 3.
    s, r, m = t([[3.0, 0.0, 50.0]]), ranks([[2, 1, 3]]), mask_([[T, T, F]])
    g = torch.Generator().manual_seed(3)
    loss = bpr_pairwise_loss(s, r, m, strategy="random", n_pairs=16, generator=g)
    assert loss.item() == pytest.approx(sp(3.0), rel=1e-12)  # -log sigmoid(0 - 3) = 3.048587


# ----------------------------------------------------------------------------------------------------------------
# graded relevance


def test_graded_relevance_rank_buckets_and_quantiles():
    rank = ranks([[1, 5, 6, 10, 11, 20, 21, 50, 51, 3]])
    # default buckets: <=5 -> 4, <=10 -> 3, <=20 -> 2, <=50 -> 1, else 0
    assert graded_relevance(rank).tolist() == [[4, 4, 3, 3, 2, 2, 1, 1, 0, 4]]
    m = mask_([[T] * 9 + [F]])
    assert graded_relevance(rank, mask=m).tolist() == [[4, 4, 3, 3, 2, 2, 1, 1, 0, 0]]
    logits = t([[0.1, 0.4, 0.3, 0.2, 9.0], [1.0, 1.0, 2.0, 2.0, 0.0]])
    qm = mask_([[T, T, T, T, F], [T, T, T, T, T]])
    # row 0, 4 real entries, n_levels 2: entries strictly lower = 0, 3, 2, 1 -> floor(2 n / 4) = 0, 1, 1, 0
    # row 1, 5 entries, n_levels 2: strictly lower = 1, 1, 3, 3, 0 -> floor(2 n / 5) = 0, 0, 1, 1, 0 (ties share)
    grades = graded_relevance(teacher_logits=logits, mask=qm, mode="quantiles", n_levels=2)
    assert grades.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    # n_levels 5, 5 distinct logits: each entry its own grade 0..4
    five = graded_relevance(teacher_logits=t([[3.0, 1.0, 4.0, 0.0, 2.0]]), mode="quantiles", n_levels=5)
    assert five.tolist() == [[3, 1, 4, 0, 2]]
    with pytest.raises(ValueError, match="needs teacher_rank"):
        graded_relevance(teacher_logits=logits)
    with pytest.raises(ValueError, match="strictly increasing"):
        graded_relevance(rank, buckets=((10, 2), (5, 1)))


# ----------------------------------------------------------------------------------------------------------------
# NDCG losses

D = lambda n: math.log2(1 + n)  # noqa: E731  DCG discount of position n
DELTA = lambda g: abs(1 / D(g) - 1 / D(g + 1))  # noqa: E731  NDCG-Loss2 weight for a position gap g


def test_lambda_ndcg_hand_worked():
    student = t([[0.0, 0.0, 0.0], [LN3, 0.0, 7.0], [1.0, 2.0, 3.0], [5.0, 1.0, 0.0]])
    rel = t([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])
    mask = mask_([[T, T, T], [T, T, F], [T, T, T], [F, F, F]])
    # Row 0: equal scores, stable order -> positions 1, 2, 3. gains 2^rel - 1 = 3, 1, 0; maxDCG = 3 + 1/log2 3.
    #   pairs (0,1): delta(1) * |3 - 1| ; (0,2): delta(2) * 3 ; (1,2): delta(1) * 1, each times log2(1 + e^0) = 1
    #   = (0.369070 * 2 + 0.130930 * 3 + 0.369070) / 3.630930 = 1.5 / 3.630930 = 0.413117
    row0 = (DELTA(1) * 2 + DELTA(2) * 3 + DELTA(1) * 1) / (3 + 1 / D(2))
    # Row 1: item 2 padded. positions 1, 2; maxDCG = 1; one pair: delta(1) * 1 * log2(1 + e^-ln3) = 0.369070 * 0.415037
    row1 = DELTA(1) * math.log2(1 + 1 / 3)
    # Row 2 has no relevant entry (maxDCG 0) and row 3 is all padding: neither counts.
    loss = lambda_ndcg_loss(student, rel, mask)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert (row0 + row1) / 2 == pytest.approx(0.283148, abs=1e-6)


def test_lambda_ndcg_at_k_hand_worked():
    student, rel = t([[0.0, 0.0, 0.0]]), t([[2.0, 1.0, 0.0]])
    # k = 1: maxDCG@1 = 3 -> G = 1, 1/3, 0. Pair (1,2) has both positions beyond 1: dropped.
    # (0,1): positions 1, 2 -> delta(1) * mu, mu = 1 / (1 - 1/D(2)) = 1 / delta(1) -> weight 1; |dG| = 2/3
    # (0,2): positions 1, 3 -> delta(2) / (1 - 1/D(3)) = 0.130930 * 2 = 0.261860; |dG| = 1
    # loss = 2/3 + 0.261860 = 0.928527
    expected = 1.0 * (2 / 3) + DELTA(2) / (1 - 1 / D(3)) * 1.0
    assert lambda_ndcg_loss(student, rel, None, k=1).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.928527, abs=1e-6)


def test_approx_ndcg_hand_worked():
    student = t([[0.0, 0.0, -9.0], [LN3, 0.0, 0.0]])
    rel = t([[1.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    mask = mask_([[T, T, F], [T, T, T]])
    # Row 0 (item 2 padded): smooth position of item 0 = 1 + sigmoid(0 - 0) = 1.5 -> DCG = 1 / log2(2.5) = 0.756471;
    #   maxDCG = 1 -> 1 - NDCG = 0.243529
    # Row 1: item 0: 1 + 2 sigmoid(0 - ln3) = 1 + 2 * 1/4 = 1.5 -> the same 0.243529
    expected = 1 - 1 / math.log2(2.5)
    assert approx_ndcg_loss(student, rel, mask).item() == pytest.approx(expected, rel=1e-12)
    # Row 1 alone with two entries: position 1 + 1/4 = 1.25 -> 1 - 1/log2(2.25) = 0.145245
    two = approx_ndcg_loss(t([[LN3, 0.0]]), t([[1.0, 0.0]]))
    assert two.item() == pytest.approx(1 - 1 / math.log2(2.25), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# ListNet, logit MSE, Hinton, CR, RCR, hint, BCE, sampled softmax


def test_listnet_kl_hand_worked():
    student = t([[0.0, 0.0, 1e4]])
    teacher = t([[0.0, LN3, -1e4]])
    mask = mask_([[T, T, F]])
    # T = 1: p_t = (1/4, 3/4), p_s = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812
    kl1 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert listnet_kl_loss(student, teacher, mask, temperature=1.0).item() == pytest.approx(kl1, rel=1e-12)
    # T = 2: p_t = softmax(0, ln3 / 2) = (1, sqrt 3) / (1 + sqrt 3) = (0.366025, 0.633975), p_s = (1/2, 1/2):
    # KL = 0.366025 ln(0.732051) + 0.633975 ln(1.267949) = -0.114165 + 0.150506 = 0.036341; * T^2 = 0.145363
    a, b = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    kl2 = (a * math.log(2 * a) + b * math.log(2 * b)) * 4
    assert listnet_kl_loss(student, teacher, mask, temperature=2.0).item() == pytest.approx(kl2, rel=1e-12)
    assert kl2 == pytest.approx(0.145363, abs=1e-6)


def test_logit_mse_hand_worked():
    # masked mean of (s - t)^2 over the first two entries: (0 + 4) / 2 = 2
    loss = logit_mse(t([1.0, 2.0, 3.0]), t([1.0, 0.0, 0.0]), mask_([T, T, F]))
    assert loss.item() == pytest.approx(2.0)
    assert logit_mse(t([1.0, 2.0]), t([0.0, 0.0])).item() == pytest.approx(2.5)  # (1 + 4) / 2


def test_hinton_kd_hand_worked():
    # T = 2. Item 0: s = t = 0 -> BCE(1/2 target, 1/2) = ln 2.
    # Item 1: s/T = ln 3 (sigmoid 3/4), target sigmoid(0) = 1/2:
    # BCE = -(1/2 ln 3/4 + 1/2 ln 1/4) = 0.836988. mean * T^2 = (0.693147 + 0.836988) / 2 * 4 = 3.060271
    s, tt = t([0.0, 2 * LN3]), t([0.0, 0.0])
    bce1 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert hinton_kd_loss(s, tt, temperature=2.0).item() == pytest.approx((LN2 + bce1) / 2 * 4, rel=1e-12)
    # minus the entropy floor (ln 2 for both targets): (0 + 0.836988 - 0.693147) / 2 * 4 = 0.287682
    kl = hinton_kd_loss(s, tt, temperature=2.0, subtract_entropy=True)
    assert kl.item() == pytest.approx((bce1 - LN2) / 2 * 4, rel=1e-12)


def test_confidence_ranking_hand_worked():
    # y = 1: log(1 + e^-(ln3 - 0)) = ln(4/3); y = 0: log(1 + e^(0 - ln3)) = ln(4/3); mean = ln(4/3) = 0.287682
    loss = confidence_ranking_loss(t([LN3, 0.0]), t([0.0, LN3]), t([1.0, 0.0]))
    assert loss.item() == pytest.approx(LN4_3, rel=1e-12)


def test_relative_confidence_ranking_hand_worked():
    # one positive (item 0), two negatives: d_f = ln3 - 0 = ln3, d_ref = 0 for both pairs:
    # log(1 + e^-(ln3)) = ln(4/3) each -> mean ln(4/3)
    loss = relative_confidence_ranking_loss(t([LN3, 0.0, 0.0]), t([0.0, 0.0, 0.0]), t([1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(LN4_3, rel=1e-12)
    # no (pos, neg) pair -> exactly 0, and backward still works with a zero gradient
    s = t([1.0, 2.0], grad=True)
    zero = relative_confidence_ranking_loss(s, t([0.0, 0.0]), t([1.0, 1.0]))
    zero.backward()
    assert zero.item() == 0.0 and s.grad.abs().sum().item() == 0.0


def _cr_reference(u, v, y):
    total = 0.0
    for i in range(len(u)):
        if y[i] == 1:
            total += math.log(1 + math.exp(-(u[i] - v[i])))
        else:
            total += math.log(1 + math.exp(u[i] - v[i]))
    return total / len(u)


def _rcr_reference(u, v, y):
    total, n = 0.0, 0
    for p in range(len(u)):
        for q in range(len(u)):
            if y[p] == 1 and y[q] == 0:
                total += math.log(1 + math.exp(-((u[p] - u[q]) - (v[p] - v[q]))))
                n += 1
    return total / n if n else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cr_rcr_equal_double_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n = 9
    u, v = rng.normal(0, 2, n), rng.normal(0, 2, n)
    y = rng.integers(0, 2, n).astype(float)
    y[0], y[1] = 1.0, 0.0
    cr = confidence_ranking_loss(t(u), t(v), t(y))
    rcr = relative_confidence_ranking_loss(t(u), t(v), t(y))
    assert cr.item() == pytest.approx(_cr_reference(u, v, y), rel=1e-12)
    assert rcr.item() == pytest.approx(_rcr_reference(u, v, y), rel=1e-12)


def test_hint_loss_hand_worked_and_no_teacher_gradient():
    proj = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(t([[1.0, 1.0]]))
    student = t([[1.0, 2.0], [0.0, 1.0]], grad=True)
    teacher = t([[1.0], [1.0]], grad=True)
    # projection = row sums 3, 1; MSE vs 1, 1 = (4 + 0) / 2 = 2
    loss = hint_loss(student, teacher, proj)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert teacher.grad is None
    # d/d proj.weight of mean((w.x - 1)^2) = (2 * 2 * [1, 2] + 0) / 2 = [2, 4]
    assert proj.weight.grad[0].tolist() == pytest.approx([2.0, 4.0])
    with pytest.raises(ValueError, match="projection output shape"):
        hint_loss(student, t([[1.0, 1.0], [1.0, 1.0]]), proj)


def test_click_bce_hand_worked():
    # masked mean of BCE: (log(1 + e^-ln3) + log(1 + e^0)) / 2 = (0.287682 + 0.693147) / 2 = 0.490415
    loss = click_bce(t([LN3, 0.0, 99.0]), t([1.0, 0.0, 5.0]), mask_([T, T, F]))
    assert loss.item() == pytest.approx((LN4_3 + LN2) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="labels must be in"):
        click_bce(t([0.0]), t([2.0]))


def test_sampled_softmax_hand_worked():
    u, pos, neg = t([[1.0], [2.0]]), t([[1.0], [0.0]]), t([[1.0]])
    # candidates per row: [pos_0, pos_1, neg_0]; logits row 0 = [1, 0, 1] (target 0), row 1 = [2, 0, 2] (target 1)
    # CE row 0 = log(2e + 1) - 1 = 0.861995; row 1 = log(2e^2 + 1) - 0 = 2.758624; mean = 1.810309
    expected = (math.log(2 * math.e + 1) - 1 + math.log(2 * math.e**2 + 1)) / 2
    assert sampled_softmax_loss(u, pos, neg).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.810309, abs=1e-6)
    # log-Q: subtract log q = (ln 2, 0) from the in-batch columns and 0 from the negative:
    # row 0 = [1 - ln2, 0, 1] -> log(e/2 + 1 + e) - (1 - ln 2); row 1 = [2 - ln2, 0, 2] -> log(e^2/2 + 1 + e^2) - 0
    e = math.e
    expected_q = (math.log(e / 2 + 1 + e) - (1 - LN2) + math.log(e**2 / 2 + 1 + e**2)) / 2
    got_q = sampled_softmax_loss(u, pos, neg, pos_log_q=t([LN2, 0.0]), neg_log_q=t([0.0]))
    assert got_q.item() == pytest.approx(expected_q, rel=1e-12)
    # temperature 0.5 doubles the logits: row 0 = [2, 0, 2], row 1 = [4, 0, 4]
    expected_t = (math.log(2 * e**2 + 1) - 2 + math.log(2 * e**4 + 1)) / 2
    assert sampled_softmax_loss(u, pos, neg, temperature=0.5).item() == pytest.approx(expected_t, rel=1e-12)


def test_sampled_softmax_accidental_hits_and_no_in_batch():
    u, pos, neg = t([[1.0], [2.0]]), t([[1.0], [0.0]]), t([[1.0]])
    # both rows' positive is item 7: the other row's column is an accidental hit and drops out.
    # row 0 = [1, -, 1] -> log(2e) - 1 = ln 2; row 1 = [-, 0, 2] -> log(1 + e^2) = 2.126928
    ids = torch.tensor([7, 7])
    got = sampled_softmax_loss(u, pos, neg, pos_item_ids=ids, neg_item_ids=torch.tensor([8]))
    assert got.item() == pytest.approx((LN2 + sp(2.0)) / 2, rel=1e-12)
    # the negative is item 7 too: only the positives remain -> CE 0 on both rows
    only_pos = sampled_softmax_loss(u, pos, neg, pos_item_ids=ids, neg_item_ids=torch.tensor([7]))
    assert only_pos.item() == pytest.approx(0.0, abs=1e-12)
    # in_batch=False: row 0 = [pos 1, neg 1] -> ln 2; row 1 = [pos 0, neg 2] -> log(1 + e^2): same as above
    no_batch = sampled_softmax_loss(u, pos, neg, in_batch=False)
    assert no_batch.item() == pytest.approx((LN2 + sp(2.0)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="neg_log_q"):
        sampled_softmax_loss(u, pos, neg, pos_log_q=t([0.0, 0.0]))
    with pytest.raises(ValueError, match="needs negatives"):
        sampled_softmax_loss(u, pos, None, in_batch=False)


# ----------------------------------------------------------------------------------------------------------------
# mix


def test_mix_weighted_sum_and_errors():
    a = t(1.0, grad=True)
    total, log = mix({"a": a, "b": t(2.0)}, {"a": 0.5, "b": 2.0})
    # 0.5 * 1 + 2 * 2 = 4.5
    assert total.item() == pytest.approx(4.5)
    assert log == {"a": 1.0, "b": 2.0, "total": 4.5}
    total.backward()
    assert a.grad.item() == pytest.approx(0.5)
    with pytest.raises(KeyError, match="kd_typo"):
        mix({"a": t(1.0)}, {"a": 1.0, "kd_typo": 0.3})
    with pytest.raises(KeyError, match="'b'"):
        mix({"a": t(1.0), "b": t(1.0)}, {"a": 1.0})
    with pytest.raises(FloatingPointError, match="'bpr'"):
        mix({"a": t(1.0), "bpr": t(float("nan"))}, {"a": 1.0, "bpr": 0.0})


# ----------------------------------------------------------------------------------------------------------------
# properties: finiteness, teacher order minimal, no gradient into the teacher

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def padded_lists(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 6))
    big = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
    student = draw(st.lists(big, min_size=B * L, max_size=B * L))
    teacher = draw(st.lists(big, min_size=B * L, max_size=B * L))
    mask = draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
    empty_row = draw(st.integers(-1, B - 1))
    s = torch.tensor(student, dtype=torch.float32).reshape(B, L)
    tl = torch.tensor(teacher, dtype=torch.float32).reshape(B, L)
    m = torch.tensor(mask).reshape(B, L)
    if empty_row >= 0:
        m[empty_row] = False  # an all-masked row
    # teacher ranks from the teacher logits among the real entries (padding gets rank L + 1)
    order = torch.argsort(tl.masked_fill(~m, float("-inf")), dim=1, descending=True, stable=True)
    r = torch.empty_like(order)
    r.scatter_(1, order, torch.arange(1, L + 1).expand(B, L).contiguous())
    return s, tl, m, r


def _all_list_losses(s, tl, m, r):
    g = torch.Generator().manual_seed(0)
    rel = graded_relevance(r, mask=m, buckets=((1, 3), (3, 1)))
    qrel = graded_relevance(teacher_logits=tl, mask=m, mode="quantiles", n_levels=3)
    return {
        "pointwise_inv": pointwise_topk_loss(s, r, m, k=2),
        "pointwise_exp_tail": pointwise_topk_loss(s, r, m, k=2, weighting="exp", tail_samples=2, generator=g),
        "bpr_all": bpr_pairwise_loss(s, r, m, strategy="all", rank_gap_weight=True),
        "bpr_topk": bpr_pairwise_loss(s, r, m, k=2, n_pairs=5, generator=g),
        "bpr_random": bpr_pairwise_loss(s, r, m, strategy="random", n_pairs=5, generator=g),
        "lambda": lambda_ndcg_loss(s, rel, m),
        "lambda_k": lambda_ndcg_loss(s, qrel, m, k=2),
        "approx": approx_ndcg_loss(s, rel, m, temperature=0.5),
        "listnet": listnet_kl_loss(s, tl, m, temperature=2.0),
        "mse": logit_mse(s, tl, m),
        "bce": click_bce(s, (tl > 0).float(), m),
    }


@SETTINGS
@given(padded_lists())
def test_list_losses_finite_values_and_gradients(data):
    s, tl, m, r = data
    s = s.clone().requires_grad_(True)
    tl = tl.clone().requires_grad_(True)
    for name, loss in _all_list_losses(s, tl, m, r).items():
        s.grad = None
        assert loss.dim() == 0, name
        assert torch.isfinite(loss).item(), name
        loss.backward()
        assert torch.isfinite(s.grad).all().item(), name
        # padding gets no gradient
        assert (s.grad[~m] == 0).all().item(), name
    assert tl.grad is None  # the teacher never receives gradient


@SETTINGS
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=8),
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=8, max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_pointwise_terms_finite_and_teacher_constant(u_list, v_list, y_list):
    n = len(u_list)
    u = torch.tensor(u_list, dtype=torch.float32, requires_grad=True)
    v = torch.tensor(v_list[:n], dtype=torch.float32, requires_grad=True)
    y = torch.tensor(y_list[:n], dtype=torch.float32)
    terms = {
        "hinton": hinton_kd_loss(u, v, temperature=2.0),
        "hinton_kl": hinton_kd_loss(u, v, temperature=0.5, subtract_entropy=True),
        "cr": confidence_ranking_loss(u, v, y),
        "rcr": relative_confidence_ranking_loss(u, v, y),
        "mse": logit_mse(u, v),
    }
    total, log = mix(terms, {k: 1.0 for k in terms})
    total.backward()
    assert all(math.isfinite(x) for x in log.values())
    assert torch.isfinite(u.grad).all().item()
    assert v.grad is None


def _perm_strategy(max_len=7):
    # Distinct scores at least 0.1 apart (tenths in [-5, 5]): near-equal floats would make "strictly lower"
    # a question of rounding rather than of the loss.
    return st.integers(2, max_len).flatmap(
        lambda L: st.tuples(
            st.lists(st.integers(-50, 50), min_size=L, max_size=L, unique=True).map(lambda v: [x / 10 for x in v]),
            st.permutations(list(range(L))),
        )
    )


def _teacher_and_shuffled(values, perm):
    """Scores decreasing in teacher rank (item i has rank i + 1) and the same scores shuffled among items."""
    vals = sorted(values, reverse=True)
    teacher_order = torch.tensor([vals], dtype=torch.float64)
    shuffled = torch.tensor([[vals[p] for p in perm]], dtype=torch.float64)
    rank = torch.arange(1, len(vals) + 1).unsqueeze(0)
    return teacher_order, shuffled, rank


@SETTINGS
@given(_perm_strategy())
def test_teacher_order_minimises_pointwise_and_bpr(data):
    values, perm = data
    s0, s1, rank = _teacher_and_shuffled(values, perm)
    L = rank.shape[1]
    k = 2
    p0 = pointwise_topk_loss(s0, rank, None, k=k, a=1.0)
    p1 = pointwise_topk_loss(s1, rank, None, k=k, a=1.0)
    # The pointwise loss only sees (weight, class) per item: the shuffle matters when it moves a score across the
    # top-k boundary or between top-k items; shuffles among the negatives leave it unchanged.
    key = torch.clamp(rank[0], max=k + 1)
    if (key[list(perm)] != key).any():
        assert p0.item() < p1.item() - 1e-12
    else:
        assert p0.item() == pytest.approx(p1.item(), rel=1e-12, abs=1e-12)
    b0 = bpr_pairwise_loss(s0, rank, None, strategy="all")
    b1 = bpr_pairwise_loss(s1, rank, None, strategy="all")
    if list(perm) != list(range(L)):
        assert b0.item() < b1.item() - 1e-12
    else:
        assert b0.item() == pytest.approx(b1.item())


@SETTINGS
@given(_perm_strategy(), st.integers(0, 1))
def test_teacher_order_minimises_ndcg_losses(data, quantile_mode):
    values, perm = data
    s0, s1, rank = _teacher_and_shuffled(values, perm)
    if quantile_mode:
        rel = graded_relevance(teacher_logits=s0, mode="quantiles", n_levels=3)
    else:
        rel = graded_relevance(rank, buckets=((1, 3), (2, 2), (4, 1)))
    material = bool((rel[0, list(perm)] != rel[0]).any()) and bool(rel.sum() > 0)
    for fn in (lambda s: lambda_ndcg_loss(s, rel, None), lambda s: approx_ndcg_loss(s, rel, None)):
        l0, l1 = fn(s0).item(), fn(s1).item()
        if material:
            assert l0 < l1 - 1e-12
        else:
            assert l0 == pytest.approx(l1, rel=1e-9, abs=1e-12)


@SETTINGS
@given(_perm_strategy())
def test_teacher_order_minimises_listnet(data):
    values, perm = data
    s0, s1, _ = _teacher_and_shuffled(values, perm)
    teacher_logits = s0.clone()
    l0 = listnet_kl_loss(s0, teacher_logits, None, temperature=1.5).item()
    l1 = listnet_kl_loss(s1, teacher_logits, None, temperature=1.5).item()
    assert l0 == pytest.approx(0.0, abs=1e-12)  # KL of a distribution with itself
    if list(perm) != list(range(len(values))):
        assert l1 > 1e-12


def test_no_gradient_into_teacher_tensors():
    s = t([[0.5, -1.0, 2.0], [1.0, 0.0, 3.0]], grad=True)
    tl = t([[1.0, 0.0, -1.0], [0.3, 0.2, 0.1]], grad=True)
    m = mask_([[T, T, T], [T, T, F]])
    rel = graded_relevance(teacher_logits=tl, mask=m, mode="quantiles", n_levels=3)
    assert not rel.requires_grad
    losses = [
        listnet_kl_loss(s, tl, m),
        logit_mse(s, tl, m),
        hinton_kd_loss(s[0], tl[0]),
        confidence_ranking_loss(s[0], tl[0], t([1.0, 0.0, 1.0])),
        relative_confidence_ranking_loss(s[0], tl[0], t([1.0, 0.0, 1.0])),
        lambda_ndcg_loss(s, rel, m),
        approx_ndcg_loss(s, rel, m),
    ]
    sum(losses).backward()
    assert tl.grad is None
    assert s.grad is not None and s.grad.abs().sum().item() > 0
