"""The towers' recent-popularity prior: its spread, its counts by hand, and the retriever that serves it."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.arrays import PAD, topk_rows
from cascade.channels import PopularChannel
from cascade.channels.prior import PopularityPrior
from cascade.data.ids import IdIndex
from cascade.index.exact import exact_topk
from cascade.serve.cascade import Retriever
from worlds import event_history, requests_at

DAY = 86_400_000


def test_spread_is_the_std_of_each_users_scores_over_the_corpus():
    rng = np.random.default_rng(0)
    emb, u = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    prior = PopularityPrior(PopularChannel(event_history([(1, 10, 0, 1)]), 1.0, DAY), 1.0, emb, IdIndex(np.arange(50)),
                            temperature=0.5)
    np.testing.assert_allclose(prior.spread(u), np.std(u @ emb.T / 0.5, axis=1, ddof=1), rtol=1e-5)


def test_counts_are_the_popular_channels_by_hand():
    # item 11: 3 clicks at 2 DAY, item 10: 2 clicks at 1 DAY, item 12: a non-click at 2 DAY and a click after 3 DAY
    h = event_history([(1, 10, 1 * DAY, 1), (2, 10, 1 * DAY, 1), (3, 11, 2 * DAY, 1), (4, 11, 2 * DAY, 1),
               (5, 11, 2 * DAY, 1), (6, 12, 2 * DAY, 0), (7, 12, 3 * DAY + 5, 1)])
    # the towers' rows: 0 -> item 12, 1 -> item 10, 2 -> item 11, 3 -> item 13; row 4 is the OOV row
    ids = np.array([12, 10, 11, 13])
    prior = PopularityPrior(PopularChannel(h, window_days=1.5, refresh_ms=DAY), 2.0, np.eye(4, dtype=np.float32),
                            IdIndex(ids))
    req = requests_at([9, 9], [3 * DAY + 10, 2 * DAY])
    rows = np.array([[2, 1, 0, PAD], [2, 1, 0, 4]])  # items 11, 10, 12, then PAD / the OOV row
    # request 0: window [1.5 DAY, 3 DAY) as of the refresh at 3 DAY: 11 three times, nothing else;
    # request 1: [0.5 DAY, 2 DAY): 10 twice
    want = np.log1p([[3, 0, 0, 0], [0, 2, 0, 0]])
    np.testing.assert_allclose(prior.log_counts(req, rows), want, rtol=1e-6)
    u = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0]], np.float32)
    spread = prior.spread(u)
    np.testing.assert_allclose(prior.boost(req, u, rows), 2.0 * spread[:, None] * want, rtol=1e-6)
    corpus = np.broadcast_to(np.arange(4), (2, 4))
    np.testing.assert_allclose(prior.boost_corpus(req, u), prior.boost(req, u, corpus), rtol=1e-6)
    np.testing.assert_array_equal(prior.candidates(req, 2), [[2, PAD], [1, PAD]])
    # requests of one refresh period share its counts
    one = requests_at([1, 2], [3 * DAY + 10, 3 * DAY + 99])
    np.testing.assert_allclose(prior.log_counts(one, rows), np.log1p([[3, 0, 0, 0], [3, 0, 0, 0]]), rtol=1e-6)


def test_refresh_prepares_each_period_once_ahead_of_its_requests():
    """refresh(times) counts each new refresh period's list and dense log counts once (a server's timer); the
    requests of a prepared period then count nothing; the popular channel and the prior say how many were new."""
    h = event_history([(1, 10, 1 * DAY, 1), (2, 11, 2 * DAY, 1), (3, 11, 2 * DAY, 1)])
    popular = PopularChannel(h, window_days=3.0, refresh_ms=DAY)
    prior = PopularityPrior(popular, 1.0, np.eye(3, dtype=np.float32), IdIndex(np.array([10, 11, 12])))
    times = np.array([3 * DAY + 5, 3 * DAY + 9, 4 * DAY + 1])
    assert prior.refresh(times) == 2 and prior.refresh(times) == 0  # periods 3 DAY and 4 DAY, then nothing new
    assert popular.refresh(times) == 0 and popular.refresh(np.array([5 * DAY])) == 1
    calls = []
    h.clicked_items = lambda *a: calls.append(a)  # a request of a prepared period must not count again
    req = requests_at([9], [3 * DAY + 7])
    np.testing.assert_allclose(prior.log_counts(req, np.array([[0, 1, 2]])), np.log1p([[1, 2, 0]]), rtol=1e-6)
    assert popular.select(req, None, 2)[0].tolist() == [[11, 10]] and calls == []


def test_weight_must_be_finite_and_not_negative():
    ch = PopularChannel(event_history([(1, 10, 0, 1)]), 1.0, DAY)
    for w in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            PopularityPrior(ch, w, np.eye(3, dtype=np.float32), IdIndex(np.arange(3)))


class _Towers:
    """What a Retriever reads of towers with a prior (as cascade.run_data.Towers has them): ``prior``, ``n_real``,
    ``inputs.item_ids``, ``item_rows`` and ``row_scores`` (<u, v> plus the prior)."""

    def __init__(self, emb, ids, prior):
        self.emb, self.prior, self.n_real = np.vstack([emb, np.zeros((1, emb.shape[1]), emb.dtype)]), prior, len(ids)
        self.inputs = type("Inputs", (), {"item_ids": np.r_[ids, -(2**31)]})()

    def item_rows(self, item_ids):
        rows = np.searchsorted(self.inputs.item_ids[:-1], item_ids)
        return np.where((rows < self.n_real) & (self.inputs.item_ids[np.minimum(rows, self.n_real)] == item_ids),
                        rows, self.n_real)

    def row_scores(self, requests, u, rows):
        return np.einsum("bd,bnd->bn", u, self.emb[rows]) + self.prior.boost(requests, u, rows)


class _Exact:
    def __init__(self, emb, ids):
        self.emb, self.ids = emb, ids

    def search(self, xq, k):
        d, i = exact_topk(xq, self.emb, k, metric="ip")
        return d, self.ids[i]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retriever_with_a_prior_is_the_exact_top_k_of_the_full_score(seed):
    """When the items clicked in the window fit in k, the index's top k by <u, v> plus the prior's top k hold the
    exact top k of <u, v> + prior over the corpus (an item without clicks scores <u, v> alone)."""
    rng = np.random.default_rng(seed)
    n_items, d, k = 300, 8, 20
    ids = np.arange(1000, 1000 + n_items, dtype=np.int64)
    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    clicked = rng.choice(ids, 15, replace=False)  # fewer than k items clicked in the window
    rows = [(int(rng.integers(100)), int(i), int(rng.integers(0, DAY)), 1) for i in clicked for _ in
            range(int(rng.integers(1, 30)))]
    popular = PopularChannel(event_history(rows), window_days=2.0, refresh_ms=DAY)
    prior = PopularityPrior(popular, 1.0, emb, IdIndex(ids))
    req = requests_at([1, 2, 3, 4], [DAY + 5, DAY + 9, DAY + 50, DAY + 70])
    u = rng.normal(size=(4, d)).astype(np.float32)
    towers = _Towers(emb, ids, prior)
    retriever = Retriever(lambda r: u, _Exact(emb, ids), towers, data=object())
    got_ids, got_s = retriever.select(req, None, k)
    full = u @ emb.T + prior.boost_corpus(req, u)
    want_ids, want_s = topk_rows(full, np.broadcast_to(ids, full.shape), k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
    # one request at a time (the serving path drops the prior's items the index found another way) alike
    for b in range(len(u)):
        one = Retriever(lambda r, b=b: u[b:b + 1], _Exact(emb, ids), towers, data=object())
        got = one.select(req.take(np.array([b])), None, k)
        np.testing.assert_array_equal(got[0][0], want_ids[b])
        np.testing.assert_allclose(got[1][0], want_s[b], rtol=1e-5)
    # the prior moves the list: without it the index's answer differs for some request
    assert not np.array_equal(_Exact(emb, ids).search(u, k)[1], want_ids)


def test_retriever_needs_the_data_for_a_prior():
    emb = np.eye(3, dtype=np.float32)
    prior = PopularityPrior(PopularChannel(event_history([(1, 10, 0, 1)]), 1.0, DAY), 1.0, emb, IdIndex(np.arange(3)))
    with pytest.raises(ValueError, match="need the run's data"):
        Retriever(lambda r: emb[:1], _Exact(emb, np.arange(3)), _Towers(emb, np.arange(3), prior))
