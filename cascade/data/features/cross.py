"""User x item cross features from strictly earlier events, for any (user, item, t)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ...arrays import distinct
from ..history import EventHistory, query_runs
from ..ids import IdIndex
from ..requests import request_start_ms
from ..split import DAY_MS
from .columns import column

log = logging.getLogger(__name__)


class _History:
    """Events of one key family, sorted by (key, time): answers windowed counts with two searchsorted calls.

    Keys are first made dense (0..K-1) and times replaced by their rank among the distinct event times, so
    ``dense_key * stride + time_rank`` fits int64 for any id range and any time span (both factors are at most
    the number of events) and one global ``searchsorted`` finds a (key, time) bound.
    """

    def __init__(self, keys: np.ndarray, time_rank: np.ndarray, click: np.ndarray, stride: int):
        order = np.lexsort((time_rank, keys))  # by (key, time): one sort (np.unique's inverse, then a sort: 1.35x)
        sorted_keys = keys[order]
        first = np.ones(len(order), bool)
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
        self.keys = sorted_keys[first]
        if len(self.keys) and (len(self.keys) + 1) * stride >= 2**62:
            raise OverflowError(f"cross history: {len(self.keys)} keys x {stride} time ranks overflow int64")
        self.comb = (np.cumsum(first, dtype=np.int64) - 1) * stride + time_rank[order]  # dense key, time rank
        self.cum_click = np.concatenate([[0], np.cumsum(click[order], dtype=np.int64)])
        self.stride = stride

    def counts(self, dense: np.ndarray, found: np.ndarray, rank_hi: np.ndarray,
               *rank_los: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(clicks, exposures) int64 [N] of events with key ``dense`` and time rank in [rank_lo, rank_hi)] for each
        rank_lo [N] of ``rank_los`` (one search for the shared upper bound). Rows not ``found`` get 0 and are not
        searched: most (user, item) and (user, author) keys of a candidate list have no event."""
        sel = None if found.all() else np.flatnonzero(found)

        def rows(x: np.ndarray) -> np.ndarray:
            return x if sel is None else x[sel]

        def full(x: np.ndarray) -> np.ndarray:
            if sel is None:
                return x
            out = np.zeros(len(found), np.int64)
            out[sel] = x
            return out

        base = rows(dense) * self.stride
        hi = np.searchsorted(self.comb, base + rows(rank_hi))
        out = []
        for rank_lo in rank_los:
            lo = np.searchsorted(self.comb, base + rows(rank_lo))
            out.append((full(self.cum_click[hi] - self.cum_click[lo]), full(hi - lo)))
        return out

    def lookup(self, keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense key [N], found bool [N]) of raw keys; a key without events is not found."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return pos, valid & (self.keys[pos] == keys)


class CrossFeatureStore:
    """User x item interaction statistics from strictly earlier events, for any (user, item, t).

    For a query (u, i, t) with window W = ``window_days`` days, only events with ``t - W <= time_ms < t`` count:

    - ``user_tag_clicks`` / ``user_tag_exposures``: u's clicks / exposures on items with i's tag;
    - ``user_author_clicks`` / ``user_author_exposures``: the same for i's author;
    - ``item_clicks`` / ``item_exposures`` / ``item_ctr``: i's clicks / exposures (all users) and smoothed CTR;
    - ``user_clicks`` / ``user_exposures`` / ``user_ctr``: u's clicks / exposures (all items) and smoothed CTR;
    - ``user_item_clicks`` / ``user_item_exposures``: u's own clicks / exposures of i itself (re-consumption);
    - ``item_recent_clicks`` / ``item_recent_exposures``: i's clicks / exposures in the last W / RECENT_SHARE of
      the window only (what is popular now, next to the whole window's counts).

    Smoothed CTR = (clicks + prior_ctr * prior_strength) / (exposures + prior_strength); the prior is a fixed
    number (not fitted on the history) so that no later event can move an earlier row's feature. The tag and
    author of an item come from ``items[tag_column]`` / ``items[author_column]`` (the whole value is the key;
    a missing tag gives zero user-tag counts). ``tag_column`` / ``author_column`` None or "" leave that family out
    (items without tags or authors): the instance's ``feature_names`` then lack its two features. Fit on the whole
    impression history; features of an impression row use its request's start time (:meth:`query_impressions`),
    so no event of the same request can leak.

    :meth:`history` answers the behaviour sequence of (u, t) from the same events and window: u's last ``n``
    distinct CLICKED items with ``t - W <= time_ms < t``, most recent first (the items of u's last 4 n clicks in
    the window, de-duplicated, so a row is short only when those repeat a lot or there are fewer clicks).
    """

    #: every feature, in the order of the encoded columns (an instance may leave out the tag / author family)
    feature_names: tuple[str, ...] = (
        "user_tag_clicks", "user_tag_exposures", "user_author_clicks", "user_author_exposures",
        "item_clicks", "item_exposures", "item_ctr", "user_clicks", "user_exposures", "user_ctr",
        "user_item_clicks", "user_item_exposures", "item_recent_clicks", "item_recent_exposures")
    RECENT_SHARE = 7  # the "recent" counts look back W / 7 (one day of a one-week window)

    def __init__(self, window_days: float = 7.0, prior_ctr: float = 0.1, prior_strength: float = 20.0,
                 tag_column: str | None = "tag", author_column: str | None = "author_id"):
        self.window_days = window_days
        self.prior_ctr = prior_ctr
        self.prior_strength = prior_strength
        self.tag_column = tag_column or None
        self.author_column = author_column or None
        left_out = {f"user_{fam}_{x}" for fam, col in (("tag", self.tag_column), ("author", self.author_column))
                    if col is None for x in ("clicks", "exposures")}
        self.feature_names = tuple(n for n in CrossFeatureStore.feature_names if n not in left_out)

    def fit(self, impressions: pd.DataFrame, items: pd.DataFrame) -> CrossFeatureStore:
        """Index every impression (user_id, item_id, time_ms, click) of ``impressions``; return self."""
        if self.window_days <= 0:
            raise ValueError(f"CrossFeatureStore: window_days must be > 0, got {self.window_days}")
        if not (0.0 <= self.prior_ctr <= 1.0) or self.prior_strength < 0:
            raise ValueError(f"CrossFeatureStore: prior_ctr must be in [0, 1] and prior_strength >= 0, "
                             f"got {self.prior_ctr}, {self.prior_strength}")
        for col in ("item_id", self.tag_column, self.author_column):
            if col is not None:
                column(items, col, "items")
        for col in ("user_id", "item_id", "time_ms", "click"):
            column(impressions, col, "impressions")
        item_ids = items["item_id"].to_numpy(np.int64)
        order = np.argsort(item_ids, kind="stable")
        self.item_ids_ = item_ids[order]
        self._item_index = IdIndex(self.item_ids_, "item_id", "impressions")
        # factorize works for int and str columns alike; NaN -> -1 (no tag / author)
        none = np.full(len(order), -1, np.int64)  # a family left out: no item has a tag / author
        self.item_tag_ = (none if self.tag_column is None
                          else pd.factorize(items[self.tag_column])[0][order].astype(np.int64))
        self.item_author_ = (none if self.author_column is None
                             else pd.factorize(items[self.author_column])[0][order].astype(np.int64))
        self.n_tags_ = int(self.item_tag_.max()) + 1 if len(order) else 0
        self.n_authors_ = int(self.item_author_.max()) + 1 if len(order) else 0

        user = impressions["user_id"].to_numpy(np.int64)
        item_row = self._item_index.rows(impressions["item_id"].to_numpy())
        t = impressions["time_ms"].to_numpy(np.int64)
        click = impressions["click"].to_numpy(np.int64)
        self.times_ = distinct(t)
        rank = np.searchsorted(self.times_, t).astype(np.int64)
        stride = len(self.times_) + 1
        self.users_, ucode = np.unique(user, return_inverse=True)
        self._user_index = IdIndex(self.users_, "user_id")
        ucode = ucode.astype(np.int64)
        tag, author = self.item_tag_[item_row], self.item_author_[item_row]
        has_tag, has_author = tag >= 0, author >= 0
        self.user_tag_ = _History(ucode[has_tag] * max(self.n_tags_, 1) + tag[has_tag], rank[has_tag], click[has_tag],
                                  stride)
        self.user_author_ = _History(ucode[has_author] * max(self.n_authors_, 1) + author[has_author],
                                     rank[has_author], click[has_author], stride)
        self.item_ = _History(item_row, rank, click, stride)
        self.user_ = _History(ucode, rank, click, stride)
        self.user_item_ = _History(ucode * max(len(self.item_ids_), 1) + item_row, rank, click, stride)
        c = click > 0
        self.clicks_ = EventHistory(user[c], impressions["item_id"].to_numpy(np.int64)[c], t[c])
        log.info("CrossFeatureStore fitted on %d events (%d users, %d items)", len(t), len(self.users_),
                 len(self.item_ids_))
        return self

    def query(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Cross features of each (user_ids[n], item_ids[n], t_ms[n]): name -> float32 [N].

        Users without history get zero counts (and the prior CTR); an item id unknown to the fitted items
        table raises. Every row is its own request here: :meth:`query_requests` answers candidate lists.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        if user_ids.shape != item_ids.shape or user_ids.ndim != 1:
            raise ValueError(f"CrossFeatureStore.query: user_ids {user_ids.shape} and item_ids "
                             f"{item_ids.shape} must be equal 1-d")
        return self.query_requests(user_ids, t_ms, item_ids, np.arange(len(user_ids)))

    def query_requests(self, user_ids: np.ndarray, t_ms: np.ndarray, item_ids: np.ndarray,
                       request: np.ndarray) -> dict[str, np.ndarray]:
        """Cross features of N (request, item) pairs: name -> float32 [N], pair p being (user_ids[request[p]],
        item_ids[p], t_ms[request[p]]). user_ids, t_ms: int64 [R]; item_ids, request: int64 [N].

        What depends on the request alone (the window's time ranks, the user family) is computed once per request
        and gathered: a candidate list of L items shares one request, so this does that work 1 / L as often as
        :meth:`query` on the pairs, with the same values.
        """
        if not hasattr(self, "times_"):
            raise RuntimeError("CrossFeatureStore is not fitted: call fit()")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        request = np.asarray(request, dtype=np.int64)
        if user_ids.ndim != 1 or item_ids.ndim != 1 or request.shape != item_ids.shape:
            raise ValueError(f"CrossFeatureStore.query_requests: user_ids {user_ids.shape} must be 1-d [R], "
                             f"item_ids {item_ids.shape} and request {request.shape} equal 1-d [N]")
        r, n = len(user_ids), len(item_ids)
        if n and (request.min() < 0 or request.max() >= r):
            raise ValueError(f"CrossFeatureStore.query_requests: request rows must be in [0, {r})")
        # np.searchsorted is ~10x faster on sorted needles (each search starts from the previous hit and touches
        # the same, cached part of the history), so the searches into the histories run on needles put in
        # order by one argsort each: by time for the time ranks, by (item, time) for the item family and by
        # (user, time) for the three user families (user-tag / user-author needles are then sorted by user and
        # nearly sorted within a user).
        window_ms = int(round(self.window_days * DAY_MS))
        stride = len(self.times_) + 1
        o_t = np.argsort(t_ms)
        t_sorted = t_ms[o_t]
        # per request: event rank < rank_hi <=> time < t ; event rank >= rank_lo <=> time >= t - W
        rank_hi, rank_lo, rank_recent = np.empty(r, np.int64), np.empty(r, np.int64), np.empty(r, np.int64)
        rank_hi[o_t] = np.searchsorted(self.times_, t_sorted)
        rank_lo[o_t] = np.searchsorted(self.times_, t_sorted - window_ms)
        rank_recent[o_t] = np.searchsorted(self.times_, t_sorted - window_ms // self.RECENT_SHARE)

        item_row = self._item_index.rows(item_ids, "CrossFeatureStore.query")
        hi_p = rank_hi[request]
        o_i = np.argsort(item_row * stride + hi_p)
        d, f = self.item_.lookup(item_row[o_i], np.ones(n, bool))
        req_i = request[o_i]
        (it_c, it_e), (ir_c, ir_e) = self.item_.counts(d, f, hi_p[o_i], rank_lo[req_i], rank_recent[req_i])

        # requests in (user, time) order; the pairs follow their request (a stable sort keeps each list together)
        upos, uknown = self._user_index.find(user_ids)
        o_r = np.argsort(upos * stride + rank_hi)
        # users_ are exactly the keys of the user history, so a user's position is its dense key
        us_c, us_e = np.empty(r, np.int64), np.empty(r, np.int64)
        [(us_c[o_r], us_e[o_r])] = self.user_.counts(upos[o_r], uknown[o_r], rank_hi[o_r], rank_lo[o_r])
        place = np.empty(r, np.int64)
        place[o_r] = np.arange(r)
        o_u = np.argsort(place[request], kind="stable")
        req_u = request[o_u]
        up, known = upos[req_u], uknown[req_u]
        lo, hi = rank_lo[req_u], rank_hi[req_u]
        tag, author = self.item_tag_[item_row[o_u]], self.item_author_[item_row[o_u]]
        d, f = self.user_tag_.lookup(up * max(self.n_tags_, 1) + tag, known & (tag >= 0))
        [(ut_c, ut_e)] = self.user_tag_.counts(d, f, hi, lo)
        d, f = self.user_author_.lookup(up * max(self.n_authors_, 1) + author, known & (author >= 0))
        [(ua_c, ua_e)] = self.user_author_.counts(d, f, hi, lo)
        d, f = self.user_item_.lookup(up * max(len(self.item_ids_), 1) + item_row[o_u], known)
        [(ui_c, ui_e)] = self.user_item_.counts(d, f, hi, lo)

        def back(x: np.ndarray, order: np.ndarray) -> np.ndarray:
            out = np.empty(n, np.float64)
            out[order] = x
            return out

        ut_c, ut_e, ua_c, ua_e, ui_c, ui_e = (back(x, o_u) for x in (ut_c, ut_e, ua_c, ua_e, ui_c, ui_e))
        it_c, it_e, ir_c, ir_e = (back(x, o_i) for x in (it_c, it_e, ir_c, ir_e))
        a, b = self.prior_ctr * self.prior_strength, self.prior_strength
        f32 = np.float32
        us_c, us_e = us_c.astype(np.float64), us_e.astype(np.float64)
        user_ctr = ((us_c + a) / (us_e + b)).astype(f32)
        out = {
            "user_tag_clicks": ut_c.astype(f32), "user_tag_exposures": ut_e.astype(f32),
            "user_author_clicks": ua_c.astype(f32), "user_author_exposures": ua_e.astype(f32),
            "item_clicks": it_c.astype(f32), "item_exposures": it_e.astype(f32),
            "item_ctr": ((it_c + a) / (it_e + b)).astype(f32),
            "user_clicks": us_c.astype(f32)[request], "user_exposures": us_e.astype(f32)[request],
            "user_ctr": user_ctr[request],
            "user_item_clicks": ui_c.astype(f32), "user_item_exposures": ui_e.astype(f32),
            "item_recent_clicks": ir_c.astype(f32), "item_recent_exposures": ir_e.astype(f32),
        }
        return {n: out[n] for n in self.feature_names}

    def history(self, user_ids: np.ndarray, t_ms: np.ndarray, n: int) -> np.ndarray:
        """Each (user_ids[b], t_ms[b])'s last ``n`` distinct clicked item ids in [t - W, t), most recent first:
        int64 [B, n], PAD where fewer. Consecutive equal queries (a request's candidates) are answered once."""
        if not hasattr(self, "clicks_"):
            raise RuntimeError("CrossFeatureStore is not fitted: call fit()")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        first, run = query_runs(user_ids, t_ms)
        items, _ = self.clicks_.recent(user_ids[first], t_ms[first], n, clicks_only=False,
                                       window_ms=int(round(self.window_days * DAY_MS)))
        return items[run]

    def query_with_history(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray,
                           n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(:meth:`query`, :meth:`history` with ``n``) of the same rows in one call."""
        return self.query(user_ids, item_ids, t_ms), self.history(user_ids, t_ms, n)

    def query_impressions(self, impressions: pd.DataFrame) -> dict[str, np.ndarray]:
        """Cross features of impression rows at their request's START time (all items of a request alike)."""
        return self.query(impressions["user_id"].to_numpy(), impressions["item_id"].to_numpy(),
                          request_start_ms(impressions))
