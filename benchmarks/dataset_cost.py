"""Per-row cost of the teacher's training and of the rank log on each dataset, with the sequence features on.

Runs each dataset's pipeline up to the rank-log step (``--set teacher.sequence_length=N``) and reads what the steps
measured: the teacher's training samples/s (rows trained on over the time of the training steps, validation left
out: ``teacher`` manifest, ``train_throughput``) and the rank log's pairs/s (``ranklog`` manifest). A dataset whose
users have long histories (MovieLens) must stay within 2x of the world's per-row cost.

    python benchmarks/dataset_cost.py --dataset world --dataset movielens-100k:path/to/ml-100k --runs-dir /tmp/cost

Writes benchmarks/results/dataset_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from real_data import _config, _data_args

from cascade import artifacts as A
from cascade.machine import machine_record
from cascade.pipeline import load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def measure(dataset: str, runs_dir: str, sequence_length: int, seed: int) -> dict:
    """One dataset's run up to the rank log; its teacher samples/s, rank-log pairs/s and sizes."""
    config, spec, name = _config(dataset)
    sets, data_spec = _data_args(config, spec)
    config = str(ROOT / config)  # the dataset's pipeline file, wherever the benchmark is started from
    cfg = load_config(config, [*sets, f"run.seed={seed}", f"run.name='cost-{name}'", f"run.runs_dir='{runs_dir}'",
                               f"teacher.sequence_length={sequence_length}"], data_spec=data_spec)
    t0 = time.perf_counter()
    run_pipeline(cfg, progress=False, until="ranklog", update=True)
    run = Path(runs_dir) / cfg.run.name
    teacher, ranklog = A.read_manifest(run / "teacher"), A.read_manifest(run / "ranklog")
    th = teacher["metrics"]["train_throughput"]
    return {"dataset": name, "wall_s": time.perf_counter() - t0, "teacher_samples": th["samples"],
            "teacher_train_s": th["seconds"], "teacher_samples_per_s": th["samples_per_s"],
            "teacher_step_s": teacher["wall_s"], "ranklog_pairs": ranklog["metrics"]["n_pairs"],
            "ranklog_pairs_per_s": ranklog["metrics"]["pairs_per_s"], "ranklog_step_s": ranklog["wall_s"],
            "load_avg_1": os.getloadavg()[0]}


def markdown(rows: list[dict], out: dict) -> str:
    world = next((r for r in rows if r["dataset"] == "world"), None)
    lines = [f"Per-row cost with teacher.sequence_length = {out['sequence_length']}; {out['date']}, {out['machine']}.",
             "", "| dataset | teacher samples/s | rank log pairs/s | teacher step s | rank-log step s | "
                 "per-row cost vs the world (teacher, rank log) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        vs = (f"{world['teacher_samples_per_s'] / r['teacher_samples_per_s']:.2f}x, "
              f"{world['ranklog_pairs_per_s'] / r['ranklog_pairs_per_s']:.2f}x" if world else "–")
        lines.append(f"| {r['dataset']} | {r['teacher_samples_per_s']:,.0f} | {r['ranklog_pairs_per_s']:,.0f} | "
                     f"{r['teacher_step_s']:.0f} | {r['ranklog_step_s']:.0f} | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", action="append", required=True, help="world, movielens-100k:DIR, ...")
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--sequence-length", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    rows = [measure(d, a.runs_dir, a.sequence_length, a.seed) for d in a.dataset]
    out = {"sequence_length": a.sequence_length, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "machine_record": machine_record(),
           "rows": rows}
    A.write_json(Path(a.out) / "dataset_cost.json", out)
    md = markdown(rows, out)
    A.write_text(Path(a.out) / "dataset_cost.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
