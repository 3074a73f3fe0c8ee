"""The step runner: run folders, skip-if-unchanged, forced re-runs and crash safety.

A pipeline is an ordered list of :class:`Step` objects. Each step owns ``runs/<run>/<step>/`` and declares the
slice of the config it depends on and the steps it reads. A step is *up to date* when its folder has a valid
``manifest.json`` (every output present with the recorded sha256), the same config hash, and the same input
fingerprints (the output hashes of its upstream steps). Up-to-date steps are skipped; the rest run.

A step runs in a temporary sibling folder which is renamed onto the step folder only after its manifest is
written, so a process killed midway (even with SIGKILL) never leaves a folder that looks complete: the next run
finds no valid manifest and redoes that step from its inputs. A step folder may be a symbolic link (e.g. onto a
bigger disk): the temporary folder is then made beside the link's target and swapped onto the target, and the
link stays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import artifacts as A
from ..config import ConfigError, config_diff, format_diff

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a step function receives.

    out: the (temporary) folder to write into. inputs: upstream step name -> its final folder.
    config: the step's config slice. seed: the run seed. progress: show tqdm bars.
    """

    name: str
    out: Path
    inputs: dict[str, Path]
    config: Any
    seed: int
    progress: bool = True


@dataclass
class StepResult:
    """What a step function returns: files it wrote (relative to ctx.out) and its headline metrics."""

    outputs: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass(frozen=True)
class Step:
    """name; deps: the steps it reads; config_of(config) -> its config slice; run(ctx) -> StepResult.

    external(config) -> {name: fingerprint} of what it reads from outside the run (e.g. the data files), part of
    its inputs: a change re-runs it. after(config, step_dir): checks once the step is up to date (ran or skipped),
    before any later step runs (e.g. sizes against the data)."""

    name: str
    deps: tuple[str, ...]
    config_of: Callable[[Any], Any]
    run: Callable[[StepContext], StepResult]
    external: Callable[[Any], dict[str, str]] | None = None
    after: Callable[[Any, Path], None] | None = None


def _fingerprint(manifest: Mapping[str, Any]) -> str:
    """What downstream steps depend on: the step's config hash and the hashes of its outputs."""
    return A.stable_hash({"config_hash": manifest["config_hash"], "outputs": manifest["outputs"]})


def step_status(step_dir: Path, config_dict: Any, inputs: Mapping[str, str], seed: int | None = None,
                code_hash: str | None = None) -> tuple[bool, str]:
    """(up_to_date, reason). A changed config names its keys (``config changed: train.epochs: 1 -> 2``, keys
    relative to the step's config slice); changed inputs name the upstream steps."""
    if not (step_dir / A.MANIFEST).exists():
        return False, "no manifest"
    try:
        m = A.read_manifest(step_dir, verify=True)
    except A.ArtifactError as e:
        return False, f"invalid artifacts ({e})"
    if m.get("config_hash") != A.stable_hash(config_dict):
        diff = config_diff(m.get("config"), json.loads(json.dumps(config_dict, default=str)))
        return False, f"config changed: {format_diff(diff)}" if diff else "config changed"
    if m.get("inputs") != dict(inputs):
        old = m.get("inputs") or {}
        changed = [d for d in inputs if old.get(d) != inputs[d]] + [d for d in old if d not in inputs]
        return False, f"inputs changed: new outputs of {', '.join(changed)}"
    if seed is not None and m.get("seed") != seed:
        return False, "seed changed"
    if code_hash is not None and m.get("code_hash") != code_hash:
        return False, "code changed"
    return True, "up to date"


def _remove(path: Path) -> None:
    """Remove a folder, a file or a symbolic link (never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _step_home(step_dir: Path) -> Path:
    """Where a step's results live: ``step_dir``, or the target of a ``step_dir`` that is a symbolic link."""
    if not step_dir.is_symlink():
        return step_dir
    target = step_dir.resolve()
    if not target.parent.is_dir():
        raise A.ArtifactError(f"step folder {step_dir} is a symbolic link to {target}, whose folder "
                              f"{target.parent} does not exist")
    return target


def run_steps(
    steps: list[Step],
    config: Any,
    run_dir: str | os.PathLike,
    seed: int,
    force: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    progress: bool = True,
    to_plain: Callable[[Any], Any] = lambda c: c,
    on_step: Callable[[str, str, Mapping[str, Any]], None] | None = None,
    code_hash: str | None = None,
    reuse: tuple[str, ...] = (),
    frozen: tuple[str, ...] = (),
    record: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """Run ``steps`` in order under ``run_dir``; return step -> {"status": "ran"|"skipped", "manifest": ...}.

    force: step names to redo even when up to date (their dependants then re-run because their inputs change
    only if outputs change; pass them too to force them). only: run just these steps (their upstream steps
    must be up to date). to_plain: turns a config slice into JSON-able data for hashing and the manifest.
    code_hash: a fingerprint of the code that computes the steps; a step written by other code is redone.
    reuse: steps whose finished folder is taken as it is (outputs still hash-verified) even if their config or
    the code changed since. frozen: the same, but a folder that fails verification raises instead of being redone
    (`cascade replay RUN` / `cascade report RUN` never rewrite a finished run's other steps).
    record: extra fields of every manifest this call writes (e.g. the thread count).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in steps]
    for f in (*force, *frozen):
        if f not in names:
            raise ConfigError(f"--force {f!r}: no such step (steps: {', '.join(names)})")
    results: dict[str, dict] = {}
    fingerprints: dict[str, str] = {}
    for step in steps:
        step_dir = run_dir / step.name
        cfg_slice = step.config_of(config)
        cfg_plain = to_plain(cfg_slice)
        missing = [d for d in step.deps if d not in fingerprints]
        if missing:
            raise RuntimeError(f"step {step.name!r} needs {missing}, which did not run or are not up to date")
        if step.name in frozen and step.name not in force:
            try:
                m = A.read_manifest(step_dir, verify=True)
            except A.ArtifactError as e:
                raise A.ArtifactError(f"step {step.name!r} of the finished run {run_dir} cannot be used as it is "
                                      f"({e}); `cascade run` redoes it") from None
            up_to_date, reason = True, "taken as it is"
        else:
            inputs = {d: fingerprints[d] for d in step.deps}
            if step.external is not None:
                inputs.update(step.external(config))
            up_to_date, reason = step_status(step_dir, cfg_plain, inputs, seed, code_hash)
            if not up_to_date and step.name in reuse and step.name not in force:
                try:
                    A.read_manifest(step_dir, verify=True)
                    up_to_date, reason = True, f"reused as it is ({reason})"
                except A.ArtifactError:
                    pass
        wanted = only is None or step.name in only
        if up_to_date and step.name not in force:
            m = A.read_manifest(step_dir, verify=False)
            fingerprints[step.name] = _fingerprint(m)
            results[step.name] = {"status": "skipped", "manifest": m}
            log.info("[%s] skipped (%s)", step.name, reason)
            if on_step:
                on_step(step.name, "skipped", m)
            if step.after is not None:
                step.after(config, step_dir)
            continue
        if not wanted:
            raise RuntimeError(f"step {step.name!r} is not up to date ({reason}); run it first")
        home = _step_home(step_dir)
        tmp = home.parent / f".{home.name}.partial"
        old = home.parent / f".{home.name}.old"
        _remove(tmp)
        _remove(old)  # a swap killed midway leaves it (the step folder itself is already complete then)
        tmp.mkdir()
        log.info("[%s] running (%s)", step.name, reason if step.name not in force else "forced")
        t0 = time.perf_counter()
        ctx = StepContext(step.name, tmp, {d: run_dir / d for d in step.deps}, cfg_slice, seed, progress)
        res = step.run(ctx)
        wall = time.perf_counter() - t0
        m = A.write_manifest(tmp, kind=step.name, config=cfg_plain, seed=seed, inputs=inputs,
                             outputs=res.outputs, metrics=res.metrics, wall_s=round(wall, 3),
                             extra={"summary": res.summary, "code_hash": code_hash, **dict(record or {})})
        # Swap the finished folder in: the old one is removed only once the new one is complete.
        if home.exists():
            os.replace(home, old)
        os.replace(tmp, home)
        _remove(old)
        fingerprints[step.name] = _fingerprint(m)
        results[step.name] = {"status": "ran", "manifest": m}
        log.info("[%s] done in %.1f s: %s", step.name, wall, res.summary)
        if on_step:
            on_step(step.name, "ran", m)
        if step.after is not None:
            step.after(config, step_dir)
    return results
