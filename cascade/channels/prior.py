"""A tower's recent-popularity prior: what is being clicked now, added to the tower's scores.

A two-tower student's item embeddings are fixed when the index is built, so they cannot know which items are
clicked this week; the teacher reads that from each item's windowed counts, and most-popular of a trailing window is
a strong list on real logs. The prior adds it to the tower's score of item i for a request of user u at time t:

    score(u, i, t) = <u, v_i> / T + weight * spread(u) * log(1 + c_i(t))

c_i(t): item i's clicks in the trailing window of a :class:`~.classic.PopularChannel` (the channels step's, tuned
on validation), as of the request's refresh period; spread(u) = sqrt(u' Cov(v) u) / T, the standard deviation of
u's scores over the corpus, so that one weight suits every user; T the towers' temperature. ``weight`` is chosen
on validation outcomes (0 in its grid: no prior). A retriever with a prior also scores the channel's top n beside
the index's top n and keeps the best n of both by the full score (:meth:`candidates`).
"""

from __future__ import annotations

import numpy as np

from ..arrays import PAD
from ..data.requests import Requests
from .classic import PopularChannel

PRIOR_FILE = "prior.json"  # a saved tower's prior: PopularityPrior.params()


class PopularityPrior:
    """popular: the channel whose trailing-window click counts c_i(t) are the prior; weight >= 0;
    item_emb float32 [I, d]: the tower's item embeddings of the corpus (their covariance gives spread(u));
    temperature: the towers' T.

    boost(requests, u [B, d], items [B, N] int64, PAD allowed) -> float32 [B, N] (the prior's term);
    candidates(requests, n) -> int64 [B, n]: the channel's n most clicked items per request (PAD-padded)."""

    def __init__(self, popular: PopularChannel, weight: float, item_emb: np.ndarray, temperature: float = 1.0) -> None:
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"PopularityPrior: weight must be a finite number >= 0, got {weight}")
        if item_emb.ndim != 2 or len(item_emb) < 2:
            raise ValueError(f"PopularityPrior: item_emb must be [I >= 2, d], got {item_emb.shape}")
        self.popular, self.weight, self.temperature = popular, float(weight), float(temperature)
        self.cov = np.cov(np.asarray(item_emb, np.float64), rowvar=False).reshape(item_emb.shape[1], -1)
        self._lookup: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def params(self) -> dict:
        """What a saved tower records to rebuild the prior: the channel's settings and the weight."""
        return {"weight": self.weight, **self.popular.params()}

    def spread(self, u: np.ndarray) -> np.ndarray:
        """float64 [B]: the standard deviation of each user's scores <u, v> / T over the corpus."""
        u = np.asarray(u, np.float64)
        return np.sqrt(np.maximum(np.einsum("bd,de,be->b", u, self.cov, u), 0.0)) / self.temperature

    def _period(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids sorted ascending, log1p click counts in that order) of the refresh period starting at s."""
        if s not in self._lookup:
            ids, counts = self.popular.ranked(s)
            order = np.argsort(ids, kind="stable")
            if len(self._lookup) >= 256:  # a replay walks forward in time: old periods are not asked again
                self._lookup.clear()
            self._lookup[s] = (ids[order], np.log1p(counts[order].astype(np.float64)))
        return self._lookup[s]

    def log_counts(self, requests: Requests, items: np.ndarray) -> np.ndarray:
        """float64 [B, N]: log(1 + c_i(t)) of each request's items (0 for PAD and for items not clicked lately)."""
        items = np.asarray(items, np.int64)
        out = np.zeros(items.shape, np.float64)
        period = self._periods(requests)
        for s in np.unique(period):
            rows = np.flatnonzero(period == s)
            ids, logc = self._period(int(s))
            if not len(ids):
                continue
            x = items[rows]
            pos = np.minimum(np.searchsorted(ids, x), len(ids) - 1)
            out[rows] = np.where((ids[pos] == x) & (x != PAD), logc[pos], 0.0)
        return out

    def boost(self, requests: Requests, u: np.ndarray, items: np.ndarray) -> np.ndarray:
        return (self.weight * self.spread(u)[:, None] * self.log_counts(requests, items)).astype(np.float32)

    def boost_corpus(self, requests: Requests, u: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """float32 [B, I]: :meth:`boost` of every item of ``item_ids`` [I] for every request (one lookup per refresh
        period, not per request)."""
        period = self._periods(requests)
        uniq, which = np.unique(period, return_inverse=True)
        per_period = np.stack([self.log_counts(requests.take(np.flatnonzero(period == s)[:1]), item_ids[None, :])[0]
                               for s in uniq])
        return (self.weight * self.spread(u)[:, None] * per_period[which]).astype(np.float32)

    def candidates(self, requests: Requests, n: int) -> np.ndarray:
        return self.popular.select(requests, None, n)[0]

    def _periods(self, requests: Requests) -> np.ndarray:
        r = self.popular.refresh_ms
        return (np.asarray(requests.time_ms, np.int64) // r) * r
