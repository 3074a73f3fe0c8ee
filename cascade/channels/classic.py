"""The classic retrieval channels: most-popular, the user's recent items, item-to-item CF, content, ALS.

Each answers ``select(requests, None, n) -> (item_ids int64 [B, n], scores float32 [B, n])`` (PAD / -inf where it
has fewer than n items). They read the logged history only strictly before each request's time
(:class:`~cascade.data.history.EventHistory`), and what they learn offline (co-click similarities, ALS factors)
comes from the train period's clicks only, so a later event never changes an earlier request's list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import artifacts as A
from ..arrays import PAD, topk_rows
from ..data.history import EventHistory
from ..data.ids import IdIndex
from ..data.requests import Requests

DAY_MS = 86_400_000


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
    scores.sum_duplicates()
    b = scores.shape[0]
    rows = np.repeat(np.arange(b), np.diff(scores.indptr))
    order = np.lexsort((scores.indices, -scores.data, rows))  # by row, score descending, column ascending
    rank = np.arange(len(order)) - scores.indptr[rows[order]]
    keep = order[rank < n]
    out_i = np.full((b, n), PAD, np.int64)
    out_s = np.full((b, n), -np.inf, np.float32)
    slot = rank[rank < n]
    out_i[rows[keep], slot] = ids[scores.indices[keep]]
    out_s[rows[keep], slot] = scores.data[keep]
    return out_i, out_s


def _click_matrix(train: EventHistory, items: IdIndex) -> sp.csr_matrix:
    """Binary users x items matrix of the clicks of ``train`` (a pair clicked several times counts once)."""
    c = train.click
    x = sp.csr_matrix((np.ones(int(c.sum()), np.float32), (train.user_code[c], items.rows(train.item_id[c]))),
                      shape=(len(train.users), len(items)))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _recent_weights(history: EventHistory, requests: Requests, n_history: int, decay: float,
                    items: IdIndex) -> sp.csr_matrix:
    """sparse [B, I]: each request's last ``n_history`` clicked items before it, weighted decay ** age (the most
    recent 1); items outside ``items`` are left out."""
    recent, _ = history.recent(requests.user_id, requests.time_ms, n_history)
    cols, known = items.find(recent)
    ok = known & (recent != PAD)
    w = np.where(ok, decay ** np.arange(n_history)[None, :], 0.0)
    rows = np.broadcast_to(np.arange(len(recent))[:, None], recent.shape)
    return sp.csr_matrix((w[ok], (rows[ok], cols[ok])), shape=(len(recent), len(items)))


def keep_top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The k largest entries of each row of a sparse matrix (the others dropped); one lexsort, no per-row Python."""
    m = m.tocsr()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, rows))  # by row, then value descending
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < k]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


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


class PopularChannel(Channel):
    """The most clicked items of the ``window_days`` (None: all history) before the request, as of the last
    refresh: a request at t sees the clicks in [s - window, s) with s = t rounded down to ``refresh_ms``, so the
    requests of one refresh period share one list. scores: the click counts. Nothing to learn."""

    name = "popular"
    PARAMS = ("window_days", "refresh_ms")

    def __init__(self, history: EventHistory, window_days: float | None = 7.0, refresh_ms: int = 3_600_000) -> None:
        if window_days is not None and not window_days > 0:
            raise ValueError(f"PopularChannel: window_days must be > 0 or None, got {window_days}")
        if refresh_ms < 1:
            raise ValueError(f"PopularChannel: refresh_ms must be >= 1, got {refresh_ms}")
        self.history, self.window_days, self.refresh_ms = history, window_days, int(refresh_ms)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _snapshot(self, s: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        if (s, n) not in self._cache:
            window = None if self.window_days is None else int(round(self.window_days * DAY_MS))
            counts = self.history.item_counts(s, window)
            ids = np.where(counts > 0, self.history.items.sorted_ids, PAD)
            top_i, top_s = topk_rows(counts[None, :], ids[None, :], n)
            if len(self._cache) >= 256:  # a replay walks forward in time: old periods are not asked again
                self._cache.clear()
            self._cache[(s, n)] = (top_i[0], top_s[0].astype(np.float32))
        return self._cache[(s, n)]

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        period = (np.asarray(requests.time_ms, np.int64) // self.refresh_ms) * self.refresh_ms
        items = np.full((len(requests), n), PAD, np.int64)
        scores = np.full((len(requests), n), -np.inf, np.float32)
        for s in np.unique(period):
            rows = period == s
            items[rows], scores[rows] = self._snapshot(int(s), n)
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
        scores = _recent_weights(self.history, requests, self.n_history, self.decay, self._items) @ self._sim
        scores = scores.tocsr()
        scores.data = scores.data.astype(np.float32)
        scores.eliminate_zeros()
        return sparse_topk(scores, self.item_ids_, n)


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

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        h = _recent_weights(self.history, requests, self.n_history, self.decay, self._items)
        weights = (h @ self._to_category).tocsr()  # [B, categories]
        scores = (weights @ self._to_category.T).tocsr()  # [B, I]: the weight of each item's category
        scores.data = (scores.data + self.pop_rank_[scores.indices]).astype(np.float32)
        return sparse_topk(scores, self.item_ids_, n)


class ALSChannel(Channel):
    """Implicit-feedback matrix factorisation of the train clicks with ``implicit``'s AlternatingLeastSquares (one
    thread, so a seed reproduces it): score = <user factors, item factors>. Users without train clicks get no
    list. factors / regularization / alpha / iterations: ALS's own settings; seed: its random_state."""

    name = "als"
    PARAMS = ("factors", "regularization", "alpha", "iterations", "seed")
    LEARNED = ("item_ids_", "user_ids_", "user_factors_", "item_factors_")

    def __init__(self, history: EventHistory, factors: int = 64, regularization: float = 0.05, alpha: float = 10.0,
                 iterations: int = 15, seed: int = 0) -> None:
        if factors < 1 or iterations < 1 or regularization < 0 or alpha <= 0:
            raise ValueError(f"ALSChannel: need factors >= 1, iterations >= 1, regularization >= 0 and alpha > 0, "
                             f"got {factors}, {iterations}, {regularization}, {alpha}")
        self.history, self.factors, self.regularization = history, int(factors), float(regularization)
        self.alpha, self.iterations, self.seed = float(alpha), int(iterations), int(seed)

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
        self._restored()
        return self

    def _restored(self) -> None:
        self._users = IdIndex(self.user_ids_, "user_id", "als")

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select(self.name, candidates, n)
        pos, known = self._users.find(np.asarray(requests.user_id, np.int64))

        def rows(sl: slice) -> np.ndarray:
            s = self.user_factors_[pos[sl]] @ self.item_factors_.T
            return np.where(known[sl, None], s, -np.inf).astype(np.float32)

        return _dense_topk(rows, len(requests), self.item_ids_, n)


CHANNELS = {c.name: c for c in (PopularChannel, RecentChannel, ItemCFChannel, ContentChannel, ALSChannel)}
