"""EventHistory: strictly-before queries, hand-worked on a few events, and ids beyond 32 bits."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.arrays import PAD, distinct, first_occurrence_columns, first_occurrences
from cascade.data.history import EventHistory

BIG = 2**40  # ids that do not fit 32 bits

#            user     item     time  click
EVENTS = [(1,       10,      100,  1),
          (1,       11,      200,  0),
          (1,       10,      300,  1),
          (1,       12,      400,  1),
          (BIG + 1, BIG + 7, 150,  1),
          (BIG + 1, 10,      250,  1),
          (2,       11,      400,  1)]


@pytest.fixture
def hist() -> EventHistory:
    u, i, t, c = (np.array(x, np.int64) for x in zip(*EVENTS))
    return EventHistory(u, i, t, c)


def test_recent_is_strictly_before_most_recent_first_and_distinct(hist):
    items, times = hist.recent(np.array([1, 1, 1, BIG + 1, 3]), np.array([400, 401, 100, 1000, 500]), n=3)
    # user 1 at t=400: clicks before 400 are 10 (t=300, latest) and 10 (t=100, a repeat); 11 was not clicked
    np.testing.assert_array_equal(items[0], [10, PAD, PAD])
    assert times[0, 0] == 300
    np.testing.assert_array_equal(items[1], [12, 10, PAD])  # t=401 sees the click at 400
    np.testing.assert_array_equal(items[2], [PAD, PAD, PAD])  # nothing strictly before 100
    np.testing.assert_array_equal(items[3], [10, BIG + 7, PAD])
    np.testing.assert_array_equal(items[4], [PAD, PAD, PAD])  # unknown user
    shown, _ = hist.recent(np.array([1]), np.array([401]), n=3, clicks_only=False)
    np.testing.assert_array_equal(shown[0], [12, 10, 11])


def test_seen_uses_the_first_time_a_pair_occurred(hist):
    cands = np.array([[10, 11, 12, BIG + 7], [10, 11, 12, BIG + 7], [BIG + 7, 10, 11, PAD]])
    got = hist.seen(np.array([1, 1, BIG + 1]), cands, np.array([150, 401, 200]))
    np.testing.assert_array_equal(got, [[True, False, False, False],
                                        [True, True, True, False],
                                        [True, False, False, False]])


def test_item_counts_over_a_window(hist):
    c = hist.item_counts(401, window_ms=200)  # events in [201, 401)
    by_id = dict(zip(hist.items.sorted_ids.tolist(), c.tolist()))
    assert by_id == {10: 2.0, 11: 1.0, 12: 1.0, BIG + 7: 0.0}  # 11 at t=200 is out; (2, 11) at 400 is a click
    allc = hist.item_counts(401, None, clicks_only=False)
    assert dict(zip(hist.items.sorted_ids.tolist(), allc.tolist())) == {10: 3.0, 11: 2.0, 12: 1.0, BIG + 7: 1.0}


def test_clicked_items_are_the_nonzero_click_counts(hist):
    for t, window in ((401, 200), (401, None), (150, 100), (0, None)):
        codes, counts = hist.clicked_items(t, window)
        full = hist.item_counts(t, window)
        np.testing.assert_array_equal(codes, np.flatnonzero(full))
        np.testing.assert_array_equal(counts, full[codes])


def test_repeat_share(hist):
    # clicks in [0, 1000): (1,10,100) new, (1,10,300) repeat, (1,12,400) new, (BIG+1,BIG+7) new, (BIG+1,10) new,
    # (2,11,400) new -> 1 of 6
    assert hist.repeat_share(0, 1000) == pytest.approx(1 / 6)
    assert np.isnan(hist.repeat_share(5000, 6000))


def test_first_occurrences_keeps_order_and_drops_pad():
    x = np.array([[3, 1, 3, -1, 2, 1], [-1, -1, -1, -1, -1, -1]])
    vals, n = first_occurrences(x, 2)
    np.testing.assert_array_equal(vals, [[3, 1], [-1, -1]])
    np.testing.assert_array_equal(n, [2, 0])
    np.testing.assert_array_equal(first_occurrence_columns(x, 4), [[0, 1, 4, -1], [-1, -1, -1, -1]])


def test_distinct_is_np_uniques_values():
    np.testing.assert_array_equal(distinct(np.array([5, -1, 3, 5, 5, 0, -1])), [-1, 0, 3, 5])
    rng = np.random.default_rng(0)
    for n, hi in ((0, 5), (1, 5), (2, 1), (1000, 50), (1000, 10**9)):
        x = rng.integers(-3, hi, n)
        got = distinct(x)
        np.testing.assert_array_equal(got, np.unique(x))
        assert got.dtype == x.dtype
