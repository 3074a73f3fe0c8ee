"""Choosing a setting from a grid on validation: the one-standard-error rule.

A grid of settings is ordered from the simplest (0: no distillation, no exposure term) up. Picking the best
validation score overfits the validation split when the grid's scores differ by less than the split's noise (a
small split chooses a distillation scale that then loses on test). So a setting is chosen by the one-standard-error
rule (Breiman et al., 1984): the smallest grid value whose score is within one standard error of the best score,
the standard error being that of the paired gap best - value. The gap is paired because both settings are scored
on the same validation requests; its standard error is bootstrapped over requests (rows of one request are
correlated), so the same rule serves a mean over requests (click-recall) and a statistic over rows grouped by
request (AUC).

Where a setting other than the smallest is the reference (the entire-space teacher's exposure weight judged by
logged clicks: 1 is the product rule P(shown) P(click | shown), 0 drops exposure altogether, and neither is "no
change"), ``prefer`` names it: among the settings within one SE of the best, the one closest to it is chosen.

:func:`one_se_choice` takes the statistic as a function of a sample of request indices; :func:`rows_of_units`
turns a sample of requests into the row indices of their impressions. A grid whose largest value scores best stops
short of the best setting: :func:`widen_top` doubles it while that holds, before the rule chooses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 200  # bootstrap resamples of the validation requests


def bootstrap_samples(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """int64 [n_boot, n_units]: resamples (with replacement) of the units 0..n_units-1."""
    if n_units < 1:
        raise ValueError(f"bootstrap over {n_units} units: need at least one")
    return np.random.default_rng(seed).integers(0, n_units, size=(n_boot, n_units))


def paired_bootstrap(statistics: dict, n_units: int, n_boot: int = N_BOOT,
                     seed: int = 0) -> tuple[dict, dict]:
    """Scores of several settings on the same units and on the same bootstrap resamples of them.

    statistics: key -> f(units int64 [n]) -> score. Returns ({key: score over all units}, {key: float [n_boot]
    scores over each resample}); differences of two keys' resample scores are paired."""
    everything = np.arange(n_units)
    scores = {k: float(f(everything)) for k, f in statistics.items()}
    samples = bootstrap_samples(n_units, n_boot, seed)
    return scores, {k: np.array([f(u) for u in samples], np.float64) for k, f in statistics.items()}


def gap_se(boot_a: np.ndarray, boot_b: np.ndarray) -> float:
    """Bootstrap SE of the paired gap a - b from resample scores [n_boot] (nan resamples left out)."""
    d = boot_a - boot_b
    d = d[np.isfinite(d)]
    return float(d.std(ddof=1)) if len(d) > 1 else float("nan")


def widen_top(tried: dict, evaluate: Callable[[float], object], score: Callable[[object], float],
              doublings: int) -> dict:
    """``tried`` (grid value -> what :func:`evaluate` gave for it) with twice its largest value added while that
    value scores best of all tried (ties go to the smaller value) and is above 0, at most ``doublings`` times.
    score(result) -> its validation score (higher is better). Returns ``tried``, widened in place."""
    for _ in range(doublings):
        top = max(tried)
        if top <= 0 or max(tried, key=lambda v: (np.nan_to_num(score(tried[v]), nan=-np.inf), -v)) != top:
            break
        tried[2 * top] = evaluate(2 * top)
    return tried


def one_se_choice(grid: Sequence[float], statistic: Callable[[float, np.ndarray], float], n_units: int,
                  n_boot: int = N_BOOT, seed: int = 0, prefer: float | None = None) -> tuple[float, list[dict]]:
    """The smallest value of ``grid`` whose score is within one standard error of the best score (``prefer``: the
    one closest to ``prefer`` among those, the smaller on a tie).

    statistic(value, units int64 [n]) -> the setting's score over those units (higher is better; nan where the
    sample has nothing to score). Returns (chosen value, one row per value in ascending order: {"value", "score"
    (over all units), "gap" (best score - score), "se" (bootstrap SE of the paired gap), "within_one_se"}).
    """
    values = sorted(float(v) for v in grid)
    if not values:
        raise ValueError("one_se_choice: empty grid")
    scores, boot = paired_bootstrap({v: (lambda u, v=v: statistic(v, u)) for v in values}, n_units, n_boot, seed)
    best = max(values, key=lambda v: (np.nan_to_num(scores[v], nan=-np.inf), -v))
    rows = []
    for v in values:
        gap, se = scores[best] - scores[v], gap_se(boot[best], boot[v])
        rows.append({"value": v, "score": scores[v], "gap": gap, "se": se,
                     "within_one_se": bool(v == best or (np.isfinite(gap) and gap <= se))})
    within = [r["value"] for r in rows if r["within_one_se"]]
    chosen = within[0] if prefer is None else min(within, key=lambda v: (abs(v - prefer), v))
    return chosen, rows


def one_se_columns(row: dict) -> dict:
    """A grid row's one-SE-rule columns as manifests record them: its gap to the best score, the SE of that gap,
    and whether it is within one SE."""
    return {"gap_to_best": row["gap"], "se_of_gap": row["se"], "within_one_se": row["within_one_se"]}


def rows_of_units(starts: np.ndarray, lengths: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Row indices [sum lengths[units]] of the units ``units`` (with repeats), unit u owning rows
    starts[u] .. starts[u] + lengths[u] - 1 (rows sorted by unit)."""
    n = lengths[units]
    first = np.repeat(starts[units] - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return first + np.arange(int(n.sum()))


def unit_ranges(unit_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order int64 [N]: rows sorted by unit, starts [U], lengths [U]) of the distinct units of ``unit_of_row``
    [N] (e.g. request ids), so that ``order[rows_of_units(starts, lengths, units)]`` are the rows of ``units``."""
    order = np.argsort(unit_of_row, kind="stable")
    _, starts, lengths = np.unique(unit_of_row[order], return_index=True, return_counts=True)
    return order, starts, lengths
