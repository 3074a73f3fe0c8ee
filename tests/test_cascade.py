"""The serving cascade on a toy corpus whose stage scores are known in closed form."""
from __future__ import annotations

import numpy as np
import pytest

from cascade.arrays import PAD, topk_rows
from cascade.data.history import EventHistory
from cascade.data.requests import Requests
from cascade.serve.cascade import Cascade, PairScorer, Retriever


class ExactIP:
    """Reference inner-product index over item ids 100.. (non-contiguous ids on purpose)."""

    def __init__(self, xb, ids):
        self.xb, self.ids = xb, ids

    def search(self, xq, k):
        s = xq @ self.xb.T
        return topk_rows(s, np.broadcast_to(self.ids, s.shape), k)[::-1]


@pytest.fixture()
def toy():
    rng = np.random.default_rng(0)
    n_users, n_items, d = 20, 60, 4
    U = rng.normal(size=(n_users, d)).astype(np.float32)
    V = rng.normal(size=(n_items, d)).astype(np.float32)
    ids = np.arange(n_items, dtype=np.int64) * 3 + 100
    row = {int(x): j for j, x in enumerate(ids)}
    bias = rng.normal(size=n_items).astype(np.float32)

    def user_embed(req):
        return U[req.user_id]

    def prerank(req, cand):
        rows = np.vectorize(lambda x: row.get(int(x), 0))(cand)
        return np.einsum("bd,bnd->bn", U[req.user_id], V[rows])

    def rank(req, cand):  # a different function: inner product plus an item bias
        rows = np.vectorize(lambda x: row.get(int(x), 0))(cand)
        return np.einsum("bd,bnd->bn", U[req.user_id], V[rows]) + 3 * bias[rows]

    c = Cascade(Retriever(user_embed, ExactIP(V, ids)), PairScorer(prerank), PairScorer(rank))
    return dict(U=U, V=V, ids=ids, bias=bias, cascade=c, user_embed=user_embed, rank=rank)


def test_topk_rows_hand_worked():
    s = np.array([[0.1, 0.9, 0.5], [1.0, 2.0, 3.0]], np.float32)
    it = np.array([[7, 8, 9], [4, PAD, 6]])
    i, v = topk_rows(s, it, 2)
    assert i.tolist() == [[8, 9], [6, 4]]  # pad (score 2.0) never wins
    i, v = topk_rows(s, it, 4)
    assert i.tolist() == [[8, 9, 7, PAD], [6, 4, PAD, PAD]] and np.isinf(v[1, 2])


def test_every_stage_honours_the_contract(toy):
    req = Requests(np.array([0, 5, 7]), np.array([1, 2, 3]))
    c = toy["cascade"]
    cand, _ = c.retriever.select(req, None, 30)
    for stage, cands in ((c.retriever, None), (c.preranker, cand), (c.ranker, cand)):
        items, scores = stage.select(req, cands, 10)
        assert items.shape == (3, 10) and scores.shape == (3, 10) and items.dtype == np.int64
        assert np.all(np.diff(scores, axis=1) <= 0)  # sorted best first
        if cands is not None:
            assert all(set(items[b]) <= set(cands[b]) for b in range(3))


def test_cascade_matches_brute_force_when_stages_are_wide(toy):
    # With n_retrieve = n_prerank = the whole corpus the final list is the ranker's top-k over all items.
    req = Requests(np.arange(20), np.zeros(20, np.int64))
    res = toy["cascade"].recommend(req, n_retrieve=60, n_prerank=60, k=5, return_stages=True)
    full = np.broadcast_to(toy["ids"], (20, 60))
    want, _ = topk_rows(toy["rank"](req, full), full, 5)
    assert np.array_equal(res.items, want)
    assert set(res.stages) == {"retrieval", "prerank", "rank"} and res.stages["retrieval"][0].shape == (20, 60)
    assert all(t >= 0 for t in res.timing_s.values())


def test_invalid_request_does_not_disturb_the_batch(toy):
    req = Requests(np.array([3.0, np.nan, 4.0]), np.array([1, 1, 1]))
    good = toy["cascade"].recommend(Requests(np.array([3, 4]), np.array([1, 1])), 20, 10, 5)
    res = toy["cascade"].recommend(req, 20, 10, 5)
    assert res.errors[0] is None and res.errors[2] is None and "invalid user_id" in res.errors[1]
    assert np.all(res.items[1] == PAD)
    assert np.array_equal(res.items[[0, 2]], good.items)


def test_seen_items_are_filtered_without_shrinking(toy):
    c = toy["cascade"]
    req = Requests(np.array([2]), np.array([100]))
    before = c.recommend(req, 20, 10, 5).items[0]
    # user 2 saw before[0] and before[1] before t=100, and before[3] only at t=100 (not strictly before);
    # user 9 saw before[2]
    c.seen = EventHistory(np.array([2, 2, 9, 2]), before[[0, 1, 2, 3]], np.array([10, 20, 30, 100]))
    after = c.recommend(req, 20, 10, 5, filter_seen=True).items[0]
    assert before[0] not in after and before[1] not in after
    assert before[2] in after and before[3] in after
    assert (after != PAD).all()


def test_bad_sizes_raise(toy):
    req = Requests(np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="k <= n_prerank <= n_retrieve"):
        toy["cascade"].recommend(req, n_retrieve=10, n_prerank=20, k=5)
    with pytest.raises(ValueError, match="filter_seen"):
        Cascade(*[toy["cascade"].retriever, toy["cascade"].preranker, toy["cascade"].ranker]).recommend(req, 20, 10, 5,
                                                                                                        filter_seen=True)


def test_topk_rows_breaks_ties_by_the_lower_column_and_keeps_the_dtype():
    # row 0: three entries tie at 0.5 across the k = 2 boundary -> columns 1 and 2 (the lowest tied) in that order;
    # row 1: a float64 row keeps float64 and its -inf slots come back as padding
    s = np.array([[0.1, 0.5, 0.5, 0.5], [2.0, -np.inf, 1.0, -np.inf]])
    ids = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    i, v = topk_rows(s, ids, 2)
    assert i.tolist() == [[11, 12], [20, 22]] and v.dtype == np.float64
    i, v = topk_rows(s.astype(np.float32), ids, 4)
    assert i.tolist() == [[11, 12, 13, 10], [20, 22, PAD, PAD]] and v.dtype == np.float32
    # running over chunks: the earlier best come first, so a tie keeps the earlier chunk's id
    best_i, best_v = topk_rows(s[:1, :2], ids[:1, :2], 1)
    i, _ = topk_rows(np.concatenate([best_v, s[:1, 2:]], 1), np.concatenate([best_i, ids[:1, 2:]], 1), 1)
    assert i.tolist() == [[11]]


def test_pad_by_row_keeps_order_within_a_row_and_the_dtype():
    from cascade.arrays import pad_by_row

    rows = np.array([2, 0, 2, 2, 0])
    got = pad_by_row(rows, np.array([10, 11, 12, 13, 14]), 4)
    assert got.tolist() == [[11, 14, PAD], [PAD, PAD, PAD], [10, 12, 13], [PAD, PAD, PAD]]
    labels = pad_by_row(rows, np.array([1.0, 0.0, 0.5, 0.0, 1.0], np.float32), 4, fill=0.0)
    assert labels.dtype == np.float32 and labels[2].tolist() == [1.0, 0.5, 0.0]
    assert pad_by_row(np.zeros(0, np.int64), np.zeros(0, np.int64), 2).shape == (2, 1)  # at least one column


# ------------------------------------------------------------------------------------------------ channels


class FixedLists:
    """A stub channel: request b gets lists[user_id[b]] (item ids, best first)."""

    def __init__(self, lists):
        self.lists = lists

    def select(self, requests, candidates, n):
        out = np.full((len(requests), n), PAD, np.int64)
        for b, u in enumerate(requests.user_id):
            got = self.lists.get(int(u), [])[:n]
            out[b, :len(got)] = got
        return out, np.where(out == PAD, -np.inf, -np.arange(n, dtype=np.float32)[None, :]).astype(np.float32)


def test_a_score_normalised_unions_pre_rank_keeps_each_channels_share_of_the_requests_union(toy):
    from cascade.channels import MergedRetriever, origin_shares, quota_cut

    c = toy["cascade"]
    a = FixedLists({1: [118, 121, 124, 127], 2: [130]})
    scored = MergedRetriever({"two_tower": c.retriever, "a": a}, None, "scores")
    casc = Cascade(scored, c.preranker, c.ranker, prerank_quotas=True)
    req = Requests(np.array([1, 2]), np.array([5, 5]))
    res = casc.recommend(req, n_retrieve=10, n_prerank=4, k=2, return_stages=True)
    ri, ro = res.stages["retrieval"][0], res.origin
    shares = origin_shares(ro, 2)
    # each row's shares: what each channel placed in that request's union
    filled = ri != PAD
    np.testing.assert_allclose(shares, [[np.mean(ro[b][filled[b]] == ch) for ch in (0, 1)] for b in range(2)])
    assert (shares[0] > 0).all() and not np.allclose(shares[0], shares[1])
    want = quota_cut(ri, c.preranker.scores(req, ri), ro, shares, 4)[0]
    np.testing.assert_array_equal(res.stages["prerank"][0], want)
    # the same per-row shares as fixed quotas give each row what its own shares give it
    for b in range(2):
        one = quota_cut(ri[b:b + 1], c.preranker.scores(req.take(np.array([b])), ri[b:b + 1]), ro[b:b + 1],
                        shares[b], 4)[0]
        np.testing.assert_array_equal(one[0], want[b])


def test_the_served_union_refuses_an_unknown_merge_and_quota_settings_beside_scores():
    """build_cascade / load_cascade go through merged_retriever: a merge it does not know, or a quota setting the
    score union would ignore, is refused, not served as quotas."""
    from types import SimpleNamespace

    from cascade.serve.cascade import merged_retriever

    towers, channels = SimpleNamespace(prior=None), {"a": FixedLists({})}
    with pytest.raises(ValueError, match=r"merge must be one of \['quotas', 'scores'\], got 'Scores'"):
        merged_retriever(None, towers, None, channels, None, merge="Scores")
    for quota, weights, named in ((0.7, None, "replay.two_tower_quota = 0.7"),
                                  (None, {"a": 2.0}, r"replay.channel_quotas = \{'a': 2.0\}")):
        with pytest.raises(ValueError, match=rf"without quotas, but {named} is set: it would do nothing"):
            merged_retriever(None, towers, None, channels, quota, weights, merge="scores")
    scored = merged_retriever(None, towers, None, channels, None, merge="scores")
    assert scored.merge == "scores" and scored.quotas is None and scored.names == ["two_tower", "a"]
    quoted = merged_retriever(None, towers, None, channels, None)  # unset: the default share
    assert quoted.quotas.tolist() == [0.5, 0.5]


def _merged_cascade(toy, seen=None):
    from cascade.channels import MergedRetriever

    # item ids of the corpus are 100, 103, ..., 277; the stub channels propose corpus items too (the later stages
    # score them) and one item the two-tower also proposes
    a = FixedLists({1: [118, 121, 124], 2: [130]})
    b = FixedLists({1: [160, 118], 2: []})
    merged = MergedRetriever({"two_tower": toy["cascade"].retriever, "a": a, "b": b},
                             {"two_tower": 0.5, "a": 0.25, "b": 0.25})
    c = toy["cascade"]
    return Cascade(merged, c.preranker, c.ranker, seen), (c.retriever, a, b)


def test_merged_retrieval_names_its_channels_times_each_and_tells_who_proposed_each_candidate(toy):
    casc, (tt, a, b) = _merged_cascade(toy)
    req = Requests(np.array([1, 2, 1.5]), np.array([5, 5, 5]))  # the last one is invalid: no list, no origin
    res = casc.recommend(req, n_retrieve=8, n_prerank=6, k=3, return_stages=True)
    assert res.channels == ("two_tower", "a", "b") and casc.channels == res.channels
    assert set(res.timing_s) == {"retrieval", "prerank", "rank", "retrieval/two_tower", "retrieval/a", "retrieval/b"}
    items = res.stages["retrieval"][0]
    tt1 = tt.select(Requests(np.array([1]), np.array([5])), None, 8)[0][0]
    # keys (r + 0.5) / quota: two-tower 1, 3, 5, 7, ...; a and b 2, 6, 10; at equal keys the earlier channel first.
    # user 1: tt0 (1), a:118 (2), b:160 (2), tt1 (3), tt2 (5), a:121 (6), b:118 (6, already placed by a), tt3 (7)
    want = [tt1[0], 118, 160, tt1[1], tt1[2], 121, tt1[3]]
    want_origin = [0, 1, 2, 0, 0, 1, 0]
    assert not {118, 121, 160} & set(tt1[:4].tolist())  # the toy's two-tower list: the hand-worked order holds
    np.testing.assert_array_equal(items[0, :7], want)
    np.testing.assert_array_equal(res.origin[0, :7], want_origin)
    # user 2: a proposes 130 only, b nothing: the two-tower fills the rest
    row = dict(zip(items[1].tolist(), res.origin[1].tolist()))
    assert row[130] == 1 and sum(o == 0 for o in row.values()) == 7 and 2 not in row.values()
    assert (res.origin[2] == -1).all() and (items[2] == PAD).all()
    # the single two-tower cascade: no channels, no origin, the three stage timings only
    single = toy["cascade"].recommend(req, 8, 6, 3, return_stages=True)
    assert single.channels == () and single.origin is None and set(single.timing_s) == {"retrieval", "prerank", "rank"}


def test_the_prerank_keeps_the_channels_quotas_when_asked(toy):
    """Without quotas the pre-rank keeps its best n of the union, whatever channel proposed them; with them each
    channel keeps its quota of the pre-rank's n (its own candidates in pre-rank score order), so a channel whose
    candidates the pre-rank scores low still reaches the ranker. Without channels the option is an error."""
    casc, (tt, a, b) = _merged_cascade(toy)
    c = toy["cascade"]
    quota = Cascade(casc.retriever, c.preranker, c.ranker, prerank_quotas=True)
    req = Requests(np.array([1, 2]), np.array([5, 5]))
    plain = casc.recommend(req, 8, 4, 3, return_stages=True)
    kept = quota.recommend(req, 8, 4, 3, return_stages=True)
    ri, ro = plain.stages["retrieval"][0], plain.origin
    np.testing.assert_array_equal(ri, kept.stages["retrieval"][0])
    pre_scores = c.preranker.scores(req, ri)
    # quotas 1/2, 1/4, 1/4 of 4 slots, keys (r + 0.5) / quota: two-tower 1, 3, 5; a 2, 6; b 2, 6. User 1: the
    # two-tower's best 2 by pre-rank score, a's best 1 and b's best 1; user 2 (b proposes nothing, a only 130):
    # the two-tower's best 3 and 130
    for row, per_channel in ((0, (2, 1, 1)), (1, (3, 1, 0))):
        score = dict(zip(ri[row].tolist(), pre_scores[row].tolist()))
        origin = dict(zip(ri[row].tolist(), ro[row].tolist()))
        by_score = sorted(score, key=lambda x: -score[x])
        assert plain.stages["prerank"][0][row].tolist() == by_score[:4]
        want = [x for ch, n in enumerate(per_channel) for x in [y for y in by_score if origin[y] == ch][:n]]
        got = kept.stages["prerank"][0][row]
        assert sorted(got[got != PAD].tolist()) == sorted(want)
        assert np.all(np.diff(kept.stages["prerank"][1][row][got != PAD]) <= 0)  # best pre-rank score first
    # user 1: a's 121 and b's 160 reach the ranker only through their quotas (the pre-rank ranks them lower)
    assert {121, 160} <= set(kept.stages["prerank"][0][0].tolist())
    assert not {121, 160} & set(plain.stages["prerank"][0][0].tolist())
    with pytest.raises(ValueError, match="single channel"):
        Cascade(c.retriever, c.preranker, c.ranker, prerank_quotas=True)


def test_merged_retrieval_filters_seen_items_and_keeps_the_origins_of_what_is_left(toy):
    from cascade.serve.cascade import select_unseen, select_unseen_origin

    casc, _ = _merged_cascade(toy)
    req = Requests(np.array([1]), np.array([100]))
    before = casc.recommend(req, 8, 6, 3, return_stages=True)
    b_items, b_origin = before.stages["retrieval"][0][0], before.origin[0]
    # user 1 saw 118 (a's first item) and the two-tower's first item before t=100
    casc.seen = EventHistory(np.array([1, 1]), np.array([118, b_items[0]]), np.array([10, 20]))
    after = casc.recommend(req, 8, 6, 3, return_stages=True, filter_seen=True)
    a_items, a_origin = after.stages["retrieval"][0][0], after.origin[0]
    assert 118 not in a_items and b_items[0] not in a_items and (a_items != PAD).all()
    # what was kept keeps its channel; 118 was a's, now a's next item takes its place
    was = dict(zip(b_items.tolist(), b_origin.tolist()))
    assert all(was[i] == o for i, o in zip(a_items.tolist(), a_origin.tolist()) if i in was)
    assert dict(zip(a_items.tolist(), a_origin.tolist()))[121] == 1
    # with and without origins the filtered lists are the same
    i1, s1 = select_unseen(casc.retriever, req, 8, casc.seen)
    i2, s2, _ = select_unseen_origin(casc.retriever, req, 8, casc.seen)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(i1[0], a_items)


def test_retriever_turns_the_index_padding_into_minus_inf():
    """An index that finds fewer than k items pads the end of a row with id -1 and a finite score (faiss: -FLT_MAX,
    or a stub's 0): the retriever gives those slots -inf, at batch 1 and in a batch, and leaves full rows alone."""

    class Short:
        def search(self, xq, k):
            rows = [[5, 3, PAD, PAD], [7, 6, 2, 1]][: len(xq)]
            return np.zeros((len(xq), k), np.float32) + 0.5 * (np.array(rows) != PAD), np.array(rows, np.int64)

    r = Retriever(lambda q: np.ones((len(q.user_id), 2), np.float32), Short())
    for b in (1, 2):
        q = Requests(user_id=np.arange(b), time_ms=np.zeros(b, np.int64))
        i, d = r.select(q, None, 4)
        assert i[0].tolist() == [5, 3, PAD, PAD] and d[0].tolist() == [0.5, 0.5, -np.inf, -np.inf]
        if b == 2:
            assert d[1].tolist() == [0.5] * 4


def test_a_user_who_saw_more_than_the_over_fetch_still_gets_a_full_list(toy):
    """select_unseen over-fetches at most MAX_OVERFETCH x n at first; a user who saw more of the stage's best items
    than that is fetched again with all they saw on top: n unseen items, the exact best n unseen, beside a light
    user of the same batch whose list is untouched."""
    from cascade.serve.cascade import MAX_OVERFETCH, select_unseen, select_unseen_origin

    retriever = toy["cascade"].retriever
    req = Requests(np.array([3, 4]), np.array([1000, 1000]))
    n = 2
    full = retriever.select(req, None, 60)[0]
    heavy = full[0, : MAX_OVERFETCH * n + 5]  # user 3 saw the retriever's 13 best items for them
    seen = EventHistory(np.r_[np.full(len(heavy), 3), [4]], np.r_[heavy, full[1, 0]], np.arange(len(heavy) + 1))
    items, scores = select_unseen(retriever, req, n, seen)
    np.testing.assert_array_equal(items[0], full[0, len(heavy): len(heavy) + n])  # the next two after what they saw
    np.testing.assert_array_equal(items[1], full[1, 1: 1 + n])
    assert np.isfinite(scores).all()
    merged, _ = _merged_cascade(toy)
    i1, s1 = select_unseen(merged.retriever, req, n, seen)
    i2, s2, origin = select_unseen_origin(merged.retriever, req, n, seen)
    np.testing.assert_array_equal(i1, i2)
    assert (i1 != PAD).all() and (origin >= 0).all() and not np.isin(i1[0], heavy).any()
