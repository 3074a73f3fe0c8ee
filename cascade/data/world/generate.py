"""generate_world: the world built, simulated and written in the official KuaiRand layout, with its summary."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ...artifacts import atomic_path, to_jsonable
from .config import (
    BEIJING,
    HOUR_MS,
    KUAIRAND_LOG_COLUMNS,
    USER_FEATURES_FILE,
    VIDEO_FEATURES_FILE,
    HistoryState,
    WorldConfig,
    embedded_data_dir,
)
from .model import World, build_arrays
from .simulate import draw_requests, post_click, simulate
from .tables import read_tables, write_side_table

logger = logging.getLogger(__name__)


def log_file_tag(day: dt.date) -> str:
    return f"{day.month}_{day.day:02d}"


def write_log(path: Path, cols: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Write the rows ``rows`` of ``cols`` as a KuaiRand log CSV with the exact official header, atomically."""
    table = pa.table({c: cols[c][rows] for c in KUAIRAND_LOG_COLUMNS})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            # pyarrow quotes header names; the official files do not, so the header is written by hand
            f.write((",".join(KUAIRAND_LOG_COLUMNS) + "\n").encode())
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties averaged) of scores against binary labels, by ranks."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def generate_world(out_dir: str | Path, config: WorldConfig | None = None, data_dir: str | Path | None = None,
                   progress: bool = False) -> World:
    """Generate the world, write its files into ``out_dir`` (see the module doc) and return it.

    data_dir: folder of the KuaiRand-Pure side tables (default :func:`embedded_data_dir`). progress: show a tqdm
    bar over the hour steps.
    """
    t0 = time.perf_counter()
    cfg = config if config is not None else WorldConfig()  # the default world
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else embedded_data_dir()
    rng = np.random.default_rng(cfg.seed)
    users_real, items_real = read_tables(data_dir)
    if cfg.n_items is None and len(items_real) < cfg.candidates_per_request:
        raise ValueError(f"WorldConfig.candidates_per_request = {cfg.candidates_per_request}: more than the "
                         f"{len(items_real)} videos in {data_dir / VIDEO_FEATURES_FILE}")
    start = dt.date.fromisoformat(cfg.start_date)
    days = [start + dt.timedelta(days=k) for k in range(cfg.n_days)]
    split_day = min(cfg.n_days, max(1, round(cfg.n_days * 2 / 3)))
    periods = [(0, split_day), (split_day, cfg.n_days)] if split_day < cfg.n_days else [(0, cfg.n_days)]
    log_names = [f"log_standard_{log_file_tag(days[lo])}_to_{log_file_tag(days[hi - 1])}_pure.csv"
                 for lo, hi in periods]
    log_names.append(f"log_random_{log_file_tag(days[0])}_to_{log_file_tag(days[-1])}_pure.csv")
    # a loader reads every log file of a folder: logs of another world left beside ours would be mixed in
    stale = sorted(p.name for p in out_dir.glob("log_*_pure.csv") if p.name not in log_names)
    if stale:
        raise FileExistsError(f"{out_dir}: holds log file(s) {stale} that this world would not overwrite; "
                              f"use an empty folder")
    users_out, items_out, arrays, activity = build_arrays(cfg, users_real, items_real, rng)
    empty = HistoryState(*(np.zeros((0, 0), np.float32) for _ in range(4)), hour=0.0)
    world = World(cfg, arrays, empty, out_dir=out_dir)
    req = draw_requests(cfg, activity, rng)
    t_build = time.perf_counter()
    imp, world.history_end = simulate(world, req, rng, progress)
    t_sim = time.perf_counter()

    # ---- assemble the KuaiRand columns
    r = imp["req"]
    step = req["step"][r]
    day = step // 24
    hour = step % 24
    day_int = np.array([d.year * 10000 + d.month * 100 + d.day for d in days], np.int64)
    day_ms = np.array([int(dt.datetime(d.year, d.month, d.day, tzinfo=BEIJING).timestamp()) * 1000 for d in days],
                      np.int64)
    duration = arrays["item_duration_ms"][imp["item"]]
    cols = {
        "user_id": arrays["user_ids"][req["user"][r]],
        "video_id": arrays["item_ids"][imp["item"]],
        "date": day_int[day],
        "hourmin": hour * 100,
        "time_ms": day_ms[day] + hour * HOUR_MS + req["offset"][r] + imp["pos"] * req["gap"][r],
        "is_rand": req["is_rand"][r],
        "tab": req["tab"][r],
        **post_click(cfg, imp, duration, rng),
    }
    # the official logs are sorted by user, then time
    order = np.lexsort((cols["time_ms"], cols["user_id"]))
    is_rand = cols["is_rand"][order] == 1
    d_sorted = day[order]
    out_dir.mkdir(parents=True, exist_ok=True)
    for (lo, hi), name in zip(periods, log_names[:-1]):
        write_log(out_dir / name, cols, order[~is_rand & (d_sorted >= lo) & (d_sorted < hi)])
    write_log(out_dir / log_names[-1], cols, order[is_rand])
    write_side_table(out_dir / USER_FEATURES_FILE, users_out)
    write_side_table(out_dir / VIDEO_FEATURES_FILE, items_out)
    t_write = time.perf_counter()

    # ---- summary, including how much each effect is worth to an oracle (AUC on the standard log)
    click = imp["click"]
    rnd = req["is_rand"][r] == 1
    lg = imp["logit"]
    std = ~rnd
    S = cfg.request_size
    world._summary = {
        "rows": int(len(click)),
        "rows_standard": int(std.sum()),
        "rows_random": int(rnd.sum()),
        "requests": int(len(req["user"])),
        "users": world.n_users,
        "items": world.n_items,
        "active_users": int(len(np.unique(req["user"]))),
        "shown_items": int(len(np.unique(imp["item"]))),
        "ctr": float(click.mean()),
        "ctr_standard": float(click[std].mean()) if std.any() else float("nan"),
        "ctr_random": float(click[rnd].mean()) if rnd.any() else float("nan"),
        "ctr_by_position_standard": [float(click[std & (imp["pos"] == p)].mean()) if (std & (imp["pos"] == p)).any()
                                     else float("nan") for p in range(S)],
        "ctr_by_position_random": [float(click[rnd & (imp["pos"] == p)].mean()) if (rnd & (imp["pos"] == p)).any()
                                   else float("nan") for p in range(S)],
        "long_view_rate_of_clicks": float(cols["long_view"][click].mean()) if click.any() else float("nan"),
        # position-free: each AUC scores the logged clicks by the true appeal logit with some terms removed
        "oracle_auc": {
            name: {
                "full": auc(click[m], lg[m]),
                "no_history": auc(click[m], lg[m] - imp["hist"][m]),
                "no_context": auc(click[m], lg[m] - imp["ctx"][m]),
                "static_only": auc(click[m], lg[m] - imp["hist"][m] - imp["ctx"][m]),
            }
            for name, m in (("standard", std), ("random", rnd))
        },
        "files": log_names,
    }
    world._summary = to_jsonable(world._summary)  # strict JSON: NaN (no random slice) -> None
    # world.json holds only what the seed determines (no wall times), so the same config gives identical files
    world.save(out_dir)
    world._summary["seconds"] = {"build": round(t_build - t0, 3), "simulate": round(t_sim - t_build, 3),
                                 "write_csv": round(t_write - t_sim, 3)}
    world._summary["wall_s"] = round(time.perf_counter() - t0, 3)
    logger.info("world: %d rows (%d random), %d requests, CTR %.3f, wall %.1f s -> %s", world._summary["rows"],
                world._summary["rows_random"], world._summary["requests"], world._summary["ctr"],
                world._summary["wall_s"], out_dir)
    return world
