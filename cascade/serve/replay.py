"""Request replay: push the test-period requests through the cascade in time order and measure every stage.

Outcomes first. Per request r with held-out clicked items G_r and a stage's output S_r (retrieval N1, pre-rank
N2, final K), :func:`list_quality` measures:

- click-recall = |G_r ∩ S_r| / |G_r| and HitRate (any click kept), over the whole stage output;
- click-NDCG@K: NDCG of the stage's first K items against the clicks (binary relevance);
- teacher-recall@K = |T_r ∩ S_r| / K with T_r the teacher's top-K over the whole corpus, and teacher-NDCG@K
  against the teacher's graded relevance: agreement with the ranker (a diagnostic: worth as much as the teacher);
- on the synthetic world, the oracle expected clicks of the final list (true click probabilities) and its ratio
  to the oracle's own top-K; on its random-exposure requests also the expected click-recall@K, the share of the
  slice's expected clicks that the final lists hold: sum_r sum_{i in L_r} p(r, i) / sum_r sum_{i in corpus} p(r, i).
  Random exposure shows items uniformly over the corpus in random order, so this is exactly what the slice's pooled
  click-recall (its hits over its clicks) converges to as the exposures are drawn again; the slice's measured
  click-recall@K rests on a handful of hits (a random click lands in a top-K of thousands by chance).

Means over requests with clicks, and the same over the random-exposure requests (``*_rand``: the unbiased slice,
where the data has one); diversity of the final lists (distinct items, catalogue coverage, share of the 10 most
frequent items). :func:`replay_quality` measures a cascade stage by stage; :func:`ranking_quality` measures one
ranking of the whole corpus (a baseline, or the teacher's own top list: the cascade's ceiling) at the same sizes.

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
from ..data.history import EventHistory
from ..data.requests import Requests
from ..eval.metrics import click_ndcg, click_recall, hit_rate, latency_summary, list_diversity, ndcg_at_k, recall_at_k
from ..models.scoring import ranker_scorer
from ..run_data import RunData
from ..threads import ordered_map
from .cascade import Cascade

STAGES = ("retrieval", "prerank", "rank")
RAND_METRICS = ("click_recall", "hit_rate", "click_ndcg")  # also reported on the random-exposure requests


@dataclass
class ReplayInputs:
    """requests: the test requests in time order (B). clicked: int64 [B, C] clicked item ids padded with -1.
    teacher_top: int64 [B, L] the teacher's best L items over the whole corpus, best first (L >= k).
    teacher_grades: float [B, L] graded relevance of teacher_top (e.g. rank buckets 4, 3, 2, 1).
    is_rand: bool [B] requests of the random-exposure slice (None: the data has none).
    n_items: the catalogue size (diversity's coverage).
    oracle_prob: optional f(requests, items [B, k]) -> true click probability [B, k] (the world only).
    oracle_best: optional [B] expected clicks of the oracle's own top-k list.
    oracle_mass: optional float [B] expected clicks over the whole corpus (the sum of the true click probabilities;
    needed on the random-exposure requests only, nan elsewhere).
    in_sample: bool [B] the requests the overall means are taken over (None: all); the others are random-exposure
    requests replayed in addition, counted only in the random-slice (``*_rand``) means."""

    requests: Requests
    clicked: np.ndarray
    teacher_top: np.ndarray
    teacher_grades: np.ndarray
    is_rand: np.ndarray | None = None
    n_items: int = 0
    oracle_prob: Callable[[Requests, np.ndarray], np.ndarray] | None = None
    oracle_best: np.ndarray | None = None
    in_sample: np.ndarray | None = None
    oracle_mass: np.ndarray | None = None

    def __post_init__(self) -> None:
        b = len(self.requests)
        rand = np.zeros(b, bool) if self.is_rand is None else self.is_rand
        if self.in_sample is not None and (self.in_sample.shape != (b,) or not (self.in_sample | rand).all()):
            raise ValueError("replay inputs: in_sample must be bool [B], every request outside it a random-exposure "
                             "one")
        for name in ("clicked", "teacher_top", "teacher_grades"):
            if getattr(self, name).shape[0] != b:
                raise ValueError(f"replay inputs disagree: {b} requests, {name} {getattr(self, name).shape}")
        if self.is_rand is not None and self.is_rand.shape != (b,):
            raise ValueError(f"replay inputs: is_rand has shape {self.is_rand.shape}, expected ({b},)")
        if self.oracle_mass is not None and (self.oracle_mass.shape != (b,) or self.oracle_prob is None
                                             or not np.isfinite(self.oracle_mass[rand]).all()):
            raise ValueError("replay inputs: oracle_mass must be float [B], finite on every random-exposure request, "
                             "beside oracle_prob")


def list_quality(items: np.ndarray, inp: ReplayInputs, rows: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-request quality [len(rows)] of the lists ``items`` [len(rows), N] of requests ``rows`` (see the module
    docstring); k: the K of the @K metrics (the final list's length)."""
    if inp.teacher_top.shape[1] < k:
        raise ValueError(f"teacher_top has {inp.teacher_top.shape[1]} items per request, need >= k={k}")
    clicked = inp.clicked[rows]
    return {"click_recall": click_recall(clicked, items), "hit_rate": hit_rate(clicked, items),
            "click_ndcg": click_ndcg(items, clicked, k),
            "teacher_recall": recall_at_k(inp.teacher_top[rows, :k], items),
            "teacher_ndcg": ndcg_at_k(items[:, :k], inp.teacher_top[rows], inp.teacher_grades[rows], k)}


def _oracle_columns(final: np.ndarray, inp: ReplayInputs) -> dict[str, np.ndarray]:
    """Per-request oracle expected clicks of the final lists [B] and their ratio to the oracle's own top-K [B]
    (the world only; empty without an oracle)."""
    if inp.oracle_prob is None:
        return {}
    p = inp.oracle_prob(inp.requests, final)
    oc = np.where(final == PAD, 0.0, p).sum(axis=1)
    out = {"oracle_clicks": oc}
    if inp.oracle_best is not None:
        out["oracle_ratio"] = oc / np.maximum(inp.oracle_best, 1e-12)
    return out


def _summary(rows: pd.DataFrame, final: np.ndarray, inp: ReplayInputs) -> dict:
    """Means over requests of every per-request column (nan-aware: click metrics over requests with clicks; the
    oracle columns over all), random-slice means of the click metrics and the oracle ratio, the random slice's
    expected click-recall (pooled), and the diversity of
    the final lists."""
    skip = ("request_id", "user_id", "time_ms", "in_sample", "final_items", "error")
    sample = np.ones(len(rows), bool) if inp.in_sample is None else inp.in_sample
    logged = rows[sample]
    out = {c: float(np.nanmean(logged[c])) if logged[c].notna().any() else float("nan")
           for c in rows.columns if c not in skip}
    rand = inp.is_rand is not None and inp.is_rand.any()
    if rand:
        for c in rows.columns:
            if c.split("_", 1)[-1] in RAND_METRICS:
                v = rows[c].to_numpy()[inp.is_rand]
                out[f"{c}_rand"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out["n_rand_requests"] = int(inp.is_rand.sum())
    if inp.oracle_best is not None and inp.oracle_prob is not None:
        out["oracle_best"] = float(inp.oracle_best[sample].mean())
        if rand:
            out["oracle_ratio_rand"] = float(rows["oracle_ratio"].to_numpy()[inp.is_rand].mean())
    if rand and inp.oracle_mass is not None:
        out["expected_click_recall_rand"] = float(rows["oracle_clicks"].to_numpy()[inp.is_rand].sum()
                                                  / inp.oracle_mass[inp.is_rand].sum())
    if inp.n_items:
        out.update({f"final_{k}": v for k, v in list_diversity(final[sample], inp.n_items).items()})
    out["n_requests"] = int(sample.sum())
    out["n_requests_with_clicks"] = int((inp.clicked[sample] != PAD).any(axis=1).sum())
    return out


def replay_quality(cascade: Cascade, inp: ReplayInputs, n_retrieve: int, n_prerank: int, k: int,
                   batch_size: int = 256, filter_seen: bool = False,
                   progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Per-request quality rows (``{stage}_{metric}`` columns, the final items; ``in_sample``: False for a
    random-exposure request replayed for the random slice only) and their summary."""
    req = inp.requests
    b = len(req)
    cols: dict[str, list[np.ndarray]] = {}
    finals = []
    bar = tqdm(range(0, b, batch_size), desc="replay quality", disable=not progress, leave=False)
    for s in bar:
        idx = np.arange(s, min(s + batch_size, b))
        res = cascade.recommend(req.take(idx), n_retrieve, n_prerank, k, return_stages=True, filter_seen=filter_seen)
        for name in STAGES:
            items = res.stages[name][0] if res.stages else np.full((len(idx), k), PAD)
            for metric, v in list_quality(items, inp, idx, k).items():
                cols.setdefault(f"{name}_{metric}", []).append(v)
        finals.append(res.items)
        if any(e is not None for e in res.errors):
            cols.setdefault("error", []).append(np.array([e or "" for e in res.errors], dtype=object))
    rows = pd.DataFrame({"request_id": req.request_id, "user_id": req.user_id, "time_ms": req.time_ms,
                         "in_sample": np.ones(b, bool) if inp.in_sample is None else inp.in_sample})
    for c, parts in cols.items():
        rows[c] = np.concatenate(parts)
    final = np.concatenate(finals) if finals else np.zeros((0, k), np.int64)
    for c, v in _oracle_columns(final, inp).items():
        rows[c] = v
    rows["final_items"] = list(final)  # a list column in parquet
    return rows, _summary(rows, final, inp)


def ranking_quality(ranking: np.ndarray, inp: ReplayInputs, sizes: dict[str, int],
                    k: int) -> tuple[pd.DataFrame, dict]:
    """Per-request quality rows and summary of one ranking of the corpus per request (``ranking`` int64
    [B, >= max size], best first: a baseline's list, or the teacher's own top list), measured as if each stage kept
    its first ``sizes[stage]`` items: the same columns and keys as :func:`replay_quality`'s."""
    rows = pd.DataFrame({"request_id": inp.requests.request_id, "user_id": inp.requests.user_id,
                         "time_ms": inp.requests.time_ms,
                         "in_sample": np.ones(len(inp.requests), bool) if inp.in_sample is None else inp.in_sample})
    all_rows = np.arange(len(inp.requests))
    for stage, n in sizes.items():
        for metric, v in list_quality(ranking[:, :n], inp, all_rows, k).items():
            rows[f"{stage}_{metric}"] = v
    for c, v in _oracle_columns(ranking[:, :k], inp).items():
        rows[c] = v
    rows["final_items"] = list(ranking[:, :k])
    return rows, _summary(rows, ranking[:, :k], inp)


def replay_latency(cascade: Cascade, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                   batch_size: int = 1, max_requests: int | None = None, progress: bool = False) -> dict:
    """Serve ``requests`` in time order in batches of ``batch_size``; per-stage and end-to-end latency per batch
    (p50/p95/p99 ms) and throughput (requests/s over the whole replay). With a multi-channel retriever also each
    channel's latency within the retrieval stage ("retrieval_channels_ms": channel -> p50/p95/p99). The stages'
    per-period state (most-popular's lists, the towers' priors) is prepared before each batch that opens a new
    refresh period, outside the timings, as a server's timer would (:meth:`Cascade.refresh`): "refresh" holds how
    many (stage, period) pairs that took and the ms per pair (the calls that prepared one; the others, a check of
    their batch's periods, are left out of it and, with them, of the throughput's time)."""
    n = len(requests) if max_requests is None else min(max_requests, len(requests))
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    per_channel: dict[str, list[float]] = {c: [] for c in getattr(cascade, "channels", ())}
    total: list[float] = []
    served = periods = 0
    refresh_s = prepare_s = 0.0  # every refresh call (checks included); the calls that prepared a period
    t_start = time.perf_counter()
    for s in tqdm(range(0, n, batch_size), desc=f"replay latency b={batch_size}", disable=not progress, leave=False):
        sub = requests.take(np.arange(s, min(s + batch_size, n)))
        t0 = time.perf_counter()
        new = cascade.refresh(sub.time_ms)  # what a server refreshes on a timer: outside the request's time
        dt = time.perf_counter() - t0
        refresh_s += dt
        if new:
            periods, prepare_s = periods + new, prepare_s + dt
        t0 = time.perf_counter()
        res = cascade.recommend(sub, n_retrieve, n_prerank, k)
        total.append(time.perf_counter() - t0)
        for st in STAGES:
            per_stage[st].append(res.timing_s[st])
        for c, v in per_channel.items():
            v.append(res.timing_s[f"retrieval/{c}"])
        served += int(sum(e is None for e in res.errors))
    wall = time.perf_counter() - t_start - refresh_s
    out = {"batch_size": batch_size, "n_requests": n, "served": served, "requests_per_s": n / max(wall, 1e-12),
           "end_to_end_ms": latency_summary(np.array(total)),
           "refresh": {"periods": periods, "ms_per_period": 1e3 * prepare_s / max(periods, 1)}}
    for st in STAGES:
        out[f"{st}_ms"] = latency_summary(np.array(per_stage[st]))
    if per_channel:
        out["retrieval_channels_ms"] = {c: latency_summary(np.array(v)) for c, v in per_channel.items()}
    out["samples_ms"] = {**{st: [1e3 * x for x in per_stage[st]] for st in STAGES},
                         "end_to_end": [1e3 * x for x in total]}
    return out


def teacher_top_over_corpus(model: torch.nn.Module, data: RunData, requests: Requests, k: int,
                            pairs_per_batch: int = 262144, progress: bool = False,
                            exclude_seen: EventHistory | None = None,
                            workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ranker's top-k over the whole corpus for each request: (item ids [B, k], logits [B, k]).

    Scores B x I pairs in blocks of about ``pairs_per_batch`` (requests x item chunk), keeping a running top-k,
    so memory stays bounded for any corpus size. This is the reference list of teacher-recall. exclude_seen: leave
    out the items each user was shown strictly before the request (when the cascade filters them too). workers > 1:
    that many blocks of requests are scored side by side, torch at one thread each (:mod:`cascade.threads`).
    """
    b, n_items = len(requests), len(data.item_ids)
    item_chunk = min(n_items, pairs_per_batch)
    req_chunk = max(1, pairs_per_batch // item_chunk)
    score = ranker_scorer(model, data)

    def top_of(r0: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, logits) [R_b, k] of the requests from row r0 (one block)."""
        sub = requests.take(np.arange(r0, min(r0 + req_chunk, b)))
        best_i = np.full((len(sub), 0), PAD, np.int64)
        best_s = np.zeros((len(sub), 0), np.float32)
        for s in range(0, n_items, item_chunk):
            chunk = np.ascontiguousarray(np.broadcast_to(data.item_ids[s:s + item_chunk],
                                                         (len(sub), min(item_chunk, n_items - s))))
            sc = score(sub, chunk)
            if exclude_seen is not None:
                sc = np.where(exclude_seen.seen(sub.user_id, chunk, sub.time_ms), -np.inf, sc)
            best_i, best_s = topk_rows(np.concatenate([best_s, sc], 1), np.concatenate([best_i, chunk], 1), k)
        return best_i, best_s

    out_i = np.full((b, k), PAD, np.int64)
    out_s = np.full((b, k), -np.inf, np.float32)
    starts = range(0, b, req_chunk)
    tops = ordered_map(top_of, starts, workers)
    for r0, (best_i, best_s) in zip(starts, tqdm(tops, total=len(starts), desc="teacher over corpus",
                                                 disable=not progress, leave=False)):
        out_i[r0:r0 + len(best_i)], out_s[r0:r0 + len(best_i)] = best_i, best_s
    return out_i, out_s
