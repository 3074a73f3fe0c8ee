"""Logit and hidden-layer distillation and Confidence Ranking (the rank student)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_same_shape, masked_mean, zero


def logit_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between student and (detached) teacher logits over ``mask`` (any equal shapes)."""
    check_same_shape("teacher", teacher, "student", student)
    if mask is None:
        mask = torch.ones_like(student, dtype=torch.bool)
    else:
        check_same_shape("mask", mask, "student", student)
    return masked_mean((student - teacher.detach().to(student.dtype)) ** 2, mask)


def hinton_kd_loss(
    student_logit: torch.Tensor,
    teacher_logit: torch.Tensor,
    temperature: float = 2.0,
    subtract_entropy: bool = False,
) -> torch.Tensor:
    """Binary soft-target KD (Hinton et al., 2015): mean BCE(sigmoid(s/T), target sigmoid(t/T)) * T^2.

    By default the plain cross-entropy (its minimum over s is the teacher's binary entropy, > 0);
    ``subtract_entropy=True`` subtracts that floor, giving the binary KL(teacher || student) * T^2 (0 at s = t).
    student_logit, teacher_logit: [N].
    """
    check_same_shape("teacher_logit", teacher_logit, "student_logit", student_logit)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logit.numel() == 0:
        return zero(student_logit)
    t = teacher_logit.detach().to(student_logit.dtype) / temperature
    target = torch.sigmoid(t)
    ce = F.binary_cross_entropy_with_logits(student_logit / temperature, target, reduction="none")
    if subtract_entropy:
        ce = ce - F.binary_cross_entropy_with_logits(t, target, reduction="none")
    return ce.mean() * temperature**2


def _check_labels(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    check_same_shape("label", label, "student_logit", like)
    y = label.detach().to(like.dtype)
    if bool(((y < 0) | (y > 1)).any()):
        raise ValueError("label must be in [0, 1]")
    return y


def confidence_ranking_loss(
    student_logit: torch.Tensor, ref_logit: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """Confidence Ranking (JD, 2023): mean(y * log(1 + e^-(u - v)) + (1 - y) * log(1 + e^(u - v))).

    u: student logits [N]; v: reference (teacher) logits [N], detached; label: [N] in {0, 1}.
    It pushes the student's logit above the reference's on positives and below it on negatives.
    """
    check_same_shape("ref_logit", ref_logit, "student_logit", student_logit)
    y = _check_labels(label, student_logit)
    if student_logit.numel() == 0:
        return zero(student_logit)
    d = student_logit - ref_logit.detach().to(student_logit.dtype)
    return (y * F.softplus(-d) + (1.0 - y) * F.softplus(d)).mean()


def relative_confidence_ranking_loss(
    student_logit: torch.Tensor, ref_logit: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """Relative Confidence Ranking (JD, 2023): mean over all (pos, neg) pairs of log(1 + exp(-(d_f - d_ref))).

    d = logit(pos) - logit(neg), for the student (d_f) and the detached reference (d_ref); the pairs are every
    positive x every negative of the batch ([P, 1] - [1, Q]). 0 when the batch lacks a class.
    student_logit, ref_logit, label: [N], label in {0, 1}.
    """
    check_same_shape("ref_logit", ref_logit, "student_logit", student_logit)
    y = _check_labels(label, student_logit)
    if student_logit.dim() != 1:
        raise ValueError(f"student_logit must be [N], got shape {tuple(student_logit.shape)}")
    pos, neg = y == 1, y == 0
    if not bool(pos.any()) or not bool(neg.any()):
        return zero(student_logit)
    v = ref_logit.detach().to(student_logit.dtype)
    d_f = student_logit[pos][:, None] - student_logit[neg][None, :]
    d_ref = v[pos][:, None] - v[neg][None, :]
    return F.softplus(-(d_f - d_ref)).mean()


def hint_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: torch.nn.Module
) -> torch.Tensor:
    """Hint (FitNets-style) loss: MSE(projection(student_hidden), teacher_hidden.detach()).

    student_hidden: [N, h_s]; teacher_hidden: [N, h_t]; projection maps h_s -> h_t (e.g. nn.Linear(h_s, h_t)).
    """
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(
            f"hidden states must be [N, h], got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_hidden.shape[0]} vs teacher {teacher_hidden.shape[0]}")
    projected = projection(student_hidden)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(
            f"projection output shape {tuple(projected.shape)} != teacher_hidden shape {tuple(teacher_hidden.shape)}"
        )
    return F.mse_loss(projected, teacher_hidden.detach().to(projected.dtype))
