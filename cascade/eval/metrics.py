"""Evaluation metrics as pure, vectorised numpy functions.

Scoring metrics (``auc``, ``gauc``, ``logloss``, ``calibration``) take flat arrays ``[n]``. List metrics
(``recall_at_k``, ``click_recall``, ``ndcg_at_k``) take padded id arrays ``[B, *]`` whose padding value is
``pad`` (default -1) and return one value per row ``[B]`` (nan where the row has nothing to measure against;
average with :func:`row_mean`).

Undefined values are nan, not errors: ``auc`` of a set with one class only, ``gauc`` with no group having both
classes, ``calibration`` without positives, recall of a row without reference ids, NDCG of a row whose ideal DCG
is 0. Malformed input (shape mismatch, labels outside {0, 1}, non-finite scores) raises ValueError.
"""

from __future__ import annotations

import numpy as np

from ..arrays import first_occurrences

__all__ = [
    "auc",
    "gauc",
    "logloss",
    "calibration",
    "recall_at_k",
    "click_recall",
    "hit_rate",
    "ndcg_at_k",
    "click_ndcg",
    "list_diversity",
    "latency_summary",
]


# ----------------------------------------------------------------------------------------------------------------
# checks


def _binary_labels(y, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name} must hold binary labels 0/1, found {bad.tolist()}")
    return y.astype(np.int64)


def _finite_scores(s, n: int, name: str = "s") -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the labels, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} has {int((~np.isfinite(s)).sum())} non-finite values")
    return s


def _id_matrix(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [B, n] id array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    return a


# ----------------------------------------------------------------------------------------------------------------
# scoring metrics


def _average_ranks_sorted(keys_changed: np.ndarray) -> np.ndarray:
    """1-based average ranks of already sorted values; ``keys_changed[i]`` is True where element i starts a new
    tie block (element 0 must be True). Returns float64 ``[n]``."""
    n = keys_changed.size
    starts = np.flatnonzero(keys_changed)
    ends = np.append(starts[1:], n)  # exclusive
    block_avg = (starts + 1 + ends) / 2.0  # mean of 1-based ranks starts+1 .. ends
    return np.repeat(block_avg, ends - starts)


def auc(y, s) -> float:
    """ROC AUC from average ranks (Mann-Whitney U), equal to ``sklearn.metrics.roc_auc_score`` including ties.

    y: [n] labels in {0, 1}; s: [n] finite scores. nan when one class is absent (sklearn raises there).
    """
    y = _binary_labels(y)
    s = _finite_scores(s, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    new_block = np.empty(s.size, dtype=bool)
    new_block[0] = True
    new_block[1:] = s_sorted[1:] != s_sorted[:-1]
    ranks = _average_ranks_sorted(new_block)
    rank_sum_pos = ranks[y[order] == 1].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y, s, groups, weighted: bool = True) -> float:
    """Group AUC: AUC within each group (e.g. user or request), averaged over groups that have both classes.

    weighted=True weights each group by its size (impressions), else every group counts once.
    y: [n] labels in {0, 1}; s: [n] finite scores; groups: [n] group keys (any sortable dtype).
    One lexsort (group, score) gives within-group average ranks; no Python loop over groups. nan when no group
    has both classes.
    """
    y = _binary_labels(y)
    s = _finite_scores(s, y.size)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape} like the labels, got {groups.shape}")
    if y.size == 0:
        return float("nan")
    _, g = np.unique(groups, return_inverse=True)
    g = g.reshape(-1)
    order = np.lexsort((s, g))  # last key is primary: by group, then by score
    g_sorted, s_sorted, y_sorted = g[order], s[order], y[order]
    new_group = np.empty(y.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = g_sorted[1:] != g_sorted[:-1]
    new_block = new_group.copy()
    new_block[1:] |= s_sorted[1:] != s_sorted[:-1]
    # Global average ranks of the sorted array, minus each group's start offset = ranks within the group.
    ranks = _average_ranks_sorted(new_block)
    group_start = np.flatnonzero(new_group)
    ranks -= np.repeat(group_start, np.diff(np.append(group_start, y.size)))
    n_groups = group_start.size
    size = np.bincount(g_sorted, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(g_sorted, weights=y_sorted, minlength=n_groups)
    n_neg = size - n_pos
    rank_sum_pos = np.bincount(g_sorted, weights=ranks * y_sorted, minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    p, q = n_pos[valid], n_neg[valid]
    per_group = (rank_sum_pos[valid] - p * (p + 1) / 2.0) / (p * q)
    w = size[valid] if weighted else np.ones_like(per_group)
    return float((per_group * w).sum() / w.sum())


def logloss(y, p, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` [n] (clipped to [eps, 1 - eps]) against labels ``y`` [n]."""
    y = _binary_labels(y)
    p = _finite_scores(p, y.size, "p")
    if y.size == 0:
        raise ValueError("logloss of an empty set")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p must be probabilities in [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def calibration(y, p) -> float:
    """Calibration ratio mean(p) / mean(y) (1 = calibrated; > 1 over-predicts). nan when there is no positive."""
    y = _binary_labels(y)
    p = _finite_scores(p, y.size, "p")
    if y.size == 0 or y.sum() == 0:
        return float("nan")
    return float(p.mean() / y.mean())


# ----------------------------------------------------------------------------------------------------------------
# list metrics


def _row_keys(ids_a: np.ndarray, ids_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map the ids of two ``[B, *]`` arrays to int64 keys unique per (row, id): row * U + (id - min id).

    U is the id range; where B * U would overflow int64 the ids are first compacted with np.unique (slower).
    Returns (keys_a, keys_b, U); row = key // U.
    """
    both = [x for x in (ids_a, ids_b) if x.size]
    if not both:
        return ids_a.astype(np.int64), ids_b.astype(np.int64), 1
    lo = min(int(x.min()) for x in both)
    hi = max(int(x.max()) for x in both)
    n_rows = max(ids_a.shape[0], 1)
    if (hi - lo + 1) * n_rows < 2**62:
        n_unique = hi - lo + 1
        code_a, code_b = ids_a.astype(np.int64) - lo, ids_b.astype(np.int64) - lo
    else:
        _, codes = np.unique(np.concatenate([ids_a.ravel(), ids_b.ravel()]), return_inverse=True)
        n_unique = int(codes.max()) + 1
        codes = codes.reshape(-1).astype(np.int64)
        code_a, code_b = codes[: ids_a.size].reshape(ids_a.shape), codes[ids_a.size :].reshape(ids_b.shape)
    keys_a = np.arange(ids_a.shape[0], dtype=np.int64)[:, None] * n_unique + code_a
    keys_b = np.arange(ids_b.shape[0], dtype=np.int64)[:, None] * n_unique + code_b
    return keys_a, keys_b, n_unique


def _member(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Boolean mask of ``keys`` present in ``table`` (1-D), by sort + searchsorted (faster than np.isin here)."""
    if table.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    table = np.sort(table)
    pos = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return table[pos] == keys


def _overlap_fraction(reference: np.ndarray, retrieved: np.ndarray, pad: int) -> np.ndarray:
    if reference.shape[0] != retrieved.shape[0]:
        raise ValueError(f"row counts differ: reference {reference.shape[0]} vs retrieved {retrieved.shape[0]}")
    ref_valid = reference != pad
    ret_valid = retrieved != pad
    ref_keys, ret_keys, _ = _row_keys(reference, retrieved)
    # Padding is excluded from both sides: a padded retrieved slot can never match.
    found = _member(ref_keys, ret_keys[ret_valid]) & ref_valid
    n_ref = ref_valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_ref > 0, found.sum(axis=1) / n_ref, np.nan)


def recall_at_k(reference, retrieved, pad: int = -1) -> np.ndarray:
    """Per-row recall |ref ∩ ret| / |ref| (e.g. teacher-recall@K: ref = the teacher's top-K over the corpus).

    reference: [B, K] int ids (the reference set, ids unique within a row); retrieved: [B, N] int ids.
    Entries equal to ``pad`` are excluded from both; |ref| counts the row's non-pad reference ids, so a full row
    divides by K. Returns float64 [B] in [0, 1], nan for a row with no reference id.
    """
    reference = _id_matrix(reference, "reference")
    retrieved = _id_matrix(retrieved, "retrieved")
    return _overlap_fraction(reference, retrieved, pad)


def mean_recall_at_k(reference, retrieved, pad: int = -1) -> float:
    """Mean of :func:`recall_at_k` over the rows that have a reference id (e.g. an index's recall against exact
    search: reference = the exact ids, retrieved = the index's). ValueError when no row has one."""
    r = recall_at_k(reference, retrieved, pad)
    if r.size == 0 or np.isnan(r).all():
        raise ValueError("mean_recall_at_k: no row has a reference id (all padding): recall is undefined")
    return float(np.nanmean(r))


def row_mean(values) -> float:
    """Mean of a list metric's defined rows (``values`` [B], nan where a row has nothing to measure against): nan,
    without numpy's empty-slice warning, where no row is defined (a bootstrap sample of rows without clicks)."""
    v = np.asarray(values, dtype=np.float64)
    defined = v[~np.isnan(v)]
    return float(defined.mean()) if defined.size else float("nan")


def click_recall(clicked, retrieved, pad: int = -1) -> np.ndarray:
    """Per-row click recall |clicked ∩ retrieved| / |clicked|.

    clicked: [B, C] int ids padded with ``pad``; retrieved: [B, N] int ids. Returns float64 [B], nan for a row
    without clicks.
    """
    clicked = _id_matrix(clicked, "clicked")
    retrieved = _id_matrix(retrieved, "retrieved")
    return _overlap_fraction(clicked, retrieved, pad)


def hit_rate(clicked, retrieved, pad: int = -1) -> np.ndarray:
    """Per-row HitRate: 1.0 when any clicked id is among the retrieved ids, else 0.0.

    clicked: [B, C] int ids padded with ``pad``; retrieved: [B, N] int ids. Returns float64 [B], nan for a row
    without clicks.
    """
    r = click_recall(clicked, retrieved, pad)
    return np.where(np.isnan(r), np.nan, (r > 0).astype(np.float64))


def ndcg_at_k(ranked_ids, rel_ids, rel_grades, k: int, pad: int = -1) -> np.ndarray:
    """Per-row NDCG@k of an order against graded relevance: DCG = sum_i (2^rel_i - 1) / log2(i + 1), i = 1..k.

    ranked_ids: [B, n] int ids in ranked order (``pad`` slots gain 0); rel_ids: [B, L] int ids with
    rel_grades: [B, L] grades >= 0 (e.g. from ``graded_relevance``); an id absent from its row's lookup has
    grade 0. The ideal DCG sorts the row's grades. Returns float64 [B], nan where the ideal DCG is 0.
    """
    ranked_ids = _id_matrix(ranked_ids, "ranked_ids")
    rel_ids = _id_matrix(rel_ids, "rel_ids")
    rel_grades = np.asarray(rel_grades, dtype=np.float64)
    if rel_grades.shape != rel_ids.shape:
        raise ValueError(f"rel_grades shape {rel_grades.shape} != rel_ids shape {rel_ids.shape}")
    if ranked_ids.shape[0] != rel_ids.shape[0]:
        raise ValueError(f"row counts differ: ranked_ids {ranked_ids.shape[0]} vs rel_ids {rel_ids.shape[0]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel_valid = rel_ids != pad
    if not np.isfinite(rel_grades[rel_valid]).all() or (rel_grades[rel_valid] < 0).any():
        raise ValueError("rel_grades must be finite and >= 0")
    gains_table = np.where(rel_valid, np.exp2(rel_grades) - 1.0, 0.0)

    top = ranked_ids[:, :k]
    ranked_keys, rel_keys, n_unique = _row_keys(top, rel_ids)
    valid_keys = rel_keys[rel_valid]
    valid_gains = gains_table[rel_valid]
    order = np.argsort(valid_keys, kind="stable")
    sorted_keys = valid_keys[order]
    if sorted_keys.size > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        dup_row = int(sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]][0] // n_unique)
        raise ValueError(f"rel_ids has a duplicated id in row {dup_row}")
    # Look every ranked id up in its row's relevance table (sorted keys + searchsorted, no loop over rows).
    pos = np.searchsorted(sorted_keys, ranked_keys)
    pos_clipped = np.minimum(pos, max(sorted_keys.size - 1, 0))
    hit = (sorted_keys.size > 0) & (top != pad)
    if sorted_keys.size:
        hit = hit & (sorted_keys[pos_clipped] == ranked_keys)
        gains = np.where(hit, valid_gains[order][pos_clipped], 0.0)
    else:
        gains = np.zeros(top.shape)
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = (gains * discounts).sum(axis=1)

    ideal_gains = -np.sort(-gains_table, axis=1)[:, :k]
    idcg = (ideal_gains * (1.0 / np.log2(np.arange(2, ideal_gains.shape[1] + 2)))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def click_ndcg(ranked_ids, clicked, k: int, pad: int = -1) -> np.ndarray:
    """Per-row NDCG@k of an order against the held-out clicks (binary relevance: a clicked id has grade 1).

    ranked_ids: [B, n] int ids in ranked order; clicked: [B, C] clicked ids padded with ``pad`` (an id clicked
    twice counts once). The ideal DCG puts min(|clicked|, k) clicks on top. Returns float64 [B], nan for a row
    without clicks.
    """
    clicked = _id_matrix(clicked, "clicked")
    clicked = first_occurrences(clicked, clicked.shape[1], pad)[0]
    return ndcg_at_k(ranked_ids, clicked, np.ones(clicked.shape), k, pad)


def list_diversity(lists, n_items: int, top: int = 10, pad: int = -1) -> dict[str, float]:
    """How varied a set of recommendation lists is. lists: [B, k] int ids (``pad`` = empty slot).

    distinct: distinct ids over all lists; coverage: distinct / n_items (the catalogue size); top_share: share of
    the filled slots taken by the ``top`` most frequent ids (1.0 when everyone gets the same ``top`` items).
    """
    lists = _id_matrix(lists, "lists")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    ids = lists[lists != pad]
    if ids.size == 0:
        return {"distinct": 0, "coverage": 0.0, "top_share": float("nan")}
    _, counts = np.unique(ids, return_counts=True)
    top_counts = -np.sort(-counts)[:top]
    return {"distinct": int(counts.size), "coverage": float(counts.size / n_items),
            "top_share": float(top_counts.sum() / ids.size)}


def paired_difference(a, b) -> dict[str, float]:
    """Mean per-row difference a - b of two measurements of the same rows [n] (e.g. two lists' click-recall on the
    same requests), over the rows where both are finite: {"diff", "se" (its standard error, std(ddof=1) / sqrt(n);
    nan below 2 rows), "n"}. The paired SE is what says whether two lists differ beyond the requests' noise."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} vs {b.shape} rows")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return {"diff": float("nan"), "se": float("nan"), "n": 0}
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "n": int(d.size)}


def paired_ratio_difference(a, b, m) -> dict[str, float]:
    """Difference of two pooled ratios over the same rows [n], sum(a) / sum(m) - sum(b) / sum(m) (e.g. two lists'
    expected clicks over the requests' expected clicks on the whole corpus), with its delta-method standard error
    sqrt(n / (n - 1) * sum((z - D m)^2)) / sum(m), z = a - b, D the difference: {"diff", "se", "n"} (nan SE below
    2 rows)."""
    a, b, m = (np.asarray(x, np.float64).ravel() for x in (a, b, m))
    if not a.shape == b.shape == m.shape:
        raise ValueError(f"paired_ratio_difference: {a.shape}, {b.shape} and {m.shape} rows")
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(m)
    z, m = (a - b)[ok], m[ok]
    if z.size == 0 or m.sum() <= 0:
        return {"diff": float("nan"), "se": float("nan"), "n": int(z.size)}
    d = float(z.sum() / m.sum())
    se = float(np.sqrt(z.size / (z.size - 1) * np.sum((z - d * m) ** 2)) / m.sum()) if z.size > 1 else float("nan")
    return {"diff": d, "se": se, "n": int(z.size)}


def pooled_difference(gaps) -> dict[str, float]:
    """:func:`paired_difference` over the union of disjoint row sets, from each set's {"diff", "se", "n"} (e.g. the
    test requests of consecutive periods): the mean over all rows, sum(n d) / N, and its stratified standard error
    sqrt(sum (n se)^2) / N."""
    n = np.array([g["n"] for g in gaps], np.float64)
    d = np.array([g["diff"] for g in gaps], np.float64)
    se = np.array([g["se"] for g in gaps], np.float64)
    return {"diff": float(n @ d / n.sum()), "se": float(np.sqrt(np.sum((n * se) ** 2)) / n.sum()),
            "n": int(n.sum())}


def latency_summary(seconds) -> dict[str, float]:
    """Latency percentiles of per-request times in seconds [n] -> {"p50_ms", "p95_ms", "p99_ms", "mean_ms", "n"}."""
    t = np.asarray(seconds, dtype=np.float64).ravel()
    if t.size == 0:
        raise ValueError("latency_summary needs at least one timing")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("latencies must be finite and >= 0 seconds")
    ms = t * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "n": int(t.size)}
