"""The rank-log step: the teacher scores candidate lists of sampled train requests (sharded under torchrun).

A request's list: its impressed items, then ``ranklog.channel_share`` of the free slots from the classic channels'
merged list for it (what serving's retrieval proposes; each channel reads history strictly before the request),
then popularity-weighted and uniform corpus samples. The log's ``source`` column says where each candidate came
from; the step's metrics give each source's share."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..arrays import PAD, first_occurrence_columns, first_occurrences, pad_by_row
from ..channels import Channel, MergedRetriever, load_channels, why_left_out
from ..data.requests import Requests, requests_frame, to_requests
from ..distill.ranklog import sample_candidates
from ..distill.shard_runner import build_rank_log_distributed
from ..models.scoring import autocast_record, ranker_scorer
from ..run_data import RunData, load_ranker
from ..threads import ordered_map, torch_threads
from .config import RankLogSection
from .runner import StepContext, StepResult

log = logging.getLogger(__name__)


def popularity(data, item_ids: np.ndarray) -> np.ndarray:
    tr = data.split_impressions("train")
    counts = tr.groupby("item_id").size()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.float64) + 1.0


#: The rank log's candidate sources (its ``source`` column indexes ``[IMPRESSED, *channel names, SAMPLE]``).
IMPRESSED, SAMPLE = "impressed", "sample"
#: Requests per channel select call: batches (no per-request Python), memory bounded; the default world's 10,000
#: rank-log requests took 4.9 s in chunks of 4,096, 3.9 s in chunks of 1,024 (their arrays stay in cache) and 2.1 s
#: with two chunks side by side.
CHANNEL_CHUNK = 1024


def channel_lists(channels: dict[str, Channel], requests: Requests, n: int, chunk: int = CHANNEL_CHUNK,
                  workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The channels' merged lists (equal quotas, de-duplicated; :class:`MergedRetriever`) for every request:
    (item ids int64 [R, n], PAD where short; origin int8 [R, n], the channel's index in ``channels``, -1 at PAD).
    Each channel reads only history strictly before a request's time. Selects run on chunks of ``chunk``
    requests, ``workers`` chunks side by side (:mod:`cascade.threads`; the lists do not depend on it)."""
    merged = MergedRetriever(channels, {name: 1.0 for name in channels})
    items = np.full((len(requests), n), PAD, np.int64)
    origin = np.full((len(requests), n), -1, np.int8)

    def lists_of(s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.arange(s, min(s + chunk, len(requests)))
        i, _, o = merged.select_with_origin(requests.take(rows), n)
        return rows, i, o

    for rows, i, o in ordered_map(lists_of, range(0, len(requests), chunk), workers):
        items[rows], origin[rows] = i, o
    return items, origin


def candidate_lists_with_sources(data, frame: pd.DataFrame, impressions: pd.DataFrame, inputs, n_candidates: int,
                                 uniform_frac: float, rng: np.random.Generator,
                                 channels: dict[str, Channel] | None = None,
                                 channel_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Item rows of each request's candidate list, int64 [R, L] (-1 = none; L = n_candidates, at most the corpus),
    and each slot's source, int8 [R, L] (index into ``[IMPRESSED, *channels, SAMPLE]``, -1 at padding).

    A list holds its impressed items in position order; then, of the F = L - impressed free slots,
    floor(channel_share * F + 0.5) from the merged lists of ``channels`` for that request (in merged order, less
    the impressed items; fewer where the channels propose fewer); then popularity-weighted and uniform samples of
    the corpus. No item twice in a list, never the OOV row.

    frame: the R requests (request_id, user_id, time_ms); impressions: logged rows that hold theirs; inputs:
    TowerInputs whose context rows are the requests of ``frame``."""
    if not 0.0 <= channel_share <= 1.0:
        raise ValueError(f"candidate_lists: channel_share must be in [0, 1], got {channel_share}")
    if channel_share > 0 and not channels:
        raise ValueError(f"candidate_lists: channel_share = {channel_share} needs channels to draw from")
    imp = impressions[impressions.request_id.isin(frame.request_id)].sort_values("position", kind="stable")
    impressed = pad_by_row(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                           inputs.item_rows(data.map_items(imp["item_id"].to_numpy(np.int64))), len(frame))
    n_real = len(data.item_ids)  # the OOV row (last) is never sampled
    # no list longer than the corpus (checks.check_against_data warns): [R, n_candidates] would be mostly padding
    width = min(n_candidates, n_real)
    prefix, n_imp = first_occurrences(impressed, width)
    if impressed.shape[1] > width:  # a request showed more distinct items than a list holds: say what is cut
        shown = first_occurrences(impressed, impressed.shape[1])[1]
        if (shown > width).any():
            log.warning("rank log: %d of %d requests showed more than %d distinct items (ranklog.n_candidates, at "
                        "most the corpus); their lists keep the first %d by position, and %.1f%% of the impressed "
                        "items are left out (a larger ranklog.n_candidates keeps them)", int((shown > width).sum()),
                        len(shown), width, width, 100.0 * float((shown - n_imp).sum()) / max(int(shown.sum()), 1))
    source = np.where(prefix >= 0, 0, -1).astype(np.int8)
    names = list(channels or {}) if channel_share > 0 else []
    if names:
        want = np.floor(channel_share * (width - n_imp) + 0.5).astype(np.int64)
        n_ask = int(min(n_real, (n_imp + want).max(initial=0)))  # enough after dropping the impressed ones
        if n_ask > 0:
            ids, origin = channel_lists({k: channels[k] for k in names}, to_requests(frame, data.context_names),
                                        n_ask, workers=torch.get_num_threads())
            rows = np.where(ids == PAD, -1, inputs.item_rows(data.map_items(ids)))
            rows[rows >= n_real] = -1  # an id the data does not know maps to the OOV row: never a candidate
            x = np.concatenate([prefix, rows], axis=1)
            src = np.concatenate([source, (origin + 1).astype(np.int8)], axis=1)
            cols = first_occurrence_columns(x, width)
            c = np.maximum(cols, 0)
            keep = (cols >= 0) & (np.arange(width)[None, :] < (n_imp + want)[:, None])
            prefix = np.where(keep, np.take_along_axis(x, c, 1), -1)
            source = np.where(keep, np.take_along_axis(src, c, 1), -1).astype(np.int8)
    pop = popularity(data, inputs.item_ids[:n_real])
    cands = sample_candidates(prefix, n_real, width, pop_weights=pop, uniform_frac=uniform_frac, rng=rng)
    source[(cands >= 0) & (source < 0)] = len(names) + 1
    return cands, source


def candidate_lists(data, frame: pd.DataFrame, impressions: pd.DataFrame, inputs, n_candidates: int,
                    uniform_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Item rows of each request's candidate list, int64 [R, n_candidates] (-1 = none): its impressed items in
    position order, then popularity-weighted and uniform samples of the corpus (never the OOV row); see
    :func:`candidate_lists_with_sources` for lists that also draw from the channels."""
    return candidate_lists_with_sources(data, frame, impressions, inputs, n_candidates, uniform_frac, rng)[0]


def source_names(channels: dict[str, Channel] | None, channel_share: float) -> list[str]:
    """What the ``source`` codes of :func:`candidate_lists_with_sources` name, in code order."""
    return [IMPRESSED, *(list(channels or {}) if channel_share > 0 else []), SAMPLE]


def source_share(source: np.ndarray, names: list[str]) -> dict[str, float]:
    """Share of the (non-padding) candidates from each source: {name: share}."""
    counts = np.bincount(source[source >= 0].astype(np.int64), minlength=len(names))
    total = max(int(counts.sum()), 1)
    return {name: float(counts[k] / total) for k, name in enumerate(names)}


def rank_log_inputs(data, cfg: RankLogSection, seed: int, channels: dict[str, Channel] | None = None):
    """The sampled train requests (with ``user_row``), their candidate item rows [R, L] (impressed items first,
    then ``cfg.channel_share`` of the free slots from ``channels``, then popularity-weighted and uniform corpus
    samples), the item row -> id map and each slot's source int8 [R, L] (:func:`source_names`). Deterministic in
    ``seed`` (and the channels), so every torchrun rank builds the same ones and scores its own shard of them."""
    tr = data.split_impressions("train")
    frame = requests_frame(tr, data.context_names)
    rng = np.random.default_rng(seed)
    if cfg.max_requests is not None and len(frame) > cfg.max_requests:
        frame = frame.iloc[np.sort(rng.choice(len(frame), cfg.max_requests, replace=False))].reset_index(drop=True)
    inputs = data.tower_inputs(frame)
    frame["user_row"] = inputs.user_rows(data.map_users(frame["user_id"].to_numpy()))
    cands, source = candidate_lists_with_sources(data, frame, tr, inputs, cfg.n_candidates, cfg.uniform_frac, rng,
                                                 channels, cfg.channel_share)
    return frame, cands, inputs.item_ids, source


def ranklog_channels(cfg: RankLogSection, folder, data) -> dict[str, Channel]:
    """The channels the rank log draws from, loaded from the channels step's folder (none at channel_share 0)."""
    if cfg.channel_share == 0.0:
        return {}
    built = load_channels(folder, data.history)
    names = cfg.channels_of(tuple(built))
    missing = [n for n in names if n not in built]
    if missing:
        raise ValueError(f"ranklog.channels names {missing}, which the channels step did not build "
                         f"(it built {sorted(built)}{why_left_out(folder, missing)})")
    if not names:
        raise ValueError(f"ranklog.channel_share = {cfg.channel_share} but the channels step built no channel")
    return {n: built[n] for n in names}


def run(ctx: StepContext) -> StepResult:
    c: RankLogSection = ctx.config
    data = RunData(ctx.inputs["data"])
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    t0 = time.perf_counter()
    channels = ranklog_channels(c, ctx.inputs["channels"], data)
    frame, cands, item_ids, source = rank_log_inputs(data, c, ctx.seed, channels)
    lists_s = time.perf_counter() - t0
    names = source_names(channels, c.channel_share)
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data, c.autocast)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    workers = torch.get_num_threads()
    with torch_threads(1):  # what each worker scores on (one worker: the run's one thread)
        first = np.arange(min(len(frame), c.requests_per_batch))
        score.decide(requests.take(first), item_ids[np.maximum(cands[first], 0)])  # its bf16 probe: not timed
    t0 = time.perf_counter()
    # one process: a plain log; under torchrun: one shard per rank, merged by rank 0 into one log. The run's
    # threads score whole batches side by side (cascade.threads: 1.40x the pairs/s of one batch at a time on the
    # run's intra-op threads on the default world, BENCHMARKS.md)
    build_rank_log_distributed(frame, cands, scorer, ctx.out / "log", requests_per_batch=c.requests_per_batch,
                               progress=ctx.progress, item_ids=item_ids, seed=ctx.seed,
                               sources=source, source_names=names, workers=workers)
    wall = time.perf_counter() - t0
    A.write_parquet(ctx.out / "requests.parquet", frame)
    log_files = [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "log").rglob("*")) if p.is_file()]
    outputs = ["requests.parquet", *log_files]
    pairs = int(np.sum(cands >= 0))
    share = source_share(source, names)
    metrics = {"n_requests": len(frame), "n_pairs": pairs, "pairs_per_s": pairs / max(wall, 1e-9),
               "lists_s": lists_s, "source_share": share, "autocast": autocast_record(teacher),
               "scoring_workers": workers}
    return StepResult(outputs, metrics, f"{pairs:,} pairs at {metrics['pairs_per_s']:,.0f} pairs/s; sources "
                      + ", ".join(f"{k} {v:.2f}" for k, v in share.items()))
