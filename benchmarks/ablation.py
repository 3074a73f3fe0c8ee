"""The distillation ablation of the two-tower students, over seeds, on the default world or on ML-100K.

    python benchmarks/ablation.py                                   # the world, seeds of pipelines/ablation.toml
    python benchmarks/ablation.py --dataset movielens-100k --data-path path/to/ml-100k
    python benchmarks/ablation.py --runs-dir /tmp/abl --set ablation.seeds=[0] --set ranklog.max_requests=2000

Writes benchmarks/results/ablation_<dataset>.json (the report's ablation schema plus per-seed values, checks,
references and the config) and .md (tables); pass the JSON to a pipeline report as report.ablation.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

from cascade.pipeline.ablation import ablation_markdown, load_ablation_config, run_ablation, write_ablation

ROOT = Path(__file__).resolve().parents[1]
# ML-100K: a request is a user-day and the last day holds ~10 requests, so test on the last 4 weeks (~400
# requests, ~16k ratings) and validate on the 2 weeks before; all ~2,000 train requests fit the rank log. The
# train split is small (~80k ratings), so the teacher trains 4 epochs at batch 1024 (~300 steps instead of 20)
# and the students take batches of 64 requests (~30 steps an epoch instead of 8).
MOVIELENS = ["data.source=movielens-100k", "data.test_days=28", "data.valid_days=14", "ranklog.max_requests=20000",
             "teacher.train.epochs=4", "teacher.train.batch_size=1024",
             "data.cross_tag_column=genre", "data.cross_author_column=genre"] + [
    f"students.{s}.batch_size=64" for s in ("prerank", "retrieval")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipelines" / "ablation.toml"))
    p.add_argument("--dataset", choices=("world", "movielens-100k"), default="world")
    p.add_argument("--data-path", default=os.environ.get("CASCADE_ML100K"),
                   help="ML-100K folder (u.data, u.item, u.user); default $CASCADE_ML100K. A path relative to the "
                        "working directory keeps machine paths out of the results JSON")
    p.add_argument("--runs-dir", default=None, help="where the per-seed pipeline runs go (default: the config's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides = []
    if args.dataset == "movielens-100k":
        path = args.data_path
        if not path or not Path(path).is_dir():
            p.error(f"ML-100K folder {path!r} does not exist (give --data-path or set CASCADE_ML100K)")
        overrides += MOVIELENS + [f'data.path="{path}"']
    if args.runs_dir:
        overrides.append(f'run.runs_dir="{args.runs_dir}"')
    cfg, settings = load_ablation_config(args.config, overrides + args.overrides)

    def on_seed(seed, res):
        w = res["wall_s"]
        print(f"seed {seed}: pipeline {w['pipeline']:.0f}s, test set {w['test_set']:.0f}s, total {w['total']:.0f}s",
              flush=True)
        for stage, by_var in res["values"].items():
            for var, vals in by_var.items():
                print(f"  {stage:9s} {var:18s} " + "  ".join(f"{k} {v:.4f}" for k, v in vals.items()), flush=True)

    t0 = time.perf_counter()
    result = run_ablation(cfg, settings, args.dataset, progress=args.progress, on_seed=on_seed)
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    j, m = write_ablation(result, args.out, f"ablation_{args.dataset.replace('-', '_')}")
    print(ablation_markdown(result))
    print(f"wrote {j} and {m} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
