"""Data at scale: chunked world generation -> streaming split / encoder fit / encoding -> teacher training from
memory-mapped tables. Records wall time, rows/s, peak RSS of each phase (sampled every 0.2 s) and bytes on disk.

Each ``--impressions`` value is one run (phases in order, in one process; a phase's peak RSS is the largest RSS
sampled during it). Results go to ``benchmarks/results/bench_stream.json`` (the Markdown next to it is
written by hand from it).

    nice python benchmarks/bench_stream.py --items 200000 --users 20000 --impressions 1000000 4000000
    # with cross features over a 2-day window (encoder fit and encoding stream them; a "cross" phase records the
    # events the window buffer held; --cross-in-memory adds the whole-table CrossFeatureStore for comparison):
    nice python benchmarks/bench_stream.py --items 200000 --users 20000 --impressions 1000000 4000000 \\
        --cross-window-days 2 --cross-in-memory --out benchmarks/results/bench_stream_cross.json
    # the target (see bench_stream.md for the time and disk estimate):
    nice python benchmarks/bench_stream.py --items 10000000 --users 200000 --impressions 100000000 \\
        --chunk-hours 6 --cat-dtype int32 --workdir <a folder with ~60 GB free>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cascade.data import stream as S
from cascade.data.features import CrossFeatureStore
from cascade.data.world import WorldConfig, generate_world_stream
from cascade.models.ranker import Ranker, RankerConfig
from cascade.train.loop import TrainConfig, fit

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    """Anonymous resident memory (RssAnon): the process's own heap. Pages of memory-mapped files that the page
    cache holds count in the total RSS but not here (the kernel can drop them at any time)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class _Sampler:
    """Peak RSS of a phase, sampled by a thread every ``every`` s."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self) -> _Sampler:
        self.peak = _rss_bytes()
        self.t0 = time.perf_counter()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, _rss_bytes())
        self.seconds = time.perf_counter() - self.t0


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(n_items: int, n_users: int, n_impressions: int, n_days: int, chunk_hours: int, train_steps: int,
            batch_size: int, cat_dtype: str, workdir: Path, seed: int, cross_window_days: float | None = None,
            cross_in_memory: bool = False) -> dict:
    # requests per user such that the expected impressions are about n_impressions (6 per request; the
    # one-request-per-(user, hour, tab, is_rand) rule removes a few)
    mpu = n_impressions / (6 * n_users)
    cfg = WorldConfig(seed=seed, n_items=n_items, n_users=n_users, n_days=n_days, mean_requests_per_user=mpu)
    out = workdir / f"world_{n_impressions}"
    enc_dir = workdir / f"encoded_{n_impressions}"
    res: dict = {"n_items": n_items, "n_users": n_users, "target_impressions": n_impressions, "n_days": n_days,
                 "chunk_hours": chunk_hours, "cat_dtype": cat_dtype, "cross_window_days": cross_window_days}
    with _Sampler() as s:
        w = generate_world_stream(out, cfg, chunk_hours=chunk_hours)
    rows = w.summary["rows"]
    res["generate"] = {"rows": rows, "s": round(s.seconds, 2), "rows_per_s": round(rows / s.seconds),
                       "peak_rss_anon_gb": round(s.peak / 1e9, 3), "seconds": w.seconds, "chunks": w.n_chunks,
                       "max_rows_per_chunk": max(w.rows_per_chunk), "disk_gb": round(_du(out) / 1e9, 3),
                       "impressions_disk_gb": round(_du(out / "impressions") / 1e9, 3)}
    print("generate", res["generate"], flush=True)
    with _Sampler() as s:
        sd = S.open_stream_dataset(out)
        sp = S.stream_time_split(sd, utc_offset_hours=8.0)
    res["split"] = {"s": round(s.seconds, 2), "rows_per_s": round(rows / s.seconds), "rows": sp.rows,
                    "peak_rss_anon_gb": round(s.peak / 1e9, 3)}
    if cross_window_days is not None:
        # every row's cross features, streamed (then dropped): what the window buffer holds at most
        with _Sampler() as s:
            rss0 = _rss_bytes()
            wc = S.WindowedCrossFeatures(sd, cross_window_days)
            for df in S.scan(sd, ["user_id", "item_id"]):
                wc.query_frame(df)
        res["cross_stream"] = {"s": round(s.seconds, 2), "rows_per_s": round(rows / s.seconds),
                               "max_events_buffered": wc.max_events_, "events_total": rows,
                               "max_buffered_fraction": round(wc.max_events_ / rows, 4), "chunk_fits": wc.n_fits_,
                               "rss_anon_start_gb": round(rss0 / 1e9, 3), "peak_rss_anon_gb": round(s.peak / 1e9, 3)}
        del wc
        print("cross_stream", res["cross_stream"], flush=True)
    with _Sampler() as s:
        enc = S.fit_encoder_stream(sd, sp, min_count=2, cross_window_days=cross_window_days)
    res["fit_encoder"] = {"s": round(s.seconds, 2), "rows_per_s": round(sp.rows["train"] / s.seconds),
                          "peak_rss_anon_gb": round(s.peak / 1e9, 3)}
    print("split", res["split"], "fit", res["fit_encoder"], flush=True)
    with _Sampler() as s:
        tables = S.encode_stream(sd, sp, enc, enc_dir, parts=("train", "valid"), privileged=False,
                                 cat_dtype=cat_dtype, cross_window_days=cross_window_days)
    n_enc = sum(len(t) for t in tables.values())
    res["encode"] = {"rows": n_enc, "s": round(s.seconds, 2), "rows_per_s": round(n_enc / s.seconds),
                     "peak_rss_anon_gb": round(s.peak / 1e9, 3), "disk_gb": round(_du(enc_dir) / 1e9, 3)}
    print("encode", res["encode"], flush=True)
    # training: a bounded number of steps on the memory-mapped train table (random batches: np.take gathers
    # from the mapped files), validation on a 200k-row slice of the valid table
    torch.manual_seed(seed)
    train = tables["train"]
    n_train = min(len(train), train_steps * batch_size)
    # the first n_train rows as a view: still memory-mapped, fit permutes them and gathers each batch from disk
    train_sub = train.take(slice(0, n_train))
    assert isinstance(train_sub.cat, np.memmap)
    valid = tables["valid"].take(slice(0, min(len(tables["valid"]), 200_000)))
    model = Ranker(train.spec, RankerConfig(mlp=(256, 128), emb_dim=16, sides=("user", "item", "context")), seed=0)
    cfg = TrainConfig(batch_size=batch_size, epochs=1, seed=seed, num_threads=2, optimizer="adamw")
    with _Sampler() as s:
        r = fit(model, train_sub, valid, cfg)
    res["train"] = {"steps": int(np.ceil(n_train / batch_size)), "samples": n_train, "s": round(s.seconds, 2),
                    "samples_per_s": round(n_train / s.seconds), "peak_rss_anon_gb": round(s.peak / 1e9, 3),
                    "valid_auc": round(r.best_valid_auc, 4), "memmapped_train_rows": len(train)}
    print("train", res["train"], flush=True)
    if cross_window_days is not None and cross_in_memory:
        # the whole-table store the streaming path replaces (last: its heap would inflate later phases' peaks)
        del tables, train, train_sub, valid
        with _Sampler() as s:
            rss0 = _rss_bytes()
            cols = ["request_id", "user_id", "item_id", "time_ms", "click"]
            imp = sd.impressions.to_table(columns=cols).to_pandas()
            store = CrossFeatureStore(cross_window_days).fit(imp, sd.items)
            store.query_impressions(imp)
        res["cross_in_memory"] = {"s": round(s.seconds, 2), "rows_per_s": round(rows / s.seconds),
                                  "rss_anon_start_gb": round(rss0 / 1e9, 3), "peak_rss_anon_gb": round(s.peak / 1e9, 3)}
        del store, imp
        print("cross_in_memory", res["cross_in_memory"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--impressions", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--days", type=int, default=21)
    ap.add_argument("--chunk-hours", type=int, default=None,
                    help="hour steps per part file (default: about --chunk-rows rows per chunk)")
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--cat-dtype", default="int64", choices=("int64", "int32"))
    ap.add_argument("--workdir", type=Path, default=None, help="where the data goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cross-window-days", type=float, default=None,
                    help="stream cross features over this window (default: none)")
    ap.add_argument("--cross-in-memory", action="store_true",
                    help="also fit the whole-table CrossFeatureStore, for comparison (small runs only)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_stream.json")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_stream_"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for n in args.impressions:
            ch = args.chunk_hours or int(np.clip(round(args.chunk_rows * args.days * 24 / n), 1, 24))
            runs.append(run_one(args.items, args.users, n, args.days, ch, args.train_steps,
                                args.batch_size, args.cat_dtype, work, args.seed, args.cross_window_days,
                                args.cross_in_memory))
            if not args.keep:
                for p in work.glob(f"*_{n}"):
                    shutil.rmtree(p)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                       "loadavg": os.getloadavg()},
           "args": {k: (str(v) if isinstance(v, Path) else v) for k,
                    v in vars(args).items() if k not in ("workdir", "out")},
           "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
