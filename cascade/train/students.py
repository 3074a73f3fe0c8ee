"""Training the two-tower pre-rank and retrieval students from the rank log and / or click labels.

One explicit loop (:func:`train_student`): per batch of requests, embed the users (user + context tower) and
every item the batch touches (one item-tower forward over the batch's distinct items, :func:`embed_items`), score
the teacher's candidate lists, compute the weighted loss terms of :mod:`cascade.distill.losses`, and take the
training loops' one optimizer step (:func:`cascade.train.loop.step_on_loss`).

Loss terms (names of :data:`LOSS_NAMES`; a term runs only with a non-zero weight):

- on the teacher's candidate lists (need a :class:`~cascade.distill.ranklog.RankLog`): ``pointwise`` (top-K
  weighted BCE), ``bpr`` (pairs), ``lambda_ndcg`` / ``approx_ndcg`` (NDCG with graded relevance from the
  teacher, ``StudentConfig.relevance``), ``listnet`` (softmax KL), ``logit_mse``;
- ground truth (need :class:`ClickLists`): ``click_bce`` on the impressed items;
- ``sampled_softmax``: the retrieval student ranks the whole corpus, so it also sees corpus negatives: each
  request's positive (one clicked item, or one of the teacher's top ``softmax_topk`` when
  ``softmax_positives="teacher_topk"``) against the other requests' positives (in-batch) and
  ``n_uniform_negatives`` uniform corpus items, with log-Q correction. q is in "expected copies per batch"
  units so the two negative sources are comparable: an in-batch positive j appears about B * p_j times, where
  p_j is j's share of all training positives (add-one smoothed); a uniform item M / I times;
- ``teacher_softmax``: the same sampled softmax with one of the teacher's top ``softmax_topk`` as the positive,
  next to a ``sampled_softmax`` on clicks (distillation of the teacher's corpus-wide choice).

Ground truth and distillation: ``click_bce`` and a ``sampled_softmax`` on clicks are the ground-truth terms
(:func:`is_ground_truth`); every other term distils the teacher, and ``StudentConfig.distill_scale`` multiplies
their weights, so scale 0 is the ground-truth-only student (it needs no rank log) and the pipeline chooses the
scale on validation outcomes. ``train_student(trusted=...)`` limits distillation to the requests whose teacher
lists are trusted (confidence-aware distillation: the students step trusts a list where the teacher ordered
that request's impressed items at least as well as chance).

Data parallel (``torchrun``; see :mod:`cascade.distributed`): under an initialised torch.distributed
group, :func:`train_student` wraps the towers and the loss terms in one DistributedDataParallel module (gradients
averaged over ranks after every backward). Every rank holds the whole rank log / click lists and draws the same
seeded permutation of the requests; rank r trains on its block of ``cfg.batch_size`` requests of each global
batch of ``world * cfg.batch_size`` (``distributed.rank_batch_indices``), so all ranks take the same number of
steps and stop together. What equals a single-process run with batch ``world * cfg.batch_size``:

- terms that are means over requests or list entries with no sampling (``lambda_ndcg``, ``approx_ndcg``,
  ``listnet``, ``pointwise`` without ``tail_samples``, ``logit_mse`` and ``click_bce``) give the same step up to
  float summation order, when every request of a batch has the same number of real entries (a mean over
  entries weights a rank's entries by its share of the global batch's entries, DDP by 1 / world);
- ``bpr`` pairs, ``tail_samples`` and softmax positives / uniform negatives are drawn per rank (rank 0 with the
  single-process seed), so they differ from one process's draws;
- ``sampled_softmax``'s in-batch negatives are PER RANK: each request's positive competes with the other
  positives of its rank's batch (``batch_size - 1`` of them, not ``world * batch_size - 1``) plus the uniform
  negatives, and log-Q counts copies in a batch of ``cfg.batch_size``. It is a different (smaller-pool) loss
  by design: gathering every rank's item embeddings would need an all-gather with gradient.

Validation runs on rank 0 and its numbers are broadcast (every rank returns the same history; the logged loss
terms are means over ranks). ``train_student`` writes nothing; callers save on rank 0. Under torch.distributed the
students train on the CPU ranks; under an NCCL group (a GPU job) their gradients go through a gloo subgroup.

Device: ``StudentConfig.device`` ("cuda" in a pipeline run with ``--device cuda``) holds the towers, the batches and
the sampling generator; the side tables stay in host memory and each batch's rows are copied over.

Not here: the one-loop cascade ("one teacher, three students"), in which the students learn from the lists of a teacher
still in training (cascade/train/three_students.py; it reuses this module's loss dispatch conventions).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cascade import distributed as D
from cascade.arrays import distinct, pad_by_row, topk_rows
from cascade.config import FieldError, at_least, nonnegative, positive, require
from cascade.distill import losses as L
from cascade.distill.ranklog import RankLog
from cascade.eval.metrics import mean_recall_at_k, ndcg_at_k
from cascade.machine import AUTOCAST, largest_gemm, resolve_autocast
from cascade.models.two_tower import TowerInputs, TwoTower
from cascade.train.loop import RunningMeans, step_on_loss

log = logging.getLogger(__name__)

LIST_LOSSES = ("pointwise", "bpr", "lambda_ndcg", "approx_ndcg", "listnet", "logit_mse")
LOSS_NAMES = LIST_LOSSES + ("click_bce", "sampled_softmax", "teacher_softmax")
SOFTMAX_TERMS = ("sampled_softmax", "teacher_softmax")
# after_epoch(epoch, towers) -> (fields for the epoch's history dict, stop training now)
AfterEpoch = Callable[[int, TwoTower], tuple[dict[str, Any], bool]]
STAGES = ("prerank", "retrieval")
_LOSS_FN = {
    "pointwise": L.pointwise_topk_loss, "bpr": L.bpr_pairwise_loss, "lambda_ndcg": L.lambda_ndcg_loss,
    "approx_ndcg": L.approx_ndcg_loss, "listnet": L.listnet_kl_loss, "logit_mse": L.logit_mse,
    "click_bce": L.click_bce,
}
# arguments the loop fills in itself; everything else of a loss's signature may be set in loss_params
_FILLED = {"student", "teacher_rank", "teacher_logits", "teacher", "mask", "relevance", "generator", "logits",
           "labels"}
_SOFTMAX_PARAMS = {"in_batch"}


def _default_weights() -> dict[str, float]:
    return {"pointwise": 1.0, "bpr": 1.0, "lambda_ndcg": 1.0}


@dataclass(frozen=True)
class StudentConfig:
    """How to train a two-tower student.

    stage: "prerank" (learns the teacher's order on candidate lists) or "retrieval" (also needs
    ``sampled_softmax`` for corpus negatives). loss_weights: term name -> weight (names in LOSS_NAMES).
    loss_params: term name -> keyword arguments of that loss (checked against its signature).
    relevance: keyword arguments of ``graded_relevance`` for the NDCG terms. softmax_positives: "clicks" or
    "teacher_topk" (of ``sampled_softmax``); softmax_topk: K of teacher_topk (and of ``teacher_softmax``).
    n_uniform_negatives: corpus negatives per batch. distill_scale: multiplies the weight of every distillation
    term (not of the ground-truth terms, :func:`is_ground_truth`).
    epochs, lr, weight_decay, batch_size (requests per batch), grad_clip (max global norm, None = off), eval_k
    (K of the validation teacher-recall), seed, progress (tqdm bar), device ("cpu" or "cuda": where the towers
    train; the sampled pairs and negatives are drawn on it, so a CUDA run draws other samples than a CPU one).
    autocast: the towers' training forward under bfloat16 autocast, as :class:`cascade.train.loop.TrainConfig`'s
    ("auto": bf16 only where the CPU runs it natively and the towers' largest GEMM probes >= 1.25x faster; the
    loss terms and the optimizer stay float32).
    """

    stage: str = "prerank"
    loss_weights: Mapping[str, float] = field(default_factory=_default_weights)
    loss_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    relevance: Mapping[str, Any] = field(default_factory=lambda: {"mode": "rank_buckets"})
    softmax_positives: str = "clicks"
    softmax_topk: int = 10
    n_uniform_negatives: int = 256
    distill_scale: float = 1.0
    epochs: int = 5
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    grad_clip: float | None = 5.0
    eval_k: int = 10
    seed: int = 0
    progress: bool = False
    device: str = "cpu"
    autocast: str | None = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"StudentConfig: device {self.device!r} must be 'cpu' or 'cuda'")
        require(self, "autocast", self.autocast is None or self.autocast in AUTOCAST,
                f"must be one of {AUTOCAST} (None: 'off')")
        if self.stage not in STAGES:
            raise ValueError(f"StudentConfig: stage {self.stage!r} is not one of {STAGES}")
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"StudentConfig: unknown loss name(s) {unknown} in loss_weights; known: {LOSS_NAMES}")
        require(self, "distill_scale", nonnegative(self.distill_scale), "must be a finite number >= 0")
        for name, w in self.loss_weights.items():
            if not nonnegative(w):
                raise FieldError(type(self).__name__, f"loss_weights.{name}", w, "must be a finite number >= 0")
        if not any(self.weight(n) != 0 for n in self.loss_weights):
            raise ValueError("StudentConfig: every loss weight is 0 (or none is given)")
        for name, params in self.loss_params.items():
            if name not in LOSS_NAMES:
                raise ValueError(f"StudentConfig: unknown loss name {name!r} in loss_params; known: {LOSS_NAMES}")
            allowed = (set(inspect.signature(L.sampled_softmax_loss).parameters) & _SOFTMAX_PARAMS
                       if name in SOFTMAX_TERMS else set(inspect.signature(_LOSS_FN[name]).parameters) - _FILLED)
            bad = sorted(set(params) - allowed)
            if bad:
                raise ValueError(f"StudentConfig: loss_params[{name!r}] has unknown key(s) {bad}; "
                                 f"allowed: {sorted(allowed)}")
        bad = sorted(set(self.relevance) - (set(inspect.signature(L.graded_relevance).parameters) - _FILLED))
        if bad:
            raise ValueError(f"StudentConfig: relevance has unknown key(s) {bad}")
        if self.softmax_positives not in ("clicks", "teacher_topk"):
            raise ValueError(f"StudentConfig: softmax_positives {self.softmax_positives!r} is not "
                             "'clicks' or 'teacher_topk'")
        if self.stage == "retrieval" and not (self.weight("sampled_softmax") or self.weight("teacher_softmax")):
            raise ValueError("StudentConfig: stage 'retrieval' ranks the whole corpus and needs a non-zero "
                             "'sampled_softmax' or 'teacher_softmax' weight (in-batch + uniform corpus negatives)")
        for name in ("epochs", "batch_size", "softmax_topk", "eval_k"):
            require(self, name, at_least(getattr(self, name), 1), "must be an integer >= 1")
        require(self, "n_uniform_negatives", at_least(self.n_uniform_negatives, 0), "must be an integer >= 0")
        require(self, "lr", positive(self.lr), "must be a finite number > 0")
        require(self, "weight_decay", nonnegative(self.weight_decay), "must be a finite number >= 0")
        require(self, "grad_clip", self.grad_clip is None or positive(self.grad_clip),
                "must be a finite number > 0 (the max gradient norm) or None (no clipping)")
        require(self, "seed", at_least(self.seed, 0), "must be an integer >= 0")

    def weight(self, name: str) -> float:
        """The effective weight of term ``name``: its loss weight, times distill_scale for a distillation term."""
        w = float(self.loss_weights.get(name, 0.0))
        return w if is_ground_truth(self, name) else w * self.distill_scale


def is_ground_truth(cfg: StudentConfig, name: str) -> bool:
    """Whether loss term ``name`` learns from the logged clicks (not from the teacher): ``click_bce``, and
    ``sampled_softmax`` with click positives."""
    return name == "click_bce" or (name == "sampled_softmax" and cfg.softmax_positives == "clicks")


@dataclass
class ClickLists:
    """Ground truth per request: the impressed items and their click labels, padded.

    request_rows [R] int64 (rows of TowerInputs' context arrays), user_rows [R] int64, items [R, L] int64 item
    rows (-1 = padding), labels [R, L] float32 in [0, 1] (0 at padding).
    """

    request_rows: np.ndarray
    user_rows: np.ndarray
    items: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        r = len(self.request_rows)
        if self.user_rows.shape != (r,) or self.items.ndim != 2 or self.items.shape[0] != r \
                or self.labels.shape != self.items.shape:
            raise ValueError(f"ClickLists: shapes do not agree: request_rows {self.request_rows.shape}, user_rows "
                             f"{self.user_rows.shape}, items {self.items.shape}, labels {self.labels.shape}")
        if len(distinct(self.request_rows)) != r:
            raise ValueError("ClickLists: a request row appears twice")

    @property
    def mask(self) -> np.ndarray:
        return self.items >= 0

    def __len__(self) -> int:
        return len(self.request_rows)

    @classmethod
    def from_long(cls, request_rows: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray,
                  labels: np.ndarray) -> ClickLists:
        """From one row per impression (all [N]), in their order within a request: a padded scatter into
        [R, L_max] (:func:`cascade.arrays.pad_by_row`); a request's user is that of its first row."""
        uniq, first, key = np.unique(np.asarray(request_rows, np.int64), return_index=True, return_inverse=True)
        items = pad_by_row(key, np.asarray(item_rows, np.int64), len(uniq), fill=-1)
        lab = pad_by_row(key, np.asarray(labels, np.float32), len(uniq), fill=0.0)
        return cls(uniq, np.asarray(user_rows, np.int64)[first], items, lab)


def _positive_log_q(pos_items: np.ndarray, n_items: int, batch_size: int) -> torch.Tensor:
    """log of the expected number of copies of each item among a batch's positives: log(B * p_j). [I]."""
    counts = np.bincount(pos_items, minlength=n_items).astype(np.float64) + 1.0  # add-one: unseen items stay finite
    return torch.from_numpy(np.log(batch_size * counts / counts.sum()).astype(np.float32))


def sample_one_per_row(valid: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly chosen True column per row of valid [B, L]: (column [B], row has one [B] bool)."""
    keys = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, -1.0)
    return keys.argmax(dim=1), valid.any(dim=1)


KD_TEMPERATURE_TERM = "listnet"  # the towers' distillation term with a softmax temperature (keyword "temperature")


def kd_temperature(cfg: StudentConfig) -> float | None:
    """The softmax temperature of ``cfg``'s KD_TEMPERATURE_TERM (1 unless loss_params sets it), None where that term
    is not weighted."""
    if not cfg.loss_weights.get(KD_TEMPERATURE_TERM, 0.0):
        return None
    return float(loss_params(cfg, KD_TEMPERATURE_TERM).get("temperature", 1.0))


def with_kd_temperature(cfg: StudentConfig, temperature: float) -> StudentConfig:
    """``cfg`` with its KD_TEMPERATURE_TERM, where weighted, at softmax ``temperature``."""
    if not cfg.loss_weights.get(KD_TEMPERATURE_TERM, 0.0):
        return cfg
    params = {k: dict(v) for k, v in cfg.loss_params.items()}
    params.setdefault(KD_TEMPERATURE_TERM, {})["temperature"] = float(temperature)
    return replace(cfg, loss_params=params)


def loss_params(cfg: StudentConfig, name: str) -> dict[str, Any]:
    """The extra keyword arguments of loss ``name`` from ``cfg.loss_params`` (a copy; {} when none)."""
    return dict(cfg.loss_params.get(name, {}))


def list_loss_terms(s: torch.Tensor, ranks: torch.Tensor, t_logit: torch.Tensor, mask: torch.Tensor, cfg: StudentConfig,
                    w: dict[str, float], g: torch.Generator) -> dict[str, torch.Tensor]:
    """The list losses weighted in ``w`` on student scores s [B, L] against the teacher's ranks / logits [B, L]
    (mask [B, L]); sampled terms draw from ``g`` in a fixed order. Shared by train_student and the one-loop cascade."""
    terms: dict[str, torch.Tensor] = {}
    if "pointwise" in w:
        terms["pointwise"] = L.pointwise_topk_loss(s, ranks, mask, generator=g, **loss_params(cfg, "pointwise"))
    if "bpr" in w:
        terms["bpr"] = L.bpr_pairwise_loss(s, ranks, mask, generator=g, **loss_params(cfg, "bpr"))
    if "lambda_ndcg" in w or "approx_ndcg" in w:
        rel = L.graded_relevance(teacher_rank=ranks, teacher_logits=t_logit, mask=mask, **cfg.relevance)
        if "lambda_ndcg" in w:
            terms["lambda_ndcg"] = L.lambda_ndcg_loss(s, rel, mask, **loss_params(cfg, "lambda_ndcg"))
        if "approx_ndcg" in w:
            terms["approx_ndcg"] = L.approx_ndcg_loss(s, rel, mask, **loss_params(cfg, "approx_ndcg"))
    if "listnet" in w:
        terms["listnet"] = L.listnet_kl_loss(s, t_logit, mask, **loss_params(cfg, "listnet"))
    if "logit_mse" in w:
        terms["logit_mse"] = L.logit_mse(s, t_logit, mask)
    return terms


def embed_items(towers: TwoTower, inputs: TowerInputs, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Item-tower embeddings of several item-row tensors of one batch (e.g. "list" [B, L], "pos" [P], "neg" [M]),
    each distinct row embedded once: {name: [*shape, d]} in the order of ``parts``."""
    flat = torch.cat([p.reshape(-1) for p in parts.values()])
    uniq, inv = torch.unique(flat, return_inverse=True)
    # index_select: its backward (index_add_) sums in a fixed order; "[inv]" accumulates with several threads in
    # a racy order, so 2-thread training was not bit-reproducible under a seed
    xs = [x.to(flat.device) for x in inputs.item_batch(uniq.cpu().numpy())]
    v_all = towers.item_tower(*xs).index_select(0, inv)  # [n_flat, d]
    emb, start = {}, 0
    for k, p in parts.items():
        emb[k] = v_all[start:start + p.numel()].reshape(*p.shape, -1)
        start += p.numel()
    return emb


def sampled_softmax_term(towers: TwoTower, u: torch.Tensor, pos_rows: torch.Tensor, pos_items: torch.Tensor,
                         pos_emb: torch.Tensor, neg_emb: torch.Tensor | None, neg_items: torch.Tensor | None,
                         pos_log_q: torch.Tensor, neg_log_q: float, cfg: StudentConfig,
                         name: str = "sampled_softmax") -> torch.Tensor:
    """The retrieval student's sampled softmax: each batch row in ``pos_rows`` (of u [B, d]) against its positive
    item (``pos_emb`` [P, d]), the other rows' positives (in-batch) and ``neg_items`` (uniform corpus negatives,
    ``neg_emb``), log-Q corrected by ``pos_log_q`` [P] and ``neg_log_q``. A batch without a positive gives a zero
    that keeps the graph."""
    if pos_rows.numel() == 0:
        return u.sum() * 0.0
    # the towers' temperature goes into the user side, so a learned temperature gets its gradient
    return L.sampled_softmax_loss(
        u[pos_rows] * towers.inv_temperature, pos_emb, neg_emb, pos_log_q=pos_log_q,
        neg_log_q=torch.full((len(neg_items),), neg_log_q, device=u.device) if neg_items is not None else None,
        temperature=1.0, pos_item_ids=pos_items, neg_item_ids=neg_items, **loss_params(cfg, name))


class _StudentStep(nn.Module):
    """The towers plus one batch's loss terms as one module: DistributedDataParallel must see the whole forward of
    a step (user tower, item tower, scores, losses), as ``loop._LossModule`` does for ``fit``.

    forward(b) -> terms {name: scalar tensor}; b is a batch of :func:`_rank_batches`.
    ``g`` (torch) and ``rng`` (numpy) draw the sampled pairs, tail negatives, softmax positives and uniform
    corpus negatives; the step consumes them in a fixed order, so a run is reproducible under its seeds.
    """

    def __init__(self, towers: TwoTower, inputs: TowerInputs, cfg: StudentConfig, w: Mapping[str, float],
                 clicks: ClickLists | None, click_of: np.ndarray | None,
                 pos_log_q: dict[str, torch.Tensor], neg_log_q_value: float, g: torch.Generator,
                 rng: np.random.Generator, device: torch.device, trusted: np.ndarray | None = None) -> None:
        super().__init__()
        self.towers = towers
        self.device = device
        self.inputs, self.cfg, self.w = inputs, cfg, dict(w)
        self.clicks, self.click_of = clicks, click_of
        self.pos_log_q, self.neg_log_q_value = pos_log_q, neg_log_q_value
        self.g, self.rng = g, rng
        self.trusted = trusted  # bool per request row: distil from this request's teacher list

    def forward(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        towers, inputs, cfg, w, g, dev = self.towers, self.inputs, self.cfg, self.w, self.g, self.device
        from_log = "items" in b  # a rank-log batch (else a ClickLists batch)
        req, usr = b["request_rows"].numpy(), b["user_rows"].numpy()
        on_cpu = b
        b = {k: v.to(dev) for k, v in b.items()}
        u = towers.user_tower(*(x.to(dev) for x in inputs.user_batch(usr, req)))  # [B, d]

        # every item row the batch needs, embedded once
        parts: dict[str, torch.Tensor] = {}
        list_mask = None
        if from_log:
            parts["list"] = b["items"].clamp(min=0)
            list_mask = b["mask"]
            if self.trusted is not None:  # distil only from the trusted requests' lists
                list_mask = list_mask & torch.from_numpy(self.trusted[req]).to(dev)[:, None]
        cb = None
        if "click_bce" in w or any(n in w and _positives(cfg, n) == "clicks" for n in SOFTMAX_TERMS):
            cb = {k: v.to(dev) for k, v in _click_batch(self.clicks, on_cpu, self.click_of).items()}
            parts["click"] = cb["items"].clamp(min=0)
        positives = {}
        for name in SOFTMAX_TERMS:
            if name not in w:
                continue
            if _positives(cfg, name) == "clicks":
                col, has = sample_one_per_row((cb["labels"] > 0) & cb["mask"], g)
                positives[name] = (cb["items"][has, col[has]], cb["rows"][has])
            else:
                col, has = sample_one_per_row(list_mask & (b["ranks"] <= cfg.softmax_topk), g)
                positives[name] = (b["items"][has, col[has]], torch.nonzero(has).squeeze(1))
            parts[f"pos_{name}"] = positives[name][0]
        if positives and cfg.n_uniform_negatives:
            parts["neg"] = torch.from_numpy(self.rng.integers(0, inputs.n_items, cfg.n_uniform_negatives)).to(dev)
        emb = embed_items(towers, inputs, parts)

        terms: dict[str, torch.Tensor] = {}
        if from_log and any(n in w for n in LIST_LOSSES):
            s = towers.score(u, emb["list"])  # [B, L]
            terms.update(list_loss_terms(s, b["ranks"], b["logits"], list_mask, cfg, w, g))
        if "click_bce" in w:
            s_click = towers.score(u[cb["rows"]], emb["click"])  # [Bc, Lc]
            terms["click_bce"] = L.click_bce(s_click, cb["labels"], cb["mask"])
        for name, (pos_items, pos_rows) in positives.items():
            # under DDP the in-batch negatives are this rank's own positives (b - 1 of them, not world * b - 1)
            terms[name] = sampled_softmax_term(towers, u, pos_rows, pos_items, emb[f"pos_{name}"], emb.get("neg"),
                                               parts.get("neg"), self.pos_log_q[name][pos_items],
                                               self.neg_log_q_value, cfg, name)
        return terms


def _ddp_wrap(step: _StudentStep, env: D.DistEnv) -> nn.Module:
    """``step`` in DistributedDataParallel on the CPU. Under an NCCL group (a GPU job) the students still train on
    the CPU, so their gradients are averaged over a gloo subgroup of all ranks (created here, on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    group = None
    if env.backend == "nccl":
        import torch.distributed as dist

        group = dist.new_group(backend="gloo")
    # find_unused_parameters: a step may leave parts of the towers out of its graph (a batch without a softmax
    # positive on one rank; a learned temperature with no softmax term). Construction broadcasts rank 0's weights.
    return DistributedDataParallel(step, process_group=group, find_unused_parameters=True)


def _positives(cfg: StudentConfig, name: str) -> str:
    """Where a softmax term's positives come from: "clicks" or "teacher_topk"."""
    return cfg.softmax_positives if name == "sampled_softmax" else "teacher_topk"


def train_student(towers: TwoTower, inputs: TowerInputs, rank_log: RankLog | None, clicks: ClickLists | None,
                  cfg: StudentConfig, valid: RankLog | None = None,
                  trusted: np.ndarray | None = None, label: str | None = None,
                  after_epoch: AfterEpoch | None = None) -> list[dict[str, Any]]:
    """Train ``towers`` in place on ``cfg.device`` (they come back on the CPU). Returns the history: one dict per
    epoch with the mean loss terms ("loss" is the weighted total), "seconds", "autocast" (the dtype the forward ran
    in: "bf16" or "float32"; like "seconds", a fact of the machine), and, when ``valid`` is given, "valid"
    = :func:`evaluate_on_log` of it. label: what the progress bar and the log lines call the student (default:
    its stage).

    Batches are requests of ``rank_log`` when a weighted term needs the teacher's lists (click terms then use
    the clicks of the same request rows, where there are any), else requests of ``clicks``. Reproducible under
    cfg.seed (batch order, sampled pairs / negatives, dropout).

    Data parallel (under an initialised torch.distributed group, e.g. started by ``torchrun``; see the module
    docstring): the towers and the loss are wrapped in DistributedDataParallel; ``cfg.batch_size`` is per rank.
    Writes nothing itself, so the caller saves on rank 0 only (``distributed.is_main()``).

    trusted: bool per request row (the rows of ``inputs``' context arrays): distillation terms learn only from
    these requests' teacher lists (the ground-truth terms from every request); None trusts every list.

    after_epoch(epoch, towers) -> (fields, stop), called after every epoch (``cfg.epochs`` at most; not under
    torch.distributed): ``fields`` go into the epoch's history dict, and ``stop`` ends the training there (e.g.
    early stopping on a validation outcome the caller measures).
    """
    w = {n: cfg.weight(n) for n in LOSS_NAMES if cfg.weight(n) != 0}
    need_log = any(n in w for n in LIST_LOSSES) or any(n in w and _positives(cfg, n) == "teacher_topk"
                                                       for n in SOFTMAX_TERMS)
    need_clicks = "click_bce" in w or any(n in w and _positives(cfg, n) == "clicks" for n in SOFTMAX_TERMS)
    if need_log and rank_log is None:
        raise ValueError(f"train_student: loss term(s) {sorted(w)} need a rank log, got rank_log=None")
    if need_clicks and clicks is None:
        raise ValueError(f"train_student: loss term(s) {sorted(w)} need click labels, got clicks=None")
    driver = rank_log if need_log else clicks
    if driver is None or len(driver) == 0:
        raise ValueError("train_student: no training requests")
    n_items = inputs.n_items
    env, ddp = D.current_env(), D.is_distributed()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("StudentConfig.device='cuda' but torch sees no CUDA device")
    if ddp and after_epoch is not None:
        raise ValueError("train_student: after_epoch is not supported under torch.distributed (every rank would "
                         "have to judge the towers and agree on stopping)")
    if ddp and cfg.device != "cpu":
        raise ValueError("train_student: under torch.distributed the students train on the CPU ranks (gloo); "
                         f"StudentConfig.device={cfg.device!r} is not supported there")
    device = torch.device(cfg.device)
    towers.to(device)
    # rank 0 draws exactly what a single process draws; the batch order (rng's permutation) is the same on every
    # rank, while the sampled negatives / pairs (g, sample_rng) and dropout differ per rank, as they would between
    # the rows of one large batch. In one process sample_rng IS rng: one stream, as before DDP existed.
    g = torch.Generator(device=device).manual_seed(cfg.seed + env.rank)
    rng = np.random.default_rng(cfg.seed)
    sample_rng = np.random.default_rng([cfg.seed, env.rank]) if ddp else rng

    click_of = None  # request row -> index into clicks
    if clicks is not None and driver is rank_log:
        top = int(max(clicks.request_rows.max(initial=-1), rank_log.request_rows.max(initial=-1))) + 1
        click_of = np.full(top, -1, dtype=np.int64)
        click_of[clicks.request_rows] = np.arange(len(clicks))

    pos_log_q, neg_log_q_value = {}, float(np.log(max(cfg.n_uniform_negatives, 1) / n_items))
    for name in SOFTMAX_TERMS:
        if name not in w:
            continue
        if _positives(cfg, name) == "clicks":
            pos = clicks.items[(clicks.labels > 0) & clicks.mask]
        else:
            pos = rank_log.items[rank_log.mask & (rank_log.ranks <= cfg.softmax_topk)]
        if pos.size == 0:
            raise ValueError(f"train_student: {name} has no positives ({_positives(cfg, name)})")
        # per-rank batch: under DDP the in-batch pool is the rank's own batch of cfg.batch_size requests
        pos_log_q[name] = _positive_log_q(pos, n_items, cfg.batch_size).to(device)

    step_model: nn.Module = _StudentStep(towers, inputs, cfg, w, clicks, click_of, pos_log_q,
                                         neg_log_q_value, g, sample_rng, device, trusted)
    if ddp:
        step_model = _ddp_wrap(step_model, env)
    n_batches = -(-len(driver) // (cfg.batch_size * env.world_size))
    label = label or cfg.stage
    shown: dict[str, str] = {}  # the bar's postfix: running loss, last validation
    # dropout draws from torch's global generator: seed it from cfg.seed (+ rank) without touching the caller's state
    amp = resolve_autocast(cfg.autocast, device.type, largest_gemm(towers, cfg.batch_size), what=label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + env.rank)
        opt = torch.optim.Adam(towers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history: list[dict[str, Any]] = []
        for epoch in range(cfg.epochs):
            towers.train()
            t0 = time.perf_counter()
            running = RunningMeans()
            batches = _rank_batches(driver, cfg.batch_size, rng, env.rank, env.world_size)  # world 1: all rows
            bar = tqdm(batches, disable=not cfg.progress or not env.is_main, desc=f"{label} epoch {epoch + 1}/"
                       f"{cfg.epochs}", total=n_batches, unit="batch", leave=False)
            for b in bar:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp.bf16):
                    terms = step_model(b)
                terms = {n: t.float() for n, t in terms.items()}  # the weighted sum and its backward in float32
                _, values = step_on_loss(terms, {n: w[n] for n in terms}, [opt], [towers.parameters()], cfg.grad_clip,
                                         f"train_student: non-finite loss in epoch {epoch}, step {running.n}", ddp)
                running.add(values)
                shown["loss"] = f"{running.sums.get('total', float('nan')) / running.n:.4f}"
                bar.set_postfix(shown, refresh=False)
            means = running.means()
            if ddp:  # every rank took the same number of steps and logs the same terms: the mean over ranks
                means = D.all_reduce_mean(means)
            rec: dict[str, Any] = {"epoch": epoch, "seconds": time.perf_counter() - t0, "autocast": amp.dtype}
            rec.update({("loss" if k == "total" else k): v for k, v in means.items()})
            if valid is not None:
                # rank 0 evaluates (all ranks hold the same weights) and every rank records its numbers
                ev = evaluate_on_log(towers, inputs, valid, k=cfg.eval_k) if env.is_main else None
                rec["valid"] = D.broadcast_object(ev)
                shown.update({f"valid_{k}": f"{v:.4f}" for k, v in rec["valid"].items()})
            stop = False
            if after_epoch is not None:
                fields, stop = after_epoch(epoch, towers)
                rec.update(fields)
            log.info("%s epoch %d/%d: %s", label, epoch + 1, cfg.epochs,
                     {k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items() if k != "epoch"})
            history.append(rec)
            if stop:
                break
    towers.to("cpu")  # trained on cfg.device, handed back where the callers save and serve them
    towers.eval()
    return history


def _rank_batches(driver: RankLog | ClickLists, batch_size: int, rng: np.random.Generator, rank: int,
                  world: int):
    """This rank's block of ``batch_size`` requests of every global batch of ``world * batch_size``
    (:func:`distributed.rank_batch_indices`: the same permutation on every rank); empty tail blocks are skipped on
    every rank alike."""
    for idx in D.rank_batch_indices(len(driver), batch_size, rng, rank, world):
        if len(idx) == 0:
            continue
        if isinstance(driver, RankLog):
            yield driver.tensors(idx)
        else:
            yield {"request_rows": torch.from_numpy(driver.request_rows[idx]),
                   "user_rows": torch.from_numpy(driver.user_rows[idx]), "click_idx": torch.from_numpy(idx)}


def _click_batch(clicks: ClickLists, b: dict[str, torch.Tensor], click_of: np.ndarray | None) -> dict[str,
                                                                                                      torch.Tensor]:
    """The clicks of the batch's requests: rows (positions in the batch that have clicks data) [Bc], items /
    labels / mask [Bc, Lc]."""
    if "click_idx" in b:
        ci = b["click_idx"].numpy()
        rows = np.arange(len(ci))
    else:
        req = b["request_rows"].numpy()
        ci = np.where(req < len(click_of), click_of[np.minimum(req, len(click_of) - 1)], -1)
        rows = np.flatnonzero(ci >= 0)
        ci = ci[rows]
    items = clicks.items[ci]
    return {"rows": torch.from_numpy(rows), "items": torch.from_numpy(items),
            "labels": torch.from_numpy(clicks.labels[ci]), "mask": torch.from_numpy(items >= 0)}


@torch.no_grad()
def student_list_scores(towers: TwoTower, inputs: TowerInputs, rank_log: RankLog,
                        batch_size: int = 1024) -> np.ndarray:
    """The student's scores of the log's candidate lists: float32 [R, L] (-inf at padding), in eval mode."""
    was = towers.training
    towers.eval()
    dev = next(towers.parameters()).device
    out = np.full(rank_log.items.shape, -np.inf, dtype=np.float32)
    try:
        for s in range(0, len(rank_log), batch_size):
            sl = slice(s, s + batch_size)
            u = towers.user_tower(*(x.to(dev) for x in inputs.user_batch(rank_log.user_rows[sl],
                                                                         rank_log.request_rows[sl])))
            items = rank_log.items[sl]
            uniq, inv = np.unique(np.maximum(items, 0), return_inverse=True)
            v = towers.item_tower(*(x.to(dev) for x in inputs.item_batch(uniq)))[
                torch.from_numpy(inv.reshape(items.shape)).to(dev)]
            sc = towers.score(u, v).cpu().numpy()
            out[sl] = np.where(items >= 0, sc, -np.inf)
    finally:
        towers.train(was)
    return out


def evaluate_on_log(towers: TwoTower, inputs: TowerInputs, rank_log: RankLog, k: int = 10) -> dict[str, float]:
    """Teacher-recall@k and NDCG@k of the student's order within the logged candidate lists.

    teacher-recall@k = |teacher's top-k of the list ∩ student's top-k of the list| / k, mean over requests
    (requests with fewer than k candidates are left out); NDCG@k against the teacher's rank-bucket relevance.
    """
    scores = student_list_scores(towers, inputs, rank_log)
    keep = rank_log.mask.sum(1) >= k
    if not keep.any():
        raise ValueError(f"evaluate_on_log: no request has >= {k} candidates")
    items, ranks, scores = rank_log.items[keep], rank_log.ranks[keep], scores[keep]
    t_order = np.argsort(np.where(ranks > 0, ranks, np.iinfo(np.int64).max), axis=1, kind="stable")[:, :k]
    reference = np.take_along_axis(items, t_order, 1)
    retrieved, _ = topk_rows(scores, items, k)
    out = {f"teacher_recall@{k}": mean_recall_at_k(reference, retrieved)}
    rel = L.graded_relevance(teacher_rank=torch.from_numpy(ranks), mask=torch.from_numpy(ranks > 0)).numpy()
    out[f"ndcg@{k}"] = float(np.nanmean(ndcg_at_k(retrieved, items, rel, k)))
    return out
