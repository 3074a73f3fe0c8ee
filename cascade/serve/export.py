"""A finished run's models exported for serving outside Python's eager mode: ``torch.export`` programs (``.pt2``)
or ONNX files, each checked against the eager model on real rows of the run's test split.

What is exported (every model a cascade serves):

- ``teacher`` and ``rank_student`` (:class:`~cascade.models.ranker.Ranker`): ``(cat int64 [B, C], num float32
  [B, M]) -> logit [B]`` over the encoded pair columns (the encoder's feature order, data/ in the run); a
  teacher's collaborative term, which the export does not compute, is described in its manifest entry
  (``serving_score``);
- per variant (``distilled``, ``ground_truth``) and stage (``retrieval``, ``prerank``) the two towers:
  ``<variant>_<stage>_user_tower`` ``(user_cat [B, Cu], user_num [B, Mu], ctx_cat [B, Cc], ctx_num [B, Mc][,
  history [B, H]]) -> [B, d]`` (history, where the tower reads one: the user's last H clicked items as codes of
  the item-id vocabulary, 0 = none; ``TowerInputs.history_codes``) and ``<variant>_<stage>_item_tower``
  ``(item_cat [N, Ci], item_num [N, Mi]) -> [N, d]``. A user tower's manifest entry says how serving scores an
  item with it (``serving_score``: the temperature and, where the tower has one, its popularity prior).

The batch dimension is dynamic. Parity: each exported file is loaded back (``torch.export.load``, or an
onnxruntime session on the CPU) and run on rows it was not traced with, in a batch of another size; the largest
absolute difference from the eager model is recorded in ``manifest.json`` and must stay within ``tolerance``
(else :class:`ExportError`). TorchScript is not offered: scripting fails on the teacher's layers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import artifacts as A
from ..config import ConfigError
from ..data.requests import requests_frame
from ..models.collaborative import term_of
from ..run_data import RunData, load_ranker, load_towers

log = logging.getLogger(__name__)

FORMATS = ("torch-export", "onnx")
SUFFIX = {"torch-export": ".pt2", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
STEPS_EXPORTED = ("data", "teacher", "students")  # the run's steps whose models (and test rows) are exported
TRACE_ROWS, CHECK_ROWS = 64, 257  # example batch of the trace; the parity batch (another size: the batch is dynamic)


class ExportError(ConfigError):
    """An export that cannot be made or does not match its eager model (the message says which and by how much)."""


@dataclass
class Exportable:
    """One model to export: its weights file, the eager module (eval mode), its input and output names, and two
    batches of real inputs (``trace`` for tracing, ``check`` for the parity check; tensors in forward's order)."""

    name: str
    weights: Path  # the model.pt it was loaded from
    module: nn.Module
    input_names: tuple[str, ...]
    output_name: str
    trace: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]
    about: dict | None = None  # what serving adds around the model's output (a user tower's score), for the manifest


def exportables(run_dir: str | os.PathLike, variants: tuple[str, ...] | None = None) -> list[Exportable]:
    """The models of the run ``run_dir`` (see the module docstring), with real inputs from its test split.
    variants: the two-tower variants to include (None: every variant the run trained); an unknown one is an
    error."""
    run_dir = Path(run_dir)
    unfinished = [s for s in STEPS_EXPORTED if not (run_dir / s / A.MANIFEST).is_file()]
    if unfinished:
        raise ExportError(f"the run {run_dir} has not finished the step(s) {', '.join(unfinished)} whose models "
                          f"export needs (no {run_dir / unfinished[0] / A.MANIFEST}); finish it first: `cascade run` "
                          "with the config it was started with resumes it")
    data = RunData(run_dir / "data")
    test = data.encoded("test")
    rows = _rows(len(test))
    out = []
    for name, folder in (("teacher", run_dir / "teacher" / "teacher"), ("rank_student", run_dir / "students" /
                                                                        "rank_student")):
        model = load_ranker(folder, data.spec).eval()
        cat, num = torch.as_tensor(test.cat, dtype=torch.long), torch.as_tensor(test.num, dtype=torch.float32)
        out.append(Exportable(name, folder / "model.pt", model, ("cat", "num"), "logit", (cat[rows[0]], num[rows[0]]),
                              (cat[rows[1]], num[rows[1]]), _ranking_score(model)))
    trained = sorted(p.name for p in (run_dir / "students").iterdir() if (p / "retrieval").is_dir())
    unknown = sorted(set(variants or ()) - set(trained))
    if unknown:
        hint = ("; the distilled+channels cascade's models are the distilled variant's towers (the classic channels "
                "are no torch models: they are served from the run's channels step)"
                if any(v.endswith("+channels") for v in unknown) else "")
        raise ExportError(f"variant(s) {unknown} not in the run {run_dir} (it has {trained}){hint}")
    frame = requests_frame(data.split_impressions("test"), data.context_names)
    for variant in (v for v in trained if variants is None or v in variants):
        for stage in ("retrieval", "prerank"):
            towers = load_towers(run_dir / "students" / variant / stage, data, requests=frame)
            inp, model = towers.inputs, towers.model.eval()
            user_rows = inp.user_rows(data.map_users(frame["user_id"].to_numpy()))
            req = _rows(len(frame))
            item = _rows(len(inp.item_ids))
            weights = run_dir / "students" / variant / stage / "model.pt"
            out.append(Exportable(f"{variant}_{stage}_user_tower", weights, model.user_tower,
                                  ("user_cat", "user_num", "ctx_cat", "ctx_num")
                                  + (("history",) if inp.history is not None else ()), "user_embedding",
                                  inp.user_batch(user_rows[req[0]], req[0]), inp.user_batch(user_rows[req[1]], req[1]),
                                  _serving_score(towers)))
            out.append(Exportable(f"{variant}_{stage}_item_tower", weights, model.item_tower, ("item_cat", "item_num"),
                                  "item_embedding", inp.item_batch(item[0]), inp.item_batch(item[1])))
    return out


def _ranking_score(model) -> dict | None:
    """How serving ranks with this ranker beyond its exported click logit, where it adds something: the
    collaborative term (cascade/models/collaborative.py), which an exported model does not compute."""
    term = term_of(model)
    if term is None:
        return None
    return {"score": "the ranking score + weight * the request's EASE scores (ridge lam, fitted on the train split's "
                     "clicks) standardised over the corpus + popular_weight * log(1 + the item's clicks in the "
                     "trailing popular_days, recounted every refresh_ms) standardised over the corpus",
            "collaborative": dataclasses.asdict(term)}


def _serving_score(towers) -> dict:
    """How serving scores an item with this user tower: the temperature, and the popularity prior where the
    tower has one (cascade/channels/prior.py), which an exported tower does not compute."""
    about = {"score": "<user_embedding, item_embedding> / temperature", "temperature": towers.model.temperature}
    if towers.prior is not None:
        about["score"] += (" + weight * sqrt(u' Cov(item_embedding) u) / temperature * log(1 + the item's clicks "
                           "in the trailing window_days, recounted every refresh_ms)")
        about["popularity_prior"] = towers.prior.params()
    return about


def _rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the trace batch (the first TRACE_ROWS) and of the parity batch (the next CHECK_ROWS, or
    from the start again when the table is short)."""
    if n < 2:
        raise ExportError(f"export needs at least 2 rows of real inputs, the run's table has {n}")
    trace = np.arange(min(TRACE_ROWS, n - 1))
    check = np.arange(len(trace), len(trace) + CHECK_ROWS) % n
    return trace, check


def _batch_dims(m: Exportable):
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    return tuple({0: batch} for _ in m.input_names)


def _torch_export(m: Exportable, path: Path) -> Callable[..., np.ndarray]:
    program = torch.export.export(m.module, m.trace, dynamic_shapes=_batch_dims(m))
    with A.atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    loaded = torch.export.load(str(path)).module()
    return lambda *xs: loaded(*xs).detach().numpy()


def _onnx_export(m: Exportable, path: Path) -> Callable[..., np.ndarray]:
    import onnxruntime

    with A.atomic_path(path) as tmp:
        torch.onnx.export(m.module, m.trace, str(tmp), input_names=list(m.input_names), output_names=[m.output_name],
                          dynamic_shapes=_batch_dims(m), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(m.input_names, xs)})[0]


def export_run(run_dir: str | os.PathLike, fmt: str, out_dir: str | os.PathLike | None = None,
               variants: tuple[str, ...] | None = None, tolerance: float = 1e-5) -> dict:
    """Export the models of a finished run in format ``fmt`` ("torch-export" or "onnx") into ``out_dir`` (default
    ``RUN/export/<fmt>/``), check each against its eager model, and write ``manifest.json`` (per model: file,
    inputs with dtype and shape, output, max_abs_diff, checked_rows, the sha256 of the weights it came from).
    Returns the manifest. Raises ExportError on a format or package that is not there, a tolerance that is not a
    finite number > 0, a run that has not finished its models, or a parity failure; all but the last before
    ``out_dir`` is made."""
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {FORMATS}")
    number = isinstance(tolerance, (int, float, np.floating)) and not isinstance(tolerance, bool)
    if not (number and math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"export tolerance {tolerance!r} must be a finite number > 0 (the largest allowed "
                          "|exported - eager|)")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ExportError(f"--format onnx needs {', '.join(missing)}, not installed: "
                              "pip install 'cascade-distill[export]'")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export" / fmt
    ms = exportables(run_dir, variants)  # checks the run and the variants before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for m in ms:
        path = out_dir / f"{m.name}{SUFFIX[fmt]}"
        with _quiet_exporter():
            run = (_torch_export if fmt == "torch-export" else _onnx_export)(m, path)
        with torch.inference_mode():
            eager = m.module(*m.check).numpy()
        exported = run(*m.check)
        if exported.shape != eager.shape:
            raise ExportError(f"{m.name}: the exported model returns shape {exported.shape}, the eager one "
                              f"{eager.shape}")
        diff = float(np.abs(exported.astype(np.float64) - eager).max())
        if not diff <= tolerance:
            raise ExportError(f"{m.name}: the {fmt} model differs from the eager model by up to {diff:.3g} on "
                              f"{len(eager)} test rows (tolerance {tolerance:g})")
        log.info("export: %s -> %s, max |exported - eager| %.3g on %d rows", m.name, path.name, diff, len(eager))
        models[m.name] = {
            "file": path.name,
            "inputs": [{"name": n, "dtype": str(x.dtype).replace("torch.", ""), "shape": ["batch", *x.shape[1:]]}
                       for n, x in zip(m.input_names, m.trace)],
            "output": {"name": m.output_name, "shape": ["batch", *eager.shape[1:]]},
            "max_abs_diff": diff, "checked_rows": int(len(eager)),
            **({"serving_score": m.about} if m.about else {}),
        }
    inputs = {m.name: A.sha256_file(m.weights) for m in ms}
    return A.write_manifest(out_dir, kind="export", config={"format": fmt, "tolerance": tolerance,
                                                            "variants": sorted(variants) if variants else None},
                            seed=None, inputs=inputs, outputs=[v["file"] for v in models.values()],
                            metrics={k: v["max_abs_diff"] for k, v in models.items()},  # inputs: weights sha256
                            extra={"models": models, "torch": torch.__version__})


class _quiet_exporter:
    """torch.onnx's exporter reports each phase and warns that torchvision's operators are not registered (we
    export none); keep those lines at warning level while an export runs."""

    NAMES = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript",
             "onnx_ir")

    # warnings the exporter gives for every model, about its own internals
    WARNINGS = (r"# The axis name: .* will not be used", r"`isinstance\(treespec, LeafSpec\)` is deprecated")

    def __enter__(self) -> None:
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.ERROR)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        for message in self.WARNINGS:
            warnings.filterwarnings("ignore", message=message)

    def __exit__(self, *exc) -> None:
        self.warnings.__exit__(*exc)
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)
