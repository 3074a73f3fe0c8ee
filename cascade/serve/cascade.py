"""The serving cascade: retrieval -> pre-rank -> rank behind one batch API.

Every stage answers the same contract::

    select(requests, candidates, k) -> (item_ids [B, k] int64, scores [B, k] float32)

``candidates`` is ``None`` for the retriever (its candidates are the whole corpus) and an int64 [B, N] array of item
ids padded with -1 for the later stages. Padding in the output is item id -1 with score -inf.

Stages are thin: each wraps a scoring callable built by the pipeline from a trained model and the saved feature
encoder, so the same classes serve the teacher, the distilled students and test doubles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

PAD = -1


@dataclass
class Requests:
    """A batch of B requests. user_id, time_ms: int64 [B]; context: name -> array [B] (e.g. hour, tab).

    Rows may be invalid (a negative or missing user id); those get an error message and an empty result
    without disturbing the rest of the batch.
    """

    user_id: np.ndarray
    time_ms: np.ndarray
    context: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_id = np.asarray(self.user_id)
        self.time_ms = np.asarray(self.time_ms, dtype=np.int64)
        b = len(self.user_id)
        if self.time_ms.shape != (b,):
            raise ValueError(f"Requests: time_ms has shape {self.time_ms.shape}, expected ({b},)")
        for k, v in self.context.items():
            if len(v) != b:
                raise ValueError(f"Requests: context {k!r} has {len(v)} rows, expected {b}")
        if self.request_id is None:
            self.request_id = np.arange(b, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, idx: np.ndarray) -> "Requests":
        return Requests(self.user_id[idx], self.time_ms[idx], {k: np.asarray(v)[idx] for k, v in self.context.items()},
                        self.request_id[idx])

    def validity(self) -> list[str | None]:
        """Per request: None when valid, else the reason it cannot be served."""
        out: list[str | None] = [None] * len(self)
        uid = self.user_id
        bad = np.zeros(len(self), dtype=bool)
        if uid.dtype.kind == "f":
            bad |= ~np.isfinite(uid)
        if uid.dtype.kind in "fiu":
            bad |= np.nan_to_num(uid.astype(np.float64), nan=-1) < 0
        else:
            bad |= True
        bad |= self.time_ms < 0
        for i in np.flatnonzero(bad):
            out[i] = f"request {int(self.request_id[i])}: invalid user_id {uid[i]!r} or time_ms {int(self.time_ms[i])}"
        return out


class Stage(Protocol):
    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def topk_rows(scores: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (item, score) by score; pads (item -1) sort last. scores, items: [B, N]."""
    b, n = scores.shape
    scores = np.where(items == PAD, -np.inf, scores).astype(np.float32)
    k_eff = min(k, n)
    if k_eff < n:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.broadcast_to(np.arange(n), (b, n))
    s = np.take_along_axis(scores, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    out_s = np.take_along_axis(scores, idx, 1)
    out_i = np.take_along_axis(items, idx, 1)
    out_i = np.where(np.isfinite(out_s), out_i, PAD)
    if k_eff < k:
        out_s = np.pad(out_s, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
        out_i = np.pad(out_i, ((0, 0), (0, k - k_eff)), constant_values=PAD)
    return out_i.astype(np.int64), out_s


class SeenFilter:
    """Items each user was already exposed to, as sorted int64 keys user_row * n + item_row (no per-row Python).

    user_ids, item_ids: int64 [E] exposure pairs (any order, duplicates allowed).
    """

    def __init__(self, user_ids: np.ndarray, item_ids: np.ndarray):
        self.keys_ = np.unique(_pair_key(np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)))

    def mask(self, user_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
        """bool [B, N]: True where items[b, j] was seen by user_ids[b]."""
        keys = _pair_key(np.broadcast_to(np.asarray(user_ids, np.int64)[:, None], items.shape), items)
        pos = np.searchsorted(self.keys_, keys)
        pos = np.minimum(pos, len(self.keys_) - 1) if len(self.keys_) else pos
        return (items != PAD) & (len(self.keys_) > 0) & (self.keys_[pos] == keys if len(self.keys_) else False)


def _pair_key(u: np.ndarray, i: np.ndarray) -> np.ndarray:
    # Cantor-free packing: ids fit in 32 bits in every supported source (checked by the caller's encoders).
    return (u.astype(np.int64) << 32) | (i.astype(np.int64) & 0xFFFFFFFF)


class Retriever:
    """User tower + item index. user_embed(requests) -> float32 [B, d]; index.search(xq, k) -> (D, item_ids)."""

    def __init__(self, user_embed: Callable[[Requests], np.ndarray], index):
        self.user_embed = user_embed
        self.index = index

    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        if candidates is not None:
            raise ValueError("the retriever searches the whole corpus: candidates must be None")
        u = np.ascontiguousarray(self.user_embed(requests), dtype=np.float32)
        d, i = self.index.search(u, k)
        i, d = np.asarray(i, np.int64), np.asarray(d, np.float32)
        if (i == PAD).any():  # padding must never look like a score (rewritten only when there is any: batch 1 is
            d = np.where(i == PAD, np.float32(-np.inf), d)  # ~60 us in all, and this was 3 us of it)
        return i, d


class PairScorer:
    """A stage that scores (request, candidate) pairs with ``score(requests, candidates [B,N]) -> [B,N]``."""

    def __init__(self, score: Callable[[Requests, np.ndarray], np.ndarray]):
        self.score = score

    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        if candidates is None:
            raise ValueError("this stage re-scores candidates: pass candidates [B, N]")
        s = np.asarray(self.score(requests, candidates), dtype=np.float32)
        if s.shape != candidates.shape:
            raise ValueError(f"scorer returned shape {s.shape}, expected {candidates.shape}")
        return topk_rows(s, candidates, k)


@dataclass
class CascadeResult:
    """items/scores: the final [B, k] lists; stages: stage -> (items, scores) when asked; timing_s: stage -> wall s;
    errors: per request None or the reason it was not served (its row is all padding)."""

    items: np.ndarray
    scores: np.ndarray
    errors: list[str | None]
    timing_s: dict[str, float]
    stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class Cascade:
    """retrieval -> pre-rank -> rank. The ranker can be the teacher or the distilled rank student."""

    STAGE_NAMES = ("retrieval", "prerank", "rank")

    def __init__(self, retriever: Stage, preranker: Stage, ranker: Stage, seen: SeenFilter | None = None):
        self.retriever, self.preranker, self.ranker, self.seen = retriever, preranker, ranker, seen

    def recommend(self, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                  return_stages: bool = False, filter_seen: bool = False) -> CascadeResult:
        if not (0 < k <= n_prerank <= n_retrieve):
            raise ValueError(f"need 0 < k <= n_prerank <= n_retrieve, got k={k}, n_prerank={n_prerank}, n_retrieve={n_retrieve}")
        if filter_seen and self.seen is None:
            raise ValueError("filter_seen=True but the cascade was built without a SeenFilter")
        b = len(requests)
        errors = requests.validity()
        ok = np.array([e is None for e in errors], dtype=bool)
        items = np.full((b, k), PAD, np.int64)
        scores = np.full((b, k), -np.inf, np.float32)
        timing = {n: 0.0 for n in self.STAGE_NAMES}
        stages: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if ok.any():
            req = requests.take(np.flatnonzero(ok))
            req.user_id = req.user_id.astype(np.int64)
            t0 = time.perf_counter()
            if filter_seen:
                # Over-fetch, drop seen items, keep the best n_retrieve: filtering must not shrink the list.
                ri, rs = self.retriever.select(req, None, 2 * n_retrieve)
                ri = np.where(self.seen.mask(req.user_id, ri), PAD, ri)
                ri, rs = topk_rows(rs, ri, n_retrieve)
            else:
                ri, rs = self.retriever.select(req, None, n_retrieve)
            t1 = time.perf_counter()
            pi, ps = self.preranker.select(req, ri, n_prerank)
            t2 = time.perf_counter()
            fi, fs = self.ranker.select(req, pi, k)
            t3 = time.perf_counter()
            timing = {"retrieval": t1 - t0, "prerank": t2 - t1, "rank": t3 - t2}
            items[ok], scores[ok] = fi, fs
            if return_stages:
                for name, (si, ss) in zip(self.STAGE_NAMES, ((ri, rs), (pi, ps), (fi, fs))):
                    full_i = np.full((b, si.shape[1]), PAD, np.int64)
                    full_s = np.full((b, si.shape[1]), -np.inf, np.float32)
                    full_i[ok], full_s[ok] = si, ss
                    stages[name] = (full_i, full_s)
        return CascadeResult(items, scores, errors, timing, stages)
