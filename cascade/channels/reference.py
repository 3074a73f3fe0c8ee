"""The plain whole-corpus computations of the channels' lists, which their served paths replace.

Each function gives, for a fitted channel, the lists its ``select`` gives, computed the direct way: counts over the
whole catalogue per refresh period (most-popular), scipy's product of the recent-click weights with the whole
similarity matrix (item-CF), every item of the request's categories scored (content). Their cost grows with the
corpus; the channels' own paths read only what a request touches. tests/test_channels.py checks that both give
identical lists, and benchmarks/bench_serving.py --channels times both. ALS: every item scored, those without
factors masked (:func:`als_lists`); the channel scores only the items with factors, through its index.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..arrays import PAD, topk_rows
from ..data.requests import Requests
from .classic import DAY_MS, ALSChannel, ContentChannel, ItemCFChannel, PopularChannel, sparse_topk


def plain_recent_weights(ch: ItemCFChannel | ContentChannel, requests: Requests) -> sp.csr_matrix:
    """The recent-click weights [B, I] (:func:`cascade.channels.classic.recent_weights`) through scipy's conversion
    from coordinates: each request's last n_history clicked items, weighted decay ** age."""
    recent, _ = ch.history.recent(requests.user_id, requests.time_ms, ch.n_history)
    cols, known = ch._items.find(recent)
    ok = known & (recent != PAD)
    w = np.where(ok, ch.decay ** np.arange(ch.n_history)[None, :], 0.0)
    rows = np.broadcast_to(np.arange(len(recent))[:, None], recent.shape)
    return sp.csr_matrix((w[ok], (rows[ok], cols[ok])), shape=(len(recent), len(ch._items)))


def popular_lists(ch: PopularChannel, requests: Requests, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Most-popular: per refresh period, every item's click count in the window, then the top n."""
    period = (np.asarray(requests.time_ms, np.int64) // ch.refresh_ms) * ch.refresh_ms
    out_i = np.full((len(requests), n), PAD, np.int64)
    out_s = np.full((len(requests), n), -np.inf, np.float32)
    window = None if ch.window_days is None else int(round(ch.window_days * DAY_MS))
    for s in np.unique(period):
        counts = ch.history.item_counts(int(s), window)
        ids = np.where(counts > 0, ch.history.items.sorted_ids, PAD)
        top_i, top_s = topk_rows(counts[None, :], ids[None, :], n)
        out_i[period == s], out_s[period == s] = top_i[0], top_s[0].astype(np.float32)
    return out_i, out_s


def itemcf_lists(ch: ItemCFChannel, requests: Requests, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Item-CF: scipy's product of the recent-click weights [B, I] and the whole similarity matrix [I, I]."""
    scores = (plain_recent_weights(ch, requests) @ ch._sim).tocsr()
    scores.data = scores.data.astype(np.float32)
    scores.eliminate_zeros()
    return sparse_topk(scores, ch.item_ids_, n)


def content_lists(ch: ContentChannel, requests: Requests, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Content: every item of the request's categories scored, h @ item->category @ category->item + popularity."""
    h = plain_recent_weights(ch, requests)
    scores = ((h @ ch._to_category).tocsr() @ ch._to_category.T).tocsr()
    scores.data = (scores.data + ch.pop_rank_[scores.indices]).astype(np.float32)
    return sparse_topk(scores, ch.item_ids_, n)


def als_lists(ch: ALSChannel, requests: Requests, n: int) -> tuple[np.ndarray, np.ndarray]:
    """ALS: the user's factors against every item's ([B, factors] x [factors, I]), items without factors and users
    without factors or train clicks masked out, then the exact top n."""
    pos, known = ch._users.find(np.asarray(requests.user_id, np.int64))
    known &= np.any(ch.user_factors_[pos] != 0, axis=1)
    s = ch.user_factors_[pos] @ ch.item_factors_.T
    has = np.any(ch.item_factors_ != 0, axis=1)
    s = np.where(known[:, None] & has[None, :], s, -np.inf).astype(np.float32)
    return topk_rows(s, np.broadcast_to(ch.item_ids_, s.shape), n)
