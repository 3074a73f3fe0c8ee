"""The entire-space teacher's exposure weight on data without a random slice (ML-100K), offline on finished runs.

There the pipeline's judge is logged click-recall@10 of the teacher's own top-10 over the corpus on the validation
split (the one-SE rule, leaning to the product rule's weight 1). For every weight of a grid (and the exposure
model's own order, weight 10^4), this scores the teacher's corpus top-10 (seen items filtered as the run decided) on
the validation and the test requests with clicks, splits the test requests into cold (no event of the user before
the request) and warm, and sets the run's most-popular list beside it on the same test requests (the replay's
baseline rows). It answers: could a better-judged weight take the teacher's list past most-popular, and where does
the list lose? Writes benchmarks/results/<--name>.{json,md}.

    python benchmarks/exposure_weight_clicks.py runs/bench-movielens-100k-seed0 ... --name exposure_weight_ml
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cascade import artifacts as A
from cascade.machine import machine_record
from cascade.pipeline.judge import split_judge
from cascade.run_data import RunData, load_ranker
from cascade.serve.replay import teacher_top_over_corpus

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 1e4)  # 1e4: the exposure model's order (the click model breaks ties)


def cold_requests(data: RunData, user_id: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
    """bool [R]: the user has no logged event before the request's time."""
    imp = data.impressions
    first = imp.groupby("user_id").time_ms.min()
    return first.reindex(user_id).fillna(np.inf).to_numpy() >= time_ms


def mean_se(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), "se": float(np.std(x, ddof=1) / np.sqrt(len(x))), "n": int(len(x))}


def one_run(run: Path) -> dict:
    data = RunData(run / "data")
    model = load_ranker(run / "teacher" / "teacher", data.spec)
    chosen = A.read_json(run / "teacher" / "manifest.json")["metrics"]["entire_space"]["exposure_weight"]
    out = {"chosen": chosen}
    for split in ("valid", "test"):
        judge = split_judge(data, split, 1_000_000, 0)
        recall = {}
        for b in GRID:
            model.exposure_weight.fill_(b)
            top, _ = teacher_top_over_corpus(model, data, judge.requests, 10, exclude_seen=judge.seen)
            recall[b] = judge.recall(top, 10)
        out[split] = {str(b): mean_se(r) for b, r in recall.items()}
        if split == "test":
            cold = cold_requests(data, judge.requests.user_id, judge.requests.time_ms)
            rows = pd.read_parquet(run / "replay" / "baseline_popular_requests.parquet").set_index("request_id")
            ids = judge.requests.request_id
            if not np.isin(ids, rows.index).all():
                raise ValueError(f"{run}: the replay did not replay every test request with a click "
                                 "(replay.max_requests): no most-popular row to set beside them")
            pop = rows.loc[ids, "rank_click_recall"].to_numpy(np.float64)
            out["cold_requests"], out["warm_requests"] = int(cold.sum()), int((~cold).sum())
            out["popular"] = {"all": mean_se(pop), "cold": mean_se(pop[cold]), "warm": mean_se(pop[~cold])}
            out["by_history"] = {str(b): {"cold": mean_se(r[cold]), "warm": mean_se(r[~cold])}
                                 for b, r in recall.items()}
            out["minus_popular"] = {str(b): mean_se(r - pop) for b, r in recall.items()}
    model.exposure_weight.fill_(chosen)
    return out


def markdown(res: dict) -> str:
    weights = [str(b) for b in GRID]
    head = " | ".join("10^4" if b == 1e4 else f"{b:g}" for b in GRID)
    L = [f"The teacher's own top-10 over the corpus at each exposure weight (click-recall@10 on the requests with "
         f"clicks, seen items filtered as each run decided; 10^4: the exposure model's order); {res['date']}, "
         f"{res['machine']}.", ""]
    L += [f"| run | split | chosen | {head} | most-popular |", "| --- | --- | ---: |" + " ---: |" * (len(GRID) + 1)]
    for name, r in res["runs"].items():
        for split in ("valid", "test"):
            pop = f"{r['popular']['all']['mean']:.4f}" if split == "test" else "–"
            L.append(f"| {name} | {split} ({r[split][weights[0]]['n']}) | {r['chosen']:g} | "
                     + " | ".join(f"{r[split][w]['mean']:.4f}" for w in weights) + f" | {pop} |")
        for part in ("cold", "warm"):
            L.append(f"| {name} | test, {part} ({r[f'{part}_requests']}) | | "
                     + " | ".join(f"{r['by_history'][w][part]['mean']:.4f}" for w in weights)
                     + f" | {r['popular'][part]['mean']:.4f} |")
    L += ["", "Test, minus most-popular on the same requests (mean ± SE over requests):", ""]
    for name, r in res["runs"].items():
        L.append(f"- {name}: " + "; ".join(f"{'10^4' if float(w) == 1e4 else w} {r['minus_popular'][w]['mean']:+.4f} "
                                           f"± {r['minus_popular'][w]['se']:.4f}" for w in weights))
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished runs with an entire-space teacher and a replay")
    p.add_argument("--name", default="exposure_weight_clicks")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d"), "grid": list(GRID), "runs": {}, "machine": f"{os.cpu_count()} CPUs",
           "cpu": machine_record()}
    for run in args.runs:
        res["runs"][run.name] = one_run(run)
    res["wall_s"] = time.time() - t0
    A.write_json(args.out / f"{args.name}.json", res)
    A.write_text(args.out / f"{args.name}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
