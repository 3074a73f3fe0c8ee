"""The training curves of a run: every model's train loss and validation metric per evaluation, read from the
histories its steps wrote (the report's training-curves section and the TensorBoard / MLflow loggers read them
from here).

Where they are: ``teacher/history.json`` (:func:`cascade.train.loop.fit`: one row per evaluation, ``train_total``
and ``valid_auc``), ``students/rank_student/history.json`` and ``history_no_distillation.json`` (the same, for
the served and the plain rank student) and ``students/<variant>/<stage>/history.json``
(:func:`cascade.train.students.train_student`: one row per epoch, ``loss`` and ``valid`` = teacher-recall@10 on
a fixed sample of the rank log).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import artifacts as A

#: (file under the run folder, model label) of the rankers' fit histories
RANKER_HISTORIES = (("teacher/history.json", "teacher"),
                    ("students/rank_student/history_no_distillation.json", "rank student (no distillation)"),
                    ("students/rank_student/history.json", "rank student (served)"))


def _fit_curve(rows: list[dict]) -> dict[str, Any]:
    return {"epoch": [int(r["epoch"]) + 1 for r in rows], "step": [int(r["step"]) for r in rows],
            "loss": [r.get("train_total") for r in rows], "valid": [r.get("valid_auc") for r in rows],
            "valid_metric": "valid AUC"}


def _student_curve(rows: list[dict]) -> dict[str, Any]:
    valid = [r.get("valid") or {} for r in rows]
    metric = next((k for v in valid for k in v if k.startswith("teacher_recall@")), None)
    return {"epoch": [int(r["epoch"]) + 1 for r in rows], "step": None, "loss": [r.get("loss") for r in rows],
            "valid": [v.get(metric) for v in valid] if metric else [None] * len(rows),
            "valid_metric": f"{metric.replace('_', '-')} on a rank-log sample" if metric else None}


def training_histories(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """model label -> {"epoch": [int, 1-based], "step": [int] | None, "loss": [float] (the weighted total train
    loss), "valid": [float | None], "valid_metric": str | None}, for every history the run has (teacher first,
    then the rank students, then the two-tower students by variant and stage)."""
    run_dir = Path(run_dir)
    out: dict[str, dict[str, Any]] = {}
    for rel, label in RANKER_HISTORIES:
        if (run_dir / rel).is_file():
            out[label] = _fit_curve(A.read_json(run_dir / rel))
    students = run_dir / "students"
    for variant in sorted(p for p in students.iterdir() if p.is_dir()) if students.is_dir() else ():
        for stage in ("prerank", "retrieval"):
            path = variant / stage / "history.json"
            if path.is_file():
                out[f"{stage} student ({variant.name})"] = _student_curve(A.read_json(path))
    return out
