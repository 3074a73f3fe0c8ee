"""The pipeline: data -> channels -> teacher -> ranklog -> students -> index -> replay -> report.

Each step is a function of a :class:`~cascade.pipeline.runner.StepContext` (one module per step in this
package) that writes into its own folder ``runs/<run>/<step>/`` and returns its outputs and headline metrics;
:func:`~cascade.pipeline.runner.run_steps` skips a step whose config slice and inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from .. import artifacts as A
from ..config import ABSENT, ConfigError, config_diff, config_get, format_diff, to_dict
from ..run_lock import folder_lock
from . import channels, data, index, ranklog, replay, report, students, teacher
from .checks import check_against_data
from .config import NOT_COMPARED, PipelineConfig, data_step_config, with_run_device
from .runner import Step, run_steps
from .tracking import Trackers

log = logging.getLogger(__name__)


def students_slice(c: PipelineConfig) -> dict:
    """The students step's config: its section, and the stage sizes its choices are judged at (the replay's)."""
    return {"students": c.students, "select_at": {"retrieval": c.replay.n_retrieve, "prerank": c.replay.n_prerank}}


STEPS = [
    Step("data", (), data_step_config, data.run, external=lambda c: data.input_fingerprint(c.data),
         after=check_against_data),
    Step("channels", ("data",), lambda c: c.channels, channels.run),
    Step("teacher", ("data",), lambda c: c.teacher, teacher.run),
    Step("ranklog", ("data", "channels", "teacher"), lambda c: c.ranklog, ranklog.run),
    Step("students", ("data", "channels", "teacher", "ranklog"), lambda c: students_slice(c), students.run),
    Step("index", ("data", "students"), lambda c: c.index, index.run),
    Step("replay", ("data", "channels", "teacher", "students", "index"), lambda c: c.replay, replay.run),
    Step("report", ("data", "channels", "teacher", "ranklog", "students", "index", "replay"), lambda c: c.report,
         report.run),
]
STEP_NAMES = tuple(s.name for s in STEPS)


class RunConfigMismatch(ConfigError):
    """``cascade run`` on an existing run whose config.json differs from the resolved config (the keys named)."""


def run_config_diff(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """Where a run's saved config.json and a resolved config differ: [(key, saved, new)]. Left out: where the run
    lives (:data:`NOT_COMPARED`) and a key the saved config lacks (written by older code) that holds its default."""
    default = to_dict(PipelineConfig())
    out = []
    for key, old, value in config_diff(saved, new):
        if key in NOT_COMPARED or key.split(".")[0] in NOT_COMPARED:
            continue
        if old == ABSENT and config_get(default, key) == value:
            continue
        out.append((key, old, value))
    return out


def check_device(cfg: PipelineConfig, steps: tuple[str, ...] = tuple(s.name for s in STEPS),
                 reuse: tuple[str, ...] = ()) -> None:
    """Refuse run.device = "cuda" where torch sees no CUDA device, unless no training step of ``steps`` can run
    (the teacher and the students are both reused as they are, e.g. `cascade report RUN`)."""
    trains = {"teacher", "students"} & set(steps)
    if cfg.run.device == "cuda" and not torch.cuda.is_available() and not trains <= set(reuse):
        raise ConfigError(f"run.device = 'cuda' (--device cuda) but torch {torch.__version__} sees no CUDA device "
                          f"(built for CUDA {torch.version.cuda or 'none'}): use --device cpu, or run on a GPU machine")


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
                 reuse: tuple[str, ...] = (), frozen: tuple[str, ...] = (), update: bool = False,
                 wait: bool = False) -> dict[str, dict]:
    """Run (or resume) the pipeline of ``cfg`` under ``cfg.run.runs_dir / cfg.run.name``.

    The run folder is locked for the call (:func:`cascade.run_lock.folder_lock`): another process on it raises
    RunLockedError naming its pid at once, or with ``wait`` waits for it. torch trains on ``cfg.run.threads``
    threads (recorded in every manifest this call writes), whatever the process's own setting.
    until: stop after this step (e.g. "ranklog" to get data, teacher and rank logs only). frozen: finished steps
    taken as they are, never redone (see run_steps). update: a run folder made with another config is refused
    (:class:`RunConfigMismatch`, naming the keys) unless this is set; then the steps the change affects are redone
    in that folder and the others kept (its config.json is rewritten only then)."""
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
    cfg = with_run_device(cfg)
    check_device(cfg, steps=will_run, reuse=(*reuse, *frozen))
    run_dir = A.safe_join(cfg.run.runs_dir, A.check_run_name(cfg.run.name))
    with folder_lock(run_dir, wait=wait):
        config_path = run_dir / "config.json"
        diff = run_config_diff(A.read_json(config_path), to_dict(cfg)) if config_path.is_file() else None
        if diff and not update:
            # a replay or report of a finished run (frozen steps) keeps its name: a new run is `cascade run`'s
            beside = ("`cascade run CONFIG --set run.name=NEW ...` for a new run beside it" if frozen else
                      "--set run.name=NEW for a new run beside it")
            raise RunConfigMismatch(
                f"run {cfg.run.name!r} ({run_dir}) was made with another config ({format_diff(diff)}); a run is never "
                f"overwritten by a different config: pass --update (run_pipeline(update=True)) to redo the steps the "
                f"change affects in this run, or {beside}")
        if diff is None or diff:
            A.write_json(config_path, to_dict(cfg))
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.run.threads)  # for the run only: the caller's process keeps its own setting
        trackers = Trackers(cfg.tracking, run_dir, cfg.run.name, to_dict(cfg))

        def each_step(name: str, status: str, manifest) -> None:
            if torch.get_num_threads() != cfg.run.threads:  # a library changed the process's OpenMP count
                log.warning("step %s left torch on %d threads: back to run.threads = %d", name,
                            torch.get_num_threads(), cfg.run.threads)
                torch.set_num_threads(cfg.run.threads)
            trackers.step(name, status, manifest)
            if on_step is not None:
                on_step(name, status, manifest)

        ok = False
        try:
            results = run_steps(steps, cfg, run_dir, cfg.run.seed, force=force, only=only, progress=progress,
                                to_plain=to_dict, on_step=each_step, code_hash=code_hash(), reuse=reuse,
                                frozen=frozen, record={"threads": cfg.run.threads})
            ok = True
            return results
        finally:
            trackers.close(ok)
            torch.set_num_threads(threads)
