"""Tests for cascade.eval.metrics: scikit-learn references and hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from cascade.eval.metrics import (
    auc,
    calibration,
    click_ndcg,
    click_recall,
    gauc,
    hit_rate,
    latency_summary,
    list_diversity,
    logloss,
    ndcg_at_k,
    paired_difference,
    paired_ratio_difference,
    pooled_difference,
    recall_at_k,
)

# ----------------------------------------------------------------------------------------------------------------
# AUC / GAUC


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=60),
    st.sampled_from([1.0, 0.1, 1e-3]),
)
def test_auc_equals_sklearn_with_ties(pairs, scale):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], dtype=float) * scale  # few distinct values: many ties
    if y.min() == y.max():
        assert math.isnan(auc(y, s))
        return
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_worked_and_errors():
    # positives score 0.8, 0.5; negatives 0.5, 0.1. Pairs (pos, neg): (0.8,0.5) 1, (0.8,0.1) 1, (0.5,0.5) 1/2,
    # (0.5,0.1) 1 -> 3.5 / 4 = 0.875
    assert auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="binary labels"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="shape"):
        auc([0, 1], [0.1, 0.2, 0.3])


def _gauc_reference(y, s, g, weighted):
    values, weights = [], []
    for key in np.unique(g):
        m = g == key
        if y[m].min() != y[m].max():
            values.append(roc_auc_score(y[m], s[m]))
            weights.append(m.sum() if weighted else 1)
    return float(np.average(values, weights=weights))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [True, False])
def test_gauc_equals_per_group_sklearn_loop(seed, weighted):
    rng = np.random.default_rng(seed)
    n = 400
    g = rng.integers(0, 40, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.5 * y, 1)  # rounding makes ties inside groups
    got = gauc(y, s, g, weighted=weighted)
    assert got == pytest.approx(_gauc_reference(y, s, g, weighted), abs=1e-12)
    # the group keys may be strings; shuffling the rows changes nothing
    perm = rng.permutation(n)
    g_str = np.array([f"user{v}" for v in g])
    assert gauc(y[perm], s[perm], g_str[perm], weighted=weighted) == pytest.approx(got, abs=1e-12)


def test_gauc_hand_worked():
    # group a: y 1,0 with scores 0.9, 0.1 -> AUC 1, size 2; group b: y 1,0,0 with 0.2, 0.5, 0.1 -> AUC 1/2, size 3;
    # group c has one class only (excluded). weighted: (1*2 + 0.5*3) / 5 = 0.7; unweighted (1 + 0.5) / 2 = 0.75
    y = [1, 0, 1, 0, 0, 1, 1]
    s = [0.9, 0.1, 0.2, 0.5, 0.1, 0.3, 0.4]
    g = ["a", "a", "b", "b", "b", "c", "c"]
    assert gauc(y, s, g) == pytest.approx(0.7)
    assert gauc(y, s, g, weighted=False) == pytest.approx(0.75)
    assert math.isnan(gauc([1, 0], [0.1, 0.2], [1, 2]))


# ----------------------------------------------------------------------------------------------------------------
# logloss / calibration


def test_logloss_equals_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = rng.uniform(0.01, 0.99, 500)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
    # clipping: p = 0 on a positive costs -log(eps), not inf
    assert logloss([1], [0.0], eps=1e-7) == pytest.approx(-math.log(1e-7))
    with pytest.raises(ValueError, match="probabilities"):
        logloss([1, 0], [0.5, 1.5])


def test_calibration_hand_worked():
    # mean p = (0.2 + 0.4 + 0.6 + 0.8) / 4 = 0.5; mean y = 1/4 -> 2.0 (over-predicting twice)
    assert calibration([1, 0, 0, 0], [0.2, 0.4, 0.6, 0.8]) == pytest.approx(2.0)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


# ----------------------------------------------------------------------------------------------------------------
# recall / NDCG / latency


def test_recall_at_k_hand_worked():
    reference = np.array([[1, 2, 3], [4, -1, -1], [-1, -1, -1], [5, 6, 7]])
    retrieved = np.array([[3, 9, 1, 7], [5, 6, -1, 4], [1, 2, 3, 4], [-1, -1, 8, 9]])
    # row 0: {1, 3} of {1, 2, 3} -> 2/3; row 1: {4} of {4} -> 1; row 2: no reference -> nan;
    # row 3: nothing found (padding never matches) -> 0
    got = recall_at_k(reference, retrieved)
    np.testing.assert_allclose(got[[0, 1, 3]], [2 / 3, 1.0, 0.0])
    assert math.isnan(got[2])
    # a reference padded with -1 must not match a retrieved -1
    assert recall_at_k(np.array([[-1, 5]]), np.array([[-1, 6]]))[0] == 0.0


def test_recall_bounds_and_monotone_in_depth():
    rng = np.random.default_rng(0)
    B, K, N = 20, 10, 50
    reference = np.stack([rng.choice(100, K, replace=False) for _ in range(B)])
    retrieved = np.stack([rng.choice(100, N, replace=False) for _ in range(B)])
    prev = np.zeros(B)
    for depth in range(0, N + 1, 5):
        r = recall_at_k(reference, retrieved[:, :depth])
        assert ((r >= 0) & (r <= 1)).all()
        assert (r >= prev).all()  # a deeper retrieved list can only find more
        prev = r
    # against a plain set computation on every row
    expected = [len(set(a) & set(b)) / K for a, b in zip(reference, retrieved)]
    np.testing.assert_allclose(prev, expected)


def test_click_recall_hand_worked():
    clicked = np.array([[10, 11, -1], [-1, -1, -1], [12, -1, -1]])
    retrieved = np.array([[11, 12, 13], [10, 11, 12], [12, 12, 1]])
    # row 0: 11 of {10, 11} -> 1/2; row 1 has no click -> nan; row 2: 12 (retrieved twice, counted once) -> 1
    got = click_recall(clicked, retrieved)
    assert got[0] == pytest.approx(0.5) and math.isnan(got[1]) and got[2] == pytest.approx(1.0)


def test_ndcg_at_k_hand_worked():
    ranked = np.array([[10, 11, 12], [5, 6, 7], [1, 2, 3], [9, 8, -1]])
    rel_ids = np.array([[12, 10, -1], [1, 2, 3], [1, 2, 3], [8, 9, 7]])
    grades = np.array([[1, 2, 9], [1, 1, 1], [0, 0, 0], [1, 3, 2]], dtype=float)
    got = ndcg_at_k(ranked, rel_ids, grades, k=2)
    # row 0: ranked 10 (grade 2, gain 3), 11 (absent, gain 0): DCG = 3/log2(2) = 3.
    #        ideal gains 3, 1 (the 9 sits on a padded id): 3 + 1/log2(3) = 3.630930 -> 0.826235
    # row 1: none of 5, 6 is relevant -> 0
    # row 2: ideal DCG 0 -> nan
    # row 3: ranked 9 (grade 3, gain 7), 8 (grade 1, gain 1): 7 + 1/log2 3 = 7.630930;
    #        ideal gains 7, 3: 7 + 3/log2 3 = 8.892789 -> 0.858102
    assert got[0] == pytest.approx(3 / (3 + 1 / math.log2(3)), rel=1e-12)
    assert got[0] == pytest.approx(0.826235, abs=1e-6)
    assert got[1] == 0.0
    assert math.isnan(got[2])
    assert got[3] == pytest.approx((7 + 1 / math.log2(3)) / (7 + 3 / math.log2(3)), rel=1e-12)
    # the ideal order itself scores 1
    assert ndcg_at_k(np.array([[9, 7, 8]]), rel_ids[3:], grades[3:], k=3)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="duplicated id in row 1"):
        ndcg_at_k(ranked[:2], np.array([[1, 2, 3], [4, 4, 5]]), grades[:2], k=2)


def test_latency_summary_hand_worked():
    # 1, 2, 3, 4 ms: numpy's linear percentile: p50 = 2.5, p95 = 1 + 0.95*3 = 3.85, p99 = 3.97; mean 2.5
    out = latency_summary(np.array([0.001, 0.002, 0.003, 0.004]))
    assert out["p50_ms"] == pytest.approx(2.5)
    assert out["p95_ms"] == pytest.approx(3.85)
    assert out["p99_ms"] == pytest.approx(3.97)
    assert out["mean_ms"] == pytest.approx(2.5)
    assert out["n"] == 4
    with pytest.raises(ValueError, match="at least one"):
        latency_summary([])


# ---------------------------------------------------------------------------------------------------------- outcomes


def test_hit_rate_and_click_ndcg_hand_worked():
    clicked = np.array([[7, 9, -1], [3, -1, -1], [-1, -1, -1]])
    ranked = np.array([[9, 1, 7, 2], [4, 5, 6, 8], [1, 2, 3, 4]])
    np.testing.assert_array_equal(hit_rate(clicked, ranked), [1.0, 0.0, np.nan])
    # row 0: clicks 9 (rank 1) and 7 (rank 3); DCG@4 = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3)
    expected0 = 1.5 / (1 + 1 / math.log2(3))
    got = click_ndcg(ranked, clicked, k=4)
    assert got[0] == pytest.approx(expected0)
    assert got[1] == 0.0 and math.isnan(got[2])
    # k = 1: only the first slot counts; the ideal puts one click there
    np.testing.assert_allclose(click_ndcg(ranked, clicked, k=1)[:2], [1.0, 0.0])


def test_click_ndcg_counts_a_repeated_click_once():
    clicked = np.array([[5, 5, 6]])
    ranked = np.array([[6, 5]])
    assert click_ndcg(ranked, clicked, k=2)[0] == pytest.approx(1.0)


def test_list_diversity_hand_worked():
    lists = np.array([[1, 2, 3], [1, 2, 4], [1, 5, -1]])
    d = list_diversity(lists, n_items=10, top=2)
    # ids 1,2,3,4,5: 5 distinct of 10; the two most frequent (1: 3 times, 2: twice) fill 5 of 8 slots
    assert d == {"distinct": 5, "coverage": 0.5, "top_share": 5 / 8}
    assert list_diversity(np.array([[7, 8]] * 4), n_items=100, top=2)["top_share"] == 1.0


def test_paired_difference_hand_worked_and_against_scipy():
    # rows 0..3: differences 0.2, -0.1, 0.5 (row 3 nan in b: left out); mean 0.2, std(ddof=1) 0.3, SE 0.3 / sqrt(3)
    out = paired_difference([0.5, 0.1, 1.0, 0.3], [0.3, 0.2, 0.5, np.nan])
    assert out["n"] == 3 and out["diff"] == pytest.approx(0.2) and out["se"] == pytest.approx(0.3 / math.sqrt(3))
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    from scipy import stats
    t = stats.ttest_rel(a, b)  # the paired t statistic is diff / SE
    got = paired_difference(a, b)
    assert got["diff"] / got["se"] == pytest.approx(t.statistic)
    assert paired_difference([1.0], [0.0])["n"] == 1 and math.isnan(paired_difference([1.0], [0.0])["se"])
    assert paired_difference([np.nan], [0.0])["n"] == 0
    with pytest.raises(ValueError, match="rows"):
        paired_difference([1.0, 2.0], [1.0])


def test_paired_ratio_difference_hand_worked_and_against_the_bootstrap():
    # z = a - b = 1, 1, 2; sum(m) = 40: D = 4 / 40 = 0.1; z - D m = 0, -1, 1; SE = sqrt(3/2 * 2) / 40
    out = paired_ratio_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [10.0, 20.0, 10.0])
    assert out["n"] == 3 and out["diff"] == pytest.approx(6 / 40 - 2 / 40)
    assert out["se"] == pytest.approx(math.sqrt(3.0) / 40)
    # a row with a nan is left out; one row: no SE
    assert paired_ratio_difference([1.0, np.nan], [0.0, 0.0], [4.0, 1.0])["n"] == 1
    assert math.isnan(paired_ratio_difference([1.0, np.nan], [0.0, 0.0], [4.0, 1.0])["se"])
    with pytest.raises(ValueError, match="rows"):
        paired_ratio_difference([1.0, 2.0], [1.0, 2.0], [1.0])
    # the delta-method SE against the bootstrap over rows (400 rows, 4,000 resamples): within 10%
    rng = np.random.default_rng(0)
    m = rng.gamma(2.0, 50.0, 400)
    a = m * rng.uniform(0.002, 0.004, 400)
    b = a - m * rng.normal(1e-4, 1e-4, 400)
    got = paired_ratio_difference(a, b, m)
    idx = rng.integers(0, 400, (4000, 400))
    boot = (a[idx] - b[idx]).sum(1) / m[idx].sum(1)
    assert got["se"] == pytest.approx(boot.std(), rel=0.1)


def test_pooled_difference_is_the_mean_over_the_union_with_the_stratified_se():
    # two disjoint sets: differences [0.2, -0.1, 0.5] (mean 0.2, s 0.3) and [0.0, 0.4] (mean 0.2, s^2 0.08)
    a = paired_difference([0.5, 0.1, 1.0], [0.3, 0.2, 0.5])
    b = paired_difference([0.0, 0.4], [0.0, 0.0])
    got = pooled_difference([a, b])
    assert got["n"] == 5 and got["diff"] == pytest.approx(1.0 / 5)
    assert got["se"] == pytest.approx(math.sqrt(3 * 0.09 + 2 * 0.08) / 5)
    assert pooled_difference([a]) == pytest.approx(a)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_row_mean_averages_the_defined_rows_and_is_nan_without_a_warning_where_none_is():
    from cascade.eval.metrics import row_mean

    assert row_mean([0.5, math.nan, 0.25]) == 0.375
    assert math.isnan(row_mean([math.nan, math.nan])) and math.isnan(row_mean([]))
    clicked = np.array([[3, -1], [-1, -1]])  # the second row has no click: nan, left out
    assert row_mean(click_recall(clicked, np.array([[3, 4], [1, 2]]))) == 1.0
