"""Entire-space training of the teacher: impressions plus sampled unshown items, and the exposure weight.

For every request of a split, ``round(unshown_per_shown x its impressions)`` items are drawn from the items that
exist at the request's time (first logged at or before it) and were not shown in it: a share ``popularity_share``
by train popularity, the rest uniformly (:func:`sample_unshown`). Their feature rows come from the same pair encoder
that serves requests, so training and serving read one feature path. Each row carries ``shown`` (1 for an
impression, 0 for a sampled item) and ``log_mq`` = log(m q(i)): m draws per request from a sampler with
probability q(i) make "shown or sampled?" a classifier whose logit is log p(shown) - log(m q) (sampled-softmax's
log-Q correction, for a binary task), so the exposure model learns the log-propensity itself.

:func:`entire_space_loss` trains an :class:`~cascade.models.entire_space.EntireSpaceRanker`: click BCE on the
impressions (P(click | shown), as a plain teacher) plus ``w_exposure`` x BCE of (exposure logit - log_mq) against
``shown``. :func:`choose_exposure_weight` then picks how much exposure the corpus-wide ranking uses, by
validation click-recall over the whole corpus, or (:func:`choose_exposure_weight_by_random_auc`) by the AUC of the
ranking score on the validation split's randomly shown impressions, free of the logging policy's bias.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..arrays import PAD, distinct, first_occurrences, topk_rows
from ..data.batches import EncodedTable
from ..data.requests import Requests, impression_requests, request_start_ms, requests_frame, to_requests
from ..eval.metrics import auc, click_recall, row_mean
from ..eval.selection import one_se_choice, one_se_columns, rows_of_units, unit_ranges
from ..models.entire_space import EntireSpaceRanker
from ..models.scoring import score_pairs
from ..run_data import RunData
from ..threads import ordered_map

log = logging.getLogger(__name__)

#: The exposure weight the logged-clicks judge leans to among weights validation cannot tell apart: 1 ranks by
#: log P(click | shown) + log P(shown), ESMM's P(click, shown); logged clicks need an exposure, so 0 (no exposure)
#: is not a safer default there. The random-slice judge leans to 0 instead (the plain one-SE rule): it scores
#: P(click | shown at random) itself, which the exposure term, the logging policy's, cannot improve where the
#: judge cannot see it; 0 also skips the exposure model's forward wherever the teacher ranks
PRODUCT_RULE = 1.0


def sample_unshown(data: RunData, split: str, unshown_per_shown: float, popularity_share: float,
                   rng: np.random.Generator) -> tuple[Requests, np.ndarray, np.ndarray, np.ndarray]:
    """(requests of ``split`` (R), sampled item ids int64 [R, W] PAD-padded, log_mq float32 [R, W], log_mq of
    each impression [N rows of the split, in its order]).

    Per request round(unshown_per_shown x its impressions) items (at least 1), each existing at the request's
    time and not shown in it, without repeats. q(i): the sampler's probability of item i (the uniform /
    popularity mixture over the corpus; rejected draws are redrawn, which the log-Q term ignores)."""
    imp = data.split_impressions(split)
    frame = requests_frame(imp, data.context_names)
    items = data.item_ids
    n_items = len(items)
    row_of = np.searchsorted(items, imp["item_id"].to_numpy(np.int64))
    # existence: an item exists from its first logged request on (over the whole log: an item is not sampled
    # before it was ever shown)
    all_imp = data.impressions
    first = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(first, np.searchsorted(items, all_imp["item_id"].to_numpy(np.int64)), request_start_ms(all_imp))
    train = data.split_impressions("train")
    pop = np.bincount(np.searchsorted(items, train["item_id"].to_numpy(np.int64)), minlength=n_items) + 1.0
    q = (1.0 - popularity_share) / n_items + popularity_share * pop / pop.sum()
    cdf = np.cumsum(q)
    cdf /= cdf[-1]
    per_req = imp.groupby("request_id", sort=False).size().reindex(frame.request_id).to_numpy()
    want = np.maximum(1, np.round(unshown_per_shown * per_req)).astype(np.int64)
    width = int(want.max())
    r = len(frame)
    req_row = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy()).loc[imp["request_id"]].to_numpy()
    shown_keys = distinct(req_row.astype(np.int64) * n_items + row_of)
    t = frame.time_ms.to_numpy(np.int64)
    out = np.full((r, width), PAD, np.int64)
    todo = np.arange(r)
    for _ in range(8):  # redraw rows that lost draws to rejection (rare after the first round)
        if not len(todo):
            break
        draws = np.searchsorted(cdf, rng.random((len(todo), 2 * width + 8)))
        keys = todo[:, None] * n_items + draws
        pos = np.minimum(np.searchsorted(shown_keys, keys), max(len(shown_keys) - 1, 0))
        ok = (first[draws] <= t[todo, None]) & ~((len(shown_keys) > 0) & (shown_keys[pos] == keys))
        cand = np.concatenate([out[todo], np.where(ok, draws, PAD)], axis=1)
        out[todo] = first_occurrences(cand, width)[0]
        got = (out[todo] != PAD).sum(axis=1)
        todo = todo[got < np.minimum(want[todo], n_items)]
    out = np.where(np.arange(width)[None, :] < want[:, None], out, PAD)
    m = want.astype(np.float64)
    log_mq = np.where(out != PAD, np.log(m[:, None] * q[np.maximum(out, 0)]), 0.0).astype(np.float32)
    log_mq_shown = np.log(m[req_row] * q[row_of]).astype(np.float32)
    return to_requests(frame, data.context_names), np.where(out == PAD, PAD, items[np.maximum(out, 0)]), log_mq, \
        log_mq_shown


def entire_space_table(data: RunData, split: str, unshown_per_shown: float, popularity_share: float,
                       rng: np.random.Generator) -> EncodedTable:
    """The split's encoded impressions (``shown`` = 1) followed by sampled unshown items (``shown`` = 0, label 0),
    with ``log_mq`` per row; privileged columns of a sampled row are missing (OOV / 0)."""
    base = data.encoded(split)
    req, sampled, log_mq, log_mq_shown = sample_unshown(data, split, unshown_per_shown, popularity_share, rng)
    ok = sampled != PAD
    rows = np.broadcast_to(np.arange(len(req))[:, None], sampled.shape)[ok]
    cat, num = data.pair_features(req.take(rows), sampled[ok][:, None])
    spec = base.spec
    cat = np.concatenate([cat, np.zeros((len(cat), len(spec.cat_names) - cat.shape[1]), cat.dtype)], axis=1)
    num = np.concatenate([num, np.zeros((len(num), len(spec.num_names) - num.shape[1]), num.dtype)], axis=1)
    n = len(cat)
    extra = {k: np.concatenate([v, np.zeros(n, v.dtype) if v.dtype.kind in "iub" else np.full(n, np.nan, v.dtype)])
             for k, v in base.extra.items()}
    extra["shown"] = np.r_[np.ones(len(base), np.float32), np.zeros(n, np.float32)]
    extra["log_mq"] = np.r_[log_mq_shown, log_mq[ok]]
    return EncodedTable(spec, np.concatenate([base.cat, cat]), np.concatenate([base.num, num]),
                        np.r_[base.label, np.zeros(n, base.label.dtype)], np.r_[base.request_id, req.request_id[rows]],
                        np.r_[base.user_id, req.user_id[rows]], np.r_[base.item_id, sampled[ok]],
                        np.r_[base.time_ms, req.time_ms[rows]], np.r_[base.is_rand, np.zeros(n, base.is_rand.dtype)],
                        extra)


def entire_space_loss(w_exposure: float = 1.0):
    """loss_fn for :func:`cascade.train.loop.fit` on an :class:`EntireSpaceRanker` and an
    :func:`entire_space_table`: click BCE on the shown rows + w_exposure x exposure BCE on all rows."""
    if not (np.isfinite(w_exposure) and w_exposure > 0):
        raise ValueError(f"entire_space_loss: w_exposure must be > 0, got {w_exposure}")

    def loss_fn(model: EntireSpaceRanker, batch: dict[str, torch.Tensor], step: int):
        cat, num = batch["cat"], batch["num"]
        shown, log_mq = batch["shown"].float(), batch["log_mq"].float()
        click = model.click(cat, num)
        expo = model.exposure(cat, num)
        n_shown = shown.sum().clamp(min=1.0)
        per_row = F.binary_cross_entropy_with_logits(click, batch["label"].float(), reduction="none")
        bce = (per_row * shown).sum() / n_shown
        exposure = F.binary_cross_entropy_with_logits(expo - log_mq, shown)
        return {"bce": bce, "exposure": exposure}, {"bce": 1.0, "exposure": w_exposure}

    return loss_fn


def choose_exposure_weight(model: EntireSpaceRanker, data: RunData, requests: Requests, clicked: np.ndarray,
                           grid: Sequence[float], k: int, exclude_seen=None,
                           pairs_per_batch: int = 262_144, seed: int = 0, workers: int = 1) -> tuple[float, list[dict]]:
    """The exposure weight of ``grid`` by how much of ``clicked`` (int64 [R, C]) its corpus-wide top-k keeps for
    ``requests`` (the one-SE rule of :mod:`cascade.eval.selection`: of the weights within one SE of the best
    click-recall@k, the one closest to :data:`PRODUCT_RULE`), and every weight's click-recall@k. Scores every
    (request, item) pair once per model and keeps a running top-k per weight, ``workers`` blocks of requests side by
    side (:mod:`cascade.threads`). Sets ``model.exposure_weight`` to the choice."""
    grid = [float(b) for b in grid]
    n_items = len(data.item_ids)
    item_chunk = min(n_items, pairs_per_batch)
    req_chunk = max(1, pairs_per_batch // item_chunk)
    parts: dict[float, list[np.ndarray]] = {b: [] for b in grid}
    model.eval()

    def tops_of(r0: int) -> dict[float, np.ndarray]:
        """Each weight's top-k item ids [R_b, k] for the requests from row r0 (one block)."""
        sub = requests.take(np.arange(r0, min(r0 + req_chunk, len(requests))))
        got = {b: (np.zeros((len(sub), 0), np.int64), np.zeros((len(sub), 0), np.float32)) for b in grid}
        for s in range(0, n_items, item_chunk):
            chunk = np.ascontiguousarray(np.broadcast_to(data.item_ids[s:s + item_chunk],
                                                         (len(sub), min(item_chunk, n_items - s))))
            cat, num = data.pair_features(sub, chunk)
            lc = np.asarray(F.logsigmoid(torch.from_numpy(score_pairs(model.click, cat, num, list_len=chunk.shape[1]))))
            le = score_pairs(model.exposure, cat, num, list_len=chunk.shape[1])
            lc, le = lc.reshape(chunk.shape), le.reshape(chunk.shape)
            if exclude_seen is not None:
                lc = np.where(exclude_seen.seen(sub.user_id, chunk, sub.time_ms), -np.inf, lc)
            for b in grid:
                i, sc = got[b]
                got[b] = topk_rows(np.concatenate([sc, lc + b * le], 1), np.concatenate([i, chunk], 1), k)
        return {b: got[b][0] for b in grid}

    for tops in ordered_map(tops_of, range(0, len(requests), req_chunk), workers):
        for b in grid:
            parts[b].append(tops[b])
    recall = {b: click_recall(clicked, np.concatenate(parts[b])) for b in grid}
    choice, rows = one_se_choice(grid, lambda b, units: row_mean(recall[b][units]), len(requests),
                                 seed=seed, prefer=PRODUCT_RULE)
    table = [{"exposure_weight": r["value"], f"valid_click_recall@{k}": r["score"], **one_se_columns(r)}
             for r in rows]
    with torch.no_grad():
        model.exposure_weight.fill_(choice)
    log.info("entire space: exposure weight %s chosen (%s)", choice, table)
    return choice, table


#: the fewest requests a random slice judges by: its choices' standard errors are bootstrapped over requests, and
#: one request resamples to itself (an SE of 0, which would make any gap "beyond one SE")
MIN_SLICE_REQUESTS = 2


def has_random_slice(impressions: pd.DataFrame) -> bool:
    """Whether ``impressions`` hold random-exposure rows (``is_rand == 1``) with both labels (an AUC to judge by)
    from at least :data:`MIN_SLICE_REQUESTS` requests (a standard error to judge with)."""
    if "is_rand" not in impressions.columns:
        return False
    rand = impressions.loc[impressions["is_rand"] == 1]
    return rand["click"].nunique() == 2 and rand["request_id"].nunique() >= MIN_SLICE_REQUESTS


def random_slice(impressions: pd.DataFrame, what: str) -> pd.DataFrame:
    """The random-exposure rows of ``impressions`` (``is_rand == 1``); a ValueError naming ``what`` when there are
    none or they hold only one class (no AUC to judge by)."""
    r = impressions[impressions["is_rand"] == 1] if "is_rand" in impressions.columns else impressions.iloc[:0]
    if not has_random_slice(impressions):
        few = r["request_id"].nunique() < MIN_SLICE_REQUESTS if len(r) else False
        raise ValueError(f"{what}: the validation split has {len(r):,} random-exposure impressions"
                         f"{' with one class only' if len(r) and not few else ''}"
                         f"{f' from {r.request_id.nunique()} request' if few else ''}: no random-slice AUC to judge "
                         f"by (use teacher.entire_space.judge = \"clicks\")")
    return r


def choose_exposure_weight_by_random_auc(model: EntireSpaceRanker, data: RunData, grid: Sequence[float],
                                         seed: int = 0) -> tuple[float, list[dict]]:
    """The exposure weight of ``grid`` by the AUC of the ranking score log sigmoid(click) + weight x exposure on the
    validation split's randomly shown impressions (the one-SE rule of :mod:`cascade.eval.selection`, bootstrapped
    over those requests: the smallest weight within one SE of the best AUC; see :data:`PRODUCT_RULE` for why not
    the one closest to 1), and every weight's AUC. Sets ``model.exposure_weight`` to the choice."""
    shown = random_slice(data.split_impressions("valid"), "teacher.entire_space.judge = \"random_auc\"")
    requests = impression_requests(shown, data.context_names)
    cat, num = data.pair_features(requests, shown["item_id"].to_numpy(np.int64)[:, None])
    model.eval()
    lc = F.logsigmoid(torch.from_numpy(score_pairs(model.click, cat, num))).numpy()
    le = score_pairs(model.exposure, cat, num)
    order, starts, lengths = unit_ranges(shown["request_id"].to_numpy())
    y, lc, le = shown["click"].to_numpy()[order], lc[order], le[order]

    def random_auc(b: float, units: np.ndarray) -> float:
        rows = rows_of_units(starts, lengths, units)
        return auc(y[rows], lc[rows] + b * le[rows])

    choice, grid_rows = one_se_choice(grid, random_auc, len(starts), seed=seed)
    table = [{"exposure_weight": r["value"], "valid_random_auc": r["score"], **one_se_columns(r)} for r in grid_rows]
    with torch.no_grad():
        model.exposure_weight.fill_(choice)
    log.info("entire space: exposure weight %s chosen by random-slice AUC (%s)", choice, table)
    return choice, table
