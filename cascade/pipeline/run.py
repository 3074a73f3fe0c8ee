"""The pipeline: data -> channels -> teacher -> ranklog -> students -> index -> replay -> report.

Each step is a function of a :class:`~cascade.pipeline.runner.StepContext` (one module per step in this
package) that writes into its own folder ``runs/<run>/<step>/`` and returns its outputs and headline metrics;
:func:`~cascade.pipeline.runner.run_steps` skips a step whose config slice and inputs are unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import artifacts as A
from ..config import to_dict
from . import channels, data, index, ranklog, replay, report, students, teacher
from .config import PipelineConfig
from .runner import Step, run_steps


def students_slice(c: PipelineConfig) -> dict:
    """The students step's config: its section, and the stage sizes its choices are judged at (the replay's)."""
    return {"students": c.students, "select_at": {"retrieval": c.replay.n_retrieve, "prerank": c.replay.n_prerank}}


STEPS = [
    Step("data", (), lambda c: c.data, data.run),
    Step("channels", ("data",), lambda c: c.channels, channels.run),
    Step("teacher", ("data",), lambda c: c.teacher, teacher.run),
    Step("ranklog", ("data", "teacher"), lambda c: c.ranklog, ranklog.run),
    Step("students", ("data", "teacher", "ranklog"), lambda c: students_slice(c), students.run),
    Step("index", ("data", "students"), lambda c: c.index, index.run),
    Step("replay", ("data", "channels", "teacher", "students", "index"), lambda c: c.replay, replay.run),
    Step("report", ("data", "channels", "teacher", "ranklog", "students", "index", "replay"), lambda c: c.report,
         report.run),
]


def code_hash() -> str:
    """sha256 over the package's source files: a step written by different code is not reused."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the cascade package
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                 progress: bool = True, on_step=None, until: str | None = None,
                 reuse: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run (or resume) the pipeline of ``cfg`` under ``cfg.run.runs_dir / cfg.run.name``.

    until: stop after this step (e.g. "ranklog" to get data, teacher and rank logs only)."""
    names = [s.name for s in STEPS]
    if until is not None and until not in names:
        raise ValueError(f"until={until!r}: no such step (steps: {names})")
    steps = STEPS if until is None else STEPS[: names.index(until) + 1]
    run_dir = A.safe_join(cfg.run.runs_dir, A.check_run_name(cfg.run.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    A.write_json(run_dir / "config.json", to_dict(cfg))
    threads = torch.get_num_threads()
    if cfg.run.threads:  # for the run only: the caller's process keeps its own setting
        torch.set_num_threads(cfg.run.threads)
    try:
        return run_steps(steps, cfg, run_dir, cfg.run.seed, force=force, only=only, progress=progress,
                         to_plain=to_dict, on_step=on_step, code_hash=code_hash(), reuse=reuse)
    finally:
        torch.set_num_threads(threads)
