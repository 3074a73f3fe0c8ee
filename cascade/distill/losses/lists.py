"""Rank-list distillation: the teacher's ordered list -> student scores (pointwise top-K weighted, BPR pairs,
NDCG listwise with graded relevance, ListNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    LN2,
    check_list,
    check_ranks,
    check_same_shape,
    clean_padding,
    ideal_dcg,
    masked_mean,
    sample_rows,
    student_positions,
    very_negative,
    zero,
)


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
    mask = check_list("student", student, mask)
    check_same_shape("teacher_rank", teacher_rank, "student", student)
    check_ranks(teacher_rank, mask)
    student = clean_padding(student, mask)
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
    return masked_mean(bce, used, weight)


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
    mask = check_list("student", student, mask)
    check_same_shape("teacher_rank", teacher_rank, "student", student)
    check_ranks(teacher_rank, mask)
    student = clean_padding(student, mask)
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
            i = sample_rows(top, n_pairs, generator)
            j = sample_rows(tail, n_pairs, generator)
            row_ok = (top.sum(1) > 0) & (tail.sum(1) > 0)
            pair = row_ok[:, None].expand(-1, n_pairs)
        else:
            real = mask.to(student.dtype)
            i = sample_rows(real, n_pairs, generator)
            j = sample_rows(real, n_pairs, generator)
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
        return masked_mean(loss, pair)
    w = torch.where(pair, gap.abs(), torch.zeros_like(gap))
    w_sum = w.sum()
    if int(pair.sum()) == 0 or float(w_sum) == 0.0:
        return zero(student)
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
        mask = check_list("teacher_rank", teacher_rank, mask)
        check_ranks(teacher_rank, mask)
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
        mask = check_list("teacher_logits", teacher_logits, mask)
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
    max_dcg = ideal_dcg(gains, k)
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
    mask = check_list("student", student, mask)
    check_same_shape("relevance", relevance, "student", student)
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    student = clean_padding(student, mask)
    prep = _ndcg_setup(student, relevance, mask, k)
    if prep is None:
        return zero(student)
    rel, gains, max_dcg, row_ok, n_rows, idx, valid_i = prep
    G = gains / torch.where(row_ok, max_dcg, torch.ones_like(max_dcg))[:, None]

    L = student.shape[1]
    pos = student_positions(student, mask)  # [B, L] long
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
    pair_loss = F.softplus(-sigma * (s_i[:, :, None] - student[:, None, :])) / LN2
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
    mask = check_list("student", student, mask)
    check_same_shape("relevance", relevance, "student", student)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prep = _ndcg_setup(student, relevance, mask, None)
    if prep is None:
        return zero(student)
    rel, gains, max_dcg, row_ok, n_rows, idx, valid_i = prep
    s = clean_padding(student, mask)
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
    mask = check_list("student", student, mask)
    check_same_shape("teacher_logits", teacher_logits, "student", student)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    row_ok = mask.any(dim=1)
    neg = very_negative(student)
    log_p_s = F.log_softmax((student / temperature).masked_fill(~mask, neg), dim=1)
    t = teacher_logits.detach().to(student.dtype)
    log_p_t = F.log_softmax((t / temperature).masked_fill(~mask, neg), dim=1)
    kl = torch.where(mask, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s)).sum(dim=1)
    n_rows = int(row_ok.sum())
    if n_rows == 0:
        return zero(student)
    return torch.where(row_ok, kl, torch.zeros_like(kl)).sum() / n_rows * temperature**2
