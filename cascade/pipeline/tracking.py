"""Experiment tracking of a pipeline run: TensorBoard event files and an MLflow run (``[tracking]`` in the config,
:class:`~cascade.pipeline.config.TrackingSection`).

After each step (run or skipped) :meth:`Trackers.step` logs what it has: the training curves of the models it
trained (:func:`cascade.pipeline.histories.training_histories`: ``<model>/train_loss`` and
``<model>/<validation metric>`` per epoch) and its numeric metrics (``<step>/<key>/...``, e.g.
``replay/distilled/rank_teacher_recall``). The resolved config goes in once at the start (MLflow params, a
TensorBoard text). Names keep only the characters MLflow allows (letters, digits, ``_ - . : /`` and spaces).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import TrackingSection
from .histories import training_histories

TENSORBOARD_DIR = "tensorboard"
MLFLOW_PARAM_CHARS = 6000  # MLflow's longest parameter value


def metric_name(*parts: str) -> str:
    """``parts`` joined by '/', "@" spelt " at " and every other character MLflow refuses in a metric name left out:
    ("prerank student (distilled)", "teacher-recall@10") -> "prerank student distilled/teacher-recall at 10"."""
    return "/".join(re.sub(r"[^\w\-.: ]", "", str(p).replace("@", " at ")).strip() for p in parts)


def flat_numbers(obj: Any, prefix: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric leaves of nested dicts (and of lists of dicts with a "name") as {"a/b/c": value}."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flat_numbers(v, prefix + (str(k),)))
    elif isinstance(obj, list):
        for row in obj:
            if isinstance(row, Mapping) and "name" in row:
                out.update(flat_numbers({k: v for k, v in row.items() if k != "name"}, prefix + (str(row["name"]),)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:  # not NaN
        out[metric_name(*prefix)] = float(obj)
    return out


def flat_params(cfg: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as {"a.b.c": its JSON text} (MLflow parameters)."""
    if isinstance(cfg, Mapping):
        out: dict[str, str] = {}
        for k, v in cfg.items():
            out.update(flat_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(cfg, default=str)[:MLFLOW_PARAM_CHARS]}


def _installed(distribution: str) -> bool:
    """Whether the named distribution is installed (``mlflow``, not only ``mlflow-skinny``)."""
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def one_line(message: str, head: int = 200, tail: int = 240) -> str:
    """A message on one line (whitespace collapsed); a long one keeps its start and its end, where MLflow says what
    to do, with " ... " between."""
    text = " ".join(message.split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


class Trackers:
    """The trackers a run asked for (none, TensorBoard, MLflow or both). step(name, status, manifest) after each
    step; close(ok) at the end. TensorBoard's folder ``runs/<run>/tensorboard`` is written anew by each pipeline
    invocation, so it holds every step's curves once; MLflow gets a new run per invocation."""

    def __init__(self, cfg: TrackingSection, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.tb = None
        self.mlflow = None
        self.logged: set[str] = set()  # models whose curves are logged
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / TENSORBOARD_DIR
            if tb_dir.exists():
                shutil.rmtree(tb_dir)
            self.tb = SummaryWriter(log_dir=str(tb_dir))
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
        if cfg.mlflow:
            import mlflow

            if cfg.mlflow_tracking_uri is not None:
                mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            try:
                mlflow.set_experiment(cfg.mlflow_experiment or "cascade")
            except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a store it cannot use
                store = cfg.mlflow_tracking_uri or f"MLflow's default, {mlflow.get_tracking_uri()}"
                full = _installed("mlflow")  # the full package (not only mlflow-skinny) writes database stores
                said = one_line(str(exc)).rstrip(".")
                raise ConfigError(
                    f"tracking.mlflow: MLflow cannot use the tracking store ({store}): {type(exc).__name__}: "
                    f"{said}. Set tracking.mlflow_tracking_uri to a store this MLflow installation "
                    "can write (a tracking server's http:// address; " + (
                        "a database such as sqlite:///mlflow.db)" if full else "a database store needs the full "
                        "mlflow package: pip install 'cascade-distill[tracking]')")) from None
            self.mlflow = mlflow
            self.mlflow_run = mlflow.start_run(run_name=run_name, tags={"cascade.run_dir": str(self.run_dir)})
            mlflow.log_params(flat_params(config))

    @property
    def active(self) -> bool:
        return self.tb is not None or self.mlflow is not None

    def _scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, value, global_step=step)
        if self.mlflow is not None:
            self.mlflow.log_metric(name, value, step=step)

    def step(self, name: str, status: str, manifest: Mapping[str, Any]) -> None:
        """Log the new training curves and the numeric metrics of the step ``name`` that just ran or was skipped."""
        if not self.active:
            return
        for model, h in training_histories(self.run_dir).items():
            if model in self.logged:
                continue
            self.logged.add(model)
            for epoch, loss, valid in zip(h["epoch"], h["loss"], h["valid"]):
                if loss is not None:
                    self._scalar(metric_name(model, "train_loss"), float(loss), epoch)
                if valid is not None and h["valid_metric"]:
                    self._scalar(metric_name(model, h["valid_metric"]), float(valid), epoch)
        for key, value in flat_numbers(manifest.get("metrics") or {}, (name,)).items():
            self._scalar(key, value, 0)
        if self.tb is not None:
            self.tb.flush()

    def close(self, ok: bool) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FINISHED" if ok else "FAILED")
