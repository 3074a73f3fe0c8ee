"""Distillation of the ranking teacher into the rank student: teacher-first, joint on the fly, and PFD.

All three are ``loss_fn`` closures for the one loop in :mod:`cascade.train.loop` (no second loop):

- **teacher-first**: the teacher is trained first and frozen; :class:`DistilledStudent` (student + hint projection)
  trains on ``teacher_first_loss(teacher, cfg)``: w_bce * BCE + w_kd * (logit MSE, or Hinton KD at T) + w_hint *
  hint(student hidden -> Linear -> teacher hidden) + w_cr * CR + w_rcr * RCR. Teacher logits come from the
  frozen teacher on the fly (no grad), or from a precomputed ``teacher_logit`` column of the table's extras.
- **joint** (Rocket Launching, Zhou et al. AAAI 2018; iQIYI's double-DNN): :class:`JointRanker` holds teacher
  and student sharing one embedding layer (optionally the student reads it detached, i.e. frozen for it);
  ``joint_loss(cfg)`` = w_teacher * BCE(y, f_t) + the student terms above, where every distillation term uses
  the teacher's outputs ``.detach()``-ed, so the teacher's head gets exactly the gradient of its own BCE.
- **PFD** (Xu et al. KDD 2020): a JointRanker whose teacher also reads the "privileged" side, trained with
  ``DistillConfig(pfd_lambda=l, warmup_steps=N)``: (1 - l) * L_s(y, f_s) + l * L_d(f_t, f_s) + L_t(y, f_t), l = 0
  for the first N steps. L_d is the paper's: cross-entropy of the student against the teacher's probability
  (``kd="hinton"`` at T = 1, the default when pfd_lambda is set). Logit MSE (``kd="mse"``) is offered, but it
  chases a privileged teacher's near-certain logits (large when post-click fields almost give the label away)
  and cost the student AUC and calibration on the world (BENCHMARKS.md; benchmarks/rank_table.py ``--pfd-kd``).
  ``private_student_columns=("user_id",)`` gives the student its own user-id table (the paper's best setting).
  :func:`pfd_configs` builds PFD, PFD+MD (larger teacher) and LUPI (teacher on the privileged side only) as
  configurations of the same code.

The joint module's ``forward`` returns the STUDENT's logits, so ``fit`` early-stops on the served model's AUC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from cascade.config import at_least, finite, nonnegative, positive, require
from cascade.data.batches import FeatureSpec
from cascade.data.schema import SIDES
from cascade.distill.losses import (
    click_bce,
    confidence_ranking_loss,
    hint_loss,
    hinton_kd_loss,
    logit_mse,
    relative_confidence_ranking_loss,
)
from cascade.models.layers import FeatureEmbedding
from cascade.models.ranker import Ranker, RankerConfig

KD_KINDS = ("mse", "hinton")


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the student's loss terms (and, for joint training, the teacher's own BCE).

    kd: "mse" (logit MSE) or "hinton" (soft targets at ``temperature``, T^2-scaled); None (default) stays None
    and :attr:`kd_loss` picks "hinton" when pfd_lambda is set (PFD's L_d is the cross-entropy against the
    teacher's probability) and "mse" otherwise, so a config merged over this one re-decides it.
    pfd_lambda: when set, the student's BCE weight is (1 - l) and its KD weight l, with l = 0 for the first
    ``warmup_steps`` steps (w_bce and w_kd are then ignored). w_teacher: weight of BCE(y, f_t) in joint training.
    """

    w_bce: float = 1.0
    w_kd: float = 0.0
    kd: str | None = None
    temperature: float = 1.0
    w_hint: float = 0.0
    w_cr: float = 0.0
    w_rcr: float = 0.0
    w_teacher: float = 1.0
    pfd_lambda: float | None = None
    warmup_steps: int = 0

    @property
    def soft_target_temperature(self) -> float | None:
        """The temperature of the KD term where it has one (Hinton soft targets, weighted or under PFD), else None."""
        return self.temperature if self.kd_loss == "hinton" and (self.w_kd or self.pfd_lambda is not None) else None

    def __post_init__(self) -> None:
        if self.kd is not None and self.kd not in KD_KINDS:
            raise ValueError(f"DistillConfig: kd {self.kd!r} is not one of {KD_KINDS}")
        require(self, "temperature", positive(self.temperature), "must be a finite number > 0")
        for name in ("w_bce", "w_kd", "w_hint", "w_cr", "w_rcr", "w_teacher"):
            require(self, name, nonnegative(getattr(self, name)), "must be a finite number >= 0")
        lam = self.pfd_lambda
        require(self, "pfd_lambda", lam is None or (finite(lam) and 0.0 <= lam <= 1.0), "must be in [0, 1] or None")
        require(self, "warmup_steps", at_least(self.warmup_steps, 0), "must be an integer >= 0")

    @property
    def kd_loss(self) -> str:
        """The KD term in use: ``kd``, or its default ("hinton" for PFD, "mse" otherwise) when kd is None."""
        if self.kd is not None:
            return self.kd
        return "hinton" if self.pfd_lambda is not None else "mse"

    def student_weights(self, step: int) -> dict[str, float]:
        """Weights of the student's terms at optimizer step ``step`` (only the terms that are switched on)."""
        if self.pfd_lambda is not None:
            lam = 0.0 if step < self.warmup_steps else self.pfd_lambda
            w = {"bce": 1.0 - lam, "kd": lam}
        else:
            w = {"bce": self.w_bce, "kd": self.w_kd}
        w.update(hint=self.w_hint, cr=self.w_cr, rcr=self.w_rcr)
        on = {"bce": True, "kd": self.pfd_lambda is not None or self.w_kd != 0,
              "hint": self.w_hint != 0, "cr": self.w_cr != 0, "rcr": self.w_rcr != 0}
        return {k: v for k, v in w.items() if on[k]}


def student_terms(s_logit: torch.Tensor, s_hidden: torch.Tensor | None, t_logit: torch.Tensor,
                  t_hidden: torch.Tensor | None, label: torch.Tensor, projection: nn.Module | None,
                  cfg: DistillConfig, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The student's loss terms and their weights at ``step``.

    s_logit / t_logit / label: [B]; s_hidden [B, h_s], t_hidden [B, h_t] (needed only when w_hint != 0).
    The caller passes teacher outputs already detached (the teacher must never get gradient from these terms).
    """
    weights = cfg.student_weights(step)
    terms: dict[str, torch.Tensor] = {"bce": click_bce(s_logit, label)}
    if "kd" in weights:
        terms["kd"] = (logit_mse(s_logit, t_logit) if cfg.kd_loss == "mse"
                       else hinton_kd_loss(s_logit, t_logit, cfg.temperature))
    if "hint" in weights:
        if projection is None or s_hidden is None or t_hidden is None:
            raise ValueError("DistillConfig.w_hint != 0 needs hidden layers and a hint projection (hint=True)")
        terms["hint"] = hint_loss(s_hidden, t_hidden, projection)
    if "cr" in weights:
        terms["cr"] = confidence_ranking_loss(s_logit, t_logit, label)
    if "rcr" in weights:
        terms["rcr"] = relative_confidence_ranking_loss(s_logit, t_logit, label)
    return terms, weights


# ------------------------------------------------------------------------------------------ teacher-first


class DistilledStudent(nn.Module):
    """A student Ranker plus the Linear hint projection (student hidden -> teacher hidden) it trains with.

    forward(cat, num) -> student logits [B]; the projection is only used by the loss, not at serving.
    """

    def __init__(self, student: Ranker, teacher_hidden_dim: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.student = student
        self.spec, self.cfg = student.spec, student.cfg
        self.projection = None
        if teacher_hidden_dim is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.projection = nn.Linear(student.hidden_dim, teacher_hidden_dim)

    def forward_hidden(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_hidden(cat, num)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.student(cat, num)


def teacher_first_loss(teacher: Ranker | None, cfg: DistillConfig):
    """loss_fn for :func:`cascade.train.loop.fit` training a :class:`DistilledStudent` from a frozen teacher.

    teacher: the trained teacher (put in eval mode and frozen here), or None when every batch carries a
    precomputed ``teacher_logit`` [B] (from the table's extras) and no hint loss is asked for.
    """
    if cfg.pfd_lambda is not None:
        raise ValueError("DistillConfig.pfd_lambda belongs to joint (PFD) training, not to teacher-first distillation")
    if teacher is None and cfg.w_hint != 0:
        raise ValueError("teacher_first_loss: the hint loss needs the teacher's hidden layer; pass the teacher")
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)

    def loss_fn(model: DistilledStudent, batch: dict[str, torch.Tensor], step: int):
        cat, num, y = batch["cat"], batch["num"], batch["label"]
        if teacher is not None:
            with torch.no_grad():
                t_logit, t_hidden = teacher.forward_hidden(cat, num)
        elif "teacher_logit" in batch:
            t_logit, t_hidden = batch["teacher_logit"].float(), None
        else:
            raise KeyError("teacher_first_loss: no teacher given and the batch has no 'teacher_logit' column")
        s_logit, s_hidden = model.forward_hidden(cat, num)
        return student_terms(s_logit, s_hidden, t_logit, t_hidden, y, model.projection, cfg, step)

    return loss_fn


# ------------------------------------------------------------------------------- joint / PFD


class JointRanker(nn.Module):
    """Teacher and student trained together (Rocket Launching / double-DNN / PFD).

    share_embeddings: one FeatureEmbedding over the union of both models' sides (then both configs need the
    same emb_dim, numeric mode and sparse flag). detach_student_embeddings: the student reads the shared
    embeddings detached, i.e. frozen for it (double-DNN); the student's private tables still train.
    private_student_columns: categorical columns with a student-only table (PFD's private user id).
    hint: add the student hidden -> teacher hidden projection for the hint loss.

    forward(cat, num) -> STUDENT logits [B] (the served model);
    forward_both(cat, num) -> (teacher logits [B], teacher hidden [B, h_t], student logits [B], student hidden
    [B, h_s]).
    """

    def __init__(self, spec: FeatureSpec, teacher_cfg: RankerConfig, student_cfg: RankerConfig,
                 share_embeddings: bool = True, detach_student_embeddings: bool = False,
                 private_student_columns: Sequence[str] = (), hint: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.share_embeddings, self.detach_student_embeddings = share_embeddings, detach_student_embeddings
        if detach_student_embeddings and not share_embeddings:
            raise ValueError("JointRanker: detach_student_embeddings needs share_embeddings=True")
        shared = None
        if share_embeddings:
            for k in ("emb_dim", "numeric", "sparse"):
                if getattr(teacher_cfg, k) != getattr(student_cfg, k):
                    raise ValueError(f"JointRanker: shared embeddings need equal {k} in teacher and student configs "
                                     f"({getattr(teacher_cfg, k)!r} vs {getattr(student_cfg, k)!r})")
            union = tuple(dict.fromkeys(teacher_cfg.sides + student_cfg.sides))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                shared = FeatureEmbedding(spec, union, teacher_cfg.emb_dim, numeric=teacher_cfg.numeric,
                                          sparse=teacher_cfg.sparse)
        self.embedding = shared
        self.teacher = Ranker(spec, teacher_cfg, embedding=shared, seed=seed + 1)
        self.student = Ranker(spec, student_cfg, embedding=shared, private_columns=private_student_columns,
                              seed=seed + 2)
        self.projection = None
        if hint:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 3)
                self.projection = nn.Linear(self.student.hidden_dim, self.teacher.hidden_dim)

    @property
    def cfg(self) -> dict:
        """Both configs, for the checkpoint manifest."""
        return {"teacher": self.teacher.cfg.to_dict(), "student": self.student.cfg.to_dict(),
                "share_embeddings": self.share_embeddings,
                "detach_student_embeddings": self.detach_student_embeddings,
                "private_student_columns": list(self.student.private_columns)}

    def forward_both(self, cat: torch.Tensor, num: torch.Tensor):
        if self.embedding is None:
            return (*self.teacher.forward_hidden(cat, num), *self.student.forward_hidden(cat, num))
        fields, dense = self.embedding(cat, num)  # computed once for both models
        t_logit, t_hidden = self.teacher.head(cat, num, *self.teacher.select(fields, dense))
        if self.detach_student_embeddings:
            fields, dense = fields.detach(), dense.detach()
        s_logit, s_hidden = self.student.head(cat, num, *self.student.select(fields, dense))
        return t_logit, t_hidden, s_logit, s_hidden

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.student(cat, num)

    def export_student(self) -> Ranker:
        """The student as a standalone :class:`Ranker` with the same logits (:meth:`Ranker.standalone`: its rows
        copied out of the shared table, a private table such as PFD's user ids in place of that column's rows).
        What the pipeline saves and serves."""
        return self.student.standalone()


def joint_loss(cfg: DistillConfig):
    """loss_fn for :func:`cascade.train.loop.fit` training a :class:`JointRanker`.

    Terms: "teacher_bce" (weight cfg.w_teacher) + the student's terms (see :func:`student_terms`), computed on the
    teacher's logits / hidden layer DETACHED, so no distillation term reaches the teacher.
    """

    def loss_fn(model: JointRanker, batch: dict[str, torch.Tensor], step: int):
        y = batch["label"]
        t_logit, t_hidden, s_logit, s_hidden = model.forward_both(batch["cat"], batch["num"])
        terms, weights = student_terms(s_logit, s_hidden, t_logit.detach(), t_hidden.detach(), y,
                                       model.projection, cfg, step)
        terms["teacher_bce"] = click_bce(t_logit, y)
        weights["teacher_bce"] = cfg.w_teacher
        return terms, weights

    return loss_fn


PFD_VARIANTS = ("pfd", "pfd+md", "lupi")


def pfd_configs(student: RankerConfig, variant: str = "pfd", teacher_mlp: tuple[int, ...] = (256, 128),
                pfd_side: str = "privileged") -> tuple[RankerConfig, RankerConfig]:
    """(teacher_cfg, student_cfg) for privileged-feature distillation.

    "pfd": the teacher is the student's architecture reading the privileged side as well; "pfd+md": the same
    with a larger MLP (``teacher_mlp``), privileged AND model distillation; "lupi": the teacher reads the
    privileged side only (learning using privileged information).

    pfd_side: the side the teacher alone reads. "privileged" (post-click fields, absent at serving) is the
    default; "cross" gives the Taobao pre-rank setting, where user x item interaction features are privileged
    because the cheap student cannot afford their lookups at serving time.
    """
    if variant not in PFD_VARIANTS:
        raise ValueError(f"pfd_configs: variant {variant!r} is not one of {PFD_VARIANTS}")
    if pfd_side not in SIDES:
        raise ValueError(f"pfd_configs: pfd_side {pfd_side!r} is not one of {SIDES}")
    if "privileged" in student.sides:
        raise ValueError("pfd_configs: the student must not read the privileged side (it is not there at serving)")
    if pfd_side in student.sides:
        raise ValueError(f"pfd_configs: the student already reads the {pfd_side!r} side, so it is not privileged "
                         f"(student sides {student.sides})")
    if variant == "pfd":
        teacher = replace(student, sides=student.sides + (pfd_side,))
    elif variant == "pfd+md":
        teacher = replace(student, sides=student.sides + (pfd_side,), mlp=tuple(teacher_mlp))
    else:
        teacher = replace(student, sides=(pfd_side,))
    return teacher, student
