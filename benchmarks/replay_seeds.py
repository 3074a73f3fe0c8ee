"""The default pipeline over several seeds: the distilled cascade vs the ground-truth-only cascade, mean +- std.

    python benchmarks/replay_seeds.py --seeds 0 1 2 [--config pipelines/default.toml] [--set key=value ...]

Each seed is a full run (`default-seed<k>` under run.runs_dir); the replay summaries are aggregated into
benchmarks/results/replay_seeds.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cascade import artifacts as A
from cascade.pipeline import load_config, run_pipeline

METRICS = ("n_requests", "rank_teacher_recall", "prerank_teacher_recall", "retrieval_teacher_recall", "oracle_clicks",
           "oracle_ratio",
           "rank_ndcg", "rank_click_recall")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pipelines/default.toml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    per_seed, t0 = {}, time.perf_counter()
    for seed in args.seeds:
        cfg = load_config(args.config, args.overrides + [f"run.seed={seed}", f"run.name='default-seed{seed}'"])
        run_pipeline(cfg, progress=False)
        summary = A.read_json(Path(cfg.run.runs_dir) / cfg.run.name / "replay" / "summary.json")
        per_seed[seed] = {v: {m: s["quality"][m] for m in METRICS if m in s["quality"]}
                          for v, s in summary["variants"].items()}
        print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)
    variants = sorted(next(iter(per_seed.values())))
    agg = {v: {m: {"mean": float(np.mean([per_seed[s][v][m] for s in per_seed])),
                   "std": float(np.std([per_seed[s][v][m] for s in per_seed], ddof=1)) if len(per_seed) > 1 else None,
                   "n": len(per_seed)} for m in METRICS if m in per_seed[args.seeds[0]][v]} for v in variants}
    out = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "per_seed": per_seed,
           "mean_std": agg, "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    A.write_json(Path(args.out) / "replay_seeds.json", out)
    lines = ["| metric | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for m in (m for m in METRICS if m in agg[variants[0]]):  # oracle metrics exist only for the synthetic world
        fmt = ",.0f" if m == "n_requests" else ".4f"
        cells = [f"{agg[v][m]['mean']:{fmt}} ± {agg[v][m]['std']:{fmt}}" if agg[v][m]["std"] is not None
                 else f"{agg[v][m]['mean']:{fmt}}" for v in variants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    md = (f"Default pipeline, seeds {args.seeds} (each seed: its own world, teacher and students), replay of the "
          f"test-day requests (n_requests: how many were replayed; replay.max_requests caps them; overrides: "
          f"{[o for o in args.overrides if not o.startswith('run.runs_dir')] or 'none'}); mean ± std over seeds; "
          f"{time.strftime('%Y-%m-%d')}, "
          f"{(time.perf_counter() - t0) / 60:.0f} min.\n\n" + "\n".join(lines) + "\n")
    A.write_text(Path(args.out) / "replay_seeds.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
