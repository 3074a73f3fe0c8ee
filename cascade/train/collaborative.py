"""Choosing the teacher's collaborative term (:mod:`cascade.models.collaborative`) on validation outcomes.

Every (lambda, weight) of the grids is scored by the exposure weight's judge, on the same validation requests:

- logged clicks: the teacher's click-recall@k over the whole corpus. The best score is taken (ties to the smaller
  weight, weight 0: no term), not the one-SE rule: on ML-100K's four last 14-day periods x 3 seeds (43-89
  validation requests each) the one-SE rule kept the weight at 0 in 7 runs of 12 and the teacher's test
  click-recall@10 gained +0.003 from the term, the best validation score +0.010 (BENCHMARKS.md).
- the random slice (data that have one): the AUC of the ranking score on the validation split's randomly shown
  impressions, the lambda of the best AUC, then the smallest weight within one SE of the best (the one-SE rule,
  bootstrapped over requests, as for the exposure weight). EASE learns from logged clicks, and so from what the
  logging policy showed: on the world a weight of 0.1 that the AUC preferred by 0.00006 took the logged
  click-recall@10 of the distilled cascade from 0.079 to 0.108 and its oracle clicks@10 from 9.574 down to 9.470.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..arrays import topk_rows
from ..data.requests import impression_requests
from ..eval.metrics import auc, click_recall
from ..eval.selection import one_se_choice, one_se_columns, rows_of_units, unit_ranges
from ..models.collaborative import CollaborativeTerm
from ..models.scoring import ranker_scorer
from ..run_data import RunData
from .entire_space import random_slice

log = logging.getLogger(__name__)


def grid_choice(scores: dict[tuple[float, float], float]) -> tuple[float, float]:
    """The (lambda, weight) of the best score (nan: worst), ties to the smaller weight, then the smaller lambda."""
    return max(scores, key=lambda lw: (np.nan_to_num(scores[lw], nan=-np.inf), -lw[1], -lw[0]))


def corpus_scores(score, data: RunData, requests, seen=None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids int64 [R, I], ``score(requests, ids)`` [R, I]) over the whole corpus, -inf where ``seen`` (an
    :class:`~cascade.data.history.EventHistory`, or None) says the user was shown the item before the request."""
    ids = np.ascontiguousarray(np.broadcast_to(data.item_ids, (len(requests), len(data.item_ids))))
    s = score(requests, ids)
    if seen is not None:
        s = np.where(seen.seen(requests.user_id, ids, requests.time_ms), -np.inf, s)
    return ids, s


def choose_collaborative(model, data: RunData, lams: Sequence[float], weights: Sequence[float], judge=None,
                         k: int = 10, seed: int = 0,
                         pairs_per_batch: int = 262_144) -> tuple[CollaborativeTerm | None, list[dict]]:
    """The collaborative term of the grids ``lams`` x ``weights`` (weight 0: none) by the teacher's validation
    click-recall@k over the corpus for ``judge``'s requests (a :class:`~cascade.pipeline.judge.Judge`; seen items
    filtered as it says), or with ``judge`` None by the AUC on the validation split's randomly shown impressions
    (the one-SE rule over the weights, ``seed`` its bootstrap's; module docstring); and every pair's score
    [{"lambda", "weight", "valid_click_recall@k" | "valid_random_auc" (+ the one-SE columns at the chosen
    lambda)}]. ``model`` is scored without a term (its own ranking score), over the corpus in blocks of about
    ``pairs_per_batch`` pairs; sets ``model.collaborative`` to the choice."""
    model.collaborative = None
    score = ranker_scorer(model, data)
    grid = [(float(lam), float(w)) for lam in lams for w in sorted({0.0, *map(float, weights)})]
    lams = sorted({lam for lam, _ in grid})
    if judge is not None:
        what = f"valid_click_recall@{k}"
        tops: dict[tuple[float, float], list[np.ndarray]] = {lw: [] for lw in grid}
        block = max(1, pairs_per_batch // len(data.item_ids))
        for r0 in range(0, len(judge.requests), block):
            req = judge.requests.take(np.arange(r0, min(r0 + block, len(judge.requests))))
            ids, base = corpus_scores(score, data, req, judge.seen)
            for lam in lams:
                z = data.ease(lam).standardised(req, ids)
                for lam_w in (lw for lw in grid if lw[0] == lam):
                    tops[lam_w].append(topk_rows(base + np.float32(lam_w[1]) * z, ids, k)[0])
        scores = {lw: float(np.nanmean(click_recall(judge.clicked, np.concatenate(t)))) for lw, t in tops.items()}
        lam, w = grid_choice(scores)
        table = [{"lambda": lam_, "weight": w_, what: scores[(lam_, w_)]} for lam_, w_ in grid]
    else:
        shown = random_slice(data.split_impressions("valid"), "the collaborative term's random-slice judge")
        order, starts, lengths = unit_ranges(shown["request_id"].to_numpy())
        shown = shown.iloc[order]
        req = impression_requests(shown, data.context_names)
        cand = shown["item_id"].to_numpy(np.int64)[:, None]
        base, y = score(req, cand)[:, 0], shown["click"].to_numpy()
        what = "valid_random_auc"
        z = {lam: data.ease(lam).standardised(req, cand)[:, 0] for lam in lams}

        def random_auc(lam_: float, w_: float, units: np.ndarray | None = None) -> float:
            rows = slice(None) if units is None else rows_of_units(starts, lengths, units)
            return auc(y[rows], base[rows] + np.float32(w_) * z[lam_][rows])

        scores = {(lam_, w_): random_auc(lam_, w_) for lam_, w_ in grid}
        lam = grid_choice(scores)[0]
        w, rows = one_se_choice([w_ for lam_, w_ in grid if lam_ == lam], lambda w_, u: random_auc(lam, w_, u),
                                len(starts), seed=seed)
        one_se = {r["value"]: one_se_columns(r) for r in rows}
        table = [{"lambda": lam_, "weight": w_, what: scores[(lam_, w_)], **(one_se[w_] if lam_ == lam else {})}
                 for lam_, w_ in grid]
    term = CollaborativeTerm(lam, w) if w > 0 else None
    model.collaborative = term
    log.info("teacher's collaborative term: %s chosen (%s)", term, table)
    return term, table
