"""Distillation and ground-truth losses, as pure functions of tensors.

Every loss returns a scalar tensor. List losses take padded lists: ``student`` scores ``[B, L]``, the teacher's
``teacher_rank`` (int, 1 = the teacher's best item of the row) and/or ``teacher_logits`` ``[B, L]``, and a ``mask``
bool ``[B, L]`` with True for a real entry. Padding never reaches a loss value or a gradient: a fully-masked row
contributes nothing, and a batch with no usable entry gives an exact 0 that still carries a (zero) gradient.
Everything the teacher provides is treated as a constant (detached here), so a distillation term never sends
gradient into the teacher.

Sources: Ranking Distillation (Tang & Wang, KDD 2018) for the top-K weighted pointwise loss; BPR for pairs;
LambdaLoss (Wang et al., CIKM 2018) with the NDCG-Loss2 weights and ApproxNDCG (Qin et al., 2010) for lists;
Hinton et al. 2015 for soft targets; Confidence Ranking (JD, 2023) for CR / RCR; Yi et al. (RecSys 2019) for the
log-Q corrected in-batch sampled softmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "pointwise_topk_loss",
    "bpr_pairwise_loss",
    "graded_relevance",
    "lambda_ndcg_loss",
    "approx_ndcg_loss",
    "listnet_kl_loss",
    "logit_mse",
    "hinton_kd_loss",
    "confidence_ranking_loss",
    "relative_confidence_ranking_loss",
    "hint_loss",
    "click_bce",
    "sampled_softmax_loss",
    "mix",
]

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# shared checks and helpers


def _check_list(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
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


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")


def _check_ranks(teacher_rank: torch.Tensor, mask: torch.Tensor) -> None:
    if teacher_rank.dtype.is_floating_point or teacher_rank.dtype == torch.bool:
        raise TypeError(f"teacher_rank must be an integer tensor (1 = teacher's best), got {teacher_rank.dtype}")
    if bool((teacher_rank[mask] < 1).any()):
        bad = int(teacher_rank[mask].min())
        raise ValueError(f"teacher_rank must be >= 1 on real entries (1 = teacher's best), found {bad}")


def _zero(x: torch.Tensor) -> torch.Tensor:
    """An exact 0 that stays in the autograd graph of ``x`` (so backward() works on an empty batch)."""
    return x.sum() * 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over True entries of ``mask`` (weights multiply, the count divides); 0 when empty."""
    w = mask.to(values.dtype) if weight is None else weight * mask.to(values.dtype)
    # torch.where, not multiplication: a non-finite value in a padded slot must not leak (0 * inf = nan).
    total = torch.where(mask, values * w, torch.zeros_like(values)).sum()
    count = mask.sum()
    if int(count) == 0:
        return _zero(values)
    return total / count


def _clean_padding(student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded scores: padding may hold anything (even inf / nan), which must reach neither the value
    nor, through a 0 * inf product in backward, the gradient."""
    return student.masked_fill(~mask, 0.0)


def _very_negative(x: torch.Tensor) -> float:
    # Finite (not -inf) so that softmax rows that are entirely padding stay finite; a quarter of the dtype's most
    # negative value so that subtracting a row max cannot overflow to -inf.
    return torch.finfo(x.dtype).min / 4


def _sample_rows(weights: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Sample ``n`` column indices per row with replacement, proportionally to ``weights`` ``[B, L]`` (>= 0).

    Rows whose weights are all zero are sampled uniformly; the caller must mark their samples invalid.
    """
    safe = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
    return torch.multinomial(safe, n, replacement=True, generator=generator)


def _student_positions(student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based position of every entry in the student's own descending order (padding sorted last). ``[B, L]``."""
    with torch.no_grad():
        scores = student.detach().masked_fill(~mask, float("-inf"))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        positions = torch.empty_like(order)
        ar = torch.arange(1, student.shape[1] + 1, device=student.device).expand_as(order)
        positions.scatter_(1, order, ar)
    return positions


def _ideal_dcg(gains: torch.Tensor, k: int | None) -> torch.Tensor:
    """Ideal DCG per row from gains ``[B, L]`` (padding must carry gain 0), truncated at ``k``. Returns ``[B]``."""
    sorted_gains, _ = torch.sort(gains, dim=1, descending=True)
    L = gains.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, L + 2, device=gains.device, dtype=gains.dtype))
    if k is not None:
        discounts = torch.where(torch.arange(1, L + 1, device=gains.device) <= k, discounts, 0.0)
    return (sorted_gains * discounts).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# rank-list distillation (teacher's ordered list -> student scores)


def pointwise_topk_loss(
    student: torch.Tensor,
    teacher_rank: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: int = 10,
    weighting: str = "inverse",
    a: float = 1.0,
    lam: float = 5.0,
    tail_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-K weighted pointwise distillation (Ranking Distillation, Tang & Wang, KDD 2018).

    The teacher's top-``k`` entries of each row (``teacher_rank <= k``) are positives with weight
    ``w = 1 + a / rank`` (``weighting="inverse"``) or ``w = exp(-rank / lam)`` (``"exp"``, RD's weighting); the
    other real entries are negatives with weight 1, optionally only ``tail_samples`` of them per row drawn
    uniformly without replacement (the DE-RRD lesson: weight the top, sample the tail).

    Loss = sum(w * BCE(student, target)) / (number of entries used), i.e. torch's weighted BCE mean.

    student: [B, L] logits; teacher_rank: [B, L] int, 1 = teacher's best; mask: [B, L] bool (True = real).
    """
    mask = _check_list("student", student, mask)
    _check_same_shape("teacher_rank", teacher_rank, "student", student)
    _check_ranks(teacher_rank, mask)
    student = _clean_padding(student, mask)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rank = teacher_rank.detach().clamp(min=1).to(student.dtype)  # clamp: padding may hold rank 0
    positive = mask & (teacher_rank <= k)
    negative = mask & (teacher_rank > k)
    if weighting == "inverse":
        pos_weight = 1.0 + a / rank
    elif weighting == "exp":
        if lam <= 0:
            raise ValueError(f"lam must be > 0 for weighting='exp', got {lam}")
        pos_weight = torch.exp(-rank / lam)
    else:
        raise ValueError(f"weighting must be 'inverse' or 'exp', got {weighting!r}")

    if tail_samples is not None:
        if tail_samples < 0:
            raise ValueError(f"tail_samples must be >= 0 or None, got {tail_samples}")
        # Uniform sampling without replacement, vectorised: random keys, non-candidates pushed above every key,
        # keep the tail_samples smallest keys that belong to candidates.
        keys = torch.rand(student.shape, generator=generator, device=student.device)
        keys = keys.masked_fill(~negative, 2.0)
        n_take = min(tail_samples, student.shape[1])
        picked = torch.zeros_like(negative)
        if n_take > 0:
            smallest, idx = torch.topk(keys, n_take, dim=1, largest=False)
            picked.scatter_(1, idx, smallest < 2.0)
        negative = picked

    used = positive | negative
    target = positive.to(student.dtype)
    weight = torch.where(positive, pos_weight, torch.ones_like(pos_weight))
    bce = F.binary_cross_entropy_with_logits(student, target, reduction="none")
    return _masked_mean(bce, used, weight)


def bpr_pairwise_loss(
    student: torch.Tensor,
    teacher_rank: torch.Tensor,
    mask: torch.Tensor | None = None,
    strategy: str = "topk_vs_tail",
    k: int = 10,
    n_pairs: int | None = 64,
    rank_gap_weight: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BPR over pairs (i, j) of one row where the teacher ranks i above j: mean of -log sigmoid(s_i - s_j).

    strategy:
      - ``"all"``: every ordered pair of real entries with rank_i < rank_j (``[B, L, L]`` memory).
      - ``"topk_vs_tail"``: i in the teacher's top-``k``, j outside it; ``n_pairs`` pairs per row sampled with
        replacement (i and j uniform in their sets), or every such pair when ``n_pairs`` is None.
      - ``"random"``: ``n_pairs`` pairs per row, i and j drawn uniformly from the real entries and oriented by
        the teacher's rank (draws with i == j are dropped).
    rank_gap_weight: weight each pair by |rank_i - rank_j| normalised to mean 1 over the batch's pairs
    (loss = sum(w * l) / sum(w)).

    student: [B, L] scores; teacher_rank: [B, L] int, 1 = best; mask: [B, L] bool.
    """
    mask = _check_list("student", student, mask)
    _check_same_shape("teacher_rank", teacher_rank, "student", student)
    _check_ranks(teacher_rank, mask)
    student = _clean_padding(student, mask)
    rank = teacher_rank.detach()

    if strategy == "all" or (strategy == "topk_vs_tail" and n_pairs is None):
        # pair[b, i, j] = True when (i, j) is a pair to score.
        pair = mask[:, :, None] & mask[:, None, :] & (rank[:, :, None] < rank[:, None, :])
        if strategy == "topk_vs_tail":
            pair = pair & (rank[:, :, None] <= k) & (rank[:, None, :] > k)
        diff = student[:, :, None] - student[:, None, :]
        gap = (rank[:, None, :] - rank[:, :, None]).to(student.dtype)
    elif strategy in ("topk_vs_tail", "random"):
        if n_pairs is None or n_pairs < 1:
            raise ValueError(f"n_pairs must be a positive int for strategy={strategy!r}, got {n_pairs}")
        if strategy == "topk_vs_tail":
            top = (mask & (rank <= k)).to(student.dtype)
            tail = (mask & (rank > k)).to(student.dtype)
            i = _sample_rows(top, n_pairs, generator)
            j = _sample_rows(tail, n_pairs, generator)
            row_ok = (top.sum(1) > 0) & (tail.sum(1) > 0)
            pair = row_ok[:, None].expand(-1, n_pairs)
        else:
            real = mask.to(student.dtype)
            i = _sample_rows(real, n_pairs, generator)
            j = _sample_rows(real, n_pairs, generator)
            pair = (real.sum(1) > 0)[:, None] & (i != j)
            # Orient each pair so that its first member is the one the teacher ranks higher.
            swap = torch.gather(rank, 1, i) > torch.gather(rank, 1, j)
            i, j = torch.where(swap, j, i), torch.where(swap, i, j)
            pair = pair & (torch.gather(rank, 1, i) < torch.gather(rank, 1, j))
        diff = torch.gather(student, 1, i) - torch.gather(student, 1, j)
        gap = (torch.gather(rank, 1, j) - torch.gather(rank, 1, i)).to(student.dtype)
    else:
        raise ValueError(f"strategy must be 'topk_vs_tail', 'all' or 'random', got {strategy!r}")

    loss = F.softplus(-diff)  # = -log sigmoid(diff), stable for |diff| up to float max
    if not rank_gap_weight:
        return _masked_mean(loss, pair)
    w = torch.where(pair, gap.abs(), torch.zeros_like(gap))
    w_sum = w.sum()
    if int(pair.sum()) == 0 or float(w_sum) == 0.0:
        return _zero(student)
    return torch.where(pair, loss * w, torch.zeros_like(loss)).sum() / w_sum


def graded_relevance(
    teacher_rank: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mode: str = "rank_buckets",
    buckets: tuple[tuple[int, float], ...] = ((5, 4), (10, 3), (20, 2), (50, 1)),
    n_levels: int = 5,
) -> torch.Tensor:
    """Graded relevance ``[B, L]`` (float, padding 0) derived from the teacher, for the NDCG losses and metrics.

    mode:
      - ``"rank_buckets"`` (needs ``teacher_rank``): ``buckets`` is ((upper_rank, grade), ...) with increasing
        upper ranks; an entry gets the grade of the first bucket whose upper rank it does not exceed, else 0.
        Default: top 5 -> 4, 6-10 -> 3, 11-20 -> 2, 21-50 -> 1, the rest 0.
      - ``"quantiles"`` (needs ``teacher_logits``): per-row quantiles of the real entries' logits into grades
        0 .. n_levels - 1: grade = floor(n_levels * (number of real entries in the row with a strictly lower
        logit) / (number of real entries)); tied logits share a grade, the highest logit gets n_levels - 1.
    """
    if mode == "rank_buckets":
        if teacher_rank is None:
            raise ValueError("graded_relevance(mode='rank_buckets') needs teacher_rank")
        mask = _check_list("teacher_rank", teacher_rank, mask)
        _check_ranks(teacher_rank, mask)
        uppers = [int(u) for u, _ in buckets]
        if any(b <= a_ for a_, b in zip(uppers, uppers[1:])) or (uppers and uppers[0] < 1):
            raise ValueError(f"bucket upper ranks must be >= 1 and strictly increasing, got {uppers}")
        rank = teacher_rank.detach()
        grades = torch.zeros(rank.shape, dtype=torch.float32, device=rank.device)
        # Widest bucket first so that narrower (better) buckets overwrite it.
        for upper, grade in reversed(buckets):
            grades = torch.where(rank <= int(upper), torch.tensor(float(grade), device=rank.device), grades)
        return grades.masked_fill(~mask, 0.0)
    if mode == "quantiles":
        if teacher_logits is None:
            raise ValueError("graded_relevance(mode='quantiles') needs teacher_logits")
        if n_levels < 2:
            raise ValueError(f"n_levels must be >= 2, got {n_levels}")
        mask = _check_list("teacher_logits", teacher_logits, mask)
        logits = teacher_logits.detach()
        if not bool(torch.isfinite(logits[mask]).all()):
            raise ValueError("teacher_logits has non-finite values on real entries")
        # Padding goes to +inf so it sorts last and is never counted as "strictly lower" than a finite logit.
        padded = logits.masked_fill(~mask, float("inf"))
        sorted_logits, _ = torch.sort(padded, dim=1)
        n_lower = torch.searchsorted(sorted_logits.contiguous(), padded.contiguous(), side="left")
        n_real = mask.sum(dim=1, keepdim=True).clamp(min=1)
        grades = torch.div(n_lower * n_levels, n_real, rounding_mode="floor").to(torch.float32)
        out_dtype = logits.dtype if logits.dtype.is_floating_point else torch.float32
        return grades.masked_fill(~mask, 0.0).to(out_dtype)
    raise ValueError(f"mode must be 'rank_buckets' or 'quantiles', got {mode!r}")


def _relevant_rows(rel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Column indices ``[B, M]`` of each row's relevant entries (rel > 0), M = the most any row has, and a validity
    mask ``[B, M]`` (rows with fewer relevant entries are filled with invalid slots). None when no row has one.

    Only a relevant entry can be the better member of an NDCG pair or add to a DCG, so the pairwise tensors
    shrink from [B, L, L] to [B, M, L] (with rank buckets M <= 50 whatever L is).
    """
    relevant = mask & (rel > 0)
    M = int(relevant.sum(dim=1).max()) if relevant.numel() else 0
    if M == 0:
        return None
    _, idx = torch.topk(torch.where(relevant, rel, torch.full_like(rel, -1.0)), M, dim=1)
    return idx, torch.gather(relevant, 1, idx)


def _ndcg_setup(student: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor, k: int | None):
    """What both NDCG surrogates need: (rel, gains 2^rel - 1, ideal DCG [B], rows with ideal DCG > 0, their count,
    relevant-entry indices and validity), or None when no row has a relevant entry."""
    rel = relevance.detach().to(student.dtype).masked_fill(~mask, 0.0)
    if bool((rel < 0).any()):
        raise ValueError("relevance must be >= 0")
    gains = torch.pow(2.0, rel) - 1.0
    max_dcg = _ideal_dcg(gains, k)
    row_ok = max_dcg > 0
    n_rows = int(row_ok.sum())
    picked = _relevant_rows(rel, mask)
    if n_rows == 0 or picked is None:
        return None
    return (rel, gains, max_dcg, row_ok, n_rows, *picked)


def lambda_ndcg_loss(
    student: torch.Tensor,
    relevance: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: int | None = None,
    sigma: float = 1.0,
) -> torch.Tensor:
    """LambdaLoss with the NDCG-Loss2 weights (Wang et al., "The LambdaLoss Framework", CIKM 2018, eq. 11).

    Per row: sum over pairs with rel_i > rel_j of
        delta_ij * |G_i - G_j| * log2(1 + exp(-sigma * (s_i - s_j))),
    G = (2^rel - 1) / maxDCG, delta_ij = |1/D(|p_i - p_j|) - 1/D(|p_i - p_j| + 1)|, D(n) = log2(1 + n), and
    p the 1-based positions in the student's current order (no gradient through the sort). NDCG-Loss2 is chosen
    over the LambdaRank |delta NDCG| weight because it is a proper bound on NDCG: it keeps the teacher's own order
    as the minimum even when scores are nearly tied, which the |delta NDCG| weight does not.
    With ``k`` (LambdaLoss@k, Jagerman et al., SIGIR 2022): maxDCG is taken at ``k``, pairs with both student
    positions beyond ``k`` are dropped and pairs with one beyond ``k`` are weighted by
    mu = 1 / (1 - 1 / D(max(p_i, p_j))). This is a surrogate of NDCG@k only: it ignores the order below k, so
    unlike ``k=None`` the teacher's own order is not guaranteed to be its minimum.
    The batch loss is the mean over rows with maxDCG > 0. Memory and time are O(B * M * L) with M the largest
    number of relevant (rel > 0) entries in a row.

    student: [B, L] scores; relevance: [B, L] graded relevance (>= 0, constant); mask: [B, L] bool.
    """
    mask = _check_list("student", student, mask)
    _check_same_shape("relevance", relevance, "student", student)
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    student = _clean_padding(student, mask)
    prep = _ndcg_setup(student, relevance, mask, k)
    if prep is None:
        return _zero(student)
    rel, gains, max_dcg, row_ok, n_rows, idx, valid_i = prep
    G = gains / torch.where(row_ok, max_dcg, torch.ones_like(max_dcg))[:, None]

    L = student.shape[1]
    pos = _student_positions(student, mask)  # [B, L] long
    pos_i = torch.gather(pos, 1, idx)  # [B, M]
    gap = (pos_i[:, :, None] - pos[:, None, :]).abs()  # [B, M, L], 0 only for i == j
    g = torch.arange(L + 1, device=student.device, dtype=student.dtype)
    delta_table = (1.0 / torch.log2(1.0 + g) - 1.0 / torch.log2(2.0 + g)).abs()
    delta_table[0] = 0.0  # gap 0 is the pair (i, i), never a pair
    delta = delta_table[gap]
    rel_i, G_i, s_i = torch.gather(rel, 1, idx), torch.gather(G, 1, idx), torch.gather(student, 1, idx)
    pair = valid_i[:, :, None] & mask[:, None, :] & (rel_i[:, :, None] > rel[:, None, :])
    if k is not None:
        # LambdaLoss@k (Jagerman et al., SIGIR 2022): pairs with both positions beyond k are dropped, pairs with one
        # beyond k get mu = 1 / (1 - 1 / D(max(p_i, p_j))) (D(n) = log2(1 + n) > 1 there, so mu is finite).
        p_min = torch.minimum(pos_i[:, :, None], pos[:, None, :])
        p_max = torch.maximum(pos_i[:, :, None], pos[:, None, :])
        pair = pair & (p_min <= k)
        p = torch.arange(L + 1, device=student.device, dtype=student.dtype).clamp(min=2.0)
        mu_table = 1.0 / (1.0 - 1.0 / torch.log2(1.0 + p))
        delta = torch.where(p_max > k, delta * mu_table[p_max], delta)
    weight = torch.where(pair, delta * (G_i[:, :, None] - G[:, None, :]).abs(), torch.zeros_like(delta))
    pair_loss = F.softplus(-sigma * (s_i[:, :, None] - student[:, None, :])) / _LN2
    return (weight * pair_loss).sum() / n_rows


def approx_ndcg_loss(
    student: torch.Tensor,
    relevance: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """ApproxNDCG (Qin, Liu & Li, 2010): 1 - NDCG computed with smooth positions, averaged over rows with maxDCG > 0.

    Smooth position of entry i: pi_i = 1 + sum_{j != i, real} sigmoid((s_j - s_i) / temperature);
    approxDCG = sum_i (2^rel_i - 1) / log2(1 + pi_i); normalised by the ideal DCG of the row's grades.
    Only relevant entries add to the DCG, so only their positions are computed: O(B * M * L).

    student: [B, L] scores; relevance: [B, L] graded relevance (>= 0, constant); mask: [B, L] bool.
    """
    mask = _check_list("student", student, mask)
    _check_same_shape("relevance", relevance, "student", student)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prep = _ndcg_setup(student, relevance, mask, None)
    if prep is None:
        return _zero(student)
    rel, gains, max_dcg, row_ok, n_rows, idx, valid_i = prep
    s = _clean_padding(student, mask)
    s_i = torch.gather(s, 1, idx)  # [B, M]
    cols = torch.arange(student.shape[1], device=student.device)
    other = mask[:, None, :] & (idx[:, :, None] != cols[None, None, :])  # [B, M, L]: real j != i
    soft = torch.sigmoid((s[:, None, :] - s_i[:, :, None]) / temperature)  # P(j above i)
    position = 1.0 + torch.where(other, soft, torch.zeros_like(soft)).sum(dim=2)  # [B, M]
    gains_i = torch.where(valid_i, torch.gather(gains, 1, idx), torch.zeros_like(position))
    dcg = (gains_i / torch.log2(1.0 + position)).sum(dim=1)
    ndcg = dcg / torch.where(row_ok, max_dcg, torch.ones_like(max_dcg))
    return torch.where(row_ok, 1.0 - ndcg, torch.zeros_like(ndcg)).sum() / n_rows


def listnet_kl_loss(
    student: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Listwise softmax KD: KL(softmax(t / T) || softmax(s / T)) over each row's real entries, times T^2.

    Mean over rows with at least one real entry. student, teacher_logits: [B, L]; mask: [B, L] bool.
    """
    mask = _check_list("student", student, mask)
    _check_same_shape("teacher_logits", teacher_logits, "student", student)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    row_ok = mask.any(dim=1)
    neg = _very_negative(student)
    log_p_s = F.log_softmax((student / temperature).masked_fill(~mask, neg), dim=1)
    t = teacher_logits.detach().to(student.dtype)
    log_p_t = F.log_softmax((t / temperature).masked_fill(~mask, neg), dim=1)
    kl = torch.where(mask, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s)).sum(dim=1)
    n_rows = int(row_ok.sum())
    if n_rows == 0:
        return _zero(student)
    return torch.where(row_ok, kl, torch.zeros_like(kl)).sum() / n_rows * temperature**2


# ----------------------------------------------------------------------------------------------------------------
# logit / hidden-layer distillation and confidence ranking (rank student)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between student and (detached) teacher logits over ``mask`` (any equal shapes)."""
    _check_same_shape("teacher", teacher, "student", student)
    if mask is None:
        mask = torch.ones_like(student, dtype=torch.bool)
    else:
        _check_same_shape("mask", mask, "student", student)
    return _masked_mean((student - teacher.detach().to(student.dtype)) ** 2, mask)


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
    _check_same_shape("teacher_logit", teacher_logit, "student_logit", student_logit)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logit.numel() == 0:
        return _zero(student_logit)
    t = teacher_logit.detach().to(student_logit.dtype) / temperature
    target = torch.sigmoid(t)
    ce = F.binary_cross_entropy_with_logits(student_logit / temperature, target, reduction="none")
    if subtract_entropy:
        ce = ce - F.binary_cross_entropy_with_logits(t, target, reduction="none")
    return ce.mean() * temperature**2


def _check_labels(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    _check_same_shape("label", label, "student_logit", like)
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
    _check_same_shape("ref_logit", ref_logit, "student_logit", student_logit)
    y = _check_labels(label, student_logit)
    if student_logit.numel() == 0:
        return _zero(student_logit)
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
    _check_same_shape("ref_logit", ref_logit, "student_logit", student_logit)
    y = _check_labels(label, student_logit)
    if student_logit.dim() != 1:
        raise ValueError(f"student_logit must be [N], got shape {tuple(student_logit.shape)}")
    pos, neg = y == 1, y == 0
    if not bool(pos.any()) or not bool(neg.any()):
        return _zero(student_logit)
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


# ----------------------------------------------------------------------------------------------------------------
# ground-truth terms


def click_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against click labels, mean over ``mask`` (any equal shapes)."""
    _check_same_shape("labels", labels, "logits", logits)
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    else:
        _check_same_shape("mask", mask, "logits", logits)
    y = labels.to(logits.dtype)
    if bool(((y[mask] < 0) | (y[mask] > 1)).any()):
        raise ValueError("labels must be in [0, 1]")
    # Padded labels may hold anything; zero them so BCE stays finite there.
    y = torch.where(mask, y, torch.zeros_like(y))
    return _masked_mean(F.binary_cross_entropy_with_logits(logits, y, reduction="none"), mask)


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    pos_item_emb: torch.Tensor,
    neg_item_emb: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    in_batch: bool = True,
    pos_item_ids: torch.Tensor | None = None,
    neg_item_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax for retrieval towers, with log-Q correction and accidental hits removed.

    Row b's candidates: its positive, the other rows' positives (``in_batch``) and the shared sampled negatives.
    Logit of candidate c: <u_b, v_c> / temperature - log q_c (Yi et al., RecSys 2019: q_c is the probability
    that c is sampled, so popular in-batch items are not over-penalised; applied to every candidate, the positive
    included). A candidate with the same item id as row b's positive (other than the positive itself) is
    removed when ids are given. Mean cross-entropy over rows.

    user_emb: [B, d]; pos_item_emb: [B, d]; neg_item_emb: [N, d] or None; pos_log_q: [B] or None;
    neg_log_q: [N] or None (if any log q is given, every candidate set used must have one);
    pos_item_ids: [B] int or None; neg_item_ids: [N] int or None.
    """
    if user_emb.dim() != 2 or pos_item_emb.shape != user_emb.shape:
        raise ValueError(
            f"user_emb and pos_item_emb must both be [B, d], got {tuple(user_emb.shape)} and "
            f"{tuple(pos_item_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, d = user_emb.shape
    if neg_item_emb is not None and (neg_item_emb.dim() != 2 or neg_item_emb.shape[1] != d):
        raise ValueError(f"neg_item_emb must be [N, {d}], got {tuple(neg_item_emb.shape)}")
    if not in_batch and neg_item_emb is None:
        raise ValueError("sampled_softmax_loss needs negatives: in_batch=True or neg_item_emb")
    use_log_q = pos_log_q is not None or neg_log_q is not None
    if use_log_q:
        if pos_log_q is None:
            raise ValueError("neg_log_q given without pos_log_q: the positives need their log q too")
        if neg_item_emb is not None and neg_log_q is None:
            raise ValueError("pos_log_q given without neg_log_q while neg_item_emb is used")
        if pos_log_q.shape != (B,):
            raise ValueError(f"pos_log_q must be [{B}], got {tuple(pos_log_q.shape)}")
        if neg_item_emb is not None and neg_log_q.shape != (neg_item_emb.shape[0],):
            raise ValueError(f"neg_log_q must be [{neg_item_emb.shape[0]}], got {tuple(neg_log_q.shape)}")
    if pos_item_ids is not None and pos_item_ids.shape != (B,):
        raise ValueError(f"pos_item_ids must be [{B}], got {tuple(pos_item_ids.shape)}")
    if neg_item_ids is not None:
        if neg_item_emb is None or neg_item_ids.shape != (neg_item_emb.shape[0],):
            raise ValueError("neg_item_ids must be [N] and come with neg_item_emb")
        if pos_item_ids is None:
            raise ValueError("neg_item_ids given without pos_item_ids: accidental hits need both")

    blocks, log_q, hit = [], [], []
    if in_batch:
        blocks.append(user_emb @ pos_item_emb.T / temperature)  # [B, B], diagonal = positives
        if use_log_q:
            log_q.append(pos_log_q.detach().to(user_emb.dtype)[None, :].expand(B, B))
        if pos_item_ids is not None:
            same = pos_item_ids[:, None] == pos_item_ids[None, :]
            hit.append(same & ~torch.eye(B, dtype=torch.bool, device=user_emb.device))
        else:
            hit.append(torch.zeros(B, B, dtype=torch.bool, device=user_emb.device))
        target = torch.arange(B, device=user_emb.device)
    else:
        blocks.append((user_emb * pos_item_emb).sum(dim=1, keepdim=True) / temperature)  # [B, 1]
        if use_log_q:
            log_q.append(pos_log_q.detach().to(user_emb.dtype)[:, None])
        hit.append(torch.zeros(B, 1, dtype=torch.bool, device=user_emb.device))
        target = torch.zeros(B, dtype=torch.long, device=user_emb.device)
    if neg_item_emb is not None:
        N = neg_item_emb.shape[0]
        blocks.append(user_emb @ neg_item_emb.T / temperature)  # [B, N]
        if use_log_q:
            log_q.append(neg_log_q.detach().to(user_emb.dtype)[None, :].expand(B, N))
        if neg_item_ids is not None:
            hit.append(pos_item_ids[:, None] == neg_item_ids[None, :])
        else:
            hit.append(torch.zeros(B, N, dtype=torch.bool, device=user_emb.device))
    logits = torch.cat(blocks, dim=1)
    if use_log_q:
        logits = logits - torch.cat(log_q, dim=1)
    # A finite fill keeps the gradient finite; the positive is never a hit, so every row keeps a candidate.
    logits = logits.masked_fill(torch.cat(hit, dim=1), _very_negative(logits))
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------------------------------------------
# mixing


def mix(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of scalar loss terms: total = sum_name weights[name] * terms[name].

    Every weight name must name a term and every term must have a weight (0 is allowed), else KeyError naming it;
    a non-finite term raises FloatingPointError naming it. Returns (total, log) where log maps each term name to
    its unweighted float value and "total" to the total's.
    """
    unknown = [name for name in weights if name not in terms]
    if unknown:
        raise KeyError(f"loss weight(s) {unknown} name no loss term; terms are {sorted(terms)}")
    unweighted = [name for name in terms if name not in weights]
    if unweighted:
        raise KeyError(f"loss term(s) {unweighted} have no weight; weights are {sorted(weights)}")
    if not terms:
        raise ValueError("mix needs at least one loss term")
    log: dict[str, float] = {}
    total = None
    for name, term in terms.items():
        if term.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar tensor, got shape {tuple(term.shape)}")
        value = float(term.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss term {name!r} is not finite: {value}")
        log[name] = value
        contribution = term * float(weights[name])
        total = contribution if total is None else total + contribution
    log["total"] = float(total.detach())
    return total, log
