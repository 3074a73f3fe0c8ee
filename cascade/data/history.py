"""Logged events asked about strictly before a time: a user's recent items, what a user saw, item counts.

:class:`EventHistory` keeps logged (user, item, time, click) events sorted by (user, time) and answers a batch of
(user, t) queries with ``searchsorted`` over that order (no per-row Python): the user's last ``n`` items before t,
whether the user saw an item before t, and per-item counts over a time window. Users and items are mapped to
dense codes first, so any int64 id works (nothing packs raw ids into fewer bits).

"Strictly before": an event at time t is not in the history of a query at t; a request's time is its start
(:mod:`cascade.data.requests`), so a request never sees its own impressions or clicks. The retrieval channels and
the seen-item filter read history through this class.
"""

from __future__ import annotations

import numpy as np

from ..arrays import PAD, distinct, first_occurrence_columns
from .ids import IdIndex


class EventHistory:
    """user_id, item_id, time_ms: int64 [E]; click: 0/1 [E] (None: every event counts as a click); any order."""

    def __init__(self, user_id: np.ndarray, item_id: np.ndarray, time_ms: np.ndarray,
                 click: np.ndarray | None = None) -> None:
        user_id, item_id = np.asarray(user_id, np.int64), np.asarray(item_id, np.int64)
        time_ms = np.asarray(time_ms, np.int64)
        click = np.ones(len(user_id), bool) if click is None else np.asarray(click).astype(bool)
        if not len(user_id) == len(item_id) == len(time_ms) == len(click):
            raise ValueError(f"EventHistory: columns of different lengths ({len(user_id)}, {len(item_id)}, "
                             f"{len(time_ms)}, {len(click)})")
        self.users = IdIndex(np.unique(user_id), "user_id", "events")
        self.items = IdIndex(np.unique(item_id), "item_id", "events")
        u = self.users.rows(user_id)
        order = np.lexsort((time_ms, u))
        self.user_code, self.item_id, self.time_ms, self.click = u[order], item_id[order], time_ms[order], click[order]
        self.item_code = self.items.rows(self.item_id)
        self.n_items = len(self.items)
        # events of user code c: [start[c], start[c + 1]), in time order
        self.start = np.searchsorted(self.user_code, np.arange(len(self.users) + 1))
        # time ranks make (user, time) one sortable int64 key: user * stride + rank (both < number of events)
        self.times = distinct(self.time_ms)
        self.stride = len(self.times) + 1
        self.key = self.user_code * self.stride + np.searchsorted(self.times, self.time_ms)
        # the first time each (user, item) pair occurred, by sorted pair key (events of a user are in time order)
        pair = self.user_code * self.n_items + self.item_code
        self.pair_keys, first = np.unique(pair, return_index=True)
        self.pair_first_ms = self.time_ms[first]
        # every event in time order, for item counts over a window
        by_time = np.argsort(self.time_ms, kind="stable")
        self.t_sorted, self.t_item, self.t_click = self.time_ms[by_time], self.item_code[by_time], self.click[by_time]

    def __len__(self) -> int:
        return len(self.user_code)

    def before(self, user_ids: np.ndarray, t_ms: np.ndarray,
               window_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) int64 [B]: the user's events strictly before t (and at or after t - window_ms when given) are
        positions [lo, hi) (empty for new users)."""
        pos, known = self.users.find(np.asarray(user_ids, np.int64))
        t_ms = np.asarray(t_ms, np.int64)
        rank = np.searchsorted(self.times, t_ms)  # events of time rank < rank are before t
        lo = np.where(known, self.start[pos], 0)
        hi = np.where(known, np.searchsorted(self.key, pos * self.stride + rank), 0)
        if window_ms is not None:  # events of time rank >= rank_lo are at or after t - W
            rank_lo = np.searchsorted(self.times, t_ms - int(window_ms))
            lo = np.maximum(lo, np.where(known, np.searchsorted(self.key, pos * self.stride + rank_lo), 0))
        return lo, np.maximum(hi, lo)

    def recent(self, user_ids: np.ndarray, t_ms: np.ndarray, n: int, clicks_only: bool = True,
               lookback: int | None = None, window_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each query's last ``n`` distinct items strictly before t, most recent first: (item ids int64 [B, n],
        their latest times int64 [B, n]; PAD / 0 where fewer). clicks_only: clicked events only. The items come
        from the last ``lookback`` events of the user (default 4 n; None of them clicked or all repeats leaves the
        row short). window_ms: only events at or after t - window_ms."""
        if n < 1:
            raise ValueError(f"EventHistory.recent: n must be >= 1, got {n}")
        lookback = 4 * n if lookback is None else int(lookback)
        lo, hi = self.before(user_ids, t_ms, window_ms)
        pos = hi[:, None] - 1 - np.arange(max(lookback, n))[None, :]  # most recent first
        ok = pos >= lo[:, None]
        if len(self.item_id) == 0:
            ok[:] = False
        pos = np.where(ok, pos, 0)
        if clicks_only and len(self.click):
            ok &= self.click[pos]
        items = np.where(ok, self.item_id[pos] if len(self.item_id) else PAD, PAD)
        cols = first_occurrence_columns(items, n)  # the latest occurrence of each item, most recent first
        got = cols >= 0
        c = np.maximum(cols, 0)
        return (np.where(got, np.take_along_axis(items, c, 1), PAD),
                np.where(got, np.take_along_axis(np.where(ok, self.time_ms[pos] if len(self.time_ms) else 0, 0), c, 1),
                         0))

    def seen(self, user_ids: np.ndarray, items: np.ndarray, t_ms: np.ndarray) -> np.ndarray:
        """bool [B, N]: items[b, j] was logged for user_ids[b] (shown or clicked) strictly before t_ms[b]."""
        items = np.asarray(items, np.int64)
        if len(self.pair_keys) == 0:
            return np.zeros(items.shape, bool)
        upos, uknown = self.users.find(np.asarray(user_ids, np.int64))
        ipos, iknown = self.items.find(items)
        key = upos[:, None] * self.n_items + ipos
        j = np.minimum(np.searchsorted(self.pair_keys, key), len(self.pair_keys) - 1)
        hit = (self.pair_keys[j] == key) & uknown[:, None] & iknown & (items != PAD)
        return hit & (self.pair_first_ms[j] < np.asarray(t_ms, np.int64)[:, None])

    def item_counts(self, t_ms: int, window_ms: int | None, clicks_only: bool = True) -> np.ndarray:
        """float64 [I] in ``self.items`` order: each item's events (clicks, or all) in [t - window, t) (every
        event before t when window_ms is None)."""
        sl = self._window(t_ms, window_ms)
        w = self.t_click[sl].astype(np.float64) if clicks_only else None
        return np.bincount(self.t_item[sl], weights=w, minlength=self.n_items).astype(np.float64)

    def clicked_items(self, t_ms: int, window_ms: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The items clicked in [t - window, t) (every click before t when window_ms is None): (item codes int64
        [m] ascending, in ``self.items`` order; click counts float64 [m]), the nonzero entries of
        :meth:`item_counts`. Costs the window's events, not the catalogue."""
        sl = self._window(t_ms, window_ms)
        codes, counts = np.unique(self.t_item[sl][self.t_click[sl]], return_counts=True)
        return codes.astype(np.int64), counts.astype(np.float64)

    def _window(self, t_ms: int, window_ms: int | None) -> slice:
        """The positions in time order of the events in [t - window, t) (all before t when window_ms is None)."""
        hi = int(np.searchsorted(self.t_sorted, t_ms))
        lo = 0 if window_ms is None else int(np.searchsorted(self.t_sorted, t_ms - window_ms))
        return slice(lo, hi)

    def repeat_share(self, t0_ms: int, t1_ms: int) -> float:
        """Share of the clicks in [t0, t1) on items the same user had been logged with (shown or clicked) before
        the click: how much of the demand is re-consumption. nan without clicks in the range."""
        c = self.click & (self.time_ms >= t0_ms) & (self.time_ms < t1_ms)
        if not c.any():
            return float("nan")
        pair = self.user_code[c] * self.n_items + self.item_code[c]
        j = np.searchsorted(self.pair_keys, pair)
        return float(np.mean(self.pair_first_ms[j] < self.time_ms[c]))



def query_runs(user_ids: np.ndarray, t_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive equal (user, t) queries (a request's candidates share one): (first row of each run
    int64 [R], run of each row int64 [N]). Answering the R runs and gathering by ``run`` gives every row's answer;
    rows in any order stay correct (unordered rows only make more, shorter runs)."""
    user_ids, t_ms = np.asarray(user_ids), np.asarray(t_ms)
    n = len(user_ids)
    start = np.ones(n, bool)
    if n > 1:
        start[1:] = (user_ids[1:] != user_ids[:-1]) | (t_ms[1:] != t_ms[:-1])
    return np.flatnonzero(start), np.cumsum(start) - 1
