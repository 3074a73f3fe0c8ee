"""The validation judge: which requests and clicks every choice is made on (hand-checked against the split)."""

import numpy as np

from cascade.arrays import PAD
from cascade.pipeline.judge import validation_judge


def test_judge_is_logged_traffic_with_clicks_not_only_the_random_slice(tiny_data):
    valid = tiny_data.split_impressions("valid")
    with_click = valid.groupby("request_id").click.max()
    with_click = set(with_click.index[with_click == 1])
    judge = validation_judge(tiny_data, max_requests=10**9, seed=0)
    got = judge.requests.request_id.tolist()
    assert set(got) == with_click  # every validation request with a click, and only those
    rand = valid.groupby("request_id").is_rand.max()
    assert rand.loc[list(with_click)].min() == 0  # logged (not random-exposure) requests are judged
    assert "logged traffic" in judge.what
    # the clicked items of each judged request, exactly those of the split (PAD-padded rows)
    clicks = valid[valid.click == 1].groupby("request_id").item_id.apply(set)
    for r, rid in enumerate(got):
        row = judge.clicked[r]
        assert set(row[row != PAD].tolist()) == clicks.loc[rid]


def test_judge_sample_is_seeded_and_in_time_order(tiny_data):
    full = validation_judge(tiny_data, max_requests=10**9, seed=0)
    m = len(full.requests) // 2
    a, b = (validation_judge(tiny_data, max_requests=m, seed=s) for s in (3, 3))
    c = validation_judge(tiny_data, max_requests=m, seed=4)
    assert len(a.requests) == m
    assert a.requests.request_id.tolist() == b.requests.request_id.tolist()
    assert a.requests.request_id.tolist() != c.requests.request_id.tolist()
    assert np.all(np.diff(a.requests.time_ms) >= 0)
    assert set(a.requests.request_id.tolist()) <= set(full.requests.request_id.tolist())
