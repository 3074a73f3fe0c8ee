"""The pipeline: data -> channels -> teacher -> ranklog -> students -> index -> replay -> report.

Each step is a function of a :class:`~cascade.pipeline.runner.StepContext` (one module per step in this
package) that writes into its own folder ``runs/<run>/<step>/`` and returns its outputs and headline metrics;
:func:`~cascade.pipeline.runner.run_steps` skips a step whose config slice and inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from .. import artifacts as A
from ..config import ConfigError, to_dict
from ..run_lock import folder_lock
from . import channels, data, index, ranklog, replay, report, students, teacher
from .checks import check_against_data
from .config import PipelineConfig
from .runner import Step, run_steps


def students_slice(c: PipelineConfig) -> dict:
    """The students step's config: its section, and the stage sizes its choices are judged at (the replay's)."""
    return {"students": c.students, "select_at": {"retrieval": c.replay.n_retrieve, "prerank": c.replay.n_prerank}}


STEPS = [
    Step("data", (), lambda c: c.data, data.run, external=lambda c: data.input_fingerprint(c.data),
         after=check_against_data),
    Step("channels", ("data",), lambda c: c.channels, channels.run),
    Step("teacher", ("data",), lambda c: c.teacher, teacher.run),
    Step("ranklog", ("data", "teacher"), lambda c: c.ranklog, ranklog.run),
    Step("students", ("data", "teacher", "ranklog"), lambda c: students_slice(c), students.run),
    Step("index", ("data", "students"), lambda c: c.index, index.run),
    Step("replay", ("data", "channels", "teacher", "students", "index"), lambda c: c.replay, replay.run),
    Step("report", ("data", "channels", "teacher", "ranklog", "students", "index", "replay"), lambda c: c.report,
         report.run),
]
STEP_NAMES = tuple(s.name for s in STEPS)


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
                 reuse: tuple[str, ...] = (), frozen: tuple[str, ...] = (), write_config: bool = True,
                 wait: bool = False) -> dict[str, dict]:
    """Run (or resume) the pipeline of ``cfg`` under ``cfg.run.runs_dir / cfg.run.name``.

    The run folder is locked for the call (:func:`cascade.run_lock.folder_lock`): another process on it raises
    RunLockedError naming its pid at once, or with ``wait`` waits for it. torch trains on ``cfg.run.threads``
    threads (recorded in every manifest this call writes), whatever the process's own setting.
    until: stop after this step (e.g. "ranklog" to get data, teacher and rank logs only). frozen: finished steps
    taken as they are, never redone (see run_steps). write_config: write the resolved config to
    ``config.json`` (`cascade replay` / `report` leave a finished run's config as it is)."""
    names = list(STEP_NAMES)
    if until is not None and until not in names:
        raise ConfigError(f"until={until!r}: no such step (steps: {', '.join(names)})")
    for f in force:
        if f not in names:
            raise ConfigError(f"--force {f!r}: no such step (steps: {', '.join(names)})")
    steps = STEPS if until is None else STEPS[: names.index(until) + 1]
    will_run = tuple(s.name for s in steps)
    steps = [dataclasses.replace(s, after=lambda c, d: check_against_data(c, d, will_run)) if s.name == "data" else s
             for s in steps]
    run_dir = A.safe_join(cfg.run.runs_dir, A.check_run_name(cfg.run.name))
    with folder_lock(run_dir, wait=wait):
        if write_config:
            A.write_json(run_dir / "config.json", to_dict(cfg))
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.run.threads)  # for the run only: the caller's process keeps its own setting
        try:
            return run_steps(steps, cfg, run_dir, cfg.run.seed, force=force, only=only, progress=progress,
                             to_plain=to_dict, on_step=on_step, code_hash=code_hash(), reuse=reuse, frozen=frozen,
                             record={"threads": cfg.run.threads})
        finally:
            torch.set_num_threads(threads)
