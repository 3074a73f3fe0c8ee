"""The replay's choice of requests and its means: the logged sample and the random-exposure slice, hand-worked."""

import math

import numpy as np
import pandas as pd
import pytest

from cascade.data.requests import Requests
from cascade.pipeline.replay import paired_comparisons, replayed_requests
from cascade.serve.replay import ReplayInputs, ranking_quality


def _frames(n: int, rand_at: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame({"request_id": np.arange(100, 100 + n), "time_ms": np.arange(n) * 1000})
    test = pd.DataFrame({"request_id": np.repeat(frame.request_id, 2), "is_rand": 0})
    test.loc[test.request_id.isin(100 + np.array(rand_at)), "is_rand"] = 1
    return frame, test


@pytest.mark.parametrize("max_rand, rows, in_sample", [
    # the spread of 4 over 10 is rows 0, 3, 6, 9; the random requests are rows 1, 6, 8 (6 already in the spread)
    (None, [0, 1, 3, 6, 8, 9], [1, 0, 1, 1, 0, 1]),
    (0, [0, 3, 6, 9], [1, 1, 1, 1]),
    (2, [0, 1, 3, 6, 8, 9], [1, 0, 1, 1, 0, 1]),  # an even spread of 2 of the 3 random ones: rows 1 and 8
    (1, [0, 1, 3, 6, 9], [1, 0, 1, 1, 1]),  # one: the first (linspace(0, 2, 1) = [0])
])
def test_the_random_slice_is_replayed_beside_the_even_spread(max_rand, rows, in_sample):
    frame, test = _frames(10, [1, 6, 8])
    out, sample = replayed_requests(frame, test, 4, max_rand)
    assert out.request_id.tolist() == [100 + r for r in rows]
    assert sample.tolist() == [bool(x) for x in in_sample]
    assert out.time_ms.is_monotonic_increasing


def test_data_without_a_random_slice_replays_the_spread_only():
    frame, test = _frames(5, [])
    out, sample = replayed_requests(frame, test, 3, 1000)
    assert out.request_id.tolist() == [100, 102, 104] and sample.all()


def test_extra_random_requests_count_in_the_random_slice_only():
    # three requests: 0 logged (2 clicks, one kept), 1 random and in the sample (1 click, kept), 2 random and
    # replayed only for the slice (1 click, missed)
    req = Requests(np.array([1, 2, 3]), np.array([10, 20, 30]))
    clicked = np.array([[5, 6], [7, -1], [8, -1]])
    top = np.tile(np.arange(10), (3, 1))
    ranking = np.array([[5, 1], [7, 1], [1, 2]])
    inp = ReplayInputs(req, clicked, top, np.ones_like(top, float), np.array([False, True, True]), 100,
                       in_sample=np.array([True, True, False]))
    rows, q = ranking_quality(ranking, inp, {"retrieval": 2, "prerank": 2, "rank": 2}, 2)
    assert rows.rank_click_recall.tolist() == [0.5, 1.0, 0.0] and rows.in_sample.tolist() == [True, True, False]
    assert q["rank_click_recall"] == pytest.approx((0.5 + 1.0) / 2)  # requests 0 and 1
    assert q["rank_click_recall_rand"] == pytest.approx((1.0 + 0.0) / 2)  # requests 1 and 2
    assert q["n_requests"] == 2 and q["n_rand_requests"] == 2 and q["final_distinct"] == 3  # items 5, 1, 7
    with pytest.raises(ValueError, match="every request outside it a random-exposure one"):
        ReplayInputs(req, clicked, top, np.ones_like(top, float), np.array([False, False, True]), 100,
                     in_sample=np.array([False, True, True]))
    # data without a random slice (MovieLens): every request is in the sample
    plain = ReplayInputs(req, clicked, top, np.ones_like(top, float), None, 100, in_sample=np.ones(3, bool))
    _, q = ranking_quality(ranking, plain, {"retrieval": 2, "prerank": 2, "rank": 2}, 2)
    assert q["rank_click_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3) and "n_rand_requests" not in q
    with pytest.raises(ValueError, match="every request outside it a random-exposure one"):
        ReplayInputs(req, clicked, top, np.ones_like(top, float), None, 100, in_sample=np.array([True, False, True]))


def test_paired_comparisons_take_the_logged_requests_with_clicks_of_both_lists():
    # three logged requests and one random-only request (left out); request 2 has no clicks (nan in both)
    a = pd.DataFrame({"rank_click_recall": [1.0, 0.5, np.nan, 1.0]})
    b = pd.DataFrame({"rank_click_recall": [0.0, 0.5, np.nan, 0.0]})
    out = paired_comparisons({"distilled": a, "popular (7 days)": b}, ["distilled"],
                             np.array([True, True, True, False]))
    gap = out["distilled"]["popular (7 days)"]["rank_click_recall"]
    # differences 1.0 and 0.0: mean 0.5, std(ddof=1) = sqrt(0.5), SE = sqrt(0.5) / sqrt(2) = 0.5
    assert gap == {"diff": 0.5, "se": pytest.approx(0.5), "n": 2}
    assert "oracle_ratio" not in out["distilled"]["popular (7 days)"] and list(out) == ["distilled"]


def test_the_random_slice_expected_click_recall_pools_the_oracle_clicks():
    # two random requests (rows 1, 2) and one logged: expected clicks of the final lists 0.9, 0.3, 0.6 (oracle_prob
    # reads the item id / 10); corpus masses 30 and 10 on the random ones -> (0.3 + 0.6) / 40
    req = Requests(np.array([1, 2, 3]), np.array([10, 20, 30]))
    clicked = np.array([[5, -1], [7, -1], [8, -1]])
    top = np.tile(np.arange(10), (3, 1))
    ranking = np.array([[5, 4], [1, 2], [2, 4]])
    mass = np.array([np.nan, 30.0, 10.0])

    def prob(_requests, items):
        return items / 10.0

    inp = ReplayInputs(req, clicked, top, np.ones_like(top, float), np.array([False, True, True]), 100,
                       oracle_prob=prob, oracle_best=np.ones(3), oracle_mass=mass)
    rows, q = ranking_quality(ranking, inp, {"retrieval": 2, "prerank": 2, "rank": 2}, 2)
    assert rows.oracle_clicks.tolist() == pytest.approx([0.9, 0.3, 0.6])
    assert q["expected_click_recall_rand"] == pytest.approx(0.9 / 40)
    other = ranking_quality(np.array([[5, 4], [3, 2], [1, 4]]), inp, {"retrieval": 2, "prerank": 2, "rank": 2}, 2)[0]
    # paired over the random requests: z = (0.3 - 0.5, 0.6 - 0.5); D = -0.1 / 40; the ratio SE of those two rows
    out = paired_comparisons({"distilled": rows, "als": other}, ["distilled"], np.array([True, False, False]),
                             np.array([False, True, True]), mass)
    gap = out["distilled"]["als"]["expected_click_recall_rand"]
    d = -0.1 / 40
    se = math.sqrt(2 * ((-0.2 - d * 30) ** 2 + (0.1 - d * 10) ** 2)) / 40
    assert gap == {"diff": pytest.approx(d), "se": pytest.approx(se), "n": 2}
    # without the corpus mass (or without a random slice) there is no such gap
    assert "expected_click_recall_rand" not in paired_comparisons(
        {"distilled": rows, "als": other}, ["distilled"], np.array([True, False, False]))["distilled"]["als"]
    with pytest.raises(ValueError, match="oracle_mass"):
        ReplayInputs(req, clicked, top, np.ones_like(top, float), np.array([False, True, True]), 100,
                     oracle_prob=prob, oracle_mass=np.array([np.nan, np.nan, 1.0]))


def test_a_baselines_name_says_the_setting_chosen_for_it():
    from cascade.pipeline.replay import baseline_name

    assert baseline_name("popular", {"window_days": 1.0}) == "popular (1 day)"
    assert baseline_name("popular", {"window_days": 7.0}) == "popular (7 days)"
    assert baseline_name("popular_ease", {"window_days": 30.0, "lam": 50.0, "ease_weight": 0.25}) == \
        "popular + EASE (30 days, lambda 50, b 0.25)"
    assert baseline_name("als", {"factors": 32}) == "als (32 factors)"
