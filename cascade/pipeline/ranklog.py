"""The rank-log step: the teacher scores candidate lists of sampled train requests (sharded under torchrun)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import artifacts as A
from ..arrays import pad_by_row
from ..data.requests import requests_frame, to_requests
from ..distill.ranklog import sample_candidates
from ..distill.shard_runner import build_rank_log_distributed
from ..models.scoring import ranker_scorer
from ..run_data import RunData, load_ranker
from .config import RankLogSection
from .runner import StepContext, StepResult


def popularity(data, item_ids: np.ndarray) -> np.ndarray:
    tr = data.split_impressions("train")
    counts = tr.groupby("item_id").size()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.float64) + 1.0


def candidate_lists(data, frame: pd.DataFrame, impressions: pd.DataFrame, inputs, n_candidates: int,
                    uniform_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Item rows of each request's candidate list, int64 [R, n_candidates] (-1 = none): its impressed items in
    position order, then popularity-weighted and uniform samples of the corpus (never the OOV row).

    frame: the R requests (request_id); impressions: logged rows that hold theirs; inputs: TowerInputs whose
    context rows are the requests of ``frame``."""
    imp = impressions[impressions.request_id.isin(frame.request_id)].sort_values("position", kind="stable")
    impressed = pad_by_row(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                           inputs.item_rows(data.map_items(imp["item_id"].to_numpy(np.int64))), len(frame))
    n_real = len(data.item_ids)  # the OOV row (last) is never sampled
    pop = popularity(data, inputs.item_ids[:n_real])
    # no list longer than the corpus (checks.check_against_data warns): [R, n_candidates] would be mostly padding
    return sample_candidates(impressed, n_real, min(n_candidates, n_real), pop_weights=pop,
                             uniform_frac=uniform_frac, rng=rng)


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
    cands = candidate_lists(data, frame, tr, inputs, cfg.n_candidates, cfg.uniform_frac, rng)
    return frame, cands, inputs.item_ids


def run(ctx: StepContext) -> StepResult:
    c: RankLogSection = ctx.config
    data = RunData(ctx.inputs["data"])
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    frame, cands, item_ids = rank_log_inputs(data, c, ctx.seed)
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data, c.autocast)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    t0 = time.perf_counter()
    # one process: a plain log; under torchrun: one shard per rank, merged by rank 0 into one log
    build_rank_log_distributed(frame, cands, scorer, ctx.out / "log", requests_per_batch=c.requests_per_batch,
                               progress=ctx.progress, item_ids=item_ids, seed=ctx.seed)
    wall = time.perf_counter() - t0
    A.write_parquet(ctx.out / "requests.parquet", frame)
    log_files = [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "log").rglob("*")) if p.is_file()]
    outputs = ["requests.parquet", *log_files]
    pairs = int(np.sum(cands >= 0))
    metrics = {"n_requests": len(frame), "n_pairs": pairs, "pairs_per_s": pairs / max(wall, 1e-9),
               "autocast": score.autocast.to_dict()}
    return StepResult(outputs, metrics, f"{pairs:,} pairs at {metrics['pairs_per_s']:,.0f} pairs/s")
