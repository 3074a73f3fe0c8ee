"""Rank-stage table: teachers per backbone, LightGBM, the rank student without / with each distillation loss, PFD.

The data are a pipeline's data step (``run_pipeline(cfg, until="data")``: the default world of
pipelines/default.toml, or ML-100K), built once under ``--runs-dir`` and reused. For each seed this trains

- the teacher (user + item + context + cross sides) with each backbone: dnn, deepfm, dcnv2 (the pipeline's
  teacher sizes; DCN-V2 with low-rank cross weights, cross_rank=32, for speed);
- LightGBM on the same encoded columns (cross side included; not the privileged side): binary objective, and
  lambdarank grouped by request (ranking scores: AUC / GAUC only);
- the rank student (the pipeline's ``students.rank_student``: a small MLP over user + item + context, WITHOUT
  the cross side, so it needs no user x item history lookups at serving) on clicks only;
- the same student distilled teacher-first from that seed's DCN-V2 teacher with KD (logit MSE), hint, CR, RCR and
  CR + RCR (weights from the pipeline's ``students.rank_distill``: CR 0.4, RCR 0.5);
- PFD (Xu et al. KDD 2020): student and teacher trained synchronously, sharing embeddings, the student with a
  private user-id table; the teacher reads the student's sides plus the privileged side (post-click fields),
  and, as a second variant, plus the cross side ("cross as privileged": the paper's pre-rank setting); on the
  privileged side also PFD+MD (a larger privileged teacher) and LUPI (a teacher on the privileged side alone);
- the student distilled from LightGBM (binary) as the alternative teacher (KD on its log-odds), and the joint
  mode (Rocket Launching / double-DNN: the pipeline's teacher and the student share embeddings, one loop, KD).

It reports test AUC / GAUC / logloss (mean +- std over seeds; the data are fixed, the seeds move model
initialisation and batch order), serving latency per 100 candidates (median of one forward pass on 1 thread)
and model size, plus the issue's checks, and writes benchmarks/results/rank_table_<dataset>.{json,md}.

    python benchmarks/rank_table.py --runs-dir /tmp/rank_runs                       # the default world
    python benchmarks/rank_table.py --dataset movielens-100k --runs-dir /tmp/rank_runs
    python benchmarks/rank_table.py --data-dir runs/default/data --max-train-rows 400000

``--max-train-rows`` keeps the most recent train requests up to that many rows (valid and test stay whole).
Seeds can run as separate processes (``--seeds 1 --out some/dir``) and be joined afterwards:

    python benchmarks/rank_table.py --merge s0/rank_table_world.json s1/rank_table_world.json s2/rank_table_world.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cascade import artifacts as A
from cascade.data.batches import EncodedTable, FeatureSpec
from cascade.models.gbdt import GBDTRanker
from cascade.models.ranker import Ranker, n_parameters, serving_latency
from cascade.pipeline import PipelineConfig, load_config, run_pipeline
from cascade.train.joint import (
    DistillConfig,
    DistilledStudent,
    JointRanker,
    joint_loss,
    pfd_configs,
    teacher_first_loss,
)
from cascade.train.loop import TrainConfig, evaluate, fit, score_metrics

ROOT = Path(__file__).resolve().parents[1]
# ML-100K as in benchmarks/ablation.py: a request is a user-day and the last day holds ~10 requests, so test on
# the last 4 weeks and validate on the 2 weeks before.
# (the dataset itself goes in as --data does, which also leaves out the config's ablation of the world)
MOVIELENS = ["data.test_days=28", "data.valid_days=14",
             'data.cross_tag_column="genre"', 'data.cross_author_column="genre"']  # movies have no tag / author
BACKBONES = ("dnn", "deepfm", "dcnv2")
DISTILL_TEACHER = "dcnv2"  # the pipeline's teacher backbone


def distill_variants(d: DistillConfig) -> dict[str, DistillConfig]:
    """The teacher-first rows of the table, each one loss on top of click BCE (weights from the pipeline config)."""
    return {
        "student + KD (logit MSE)": DistillConfig(w_kd=d.w_kd or 1.0),
        "student + hint": DistillConfig(w_hint=d.w_hint or 1.0),
        "student + CR": DistillConfig(w_cr=d.w_cr or 0.4),
        "student + RCR": DistillConfig(w_rcr=d.w_rcr or 0.5),
        "student + CR + RCR": DistillConfig(w_cr=d.w_cr or 0.4, w_rcr=d.w_rcr or 0.5),
    }


def load_tables(data_dir: Path) -> dict[str, EncodedTable]:
    """The encoded train / valid / test tables of a data step folder (what RunData.encoded reads)."""
    spec = FeatureSpec.from_dict(A.read_json(data_dir / "spec.json"))
    return {s: EncodedTable.from_arrays(spec, A.read_npz(data_dir / f"encoded_{s}.npz"))
            for s in ("train", "valid", "test")}


def most_recent_requests(table: EncodedTable, max_rows: int) -> EncodedTable:
    """The rows of the latest requests (by first impression time) whose sizes add up to at most ``max_rows``."""
    if len(table) <= max_rows:
        return table
    start = pd.Series(table.time_ms).groupby(table.request_id).min().sort_values(ascending=False)
    sizes = pd.Series(table.request_id).value_counts().reindex(start.index).to_numpy()
    keep = start.index.to_numpy()[np.cumsum(sizes) <= max_rows]
    return table.take(np.flatnonzero(np.isin(table.request_id, keep)))


def size_mb(model: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)


def gbdt_latency(model: GBDTRanker, table: EncodedTable, n: int = 100, repeats: int = 50) -> float:
    """Median ms of one LightGBM predict call on ``n`` rows (the booster's own threads)."""
    cat, num = table.cat[:n], table.num[:n]
    times = []
    for _ in range(repeats + 5):
        t0 = time.perf_counter()
        model.predict(cat, num)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[5:]) * 1e3)


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """name -> metric -> {"mean", "std" (ddof=1; 0 for one run), "n"} over the runs that have the metric."""
    out = {}
    for name, runs in rows.items():
        s = {}
        for k in runs[0]:
            v = np.array([r[k] for r in runs if r.get(k) is not None], dtype=np.float64)
            if len(v):
                s[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
        out[name] = s
    return out


def checks(summary: dict) -> list[dict]:
    """The issue's three claims, each as AUC difference of means with the pooled std of the two rows."""

    def diff(a: str, b: str) -> dict:
        if a not in summary or b not in summary:
            return {"a": a, "b": b, "available": False}
        sa, sb = summary[a]["auc"], summary[b]["auc"]
        d = sa["mean"] - sb["mean"]
        sd = float(np.sqrt((sa["std"] ** 2 + sb["std"] ** 2) / 2))
        return {"a": a, "b": b, "available": True, "auc_diff": d, "pooled_std": sd,
                "holds": bool(d > 0 and d > 2 * sd)}

    out = []
    teachers = [f"teacher {b}" for b in BACKBONES if f"teacher {b}" in summary]
    best_teacher = max(teachers, key=lambda n: summary[n]["auc"]["mean"]) if teachers else "teacher"
    out.append({"claim": "the teacher with cross features beats the student without distillation",
                **diff(best_teacher, "student (clicks only)")})
    for pfd in ("student PFD (privileged side)", "student PFD (cross as privileged)"):
        out.append({"claim": f"{pfd} beats the student without it", **diff(pfd, "student (clicks only)")})
    for kd in ("student + KD (logit MSE)", "student + CR", "student + RCR"):
        out.append({"claim": f"{kd} beats plain BCE", **diff(kd, "student (clicks only)")})
    return out


def markdown(summary: dict, checks_: list[dict], meta: dict) -> str:
    def fmt(s, k, nd=4):
        return f"{s[k]['mean']:.{nd}f} ± {s[k]['std']:.{nd}f}" if k in s else "–"

    lines = [f"# Rank stage on {meta['dataset']}", "",
             f"Test AUC / GAUC (by user) / logloss, mean ± std over seeds {meta['seeds']} (fixed data; the seed moves "
             f"initialisation and batch order). Train rows: {meta['rows']['train']:,}"
             + (f" (the most recent requests of {meta['rows']['train_full']:,})"
                if meta['rows']['train'] < meta['rows']['train_full'] else "")
             + f"; valid {meta['rows']['valid']:,}; test {meta['rows']['test']:,}. "
             f"Latency: median ms of one forward pass over 100 candidates on 1 thread (LightGBM: one predict call); "
             + (f"load average of the {os.cpu_count()}-core machine {meta['load_average']['start']:.1f} at the start, "
                f"{meta['load_average']['end']:.1f} at the end." if "load_average" in meta
                else "read latencies as relative (the load of the machine was not recorded)."), "",
             "| model | AUC | GAUC | logloss | rand AUC | ms / 100 cand. | params | MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        params = f"{s['params']['mean']:,.0f}" if "params" in s else "–"
        mb = f"{s['size_mb']['mean']:.2f}" if "size_mb" in s else "–"
        lines.append(f"| {name} | {fmt(s, 'auc')} | {fmt(s, 'gauc')} | {fmt(s, 'logloss')} | "
                     f"{fmt(s, 'rand_auc')} | {fmt(s, 'latency_ms_per_100', 3)} | {params} | {mb} |")
    lines += ["", "Checks (AUC difference of means; holds = positive and > 2 pooled std):", "",
              "| claim | AUC diff | pooled std | holds |", "|---|---|---|---|"]
    for c in checks_:
        if c["available"]:
            lines.append(f"| {c['claim']} ({c['a']} vs {c['b']}) | {c['auc_diff']:+.4f} | {c['pooled_std']:.4f} | "
                         f"{'yes' if c['holds'] else 'no'} |")
        else:
            lines.append(f"| {c['claim']} | – | – | not run on this data |")
    lines += ["", "Settings: " + "; ".join(f"{k} = {v}" for k, v in meta["settings"].items()), ""]
    return "\n".join(lines)


def write_results(out: Path, rows: dict[str, list[dict]], meta: dict, extra: dict, wall_s: float) -> None:
    """Summarise ``rows`` (name -> one dict per seed), print the Markdown table and write
    ``out/rank_table_<dataset>.{json,md}``."""
    summary = summarise(rows)
    checks_ = checks(summary)
    md = markdown(summary, checks_, meta)
    print(md)
    stem = f"rank_table_{meta['dataset'].replace('-', '_')}"
    A.write_text(out / f"{stem}.md", md)
    A.write_json(out / f"{stem}.json", {
        **meta, **extra, "machine": platform.platform(), "versions": A.package_versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary, "checks": checks_,
        "row_order": list(rows), "runs": rows, "markdown": md, "wall_s": wall_s,  # the JSON writer sorts keys
    })


def merge(paths: list[str], out: Path) -> None:
    """Join per-seed result files of the same dataset and settings into one table (runs in the given order)."""
    docs = [A.read_json(p) for p in paths]
    first = docs[0]
    for p, d in zip(paths, docs):
        for k in ("dataset", "settings", "rows"):
            if d[k] != first[k]:
                raise ValueError(f"merge: {p} has a different {k!r} ({d[k]!r}) than {paths[0]} ({first[k]!r})")
    seeds = [s for d in docs for s in d["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge: seeds repeat across the files: {seeds}")
    rows: dict[str, list[dict]] = {name: [] for name in first["row_order"]}
    for d in docs:
        for name, runs in d["runs"].items():
            rows.setdefault(name, []).extend(runs)
    meta = {"dataset": first["dataset"], "seeds": seeds, "settings": first["settings"], "rows": first["rows"]}
    if all("load_average" in d for d in docs):
        meta["load_average"] = {"start": docs[0]["load_average"]["start"], "end": docs[-1]["load_average"]["end"]}
    extra = {k: first[k] for k in ("data_config", "has_privileged_side")}
    write_results(out, rows, meta, extra, wall_s=float(sum(d["wall_s"] for d in docs)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipelines" / "default.toml"))
    p.add_argument("--dataset", choices=("world", "movielens-100k"), default="world")
    p.add_argument("--data-path", default=os.environ.get("CASCADE_ML100K"),
                   help="ML-100K folder; default $CASCADE_ML100K")
    p.add_argument("--runs-dir", default="runs",
                   help="where the data step is built / reused (run name rank_<dataset>)")
    p.add_argument("--data-dir", default=None, help="reuse this existing data step folder instead of building one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-train-rows", type=int, default=None, help="keep the most recent train requests")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 (world), 4 (movielens-100k)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 2048 (world), 1024 (movielens-100k)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pfd-lambda", type=float, default=0.5)
    p.add_argument("--pfd-warmup", type=int, default=20, help="PFD warm-up optimizer steps (lambda = 0 before)")
    p.add_argument("--pfd-kd", choices=("hinton", "mse"), default="hinton",
                   help="PFD's distillation term L_d: 'hinton' = cross-entropy against the teacher's probability "
                        "(T = 1, the paper's), 'mse' = MSE on logits")
    p.add_argument("--lightgbm-trees", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="row names (prefixes) to leave out, e.g. 'teacher deepfm'")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="join per-seed result files and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        merge(args.merge, Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    movielens = args.dataset == "movielens-100k"
    epochs = args.epochs or (4 if movielens else 2)
    batch_size = args.batch_size or (1024 if movielens else 2048)

    overrides = [f'run.runs_dir="{args.runs_dir}"', f'run.name="rank_{args.dataset.replace("-", "_")}"']
    data_spec = None
    if movielens:
        if not args.data_path:
            p.error("--dataset movielens-100k needs --data-path (or CASCADE_ML100K)")
        overrides += MOVIELENS
        data_spec = f"movielens-100k:{args.data_path}"
    cfg: PipelineConfig = load_config(args.config, overrides + args.overrides, data_spec=data_spec)
    t0 = time.perf_counter()
    if args.data_dir is None:
        run_pipeline(cfg, until="data", progress=False)
        data_dir = Path(cfg.run.runs_dir) / cfg.run.name / "data"
    else:
        data_dir = Path(args.data_dir)
    tabs = load_tables(data_dir)
    train_full, valid, test = tabs["train"], tabs["valid"], tabs["test"]
    train = most_recent_requests(train_full, args.max_train_rows) if args.max_train_rows else train_full
    spec = train.spec
    has_privileged = bool(spec.cat_index("privileged") or spec.num_index("privileged"))
    print(f"data ({args.dataset}): train {len(train):,} of {len(train_full):,}, valid {len(valid):,}, test "
          f"{len(test):,} rows ({time.perf_counter() - t0:.1f} s)", flush=True)

    teacher_model = cfg.teacher.model
    student_cfg = cfg.students.rank_student
    if "cross" in student_cfg.sides:
        raise ValueError("rank_table: students.rank_student must not read the cross side (it is the teacher's)")
    rows: dict[str, list[dict]] = {}

    def skipped(name: str) -> bool:
        return any(name.startswith(s) for s in args.skip)

    def record(name: str, metrics: dict, model: torch.nn.Module | None = None, latency_ms: float | None = None,
               wall: float = 0.0, **extra) -> None:
        row = {**metrics, "latency_ms_per_100": latency_ms, "params": None, "size_mb": None, "train_s": wall, **extra}
        if model is not None:
            row.update(latency_ms_per_100=serving_latency(model, spec), params=n_parameters(model),
                       size_mb=size_mb(model))
        rows.setdefault(name, []).append(row)
        print(f"  {name:36s} auc {metrics['auc']:.4f} gauc {metrics['gauc']:.4f} "
              f"logloss {metrics.get('logloss', float('nan')):.4f} ({wall:.0f} s)", flush=True)

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        tc = TrainConfig(lr=args.lr, batch_size=batch_size, epochs=epochs, patience=1, seed=seed,
                         num_threads=args.threads)
        teachers = {}
        for backbone in BACKBONES:
            name = f"teacher {backbone}"
            if skipped(name) and backbone != DISTILL_TEACHER:
                continue
            t = time.perf_counter()
            m = Ranker(spec, dataclasses.replace(teacher_model, backbone=backbone), seed=seed)
            fit(m, train, valid, tc)
            record(name, evaluate(m, test), m, wall=time.perf_counter() - t)
            teachers[backbone] = m
        gbdt = None
        if not skipped("LightGBM (binary)"):
            t = time.perf_counter()
            gbdt = GBDTRanker(objective="binary", n_estimators=args.lightgbm_trees, num_threads=args.threads,
                              seed=seed).fit(train, valid)
            m = score_metrics(test.label, gbdt.predict(test.cat, test.num), test.user_id, test.is_rand)
            record("LightGBM (binary)", m, latency_ms=gbdt_latency(gbdt, test), wall=time.perf_counter() - t,
                   n_trees=float(gbdt.best_iteration_))
        if not skipped("LightGBM (lambdarank)"):
            t = time.perf_counter()
            g = GBDTRanker(objective="lambdarank", n_estimators=args.lightgbm_trees, num_threads=args.threads,
                           seed=seed).fit(train, valid)
            # ranking scores, not log-odds: AUC and GAUC only
            m = score_metrics(test.label, g.predict(test.cat, test.num), test.user_id, test.is_rand,
                              probabilities=False)
            record("LightGBM (lambdarank)", m, latency_ms=gbdt_latency(g, test), wall=time.perf_counter() - t,
                   n_trees=float(g.best_iteration_))
        t = time.perf_counter()
        m = Ranker(spec, student_cfg, seed=seed)
        fit(m, train, valid, tc)
        record("student (clicks only)", evaluate(m, test), m, wall=time.perf_counter() - t)
        teacher = teachers[DISTILL_TEACHER]
        for name, dcfg in distill_variants(cfg.students.rank_distill).items():
            if skipped(name):
                continue
            t = time.perf_counter()
            m = DistilledStudent(Ranker(spec, student_cfg, seed=seed),
                                 teacher.hidden_dim if dcfg.w_hint else None, seed=seed)
            fit(m, train, valid, tc, loss_fn=teacher_first_loss(teacher, dcfg))
            record(name, evaluate(m, test), m.student, wall=time.perf_counter() - t)
        if gbdt is not None and not skipped("student + KD (LightGBM teacher)"):
            # LightGBM as the alternative teacher: its log-odds on the train rows are the KD targets
            t = time.perf_counter()
            train.extra["teacher_logit"] = gbdt.predict(train.cat, train.num).astype(np.float32)
            try:
                m = DistilledStudent(Ranker(spec, student_cfg, seed=seed))
                fit(m, train, valid, tc, loss_fn=teacher_first_loss(None, DistillConfig(w_kd=1.0)))
            finally:
                del train.extra["teacher_logit"]
            record("student + KD (LightGBM teacher)", evaluate(m, test), m.student, wall=time.perf_counter() - t)
        if not skipped("student joint KD"):
            # joint on the fly (Rocket Launching / double-DNN): the pipeline's teacher and the student share the
            # embeddings and train in one loop; the KD term reaches only the student
            t = time.perf_counter()
            j = JointRanker(spec, teacher_model, student_cfg, seed=seed)
            fit(j, train, valid, tc, loss_fn=joint_loss(DistillConfig(w_kd=1.0)))
            record("student joint KD (Rocket Launching)", evaluate(j, test), j.student, wall=time.perf_counter() - t)
            record("  its joint teacher", evaluate(j.teacher, test), j.teacher)
        pfd = DistillConfig(pfd_lambda=args.pfd_lambda, warmup_steps=args.pfd_warmup, kd=args.pfd_kd)
        # PFD with the post-click side and with the cross side as privileged (the paper's pre-rank setting), then the
        # paper's contrasts on the privileged side: a larger privileged teacher (PFD+MD), a teacher on it alone (LUPI)
        for variant, label, side, where in (("pfd", "PFD", "privileged", "privileged side"),
                                            ("pfd", "PFD", "cross", "cross as privileged"),
                                            ("pfd+md", "PFD+MD", "privileged", "privileged side"),
                                            ("lupi", "LUPI", "privileged", "privileged side")):
            name = f"student {label} ({where})"
            if (side == "privileged" and not has_privileged) or skipped(name):
                continue  # ML-100K has no post-click field: the privileged-side rows cannot exist there
            t = time.perf_counter()
            j = JointRanker(spec, *pfd_configs(student_cfg, variant, pfd_side=side),
                            private_student_columns=("user_id",), seed=seed)
            fit(j, train, valid, tc, loss_fn=joint_loss(pfd))
            record(name, evaluate(j, test), j.student, wall=time.perf_counter() - t)
            record(f"  its {label} teacher ({where})", evaluate(j.teacher, test), j.teacher)

    settings = {"teacher": teacher_model.to_dict(), "student": student_cfg.to_dict(), "epochs": epochs,
                "batch_size": batch_size, "lr": args.lr, "patience": 1, "early stopping": "valid AUC per epoch",
                "distillation teacher": DISTILL_TEACHER, "pfd_lambda": args.pfd_lambda,
                "pfd_warmup_steps": args.pfd_warmup, "pfd_kd": args.pfd_kd, "pfd student private columns": ["user_id"],
                "lightgbm_trees": args.lightgbm_trees, "threads": args.threads}
    meta = {"dataset": args.dataset, "seeds": args.seeds, "settings": settings,
            "load_average": {"start": load_start, "end": os.getloadavg()[0]},
            "rows": {"train": len(train), "train_full": len(train_full), "valid": len(valid), "test": len(test)}}
    # the data folder as given (a relative --data-path keeps this machine's paths out of the results)
    data_config = {**dataclasses.asdict(cfg.data), **({"path": args.data_path} if movielens else {})}
    extra = {"data_config": data_config, "has_privileged_side": has_privileged}
    write_results(Path(args.out), rows, meta, extra, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
