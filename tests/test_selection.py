"""The one-standard-error rule of grid choices: hand-worked cases, its SE against the analytic paired SE."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cascade.eval.selection import one_se_choice, rows_of_units, unit_ranges, widen_top


def test_rows_of_units_and_unit_ranges_hand_worked():
    unit_of_row = np.array([7, 3, 7, 5, 3, 7])  # unit 3: rows 1, 4; unit 5: row 3; unit 7: rows 0, 2, 5
    order, starts, lengths = unit_ranges(unit_of_row)
    assert order.tolist() == [1, 4, 3, 0, 2, 5] and starts.tolist() == [0, 2, 3] and lengths.tolist() == [2, 1, 3]
    # units 2 (= id 7), 0 (= 3), 2 again
    assert order[rows_of_units(starts, lengths, np.array([2, 0, 2]))].tolist() == [0, 2, 5, 1, 4, 0, 2, 5]


def _means(per_unit: dict[float, np.ndarray]):
    return lambda v, units: float(per_unit[v][units].mean())


def test_a_gain_inside_the_noise_chooses_the_simplest_setting():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    # scale 1 beats scale 0 by 0.01 on average with per-request noise of sd 0.3: SE ~ 0.015 > 0.01
    per_unit = {0.0: base, 1.0: base + 0.01 + 0.3 * rng.standard_normal(400)}
    chosen, rows = one_se_choice([1.0, 0.0], _means(per_unit), 400)
    d = per_unit[1.0] - per_unit[0.0]
    assert rows[1]["score"] > rows[0]["score"] and chosen == 0.0
    # the bootstrapped SE of the paired gap agrees with the analytic one within 15%
    assert rows[0]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(400), rel=0.15)
    assert rows[0]["gap"] == pytest.approx(d.mean()) and rows[0]["gap"] <= rows[0]["se"]


def test_a_gain_beyond_the_noise_chooses_the_best_and_ties_go_to_the_smaller_value():
    rng = np.random.default_rng(1)
    base = rng.random(400)
    per_unit = {0.0: base, 0.5: base + 0.2 + 0.05 * rng.standard_normal(400)}
    per_unit[2.0] = per_unit[0.5].copy()  # exactly equal to 0.5: within one SE (gap 0)
    chosen, rows = one_se_choice([0.0, 0.5, 2.0], _means(per_unit), 400)
    assert chosen == 0.5 and [r["within_one_se"] for r in rows] == [False, True, True]


def test_prefer_takes_the_setting_closest_to_the_reference_among_those_within_one_se():
    rng = np.random.default_rng(3)
    base = rng.random(400)
    best = base + 0.3 * rng.standard_normal(400)

    def behind(gap):  # per-request noise of sd 0.3 (SE of a paired gap ~0.02), mean exactly ``gap`` below the best
        e = 0.3 * rng.standard_normal(400)
        return best + e - e.mean() - gap

    per_unit = {0.0: best - 0.3, 0.25: best, 1.0: behind(0.004), 4.0: behind(0.002)}
    chosen, rows = one_se_choice(list(per_unit), _means(per_unit), 400)
    assert [r["within_one_se"] for r in rows] == [False, True, True, True] and chosen == 0.25
    assert one_se_choice(list(per_unit), _means(per_unit), 400, prefer=1.0)[0] == 1.0
    assert one_se_choice(list(per_unit), _means(per_unit), 400, prefer=10.0)[0] == 4.0
    # 0 is far beyond one SE: never chosen, however close the reference
    assert one_se_choice(list(per_unit), _means(per_unit), 400, prefer=0.0)[0] == 0.25
    # equally close to the reference: the smaller
    assert one_se_choice([0.5, 1.5], _means({0.5: base, 1.5: base.copy()}), 400, prefer=1.0)[0] == 0.5


def test_auc_grouped_by_request_through_the_rule():
    """A statistic over rows grouped by request: the full-sample score is scikit-learn's AUC."""
    rng = np.random.default_rng(2)
    req = np.repeat(np.arange(300), 8)
    y = (rng.random(len(req)) < 0.3).astype(int)
    scores = {0.0: y + rng.standard_normal(len(req)), 1.0: y + 3 * rng.standard_normal(len(req))}
    order, starts, lengths = unit_ranges(req)

    def auc_of(v, units):
        rows = order[rows_of_units(starts, lengths, units)]
        return roc_auc_score(y[rows], scores[v][rows])

    chosen, rows = one_se_choice([0.0, 1.0], auc_of, len(starts), n_boot=100)
    assert rows[0]["score"] == pytest.approx(roc_auc_score(y, scores[0.0]))
    assert chosen == 0.0 and rows[1]["gap"] > 3 * rows[1]["se"]  # the noisier score loses far beyond its SE


def test_an_empty_grid_is_an_error():
    with pytest.raises(ValueError, match="empty grid"):
        one_se_choice([], lambda v, u: 0.0, 3)


def test_widen_top_doubles_the_largest_value_only_while_it_scores_best():
    """A score that peaks at 6: the grid (0, 1, 2) is widened to 4 and 8, and stops once 8 scores below 4."""
    peak = lambda v: -abs(v - 6.0)  # noqa: E731
    calls = []

    def evaluate(v):
        calls.append(v)
        return peak(v)

    tried = widen_top({v: peak(v) for v in (0.0, 1.0, 2.0)}, evaluate, lambda r: r, doublings=5)
    assert sorted(tried) == [0.0, 1.0, 2.0, 4.0, 8.0] and calls == [4.0, 8.0]
    # at most `doublings` times; none when the best is inside the grid, at 0, or tied with a smaller value
    assert sorted(widen_top({v: peak(v) for v in (0.0, 1.0, 2.0)}, peak, lambda r: r, 1)) == [0.0, 1.0, 2.0, 4.0]
    assert sorted(widen_top({v: peak(v) for v in (0.0, 4.0, 16.0)}, peak, lambda r: r, 3)) == [0.0, 4.0, 16.0]
    assert sorted(widen_top({0.0: 1.0}, peak, lambda r: r, 3)) == [0.0]
    assert sorted(widen_top({0.0: 1.0, 1.0: 1.0}, peak, lambda r: r, 3)) == [0.0, 1.0]
    assert sorted(widen_top({0.0: 0.5, 1.0: float("nan")}, peak, lambda r: r, 3)) == [0.0, 1.0]  # nan: no score
