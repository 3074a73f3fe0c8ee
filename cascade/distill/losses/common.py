"""Checks and helpers shared by the losses (padding, masked means, sampling, positions, ideal DCG)."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def check_list(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Check a ``[B, L]`` list tensor and return its mask (all True when ``mask`` is None)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, L], got shape {tuple(x.shape)}")
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {name} shape {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    return mask


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")


def check_ranks(teacher_rank: torch.Tensor, mask: torch.Tensor) -> None:
    if teacher_rank.dtype.is_floating_point or teacher_rank.dtype == torch.bool:
        raise TypeError(f"teacher_rank must be an integer tensor (1 = teacher's best), got {teacher_rank.dtype}")
    if bool((teacher_rank[mask] < 1).any()):
        bad = int(teacher_rank[mask].min())
        raise ValueError(f"teacher_rank must be >= 1 on real entries (1 = teacher's best), found {bad}")


def zero(x: torch.Tensor) -> torch.Tensor:
    """An exact 0 that stays in the autograd graph of ``x`` (so backward() works on an empty batch)."""
    return x.sum() * 0.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over True entries of ``mask`` (weights multiply, the count divides); 0 when empty."""
    w = mask.to(values.dtype) if weight is None else weight * mask.to(values.dtype)
    # torch.where, not multiplication: a non-finite value in a padded slot must not leak (0 * inf = nan).
    total = torch.where(mask, values * w, torch.zeros_like(values)).sum()
    count = mask.sum()
    if int(count) == 0:
        return zero(values)
    return total / count


def clean_padding(student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded scores: padding may hold anything (even inf / nan), which must reach neither the value
    nor, through a 0 * inf product in backward, the gradient."""
    return student.masked_fill(~mask, 0.0)


def very_negative(x: torch.Tensor) -> float:
    # Finite (not -inf) so that softmax rows that are entirely padding stay finite; a quarter of the dtype's most
    # negative value so that subtracting a row max cannot overflow to -inf.
    return torch.finfo(x.dtype).min / 4


def sample_rows(weights: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Sample ``n`` column indices per row with replacement, proportionally to ``weights`` ``[B, L]`` (>= 0).

    Rows whose weights are all zero are sampled uniformly; the caller must mark their samples invalid.
    """
    safe = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
    return torch.multinomial(safe, n, replacement=True, generator=generator)


def student_positions(student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based position of every entry in the student's own descending order (padding sorted last). ``[B, L]``."""
    with torch.no_grad():
        scores = student.detach().masked_fill(~mask, float("-inf"))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        positions = torch.empty_like(order)
        ar = torch.arange(1, student.shape[1] + 1, device=student.device).expand_as(order)
        positions.scatter_(1, order, ar)
    return positions


def ideal_dcg(gains: torch.Tensor, k: int | None) -> torch.Tensor:
    """Ideal DCG per row from gains ``[B, L]`` (padding must carry gain 0), truncated at ``k``. Returns ``[B]``."""
    sorted_gains, _ = torch.sort(gains, dim=1, descending=True)
    L = gains.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, L + 2, device=gains.device, dtype=gains.dtype))
    if k is not None:
        discounts = torch.where(torch.arange(1, L + 1, device=gains.device) <= k, discounts, 0.0)
    return (sorted_gains * discounts).sum(dim=1)
