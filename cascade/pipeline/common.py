"""Helpers the pipeline's steps share: seeding, saving a ranker, one row of the models table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .. import artifacts as A
from ..models.collaborative import term_of
from ..models.ranker import RankerConfig, n_parameters, serving_latency
from ..run_data import ranker_config_json
from ..train.loop import TrainConfig


def seeded(seed: int) -> None:
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    """The step's training config under the run's seed (one seed drives every step)."""
    return dataclasses.replace(cfg, seed=seed)


def save_ranker(model: torch.nn.Module, cfg: RankerConfig, out: Path) -> list[str]:
    """model.pt, config.json and the model's collaborative term (collaborative.json) where it carries one, in
    ``out``; the file names relative to ``out``'s parent."""
    A.save_torch(out / "model.pt", model.state_dict())
    A.write_json(out / "config.json", ranker_config_json(model, cfg))
    files = ["model.pt", "config.json"]
    term = term_of(model)
    if term is not None:
        files.append(term.save(out))
    return [str(Path(out.name) / f) for f in files]


#: Keys of a models-table row that are measured times: kept in the step's manifest metrics (and so in the report),
#: never in models.json, whose hash must not change when a step is redone unchanged.
TIMING_KEYS = ("latency_ms_per_100",)


def without_timings(rows: list[dict]) -> list[dict]:
    """The rows of a models table without :data:`TIMING_KEYS` (what models.json holds)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def model_row(name: str, role: str, model: torch.nn.Module | None, metrics: dict, spec=None) -> dict:
    row = {"name": name, "role": role, **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    if model is not None:
        row["n_params"] = int(n_parameters(model))
        row["size_mb"] = float(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
        row["latency_ms_per_100"] = float(serving_latency(model, spec, n_candidates=100))
    return row
