"""Retrieval channels and their merger: hand-worked lists, no leakage from later events, quotas and origins."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.arrays import PAD
from cascade.channels import (
    CHANNELS,
    ALSChannel,
    ContentChannel,
    ItemCFChannel,
    MergedRetriever,
    PopularChannel,
    RecentChannel,
)
from cascade.data.history import EventHistory
from cascade.data.requests import Requests

DAY = 86_400_000


def _hist(rows):
    u, i, t, c = (np.array(x, np.int64) for x in zip(*rows))
    return EventHistory(u, i, t, c)


def _req(users, times):
    return Requests(np.array(users, np.int64), np.array(times, np.int64))


def test_popular_counts_clicks_in_the_trailing_window_as_of_the_refresh():
    h = _hist([(1, 10, 1 * DAY, 1), (2, 10, 1 * DAY, 1), (3, 11, 2 * DAY, 1), (4, 11, 2 * DAY, 1),
               (5, 11, 2 * DAY, 1), (6, 12, 2 * DAY, 0), (7, 12, 3 * DAY + 5, 1)])
    ch = PopularChannel(h, window_days=1.5, refresh_ms=DAY)
    items, scores = ch.select(_req([9, 9], [3 * DAY + 10, 2 * DAY]), None, 3)
    # request 0: period starts at 3 DAY; window [1.5 DAY, 3 DAY): item 11 clicked 3 times, the click of 12 at
    # 3 DAY + 5 is after the refresh, 10 is out of the window, 12's event at 2 DAY is no click
    np.testing.assert_array_equal(items[0], [11, PAD, PAD])
    assert scores[0, 0] == 3.0
    # request 1: period 2 DAY, window [0.5 DAY, 2 DAY): only item 10, twice
    np.testing.assert_array_equal(items[1], [10, PAD, PAD])
    all_time = PopularChannel(h, window_days=None, refresh_ms=DAY).select(_req([9], [4 * DAY]), None, 3)[0]
    np.testing.assert_array_equal(all_time[0], [11, 10, 12])  # 3, 2, 1 clicks


def test_recent_is_the_users_own_clicks_most_recent_first():
    h = _hist([(1, 10, 100, 1), (1, 11, 200, 1), (1, 12, 300, 0), (1, 10, 400, 1)])
    items, scores = RecentChannel(h).select(_req([1, 1], [401, 250]), None, 3)
    np.testing.assert_array_equal(items, [[10, 11, PAD], [11, 10, PAD]])
    assert scores[0, 0] > scores[0, 1] and scores[0, 2] == -np.inf


def test_itemcf_hand_worked_cosines():
    # train clicks: users 1 and 2 click items 10 and 11; user 3 clicks 11 and 12
    train = _hist([(1, 10, 1, 1), (1, 11, 2, 1), (2, 10, 3, 1), (2, 11, 4, 1), (3, 11, 5, 1), (3, 12, 6, 1)])
    ch = ItemCFChannel(train, neighbours=5, n_history=2, decay=0.5).fit(train, np.array([10, 11, 12, 13]))
    # cos(10, 11) = 2 / (sqrt(2) sqrt(3)); cos(11, 12) = 1 / (sqrt(3) sqrt(1)); cos(10, 12) = 0
    items, scores = ch.select(_req([3], [100]), None, 4)
    # user 3's last clicks: 12 (weight 1), then 11 (weight 0.5)
    # score(10) = 0.5 * cos(11, 10) = 0.5 * 2 / sqrt(6); score(11) = 1 * cos(12, 11) = 1 / sqrt(3);
    # score(12) = 0.5 * cos(11, 12) = 0.5 / sqrt(3); item 13 has no similarity: not proposed
    np.testing.assert_array_equal(items[0], [11, 10, 12, PAD])
    np.testing.assert_allclose(scores[0, :3], [1 / np.sqrt(3), 1 / np.sqrt(6), 0.5 / np.sqrt(3)], rtol=1e-6)


def test_content_prefers_the_users_category_then_popularity():
    h = _hist([(1, 10, 100, 1), (1, 20, 50, 1)])
    # train clicks give the popularity: 11 > 10 > 12 in category 0, 20 > 21 in category 1, 30 the most popular
    train = _hist([(u, i, 1, 1) for i, n in ((10, 5), (11, 9), (12, 1), (20, 3), (21, 2), (30, 20)) for u in range(n)])
    ids = np.array([10, 11, 12, 20, 21, 30])
    cat = np.array([0, 0, 0, 1, 1, 2])
    items, _ = ContentChannel(h, n_history=2, decay=0.5).fit(train, ids, cat).select(_req([1], [200]), None, 6)
    # category 0 weight 1 (item 10 the latest click), category 1 weight 0.5; category 2 never clicked
    np.testing.assert_array_equal(items[0], [11, 10, 12, 20, 21, PAD])


def test_als_recovers_two_planted_groups():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        group = u % 2
        for i in rng.choice(10, 6, replace=False):
            rows.append((u, 100 * group + int(i), len(rows), 1))
    h = _hist(rows)
    ch = ALSChannel(h, factors=4, iterations=20, seed=0).fit(h, np.r_[np.arange(10), 100 + np.arange(10)])
    items, _ = ch.select(_req([0, 1, 999], [10**6] * 3), None, 5)
    assert (items[0] < 100).all() and (items[1] >= 100).all()  # each user's own group
    assert (items[2] == PAD).all()  # a user without train clicks gets no list


@pytest.mark.parametrize("make", [
    lambda h: PopularChannel(h, window_days=2.0, refresh_ms=1000),
    lambda h: RecentChannel(h),
    lambda h: ItemCFChannel(h).fit(_hist(TRAIN), np.arange(30)),
    lambda h: ContentChannel(h).fit(_hist(TRAIN), np.arange(30), np.arange(30) % 4),
])
def test_a_later_event_changes_no_earlier_list(make):
    rng = np.random.default_rng(1)
    base = [(int(rng.integers(5)), int(rng.integers(30)), int(rng.integers(0, 5 * DAY)), int(rng.integers(2)))
            for _ in range(300)]
    t_req = 3 * DAY
    later = [(u, (i + 7) % 30, t_req + 1 + k, 1) for k, (u, i, _, _) in enumerate(base[:50])]
    req = _req(range(5), [t_req] * 5)
    before = make(_hist([r for r in base if r[2] < t_req])).select(req, None, 10)
    after = make(_hist(base + later)).select(req, None, 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


TRAIN = [(u, i, u * 10 + i, 1) for u in range(6) for i in range(0, 30, u + 2)]


class _Fixed:
    def __init__(self, lists):
        self.lists = np.array(lists, np.int64)

    def select(self, requests, candidates, n):
        out = np.full((len(requests), n), PAD, np.int64)
        m = min(n, self.lists.shape[1])
        out[:, :m] = self.lists[:, :m]
        return out, np.where(out == PAD, -np.inf, 0.0).astype(np.float32)


def test_merger_quotas_dedup_and_origin():
    a = _Fixed([[1, 2, 3, 4, 5, 6]])
    b = _Fixed([[2, 7, 8, 9, PAD, PAD]])
    m = MergedRetriever({"a": a, "b": b}, {"a": 2.0, "b": 1.0})
    items, scores, origin = m.select_with_origin(_req([1], [0]), 6)
    # keys: a -> (r + 0.5) / (2/3) = 0.75, 2.25, 3.75, 5.25, ...; b -> (r + 0.5) / (1/3) = 1.5, 4.5, 7.5, 10.5
    # order: a1 .75, b2 1.5, a2 2.25 (repeat: dropped), a3 3.75, b7 4.5, a4 5.25, a5 6.75, b8 7.5
    np.testing.assert_array_equal(items[0], [1, 2, 3, 7, 4, 5])
    np.testing.assert_array_equal(origin[0], [0, 1, 0, 1, 0, 0])
    assert np.all(np.diff(scores[0]) < 0)
    assert len(set(items[0])) == 6
    with pytest.raises(ValueError, match="quotas name"):
        MergedRetriever({"a": a}, {"b": 1.0})
    with pytest.raises(ValueError, match="finite and > 0"):
        MergedRetriever({"a": a}, {"a": 0.0})


def test_save_and_load_serve_the_same_lists(tmp_path):
    rng = np.random.default_rng(2)
    rows = [(int(rng.integers(8)), int(rng.integers(30)), int(t), int(rng.integers(2))) for t in range(400)]
    h = _hist(rows)
    req = _req(range(8), [500] * 8)
    for ch in (PopularChannel(h, window_days=None, refresh_ms=10), RecentChannel(h),
               ItemCFChannel(h, neighbours=7).fit(h, np.arange(30)),
               ContentChannel(h).fit(h, np.arange(30), np.arange(30) % 3),
               ALSChannel(h, factors=3, iterations=5).fit(h, np.arange(30))):
        folder = tmp_path / ch.name
        files = ch.save(folder)
        assert all((folder / f).exists() for f in files)
        back = CHANNELS[ch.name].load(folder, h)
        assert back.params() == ch.params()
        for a, b in zip(ch.select(req, None, 9), back.select(req, None, 9)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds channel 'als', not 'itemcf'"):
        ItemCFChannel.load(tmp_path / "als", h)


def test_sparse_topk_hand_worked():
    import scipy.sparse as sp

    from cascade.channels.classic import sparse_topk

    m = sp.csr_matrix(np.array([[0.0, 2.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]]))
    ids, scores = sparse_topk(m, np.array([10, 11, 12, 13, 14]), 2)
    # row 0: 2.0 at columns 1 and 3 tie: the lower column first; row 1 has nothing; row 2 one item
    np.testing.assert_array_equal(ids, [[11, 13], [PAD, PAD], [10, PAD]])
    np.testing.assert_array_equal(scores, [[2.0, 2.0], [-np.inf, -np.inf], [3.0, -np.inf]])
