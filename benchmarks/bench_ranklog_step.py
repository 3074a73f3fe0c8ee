"""Throughput of the pipeline's ranklog step on a finished run: the run's teacher scores the sampled candidate lists
through ``ranker_scorer`` (pair features built from the history, then the teacher's forward), ranks them and
writes the parquet log, as ``cascade.pipeline.ranklog.run`` does. Prints one JSON line and, with --out, writes it.

Side by side with an older version: run this file alternately with PYTHONPATH on each checkout (the same run
folder, the same machine) and compare medians. --workers: batches scored side by side, torch at one thread each
(default --threads, as the pipeline's step does). --profile adds each part's share of one more build on one worker
(cProfile sees one thread; cumulative time): candidate sampling is timed apart (it happens before the log is built).

Every result is also given against this machine's bound: the teacher's forward FLOPs per pair (counted by torch's
FlopCounterMode on the scoring path itself, so the request-level work that ``forward_lists`` does once per list is
counted once per list) and the GEMM rate of the dtype the scorer runs in, measured on the same threads before and
after the builds (the better of the two: on a shared 2-vCPU machine the rate of 2 threads varies); their ratio is
the pairs/s the GEMMs alone would allow.

    python benchmarks/bench_ranklog_step.py --run runs/default --threads 1 --reps 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import cascade
from cascade.data.requests import to_requests
from cascade.distill.ranklog import build_rank_log
from cascade.machine import format_bounds, machine_bounds
from cascade.models.scoring import ranker_scorer
from cascade.pipeline.config import RankLogSection
from cascade.pipeline.ranklog import rank_log_inputs, ranklog_channels
from cascade.run_data import RunData, load_ranker

#: (share name, functions "file:name" whose cumulative time it is; the first one found counts)
PARTS = (("pair features", ("run_data.py:pair_features",)),
         ("  cross-feature lookups", ("cross.py:query_requests", "cross.py:query")),
         ("teacher forward", ("scoring.py:score_pairs",)),
         ("ranking", ("ranklog.py:_ranks",)),
         ("parquet writing", ("ranklog.py:flush",)))


def shares(prof: cProfile.Profile, total_s: float) -> dict[str, float]:
    cum: dict[str, float] = {}
    for (f, _, name), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
        key = f"{Path(f).name}:{name}"
        cum[key] = cum.get(key, 0.0) + ct
    out = {}
    for part, keys in PARTS:
        got = [cum[k] for k in keys if k in cum]
        out[part] = got[0] / total_s if got else 0.0
    return out


def forward_flops_per_pair(score, requests, item_ids: np.ndarray, cands: np.ndarray, rows: int) -> float:
    """FLOPs per pair of ``score`` on the first ``rows`` candidate lists (PAD slots are scored too: per scored
    slot), counted by torch's FlopCounterMode (matrix products; elementwise work is not counted)."""
    c = np.where(cands[:rows] >= 0, cands[:rows], 0)
    score(requests.take(np.arange(rows)), item_ids[c])  # the first call of a pass size probes bf16: not counted
    with FlopCounterMode(display=False) as counter:
        score(requests.take(np.arange(rows)), item_ids[c])
    return counter.get_total_flops() / c.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder with finished data and teacher steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=None,
                   help="batches scored side by side (default: --threads, as the pipeline's ranklog step does)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    workers = a.threads if a.workers is None else a.workers
    run = Path(a.run)
    resolved = json.loads((run / "config.json").read_text())
    cfg = RankLogSection(**resolved["ranklog"])
    seed = resolved["run"]["seed"]
    data = RunData(run / "data")
    teacher = load_ranker(run / "teacher" / "teacher", data.spec)
    t0 = time.perf_counter()
    channels = ranklog_channels(cfg, run / "channels", data)  # the run's classic channels (none at share 0)
    frame, cands, item_ids, _ = rank_log_inputs(data, cfg, seed, channels)
    sampling_s = time.perf_counter() - t0
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    pairs = int(np.sum(cands >= 0))
    flops = forward_flops_per_pair(score, requests, item_ids, cands, min(len(frame), cfg.requests_per_batch))
    bounds = [machine_bounds(threads=a.threads, n=2048)]
    with tempfile.TemporaryDirectory() as tmp:
        def build(name: str, n: int | None = None, workers: int = workers) -> float:
            t = time.perf_counter()
            build_rank_log(frame.iloc[:n], cands[:n], scorer, Path(tmp) / name, workers=workers,
                           requests_per_batch=cfg.requests_per_batch, progress=False, item_ids=item_ids, seed=seed)
            return time.perf_counter() - t

        build("warm", 2 * cfg.requests_per_batch)
        # what the full passes of the log run in, at the threads each worker scores on (ranker_scorer's choices)
        threads = 1 if workers > 1 else a.threads
        dtype = max(kc for kc in score.autocast.items() if kc[0][2] == threads)[1].dtype
        walls = [build(f"log{i}") for i in range(a.reps)]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(cascade.__file__).parent).stdout.strip()
        out = {"benchmark": "bench_ranklog_step", "commit": commit,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": a.threads, "workers": workers,
               "n_requests": len(frame), "n_pairs": pairs, "sampling_s": sampling_s, "walls_s": walls,
               "pairs_per_s": [pairs / w for w in walls]}
        bounds.append(machine_bounds(threads=a.threads, n=2048))
        best = max(bounds, key=lambda b: b[f"{dtype}_gflops"])
        gemm = best[f"{dtype}_gflops"] * 1e9
        out["bound"] = {"scoring_dtype": dtype, "forward_flops_per_pair": flops, "machine": best,
                        "gemm_gflops_before_after": [b[f"{dtype}_gflops"] for b in bounds],
                        "gemm_bound_pairs_per_s": gemm / flops,
                        "share_of_bound": float(np.median(out["pairs_per_s"])) / (gemm / flops)}
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            wall = build("profiled", workers=1)  # cProfile sees the calling thread only
            prof.disable()
            out["profile"] = {"wall_s": wall, "shares": shares(prof, wall)}
            fwd_s = out["profile"]["shares"]["teacher forward"] * wall
            out["bound"]["forward_pairs_per_s"] = pairs / fwd_s
            out["bound"]["forward_share_of_bound"] = pairs / fwd_s / (gemm / flops)
    out["machine"] = {"cpu_count": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg()),
                      "platform": platform.platform(), "torch": torch.__version__}
    b = out["bound"]
    print(f"{format_bounds(b['machine'])}; the scorer runs in {dtype}: "
          f"{b['forward_flops_per_pair'] / 1e3:,.0f} kFLOP per pair -> {b['gemm_bound_pairs_per_s']:,.0f} "
          "pairs/s at the GEMM rate; measured "
          f"{np.median(out['pairs_per_s']):,.0f} pairs/s = {b['share_of_bound']:.0%} of it"
          + (f" (the forward alone {b['forward_pairs_per_s']:,.0f} pairs/s = {b['forward_share_of_bound']:.0%})"
             if "forward_pairs_per_s" in b else ""))
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
