"""benchmarks/real_data.py --origins: one seed's test periods pooled into one measure (hand-worked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_data", ROOT / "benchmarks" / "real_data.py")
real_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_data)


def _period(n: int, nc: int, recall: float, agree: float, gaps: np.ndarray, auc: float) -> dict:
    """A measure() of one test period: n requests, nc with clicks, the paired gaps of its nc requests."""
    gap = {"diff": float(gaps.mean()), "se": float(gaps.std(ddof=1) / np.sqrt(len(gaps))), "n": len(gaps)}
    return {"rows": {"distilled": {"rank_click_recall": recall, "rank_teacher_recall": agree}},
            "paired": {"baseline: popular": {"rank_click_recall": gap}},
            "rank_student_auc": {"plain": auc, "served": auc + 0.01}, "teacher_test_auc": auc,
            "chosen_scales": {"retrieval": 0.5}, "baseline_settings": {"popular": "popular (7 days)"},
            "n_requests": n, "n_requests_with_clicks": nc, "k": 10, "wall_s": 60.0,
            "test_period": {"drop_last_days": 0}}


def test_pool_weights_by_requests_and_pools_the_paired_gaps():
    rng = np.random.default_rng(0)
    ga, gb = rng.normal(0.05, 0.1, 8), rng.normal(-0.01, 0.05, 24)
    a, b = _period(10, 8, 0.2, 0.9, ga, 0.70), _period(30, 24, 0.1, 0.5, gb, 0.74)
    p = real_data.pool([a, b])
    # clicks' columns by requests with clicks: (8 x 0.2 + 24 x 0.1) / 32; agreement by requests: (9 + 15) / 40
    assert p["rows"]["distilled"]["rank_click_recall"] == pytest.approx(0.125)
    assert p["rows"]["distilled"]["rank_teacher_recall"] == pytest.approx(0.6)
    assert p["teacher_test_auc"] == pytest.approx((10 * 0.70 + 30 * 0.74) / 40)
    gap = p["paired"]["baseline: popular"]["rank_click_recall"]
    # the pooled gap is the mean over all 32 requests; its SE the stratified one, sqrt(sum n_j s_j^2) / N
    assert gap["diff"] == pytest.approx(np.concatenate([ga, gb]).mean())
    assert gap["se"] == pytest.approx(np.sqrt(8 * ga.var(ddof=1) + 24 * gb.var(ddof=1)) / 32)
    assert gap["n"] == 32 and p["n_requests"] == 40 and p["n_requests_with_clicks"] == 32
    assert p["chosen_scales"] == a["chosen_scales"] and p["periods"] == [a, b] and p["wall_s"] == 120.0
    assert real_data.pool([a]) is a
    # random-exposure requests add up over the periods; a period without a random slice (None) leaves no count
    assert p["n_rand_requests"] is None
    a["n_rand_requests"], b["n_rand_requests"] = 3, 5
    assert real_data.pool([a, b])["n_rand_requests"] == 8


def test_a_list_one_period_lacks_gets_no_pooled_gap():
    a = _period(10, 8, 0.2, 0.9, np.arange(8.0), 0.7)
    b = _period(10, 8, 0.2, 0.9, np.arange(8.0), 0.7)
    b["paired"] = {}
    b["rows"]["baseline: itemcf"] = {"rank_click_recall": 0.3}
    p = real_data.pool([a, b])
    assert p["paired"]["baseline: popular"] == {}
    assert p["rows"]["baseline: itemcf"]["rank_click_recall"] == pytest.approx(0.3)  # from the period that has it
