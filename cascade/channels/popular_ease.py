"""The classic prior most-popular + EASE as one list over the corpus: the baseline the teacher's prior is made of.

Where the teacher's collaborative term searches the classic prior (:mod:`cascade.train.collaborative`), it chooses
on validation a trailing window, an EASE lambda and an EASE weight b for the prior alone:

    score(request, item) = z(log(1 + the item's clicks in the window)) + b * z(the request's EASE score)

z standardising over the corpus (:meth:`PopularChannel.standardised`, :meth:`EaseChannel.standardised`). It learns
nothing beyond its two channels, and on rated logs it can keep more of the test clicks than most-popular and than
the teacher (ML-100K: BENCHMARKS.md), so the replay serves it as a baseline beside the channels.
"""

from __future__ import annotations

import numpy as np

from ..arrays import topk_rows
from ..data.requests import Requests
from .classic import EaseChannel, PopularChannel


class PopularEase:
    """popular: the window's click counts; ease: fitted EASE weights; ease_weight b >= 0; item_ids int64 [I]: the
    corpus. score(requests, candidates [B, N]) -> float32 [B, N]; select(requests, None, n) -> (item ids int64
    [B, n], scores [B, n]), the best n of the corpus (the stage contract of the channels)."""

    name = "popular_ease"

    def __init__(self, popular: PopularChannel, ease: EaseChannel, ease_weight: float, item_ids: np.ndarray,
                 pairs_per_batch: int = 1 << 22) -> None:
        if not (np.isfinite(ease_weight) and ease_weight >= 0):
            raise ValueError(f"PopularEase: ease_weight must be a finite number >= 0, got {ease_weight}")
        self.popular, self.ease, self.ease_weight = popular, ease, float(ease_weight)
        self.item_ids = np.sort(np.asarray(item_ids, np.int64))
        self.pairs_per_batch = int(pairs_per_batch)

    def params(self) -> dict:
        return {"window_days": self.popular.window_days, "lam": self.ease.lam, "ease_weight": self.ease_weight}

    def score(self, requests: Requests, candidates: np.ndarray) -> np.ndarray:
        return (self.popular.standardised(requests, candidates, len(self.item_ids))
                + np.float32(self.ease_weight) * self.ease.standardised(requests, candidates))

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        if candidates is not None:
            raise ValueError("PopularEase is a retrieval list over the corpus: candidates must be None")
        block = max(1, self.pairs_per_batch // len(self.item_ids))
        items, scores = [], []
        for r0 in range(0, len(requests), block):
            req = requests.take(np.arange(r0, min(r0 + block, len(requests))))
            ids = np.ascontiguousarray(np.broadcast_to(self.item_ids, (len(req), len(self.item_ids))))
            top = topk_rows(self.score(req, ids), ids, n)
            items.append(top[0])
            scores.append(top[1])
        if not items:
            return np.empty((0, n), np.int64), np.empty((0, n), np.float32)
        return np.concatenate(items), np.concatenate(scores)
