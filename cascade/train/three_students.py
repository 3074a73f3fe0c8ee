"""The one-loop cascade: the ranking teacher and its rank, pre-rank and retrieval students trained in ONE loop.

Zhang Junlin's "one teacher, three students" (with Rocket Launching / double-DNN for the rank student), as opposed
to the pipeline's teacher-first path (teacher, then rank log, then students). Each step takes a batch of training
requests and does, top to bottom:

1. **teacher + rank student** on the batch's impressions (rows of an :class:`EncodedTable`): one shared
   embedding (:class:`~cascade.train.joint.JointRanker`), the teacher's head trained by click BCE exactly as a
   teacher alone would be; the rank student's terms (:func:`cascade.train.joint.student_terms`: BCE + logit KD,
   optionally hint / CR / RCR) on the teacher's outputs detached.
2. **the current teacher scores the batch's candidate lists** (impressed + sampled items, as the rank log does:
   :func:`cascade.distill.ranklog.sample_candidates`) in eval mode under ``torch.no_grad`` and ranks them.
3. **pre-rank and retrieval two-tower students** learn from those lists with the list-wise distillation losses of
   :mod:`cascade.distill.losses`, weighted by their :class:`~cascade.train.students.StudentConfig` (same names and
   convention as :func:`~cascade.train.students.train_student`); the retrieval student also gets the sampled
   softmax with in-batch + uniform corpus negatives and log-Q correction.

Stop-gradient. No student loss may change a teacher parameter: every student term reads teacher outputs
detached (or computed under no_grad), each of the four models has its own optimizer and its own gradient
clipping (a global-norm clip over all parameters would couple them), and the students draw their dropout from
their own per-step seeded RNG stream, so the teacher's random numbers do not depend on the students either.
``ThreeStudentsConfig(teacher_only=True)`` runs the same loop without the students; the teacher it returns is
bitwise equal to the one-loop run's (tests/test_three_students.py checks this).

Shared embeddings (decided by the JointRanker convention and the double-DNN design: the student reuses the
teacher's embeddings frozen):

- the rank student reads the teacher's embedding table, DETACHED (``detach_student_embeddings=True``): it
  reuses the teacher's embeddings frozen and trains its own MLP. (JointRanker's default lets the student's
  losses train the shared table; that would change teacher parameters, which this mode forbids.)
- the two-tower students keep their OWN tables and do not read the teacher's rows. They must stay plain
  :class:`~cascade.models.two_tower.TwoTower` modules that the serving and index code rebuilds from a
  TowerConfig alone; reading the teacher's table would tie the served towers to the teacher at serving time
  and change their input width. What they share with the teacher is its knowledge: the lists it ranks.

Log-Q of the retrieval softmax: the teacher moves during training, so the share p_j of item j among the
positives (the teacher's top-``softmax_topk`` of each list) is a streaming estimate: add-one counts of the
positives drawn so far (Yi et al., RecSys 2019, estimate sampling frequencies from the stream).

Returned models are standalone: the teacher and the rank student are plain :class:`Ranker` modules with their
own copy of the shared embedding rows they read (``load_ranker`` / ``ranker_scorer`` serve them unchanged), the
students plain TwoTower modules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cascade.data.batches import EncodedTable, FeatureSpec
from cascade.distill import losses as L
from cascade.distill.ranklog import _ranks
from cascade.models.ranker import Ranker, RankerConfig
from cascade.models.scoring import score_pairs
from cascade.models.two_tower import TowerConfig, TowerInputs, TwoTower, build_two_tower
from cascade.train.joint import DistillConfig, JointRanker, student_terms
from cascade.train.loop import RunningMeans, step_on_loss
from cascade.train.students import (
    LIST_LOSSES,
    StudentConfig,
    embed_items,
    list_loss_terms,
    sample_one_per_row,
    sampled_softmax_term,
)

log = logging.getLogger(__name__)

#: pair_features(request_rows int64 [B], item_rows int64 [B, L]) -> (cat int64 [B*L, C], num float32 [B*L, M]):
#: the teacher's per-pair features (user + item + context + cross) in the impressions' column layout.
PairFeatures = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]

TOWER_LOSSES = LIST_LOSSES + ("click_bce", "sampled_softmax")


def _default_prerank() -> StudentConfig:
    return StudentConfig(stage="prerank", loss_weights={"pointwise": 1.0, "bpr": 1.0, "lambda_ndcg": 1.0})


def _default_retrieval() -> StudentConfig:
    return StudentConfig(stage="retrieval", loss_weights={"sampled_softmax": 1.0, "pointwise": 1.0, "listnet": 1.0},
                         softmax_positives="teacher_topk")


@dataclass(frozen=True)
class ThreeStudentsConfig:
    """How to train one teacher and its three students together.

    teacher / rank_student: RankerConfigs; they share one embedding, so emb_dim, numeric and sparse must agree
    (sparse=False: the loop uses AdamW). rank_distill: the rank student's terms (w_bce, w_kd, kd, temperature,
    w_hint, w_cr, w_rcr) and the teacher's BCE weight (w_teacher). tower: the size of both two-tower students.
    prerank / retrieval: StudentConfigs, of which the one-loop cascade reads loss_weights, loss_params, relevance,
    softmax_topk, n_uniform_negatives, lr, weight_decay and grad_clip (epochs, batch_size, seed, progress and
    eval_k come from this config: there is one loop); the retrieval student's softmax positives must be
    "teacher_topk" (the current teacher's lists; the one-loop cascade has no separate click-positive sampler).
    lr / weight_decay / grad_clip: AdamW and clipping of the teacher and of the rank student (each clipped on
    its own). epochs; batch_size: requests per step. score_batch_size: pairs per teacher forward when scoring
    candidate lists (4,096 keeps activations in the CPU cache, see models.scoring.score_pairs). teacher_only: train
    the teacher alone in the same loop (same batches, same random numbers): the reference of the stop-gradient
    check (the two-tower students are then returned untrained). seed; progress: tqdm bar.
    """

    teacher: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dcnv2", emb_dim=8, mlp=(128, 64),
                                                                       cross_layers=2, cross_rank=32))
    rank_student: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dnn", emb_dim=8, mlp=(64,),
                                                                            sides=("user", "item", "context")))
    rank_distill: DistillConfig = field(default_factory=lambda: DistillConfig(w_bce=1.0, w_kd=1.0))
    tower: TowerConfig = field(default_factory=TowerConfig)
    prerank: StudentConfig = field(default_factory=_default_prerank)
    retrieval: StudentConfig = field(default_factory=_default_retrieval)
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    epochs: int = 2
    batch_size: int = 256
    score_batch_size: int = 4096
    teacher_only: bool = False
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for k in ("emb_dim", "numeric", "sparse"):
            if getattr(self.teacher, k) != getattr(self.rank_student, k):
                raise ValueError(f"ThreeStudentsConfig: teacher and rank_student share embeddings and need equal {k} "
                                 f"({getattr(self.teacher, k)!r} vs {getattr(self.rank_student, k)!r})")
        if self.teacher.sparse:
            raise ValueError("ThreeStudentsConfig: sparse embeddings are not supported (the loop uses AdamW)")
        if self.rank_distill.w_hint != 0:
            raise ValueError("ThreeStudentsConfig: rank_distill.w_hint is not supported in the one-loop cascade "
                             "(use cascade.train.joint.JointRanker with hint=True)")
        if self.prerank.stage != "prerank" or self.retrieval.stage != "retrieval":
            raise ValueError(f"ThreeStudentsConfig: prerank.stage must be 'prerank' and retrieval.stage 'retrieval', "
                             f"got {self.prerank.stage!r} and {self.retrieval.stage!r}")
        for name, scfg in (("prerank", self.prerank), ("retrieval", self.retrieval)):
            if scfg.weight("sampled_softmax") != 0 and scfg.softmax_positives != "teacher_topk":
                raise ValueError(f"ThreeStudentsConfig: {name}.softmax_positives must be 'teacher_topk' "
                                 "in the one-loop cascade, "
                                 f"got {scfg.softmax_positives!r}")
            if scfg.weight("teacher_softmax") != 0:
                raise ValueError(f"ThreeStudentsConfig: {name} sets 'teacher_softmax', which the one-loop cascade "
                                 "does not train (its sampled_softmax already takes the teacher's top items)")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.score_batch_size < 1:
            raise ValueError(f"ThreeStudentsConfig: lr must be > 0 and epochs, batch_size, score_batch_size >= 1 "
                             f"(got lr={self.lr}, epochs={self.epochs}, batch_size={self.batch_size}, "
                             f"score_batch_size={self.score_batch_size})")


@dataclass
class ThreeStudentsData:
    """The training requests of the one loop, addressed by request row r in [0, R).

    impressions: EncodedTable [N] of the requests' impressions (the teacher's full column layout, labels).
    imp_request_rows int64 [N]: request row of each impression; imp_item_rows int64 [N]: its item row in
    ``inputs``. inputs: TowerInputs whose context rows are the R requests. user_rows int64 [R]: user row of each
    request. candidates int64 [R, L]: item rows of each request's candidate list (impressed + sampled, -1 =
    padding), e.g. from :func:`~cascade.distill.ranklog.sample_candidates`. pair_features: see
    :data:`PairFeatures`.
    """

    impressions: EncodedTable
    imp_request_rows: np.ndarray
    imp_item_rows: np.ndarray
    inputs: TowerInputs
    user_rows: np.ndarray
    candidates: np.ndarray
    pair_features: PairFeatures

    def __post_init__(self) -> None:
        n, r = len(self.impressions), self.inputs.n_requests
        self.imp_request_rows = np.asarray(self.imp_request_rows, dtype=np.int64)
        self.imp_item_rows = np.asarray(self.imp_item_rows, dtype=np.int64)
        self.user_rows = np.asarray(self.user_rows, dtype=np.int64)
        self.candidates = np.asarray(self.candidates, dtype=np.int64)
        if self.imp_request_rows.shape != (n,) or self.imp_item_rows.shape != (n,):
            raise ValueError(f"ThreeStudentsData: imp_request_rows {self.imp_request_rows.shape} and imp_item_rows "
                             f"{self.imp_item_rows.shape} must both be [{n}] (one per impression)")
        if self.user_rows.shape != (r,) or self.candidates.ndim != 2 or self.candidates.shape[0] != r:
            raise ValueError(f"ThreeStudentsData: user_rows {self.user_rows.shape} must be [{r}] and candidates "
                             f"{self.candidates.shape} [{r}, L]: one per request row of inputs")
        for what, a, hi in (("imp_request_rows", self.imp_request_rows, r), ("imp_item_rows", self.imp_item_rows,
                            self.inputs.n_items), ("user_rows", self.user_rows, self.inputs.n_users)):
            if len(a) and (a.min() < 0 or a.max() >= hi):
                raise ValueError(f"ThreeStudentsData: {what} holds "
                                 f"{a.min() if a.min() < 0 else a.max()}, outside [0, {hi})")
        c = self.candidates
        if c.size and (c.min() < -1 or c.max() >= self.inputs.n_items):
            raise ValueError(f"ThreeStudentsData: candidates hold item rows outside [-1, {self.inputs.n_items})")
        if not np.isin(self.impressions.label, (0, 1)).all():
            raise ValueError("ThreeStudentsData: impressions.label must be 0/1")
        # CSR over request rows: impressions of request r are imp_order[imp_start[r]: imp_start[r] + imp_count[r]]
        self._imp_order = np.argsort(self.imp_request_rows, kind="stable")
        self._imp_count = np.bincount(self.imp_request_rows, minlength=r)
        self._imp_start = np.cumsum(self._imp_count) - self._imp_count

    def __len__(self) -> int:
        return self.inputs.n_requests

    def impression_rows(self, request_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Impressions of the given requests: (row indices into ``impressions`` [n], position of each one's request
        in ``request_rows`` [n]); one repeat + arange, no per-request Python."""
        counts = self._imp_count[request_rows]
        pos = np.repeat(np.arange(len(request_rows)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return self._imp_order[self._imp_start[request_rows][pos] + within], pos


@dataclass
class ThreeStudents:
    """The four trained models (standalone, eval mode) and the per-epoch history (mean loss terms, seconds)."""

    teacher: Ranker
    rank_student: Ranker
    prerank: TwoTower
    retrieval: TwoTower
    history: list[dict[str, Any]]


def teacher_ranks(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank 1..n_valid per row (1 = highest logit, ties by slot order), 0 at padding: [B, L] -> int64 [B, L]."""
    return torch.from_numpy(_ranks(logits.numpy(), mask.numpy())).long()  # the rank log's own ranking


@torch.no_grad()
def score_lists(teacher: nn.Module, data: ThreeStudentsData, request_rows: np.ndarray,
                batch_size: int = 4096) -> torch.Tensor:
    """The teacher's logits of the requests' candidate lists: float32 [B, L] (0 at padding), eval mode, no grad.

    Padded slots are scored as item row 0 (as build_rank_log does) and zeroed; the training flag is restored.
    """
    cand = data.candidates[request_rows]
    cat, num = data.pair_features(request_rows, np.maximum(cand, 0))
    if cat.shape[0] != cand.size or num.shape[0] != cand.size:
        raise ValueError(f"pair_features returned {cat.shape[0]} / {num.shape[0]} rows for {cand.size} pairs")
    out = score_pairs(teacher, np.asarray(cat, np.int64), np.asarray(num, np.float32), batch_size)
    return torch.from_numpy(out).reshape(cand.shape).masked_fill(torch.from_numpy(cand < 0), 0.0)


class _TowerStudent:
    """One two-tower student of the one loop: its towers, optimizer, loss weights and log-Q counts."""

    def __init__(self, towers: TwoTower, cfg: StudentConfig, n_items: int) -> None:
        self.towers, self.cfg = towers, cfg
        self.w = {n: cfg.weight(n) for n in TOWER_LOSSES if cfg.weight(n) != 0}
        self.opt = torch.optim.Adam(towers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pos_counts = np.ones(n_items, dtype=np.float64)  # add-one streaming counts of softmax positives

    def step(self, data: ThreeStudentsData, req: np.ndarray, lists: dict[str, torch.Tensor],
             clicks: dict[str, torch.Tensor],
             rng: np.random.Generator, g: torch.Generator, batch_size: int) -> dict[str, float]:
        """One optimizer step on the batch; returns the unweighted terms and "total"."""
        cfg, w, tt, inputs = self.cfg, self.w, self.towers, data.inputs
        u = tt.user_tower(*inputs.user_batch(data.user_rows[req], req))  # [B, d]
        parts: dict[str, torch.Tensor] = {"list": lists["items"].clamp(min=0)}
        if "click_bce" in w:
            parts["click"] = clicks["items"]
        if "sampled_softmax" in w:
            col, has = sample_one_per_row(lists["mask"] & (lists["ranks"] <= cfg.softmax_topk), g)
            pos_rows = torch.nonzero(has).squeeze(1)
            pos_items = lists["items"][has, col[has]]
            parts["pos"] = pos_items
            self.pos_counts += np.bincount(pos_items.numpy(), minlength=len(self.pos_counts))
            if cfg.n_uniform_negatives:
                parts["neg"] = torch.from_numpy(rng.integers(0, inputs.n_items, cfg.n_uniform_negatives))
        emb = embed_items(tt, inputs, parts)  # every item row the batch needs, embedded once

        terms: dict[str, torch.Tensor] = {}
        if any(n in w for n in LIST_LOSSES):
            s = tt.score(u, emb["list"])  # [B, L]
            terms.update(list_loss_terms(s, lists["ranks"], lists["logits"], lists["mask"], cfg, w, g))
        if "click_bce" in w:
            s_click = (u[clicks["pos"]] * emb["click"]).sum(-1) * tt.inv_temperature  # [n_impressions]
            terms["click_bce"] = L.click_bce(s_click, clicks["labels"])
        if "sampled_softmax" in w:
            p = self.pos_counts
            pos_log_q = torch.from_numpy(np.log(batch_size * p[pos_items.numpy()] / p.sum()).astype(np.float32))
            neg_log_q = float(np.log(cfg.n_uniform_negatives / inputs.n_items)) if "neg" in parts else 0.0
            terms["sampled_softmax"] = sampled_softmax_term(tt, u, pos_rows, pos_items, emb["pos"], emb.get("neg"),
                                                            parts.get("neg"), pos_log_q, neg_log_q, cfg)
        _, values = step_on_loss(terms, {n: w[n] for n in terms}, [self.opt], [tt.parameters()], cfg.grad_clip,
                                 f"the one-loop cascade's {cfg.stage} student: non-finite loss")
        return values


def _student_seed(seed: int, step: int, stream: int) -> int:
    """A reproducible per-step seed of a student's dropout stream (not Python's hash: it is salted per process)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def train_three_students(data: ThreeStudentsData, spec: FeatureSpec, cfg: ThreeStudentsConfig) -> ThreeStudents:
    """Train the teacher, the rank student and the pre-rank / retrieval two-tower students in one loop.

    data: the training requests (see :class:`ThreeStudentsData`); spec: the column layout of ``data.impressions`` and of
    ``data.pair_features``' output. Per step (a batch of ``cfg.batch_size`` requests): teacher BCE + rank
    student terms on the batch's impressions, then the updated teacher scores the batch's candidate lists under
    no_grad and each two-tower student takes one step on them (see the module docstring). Reproducible under
    cfg.seed; the caller's global torch RNG is left as it was. Returns standalone models in eval mode and the
    history: one dict per epoch with "epoch", "seconds", "steps" and the mean unweighted terms as
    "<model>/<term>" (model in teacher, rank, prerank, retrieval; "<model>/total" is the weighted sum).
    """
    if len(data) == 0 or len(data.impressions) == 0:
        raise ValueError("train_three_students: no training requests / impressions")
    if data.impressions.spec != spec:
        raise ValueError("train_three_students: data.impressions.spec differs from the given spec")
    seed = cfg.seed
    joint = JointRanker(spec, cfg.teacher, cfg.rank_student, share_embeddings=True, detach_student_embeddings=True,
                        seed=seed)
    teacher, student = joint.teacher, joint.student
    teacher_params = list(teacher.parameters())  # the shared embedding + the teacher's head
    shared = {id(p) for p in joint.embedding.parameters()}
    student_params = [p for p in student.parameters() if id(p) not in shared]
    opt_t = torch.optim.AdamW(teacher_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_s = torch.optim.AdamW(student_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    towers = {}
    if not cfg.teacher_only:
        towers = {"prerank": _TowerStudent(build_two_tower(data.inputs, cfg.tower, seed=seed + 10), cfg.prerank,
                                           data.inputs.n_items),
                  "retrieval": _TowerStudent(build_two_tower(data.inputs, cfg.tower, seed=seed + 11), cfg.retrieval,
                                             data.inputs.n_items)}
    # separate streams: batch order (shared by teacher-only and one-loop runs) vs the students' sampling
    batch_rng = np.random.default_rng([seed, 0])
    student_rng = np.random.default_rng([seed, 1])
    g = torch.Generator().manual_seed(seed + 1)
    imp = data.impressions
    history: list[dict[str, Any]] = []
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the teacher's dropout stream
        for epoch in range(cfg.epochs):
            joint.train()
            for st in towers.values():
                st.towers.train()
            t0 = time.perf_counter()
            running = RunningMeans()
            order = batch_rng.permutation(len(data))
            for s in tqdm(range(0, len(data), cfg.batch_size), disable=not cfg.progress,
                          desc=f"one-loop epoch {epoch}"):
                req = order[s:s + cfg.batch_size]
                rows, pos = data.impression_rows(req)
                if len(rows) < 2:  # a 1-row batch would break BatchNorm's training statistics
                    continue
                cat, num = torch.from_numpy(imp.cat[rows]), torch.from_numpy(imp.num[rows])
                y = torch.from_numpy(imp.label[rows].astype(np.float32))

                # 1. teacher (+ rank student on the shared embedding, read detached)
                fields, dense = joint.embedding(cat, num)
                t_logit, t_hidden = teacher.head(cat, num, *teacher.select(fields, dense))
                terms = {"teacher/bce": L.click_bce(t_logit, y)}
                weights = {"teacher/bce": cfg.rank_distill.w_teacher}
                if not cfg.teacher_only:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_student_seed(seed, step, 0))  # the students' own dropout stream
                        s_logit, s_hidden = student.head(cat, num, *student.select(fields.detach(), dense.detach()))
                    s_terms, s_w = student_terms(s_logit, s_hidden, t_logit.detach(), t_hidden.detach(), y, None,
                                                 cfg.rank_distill, step)
                    terms.update({f"rank/{k}": v for k, v in s_terms.items()})
                    weights.update({f"rank/{k}": v for k, v in s_w.items()})
                # each model clipped on its own: a joint norm would couple them
                _, values = step_on_loss(terms, weights, [opt_t, opt_s], [teacher_params, student_params],
                                         cfg.grad_clip, f"the one-loop cascade: non-finite loss at step {step}")
                values.pop("total")
                values["teacher/total"] = values["teacher/bce"] * cfg.rank_distill.w_teacher
                if not cfg.teacher_only:
                    values["rank/total"] = sum(values[f"rank/{k}"] * s_w[k] for k in s_terms)

                # 2. the current teacher ranks the batch's candidate lists; 3. the two-tower students learn them
                if towers:
                    t_lists = score_lists(teacher, data, req, cfg.score_batch_size)
                    cand = torch.from_numpy(data.candidates[req])
                    mask = cand >= 0
                    lists = {"items": cand, "mask": mask, "logits": t_lists, "ranks": teacher_ranks(t_lists, mask)}
                    clicks = {"items": torch.from_numpy(data.imp_item_rows[rows]), "pos": torch.from_numpy(pos),
                              "labels": y}
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_student_seed(seed, step, 1))
                        for name, st in towers.items():
                            for k, v in st.step(data, req, lists, clicks, student_rng, g, cfg.batch_size).items():
                                values[f"{name}/{k}"] = v
                running.add(values)
                step += 1
            rec: dict[str, Any] = {"epoch": epoch, "seconds": time.perf_counter() - t0, "steps": running.n}
            rec.update(sorted(running.means().items()))
            log.info("one-loop cascade epoch %d: %s", epoch, {k: round(v, 5) for k, v in rec.items() if k != "epoch"})
            history.append(rec)
    joint.eval()
    out_teacher, out_student = teacher.standalone().eval(), student.standalone().eval()
    pre = towers["prerank"].towers.eval() if towers else build_two_tower(data.inputs, cfg.tower, seed=seed + 10).eval()
    ret = towers["retrieval"].towers.eval() if towers else build_two_tower(data.inputs, cfg.tower,
                                                                           seed=seed + 11).eval()
    return ThreeStudents(out_teacher, out_student, pre, ret, history)
