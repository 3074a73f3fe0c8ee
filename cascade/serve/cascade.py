"""The serving cascade: retrieval -> pre-rank -> rank behind one batch API.

Every stage answers the same contract::

    select(requests, candidates, k) -> (item_ids [B, k] int64, scores [B, k] float32)

``candidates`` is ``None`` for the retriever (its candidates are the whole corpus) and an int64 [B, N] array of item
ids padded with -1 for the later stages. Padding in the output is item id -1 with score -inf.

Stages are thin: each wraps a scoring callable built by the pipeline from a trained model and the saved feature
encoder, so the same classes serve the teacher, the distilled students and test doubles. :func:`load_cascade`
builds the cascade of a finished run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..arrays import PAD, topk_rows
from ..data.history import EventHistory
from ..data.requests import Requests
from ..index.faiss_index import ItemIndex
from ..models.scoring import ranker_scorer
from ..run_data import RunData, Towers, load_ranker, load_towers


class Stage(Protocol):
    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]: ...


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
        candidates = _item_ids(candidates)
        s = np.asarray(self.score(requests, candidates), dtype=np.float32)
        if s.shape != candidates.shape:
            raise ValueError(f"scorer returned shape {s.shape}, expected {candidates.shape}")
        return topk_rows(s, candidates, k)


MAX_OVERFETCH = 4  # filtering fetches at most (1 + this) x n items from a retriever


def select_unseen(stage: Stage, requests: Requests, n: int, seen: EventHistory | None) -> tuple[np.ndarray, np.ndarray]:
    """``stage.select(requests, None, n)``, without the items each user was shown strictly before the request when
    ``seen`` is given: over-fetch by what the users saw (at most MAX_OVERFETCH x n more), drop the seen items,
    keep the best n, so filtering does not shrink the list."""
    if seen is None:
        return stage.select(requests, None, n)
    lo, hi = seen.before(requests.user_id, requests.time_ms)
    extra = min(int((hi - lo).max(initial=0)), MAX_OVERFETCH * n)
    items, scores = stage.select(requests, None, n + extra)
    items = np.where(seen.seen(requests.user_id, items, requests.time_ms), PAD, items)
    return topk_rows(scores, items, n)


def _item_ids(candidates: np.ndarray) -> np.ndarray:
    """Candidate item ids as int64 [B, N]; a NaN, fractional or non-numeric id raises naming its row and column
    (padding is -1, never NaN: a NaN cast to int64 would come back as a real-looking item)."""
    c = np.asarray(candidates)
    if c.ndim != 2:
        raise ValueError(f"candidates must be [B, N] item ids, got shape {c.shape}")
    if c.dtype.kind in "iu":
        return c.astype(np.int64, copy=False)
    v = pd.to_numeric(pd.Series(c.ravel(), dtype=object), errors="coerce").to_numpy(np.float64).reshape(c.shape)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(v) | (v != np.floor(v))
    if bad.any():
        b, j = (int(x[0]) for x in np.nonzero(bad))
        x = c[b, j].item() if isinstance(c[b, j], np.generic) else c[b, j]
        raise ValueError(f"candidates[{b}, {j}] = {x!r} is not an item id: ids are integers, padding is -1")
    return v.astype(np.int64)


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
    """retrieval -> pre-rank -> rank. The ranker can be the teacher or the distilled rank student.

    seen: the logged history of what users were shown (an :class:`EventHistory` of impressions); with
    ``filter_seen=True`` an item the user was shown strictly before the request never reaches a list.
    """

    STAGE_NAMES = ("retrieval", "prerank", "rank")

    def __init__(self, retriever: Stage, preranker: Stage, ranker: Stage, seen: EventHistory | None = None,
                 context_kinds: dict[str, str] | None = None):
        self.retriever, self.preranker, self.ranker, self.seen = retriever, preranker, ranker, seen
        self.context_kinds = context_kinds  # context name -> "int" | "float" | "str": checked per request

    def recommend(self, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                  return_stages: bool = False, filter_seen: bool = False) -> CascadeResult:
        if not (0 < k <= n_prerank <= n_retrieve):
            raise ValueError(f"need 0 < k <= n_prerank <= n_retrieve, got k={k}, n_prerank={n_prerank}, "
                             f"n_retrieve={n_retrieve}")
        if filter_seen and self.seen is None:
            raise ValueError("filter_seen=True but the cascade was built without the seen history")
        b = len(requests)
        errors = requests.validity(self.context_kinds)
        ok = np.array([e is None for e in errors], dtype=bool)
        items = np.full((b, k), PAD, np.int64)
        scores = np.full((b, k), -np.inf, np.float32)
        timing = {n: 0.0 for n in self.STAGE_NAMES}
        stages: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if ok.any():
            req = requests.take(np.flatnonzero(ok)).valid_rows(self.context_kinds)
            t0 = time.perf_counter()
            ri, rs = select_unseen(self.retriever, req, n_retrieve, self.seen if filter_seen else None)
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


# ---------------------------------------------------------------------------------------------------------------
# the cascade of a finished run


def build_cascade(data: RunData, retrieval: Towers, prerank: Towers, ranker: torch.nn.Module, index,
                  seen: EventHistory | None = None) -> Cascade:
    """retrieval tower + index -> pre-rank tower -> ranker (teacher or distilled student)."""
    return Cascade(Retriever(lambda r: retrieval.user_embed(data, r), index), PairScorer(prerank.scorer(data)),
                   PairScorer(ranker_scorer(ranker, data)), seen, context_kinds=data.context_kinds)


def load_cascade(run_dir: str | Path, variant: str = "distilled", ranker: str = "teacher",
                 data: RunData | None = None) -> tuple[RunData, Cascade]:
    """The servable cascade of a finished run: (RunData, Cascade). variant: a students/ sub-folder
    ("distilled" or "ground_truth"); ranker: "teacher" or "student" (the distilled rank student).

    Every file it loads is checked against the sha256 its step's manifest records (RunData checks the data step's
    tables): an altered checkpoint, table or index raises ArtifactError naming the file."""
    run_dir = Path(run_dir)
    if ranker not in ("teacher", "student"):
        raise ValueError(f"ranker {ranker!r} must be 'teacher' or 'student'")
    data = data or RunData(run_dir / "data")
    sdir = run_dir / "students" / variant
    if not (sdir / "retrieval").is_dir():
        raise FileNotFoundError(f"{sdir}: no such student variant (have "
                                f"{sorted(p.name for p in (run_dir / 'students').iterdir() if p.is_dir())})")
    towers = [f"{variant}/{stage}/{f}" for stage in ("retrieval", "prerank") for f in ("model.pt", "config.json")]
    ranker_files = ["rank_student/model.pt", "rank_student/config.json"] if ranker == "student" else []
    A.verify_listed(run_dir / "students", towers + ranker_files)
    if ranker == "teacher":
        A.verify_listed(run_dir / "teacher", ["teacher/model.pt", "teacher/config.json"])
    retr, pre = load_towers(sdir / "retrieval", data), load_towers(sdir / "prerank", data)
    model_dir = run_dir / "teacher" / "teacher" if ranker == "teacher" else run_dir / "students" / "rank_student"
    model = load_ranker(model_dir, data.spec)
    # the index checks its own files and that it holds this tower's items (naming both hashes), then the step's
    # manifest confirms that the whole index folder is the one the index step wrote
    index = ItemIndex.load(run_dir / "index" / variant,
                           expect_model_hash=A.sha256_file(sdir / "retrieval" / "model.pt"),
                           expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
    A.verify_listed(run_dir / "index", [f"{variant}/{f}" for f in ("manifest.json", "index.faiss", "item_ids.npy")])
    return data, build_cascade(data, retr, pre, model, index)


def trace_requests(data: RunData, cascade: Cascade, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                   show: int = 10) -> list[pd.DataFrame]:
    """For each request, a table of its final items with the rank each got at every stage (a funnel trace)."""
    res = cascade.recommend(requests, n_retrieve, n_prerank, k, return_stages=True)
    tables = []
    for b in range(len(requests)):
        final = res.items[b][:show]
        t = pd.DataFrame({"item_id": final, "final_score": res.scores[b][:show]})
        for st, (items, _) in res.stages.items():
            pos = {int(x): j + 1 for j, x in enumerate(items[b]) if x != PAD}
            t[f"{st}_rank"] = [pos.get(int(x)) for x in final]
        tables.append(t.merge(data.items, on="item_id", how="left")[
            ["item_id", "retrieval_rank", "prerank_rank", "rank_rank", "final_score"]
            + [c for c in ("item_key", "tag", "author_id", "video_type") if c in data.items.columns]])
    return tables
