"""Request replay: push the test-period requests through the cascade in time order and measure every stage.

Quality, per request r and stage output S_r (retrieval N1, pre-rank N2, final K):

- teacher-recall@K = |T_r ∩ S_r| / K with T_r the teacher's top-K over the whole corpus;
- click-recall = |G_r ∩ S_r| / |G_r| with G_r the clicked items of the request (requests with clicks only);
- NDCG@K of the stage's first K items against the teacher's graded relevance (rank buckets of the teacher's
  top list over the whole corpus);
- on the synthetic world, the oracle expected clicks of the final list under the true click probability and its
  ratio to the oracle top-K.

Latency: batch 1 (per-request p50 / p95 / p99, per stage and end to end) and batched throughput (requests/s).

:func:`teacher_top_over_corpus` gives the reference lists T_r: the ranker's top-K over the whole corpus.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..arrays import PAD, topk_rows
from ..data.requests import Requests
from ..eval.metrics import click_recall, latency_summary, ndcg_at_k, recall_at_k
from ..models.scoring import ranker_scorer
from ..run_data import RunData
from .cascade import Cascade

STAGES = ("retrieval", "prerank", "rank")


@dataclass
class ReplayInputs:
    """requests: the test requests in time order (B). clicked: int64 [B, C] clicked item ids padded with -1.
    teacher_top: int64 [B, L] the teacher's best L items over the whole corpus, best first (L >= k).
    teacher_grades: float [B, L] graded relevance of teacher_top (e.g. rank buckets 4, 3, 2, 1).
    oracle_prob: optional f(requests, items [B, k]) -> true click probability [B, k] (the world only).
    oracle_best: optional [B] expected clicks of the oracle's own top-k list."""

    requests: Requests
    clicked: np.ndarray
    teacher_top: np.ndarray
    teacher_grades: np.ndarray
    oracle_prob: Callable[[Requests, np.ndarray], np.ndarray] | None = None
    oracle_best: np.ndarray | None = None


def replay_quality(cascade: Cascade, inp: ReplayInputs, n_retrieve: int, n_prerank: int, k: int,
                   batch_size: int = 256, filter_seen: bool = False,
                   progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Per-request quality rows and their summary (means over requests)."""
    req = inp.requests
    b = len(req)
    if inp.teacher_top.shape[0] != b or inp.clicked.shape[0] != b:
        raise ValueError(f"replay inputs disagree: {b} requests, teacher_top {inp.teacher_top.shape}, "
                         f"clicked {inp.clicked.shape}")
    if inp.teacher_top.shape[1] < k:
        raise ValueError(f"teacher_top has {inp.teacher_top.shape[1]} items per request, need >= k={k}")
    ref = inp.teacher_top[:, :k]
    cols: dict[str, list[np.ndarray]] = {}
    finals = []
    bar = tqdm(range(0, b, batch_size), desc="replay quality", disable=not progress, leave=False)
    for s in bar:
        idx = np.arange(s, min(s + batch_size, b))
        sub = req.take(idx)
        res = cascade.recommend(sub, n_retrieve, n_prerank, k, return_stages=True, filter_seen=filter_seen)
        for name in STAGES:
            items = res.stages[name][0] if res.stages else np.full((len(idx), k), PAD)
            cols.setdefault(f"{name}_teacher_recall", []).append(recall_at_k(ref[idx], items))
            cols.setdefault(f"{name}_click_recall", []).append(click_recall(inp.clicked[idx], items))
            cols.setdefault(f"{name}_ndcg", []).append(
                ndcg_at_k(items[:, :k], inp.teacher_top[idx], inp.teacher_grades[idx], k))
        finals.append(res.items)
        if any(e is not None for e in res.errors):
            cols.setdefault("error", []).append(np.array([e or "" for e in res.errors], dtype=object))
    rows = pd.DataFrame({"request_id": req.request_id, "user_id": req.user_id, "time_ms": req.time_ms})
    for c, parts in cols.items():
        rows[c] = np.concatenate(parts)
    final = np.concatenate(finals) if finals else np.zeros((0, k), np.int64)
    rows["final_items"] = list(final)  # a list column in parquet
    if inp.oracle_prob is not None:
        p = inp.oracle_prob(req, final)
        rows["oracle_clicks"] = np.where(final == PAD, 0.0, p).sum(axis=1)
        if inp.oracle_best is not None:
            rows["oracle_best"] = inp.oracle_best
            rows["oracle_ratio"] = rows["oracle_clicks"] / np.maximum(inp.oracle_best, 1e-12)
    summary = {c: float(np.nanmean(rows[c])) for c in rows.columns
               if c not in ("request_id", "user_id", "time_ms", "final_items", "error")}
    summary["n_requests"] = int(b)
    return rows, summary


def replay_latency(cascade: Cascade, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                   batch_size: int = 1, max_requests: int | None = None, progress: bool = False) -> dict:
    """Serve ``requests`` in time order in batches of ``batch_size``; per-stage and end-to-end latency per batch
    (p50/p95/p99 ms) and throughput (requests/s over the whole replay)."""
    n = len(requests) if max_requests is None else min(max_requests, len(requests))
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    total: list[float] = []
    served = 0
    t_start = time.perf_counter()
    for s in tqdm(range(0, n, batch_size), desc=f"replay latency b={batch_size}", disable=not progress, leave=False):
        sub = requests.take(np.arange(s, min(s + batch_size, n)))
        t0 = time.perf_counter()
        res = cascade.recommend(sub, n_retrieve, n_prerank, k)
        total.append(time.perf_counter() - t0)
        for st in STAGES:
            per_stage[st].append(res.timing_s[st])
        served += int(sum(e is None for e in res.errors))
    wall = time.perf_counter() - t_start
    out = {"batch_size": batch_size, "n_requests": n, "served": served, "requests_per_s": n / max(wall, 1e-12),
           "end_to_end_ms": latency_summary(np.array(total))}
    for st in STAGES:
        out[f"{st}_ms"] = latency_summary(np.array(per_stage[st]))
    out["samples_ms"] = {**{st: [1e3 * x for x in per_stage[st]] for st in STAGES},
                         "end_to_end": [1e3 * x for x in total]}
    return out


def teacher_top_over_corpus(model: torch.nn.Module, data: RunData, requests: Requests, k: int,
                            pairs_per_batch: int = 262144, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ranker's top-k over the whole corpus for each request: (item ids [B, k], logits [B, k]).

    Scores B x I pairs in blocks of about ``pairs_per_batch`` (requests x item chunk), keeping a running top-k,
    so memory stays bounded for any corpus size. This is the reference list of teacher-recall.
    """
    b, n_items = len(requests), len(data.item_ids)
    item_chunk = min(n_items, pairs_per_batch)
    req_chunk = max(1, pairs_per_batch // item_chunk)
    score = ranker_scorer(model, data)
    out_i = np.full((b, k), PAD, np.int64)
    out_s = np.full((b, k), -np.inf, np.float32)
    for r0 in tqdm(range(0, b, req_chunk), desc="teacher over corpus", disable=not progress, leave=False):
        sub = requests.take(np.arange(r0, min(r0 + req_chunk, b)))
        best_i = np.full((len(sub), 0), PAD, np.int64)
        best_s = np.zeros((len(sub), 0), np.float32)
        for s in range(0, n_items, item_chunk):
            chunk = np.ascontiguousarray(np.broadcast_to(data.item_ids[s:s + item_chunk],
                                                         (len(sub), min(item_chunk, n_items - s))))
            sc = score(sub, chunk)
            best_i, best_s = topk_rows(np.concatenate([best_s, sc], 1), np.concatenate([best_i, chunk], 1), k)
        out_i[r0:r0 + len(sub)], out_s[r0:r0 + len(sub)] = best_i, best_s
    return out_i, out_s
