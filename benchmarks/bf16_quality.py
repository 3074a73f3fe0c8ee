"""Does bfloat16 autocast train the same teacher? Test AUC of the pipeline's teacher trained in float32 and under
bf16 autocast, over seeds, on a finished run's encoded tables (the serving-speed issue's bar: AUC within 0.001).

Each seed trains the run's teacher architecture (its ``teacher/teacher/config.json``; a plain click ranker, no
entire-space head) for one epoch over the most recent ``--train-rows`` train rows, with ``TrainConfig.autocast``
"off" and "bf16" (same seed, same batches), and scores the whole test split in float32. Also records samples/s of
each (on a CPU without AMX bf16 is not expected to be faster: what is checked here is quality).

    python benchmarks/bf16_quality.py --run runs/default --seeds 0 1 2

Writes benchmarks/results/bf16_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from cascade import artifacts as A
from cascade.machine import machine_record, native_bf16
from cascade.models.ranker import Ranker, RankerConfig
from cascade.run_data import RunData
from cascade.train.loop import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
BAR = 0.001  # the bar: test AUC within 0.001 of float32


def teacher_config(run: Path) -> RankerConfig:
    """The run's teacher architecture (the click model of an entire-space teacher)."""
    raw = A.read_json(run / "teacher" / "teacher" / "config.json")
    raw = raw.get("ranker", raw)
    fields = {f.name for f in dataclasses.fields(RankerConfig)}
    return RankerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder with finished data and teacher steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-rows", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    data = RunData(run / "data")
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    train = train.take(slice(max(0, len(train) - a.train_rows), None))
    cfg = teacher_config(run)
    rows = []
    for seed in a.seeds:
        row = {"seed": seed}
        for mode in ("off", "bf16"):
            model = Ranker(train.spec, cfg, seed=seed)
            tcfg = TrainConfig(epochs=1, batch_size=a.batch_size, lr=2e-3, seed=seed, autocast=mode)
            t0 = time.perf_counter()
            res = fit(model, train, valid, tcfg, label=f"teacher {mode} seed {seed}")
            row[mode] = {"test_auc": evaluate(model, test)["auc"], "samples_per_s": res.throughput()["samples_per_s"],
                         "wall_s": time.perf_counter() - t0, "dtype": res.autocast["dtype"]}
        row["auc_gap"] = row["bf16"]["test_auc"] - row["off"]["test_auc"]
        rows.append(row)
        print(row, flush=True)
    gaps = np.array([r["auc_gap"] for r in rows])
    out = {"date": time.strftime("%Y-%m-%d"), "run": run.name, "train_rows": len(train), "threads": a.threads,
           "native_bf16": native_bf16()[0], "cpu": machine_record(),
           "machine": {"cpu_count": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg())}, "rows": rows,
           "max_abs_auc_gap": float(np.abs(gaps).max()), "mean_auc_gap": float(gaps.mean()), "bar": BAR}
    A.write_json(Path(a.out) / "bf16_quality.json", out)
    lines = [f"bf16 autocast vs float32 training, the run's teacher architecture, {len(train):,} train rows, one "
             f"epoch, {a.threads} threads; {out['date']}; native bf16: {out['native_bf16']}.", "",
             "| seed | test AUC float32 | test AUC bf16 | gap | samples/s float32 | samples/s bf16 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['seed']} | {r['off']['test_auc']:.4f} | {r['bf16']['test_auc']:.4f} | {r['auc_gap']:+.5f} | "
              f"{r['off']['samples_per_s']:,.0f} | {r['bf16']['samples_per_s']:,.0f} |" for r in rows]
    lines += ["", f"largest |gap| {out['max_abs_auc_gap']:.5f} (bar {BAR}): "
                  f"{'within' if out['max_abs_auc_gap'] <= BAR else 'NOT within'} the bar on every seed."]
    A.write_text(Path(a.out) / "bf16_quality.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
