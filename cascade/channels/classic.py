"""The classic retrieval channels: most-popular, the user's recent items, item-to-item CF, content, ALS, EASE.

Each answers ``select(requests, None, n) -> (item_ids int64 [B, n], scores float32 [B, n])`` (PAD / -inf where it
has fewer than n items). They read the logged history only strictly before each request's time
(:class:`~cascade.data.history.EventHistory`), and what they learn offline (co-click similarities, ALS factors)
comes from the train period's clicks only, so a later event never changes an earlier request's list.

Per request they cost what the request touches, not the corpus (batch-1 serving at 1M items,
benchmarks/bench_serving.py --channels): most-popular keeps each refresh period's whole ranked list; item-CF reads the
similarity rows of the user's recent items only; content merges per-category lists ranked by popularity; ALS
searches a FAISS inner-product index over its item factors (:meth:`ALSChannel.build_index`: exact Flat for small
corpora, IVF at a measured recall above, :func:`als_factory`); EASE (small catalogues only) multiplies the user's
clicked items by its dense item-item weights. Each fast path gives the lists of the plain
computation it replaces (:mod:`.reference`; tests/test_channels.py checks them against it, and the IVF index
against exact search). :func:`load_channels` reads the channels a run saved, every file checked against the step's
manifest.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from .. import artifacts as A
from ..arrays import PAD, topk_rows
from ..data.history import EventHistory
from ..data.ids import IdIndex
from ..data.requests import Requests
from ..index.factory import DEFAULT_NPROBES, FLAT_MAX_ITEMS, ivf_factory
from ..index.faiss_index import IDS_FILE, INDEX_FILE, ItemIndex

DAY_MS = 86_400_000
EASE_MAX_ITEMS = 10_000  # the ease channel's dense float32 weights: 400 MB at this size
_GRAM_LOCK = threading.Lock()  # EaseChannel.corpus_moments' one-off B B'


def check_select(name: str, candidates: np.ndarray | None, n: int) -> None:
    """A channel searches the whole corpus: candidates must be None and n >= 1."""
    if candidates is not None:
        raise ValueError(f"the {name} channel searches the whole corpus: candidates must be None")
    if n < 1:
        raise ValueError(f"the {name} channel: n must be >= 1, got {n}")


def _dense_topk(score_rows, n_rows: int, ids: np.ndarray, n: int, chunk_cells: int = 1 << 24):
    """Top-n (ids, scores) per row of a dense score matrix built chunk by chunk: score_rows(slice) -> float32
    [rows, I] (-inf: not proposed); each chunk holds about ``chunk_cells`` scores."""
    step = max(1, chunk_cells // max(len(ids), 1))
    out_i = np.full((n_rows, n), PAD, np.int64)
    out_s = np.full((n_rows, n), -np.inf, np.float32)
    for r0 in range(0, n_rows, step):
        sl = slice(r0, min(r0 + step, n_rows))
        s = score_rows(sl)
        out_i[sl], out_s[sl] = topk_rows(s, np.broadcast_to(ids, s.shape), n)
    return out_i, out_s


def sparse_topk(scores: sp.csr_matrix, ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n (ids, scores) per row of a sparse score matrix [B, I] (only stored entries are candidates; ties to
    the lower column): cost follows the stored entries, not B x I."""
    scores = scores.tocsr()
    scores.sum_duplicates()  # canonical format: each row's columns ascending, so a stable sort keeps ties in that order
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
    return topk_entries(rows, scores.indices, scores.data, scores.shape[0], ids, n)


def topk_entries(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, n_rows: int, ids: np.ndarray,
                 n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sparse_topk` of the entries (rows, cols, scores) [E] of a [n_rows, I] matrix given in canonical order
    (by row, then column ascending, no (row, column) twice), without building the matrix: the batch-1 serving
    path pays no scipy construction."""
    order = np.lexsort((-scores, rows))  # by row, score descending, column ascending
    first = np.searchsorted(rows, np.arange(n_rows))  # each row's first entry
    rank = np.arange(len(order)) - first[rows[order]]
    keep = order[rank < n]
    out_i = np.full((n_rows, n), PAD, np.int64)
    out_s = np.full((n_rows, n), -np.inf, np.float32)
    slot = rank[rank < n]
    out_i[rows[keep], slot] = ids[cols[keep]]
    out_s[rows[keep], slot] = scores[keep]
    return out_i, out_s


def _click_matrix(train: EventHistory, items: IdIndex) -> sp.csr_matrix:
    """Binary users x items matrix of the clicks of ``train`` (a pair clicked several times counts once)."""
    c = train.click
    x = sp.csr_matrix((np.ones(int(c.sum()), np.float32), (train.user_code[c], items.rows(train.item_id[c]))),
                      shape=(len(train.users), len(items)))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def recent_weights(history: EventHistory, requests: Requests, n_history: int, decay: float,
                   items: IdIndex) -> sp.csr_matrix:
    """sparse [B, I]: each request's last ``n_history`` clicked items before it, weighted decay ** age (the most
    recent 1); items outside ``items`` are left out. Built in CSR form directly (each row's columns ascending, as
    scipy's conversion from coordinates gives them)."""
    recent, _ = history.recent(requests.user_id, requests.time_ms, n_history)
    cols, known = items.find(recent)
    ok = known & (recent != PAD)
    rows, age = np.nonzero(ok)  # row-major
    col = cols[ok]
    order = np.lexsort((col, rows))
    indptr = np.zeros(len(recent) + 1, np.int64)
    np.cumsum(ok.sum(axis=1), out=indptr[1:])
    return sp.csr_matrix(((decay ** np.arange(n_history))[age][order], col[order], indptr),
                         shape=(len(recent), len(items)))


def keep_top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The k largest entries of each row of a sparse matrix (the others dropped); one lexsort, no per-row Python."""
    m = m.tocsr()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, rows))  # by row, then value descending
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < k]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


def weighted_rows(h: sp.csr_matrix, m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The product h @ m of a sparse h [B, I] with few entries per row and a sparse m [I, J], reading only the rows
    of m that h names: (rows int64, columns int64, sums float64) of its nonzero entries, by row then column.

    The sums are the ones scipy's ``h @ m`` gives, bit for bit (float64 products summed in h's stored order, then
    m's row order, from 0), at the cost of the entries read: scipy's product copies the whole of m to float64 and
    allocates a [J] accumulator per call (item-CF with 100 neighbours for each of 100K items: 27 ms per request,
    0.2 ms this way; 1M items: 109 ms and 0.4 ms)."""
    h, m = h.tocsr(), m.tocsr()
    rows_h = np.repeat(np.arange(h.shape[0], dtype=np.int64), np.diff(h.indptr))
    count = m.indptr[h.indices + 1] - m.indptr[h.indices]  # the named rows only: no pass over all of m.indptr
    src = np.repeat(np.arange(h.nnz), count)  # the h entry of each product, in h's order
    pos = m.indptr[h.indices][src] + np.arange(len(src)) - np.repeat(np.cumsum(count) - count, count)
    key = rows_h[src] * m.shape[1] + m.indices[pos]
    vals = h.data[src].astype(np.float64) * m.data[pos].astype(np.float64)
    keys, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv.ravel(), weights=vals, minlength=len(keys))  # sequential adds, in the products' order
    nz = sums != 0
    return keys[nz] // m.shape[1], keys[nz] % m.shape[1], sums[nz]


class Channel:
    """Shared by the channels: ``__init__`` stores the settings (``PARAMS``) and the history to read; ``fit``
    learns from the train period (learned attributes end in ``_``: ``LEARNED``); ``save`` / ``load`` keep the
    settings in ``channel.json`` and the learned arrays in ``channel.npz``, so a run serves exactly the channel it
    built and tuned."""

    name = "channel"
    PARAMS: tuple[str, ...] = ()
    LEARNED: tuple[str, ...] = ()

    def fit(self, train: EventHistory, item_ids: np.ndarray) -> Channel:
        return self

    def params(self) -> dict:
        return {k: getattr(self, k) for k in self.PARAMS}

    def save(self, folder: Path) -> list[str]:
        """Write channel.json (+ channel.npz when it learned arrays); return the file names."""
        A.write_json(folder / "channel.json", {"name": self.name, "params": self.params()})
        if not self.LEARNED:
            return ["channel.json"]
        A.write_npz(folder / "channel.npz", **{k: getattr(self, k) for k in self.LEARNED})
        return ["channel.json", "channel.npz"]

    @classmethod
    def load(cls, folder: Path, history: EventHistory) -> Channel:
        meta = A.read_json(folder / "channel.json")
        if meta.get("name") != cls.name:
            raise ValueError(f"{folder}: holds channel {meta.get('name')!r}, not {cls.name!r}")
        ch = cls(history, **meta["params"])
        if cls.LEARNED:
            arrays = A.read_npz(folder / "channel.npz")
            for k in cls.LEARNED:
                setattr(ch, k, arrays[k])
            ch._restored()
        return ch

    def _restored(self) -> None:
        """Rebuild derived state after ``load`` set the learned arrays."""


class PeriodCache:
    """Values computed once per key (a refresh period) and kept, at most ``size`` of them: a replay walks forward
    in time and does not ask old periods again, so a full cache is emptied, not evicted entry by entry. Threads may
    share it: :meth:`get` returns the entry it found or computed, never a second lookup another thread's
    :meth:`clear` could miss."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: dict = {}

    def __contains__(self, key) -> bool:
        return key in self._kept

    def get(self, key, compute):
        """The value kept for ``key``, or ``compute()`` kept for it."""
        kept = self._kept.get(key)
        if kept is None:
            kept = compute()
            if len(self._kept) >= self.size:
                self._kept.clear()
            self._kept[key] = kept
        return kept

    def clear(self) -> None:
        self._kept.clear()


class PopularChannel(Channel):
    """The most clicked items of the ``window_days`` (None: all history) before the request, as of the last
    refresh: a request at t sees the clicks in [s - window, s) with s = t rounded down to ``refresh_ms``, so the
    requests of one refresh period share one list. scores: the click counts. Nothing to learn.

    Each refresh period's whole ranked list (every item clicked in its window, by count, ties to the lower item id)
    is counted once, from the window's clicks only, and kept: a request of any length n takes its first n."""

    name = "popular"
    PARAMS = ("window_days", "refresh_ms")

    def __init__(self, history: EventHistory, window_days: float | None = 7.0, refresh_ms: int = 3_600_000) -> None:
        if window_days is not None and not window_days > 0:
            raise ValueError(f"PopularChannel: window_days must be > 0 or None, got {window_days}")
        if refresh_ms < 1:
            raise ValueError(f"PopularChannel: refresh_ms must be >= 1, got {refresh_ms}")
        self.history, self.window_days, self.refresh_ms = history, window_days, int(refresh_ms)
        self._cache = PeriodCache(256)  # period start -> ranked's list
        self._logs = PeriodCache(256)  # (period start, corpus size) -> standardised's log counts

    def ranked(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """The list of the refresh period starting at ``s``: (item ids int64 [m], click counts float32 [m]) of the
        m items clicked in its window, most clicked first, ties to the lower item id."""
        return self._cache.get(s, lambda: self._counted(s))

    def _counted(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        window = None if self.window_days is None else int(round(self.window_days * DAY_MS))
        codes, counts = self.history.clicked_items(s, window)
        order = np.lexsort((codes, -counts))  # count descending, then item code (= id order) ascending
        return self.history.items.sorted_ids[codes[order]], counts[order].astype(np.float32)

    def period_starts(self, t_ms: np.ndarray) -> np.ndarray:
        """int64 [B]: the start of the refresh period of each time ``t_ms`` [B]."""
        return (np.asarray(t_ms, np.int64) // self.refresh_ms) * self.refresh_ms

    def refresh(self, t_ms: np.ndarray) -> int:
        """Count the lists of the refresh periods of the times ``t_ms`` [B] ahead of their requests (a server does
        it on a timer, off the request path); returns how many were not counted yet."""
        new = [int(s) for s in np.unique(self.period_starts(t_ms)) if int(s) not in self._cache]
        for s in new:
            self.ranked(s)
        return len(new)

    def standardised(self, requests: Requests, candidates: np.ndarray, n_items: int) -> np.ndarray:
        """float32 [B, N]: each candidate's log(1 + its clicks in the request's window) standardised over a corpus of
        ``n_items`` items for the request's refresh period (an item without a click there counts 0; mean and SD of
        log(1 + count) over the corpus); 0 for padding, and where no item of the corpus was clicked (SD 0)."""
        cand = np.asarray(candidates, np.int64)
        period = self.period_starts(requests.time_ms)
        out = np.zeros(cand.shape, np.float32)
        for s in np.unique(period):
            rows = np.flatnonzero(period == s)
            ids, logs, mean, sd = self._log_counts(int(s), n_items)
            if not sd > 0:
                continue
            sub = cand[rows]
            pos = np.minimum(np.searchsorted(ids, sub), len(ids) - 1)
            value = np.where(ids[pos] == sub, logs[pos], 0.0)
            out[rows] = np.where(sub == PAD, 0.0, (value - mean) / sd)
        return out

    def _log_counts(self, s: int, n_items: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The period's clicked item ids in id order [m], their log(1 + count) [m], and its mean and SD over a
        corpus of ``n_items`` (the unclicked items counting 0): counted once per period, as :meth:`ranked` is."""
        def computed() -> tuple[np.ndarray, np.ndarray, float, float]:
            ids, counts = self.ranked(s)
            order = np.argsort(ids)
            logs = np.log1p(counts[order].astype(np.float64))
            mean = float(logs.sum() / n_items)
            sd = float(np.sqrt(max(float((logs ** 2).sum() / n_items - mean ** 2), 0.0)))
            return ids[order], logs, mean, sd

        return self._logs.get((s, int(n_items)), computed)

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        period = self.period_starts(requests.time_ms)
        items = np.full((len(requests), n), PAD, np.int64)
        scores = np.full((len(requests), n), -np.inf, np.float32)
        for s in np.unique(period):
            rows = period == s
            ids, counts = self.ranked(int(s))
            m = min(n, len(ids))
            items[rows, :m], scores[rows, :m] = ids[:m], counts[:m]
        return items, scores


class RecentChannel(Channel):
    """The user's own last clicked items before the request, most recent first (re-consumption); scores fall
    with age: -position. Nothing to learn."""

    name = "recent"

    def __init__(self, history: EventHistory) -> None:
        self.history = history

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        items, _ = self.history.recent(requests.user_id, requests.time_ms, n)
        scores = np.where(items == PAD, -np.inf, -np.arange(n, dtype=np.float32)[None, :])
        return items, scores.astype(np.float32)


class ItemCFChannel(Channel):
    """Item-to-item collaborative filtering: the items co-clicked with the user's recent clicks.

    fit: sim(i, j) = cosine of the items' click vectors over the users of the train period (each item keeps its
    ``neighbours`` most similar items). A request's score of item j: the sum over its last ``n_history`` clicks i
    before the request (read from ``history``) of decay ** age(i) * sim(i, j); items with no similarity to them are
    not proposed."""

    name = "itemcf"
    PARAMS = ("neighbours", "n_history", "decay")
    LEARNED = ("item_ids_", "sim_data_", "sim_indices_", "sim_indptr_")

    def __init__(self, history: EventHistory, neighbours: int = 100, n_history: int = 20, decay: float = 0.9) -> None:
        if neighbours < 1 or n_history < 1 or not 0 < decay <= 1:
            raise ValueError(f"ItemCFChannel: need neighbours >= 1, n_history >= 1 and decay in (0, 1], got "
                             f"{neighbours}, {n_history}, {decay}")
        self.history, self.neighbours = history, int(neighbours)
        self.n_history, self.decay = int(n_history), float(decay)

    def fit(self, train: EventHistory, item_ids: np.ndarray) -> ItemCFChannel:
        self.item_ids_ = np.sort(np.asarray(item_ids, np.int64))
        items = IdIndex(self.item_ids_, "item_id", "itemcf")
        x = _click_matrix(train, items)
        norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        xn = x @ sp.diags(np.where(norm > 0, 1.0 / np.maximum(norm, 1e-12), 0.0).astype(np.float32))
        sim = (xn.T @ xn).tocsr()
        sim.setdiag(0)
        sim.eliminate_zeros()
        sim = keep_top_per_row(sim, self.neighbours)
        self.sim_data_, self.sim_indices_, self.sim_indptr_ = sim.data, sim.indices, sim.indptr
        self._restored()
        return self

    def _restored(self) -> None:
        n = len(self.item_ids_)
        self._items = IdIndex(self.item_ids_, "item_id", "itemcf")
        self._sim = sp.csr_matrix((self.sim_data_, self.sim_indices_, self.sim_indptr_), shape=(n, n))

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        h = recent_weights(self.history, requests, self.n_history, self.decay, self._items)
        rows, cols, sums = weighted_rows(h, self._sim)  # = h @ sim, from the rows of the recent items only
        s32 = sums.astype(np.float32)
        nz = s32 != 0  # the entries stay in canonical (row, column) order
        return topk_entries(rows[nz], cols[nz], s32[nz], len(requests), self.item_ids_, n)


class ContentChannel(Channel):
    """Popular items of the categories (tag, genre, ...) of the user's recent clicks.

    fit(train, item_ids, item_category): each item's category code (int [I], -1: none) and its popularity rank in
    (0, 1) by train clicks. A request's category weights: its last ``n_history`` clicks' categories, decayed by
    age; an item's score: its category's weight plus its popularity rank, so the user's strongest category comes
    first and popular items first within it. Items of categories the user never clicked are not proposed."""

    name = "content"
    PARAMS = ("n_history", "decay")
    LEARNED = ("item_ids_", "category_", "pop_rank_")

    def __init__(self, history: EventHistory, n_history: int = 20, decay: float = 0.9) -> None:
        if n_history < 1 or not 0 < decay <= 1:
            raise ValueError(f"ContentChannel: need n_history >= 1 and decay in (0, 1], got {n_history}, {decay}")
        self.history, self.n_history, self.decay = history, int(n_history), float(decay)

    def fit(self, train: EventHistory, item_ids: np.ndarray, item_category: np.ndarray | None = None) -> ContentChannel:
        item_ids = np.asarray(item_ids, np.int64)
        cat = np.asarray(item_category, np.int64)
        if cat.shape != item_ids.shape:
            raise ValueError(f"ContentChannel: item_category {cat.shape} needs one value per item ({item_ids.shape})")
        order = np.argsort(item_ids, kind="stable")
        self.item_ids_, self.category_ = item_ids[order], cat[order]
        clicks = train.item_counts(int(train.t_sorted[-1]) + 1 if len(train) else 0, None)
        pos, known = train.items.find(self.item_ids_)
        pop = np.where(known, clicks[pos], 0.0)
        rank = np.argsort(np.argsort(pop, kind="stable"), kind="stable")
        self.pop_rank_ = ((rank + 1) / (len(rank) + 1)).astype(np.float32)
        self._restored()
        return self

    def _restored(self) -> None:
        self._items = IdIndex(self.item_ids_, "item_id", "content")
        has = self.category_ >= 0
        n_cat = int(self.category_.max(initial=-1)) + 1
        self._to_category = sp.csr_matrix((np.ones(int(has.sum()), np.float32), (np.flatnonzero(has),
                                                                                 self.category_[has])),
                                          shape=(len(self.item_ids_), max(n_cat, 1)))
        # each category's items (columns), most popular first: category c holds _by_cat[_cat_start[c]:...[c + 1]]
        cols = np.flatnonzero(has)
        order = np.lexsort((-self.pop_rank_[cols], self.category_[cols]))
        self._by_cat = cols[order]
        self._cat_start = np.searchsorted(self.category_[cols][order], np.arange(max(n_cat, 1) + 1))

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """An item's score is float32(its category's weight + its popularity rank); within a category the order
        is the popularity order, so a request's top n lie among each of its categories' first n items and the
        items tied with the n-th (float32 rounding can tie neighbours): only those are scored."""
        check_select(self.name, candidates, n)
        h = recent_weights(self.history, requests, self.n_history, self.decay, self._items)
        rows, cats, w = weighted_rows(h, self._to_category)  # each request's weight of each of its categories
        start, end = self._cat_start[cats], self._cat_start[cats + 1]
        take = np.minimum(end - start, n)

        def score(pair: np.ndarray, pos: np.ndarray) -> np.ndarray:  # as h @ to_category @ to_category.T + rank
            return (w[pair] + self.pop_rank_[self._by_cat[pos]].astype(np.float64)).astype(np.float32)

        pair = np.repeat(np.arange(len(cats)), take)
        pos = start[pair] + np.arange(len(pair)) - np.repeat(np.cumsum(take) - take, take)
        extra_pair, extra_pos = [], []
        longer = np.flatnonzero(take < end - start)  # categories cut at n: add the run tied with the n-th item
        tied = longer[score(longer, start[longer] + n - 1) == score(longer, start[longer] + n)]
        for p in tied:
            last = score(np.array([p]), np.array([start[p] + n - 1]))[0]
            j = start[p] + n
            while j < end[p] and score(np.array([p]), np.array([j]))[0] == last:
                extra_pair.append(p)
                extra_pos.append(j)
                j += 1
        pair = np.concatenate([pair, np.array(extra_pair, np.int64)])
        pos = np.concatenate([pos, np.array(extra_pos, np.int64)])
        r, c = rows[pair], self._by_cat[pos]  # an item has one category: no (row, item) twice
        order = np.lexsort((c, r))
        return topk_entries(r[order], c[order], score(pair, pos)[order], len(requests), self.item_ids_, n)


ALS_FLAT_MAX_FLOATS = FLAT_MAX_ITEMS * 32


def als_factory(n_items: int, factors: int) -> str:
    """The default index of ALS item factors: exact "Flat" while a request scans at most ``ALS_FLAT_MAX_FLOATS``
    floats (200K items x 32: the two-tower default's Flat bound at its 32 dimensions, about 0.5 ms a query here;
    128 factors over 100K items took 3 ms, 30 times an IVF search at recall 0.95), IVF above (:func:`ivf_factory`)."""
    return "Flat" if n_items * factors <= ALS_FLAT_MAX_FLOATS else ivf_factory(n_items)


class ALSChannel(Channel):
    """Implicit-feedback matrix factorisation of the train clicks with ``implicit``'s AlternatingLeastSquares (one
    thread, so a seed reproduces it): score = <user factors, item factors>. Only the items and users ALS learned
    factors for (clicked in the train period; the others' factors are all zero) take part: other items are never
    proposed, other users get no list. factors / regularization / alpha / iterations: ALS's own settings; seed:
    its random_state.

    Without an index a request scores every item with factors (a [factors x items] product); after
    :meth:`build_index` (the channels step builds one for the chosen settings, saved beside the factors) a request
    is one search of a FAISS inner-product index over them, as the two-tower retriever's."""

    name = "als"
    PARAMS = ("factors", "regularization", "alpha", "iterations", "seed")
    LEARNED = ("item_ids_", "user_ids_", "user_factors_", "item_factors_")
    INDEX = "index"  # the index's sub-folder of the channel's folder

    def __init__(self, history: EventHistory, factors: int = 64, regularization: float = 0.05, alpha: float = 10.0,
                 iterations: int = 15, seed: int = 0) -> None:
        if factors < 1 or iterations < 1 or regularization < 0 or alpha <= 0:
            raise ValueError(f"ALSChannel: need factors >= 1, iterations >= 1, regularization >= 0 and alpha > 0, "
                             f"got {factors}, {iterations}, {regularization}, {alpha}")
        self.history, self.factors, self.regularization = history, int(factors), float(regularization)
        self.alpha, self.iterations, self.seed = float(alpha), int(iterations), int(seed)
        self.index: ItemIndex | None = None

    def fit(self, train: EventHistory, item_ids: np.ndarray) -> ALSChannel:
        import threadpoolctl
        from implicit.cpu.als import AlternatingLeastSquares

        self.item_ids_ = np.sort(np.asarray(item_ids, np.int64))
        self.user_ids_ = train.users.sorted_ids
        with threadpoolctl.threadpool_limits(1, "blas"):  # implicit's advice: no BLAS threads under its own
            model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                            alpha=self.alpha, iterations=self.iterations, random_state=self.seed,
                                            num_threads=1)
            model.fit(_click_matrix(train, IdIndex(self.item_ids_, "item_id", "als")), show_progress=False)
        self.user_factors_ = np.asarray(model.user_factors, np.float32)
        self.item_factors_ = np.asarray(model.item_factors, np.float32)
        self.index = None
        self._restored()
        return self

    def _restored(self) -> None:
        self._users = IdIndex(self.user_ids_, "user_id", "als")
        self._user_has = np.any(self.user_factors_ != 0, axis=1)
        self._scored = np.flatnonzero(np.any(self.item_factors_ != 0, axis=1))  # the items with factors

    def build_index(self, factory: str | None = None, recall_target: float = 0.95, k: int = 100,
                    n_queries: int = 1000, seed: int = 0) -> ItemIndex:
        """Serve from a FAISS inner-product index over the item factors: ``factory`` (None: :func:`als_factory`);
        an approximate one is set to the cheapest nprobe whose recall@k against exact search reaches
        ``recall_target`` on ``n_queries`` train users' factors (a seeded sample), and its measured recall kept in
        ``index.recall_``."""
        xb, d = self.item_factors_[self._scored], self.item_factors_.shape[1]
        if not len(xb) or not self._user_has.any():
            raise ValueError("ALSChannel.build_index: ALS learned no item or no user factors (no train clicks)")
        index = ItemIndex.build(xb, self.item_ids_[self._scored], metric="ip",
                                factory=factory or als_factory(len(xb), d), seed=seed, omp_threads=1)
        users = np.flatnonzero(self._user_has)
        xq = self.user_factors_[np.sort(np.random.default_rng(seed).choice(users, min(n_queries, len(users)),
                                                                             replace=False))]
        k = min(k, len(xb))
        if not index.is_exact:  # up to every list (exhaustive), so that the target is always reached
            nlist = index.spec.get("nlist", 1)
            index.sweep(xq, k, nprobes=sorted({*(v for v in DEFAULT_NPROBES if v < nlist),
                                               *(2 ** j for j in range(int(np.log2(nlist)) + 1)), nlist}))
            index.set_operating_point(recall_target)
        index.measure_recall(xq, k)
        self.index = index
        return index

    def save(self, folder: Path) -> list[str]:
        files = super().save(folder)
        if self.index is not None:  # tied to these factors by the hash of channel.npz (load checks it)
            self.index.save(folder / self.INDEX, model_hash=A.sha256_file(folder / "channel.npz"))
            files += [f"{self.INDEX}/{f}" for f in (INDEX_FILE, IDS_FILE, A.MANIFEST)]
        return files

    @classmethod
    def load(cls, folder: Path, history: EventHistory) -> ALSChannel:
        ch = super().load(folder, history)
        if (Path(folder) / cls.INDEX / A.MANIFEST).exists():
            ch.index = ItemIndex.load(Path(folder) / cls.INDEX,
                                      expect_model_hash=A.sha256_file(Path(folder) / "channel.npz"),
                                      expect_dim=ch.item_factors_.shape[1], expect_metric="ip", omp_threads=1)
        return ch

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        pos, known = self._users.find(np.asarray(requests.user_id, np.int64))
        known &= self._user_has[pos]
        if self.index is not None:
            d, i = self.index.search(np.ascontiguousarray(self.user_factors_[pos]), n)
            i = np.where(known[:, None], np.asarray(i, np.int64), PAD)
            return i, np.where(i == PAD, np.float32(-np.inf), np.asarray(d, np.float32))
        items = self.item_factors_[self._scored]

        def rows(sl: slice) -> np.ndarray:
            s = self.user_factors_[pos[sl]] @ items.T
            return np.where(known[sl, None], s, -np.inf).astype(np.float32)

        return _dense_topk(rows, len(requests), self.item_ids_[self._scored], n)


class EaseChannel(Channel):
    """EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): item-item weights in closed
    form from the train period's binary users x items click matrix X (a pair clicked twice counts once):
    P = (X'X + lam I)^-1, B = -P / diag(P), diag(B) = 0. A request's score of item j: sum over every item i its user
    clicked before the request (read from ``history``) of B[i, j]; users without such a click get no list.

    B is dense (float32 [I, I]), fitted by one dense inverse: catalogues of at most :data:`EASE_MAX_ITEMS` items
    (the fit raises above). On ML-100K's four last test periods most-popular + 0.25 x this channel's standardised
    scores beat most-popular by 0.021 click-recall@10 pooled, where ALS and item-CF did not (BENCHMARKS.md)."""

    name = "ease"
    PARAMS = ("lam",)
    LEARNED = ("item_ids_", "weights_")

    def __init__(self, history: EventHistory, lam: float = 200.0) -> None:
        if not (np.isfinite(lam) and lam > 0):
            raise ValueError(f"EaseChannel: lam must be a finite number > 0, got {lam}")
        self.history, self.lam = history, float(lam)

    def fit(self, train: EventHistory, item_ids: np.ndarray) -> EaseChannel:
        if len(item_ids) > EASE_MAX_ITEMS:
            raise ValueError(f"the ease channel: {len(item_ids):,} items, at most {EASE_MAX_ITEMS:,} (it inverts a "
                             f"dense items x items matrix); leave 'ease' out of channels.build for this catalogue")
        self.item_ids_ = np.sort(np.asarray(item_ids, np.int64))
        x = _click_matrix(train, IdIndex(self.item_ids_, "item_id", "ease"))
        g = (x.T @ x).astype(np.float64).toarray()  # the one dense I x I float64 of the fit
        g[np.diag_indices_from(g)] += self.lam
        # g is symmetric: its transpose is the Fortran-ordered array LAPACK inverts in place (one I x I float64)
        p = scipy.linalg.inv(g.T, overwrite_a=True, check_finite=False)
        p /= -np.diag(p).copy()  # B = -P / diag(P), column by column
        np.fill_diagonal(p, 0.0)
        self.weights_ = p.astype(np.float32, order="C")
        self._restored()
        return self

    def _restored(self) -> None:
        self._items = IdIndex(self.item_ids_, "item_id", "ease")
        self._gram = self._row_sums = None  # corpus_moments' B B' and B 1, computed on first use

    def with_history(self, history: EventHistory) -> EaseChannel:
        """This channel's fitted weights (shared, not copied), reading ``history``."""
        out = copy.copy(self)
        out.history = history
        return out

    def clicked_before(self, requests: Requests) -> sp.csr_matrix:
        """Binary [B, I]: the catalogue items each request's user clicked strictly before it (every click)."""
        lo, hi = self.history.before(requests.user_id, requests.time_ms)
        n = hi - lo
        owner = np.repeat(np.arange(len(n)), n)
        pos = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        clicked = self.history.click[pos]
        owner, pos = owner[clicked], pos[clicked]
        cols, known = self._items.find(self.history.item_id[pos])
        x = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (owner[known], cols[known])),
                          shape=(len(n), len(self.item_ids_)))
        x.data[:] = 1.0  # an item clicked twice counts once
        return x

    def scores(self, requests: Requests) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [B, I]: every catalogue item's score, in ``item_ids_`` order; bool [B]: the user clicked
        something before the request)."""
        x = self.clicked_before(requests)
        return np.asarray(x @ self.weights_, np.float32), np.diff(x.indptr) > 0

    def standardised(self, requests: Requests, candidates: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
        """float32 [B, N]: each candidate's score standardised over the corpus for its request ((score - the mean of
        the request's scores of every catalogue item) / their SD); 0 for padding, items outside the catalogue and
        users without a click before the request.

        The corpus is never scored: with x the request's clicks, the mean is x . B 1 / I and the second moment
        x' (B B') x / I (:meth:`corpus_moments`), so a request of h clicks and N candidates costs h^2 + h N
        lookups, not h I. Requests of one (user, time) share their moments; ``chunk``: about this many lookups at
        a time."""
        cand = np.asarray(candidates, np.int64)
        _, first, inverse = np.unique(np.stack([requests.user_id, requests.time_ms], 1), axis=0,
                                      return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        x = self.clicked_before(requests.take(first))
        mean, sd = self._moments(x, chunk)
        cols, known = self._items.find(cand)
        out = np.zeros(cand.shape, np.float32)
        h = np.diff(x.indptr)[inverse]  # clicks of each request's user before it
        step = max(1, chunk // max(int(h.max(initial=1)) * cand.shape[1], 1))
        for r0 in range(0, len(cand), step):
            rows = np.arange(r0, min(r0 + step, len(cand)))
            rows = rows[(h[rows] > 0) & (sd[inverse[rows]] > 0)]
            if not len(rows):
                continue
            u = inverse[rows]
            owner = np.repeat(np.arange(len(rows)), h[rows])
            clicked = x.indices[np.repeat(x.indptr[u], h[rows]) + np.arange(len(owner))
                                - np.repeat(np.cumsum(h[rows]) - h[rows], h[rows])]
            lookups = self.weights_[clicked[:, None], cols[rows][owner]]  # [clicks, N]
            score = np.add.reduceat(lookups, np.cumsum(h[rows]) - h[rows], axis=0, dtype=np.float64)
            z = (score - mean[u][:, None]) / sd[u][:, None]
            out[rows] = np.where(known[rows], z, 0.0)
        return out

    def corpus_moments(self, requests: Requests, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """(mean, SD) float64 [B] of each request's scores over the whole catalogue, from its clicked items alone:
        the mean x . (B 1) / I and the second moment x' (B B') x / I over the pairs of its clicks (B B' computed
        once, float32 [I, I]); 0 for a user without a click before the request."""
        return self._moments(self.clicked_before(requests), chunk)

    def _moments(self, x: sp.csr_matrix, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`corpus_moments` of the click rows ``x`` (binary [B, I], :meth:`clicked_before`)."""
        with _GRAM_LOCK:  # the rank log's threads score side by side: one of them computes it
            if self._gram is None:
                self._row_sums = self.weights_.sum(axis=1, dtype=np.float64)
                self._gram = self.weights_ @ self.weights_.T
        n_items = len(self.item_ids_)
        h = np.diff(x.indptr)
        mean = np.asarray(x @ self._row_sums, np.float64) / n_items
        second = np.zeros(len(h))
        pairs = h.astype(np.int64) ** 2
        ends = np.cumsum(pairs)
        r0 = 0
        while r0 < len(h):  # requests in blocks of about ``chunk`` pairs (one heavy user alone if need be)
            r1 = max(r0 + 1, int(np.searchsorted(ends, ends[r0] - pairs[r0] + chunk, side="right")))
            rows = np.arange(r0, min(r1, len(h)))
            owner = np.repeat(rows, pairs[rows])
            pos = np.arange(len(owner)) - np.repeat(np.cumsum(pairs[rows]) - pairs[rows], pairs[rows])
            a, b = pos // h[owner], pos % h[owner]
            j, k = x.indices[x.indptr[owner] + a], x.indices[x.indptr[owner] + b]
            second[rows] = np.bincount(owner - rows[0], weights=self._gram[j, k], minlength=len(rows)) / n_items
            r0 = rows[-1] + 1
        return mean, np.sqrt(np.maximum(second - mean**2, 0.0))

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)

        def rows(sl: slice) -> np.ndarray:
            s, has = self.scores(requests.take(np.arange(sl.start, sl.stop)))
            return np.where(has[:, None], s, np.float32(-np.inf))

        return _dense_topk(rows, len(requests), self.item_ids_, n)


CHANNELS = {c.name: c for c in (PopularChannel, RecentChannel, ItemCFChannel, ContentChannel, ALSChannel,
                                EaseChannel)}


def saved_channel_names(folder: str | Path) -> list[str]:
    """The channels a finished channels step saved in ``folder`` (its manifest's ``<name>/channel.json``), by name."""
    return _saved_names(A.read_json(Path(folder) / A.MANIFEST).get("outputs", {}))


def _saved_names(outputs) -> list[str]:
    return sorted(rel.split("/")[0] for rel in outputs if rel.count("/") == 1 and rel.endswith("/channel.json"))


def why_left_out(folder: str | Path, names: Sequence[str]) -> str:
    """"; name: why" for each of ``names`` the channels step in ``folder`` left out (its manifest's ``left_out``)."""
    left_out = (A.read_json(Path(folder) / A.MANIFEST).get("metrics") or {}).get("left_out") or {}
    return "".join(f"; {n}: {left_out[n]}" for n in names if n in left_out)


def load_channels(folder: str | Path, history: EventHistory,
                  names: tuple[str, ...] | list[str] | None = None) -> dict[str, Channel]:
    """The channels a finished channels step saved in ``folder`` (``<name>/channel.json``, ``channel.npz``, the ALS
    index), reading ``history`` (what serving knows: the whole logged history). names: these channels, in this
    order (None: every saved one, by name); one the step did not save raises naming those it did. Every file of a
    loaded channel is checked against the folder's manifest first (ArtifactError naming an unlisted, missing or
    altered file)."""
    folder = Path(folder)
    outputs = A.read_json(folder / A.MANIFEST).get("outputs", {})
    saved = _saved_names(outputs)
    names = saved if names is None else list(names)
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{folder}: no saved channel {missing} (the channels step saved {saved}"
                         f"{why_left_out(folder, missing)})")
    out = {}
    for name in names:
        A.verify_listed(folder, sorted(rel for rel in outputs if rel.startswith(name + "/")))
        out[name] = CHANNELS[name].load(folder / name, history)
    return out
