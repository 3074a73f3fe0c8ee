"""The rank-log step: the teacher scores candidate lists of sampled train requests (sharded under torchrun)."""

from __future__ import annotations

import time

import numpy as np

from .. import artifacts as A
from ..data.requests import requests_frame, to_requests
from ..distill.ranklog import sample_candidates
from ..distill.shard_runner import build_rank_log_distributed
from ..models.scoring import ranker_scorer
from ..run_data import RunData, load_ranker
from .config import RankLogSection
from .runner import StageContext, StageResult


def popularity(data, item_ids: np.ndarray) -> np.ndarray:
    tr = data.split_impressions("train")
    counts = tr.groupby("item_id").size()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.float64) + 1.0


def pad_by_row(rows: np.ndarray, values: np.ndarray, n_rows: int, fill: int = -1) -> np.ndarray:
    """Scatter values [N] into a padded int64 [n_rows, max count] by their row [N], keeping the given order within
    a row (one stable sort, no per-row Python)."""
    order = np.argsort(rows, kind="stable")
    rr = rows[order]
    counts = np.bincount(rr, minlength=n_rows)
    slot = np.arange(len(rr)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full((n_rows, max(int(counts.max()) if len(counts) else 0, 1)), fill, np.int64)
    out[rr, slot] = np.asarray(values, np.int64)[order]
    return out


def rank_log_inputs(data, cfg: RankLogSection, seed: int):
    """The sampled train requests (with ``user_row``), their candidate item rows [R, L] (impressed items first, then
    popularity-weighted and uniform corpus samples) and the item row -> id map. Deterministic in ``seed``, so every
    torchrun rank builds the same ones and scores its own shard of them."""
    tr = data.split_impressions("train")
    frame = requests_frame(tr, data.context_names)
    rng = np.random.default_rng(seed)
    if cfg.max_requests is not None and len(frame) > cfg.max_requests:
        frame = frame.iloc[np.sort(rng.choice(len(frame), cfg.max_requests, replace=False))].reset_index(drop=True)
    inputs = data.tower_inputs(frame)
    frame["user_row"] = inputs.user_rows(data.map_users(frame["user_id"].to_numpy()))
    # impressed items per request as item rows, padded with -1 (one sort, no per-row Python)
    imp = tr[tr.request_id.isin(frame.request_id)]
    imp = imp.sort_values("position", kind="stable")
    impressed = pad_by_row(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                            inputs.item_rows(imp["item_id"].to_numpy(np.int64)), len(frame))
    n_real = len(data.item_ids)  # the OOV row (last) is never sampled
    pop = popularity(data, inputs.item_ids[:n_real])
    cands = sample_candidates(impressed, n_real, cfg.n_candidates, pop_weights=pop, uniform_frac=cfg.uniform_frac, rng=rng)
    return frame, cands, inputs.item_ids


def run(ctx: StageContext) -> StageResult:
    c: RankLogSection = ctx.config
    data = RunData(ctx.inputs["data"])
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    frame, cands, item_ids = rank_log_inputs(data, c, ctx.seed)
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    t0 = time.perf_counter()
    # one process: a plain log; under torchrun: one shard per rank, merged by rank 0 into one log
    build_rank_log_distributed(frame, cands, scorer, ctx.out / "log", requests_per_batch=c.requests_per_batch,
                               progress=ctx.progress, item_ids=item_ids, seed=ctx.seed)
    wall = time.perf_counter() - t0
    A.write_parquet(ctx.out / "requests.parquet", frame)
    outputs = ["requests.parquet"] + [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "log").rglob("*")) if p.is_file()]
    pairs = int(np.sum(cands >= 0))
    metrics = {"n_requests": len(frame), "n_pairs": pairs, "pairs_per_s": pairs / max(wall, 1e-9)}
    return StageResult(outputs, metrics, f"{pairs:,} pairs at {metrics['pairs_per_s']:,.0f} pairs/s")
