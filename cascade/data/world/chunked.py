"""The synthetic world written in chunks: 10 M items and 100 M impressions without holding the log in memory.

:func:`generate_world_stream` runs the generative model of :mod:`cascade.data.world` (the same side tables, the
same latent arrays, the same per-hour simulation code, :func:`cascade.data.world.simulate.simulate_step`, and the same
post-click model) but draws the requests of each chunk of ``chunk_hours`` hour steps only when that chunk is
simulated, and writes each chunk as its own parquet file. Memory then grows with the number of users and items
(latent arrays, the users x tags / users x author-buckets history state) and with the size of ONE chunk, never
with the number of chunks.

Same model, other random stream. The in-memory world draws all requests up front: each user makes
Poisson(rate_u) requests, each at a uniform day and an hour drawn from the hour weights. By Poisson splitting, the
number of requests of user u in hour step s is then an independent Poisson(rate_u / n_days * w_hour(s) / sum(w));
this module draws, per chunk, Poisson(rate_u * sum of w over the chunk's steps / (n_days * sum(w))) requests per
user and places each on a step of the chunk with probability proportional to w: the same distribution. Tabs,
the random-exposure flag, the one-request-per-(user, step, tab, is_rand) rule, gaps and offsets are drawn as in
the world. The random stream differs (each chunk has its own generator seeded by ``(seed, chunk index)``), so the
logs equal the in-memory world's in distribution, not row by row; the side tables and every latent array are
bit-identical to :func:`cascade.data.world.generate_world`'s for the same config (the same seeded draws).

Layout of ``out_dir``::

    user_features_pure.csv, video_features_basic_pure.csv   the side tables, as the in-memory world writes them
    impressions/part-00000.parquet, ...                     one file per chunk (a pyarrow dataset), see below
    world.json, world_state.npz                             the ground truth (World.load reads them)
    manifest.json                                           written last: its presence marks a complete dataset

Impression columns (canonical names; rows sorted by request_id, then position): ``request_id`` (int64, dense,
0..R-1 in order of request start time over the whole dataset), ``user_id``, ``item_id`` (the video id),
``time_ms`` (int64 epoch ms), ``position`` (int8, 0-based), ``click`` / ``is_rand`` (int8), ``date``
(int32 YYYYMMDD, Beijing), ``hour`` / ``weekday`` (int8, Beijing time, as the KuaiRand loader derives them),
``tab`` (int8), and the post-click columns of :data:`cascade.data.kuairand.PRIVILEGED_COLUMNS` plus
``duration_ms``.

Kill safety. Every file is written atomically. After each chunk a checkpoint (``_progress.npz``: the chunk index,
the history state and the summary counters) is written; a rerun of an interrupted generation with the same config
resumes after the last checkpointed chunk (``resume=True``) and removes any later part file, or restarts from
chunk 0 (``resume=False`` or another config). The checkpoint is as large as the history state
(users x (2 x tags + 2 x author_buckets) x 4 bytes).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ...arrays import distinct
from ...artifacts import (
    MANIFEST,
    ArtifactError,
    atomic_path,
    read_manifest,
    read_npz,
    stable_hash,
    write_manifest,
    write_npz,
)
from ..io import hour_weekday
from ..sampling import CdfSampler
from .config import (
    BEIJING,
    HOUR_MS,
    HOUR_WEIGHTS,
    USER_FEATURES_FILE,
    VIDEO_FEATURES_FILE,
    WORLD_JSON,
    WORLD_STATE,
    HistoryState,
    WorldConfig,
    embedded_data_dir,
)
from .model import History, World, build_arrays
from .simulate import STEP_KEYS, new_history, popular_sampler, post_click, simulate_step, unique_requests
from .tables import read_tables, write_side_table

logger = logging.getLogger(__name__)

IMPRESSIONS_DIR = "impressions"
PROGRESS = "_progress.npz"
STREAM_FORMAT_VERSION = 1
_PART = re.compile(r"^part-(\d{5})\.parquet$")

#: Impression columns of a part file and their arrow types.
IMPRESSION_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("time_ms", pa.int64()),
    ("position", pa.int8()), ("click", pa.int8()), ("is_rand", pa.int8()), ("date", pa.int32()),
    ("hour", pa.int8()), ("weekday", pa.int8()), ("tab", pa.int8()),
    ("play_time_ms", pa.int64()), ("long_view", pa.int8()), ("is_like", pa.int8()), ("is_follow", pa.int8()),
    ("is_comment", pa.int8()), ("is_forward", pa.int8()), ("is_hate", pa.int8()), ("is_profile_enter", pa.int8()),
    ("profile_stay_time", pa.int64()), ("comment_stay_time", pa.int64()), ("duration_ms", pa.int64()),
])
_SUMMARY_COUNTERS = ("rows", "rows_random", "clicks", "clicks_random", "requests", "long_views_of_clicks")


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


@dataclass
class StreamWorldResult:
    """What :func:`generate_world_stream` produced: ``out_dir``, ``n_chunks``, ``rows_per_chunk`` [n_chunks],
    ``summary`` (rows, requests, CTRs, CTR by position), ``seconds`` (build / simulate / write, this run only),
    ``resumed_from`` (first chunk generated by this run; 0 for a fresh run, n_chunks for a finished dataset)."""

    out_dir: Path
    n_chunks: int
    rows_per_chunk: list[int]
    summary: dict[str, Any]
    seconds: dict[str, float]
    resumed_from: int


def _chunk_bounds(n_days: int, chunk_hours: int) -> list[tuple[int, int]]:
    n_steps = n_days * 24
    return [(s, min(s + chunk_hours, n_steps)) for s in range(0, n_steps, chunk_hours)]


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    # a generator per (seed, chunk): a resumed run draws chunk k exactly as an uninterrupted run does
    return np.random.default_rng(np.random.SeedSequence([seed, 1, chunk]))


def _draw_chunk_requests(cfg: WorldConfig, rate: np.ndarray, s0: int, s1: int, rng: np.random.Generator
                         ) -> dict[str, np.ndarray]:
    """The requests of hour steps [s0, s1), at most one per (user, step, tab, is_rand), sorted by step.

    rate: [U] expected requests of each user over the whole period. Same keys as world._draw_requests.
    """
    U = len(rate)
    w = HOUR_WEIGHTS[np.arange(s0, s1) % 24]
    lam = rate * (w.sum() / (cfg.n_days * HOUR_WEIGHTS.sum()))
    user = np.repeat(np.arange(U, dtype=np.int64), rng.poisson(lam))
    R = len(user)
    step = s0 + rng.choice(len(w), size=R, p=w / w.sum())
    tab_p = 0.5 ** np.arange(cfg.n_tabs)
    tab = rng.choice(cfg.n_tabs, size=R, p=tab_p / tab_p.sum())
    is_rand = (rng.random(R) < cfg.random_fraction).astype(np.int64)
    return unique_requests(step, user, tab, is_rand, cfg, U, rng)


def _simulate_chunk(world: World, hist: History, pop: CdfSampler, s0: int, s1: int,
                    rate: np.ndarray, day_ms: np.ndarray, day_int: np.ndarray, first_request_id: int,
                    rng: np.random.Generator) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Simulate hour steps [s0, s1): (arrow table of IMPRESSION_SCHEMA, per-row arrays for the summary)."""
    cfg, arrays = world.config, world._a
    req = _draw_chunk_requests(cfg, rate, s0, s1, rng)
    bounds = np.searchsorted(req["step"], np.arange(s0, s1 + 1))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in STEP_KEYS}
    for j, s in enumerate(range(s0, s1)):
        lo, hi = bounds[j], bounds[j + 1]
        if lo < hi:
            for k, v in simulate_step(world, req, lo, hi, s, hist, rng, pop).items():
                parts[k].append(v)
    if not parts["req"]:
        return IMPRESSION_SCHEMA.empty_table(), {"click": np.zeros(0, bool), "is_rand": np.zeros(0, np.int64),
                                                 "pos": np.zeros(0, np.int64), "long_view": np.zeros(0, np.int64)}
    imp = {k: np.concatenate(v) for k, v in parts.items()}
    del parts
    step = req["step"]
    day, hour = step // 24, step % 24
    req_start = day_ms[day] + hour * HOUR_MS + req["offset"]
    # request ids in order of start time (ties: the simulation order), dense across chunks
    req_rank = np.empty(len(step), np.int64)
    req_rank[np.lexsort((np.arange(len(step)), req_start))] = np.arange(len(step))
    r = imp["req"]
    request_id = first_request_id + req_rank[r]
    order = np.lexsort((imp["pos"], request_id))
    time_ms = req_start[r] + imp["pos"] * req["gap"][r]
    post = post_click(cfg, imp, arrays["item_duration_ms"][imp["item"]], rng)
    hour_bj, weekday = hour_weekday(time_ms, 8.0)
    cols = {
        "request_id": request_id, "user_id": arrays["user_ids"][req["user"][r]],
        "item_id": arrays["item_ids"][imp["item"]], "time_ms": time_ms, "position": imp["pos"],
        "click": post["is_click"], "is_rand": req["is_rand"][r], "date": day_int[day[r]], "hour": hour_bj,
        "weekday": weekday, "tab": req["tab"][r],
        **{k: post[k] for k in ("play_time_ms", "long_view", "is_like", "is_follow", "is_comment", "is_forward",
                                "is_hate", "is_profile_enter", "profile_stay_time", "comment_stay_time",
                                "duration_ms")},
    }
    table = pa.table({f.name: pa.array(np.ascontiguousarray(cols[f.name][order]).astype(f.type.to_pandas_dtype()))
                      for f in IMPRESSION_SCHEMA}, schema=IMPRESSION_SCHEMA)
    stats = {"click": imp["click"], "is_rand": req["is_rand"][r], "pos": imp["pos"], "long_view": post["long_view"]}
    return table, stats


def _part_files(imp_dir: Path) -> dict[int, Path]:
    out = {}
    for p in imp_dir.glob("part-*.parquet"):
        m = _PART.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _run_key(cfg: WorldConfig, chunk_hours: int) -> dict[str, Any]:
    return {"format_version": STREAM_FORMAT_VERSION, "world": cfg.to_dict(), "chunk_hours": chunk_hours}


def generate_world_stream(out_dir: str | Path, config: WorldConfig | None = None, chunk_hours: int = 24,
                          data_dir: str | Path | None = None, resume: bool = True, compression: str = "zstd",
                          progress: bool = False) -> StreamWorldResult:
    """Generate the world into ``out_dir`` chunk by chunk (see the module doc for the layout and the model).

    chunk_hours: hour steps per part file (24: one file per day; fewer bounds the memory of a busy day).
    resume: continue an interrupted run with the same config from its last checkpoint (else restart).
    A folder whose manifest describes this very config is returned as it is; one with another dataset raises.
    compression: parquet codec of the part files. progress: a tqdm bar over the chunks.
    """
    t0 = time.perf_counter()
    cfg = config if config is not None else WorldConfig()  # the default world
    if not isinstance(chunk_hours, int) or not 1 <= chunk_hours <= cfg.n_days * 24:
        raise ValueError(f"chunk_hours = {chunk_hours!r}: must be an integer in 1..{cfg.n_days * 24} (n_days * 24)")
    out_dir = Path(out_dir)
    imp_dir = out_dir / IMPRESSIONS_DIR
    key = _run_key(cfg, chunk_hours)
    key_hash = stable_hash(key)
    chunks = _chunk_bounds(cfg.n_days, chunk_hours)
    if (out_dir / MANIFEST).exists():
        m = read_manifest(out_dir, verify=False)
        if m.get("config_hash") != key_hash:
            raise FileExistsError(f"{out_dir}: holds a finished dataset of another config (manifest.json); "
                                  f"use an empty folder")
        logger.info("world_stream: %s is complete (manifest.json), nothing to do", out_dir)
        return StreamWorldResult(out_dir, len(chunks), list(m["rows_per_chunk"]), m["metrics"], {}, len(chunks))
    stale = sorted(p.name for p in out_dir.glob("log_*_pure.csv"))
    if stale:
        raise FileExistsError(f"{out_dir}: holds KuaiRand log file(s) {stale} of an in-memory "
                              "world; use an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    imp_dir.mkdir(exist_ok=True)

    data_dir = Path(data_dir) if data_dir is not None else embedded_data_dir()
    rng = np.random.default_rng(cfg.seed)  # the same draws as generate_world: identical side tables and arrays
    users_real, items_real = read_tables(data_dir)
    if cfg.n_items is None and len(items_real) < cfg.candidates_per_request:
        raise ValueError(f"WorldConfig.candidates_per_request = {cfg.candidates_per_request}: more than the "
                         f"{len(items_real)} videos in {data_dir / VIDEO_FEATURES_FILE}")
    users_out, items_out, arrays, activity = build_arrays(cfg, users_real, items_real, rng)
    del users_real, items_real
    empty = HistoryState(*(np.zeros((0, 0), np.float32) for _ in range(4)), hour=0.0)
    world = World(cfg, arrays, empty, out_dir=out_dir)
    hist = new_history(world)
    pop = popular_sampler(world)
    rate = cfg.mean_requests_per_user * activity / activity.mean()
    n_pos = cfg.request_size
    counters = {k: 0 for k in _SUMMARY_COUNTERS}
    pos_counts = np.zeros((4, n_pos), np.int64)  # clicks std, rows std, clicks random, rows random
    rows_per_chunk: list[int] = []

    start_chunk = 0
    prog_path = out_dir / PROGRESS
    if resume and prog_path.exists():
        try:
            prog = read_npz(prog_path)
            ok = str(prog["key_hash"]) == key_hash
        except (OSError, ValueError, KeyError):
            ok = False  # an unreadable checkpoint: restart
        if ok:
            start_chunk = int(prog["chunk"]) + 1
            for name in ("tag_click", "tag_skip", "author_click", "author_skip"):
                getattr(hist, name)[...] = prog[name]
            hist.t_ref = float(prog["t_ref"])
            counters = {k: int(v) for k, v in zip(_SUMMARY_COUNTERS, prog["counters"])}
            pos_counts = prog["pos_counts"].copy()
            rows_per_chunk = [int(x) for x in prog["rows_per_chunk"]]
            logger.info("world_stream: resuming %s after chunk %d", out_dir, start_chunk - 1)
    if start_chunk == 0:
        prog_path.unlink(missing_ok=True)
    # part files after the checkpoint (a kill between a part and its checkpoint) and temporary files are stale
    for k, p in _part_files(imp_dir).items():
        if k >= start_chunk:
            p.unlink()
    for p in imp_dir.glob(".part-*.tmp"):
        p.unlink()
    if start_chunk == 0 or not (out_dir / USER_FEATURES_FILE).exists() \
            or not (out_dir / VIDEO_FEATURES_FILE).exists():
        write_side_table(out_dir / USER_FEATURES_FILE, users_out)
        write_side_table(out_dir / VIDEO_FEATURES_FILE, items_out)
    del users_out, items_out
    t_build = time.perf_counter()

    start = dt.date.fromisoformat(cfg.start_date)
    days = [start + dt.timedelta(days=k) for k in range(cfg.n_days)]
    day_int = np.array([d.year * 10000 + d.month * 100 + d.day for d in days], np.int64)
    day_ms = np.array([int(dt.datetime(d.year, d.month, d.day, tzinfo=BEIJING).timestamp()) * 1000 for d in days],
                      np.int64)
    sim_s = write_s = 0.0
    for c in tqdm(range(start_chunk, len(chunks)), disable=not progress, desc="world_stream: chunks", unit="chunk"):
        s0, s1 = chunks[c]
        t = time.perf_counter()
        table, st = _simulate_chunk(world, hist, pop, s0, s1, rate, day_ms, day_int, counters["requests"],
                                    _chunk_rng(cfg.seed, c))
        t2 = time.perf_counter()
        with atomic_path(imp_dir / part_name(c)) as tmp:
            pq.write_table(table, tmp, compression=compression)
        n = table.num_rows
        counters["requests"] += int(len(distinct(table.column("request_id").to_numpy()))) if n else 0
        del table
        click, rnd = st["click"], st["is_rand"] == 1
        counters["rows"] += n
        counters["rows_random"] += int(rnd.sum())
        counters["clicks"] += int(click.sum())
        counters["clicks_random"] += int(click[rnd].sum())
        counters["long_views_of_clicks"] += int(st["long_view"][click].sum())
        for j, (m_rows, m_click) in enumerate(((~rnd, ~rnd & click), (rnd, rnd & click))):
            pos_counts[2 * j] += np.bincount(st["pos"][m_click], minlength=n_pos)
            pos_counts[2 * j + 1] += np.bincount(st["pos"][m_rows], minlength=n_pos)
        rows_per_chunk.append(n)
        write_npz(prog_path, key_hash=np.array(key_hash), chunk=np.array(c), t_ref=np.array(hist.t_ref),
                  tag_click=hist.tag_click, tag_skip=hist.tag_skip, author_click=hist.author_click,
                  author_skip=hist.author_skip, counters=np.array([counters[k] for k in _SUMMARY_COUNTERS]),
                  pos_counts=pos_counts, rows_per_chunk=np.array(rows_per_chunk, np.int64))
        sim_s += t2 - t
        write_s += time.perf_counter() - t2
        logger.info("world_stream: chunk %d/%d (hours %d-%d): %d rows", c + 1, len(chunks), s0, s1, n)
    if counters["rows"] == 0:
        raise ValueError("the world has no requests: raise mean_requests_per_user, n_users or n_days")

    rows, rr = counters["rows"], counters["rows_random"]
    clicks, cr = counters["clicks"], counters["clicks_random"]

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b else None

    summary = {
        "rows": rows, "rows_standard": rows - rr, "rows_random": rr, "requests": counters["requests"],
        "users": world.n_users, "items": world.n_items,
        "ctr": ratio(clicks, rows), "ctr_standard": ratio(clicks - cr, rows - rr), "ctr_random": ratio(cr, rr),
        "ctr_by_position_standard": [ratio(pos_counts[0, p], pos_counts[1, p]) for p in range(n_pos)],
        "ctr_by_position_random": [ratio(pos_counts[2, p], pos_counts[3, p]) for p in range(n_pos)],
        "long_view_rate_of_clicks": ratio(counters["long_views_of_clicks"], clicks),
    }
    world.history_end = hist.snapshot(float(cfg.n_days * 24))
    world._summary = {**summary, "files": [f"{IMPRESSIONS_DIR}/{part_name(c)}" for c in range(len(chunks))]}
    world.save(out_dir)
    outputs = [USER_FEATURES_FILE, VIDEO_FEATURES_FILE, WORLD_JSON, WORLD_STATE,
               *(f"{IMPRESSIONS_DIR}/{part_name(c)}" for c in range(len(chunks)))]
    wall = time.perf_counter() - t0
    write_manifest(out_dir, kind="world_stream", config=key, seed=cfg.seed, inputs={}, outputs=outputs,
                   metrics=summary, wall_s=round(wall, 3),
                   extra={"rows_per_chunk": rows_per_chunk, "n_chunks": len(chunks), "chunk_hours": chunk_hours})
    prog_path.unlink(missing_ok=True)
    seconds = {"build": round(t_build - t0, 3), "simulate": round(sim_s, 3), "write": round(write_s, 3),
               "finish": round(time.perf_counter() - t0 - (t_build - t0) - sim_s - write_s, 3)}
    logger.info("world_stream: %d rows in %d chunks, CTR %.3f, wall %.1f s -> %s", rows, len(chunks),
                summary["ctr"] or 0.0, wall, out_dir)
    return StreamWorldResult(out_dir, len(chunks), rows_per_chunk, summary, seconds, start_chunk)


def world_stream_files(out_dir: str | Path) -> list[Path]:
    """The part files of a finished streamed world, in chunk order (checked against its manifest)."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir, verify=False)
    if m.get("kind") != "world_stream":
        raise ArtifactError(f"{out_dir / MANIFEST}: kind {m.get('kind')!r}, expected 'world_stream' (a streamed world "
                            "written before manifests had a kind: generate it again)")
    files = [out_dir / IMPRESSIONS_DIR / part_name(c) for c in range(int(m["n_chunks"]))]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ArtifactError(f"{out_dir}: part file(s) listed in the manifest are missing: {missing[:3]}")
    return files
