"""One explicit training loop for every ranking model (teacher, student, joint teacher + student).

``fit`` reads top to bottom: batch, forward + loss terms (``loss_fn``), one :func:`step_on_loss` (mix, backward,
clip, step; shared with the students' loops), log, and every
``eval_every_steps`` (or once per epoch) validation AUC with early stopping and a checkpoint of the best model.
Distillation plugs in through ``loss_fn`` instead of a second loop:

    loss_fn(model, batch, step) -> (terms: dict[str, Tensor], weights: dict[str, float])

``batch`` is a dict of tensors on the training device (``cat`` int64 [B, C], ``num`` float32 [B, M], ``label``
float32 [B], ``user_id`` / ``item_id`` / ``request_id`` int64 [B], plus the table's ``extra`` arrays). ``step`` is
the number of optimizer steps taken so far; it lets a loss follow a schedule (PFD's warm-up). The default loss is
click BCE on ``model(cat, num)``.

A non-finite loss term stops training with FloatingPointError naming the step and the term; the checkpoint on
disk is then still the last good (best validated) one.

Data parallel (``torchrun``, see :mod:`cascade.distributed`): when a torch.distributed group is initialised,
``fit`` wraps the model and the loss in DistributedDataParallel (gradients averaged over ranks after every
backward). By default every rank holds the whole ``train`` table and trains on its block of ``cfg.batch_size`` rows
of each global batch of ``world * cfg.batch_size`` rows (one seeded permutation, the same on every rank), so the
effective batch is ``world * cfg.batch_size`` and a run equals a single-process run with that batch up to float
summation order. With ``train_shard=True`` ``train`` holds only this rank's rows (e.g. read with
``distributed.shard_rows``); each rank permutes its own rows (seed + rank) and all ranks take the
same number of full batches per epoch (the minimum over ranks; tails are dropped). Validation runs on rank 0 on
its whole ``valid`` table, and its metrics and the early-stopping decision are broadcast, so all ranks stop at the
same step and return the same best weights; only rank 0 writes the checkpoint and the manifest. Dropout draws
from seed + rank. The logged train loss is the mean over ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cascade import distributed as D
from cascade.artifacts import load_torch, read_manifest, save_torch, write_manifest
from cascade.config import at_least, nonnegative, positive, require
from cascade.data.batches import EncodedTable, batch_indices, iter_batches
from cascade.distill.losses import click_bce, mix
from cascade.eval.metrics import auc, gauc, logloss
from cascade.machine import AUTOCAST, largest_gemm, resolve_autocast
from cascade.threads import torch_threads

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adagrad")
CHECKPOINT = "model.pt"

LossFn = Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[dict[str, torch.Tensor], dict[str, float]]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`fit`.

    patience: evaluations without a better validation AUC before stopping. eval_every_steps: None evaluates once
    per epoch. grad_clip: max global grad norm (None: no clipping). num_threads: torch intra-op threads during
    fit (None: leave as is). progress: show a tqdm bar. autocast: "bf16" runs the training forward under
    ``torch.autocast`` in bfloat16 (GEMMs in bf16; weights, optimizer state, logits and losses stay float32;
    validation in float32): 1.8x the samples/s of float32 for a DeepFM on a CPU with avx512_bf16, equal test AUC
    (BENCHMARKS.md; it does not pay where the optimizer step over the embeddings dominates a step);
    "off" (or None) trains in float32; "auto" takes bf16 where this CPU runs it natively and the model's largest
    GEMM probes at least 1.25x faster in it (:func:`cascade.machine.resolve_autocast`), else float32.
    compile: run each training step's forward and loss through ``torch.compile`` (TorchInductor fuses the
    element-wise work around the GEMMs: the FM and embedding arithmetic, casts, activations); validation and
    everything after ``fit`` run the model as it is. The first steps pay the compilation (tens of seconds on a
    CPU, a C++ compiler needed), so it pays on long fits only (BENCHMARKS.md).
    min_steps_per_epoch: None trains in batches of batch_size whatever the table's size; n: the batch shrinks
    (never grows, and never below 2 rows) so that an epoch of the train table takes at least n optimiser steps. On a
    small log a large batch leaves too few steps for the model to learn or for early stopping to judge (4,552 train
    rows at 4,096 a batch are 2 steps an epoch); on a large one it changes nothing. Not under torch.distributed.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 4096
    epochs: int = 1
    patience: int = 2
    eval_every_steps: int | None = None
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = False
    eval_batch_size: int = 4096
    autocast: str | None = "auto"
    compile: bool = False
    min_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        require(self, "autocast", self.autocast is None or self.autocast in AUTOCAST,
                f"must be one of {AUTOCAST} (None: 'off')")
        require(self, "min_steps_per_epoch", self.min_steps_per_epoch is None or at_least(self.min_steps_per_epoch, 1),
                "must be an integer >= 1 or None (batches of batch_size whatever the table's size)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig: device {self.device!r} must be 'cpu' or 'cuda'")
        require(self, "lr", positive(self.lr), "must be a finite number > 0")
        require(self, "weight_decay", nonnegative(self.weight_decay), "must be a finite number >= 0")
        for name in ("batch_size", "epochs", "patience", "eval_batch_size"):
            require(self, name, at_least(getattr(self, name), 1), "must be an integer >= 1")
        require(self, "eval_every_steps", self.eval_every_steps is None or at_least(self.eval_every_steps, 1),
                "must be an integer >= 1 or None (once per epoch)")
        require(self, "grad_clip", self.grad_clip is None or positive(self.grad_clip),
                "must be a finite number > 0 (the max gradient norm) or None (no clipping)")
        require(self, "seed", at_least(self.seed, 0), "must be an integer >= 0")
        require(self, "num_threads", self.num_threads is None or at_least(self.num_threads, 1),
                "must be an integer >= 1 or None")


@dataclass
class FitResult:
    """best_valid_auc / best_step of the kept (best) model; history: one dict per evaluation. autocast: what
    TrainConfig.autocast resolved to ({requested, dtype, reason, speedup}, cascade.machine.AutocastChoice).
    train_samples / train_seconds: rows trained on and the wall time of the training steps (batch assembly,
    forward, backward, optimizer; validation left out), this rank's. batch_size: the rows of a training batch
    (TrainConfig.batch_size, or less where min_steps_per_epoch shrank it)."""

    best_valid_auc: float
    best_step: int
    batch_size: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    autocast: dict[str, Any] = field(default_factory=dict)
    train_samples: int = 0
    train_seconds: float = 0.0

    def throughput(self) -> dict[str, float]:
        """{"samples", "seconds", "samples_per_s"} of the training steps (a manifest's measured metrics)."""
        return {"samples": self.train_samples, "seconds": self.train_seconds,
                "samples_per_s": self.train_samples / self.train_seconds if self.train_seconds > 0 else float("nan")}


def default_loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
    """Click BCE on the model's logits."""
    return {"bce": click_bce(model(batch["cat"], batch["num"]), batch["label"])}, {"bce": 1.0}


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the fused implementation: one kernel over all parameters, ~7% more samples/s than foreach for the
    benchmark DeepFM), or Adagrad (the one that takes sparse embedding gradients).

    Weight decay applies to dense parameters only: sparse embeddings cannot take it, and decaying every row on
    every step would shrink rows the batch never touched.
    """
    sparse = [p for p in params if getattr(p, "_cascade_sparse", False)]
    dense = [p for p in params if not getattr(p, "_cascade_sparse", False)]
    groups = [g for g in ({"params": dense, "weight_decay": cfg.weight_decay},
                          {"params": sparse, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw":
        if sparse:
            raise ValueError("TrainConfig: optimizer 'adamw' cannot train sparse embeddings; use "
                             "'adagrad' or sparse=False")
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    return torch.optim.Adagrad(groups, lr=cfg.lr)


def step_on_loss(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                 optimizers: Sequence[torch.optim.Optimizer], clip_groups: Sequence[Any], grad_clip: float | None,
                 context: str, ddp: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step on weighted loss terms, the same in every training loop of the project (:func:`fit`,
    :func:`cascade.train.students.train_student`, :mod:`cascade.train.three_students`): mix the terms (a
    non-finite term raises FloatingPointError starting with ``context``, on every rank at once under DDP), zero
    the gradients, backward, clip each parameter group of ``clip_groups`` to ``grad_clip`` on its own (a shared
    norm would couple the models of a group), step every optimizer. Returns (total, the terms' float values)."""
    mixed, error = D.finite_on_all_ranks(lambda: mix(terms, weights), ddp)
    if error is not None:
        raise FloatingPointError(f"{context}: {error}") from error
    total, values = mixed
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip is not None:
        for params in clip_groups:
            nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers:
        opt.step()
    return total, values


class RunningMeans:
    """Means of logged loss values over the steps since the last reset: add(values) per step, means()."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.n = {}, 0


def _mark_sparse(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.sparse:
            m.weight._cascade_sparse = True  # read by make_optimizer


def to_tensors(batch: Mapping[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """numpy batch -> tensors: cat int64, num / label float32, other arrays with their own dtype."""
    out = {}
    for k, v in batch.items():
        if k == "cat":
            t = torch.as_tensor(v, dtype=torch.long)
        elif k in ("num", "label"):
            t = torch.as_tensor(v, dtype=torch.float32)
        else:
            t = torch.as_tensor(v)
        out[k] = t.to(device, non_blocking=True)
    return out


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DistributedDataParallel sees the whole forward of a step (a loss_fn may
    call any method of the model, e.g. ``forward_both``, which a DDP wrapper of the bare model would not sync)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor], step: int):
        return self.loss_fn(self.model, batch, step)


def _rank_batches(table: EncodedTable, idx_iter: Iterator[np.ndarray | slice]) -> Iterator[dict[str, np.ndarray]]:
    """The batches of :func:`iter_batches` for given row selections (one gather per array per batch)."""
    for idx in idx_iter:
        b = table.take(idx)
        yield {"cat": b.cat, "num": b.num, "label": b.label, "user_id": b.user_id, "item_id": b.item_id,
               "request_id": b.request_id, **b.extra}


def _check_table(table: EncodedTable, what: str) -> None:
    if len(table) == 0:
        raise ValueError(f"fit: the {what} table is empty")
    y = table.label
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"fit: the {what} table's label must be 0/1, found {y[~np.isin(y, (0, 1))][0]!r}")


def fit(model: nn.Module, train: EncodedTable, valid: EncodedTable, cfg: TrainConfig,
        loss_fn: LossFn | None = None, ckpt_dir: str | Path | None = None, train_shard: bool = False,
        label: str = "fit") -> FitResult:
    """Train ``model`` on ``train``, early-stopping on the AUC of ``model(cat, num)`` on ``valid``.

    label: what the progress bar and the log lines call the model ("teacher": "teacher epoch 1/2").

    On return the model holds the best validated weights; with ``ckpt_dir`` they are also saved there as
    ``model.pt`` (cascade.artifacts.save_torch) with a ``manifest.json`` (configs, step, validation metrics).
    Under an initialised torch.distributed group this is data-parallel training (see the module docstring;
    ``cfg.batch_size`` is then per rank, ``train_shard`` says whether ``train`` is this rank's rows only).
    """
    _check_table(train, "train")
    _check_table(valid, "valid")
    if len(np.unique(valid.label)) < 2:
        raise ValueError("fit: the valid table needs both clicks and non-clicks to compute AUC")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but torch sees no CUDA device")
    loss_fn = loss_fn or default_loss
    ddp = D.is_distributed()
    if ddp and cfg.min_steps_per_epoch is not None:
        raise ValueError("fit: TrainConfig.min_steps_per_epoch is not supported under torch.distributed (set "
                         "batch_size per rank instead)")
    env = D.current_env()
    if ddp and (cfg.device == "cuda") != (env.backend == "nccl"):
        raise ValueError(f"fit: TrainConfig.device={cfg.device!r} does not match the process group's backend "
                         f"{env.backend!r} (use 'cuda' with nccl, 'cpu' with gloo)")
    device = torch.device(env.device if ddp else cfg.device)
    model.to(device)
    _mark_sparse(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    rng = np.random.default_rng([cfg.seed, env.rank] if train_shard else cfg.seed)
    batch_size = cfg.batch_size
    if cfg.min_steps_per_epoch is not None:
        batch_size = max(2, min(cfg.batch_size, len(train) // cfg.min_steps_per_epoch))
        if batch_size < cfg.batch_size:
            log.info("%s: batches of %d rows instead of %d, so that an epoch of %d train rows takes at least %d "
                     "steps (min_steps_per_epoch)", label, batch_size, cfg.batch_size, len(train),
                     cfg.min_steps_per_epoch)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    step_model: nn.Module = _LossModule(model, loss_fn)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a loss_fn may leave parts of the model out of a step's graph (e.g. a hint
        # projection whose term is off); without it DDP fails at the next step, still waiting for their
        # gradients. It costs one graph traversal per step. The parameters are broadcast from rank 0 here, so
        # every rank starts from rank 0's initialisation.
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None,
                                             find_unused_parameters=True)
        if train_shard:  # full batches only, the same count on every rank
            steps_per_epoch = D.all_reduce_min_int(len(train) // cfg.batch_size)
            if steps_per_epoch == 0:
                raise ValueError(f"fit: some rank's train shard has fewer than batch_size={cfg.batch_size} rows")
        else:
            steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * env.world_size))
    if cfg.compile:  # the step's forward + loss; the model itself (validation, later scoring) stays eager
        step_model = torch.compile(step_model)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None

    with torch_threads(cfg.num_threads):  # probed on the threads it trains on
        amp = resolve_autocast(cfg.autocast, device.type, largest_gemm(model, batch_size), what=label)
    result = FitResult(best_valid_auc=-math.inf, best_step=0, autocast=amp.to_dict(), batch_size=batch_size)
    best_state: dict[str, torch.Tensor] | None = None
    evals_without_gain = 0
    step, stop = 0, False
    running = RunningMeans()
    shown: dict[str, str] = {}  # the bar's postfix: running train loss, last valid AUC

    validate_s = 0.0

    def validate(epoch: int) -> None:
        nonlocal best_state, evals_without_gain, stop, validate_s
        t_validate = time.perf_counter()
        train_means = D.all_reduce_mean(running.means())
        metrics = evaluate(model, valid, cfg.eval_batch_size) if env.is_main else None
        model.train()
        improved = env.is_main and metrics["auc"] > result.best_valid_auc
        if improved and ckpt_dir is not None:  # rank 0 only; the broadcast below waits for it
            save_checkpoint(model, ckpt_dir, cfg, step, metrics)
        metrics, improved = D.broadcast_object((metrics, improved)) if ddp else (metrics, improved)
        row = {"step": step, "epoch": epoch, **{f"train_{k}": v for k, v in train_means.items()},
               **{f"valid_{k}": v for k, v in metrics.items()}}
        result.history.append(row)
        running.reset()
        log.info("%s step %d epoch %d/%d: %s", label, step, epoch + 1, cfg.epochs,
                 {k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
        shown["valid_auc"] = f"{metrics['auc']:.4f}"
        if improved:
            result.best_valid_auc, result.best_step = metrics["auc"], step
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            evals_without_gain = 0
        else:
            evals_without_gain += 1
            stop = evals_without_gain >= cfg.patience
        validate_s += time.perf_counter() - t_validate

    t_loop = time.perf_counter()
    with torch_threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + env.rank)  # dropout; the global RNG is restored on exit
        bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=not cfg.progress or not env.is_main, desc=label,
                   unit="step", leave=False)
        for epoch in range(cfg.epochs):
            model.train()
            bar.set_description(f"{label} epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            if not ddp:
                batches = iter_batches(train, batch_size, rng)
            elif train_shard:
                batches = _rank_batches(train, (i for _, i in zip(range(steps_per_epoch),
                                                                  batch_indices(len(train), cfg.batch_size, rng))))
            else:
                batches = _rank_batches(train, D.rank_batch_indices(len(train), cfg.batch_size, rng, env.rank,
                                                                    env.world_size))
            for np_batch in batches:
                if len(np_batch["label"]) < 2:  # a 1-row tail batch would break BatchNorm's training statistics
                    continue
                batch = to_tensors(np_batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp.bf16):
                    terms, weights = step_model(batch, step)
                where = f" (the last good checkpoint is in {ckpt_dir})" if ckpt_dir is not None else ""
                _, values = step_on_loss(terms, weights, [optimizer], [model.parameters()], cfg.grad_clip,
                                         f"fit: non-finite loss at step {step}{where}", ddp)
                step += 1
                result.train_samples += len(np_batch["label"])
                running.add(values)
                shown["loss"] = f"{running.sums.get('total', math.nan) / running.n:.4f}"  # mean since the last eval
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if cfg.eval_every_steps is not None and step % cfg.eval_every_steps == 0:
                    validate(epoch)
                    if stop:
                        break
            if stop:
                break
            if cfg.eval_every_steps is None or running.n > 0:
                validate(epoch)
                if stop:
                    break
        bar.close()
    result.train_seconds = time.perf_counter() - t_loop - validate_s
    if best_state is not None:
        model.load_state_dict(best_state)
    log.info("%s: best valid AUC %.5f at step %d", label, result.best_valid_auc, result.best_step)
    return result


def _model_config(model: nn.Module) -> Any:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    return cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)


def save_checkpoint(model: nn.Module, ckpt_dir: str | Path, cfg: TrainConfig, step: int,
                    metrics: Mapping[str, float]) -> Path:
    """Write ``ckpt_dir/model.pt`` (state dict, atomically) then ``manifest.json`` (configs, step, metrics)."""
    ckpt_dir = Path(ckpt_dir)
    save_torch(ckpt_dir / CHECKPOINT, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    write_manifest(ckpt_dir, kind="fit", config={"train": asdict(cfg), "model": _model_config(model)},
                   seed=cfg.seed, inputs={}, outputs=[CHECKPOINT], metrics=dict(metrics), extra={"step": step})
    return ckpt_dir / CHECKPOINT


def load_checkpoint(model: nn.Module, ckpt_dir: str | Path) -> dict:
    """Load ``ckpt_dir/model.pt`` into ``model`` (weights_only=True, sha256 checked); return the manifest."""
    manifest = read_manifest(ckpt_dir, verify=True)
    model.load_state_dict(load_torch(Path(ckpt_dir) / CHECKPOINT))
    return manifest


@torch.no_grad()
def predict(model: nn.Module, table: EncodedTable, batch_size: int = 4096) -> np.ndarray:
    """Logits of ``model(cat, num)`` for every row of ``table``: float32 [N], in row order (eval mode). Batches of
    4,096 rows keep the activations in the CPU cache (faster than large batches; see ``models.scoring.score_pairs``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.inference_mode():
            for b in iter_batches(table, batch_size):
                t = to_tensors({"cat": b["cat"], "num": b["num"]}, device)
                out.append(model(t["cat"], t["num"]).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def score_metrics(y: np.ndarray, logits: np.ndarray, groups: np.ndarray, is_rand: np.ndarray | None = None,
                  probabilities: bool = True) -> dict[str, float]:
    """AUC, GAUC (grouped by ``groups``) and logloss of ``logits``; the same prefixed ``rand_`` on the
    is_rand == 1 slice when that slice has both classes. probabilities=False skips logloss (ranking scores)."""

    def block(mask: np.ndarray | slice) -> dict[str, float]:
        yy, ss = y[mask], logits[mask]
        m = {"auc": float(auc(yy, ss)), "gauc": float(gauc(yy, ss, groups[mask]))}
        if probabilities:
            p = 1.0 / (1.0 + np.exp(-ss.astype(np.float64)))
            m["logloss"] = float(logloss(yy, p))
        return m

    out = block(slice(None))
    if is_rand is not None:
        r = is_rand == 1
        if r.any() and len(np.unique(y[r])) == 2:
            out.update({f"rand_{k}": v for k, v in block(r).items()})
    return out


def evaluate(model: nn.Module, table: EncodedTable, batch_size: int = 4096) -> dict[str, float]:
    """{"auc", "gauc" (by user), "logloss"} of ``model`` on ``table``, plus "rand_*" on its random slice."""
    return score_metrics(table.label, predict(model, table, batch_size), table.user_id, table.is_rand)
