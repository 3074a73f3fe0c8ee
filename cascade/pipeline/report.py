"""The report step: report.json / report.md / report.html from the run's step manifests and artifacts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import artifacts as A
from ..eval.report import write_report
from .config import ReportSection
from .histories import training_histories
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
    run_dir = ctx.inputs["data"].parent
    data = build_report_data(run_dir, ctx.config)
    files = write_report(data, ctx.out)
    return StepResult(list(files), {}, "report.html, report.md, report.json written")


def build_report_data(run_dir: Path, report_cfg: ReportSection | None = None) -> dict:
    """Assemble the report's input from a run folder's step manifests and artifacts."""
    run_dir = Path(run_dir)
    steps = ("data", "teacher", "ranklog", "students", "index", "replay")
    m = {s: A.read_manifest(run_dir / s, verify=False) for s in steps if (run_dir / s / A.MANIFEST).exists()}
    machine = (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"cuda {'yes' if torch.cuda.is_available() else 'no'}")
    out: dict[str, Any] = {"run": {"name": run_dir.name, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "machine": machine,
                                   "config": {s: mm["config"] for s, mm in m.items()},
                                   "versions": next(iter(m.values()))["versions"] if m else {},
                                   "step_wall_s": {s: mm.get("wall_s") for s, mm in m.items()}}}
    if "data" in m:
        out["data"] = A.read_json(run_dir / "data" / "summary.json")
    models = []
    for s in ("teacher", "students"):
        p = run_dir / s / "models.json"
        if p.exists():
            models += A.read_json(p)
    out["models"] = models
    out["training"] = training_histories(run_dir) or None
    if "index" in m:
        first = next(iter(m["index"]["metrics"].values()), None)
        if first:
            im = A.read_json(next((run_dir / "index").glob("*/manifest.json")))
            out["index"] = {"factory": first["factory"], "backend": first["backend"], "metric": im.get("metric", "ip"),
                            "n_items": im.get("n_items"), "dim": im.get("embedding_dim"),
                            "recall_vs_exact": (first.get("recall") or {}).get("recall_at_k"),
                            "operating_points": first.get("operating_points", []),
                            "operating_point": _operating_point(first)}
    if "replay" in m:
        summ = A.read_json(run_dir / "replay" / "summary.json")
        casc = {}
        for v, s in summ.items():
            q = s["quality"]
            stages = {}
            for st in ("retrieval", "prerank", "rank"):
                lat = s["latency_batch1"][f"{st}_ms"]
                stages[st] = {"size": s["sizes"][st], "teacher_recall": q[f"{st}_teacher_recall"],
                              "click_recall": q[f"{st}_click_recall"], "ndcg": q[f"{st}_ndcg"],
                              "auc": s["stage_auc"][st]["auc"], "gauc": s["stage_auc"][st]["gauc"],
                              "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"]}
            e2e = s["latency_batch1"]["end_to_end_ms"]
            casc[v] = {"stages": stages,
                       "end_to_end": {**{k: e2e[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                                      "requests_per_s_batch1": s["latency_batch1"]["requests_per_s"],
                                      "requests_per_s_batched": s["latency_batched"]["requests_per_s"],
                                      "batch_size": s["latency_batched"]["batch_size"]},
                       "oracle": ({k: q[k] for k in ("oracle_clicks", "oracle_best",
                                                     "oracle_ratio")} if "oracle_ratio" in q else None),
                       "recall_curves": s["curves"], "latency_samples_ms": s.get("latency_samples_ms")}
        out["cascades"] = casc
    if report_cfg is not None and report_cfg.ablation:
        out["ablation"] = A.read_json(report_cfg.ablation)
    return out


def _operating_point(index_metrics: dict) -> dict | None:
    """The swept setting the index step chose ({param, value}), from the search parameters its recall was
    measured with; None for an exact index (nothing swept)."""
    points, recall = index_metrics.get("operating_points") or [], index_metrics.get("recall") or {}
    if not points:
        return None
    param = points[0]["param"]
    return {"param": param, "value": recall.get("nprobe" if param == "nprobe" else "ef_search")}
