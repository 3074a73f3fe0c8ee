"""A tower's recent-popularity prior: what is being clicked now, added to the tower's scores.

A two-tower student's item embeddings are fixed when the index is built, so they cannot know which items are
clicked this week; the teacher reads that from each item's windowed counts, and most-popular of a trailing window is
a strong list on real logs. The prior adds it to the tower's score of item i for a request of user u at time t:

    score(u, i, t) = <u, v_i> / T + weight * spread(u) * log(1 + c_i(t))

c_i(t): item i's clicks in the trailing window of a :class:`~.classic.PopularChannel` (the channels step's, tuned
on validation), as of the request's refresh period; spread(u) = sqrt(u' Cov(v) u) / T, the standard deviation of
u's scores over the corpus, so that one weight suits every user; T the towers' temperature. ``weight`` is chosen
on validation outcomes (0 in its grid: no prior). A retriever with a prior also scores the channel's top n beside
the index's top n and keeps the best n of both by the full score.

Items are addressed by the towers' item rows (row r = ``item_ids[r]``; row I, one past the last item, is the
towers' OOV row and PAD's: no clicks). Each refresh period's counts become, once, a dense vector over the rows and
the rows of its most clicked items, so a request pays a gather, not an id lookup.
"""

from __future__ import annotations

import numpy as np

from ..arrays import PAD
from ..data.ids import IdIndex
from ..data.requests import Requests
from .classic import PeriodCache, PopularChannel

PRIOR_FILE = "prior.json"  # a saved tower's prior: PopularityPrior.params()


class PopularityPrior:
    """popular: the channel whose trailing-window click counts c_i(t) are the prior; weight >= 0;
    item_emb float32 [I, d]: the towers' item embeddings by row (their covariance gives spread(u)); items: the
    towers' id -> row index over those I items (``Towers.item_index``); temperature: the towers' T.

    boost(requests, u [B, d], rows [B, N]) -> float32 [B, N] (the prior's term; rows PAD or I: 0);
    boost_corpus(requests, u) -> float32 [B, I]; candidates(requests, n) -> rows int64 [B, n] of the channel's n
    most clicked items (PAD-padded); log_counts(requests, rows) -> float32 [B, N]."""

    def __init__(self, popular: PopularChannel, weight: float, item_emb: np.ndarray, items: IdIndex,
                 temperature: float = 1.0) -> None:
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"PopularityPrior: weight must be a finite number >= 0, got {weight}")
        if item_emb.ndim != 2 or len(item_emb) < 2 or len(items) != len(item_emb):
            raise ValueError(f"PopularityPrior: item_emb must be [I >= 2, d] with one id per row, got "
                             f"{item_emb.shape} and {len(items)} ids")
        self.popular, self.weight, self.temperature = popular, float(weight), float(temperature)
        self.cov = np.cov(np.asarray(item_emb, np.float64), rowvar=False).reshape(item_emb.shape[1], -1)
        self.n_items = len(items)
        self._rows = items
        self._periods_seen = PeriodCache(16)  # period start -> (dense log counts, rows)

    def params(self) -> dict:
        """What a saved tower records to rebuild the prior: the channel's settings and the weight."""
        return {"weight": self.weight, **self.popular.params()}

    def spread(self, u: np.ndarray) -> np.ndarray:
        """float64 [B]: the standard deviation of each user's scores <u, v> / T over the corpus."""
        u = np.asarray(u, np.float64)
        return np.sqrt(np.maximum(np.einsum("bd,de,be->b", u, self.cov, u), 0.0)) / self.temperature

    def period(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """The refresh period starting at s: (log1p click counts float32 [I + 1] by row, the last entry 0; rows
        int64 [m] of its clicked items, most clicked first)."""
        def computed() -> tuple[np.ndarray, np.ndarray]:
            ids, counts = self.popular.ranked(s)
            rows, found = self._rows.find(ids)
            rows, counts = rows[found], counts[found]
            dense = np.zeros(self.n_items + 1, np.float32)
            dense[rows] = np.log1p(counts)
            return dense, rows

        return self._periods_seen.get(s, computed)

    def refresh(self, t_ms: np.ndarray) -> int:
        """Prepare the refresh periods of the times ``t_ms`` [B] (their lists and dense log counts) ahead of their
        requests; returns how many were not prepared yet."""
        new = [int(s) for s in np.unique(self.popular.period_starts(t_ms)) if int(s) not in self._periods_seen]
        for s in new:
            self.period(s)
        return len(new)

    def log_counts(self, requests: Requests, rows: np.ndarray) -> np.ndarray:
        rows = np.where(np.asarray(rows, np.int64) == PAD, self.n_items, rows)
        period = self._periods(requests)
        if (period == period[0]).all():
            return self.period(int(period[0]))[0][rows]
        out = np.zeros(rows.shape, np.float32)
        for s in np.unique(period):
            b = period == s
            out[b] = self.period(int(s))[0][rows[b]]
        return out

    def boost(self, requests: Requests, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        scale = (self.weight * self.spread(u)).astype(np.float32)
        return scale[:, None] * self.log_counts(requests, rows)

    def boost_corpus(self, requests: Requests, u: np.ndarray) -> np.ndarray:
        period = self._periods(requests)
        uniq, which = np.unique(period, return_inverse=True)
        dense = np.stack([self.period(int(s))[0][: self.n_items] for s in uniq])  # [P, I]: one per refresh period
        scale = (self.weight * self.spread(u)).astype(np.float32)
        out = dense[which]
        out *= scale[:, None]
        return out

    def candidates(self, requests: Requests, n: int) -> np.ndarray:
        period = self._periods(requests)
        out = np.full((len(period), n), PAD, np.int64)
        for s in np.unique(period):
            top = self.period(int(s))[1][:n]
            out[period == s, :len(top)] = top
        return out

    def _periods(self, requests: Requests) -> np.ndarray:
        return self.popular.period_starts(requests.time_ms)
