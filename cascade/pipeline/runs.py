"""Finished runs read side by side: the list of runs under a runs folder (``cascade runs``) and the comparison of
two or more runs (``cascade compare``): their config differences and their headline metrics.

A run is a folder holding ``config.json`` (written by :func:`cascade.pipeline.run_pipeline`); its metrics come
from its step outputs (``replay/summary.json`` and the measured latencies in ``replay/manifest.json``,
``teacher/models.json``, ``students/models.json``), so a run without a report step still shows what it has.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from .. import artifacts as A
from ..config import ConfigError, config_diff, config_get
from ..eval.report.blocks import format_value, markdown_table
from ..eval.report.compare import write_comparison
from .config import NOT_COMPARED
from .run import STEPS

CONFIG = "config.json"


class RunNotFound(ConfigError):
    """A run name or folder the user gave that holds no run."""


class RunLayoutError(ConfigError):
    """A run whose outputs are in a layout this code does not read (written by an older version)."""


def find_run(name_or_path: str | os.PathLike, runs_dir: str | os.PathLike = "runs") -> Path:
    """The run folder of ``name_or_path``: a folder holding config.json, or a run name under ``runs_dir``."""
    p = Path(name_or_path)
    if (p / CONFIG).is_file():
        return p
    try:
        under = Path(runs_dir) / A.check_run_name(str(name_or_path))
    except ValueError:  # not a run name (a path that holds no run): said below
        under = None
    if under is not None and (under / CONFIG).is_file():
        return under
    known = ", ".join(r.name for r in run_folders(runs_dir)) or "none"
    raise RunNotFound(f"no run {str(name_or_path)!r}: neither it nor {Path(runs_dir) / str(name_or_path)} holds a "
                      f"{CONFIG} (runs in {runs_dir}: {known})")


def run_folders(runs_dir: str | os.PathLike) -> list[Path]:
    """The run folders directly under ``runs_dir``, by name."""
    d = Path(runs_dir)
    return sorted((p for p in d.iterdir() if (p / CONFIG).is_file()), key=lambda p: p.name) if d.is_dir() else []


def run_facts(run_dir: Path) -> dict[str, Any]:
    """name, folder, created (when its first step finished, else when its config was written), data source, and
    the steps that finished."""
    cfg = A.read_json(run_dir / CONFIG)
    manifests = {s: A.read_json(p) for s in _STEPS if (p := run_dir / s / A.MANIFEST).is_file()}
    stamps = sorted(m.get("written_at", "") for m in manifests.values() if m.get("written_at"))
    created = stamps[0].replace("T", " ").rstrip("Z") + " UTC" if stamps else time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime((run_dir / CONFIG).stat().st_mtime))
    data = cfg.get("data") or {}
    source = str(data.get("source"))
    if data.get("path"):
        source += f" ({Path(str(data['path'])).name})"
    return {"name": run_dir.name, "path": str(run_dir), "created": created, "data": source,
            "steps": [s for s in _STEPS if s in manifests]}


_STEPS = tuple(s.name for s in STEPS)


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's headline metrics, [{metric (label), key (for formatting), value}], in a fixed order: per cascade
    variant the final list's teacher-recall@K and click-recall, the oracle ratio (world), every stage's
    teacher-recall and click-recall and the end-to-end p99; then each model's test AUC, on a row named by the model
    (:func:`model_identity`, so runs that chose other settings share it) with a row of its settings after it.
    Missing outputs give no rows."""
    out: list[dict[str, Any]] = []
    summary_path = run_dir / "replay" / "summary.json"
    if summary_path.is_file():
        summary = A.read_json(summary_path)
        if "variants" not in summary:
            raise RunLayoutError(f"{summary_path}: a replay summary in an older layout (no 'variants'); redo the "
                                 f"replay with this version: cascade replay {run_dir}")
        manifest_path = run_dir / "replay" / A.MANIFEST
        # measured latencies: the manifest's metrics.latency (summary.json holds what models and data determine);
        # runs written before that kept them in summary.json
        latency = ((A.read_json(manifest_path).get("metrics") or {}).get("latency") or {}
                   if manifest_path.is_file() else {})
        for variant, s in summary["variants"].items():
            q, k = s.get("quality", {}), s.get("sizes", {}).get("rank")
            out += [{"metric": f"{variant}: final teacher-recall@{k}", "key": "teacher_recall",
                     "value": q.get("rank_teacher_recall")},
                    {"metric": f"{variant}: final click-recall", "key": "click_recall",
                     "value": q.get("rank_click_recall")}]
            if "oracle_ratio" in q:
                out.append({"metric": f"{variant}: oracle ratio", "key": "oracle_ratio", "value": q["oracle_ratio"]})
            for stage in ("retrieval", "prerank"):
                n = s.get("sizes", {}).get(stage)
                out += [{"metric": f"{variant}: {stage} teacher-recall (N={n})", "key": "teacher_recall",
                         "value": q.get(f"{stage}_teacher_recall")},
                        {"metric": f"{variant}: {stage} click-recall (N={n})", "key": "click_recall",
                         "value": q.get(f"{stage}_click_recall")}]
            batch1 = (latency.get(variant) or {}).get("latency_batch1") or s.get("latency_batch1") or {}
            e2e = batch1.get("end_to_end_ms") or {}
            out.append({"metric": f"{variant}: end-to-end p99 ms (batch 1)", "key": "p99_ms",
                        "value": e2e.get("p99_ms")})
    seen: set[str] = set()
    for step in ("teacher", "students"):
        p = run_dir / step / "models.json"
        for m in A.read_json(p) if p.is_file() else []:
            name = str(m.get("name"))
            model = model_identity(m)
            model = name if model in seen else model  # two rows of one role: each keeps its full name
            seen.add(model)
            out.append({"metric": f"test AUC: {model}", "key": "auc", "value": m.get("auc")})
            if name != model:  # what this run chose (on validation) or set (in its config), beside the AUC
                detail = name.partition(" (")[2]
                out.append({"metric": f"{model}: settings", "key": "",
                            "value": detail[:-1] if detail.endswith(")") else name})
    return out


#: models.json roles whose rows are one model each, named by the role (their display names add run settings)
ROLE_MODELS = {"teacher": "teacher", "pfd_teacher": "PFD teacher (not served)"}


def model_identity(row: dict[str, Any]) -> str:
    """The name of a models.json row's model that is the same in every run: its role (the teacher, the LightGBM
    baseline, the rank student as served or without distillation), without the values the run chose on validation
    or set in its config, which its display name carries (``teacher (dcnv2, entire space: exposure weight 4,
    ...)`` -> ``teacher``; ``rank student (served: logit KD at scale 1, ...)`` -> ``rank student (served)``)."""
    name, role = str(row.get("name")), row.get("role")
    base, _, detail = name.partition(" (")
    if role in ROLE_MODELS:
        return ROLE_MODELS[role]
    if role == "baseline":
        return base
    if role == "student" and detail:
        return f"{base} ({re.split(r'[:,)]', detail, maxsplit=1)[0]})"
    return name


def list_runs(runs_dir: str | os.PathLike = "runs") -> list[dict[str, Any]]:
    """Every run under ``runs_dir`` with its facts (:func:`run_facts`) and headline metrics: the teacher's test AUC
    and the distilled cascade's final teacher-recall@K, click-recall and oracle ratio (None where not computed);
    "problem" says why a run's metrics cannot be read (an older layout), else None."""
    rows = []
    for d in run_folders(runs_dir):
        facts = run_facts(d)
        try:
            metrics, problem = {m["metric"]: m["value"] for m in run_metrics(d)}, None
        except RunLayoutError as e:  # listed all the same, its metrics as "–" and the reason beside
            metrics, problem = {}, str(e)
        teacher = metrics.get("test AUC: teacher")
        recall = next(((k, v) for k, v in metrics.items() if k.startswith("distilled: final teacher-recall@")),
                      (None, None))
        rows.append({**facts, "teacher_auc": teacher, "teacher_recall": recall[1],
                     "k": recall[0].rsplit("@", 1)[1] if recall[0] else None,
                     "click_recall": metrics.get("distilled: final click-recall"),
                     "oracle_ratio": metrics.get("distilled: oracle ratio"), "problem": problem})
    return rows


def runs_markdown(rows: list[dict[str, Any]]) -> str:
    """The list of runs as a Markdown table (what ``cascade runs`` prints)."""
    header = ["run", "created", "data", "steps", "teacher AUC", "teacher-recall@K", "click-recall", "oracle ratio"]
    cells = [[r["name"], r["created"], r["data"], f"{len(r['steps'])}/{len(_STEPS)}",
              format_value(r["teacher_auc"], "auc"),
              format_value(r["teacher_recall"], "teacher_recall") + (f" (K={r['k']})" if r["k"] else ""),
              format_value(r["click_recall"], "click_recall"), format_value(r["oracle_ratio"], "oracle_ratio")]
             for r in rows]
    notes = [f"{r['name']}: {r['problem']}" for r in rows if r.get("problem")]
    return markdown_table(header, cells, [False] * 4 + [True] * 4) + "".join(f"\n\n{n}" for n in notes)


def compare_runs(run_dirs: list[Path]) -> dict[str, Any]:
    """The comparison of ``run_dirs`` (:mod:`cascade.eval.report.compare`'s input): their facts, the config keys
    whose values differ (against the first run, every run's value listed) and their metrics side by side."""
    if len(run_dirs) < 2:
        raise ConfigError(f"compare needs two runs or more, got {len(run_dirs)}")
    configs = [A.read_json(d / CONFIG) for d in run_dirs]
    keys: dict[str, None] = {}
    for c in configs[1:]:
        keys.update(dict.fromkeys(k for k, _, _ in config_diff(configs[0], c)
                                  if k not in NOT_COMPARED and k.split(".")[0] not in NOT_COMPARED))
    diff = [{"key": k, "values": [config_get(c, k) for c in configs]} for k in sorted(keys)]
    per_run = [{m["metric"]: m for m in run_metrics(d)} for d in run_dirs]
    order = list(dict.fromkeys(name for metrics in per_run for name in metrics))
    metrics = [{"metric": name, "key": next(m[name]["key"] for m in per_run if name in m),
                "values": [m[name]["value"] if name in m else None for m in per_run]} for name in order]
    return {"runs": [run_facts(d) for d in run_dirs], "config_diff": diff, "metrics": metrics}


def write_compare(run_dirs: list[Path], out_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Path]]:
    """:func:`compare_runs`, written as compare.json / compare.md / compare.html into ``out_dir``."""
    comparison = compare_runs(run_dirs)
    return comparison, write_comparison(comparison, out_dir)
