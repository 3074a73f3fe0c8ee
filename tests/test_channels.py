"""Retrieval channels and their merger: hand-worked lists, no leakage from later events, quotas and origins."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from cascade.arrays import PAD
from cascade.channels import (
    CHANNELS,
    ALSChannel,
    ContentChannel,
    EaseChannel,
    ItemCFChannel,
    MergedRetriever,
    PopularChannel,
    RecentChannel,
    origin_shares,
    quota_cut,
)
from cascade.channels.classic import als_factory, recent_weights, topk_entries, weighted_rows
from cascade.channels.merge import standardised
from cascade.channels.reference import als_lists, content_lists, itemcf_lists, plain_recent_weights, popular_lists
from cascade.data.ids import IdIndex
from worlds import event_history, requests_at

DAY = 86_400_000


def test_popular_counts_clicks_in_the_trailing_window_as_of_the_refresh():
    h = event_history([(1, 10, 1 * DAY, 1), (2, 10, 1 * DAY, 1), (3, 11, 2 * DAY, 1), (4, 11, 2 * DAY, 1),
               (5, 11, 2 * DAY, 1), (6, 12, 2 * DAY, 0), (7, 12, 3 * DAY + 5, 1)])
    ch = PopularChannel(h, window_days=1.5, refresh_ms=DAY)
    items, scores = ch.select(requests_at([9, 9], [3 * DAY + 10, 2 * DAY]), None, 3)
    # request 0: period starts at 3 DAY; window [1.5 DAY, 3 DAY): item 11 clicked 3 times, the click of 12 at
    # 3 DAY + 5 is after the refresh, 10 is out of the window, 12's event at 2 DAY is no click
    np.testing.assert_array_equal(items[0], [11, PAD, PAD])
    assert scores[0, 0] == 3.0
    # request 1: period 2 DAY, window [0.5 DAY, 2 DAY): only item 10, twice
    np.testing.assert_array_equal(items[1], [10, PAD, PAD])
    all_time = PopularChannel(h, window_days=None, refresh_ms=DAY).select(requests_at([9], [4 * DAY]), None, 3)[0]
    np.testing.assert_array_equal(all_time[0], [11, 10, 12])  # 3, 2, 1 clicks


def test_popular_standardised_log_counts_hand_worked():
    """Each candidate's log(1 + clicks in the request's window) standardised over a corpus of 5 items for its refresh
    period (the teacher's collaborative term): an item without a click counts 0; 0 for padding; 0 for every item
    where nothing was clicked in the window (SD 0)."""
    h = event_history([(1, 10, 1 * DAY, 1), (2, 10, 1 * DAY, 1), (3, 11, 2 * DAY, 1), (4, 11, 2 * DAY, 1),
                       (5, 11, 2 * DAY, 1), (6, 12, 2 * DAY, 0)])
    ch = PopularChannel(h, window_days=1.5, refresh_ms=DAY)
    # period 3 DAY, window [1.5 DAY, 3 DAY): 11 clicked 3 times; period 2 DAY, window [0.5 DAY, 2 DAY): 10 twice
    at_3 = np.log1p(np.array([0.0, 3.0, 0.0, 0.0, 0.0]))  # items 10, 11, 12, 13, 14
    at_2 = np.log1p(np.array([2.0, 0.0, 0.0, 0.0, 0.0]))
    z3, z2 = ((x - x.mean()) / x.std() for x in (at_3, at_2))
    req = requests_at([9, 9, 8], [3 * DAY + 10, 2 * DAY, 10 * DAY])
    cand = np.array([[11, 10, PAD], [10, 14, 11], [10, 11, 12]])
    want = np.array([[z3[1], z3[0], 0.0], [z2[0], z2[4], z2[1]], [0.0, 0.0, 0.0]])  # nothing clicked by 10 DAY
    np.testing.assert_allclose(ch.standardised(req, cand, n_items=5), want, rtol=1e-6, atol=1e-7)


def test_recent_is_the_users_own_clicks_most_recent_first():
    h = event_history([(1, 10, 100, 1), (1, 11, 200, 1), (1, 12, 300, 0), (1, 10, 400, 1)])
    items, scores = RecentChannel(h).select(requests_at([1, 1], [401, 250]), None, 3)
    np.testing.assert_array_equal(items, [[10, 11, PAD], [11, 10, PAD]])
    assert scores[0, 0] > scores[0, 1] and scores[0, 2] == -np.inf


def test_itemcf_hand_worked_cosines():
    # train clicks: users 1 and 2 click items 10 and 11; user 3 clicks 11 and 12
    train = event_history([(1, 10, 1, 1), (1, 11, 2, 1), (2, 10, 3, 1), (2, 11, 4, 1), (3, 11, 5, 1), (3, 12, 6, 1)])
    ch = ItemCFChannel(train, neighbours=5, n_history=2, decay=0.5).fit(train, np.array([10, 11, 12, 13]))
    # cos(10, 11) = 2 / (sqrt(2) sqrt(3)); cos(11, 12) = 1 / (sqrt(3) sqrt(1)); cos(10, 12) = 0
    items, scores = ch.select(requests_at([3], [100]), None, 4)
    # user 3's last clicks: 12 (weight 1), then 11 (weight 0.5)
    # score(10) = 0.5 * cos(11, 10) = 0.5 * 2 / sqrt(6); score(11) = 1 * cos(12, 11) = 1 / sqrt(3);
    # score(12) = 0.5 * cos(11, 12) = 0.5 / sqrt(3); item 13 has no similarity: not proposed
    np.testing.assert_array_equal(items[0], [11, 10, 12, PAD])
    np.testing.assert_allclose(scores[0, :3], [1 / np.sqrt(3), 1 / np.sqrt(6), 0.5 / np.sqrt(3)], rtol=1e-6)


def test_content_prefers_the_users_category_then_popularity():
    h = event_history([(1, 10, 100, 1), (1, 20, 50, 1)])
    # train clicks give the popularity: 11 > 10 > 12 in category 0, 20 > 21 in category 1, 30 the most popular
    train = event_history([(u, i, 1, 1) for i, n in ((10, 5), (11, 9), (12, 1), (20, 3), (21, 2), (30, 20))
                           for u in range(n)])
    ids = np.array([10, 11, 12, 20, 21, 30])
    cat = np.array([0, 0, 0, 1, 1, 2])
    items, _ = ContentChannel(h, n_history=2, decay=0.5).fit(train, ids, cat).select(requests_at([1], [200]), None, 6)
    # category 0 weight 1 (item 10 the latest click), category 1 weight 0.5; category 2 never clicked
    np.testing.assert_array_equal(items[0], [11, 10, 12, 20, 21, PAD])


def test_als_recovers_two_planted_groups():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        group = u % 2
        for i in rng.choice(10, 6, replace=False):
            rows.append((u, 100 * group + int(i), len(rows), 1))
    h = event_history(rows)
    ch = ALSChannel(h, factors=4, iterations=20, seed=0).fit(h, np.r_[np.arange(10), 100 + np.arange(10)])
    items, _ = ch.select(requests_at([0, 1, 999], [10**6] * 3), None, 5)
    assert (items[0] < 100).all() and (items[1] >= 100).all()  # each user's own group
    assert (items[2] == PAD).all()  # a user without train clicks gets no list


def test_ease_hand_worked_closed_form():
    """B = -P / diag(P), P = (X'X + lam I)^-1, diagonal 0, from the train clicks (a pair clicked twice counts once;
    an impression without a click counts nothing); a request scores x_u @ B over its user's every click before it,
    read from the history it serves from; a user without one gets no list."""
    train = event_history([(1, 10, 1, 1), (1, 11, 2, 1), (1, 11, 3, 1), (2, 11, 4, 1), (2, 12, 5, 1),
                           (3, 10, 6, 1), (3, 12, 7, 0)])
    x = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], float)  # users 1-3 x items 10, 11, 12
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(3))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    history = event_history([(3, 10, 6, 1), (3, 12, 7, 0), (3, 11, 50, 1), (4, 12, 1, 0)])
    ch = EaseChannel(history, lam=2.0).fit(train, np.array([12, 10, 11]))
    np.testing.assert_allclose(ch.weights_, b, rtol=1e-6)
    items, scores = ch.select(requests_at([3, 3, 4], [40, 60, 60]), None, 3)
    # user 3 at t = 40: clicked 10 only (12 was shown, not clicked): scores are row 10 of B; at t = 60 also 11
    for row, x_u in ((0, b[0]), (1, b[0] + b[1])):
        order = np.argsort(-x_u, kind="stable")
        np.testing.assert_array_equal(items[row], np.array([10, 11, 12])[order])
        np.testing.assert_allclose(scores[row], x_u[order], rtol=1e-6)
    assert (items[2] == PAD).all()  # user 4 never clicked
    with pytest.raises(ValueError, match="lam must be"):
        EaseChannel(history, lam=0.0)


def test_ease_standardised_scores_hand_worked():
    """Each candidate's EASE score standardised over the corpus for its request (the teacher's collaborative term):
    (x_u @ B - its mean over the catalogue) / its SD; 0 for padding, an unknown item and a user without a click;
    requests of one (user, time) share their row, whatever the chunk size."""
    train = event_history([(1, 10, 1, 1), (1, 11, 2, 1), (2, 11, 4, 1), (2, 12, 5, 1), (3, 10, 6, 1), (3, 13, 7, 1)])
    history = event_history([(3, 10, 6, 1), (3, 11, 50, 1), (4, 12, 1, 0)])
    ch = EaseChannel(history, lam=2.0).fit(train, np.array([10, 11, 12, 13]))
    b = ch.weights_.astype(np.float64)
    row_40, row_60 = b[0], b[0] + b[1]  # user 3 clicked 10 before t = 40, and 11 too before t = 60
    z = [(r - r.mean()) / r.std() for r in (row_40, row_60)]
    req = requests_at([3, 3, 4, 3], [40, 60, 60, 40])
    cand = np.array([[13, 12, PAD], [10, 99, 11], [10, 11, 12], [12, 10, 11]])
    want = np.array([[z[0][3], z[0][2], 0.0], [z[1][0], 0.0, z[1][1]], [0.0, 0.0, 0.0], [z[0][2], z[0][0], z[0][1]]])
    for chunk in (1 << 22, 1):  # one block; a request at a time
        np.testing.assert_allclose(ch.standardised(req, cand, chunk=chunk), want, rtol=1e-5, atol=1e-6)
    # a later click (user 3 at t = 55) changes the row at 60, not the one at 40
    later = EaseChannel(event_history([(3, 10, 6, 1), (3, 12, 55, 1), (3, 11, 50, 1)]), lam=2.0)
    later.item_ids_, later.weights_ = ch.item_ids_, ch.weights_
    later._restored()
    got = later.standardised(req, cand)
    np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[1], want[1])


def test_ease_standardised_scores_match_the_scored_corpus():
    """The moments from the clicked items alone (B 1, B B') equal those of the scored corpus rows, on random clicks
    of 40 users over 60 items, users with 0 to 30 clicks, several requests per user, blocks of every size."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), int(t), int(rng.random() < 0.7)) for u in range(40)
            for t, i in enumerate(rng.choice(60, rng.integers(0, 31), replace=False))]
    h = event_history(rows)
    ch = EaseChannel(h, lam=5.0).fit(h, np.arange(60))
    req = requests_at(np.repeat(np.arange(41), 3), np.tile([3, 15, 40], 41))
    cand = rng.integers(-1, 62, size=(len(req), 9))  # padding, unknown ids 60 and 61
    full, has = ch.scores(req)
    z = (full - full.mean(1, keepdims=True)) / np.where(full.std(1, keepdims=True) > 0, full.std(1, keepdims=True), 1)
    want = np.where(has[:, None] & (cand >= 0) & (cand < 60), np.take_along_axis(z, np.clip(cand, 0, 59), 1), 0.0)
    assert has.sum() > 60 and (want != 0).sum() > 300
    for chunk in (1 << 22, 500, 1):
        np.testing.assert_allclose(ch.standardised(req, cand, chunk=chunk), want, rtol=1e-4, atol=1e-5)


def test_popular_ease_lists_the_corpus_by_the_sum_of_both_standardised_scores():
    """The classic prior alone: per request z(log(1 + window clicks)) + b x z(EASE) over the corpus, its top n best
    first (ties to the lower item id), block by block as in one; candidates are refused (it lists the corpus)."""
    from cascade.channels import PopularEase

    train = event_history([(1, 10, 1 * DAY, 1), (1, 11, 1 * DAY + 1, 1), (2, 11, 1 * DAY + 2, 1),
                           (2, 12, 1 * DAY + 3, 1), (3, 10, 1 * DAY + 4, 1), (3, 13, 1 * DAY + 5, 1),
                           (4, 11, 1 * DAY + 6, 1), (4, 14, 1 * DAY + 7, 0)])
    corpus = np.array([10, 11, 12, 13, 14])
    popular = PopularChannel(train, window_days=2.0, refresh_ms=DAY)
    ease = EaseChannel(train, lam=2.0).fit(train, corpus)
    req = requests_at([3, 1, 9], [2 * DAY, 2 * DAY + 5, 2 * DAY])
    # window [0, 2 DAY) at the period 2 DAY: clicks 10: 2, 11: 3, 12: 1, 13: 1, 14: 0
    logs = np.log1p(np.array([2.0, 3.0, 1.0, 1.0, 0.0]))
    zpop = (logs - logs.mean()) / logs.std()
    b = ease.weights_.astype(np.float64)
    rows = [b[0] + b[3], b[0] + b[1], None]  # user 3 clicked 10 and 13, user 1 10 and 11, user 9 nothing
    want = np.stack([zpop + 0.5 * (np.zeros(5) if r is None else (r - r.mean()) / r.std()) for r in rows])
    for block in (1 << 22, 5):  # one block; a request at a time (5 pairs)
        prior = PopularEase(popular, ease, 0.5, corpus[::-1], pairs_per_batch=block)
        assert prior.params() == {"window_days": 2.0, "lam": 2.0, "ease_weight": 0.5}
        np.testing.assert_allclose(prior.score(req, np.tile(corpus, (3, 1))), want, rtol=1e-5, atol=1e-6)
        items, scores = prior.select(req, None, 3)
        order = np.argsort(-want, axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(items, corpus[order])
        np.testing.assert_allclose(scores, np.take_along_axis(want, order, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(items[2], [11, 10, 12])  # no click of user 9: most-popular's order, ties to 12
    with pytest.raises(ValueError, match="candidates must be None"):
        prior.select(req, np.tile(corpus, (3, 1)), 3)
    with pytest.raises(ValueError, match="ease_weight must be"):
        PopularEase(popular, ease, -1.0, corpus)


def test_ease_refuses_a_catalogue_too_large_for_its_dense_weights(monkeypatch):
    import cascade.channels.classic as C

    monkeypatch.setattr(C, "EASE_MAX_ITEMS", 2)
    h = event_history([(1, 10, 1, 1)])
    with pytest.raises(ValueError, match="3 items, at most 2 .*leave 'ease' out of channels.build"):
        EaseChannel(h).fit(h, np.array([10, 11, 12]))


@pytest.mark.parametrize("make", [
    lambda h: PopularChannel(h, window_days=2.0, refresh_ms=1000),
    lambda h: EaseChannel(h).fit(event_history(TRAIN), np.arange(30)),
    lambda h: RecentChannel(h),
    lambda h: ItemCFChannel(h).fit(event_history(TRAIN), np.arange(30)),
    lambda h: ContentChannel(h).fit(event_history(TRAIN), np.arange(30), np.arange(30) % 4),
])
def test_a_later_event_changes_no_earlier_list(make):
    rng = np.random.default_rng(1)
    base = [(int(rng.integers(5)), int(rng.integers(30)), int(rng.integers(0, 5 * DAY)), int(rng.integers(2)))
            for _ in range(300)]
    t_req = 3 * DAY
    later = [(u, (i + 7) % 30, t_req + 1 + k, 1) for k, (u, i, _, _) in enumerate(base[:50])]
    req = requests_at(range(5), [t_req] * 5)
    before = make(event_history([r for r in base if r[2] < t_req])).select(req, None, 10)
    after = make(event_history(base + later)).select(req, None, 10)
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
    items, scores, origin = m.select_with_origin(requests_at([1], [0]), 6)
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


class _Scored:
    """A stub channel: every request gets the same list, scored as given."""

    def __init__(self, lists, scores):
        self.lists, self.scores = np.array(lists, np.int64), np.array(scores, np.float32)

    def select(self, requests, candidates, n):
        items, scores = (np.repeat(x[:1, :n], len(requests), 0) for x in (self.lists, self.scores))
        return items, np.where(items == PAD, -np.inf, scores).astype(np.float32)


def test_score_normalised_union_takes_each_channels_standardised_scores_dedups_and_keeps_origin():
    # a: scores 10, 6, 2, 2 (mean 5, std sqrt(11)): z = 1.508, 0.302, -0.905, -0.905
    # b: scores 1000, 0, 0, PAD (mean 333.3, std 471.4 over its 3 entries): z = 1.414, -0.707, -0.707
    # c: all equal: z = 0 for each
    a = _Scored([[1, 2, 3, 4]], [[10, 6, 2, 2]])
    b = _Scored([[2, 5, 6, PAD]], [[1000, 0, 0, 0]])
    c = _Scored([[7, 3, 8, 9]], [[4, 4, 4, 4]])
    m = MergedRetriever({"a": a, "b": b, "c": c}, None, "scores")
    items, scores, origin = m.select_with_origin(requests_at([1], [0]), 4)
    # by z: a1 1.508, b2 1.414, a2 0.302 (2 already placed by b), then c's four at 0 (c3 from c: a's 3 is at
    # -0.905), b5 and b6 at -0.707, a4 at -0.905
    np.testing.assert_array_equal(items[0], [1, 2, 7, 3])
    np.testing.assert_array_equal(origin[0], [0, 1, 2, 2])
    np.testing.assert_allclose(scores[0], [5 / np.sqrt(11), 2 / np.sqrt(2), 0, 0], rtol=1e-6)
    # every item once; longer: the rest in z order, shared items once, padding never counted
    items, _, origin = m.select_with_origin(requests_at([1], [0]), 9)
    np.testing.assert_array_equal(items[0], [1, 2, 7, 3, 8, 9, 5, 6, 4])
    np.testing.assert_array_equal(origin[0], [0, 1, 2, 2, 2, 2, 1, 1, 0])
    # shifting or scaling one channel's scores changes nothing: only where they stand within its own list counts
    moved = MergedRetriever({"a": _Scored([[1, 2, 3, 4]], [[-70, -90, -110, -110]]), "b": b, "c": c}, None, "scores")
    np.testing.assert_array_equal(moved.select_with_origin(requests_at([1], [0]), 9)[0], items)
    with pytest.raises(ValueError, match="has no quotas; they would do nothing"):
        MergedRetriever({"a": a}, {"a": 1.0}, "scores")
    with pytest.raises(ValueError, match=r"merge must be one of \['quotas', 'scores'\], got 'rrf'"):
        MergedRetriever({"a": a}, {"a": 1.0}, "rrf")


def test_a_score_normalised_unions_list_does_not_move_with_what_else_its_user_saw():
    """Filtering seen items over-fetches each channel by what the user saw; the z-scores keep the mean and std of
    the n asked for, so items seen that no channel proposes leave the list as it is, as under quotas."""
    from cascade.serve.cascade import select_unseen, select_unseen_origin

    rng = np.random.default_rng(3)
    width = 40
    a = _Scored([np.arange(width)], [np.sort(rng.exponential(size=width))[::-1]])
    b = _Scored([np.arange(100, 100 + width)], [np.linspace(1, 0, width)])
    req = requests_at([1], [10 * DAY])
    for merged in (MergedRetriever({"a": a, "b": b}, None, "scores"), MergedRetriever({"a": a, "b": b},
                                                                                      {"a": 1.0, "b": 1.0})):
        lists = [select_unseen_origin(merged, req, 8, event_history(seen))[0][0].tolist() for seen in (
            [(2, 500, 0, 1)],  # another user's event: nothing seen
            [(1, 900 + i, i, 0) for i in range(8)],  # eight items no channel proposes
            [(1, 0, 0, 1), (1, 101, 1, 0)])]  # two the channels propose: dropped, the next ones move up
        assert lists[0] == lists[1], merged.merge
        # the stage contract's path (the replay's channel report) serves the same lists
        plain = [select_unseen(merged, req, 8, event_history(seen))[0][0].tolist() for seen in (
            [(2, 500, 0, 1)], [(1, 900 + i, i, 0) for i in range(8)], [(1, 0, 0, 1), (1, 101, 1, 0)])]
        assert plain == lists, merged.merge
        assert 0 not in lists[2] and 101 not in lists[2] and len(set(lists[0]) - set(lists[2])) == 2
    # before the fix the 8 unrelated items moved the score union's z-scores: the widths differed (8 vs 16)
    z8 = standardised(np.array([np.linspace(1, 0, 8)]))
    np.testing.assert_allclose(standardised(np.array([np.linspace(1, -1, 16)]), 8)[:, :8], z8)


def test_the_union_takes_no_requests_and_at_most_127_channels():
    a = _Scored([[1, 2]], [[1.0, 0.5]])
    for merge, quotas in (("scores", None), ("quotas", {"a": 1.0, "b": 1.0})):
        items, scores, origin = MergedRetriever({"a": a, "b": a}, quotas, merge).select_with_origin(
            requests_at([], []), 3)
        assert items.shape == scores.shape == origin.shape == (0, 3)
    many = {f"c{i}": a for i in range(128)}
    with pytest.raises(ValueError, match=r"at most 127 channels \(origins are int8\), got 128"):
        MergedRetriever(many, None, "scores")


def test_quota_cut_keeps_each_channels_quota_in_score_order():
    # one row of 7 candidates from channels 0 (quota 1/2) and 1 and 2 (1/4 each), scored by a later stage
    items = np.array([[10, 11, 12, 13, 14, 15, PAD]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5, 0.2, 5.0]], np.float32)  # PAD's score never counts
    origin = np.array([[0, 0, 0, 1, 1, 2, -1]])
    quotas = np.array([0.5, 0.25, 0.25])
    # by score: 10 (.9, ch0), 11 (.8, ch0), 12 (.7, ch0), 14 (.5, ch1), 15 (.2, ch2), 13 (.1, ch1)
    # keys (r + 0.5) / q: ch0 1, 3, 5; ch1 14 -> 2, 13 -> 6; ch2 15 -> 2
    # n = 4: keys 1 (10), 2 (14), 2 (15), 3 (11); back in score order: 10, 11, 14, 15 (the best overall 4 would
    # have been 10, 11, 12, 14)
    got, s, o = quota_cut(items, scores, origin, quotas, 4)
    assert got.tolist() == [[10, 11, 14, 15]] and o.tolist() == [[0, 0, 1, 2]]
    np.testing.assert_allclose(s, [[0.9, 0.8, 0.5, 0.2]])
    # a channel with fewer candidates than its quota leaves its slots to the others; a short row is padded
    got, s, o = quota_cut(items, scores, origin, quotas, 7)
    assert got.tolist() == [[10, 11, 12, 14, 15, 13, PAD]] and o[0, -1] == -1 and s[0, -1] == -np.inf
    # equal quotas on one channel alone: the stage's own top n
    got, _, _ = quota_cut(items[:, :3], scores[:, :3], origin[:, :3], quotas, 2)
    assert got.tolist() == [[10, 11]]
    # a quota per row: the row's own origin shares (3/6, 2/6, 1/6: keys ch0 1, 3, 5; ch1 14 -> 1.5, 13 -> 4.5;
    # ch2 15 -> 3), and a second row where channel 0 has no share and no candidate
    assert origin_shares(origin, 3).tolist() == [[0.5, 2 / 6, 1 / 6]]
    two = np.array([[0, 0, 0, 1, 1, 2, -1], [-1, -1, 1, 1, 2, 2, -1]])
    shares = origin_shares(two, 3)
    assert shares.tolist() == [[0.5, 2 / 6, 1 / 6], [0.0, 0.5, 0.5]]
    # n = 3. Row 0: keys 1 (10), 1.5 (14), 3 (11, and 15 at 3 too but after 11 in score order) -> 10, 11, 14;
    # row 1 (items 12..15 from ch1 and ch2, scored .7 .1 .5 .2): ch1 12 -> 1, 13 -> 3; ch2 14 -> 1, 15 -> 3; of
    # the equal keys 3 the better score (15) comes first
    got, _, o = quota_cut(np.array([items[0], [PAD, PAD, 12, 13, 14, 15, PAD]]), np.repeat(scores, 2, 0), two,
                          shares, 3)
    assert got.tolist() == [[10, 11, 14], [12, 14, 15]] and o.tolist() == [[0, 0, 1], [1, 2, 2]]


def test_save_and_load_serve_the_same_lists(tmp_path):
    rng = np.random.default_rng(2)
    rows = [(int(rng.integers(8)), int(rng.integers(30)), int(t), int(rng.integers(2))) for t in range(400)]
    h = event_history(rows)
    req = requests_at(range(8), [500] * 8)
    for ch in (PopularChannel(h, window_days=None, refresh_ms=10), RecentChannel(h),
               ItemCFChannel(h, neighbours=7).fit(h, np.arange(30)),
               ContentChannel(h).fit(h, np.arange(30), np.arange(30) % 3),
               ALSChannel(h, factors=3, iterations=5).fit(h, np.arange(30)),
               EaseChannel(h, lam=5.0).fit(h, np.arange(30))):
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
    # the same scores given out of column order and with duplicates (1.5 + 0.5 at column 3): the same lists
    unsorted = sp.csr_matrix((np.array([1.0, 1.5, 2.0, 0.5, 3.0]), np.array([4, 3, 1, 3, 0]), np.array([0, 4, 4, 5])),
                             shape=(3, 5))
    assert not unsorted.has_sorted_indices
    ids2, scores2 = sparse_topk(unsorted, np.array([10, 11, 12, 13, 14]), 2)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)


# ------------------------------------------------------------------------------------------------ fast paths
# Each channel's per-request work follows what the request touches (benchmarks/bench_serving.py --channels); the
# lists must be identical to those of the plain computations over the whole corpus (cascade/channels/reference.py).


def _world(seed=3, n_users=40, n_items=300, n_events=4000, days=6):
    rng = np.random.default_rng(seed)
    items = rng.zipf(1.6, n_events) % n_items  # popular items and a long tail
    rows = [(int(u), int(i), int(t), int(c)) for u, i, t, c in zip(rng.integers(n_users, size=n_events), items,
                                                                   rng.integers(0, days * DAY, n_events),
                                                                   rng.random(n_events) < 0.4)]
    req = requests_at(np.arange(n_users + 2), np.linspace(DAY, days * DAY, n_users + 2).astype(np.int64))  # 2 new users
    return event_history(rows), req, np.arange(n_items), rng


@pytest.mark.parametrize("n", [1, 7, 60, 400])
def test_the_fast_channels_give_the_lists_of_the_plain_computation(n):
    h, req, ids, rng = _world()
    cases = [(PopularChannel(h, window_days=2.0, refresh_ms=DAY // 3), popular_lists),
             (PopularChannel(h, window_days=None, refresh_ms=DAY), popular_lists),
             (ItemCFChannel(h, neighbours=20, n_history=8, decay=0.8).fit(h, ids), itemcf_lists),
             (ContentChannel(h, n_history=8, decay=0.8).fit(h, ids, np.where(ids % 11 == 0, -1, ids % 7)),
              content_lists)]
    for ch, reference in cases:
        got, want = ch.select(req, None, n), reference(ch, req, n)
        np.testing.assert_array_equal(got[0], want[0], err_msg=ch.name)
        np.testing.assert_array_equal(got[1], want[1], err_msg=ch.name)
        assert (got[0] != PAD).any(), ch.name
    # the popular channel keeps one whole list per period: a longer request after a shorter one is not cut short
    pop = PopularChannel(h, window_days=None, refresh_ms=DAY)
    pop.select(req, None, 3)
    np.testing.assert_array_equal(pop.select(req, None, n)[0], popular_lists(pop, req, n)[0])


def test_content_keeps_the_items_tied_with_the_nth_at_the_cut():
    # one category, float32 scores 1 + rank that round to the same value for neighbouring ranks: the plain
    # computation breaks the tie by the lower column, which is not the more popular item here
    h = event_history([(1, 0, 10, 1)])
    ids = np.arange(6)
    ch = ContentChannel(h, n_history=1, decay=1.0).fit(h, ids, np.zeros(6, np.int64))
    ch.pop_rank_ = np.array([0.5, 0.5 + 2e-8, 0.5 + 4e-8, 0.5 + 6e-8, 0.9, 0.1], np.float32)
    ch._restored()
    req = requests_at([1], [20])
    for n in range(1, 7):
        got, want = ch.select(req, None, n), content_lists(ch, req, n)
        np.testing.assert_array_equal(got[0], want[0], err_msg=str(n))
        np.testing.assert_array_equal(got[1], want[1], err_msg=str(n))
    assert ch.select(req, None, 3)[0].tolist() == [[4, 0, 1]]  # 0..3 tie at float32(1.5): the lower columns win


def test_recent_weights_built_in_csr_form_equal_scipys_conversion():
    h, req, ids, _ = _world()
    items = IdIndex(ids[::2], "item_id")  # half the clicked items outside the channel's items: left out
    ch = SimpleNamespace(history=h, n_history=8, decay=0.8, _items=items)
    got, want = recent_weights(h, req, 8, 0.8, items), plain_recent_weights(ch, req)
    assert want.has_canonical_format and got.nnz == want.nnz > 0
    for a in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, a), getattr(want, a), err_msg=a)


def test_topk_entries_equals_the_dense_top_k():
    # entries in canonical order, ties among them (kept by the lower column), a row without any entry
    rows = np.array([0, 0, 0, 0, 2, 2, 2])
    cols = np.array([1, 3, 4, 6, 0, 2, 5])
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.3, 0.3, 0.7], np.float32)
    ids = np.arange(100, 107)
    got_i, got_s = topk_entries(rows, cols, scores, 3, ids, 3)
    assert got_i.tolist() == [[103, 101, 104], [PAD, PAD, PAD], [105, 100, 102]]
    np.testing.assert_array_equal(got_s, np.array([[0.9, 0.5, 0.5], [-np.inf] * 3, [0.7, 0.3, 0.3]], np.float32))


def test_weighted_rows_is_scipys_product_bit_for_bit():
    rng = np.random.default_rng(4)
    m = sp.random(200, 500, density=0.05, random_state=5, dtype=np.float32).tocsr()
    h = sp.random(6, 200, density=0.08, random_state=6, dtype=np.float64).tocsr()
    h.data = rng.random(h.nnz) ** 3  # values far apart in scale: the summation order shows
    rows, cols, sums = weighted_rows(h, m)
    want = (h @ m).tocoo()
    order = np.lexsort((want.col, want.row))
    np.testing.assert_array_equal(rows, want.row[order])
    np.testing.assert_array_equal(cols, want.col[order])
    np.testing.assert_array_equal(sums, want.data[order])


def _als_with_factors(n_users=3000, n_items=5000, d=16, seed=0):
    """An ALS channel with clustered factors set directly (what fit learns, without fitting)."""
    from cascade.index.exact import clustered_vectors

    rng = np.random.default_rng(seed)
    xb, xq = clustered_vectors(n_items, d, 40, rng, n_queries=n_users, spread=0.5)
    ch = ALSChannel(event_history([(0, 0, 0, 1)]), factors=d)
    ch.item_ids_ = 10 + 3 * np.arange(n_items, dtype=np.int64)
    ch.user_ids_ = np.arange(n_users, dtype=np.int64)
    ch.user_factors_, ch.item_factors_ = xq.astype(np.float32), xb.astype(np.float32)
    ch._restored()
    return ch


def test_als_served_from_an_exact_index_gives_the_dense_lists(tmp_path):
    ch = _als_with_factors(n_users=200, n_items=800)
    # items and users ALS learned nothing for have all-zero factors: never proposed, no list
    ch.item_factors_[::4] = 0
    ch.user_factors_[7] = 0
    ch._restored()
    req = requests_at([0, 5, 199, 7, 12345], [0] * 5)  # user 7: zero factors; 12345: not in train
    plain = als_lists(ch, req, 50)
    dense = ch.select(req, None, 50)
    np.testing.assert_array_equal(dense[0], plain[0])
    np.testing.assert_allclose(dense[1], plain[1], rtol=1e-5)
    index = ch.build_index()
    assert index.factory == "Flat" and index.is_exact and index.n_items == 600
    got = ch.select(req, None, 50)
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_allclose(got[1][:3], plain[1][:3], rtol=1e-5)
    assert not np.isin(got[0], ch.item_ids_[::4]).any()
    assert (got[0][3:] == PAD).all() and np.isneginf(got[1][3:]).all()
    assert (ch.select(req, None, 900)[0][0, 600:] == PAD).all()  # more than the items with factors: padded
    # saved with its index, loaded with it, refused when the factors change under it
    files = ch.save(tmp_path / "als")
    assert {"index/index.faiss", "index/item_ids.npy", "index/manifest.json"} <= set(files)
    back = ALSChannel.load(tmp_path / "als", ch.history)
    assert back.index is not None
    np.testing.assert_array_equal(back.select(req, None, 50)[0], dense[0])
    ch.item_factors_ = ch.item_factors_ * 2
    ch.index = None
    ch.save(tmp_path / "other")
    (tmp_path / "als" / "channel.npz").write_bytes((tmp_path / "other" / "channel.npz").read_bytes())
    from cascade.index.faiss_index import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="hash"):
        ALSChannel.load(tmp_path / "als", ch.history)


def test_als_served_from_an_ivf_index_reaches_its_recall_against_exact_search():
    from cascade.eval.metrics import mean_recall_at_k

    ch = _als_with_factors()
    req = requests_at(np.arange(3000), np.zeros(3000, np.int64))
    exact = als_lists(ch, req, 100)[0]
    index = ch.build_index("IVF64,Flat", recall_target=0.95, k=100, n_queries=500)
    assert not index.is_exact and index.recall_["recall_at_k"] >= 0.95 and index.nprobe < 64
    # on all users, 2500 of them not among the ones the operating point was chosen on
    assert mean_recall_at_k(exact, ch.select(req, None, 100)[0]) >= 0.93
    # the default: exact while a request scans at most 200K x 32 floats, IVF above (128 factors: from 50K items)
    assert als_factory(200_000, 32) == "Flat" and als_factory(50_000, 128) == "Flat"
    assert als_factory(100_000, 128) == "IVF1024,Flat" and als_factory(1_000_000, 32) == "IVF4096,Flat"


def test_load_channels_checks_every_file_and_names_what_was_saved(tmp_path):
    from cascade import artifacts as A
    from cascade.channels import load_channels

    h, req, ids, _ = _world()
    files = []
    for ch in (RecentChannel(h), ItemCFChannel(h, neighbours=5).fit(h, ids), _als_with_factors(50, 300)):
        if isinstance(ch, ALSChannel):
            ch.build_index()
        files += [f"{ch.name}/{f}" for f in ch.save(tmp_path / ch.name)]
    A.write_manifest(tmp_path, kind="channels", config={}, seed=0, inputs={}, outputs=files)
    assert list(load_channels(tmp_path, h)) == ["als", "itemcf", "recent"]
    got = load_channels(tmp_path, h, ["recent", "als"])
    assert list(got) == ["recent", "als"] and got["als"].index is not None
    with pytest.raises(ValueError, match=r"no saved channel \['content'\].*\['als', 'itemcf', 'recent'\]"):
        load_channels(tmp_path, h, ["content", "recent"])
    idx = tmp_path / "als" / "index" / "item_ids.npy"
    idx.write_bytes(idx.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(A.ArtifactError, match="als/index/item_ids.npy"):
        load_channels(tmp_path, h, ["als"])
    load_channels(tmp_path, h, ["recent", "itemcf"])  # the other channels still load
