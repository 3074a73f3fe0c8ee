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

With ``popular_days``, the term can also take the classic prior most-popular + EASE that a ranker of rated logs
trails: first the prior alone, log(1 + clicks in the trailing days) standardised over the corpus + b x the
standardised EASE scores, (days, lambda, b) by its own validation score (the best, ties to the smaller b, lambda and
window); then the teacher's score (with the chosen EASE weight) + t x SD x the prior, t from (0, PRIOR_WEIGHTS):

- logged clicks: SD the mean over the validation requests of the SD of that score over the corpus; t the largest
  within one SE of the best click-recall (one-SE rule, bootstrapped over requests): the teacher's own score must
  beat the classic prior, a list that logged clicks reward and that learns nothing, by more than the validation's
  noise to weigh more than at the grid's largest t. On ML-100K's four last 14-day periods x 3 seeds the prior took
  the distilled cascade's test click-recall@10 from 0.1392 to 0.1469 with t of the best score, and leaning to the
  prior from 0.1469 to 0.1531, where the prior alone keeps 0.1523 (BENCHMARKS.md, "The teacher's classic prior"
  and "The classic prior alone as a baseline").
- the random slice: SD that of the score over the randomly shown impressions (a random sample of the corpus); the
  smallest t within one SE of the best AUC. The prior is made of logged clicks, which favour what the logging policy
  showed; the slice, shown at random, does not: on the world every t > 0 lowers the AUC and 0 is kept (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..arrays import topk_rows
from ..data.requests import impression_requests
from ..eval.metrics import auc, click_recall, row_mean
from ..eval.selection import one_se_choice, one_se_columns, rows_of_units, unit_ranges
from ..models.collaborative import CollaborativeTerm
from ..models.scoring import ranker_scorer
from ..run_data import RunData
from .entire_space import random_slice

log = logging.getLogger(__name__)


#: the classic prior's EASE lambdas and weights (most-popular + b x EASE, both standardised over the corpus; b > 0:
#: trailing popularity alone beside the teacher lost test clicks on ML-100K, BENCHMARKS.md) and its weights beside
#: the teacher (in units of the SD of the teacher's ranking score over the corpus)
PRIOR_EASE_LAMBDAS = (50.0, 200.0, 800.0)
PRIOR_EASE_WEIGHTS = (0.25, 0.5, 1.0, 2.0)
PRIOR_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


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


def _popular_prior(data: RunData, blocks: list, served: list, sd: float, days_grid: Sequence[float],
                   refresh_ms: int, score_of, choose_weight, what: str
                   ) -> tuple[tuple[float, float, float, float] | None, list[dict]]:
    """The classic prior most-popular + EASE, then its weight beside the teacher (module docstring), on validation
    blocks [(requests, item ids [R, I])] (the corpus for logged clicks, the randomly shown item [R, 1] for the random
    slice), ``served`` the teacher's served score per block [R, I] (-inf: a seen item) and ``sd`` its spread.
    score_of(blend) -> the validation score of blend(i) -> scores [R, I] of block i; choose_weight(weights,
    blend_of_t) -> (the chosen t, {t: the grid row's score columns}). Returns (the prior's weight in ranking-score
    units, its EASE weight, days and lambda), None where weight 0 won; and the grid's rows."""
    zpop = {d: [data.popular_channel(d, refresh_ms).standardised(b[0], b[1], len(data.item_ids)) for b in blocks]
            for d in days_grid}
    zease = {lam_: [data.ease(lam_).standardised(b[0], b[1]) for b in blocks] for lam_ in PRIOR_EASE_LAMBDAS}
    rows, prior = [], {}
    for d in days_grid:
        for lam_ in PRIOR_EASE_LAMBDAS:
            for b in PRIOR_EASE_WEIGHTS:
                prior[(d, lam_, b)] = score_of(lambda i, d=d, lam_=lam_, b=b: np.where(  # -inf: a seen item
                    np.isfinite(served[i]), zpop[d][i] + np.float32(b) * zease[lam_][i], -np.inf))
                rows.append({"popular_days": d, "prior_lambda": lam_, "prior_ease_weight": b,
                             what: prior[(d, lam_, b)], "part": "prior alone"})
    # ties: the smaller EASE weight, then the smaller lambda and window
    days, plam, b = max(prior, key=lambda x: (np.nan_to_num(prior[x], nan=-np.inf), -x[2], -x[1], -x[0]))
    t, columns = choose_weight((0.0, *PRIOR_WEIGHTS), lambda t_: lambda i: served[i] + np.float32(t_ * sd) * (
        zpop[days][i] + np.float32(b) * zease[plam][i]))
    rows += [{"popular_days": days, "prior_lambda": plam, "prior_ease_weight": b, "prior_weight": t_,
              "score_sd": sd, **columns[t_], "part": "beside the teacher"} for t_ in (0.0, *PRIOR_WEIGHTS)]
    return (None if t == 0 else (t * sd, b, days, plam)), rows


def choose_collaborative(model, data: RunData, lams: Sequence[float], weights: Sequence[float], judge=None,
                         k: int = 10, seed: int = 0, popular_days: Sequence[float] = (),
                         refresh_ms: int = 3_600_000,
                         pairs_per_batch: int = 262_144) -> tuple[CollaborativeTerm | None, list[dict]]:
    """The collaborative term of the grids ``lams`` x ``weights`` (weight 0: none) by the teacher's validation
    click-recall@k over the corpus for ``judge``'s requests (a :class:`~cascade.pipeline.judge.Judge`; seen items
    filtered as it says), or with ``judge`` None by the AUC on the validation split's randomly shown impressions
    (the one-SE rule over the weights, ``seed`` its bootstrap's; module docstring); and every pair's score
    [{"lambda", "weight", "valid_click_recall@k" | "valid_random_auc" (+ the one-SE columns at the chosen
    lambda)}], then with ``popular_days`` the classic prior's rows ({"part": "prior alone" | "beside the teacher",
    ...}: :func:`_popular_prior`). ``model`` is scored without a term (its own ranking score), over the corpus in
    blocks of about ``pairs_per_batch`` pairs; sets ``model.collaborative`` to the choice."""
    model.collaborative = None
    score = ranker_scorer(model, data)
    grid = [(float(lam), float(w)) for lam in lams for w in sorted({0.0, *map(float, weights)})]
    lams = sorted({lam for lam, _ in grid})
    popular = None
    if judge is not None:
        what = f"valid_click_recall@{k}"
        block = max(1, pairs_per_batch // len(data.item_ids))
        blocks = []  # per block of requests: (requests, ids, ranking score, {lambda: standardised EASE})
        for r0 in range(0, len(judge.requests), block):
            req = judge.requests.take(np.arange(r0, min(r0 + block, len(judge.requests))))
            ids, base = corpus_scores(score, data, req, judge.seen)
            blocks.append((req, ids, base, {lam: data.ease(lam).standardised(req, ids) for lam in lams}))

        def per_request(blend) -> np.ndarray:
            """Validation click-recall@k [R] over the corpus of blend(i) -> scores [R_i, I] of block i."""
            tops = [topk_rows(blend(i), blk[1], k)[0] for i, blk in enumerate(blocks)]
            return click_recall(judge.clicked, np.concatenate(tops))

        def recall_of(blend) -> float:
            return row_mean(per_request(blend))

        scores = {lw: recall_of(lambda i, lw=lw: blocks[i][2] + np.float32(lw[1]) * blocks[i][3][lw[0]])
                  for lw in grid}
        lam, w = grid_choice(scores)
        table = [{"lambda": lam_, "weight": w_, what: scores[(lam_, w_)]} for lam_, w_ in grid]
        if popular_days:
            # the teacher's served score (with the chosen EASE term) per request over the corpus: the mean of its SD
            # per request puts the standardised prior on the ranking score's scale
            served = [blk[2] + np.float32(w) * blk[3][lam] for blk in blocks]
            sd = float(np.mean(np.concatenate([np.nanstd(np.where(np.isfinite(s), s, np.nan), axis=1)
                                               for s in served])))

            def lean_to_prior(weights, blend_of_t) -> tuple[float, dict]:
                """The largest weight within one SE of the best validation click-recall (one-SE rule)."""
                by_t = {t: per_request(blend_of_t(t)) for t in weights}
                t, rows = one_se_choice(weights, lambda t_, u: row_mean(by_t[t_][u]), len(judge.requests),
                                        seed=seed, prefer=max(weights))
                return t, {row["value"]: {what: row["score"], **one_se_columns(row)} for row in rows}

            popular, popular_table = _popular_prior(data, [blk[:2] for blk in blocks], served, sd, popular_days,
                                                    refresh_ms, recall_of, lean_to_prior, what)
            table += popular_table
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
        if popular_days:
            # the teacher's served score over the randomly shown impressions: its SD there (over a random sample of
            # the corpus, across requests) puts the standardised prior on the ranking score's scale
            served = base + np.float32(w) * z[lam]

            def one_se_weight(weights, blend_of_t) -> tuple[float, dict]:
                """The smallest weight within one SE of the best AUC (0: no prior)."""
                blended = {t: blend_of_t(t)(0)[:, 0] for t in weights}
                t, by_t = one_se_choice(weights, lambda t_, u: auc(y[(r := rows_of_units(starts, lengths, u))],
                                                                   blended[t_][r]), len(starts), seed=seed)
                return t, {row["value"]: {what: row["score"], **one_se_columns(row)} for row in by_t}

            popular, popular_table = _popular_prior(data, [(req, cand)], [served[:, None]], float(np.std(served)),
                                                    popular_days, refresh_ms, lambda blend: auc(y, blend(0)[:, 0]),
                                                    one_se_weight, what)
            table += popular_table
    if popular is not None:  # (prior weight x SD, its EASE weight b, days, its lambda)
        pw, b, days, plam = popular
        term = CollaborativeTerm(lam, w, pw, days, refresh_ms, plam, pw * b)
    else:
        term = CollaborativeTerm(lam, w) if w > 0 else None
    model.collaborative = term
    log.info("teacher's collaborative term: %s chosen (%s)", term, table)
    return term, table
