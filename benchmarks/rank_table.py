"""Rank-stage table: teachers per backbone, LightGBM, the rank student without / with each distillation loss, PFD.

Builds a synthetic world (cascade.data.world), splits it by time, encodes it once, then for each seed trains:
teacher (dnn, deepfm, dcnv2), LightGBM (binary, lambdarank), student (dnn, one hidden layer) on clicks only,
student distilled two-stage from that seed's DCNv2 teacher with KD (logit MSE), hint, CR, RCR, CR+RCR, and the
student trained jointly with a privileged teacher (PFD, private user-id table). Reports test AUC / GAUC /
logloss (mean +- std over seeds), serving latency per 100 candidates (1 thread) and parameter count.

    python benchmarks/rank_table.py --seeds 0 1 2 --n-users 3000 --n-items 2000 --n-days 14

Writes benchmarks/results/rank_table.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cascade.artifacts import package_versions, write_json
from cascade.data.features import CrossFeatureStore, FeatureEncoder, build_encoded
from cascade.data.kuairand import load_kuairand
from cascade.data.split import time_split
from cascade.data.world import WorldConfig, generate_world
from cascade.models.gbdt import GBDTRanker
from cascade.models.ranker import Ranker, RankerConfig, n_parameters, serving_latency
from cascade.train.joint import DistillConfig, DistilledStudent, JointRanker, joint_loss, pfd_configs, two_stage_loss
from cascade.train.loop import TrainConfig, evaluate, fit, score_metrics

TEACHER = dict(emb_dim=16, mlp=(256, 128))
STUDENT = RankerConfig(backbone="dnn", emb_dim=8, mlp=(64,))
DISTILL = {
    "student + KD (logit MSE)": DistillConfig(w_kd=1.0),
    "student + hint": DistillConfig(w_hint=1.0),
    "student + CR": DistillConfig(w_cr=0.4),
    "student + RCR": DistillConfig(w_rcr=0.5),
    "student + CR + RCR": DistillConfig(w_cr=0.4, w_rcr=0.5),
}


def build_tables(args):
    with tempfile.TemporaryDirectory() as d:
        generate_world(d, WorldConfig(seed=args.world_seed, n_users=args.n_users, n_items=args.n_items,
                                      n_days=args.n_days))
        ds = load_kuairand(d)
    masks = time_split(ds, valid_days=1, test_days=2)
    store = CrossFeatureStore().fit(ds.impressions, ds.items)
    enc = FeatureEncoder(ds.schema).fit(ds, masks["train"], store)
    return build_encoded(ds, masks, enc, store)


def gbdt_latency(model: GBDTRanker, table, n: int = 100, repeats: int = 50) -> float:
    cat, num = table.cat[:n], table.num[:n]
    times = []
    for _ in range(repeats + 5):
        t0 = time.perf_counter()
        model.predict(cat, num)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[5:]) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=3000)
    p.add_argument("--n-items", type=int, default=2000)
    p.add_argument("--n-days", type=int, default=14)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "rank_table.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tabs = build_tables(args)
    train, valid, test = tabs["train"], tabs["valid"], tabs["test"]
    spec = train.spec
    print(f"data: train {len(train)} valid {len(valid)} test {len(test)} rows, "
          f"{len(spec.cat_names)} cat / {len(spec.num_names)} num columns ({time.perf_counter() - t0:.1f} s)")

    rows: dict[str, list[dict]] = {}

    def record(name: str, metrics: dict, model=None, latency_ms=None, params=None, wall=None) -> None:
        if model is not None:
            latency_ms, params = serving_latency(model, spec), n_parameters(model)
        rows.setdefault(name, []).append({**metrics, "latency_ms_per_100": latency_ms, "params": params,
                                          "train_s": wall})
        print(f"  {name:28s} auc {metrics['auc']:.4f} gauc {metrics['gauc']:.4f} "
              f"logloss {metrics.get('logloss', float('nan')):.4f} ({wall:.1f} s)", flush=True)

    for seed in args.seeds:
        print(f"seed {seed}")
        tc = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=1, seed=seed,
                         num_threads=args.threads)
        teachers = {}
        for backbone in ("dnn", "deepfm", "dcnv2"):
            t = time.perf_counter()
            m = Ranker(spec, RankerConfig(backbone=backbone, **TEACHER), seed=seed)
            fit(m, train, valid, tc)
            record(f"teacher {backbone}", evaluate(m, test), m, wall=time.perf_counter() - t)
            teachers[backbone] = m
        for objective in ("binary", "lambdarank"):
            t = time.perf_counter()
            g = GBDTRanker(objective=objective, n_estimators=300, learning_rate=0.05, num_leaves=31,
                           num_threads=args.threads, seed=seed).fit(train, valid)
            s = g.predict(test.cat, test.num)
            metrics = score_metrics(test.label, s, test.user_id, test.is_rand, probabilities=objective == "binary")
            metrics["n_trees"] = float(g.best_iteration_)
            record(f"LightGBM {objective}", metrics, latency_ms=gbdt_latency(g, test), wall=time.perf_counter() - t)
        t = time.perf_counter()
        m = Ranker(spec, STUDENT, seed=seed)
        fit(m, train, valid, tc)
        record("student (clicks only)", evaluate(m, test), m, wall=time.perf_counter() - t)
        teacher = teachers["dcnv2"]
        for name, dcfg in DISTILL.items():
            t = time.perf_counter()
            m = DistilledStudent(Ranker(spec, STUDENT, seed=seed), teacher.hidden_dim if dcfg.w_hint else None,
                                 seed=seed)
            fit(m, train, valid, tc, loss_fn=two_stage_loss(teacher, dcfg))
            record(name, evaluate(m, test), m.student, wall=time.perf_counter() - t)
        t = time.perf_counter()
        j = JointRanker(spec, *pfd_configs(STUDENT, "pfd"), private_student_columns=("user_id",), seed=seed)
        fit(j, train, valid, tc, loss_fn=joint_loss(DistillConfig(pfd_lambda=0.5, warmup_steps=50)))
        record("student PFD (joint)", evaluate(j, test), j.student, wall=time.perf_counter() - t)
        record("  its privileged teacher", evaluate(j.teacher, test), j.teacher, wall=0.0)

    summary = {}
    for name, runs in rows.items():
        s = {}
        for k in runs[0]:
            v = np.array([r[k] for r in runs if r.get(k) is not None], dtype=np.float64)
            if len(v):
                s[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        summary[name] = s
    lines = ["| model | AUC | GAUC | logloss | rand AUC | ms / 100 cand. | params |", "|---|---|---|---|---|---|---|"]

    def fmt(s, k, nd=4):
        return f"{s[k]['mean']:.{nd}f} ± {s[k]['std']:.{nd}f}" if k in s else "–"

    for name, s in summary.items():
        params = f"{s['params']['mean']:,.0f}" if "params" in s else "–"
        lines.append(f"| {name.strip()} | {fmt(s, 'auc')} | {fmt(s, 'gauc')} | {fmt(s, 'logloss')} | "
                     f"{fmt(s, 'rand_auc')} | {fmt(s, 'latency_ms_per_100', 3)} | {params} |")
    table = "\n".join(lines)
    print(table)
    write_json(args.out, {
        "args": {k: v for k, v in vars(args).items() if k != "out"},  # no machine paths in results "machine": platform.platform(), "processor": platform.processor(),
        "versions": package_versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": {"train": len(train), "valid": len(valid), "test": len(test)},
        "summary": summary, "runs": rows, "markdown": table, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
