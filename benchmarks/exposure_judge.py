"""Which judge should choose the entire-space teacher's exposure weight? Offline, on finished world runs.

For every exposure weight b of the teacher's grid, the ranking score log sigmoid(click) + b * exposure is judged
two ways: (1) its AUC on the randomly shown impressions of the validation and test splits (free of the logging
policy's bias), (2) the teacher's own top-10 over the whole corpus for an even spread of test requests with clicks:
logged click-recall@10 and the oracle ratio (expected clicks under the world's true click model over the oracle's
own top-10). Writes benchmarks/results/exposure_judge.{json,md}.

    python benchmarks/exposure_judge.py runs/bench-world-seed0 runs/bench-world-seed1 --requests 150
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cascade import artifacts as A
from cascade.arrays import PAD, pad_by_row
from cascade.data.requests import impression_requests, requests_frame, to_requests
from cascade.data.world.model import World
from cascade.eval.metrics import click_recall
from cascade.machine import machine_record
from cascade.models.scoring import score_pairs
from cascade.run_data import RunData, load_ranker

GRID = (0.0, 0.25, 0.5, 1.0)


def heads(model, data: RunData, requests, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log sigmoid(click logit), exposure logit) of the entire-space teacher for items [B, L]: float32 [B*L]."""
    cat, num = data.pair_features(requests, items)
    lc = F.logsigmoid(torch.from_numpy(score_pairs(model.click, cat, num, list_len=items.shape[1]))).numpy()
    return lc, score_pairs(model.exposure, cat, num, list_len=items.shape[1])


def random_slice_auc(model, data: RunData, split: str) -> dict:
    imp = data.split_impressions(split)
    r = imp[imp.is_rand == 1]
    lc, le = heads(model, data, impression_requests(r, data.context_names), r["item_id"].to_numpy(np.int64)[:, None])
    y = r["click"].to_numpy()
    return {"rows": len(y), "clicks": int(y.sum()), "auc": {b: float(roc_auc_score(y, lc + b * le)) for b in GRID}}


def corpus_lists(model, data: RunData, run: Path, n_requests: int) -> dict:
    test = data.split_impressions("test")
    frame = requests_frame(test, data.context_names)
    has_click = test.groupby("request_id").click.max()
    frame = frame[frame.request_id.isin(has_click.index[has_click == 1])].reset_index(drop=True)
    frame = frame.iloc[np.unique(np.linspace(0, len(frame) - 1, n_requests).round().astype(int))]
    frame = frame.reset_index(drop=True)
    requests = to_requests(frame, data.context_names)
    clicks = test[(test.click == 1) & test.request_id.isin(frame.request_id)]
    row = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy()).loc[clicks.request_id.to_numpy()]
    clicked = pad_by_row(row.to_numpy(), clicks.item_id.to_numpy(np.int64), len(frame), fill=PAD)
    world = World.load(run / "data" / "world")
    users, hour, tab = frame.user_id.to_numpy(), frame.hour.to_numpy(), frame.tab.to_numpy()
    best = world.oracle_topk(users, hour, tab, 10)[1].sum(axis=1)
    tops = {b: np.empty((len(frame), 10), np.int64) for b in GRID}
    for i in range(len(frame)):  # one request x the whole corpus per pass
        lc, le = heads(model, data, requests.take(np.array([i])), data.item_ids[None, :])
        for b in GRID:
            tops[b][i] = data.item_ids[np.argsort(-(lc + b * le), kind="stable")[:10]]
    out = {}
    for b, t in tops.items():
        p = world.true_click_prob(np.repeat(users, 10), t.ravel(), np.repeat(hour, 10), np.repeat(tab, 10))
        out[b] = {"click_recall@10": float(np.nanmean(click_recall(clicked, t))),
                  "oracle_ratio": float(np.mean(p.reshape(t.shape).sum(axis=1) / best))}
    return out


def markdown(res: dict) -> str:
    L = [f"Exposure weight of the entire-space teacher judged two ways; {res['date']}, {res['requests']} test "
         "requests per run for the corpus lists. Chosen by the pipeline (validation click-recall@10 on logged "
         "traffic): " + ", ".join(f"{n} {r['chosen_on_logged_clicks']}" for n, r in res["runs"].items()) + ".", "",
         "| run | weight | valid random-slice AUC | test random-slice AUC | test corpus click-recall@10 (logged) "
         "| test corpus oracle ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["runs"].items():
        for b in GRID:
            c = r["corpus"][b]
            L.append(f"| {name} | {b} | {r['valid']['auc'][b]:.4f} | {r['test']['auc'][b]:.4f} | "
                     f"{c['click_recall@10']:.4f} | {c['oracle_ratio']:.4f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished world runs with an entire-space teacher")
    p.add_argument("--requests", type=int, default=150)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    res = {"date": time.strftime("%Y-%m-%d"), "requests": args.requests, "grid": list(GRID), "runs": {},
           "machine": f"{os.cpu_count()} CPUs", "cpu": machine_record()}
    for run in args.runs:
        data = RunData(run / "data")
        model = load_ranker(run / "teacher" / "teacher", data.spec)
        chosen = A.read_json(run / "teacher" / "manifest.json")["metrics"]["entire_space"]["exposure_weight"]
        res["runs"][run.name] = {"chosen_on_logged_clicks": chosen, "valid": random_slice_auc(model, data, "valid"),
                                 "test": random_slice_auc(model, data, "test"),
                                 "corpus": corpus_lists(model, data, run, args.requests)}
    A.write_json(args.out / "exposure_judge.json", res)
    A.write_text(args.out / "exposure_judge.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
