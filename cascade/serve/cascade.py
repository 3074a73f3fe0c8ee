"""The serving cascade: retrieval -> pre-rank -> rank behind one batch API.

Every stage answers the same contract::

    select(requests, candidates, k) -> (item_ids [B, k] int64, scores [B, k] float32)

``candidates`` is ``None`` for the retriever (its candidates are the whole corpus) and an int64 [B, N] array of item
ids padded with -1 for the later stages. Padding in the output is item id -1 with score -inf.

Stages are thin: each wraps a scoring callable built by the pipeline from a trained model and the saved feature
encoder, so the same classes serve the teacher, the distilled students and test doubles. The retrieval stage is
the two-tower :class:`Retriever` or a :class:`~cascade.channels.MergedRetriever` of it and the classic channels;
then :meth:`Cascade.recommend` also times each channel and tells which channel proposed each candidate.
:func:`load_cascade` builds the cascade of a finished run: a two-tower variant, or "distilled+channels".
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..arrays import PAD, distinct, first_occurrences, topk_rows
from ..channels import MergedRetriever, load_channels, origin_shares, quota_cut, saved_channel_names
from ..channels.merge import MERGES, unused_quota_settings
from ..data.history import EventHistory
from ..data.io import MAX_PLAUSIBLE_MS
from ..data.requests import Requests
from ..index.faiss_index import ItemIndex
from ..machine import check_autocast
from ..models.scoring import ranker_scorer
from ..run_data import RunData, Towers, load_ranker, load_towers
from ..run_lock import folder_lock


class Stage(Protocol):
    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class Retriever:
    """User tower + item index. user_embed(requests) -> float32 [B, d]; index.search(xq, k) -> (D, item_ids), each
    row best first with its padding (item id -1) at the end, as faiss and the exact searches return them.
    towers, data: towers with a recent-popularity prior (``Towers.prior``) rescore the index's top k together with
    the prior's k most clicked items by their full score (``Towers.scores``) and keep the best k; without one (or
    None) the index's answer is the stage's."""

    def __init__(self, user_embed: Callable[[Requests], np.ndarray], index, towers: Towers | None = None,
                 data: RunData | None = None):
        if towers is not None and towers.prior is not None and data is None:
            raise ValueError("Retriever: towers with a prior need the run's data to score it")
        self.user_embed = user_embed
        self.index = index
        self.prior_towers = towers if towers is not None and towers.prior is not None else None
        self.data = data

    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        if candidates is not None:
            raise ValueError("the retriever searches the whole corpus: candidates must be None")
        u = np.ascontiguousarray(self.user_embed(requests), dtype=np.float32)
        d, i = self.index.search(u, k)
        i, d = np.asarray(i, np.int64), np.asarray(d, np.float32)
        if self.prior_towers is not None:
            return self.with_prior(requests, u, i, k)
        # padding must never look like a score; it sits at the end of a row, so the last column tells whether there
        # is any (a full [B, k] comparison was 3 us of a 0.1 ms batch-1 search)
        if len(i) and (i[0, -1] == PAD if len(i) == 1 else (i[:, -1] == PAD).any()):
            d = np.where(i == PAD, np.float32(-np.inf), d)
        return i, d

    def refresh(self, t_ms: np.ndarray) -> int:
        """The prior's periods for the times ``t_ms`` [B] (:meth:`Cascade.refresh`); 0 without a prior."""
        return 0 if self.prior_towers is None else self.prior_towers.refresh(t_ms)

    def with_prior(self, requests: Requests, u: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's answer ids [B, k] for user embeddings u [B, d] and the prior's k most clicked items, scored
        by the towers' full score: the best k (ids, scores)."""
        towers = self.prior_towers
        rows = np.where(ids == PAD, PAD, towers.item_rows(ids))
        both = np.concatenate([rows, towers.prior.candidates(requests, k)], axis=1)
        if len(both) == 1:  # batch 1 (the serving path): each row once (their order does not matter: all are scored)
            both = distinct(both[0])[None, :]
        else:
            both = first_occurrences(both, 2 * k)[0]
        s = towers.row_scores(requests, u, np.where(both == PAD, towers.n_real, both))
        top, scores = topk_rows(np.where(both == PAD, np.float32(-np.inf), s), both, k)
        return np.where(top == PAD, PAD, towers.inputs.item_ids[np.maximum(top, 0)]), scores


class PairScorer:
    """A stage that scores (request, candidate) pairs with ``score(requests, candidates [B,N]) -> [B,N]``."""

    def __init__(self, score: Callable[[Requests, np.ndarray], np.ndarray],
                 refresh: Callable[[np.ndarray], int] | None = None):
        self.score = score
        self._refresh = refresh

    def refresh(self, t_ms: np.ndarray) -> int:
        """The scorer's per-period state for the times ``t_ms`` [B] (a tower's prior), where it has some."""
        return 0 if self._refresh is None else self._refresh(t_ms)

    def scores(self, requests: Requests, candidates: np.ndarray) -> np.ndarray:
        """float32 [B, N]: the score of every candidate (padding -inf)."""
        ids = _item_ids(candidates)
        return np.where(ids == PAD, np.float32(-np.inf), self._scored(requests, ids))

    def select(self, requests: Requests, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        if candidates is None:
            raise ValueError("this stage re-scores candidates: pass candidates [B, N]")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        ids = _item_ids(candidates)
        if ids.shape[1] == 0:
            raise ValueError(f"candidates {ids.shape} hold no column: pass at least one per request (-1 pads)")
        return topk_rows(self._scored(requests, ids), ids, k)  # topk_rows masks the padding itself

    def _scored(self, requests: Requests, ids: np.ndarray) -> np.ndarray:
        s = np.asarray(self.score(requests, ids), dtype=np.float32)
        if s.shape != ids.shape:
            raise ValueError(f"scorer returned shape {s.shape}, expected {ids.shape}")
        return s


MAX_OVERFETCH = 4  # filtering first fetches at most (1 + this) x n items; rows still short are fetched again


def _widths(count: np.ndarray) -> np.ndarray:
    """Each row's over-fetch for ``count`` [B] items its user saw: the next power of two (0 for none), so that a
    request fetches the same list whatever the other requests of its batch saw (a stage's top n is not always a
    prefix of its top m), and a batch needs few distinct fetch sizes."""
    return np.where(count > 0, 1 << np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64), 0)


def select_unseen(stage: Stage, requests: Requests, n: int, seen: EventHistory | None) -> tuple[np.ndarray, np.ndarray]:
    """``stage.select(requests, None, n)``, without the items each user was shown strictly before the request when
    ``seen`` is given: over-fetch by what the users saw (at most MAX_OVERFETCH x n more), drop the seen items,
    keep the best n; the rows of users who saw more than that and are left short are fetched again with all they
    saw on top, so filtering does not shrink a list the stage could fill. A merged retrieval stage goes through
    :func:`select_unseen_origin` (its union is told the n asked for when it over-fetches)."""
    if isinstance(stage, MergedRetriever):
        return select_unseen_origin(stage, requests, n, seen)[:2]
    if seen is None:
        return stage.select(requests, None, n)
    (items,), scores = _unseen(lambda r, m: stage.select(r, None, m), requests, n, seen, (PAD,))
    return items, scores


def select_unseen_origin(retriever: MergedRetriever, requests: Requests, n: int, seen: EventHistory | None,
                         timing: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`select_unseen` through a merged retriever, keeping each item's channel of origin: (items, scores,
    origin int8 [B, n]: index into ``retriever.names``, -1 at padding). timing: where given, each channel's wall
    seconds, added up over its fetches (filtering may fetch twice), are added to ``timing[name]``."""
    def fetch(r: Requests, m: int):
        return retriever.select_with_origin(r, m, timing, asked=n)

    if seen is None:
        return fetch(requests, n)
    (items, origin), scores = _unseen(fetch, requests, n, seen, (PAD, -1))
    return items, scores, origin.astype(np.int8)


def _unseen(fetch, requests: Requests, n: int, seen: EventHistory, pads: tuple) -> tuple[list, np.ndarray]:
    """The best n unseen of ``fetch(requests, m) -> (items [B, m], scores [B, m], *aligned)``: ([items, *aligned]
    gathered [B, n], scores [B, n]), padded with ``pads``. Each row over-fetches by what its own user saw
    (:func:`_widths`, at most MAX_OVERFETCH x n); a row left short although its user saw more is fetched again
    with n + all its user saw, rounded the same way (at most that many can be seen, so n unseen are in)."""
    lo, hi = seen.before(requests.user_id, requests.time_ms)
    count = hi - lo
    extra = np.minimum(_widths(count), MAX_OVERFETCH * n)
    out = [np.full((len(requests), n), pad, np.int64) for pad in pads]
    scores = np.full((len(requests), n), -np.inf, np.float32)
    short = np.zeros(len(requests), bool)
    for width, rows in ((w, np.flatnonzero(extra == w)) for w in np.unique(extra)):
        cols = _fetch_unseen(fetch, requests.take(rows), n, int(width), seen, pads, out, scores, rows)
        short[rows] = (cols == PAD).any(axis=1) & (count[rows] > width)
    again = np.where(short, _widths(count), 0)
    for width, rows in ((w, np.flatnonzero(short & (again == w))) for w in np.unique(again[short])):
        _fetch_unseen(fetch, requests.take(rows), n, int(width), seen, pads, out, scores, rows)
    return out, scores


def _fetch_unseen(fetch, requests: Requests, n: int, extra: int, seen: EventHistory, pads: tuple, out: list,
                  scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Fetch n + extra for ``requests`` (rows ``rows`` of the batch) and write their best n unseen into ``out`` /
    ``scores`` at those rows; returns the columns kept ([len(rows), n], PAD where short)."""
    got = fetch(requests, n + extra)
    cols, scores[rows] = _unseen_columns(got[0], got[1], requests, n, seen)
    for o, a, pad in zip(out, (got[0], *got[2:]), pads):
        o[rows] = _gather(a, cols, pad)
    return cols


def _unseen_columns(items: np.ndarray, scores: np.ndarray, requests: Requests, n: int,
                    seen: EventHistory) -> tuple[np.ndarray, np.ndarray]:
    """The columns (PAD where none) and scores of the best n unseen items of each row of an over-fetched list."""
    items = np.where(seen.seen(requests.user_id, items, requests.time_ms), PAD, items)
    return topk_rows(scores, np.where(items == PAD, PAD, np.arange(items.shape[1])[None, :]), n)


def _gather(x: np.ndarray, cols: np.ndarray, pad: int) -> np.ndarray:
    return np.where(cols == PAD, pad, np.take_along_axis(x, np.maximum(cols, 0), 1))


def _item_ids(candidates: np.ndarray) -> np.ndarray:
    """Candidate item ids as int64 [B, N]; a NaN, fractional, non-numeric or negative id (other than the padding
    -1) raises naming its row and column (padding is never NaN: a NaN cast to int64 would come back as a
    real-looking item)."""
    c = np.asarray(candidates)
    if c.ndim != 2:
        raise ValueError(f"candidates must be [B, N] item ids, got shape {c.shape}")
    if c.dtype.kind in "iu" and (c.dtype.kind == "i" or c.dtype.itemsize < 8):
        ids = c.astype(np.int64, copy=False)
        bad = ids < PAD
    else:
        v = pd.to_numeric(pd.Series(c.ravel(), dtype=object), errors="coerce").to_numpy(np.float64).reshape(c.shape)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v != np.floor(v)) | (v < PAD) | (v >= 2.0**63)
        ids = None if bad.any() else v.astype(np.int64)
    if bad.any():
        b, j = (int(x[0]) for x in np.nonzero(bad))
        x = c[b, j].item() if isinstance(c[b, j], np.generic) else c[b, j]
        raise ValueError(f"candidates[{b}, {j}] = {x!r} is not an item id: ids are integers >= 0, padding is -1")
    return ids


@dataclass
class CascadeResult:
    """items/scores: the final [B, k] lists; stages: stage -> (items, scores) when asked; timing_s: stage -> wall s,
    and with a multi-channel retriever "retrieval/<channel>" -> the wall s of each channel (within "retrieval");
    errors: per request None or the reason it was not served (its row is all padding).

    origin: with a multi-channel retriever and ``return_stages``, int8 [B, n_retrieve]: the channel that proposed
    each retrieval candidate (``stages["retrieval"]``), as an index into ``channels``; -1 at padding. channels: the
    retriever's channel names (empty for the two-tower retriever alone)."""

    items: np.ndarray
    scores: np.ndarray
    errors: list[str | None]
    timing_s: dict[str, float]
    stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    origin: np.ndarray | None = None
    channels: tuple[str, ...] = ()


class Cascade:
    """retrieval -> pre-rank -> rank. The ranker can be the teacher or the distilled rank student.

    seen: the logged history of what users were shown (an :class:`EventHistory` of impressions); where it is given
    (:func:`load_cascade`: where the run's data step filters seen items) an item the user was shown strictly before
    the request never reaches a list, unless ``recommend(..., filter_seen=False)``.

    n_items: the catalogue's size, where known: a stage size above it is served as it (the rest of the list is
    padding), so a size of 10^7 costs no more than the catalogue.

    prerank_quotas: with a multi-channel retriever, the pre-rank keeps the retriever's channel quotas
    (:func:`~cascade.channels.quota_cut`: each channel's candidates in pre-rank score order, interleaved by quota;
    a score-normalised union has none, and each channel's share of the request's union stands in for its quota)
    instead of its best n_prerank overall. The pre-rank tower is a student of the same teacher as the two-tower
    retriever: cutting by its score alone keeps almost only the two-tower's own candidates, and the other channels'
    never reach the ranker. Needs a :class:`PairScorer` pre-rank (it scores every candidate).
    """

    STAGE_NAMES = ("retrieval", "prerank", "rank")

    def __init__(self, retriever: Stage, preranker: Stage, ranker: Stage, seen: EventHistory | None = None,
                 context_kinds: dict[str, str] | None = None, prerank_quotas: bool = False,
                 log_start_ms: int | None = None, n_items: int | None = None):
        if prerank_quotas and not isinstance(retriever, MergedRetriever):
            raise ValueError("prerank_quotas keeps the retrieval channels' quotas, but the retriever is a single "
                             "channel: use a MergedRetriever, or prerank_quotas=False")
        if prerank_quotas and not isinstance(preranker, PairScorer):
            raise ValueError(f"prerank_quotas needs a PairScorer pre-rank (it scores every candidate), got "
                             f"{type(preranker).__name__}")
        self.retriever, self.preranker, self.ranker, self.seen = retriever, preranker, ranker, seen
        self.context_kinds = context_kinds  # context name -> "int" | "float" | "str": checked per request
        self.prerank_quotas = prerank_quotas
        self.log_start_ms = log_start_ms  # a request before the log's first event is refused (a time in seconds)
        self.n_items = n_items  # the catalogue: no stage is asked for more (a longer list is padding)

    def refresh(self, t_ms: np.ndarray) -> int:
        """Prepare what the stages keep per refresh period (most-popular's lists, the towers' popularity priors)
        for the request times ``t_ms`` [B], so that requests of those periods count nothing on their path: a server
        calls it on a timer, ahead of each period (:func:`~cascade.serve.replay.replay_latency` does it outside its
        timings and reports its cost). Returns how many (stage, period) pairs were not prepared yet. A time that
        :meth:`recommend` would refuse (not an integer, before the log begins, past the year 5138) raises naming it:
        a timer in seconds would otherwise prepare periods of 1970 and leave the real ones to the requests."""
        t = np.asarray(t_ms)
        if t.ndim != 1:
            raise ValueError(f"refresh: t_ms must be 1-d [B] epoch milliseconds, got shape {t.shape}")
        v = pd.to_numeric(pd.Series(t, dtype=object), errors="coerce").to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v != np.floor(v)) | (v < (self.log_start_ms or 0)) | (v >= MAX_PLAUSIBLE_MS)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            start = "" if self.log_start_ms is None else f" from the log's start, {self.log_start_ms},"
            raise ValueError(f"refresh: t_ms[{i}] = {t[i].item() if isinstance(t[i], np.generic) else t[i]!r} is not "
                             f"a request time: integer epoch milliseconds{start} up to the year 5138 are needed")
        t_ms = v.astype(np.int64)
        return sum(st.refresh(t_ms) for st in (self.retriever, self.preranker, self.ranker) if hasattr(st, "refresh"))

    @property
    def channels(self) -> tuple[str, ...]:
        """The retrieval channels (a :class:`MergedRetriever`'s names), () for a single retriever."""
        return tuple(self.retriever.names) if isinstance(self.retriever, MergedRetriever) else ()

    def recommend(self, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                  return_stages: bool = False, filter_seen: bool | None = None) -> CascadeResult:
        """The final [B, k] lists of ``requests`` (internal int ids; ``RunData.items.item_key`` holds your own
        where they were text). filter_seen: None: filter seen items where the cascade holds the seen history."""
        if not isinstance(requests, Requests):
            raise TypeError(f"requests must be a cascade.data.requests.Requests (e.g. to_requests(frame, "
                            f"data.context_names)), got {type(requests).__name__}")
        for name, v in (("n_retrieve", n_retrieve), ("n_prerank", n_prerank), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        if not (0 < k <= n_prerank <= n_retrieve):
            raise ValueError(f"need 0 < k <= n_prerank <= n_retrieve, got k={k}, n_prerank={n_prerank}, "
                             f"n_retrieve={n_retrieve}")
        for name, v in (("return_stages", return_stages), ("filter_seen", filter_seen)):
            if not isinstance(v, (bool, np.bool_)) and not (name == "filter_seen" and v is None):
                raise TypeError(f"{name} must be True or False{' (or None)' if name == 'filter_seen' else ''}, "
                                f"got {v!r}")
        if filter_seen and self.seen is None:
            raise ValueError("filter_seen=True but the cascade was built without the seen history")
        filter_seen = self.seen is not None if filter_seen is None else filter_seen
        n_retrieve, n_prerank, k = int(n_retrieve), int(n_prerank), int(k)
        cap = n_retrieve if self.n_items is None else min(n_retrieve, self.n_items)  # what any stage can fill
        n_r, n_p, n_k = cap, min(n_prerank, cap), min(k, cap)
        b = len(requests)
        errors = requests.validity(self.context_kinds)
        ok = np.array([e is None for e in errors], dtype=bool)
        req = requests.take(np.flatnonzero(ok)).valid_rows(self.context_kinds)
        early = req.time_ms < self.log_start_ms if self.log_start_ms is not None else np.zeros(len(req), bool)
        if early.any():  # a time in seconds reads as 1970: before any logged event
            start = f"{self.log_start_ms} ms, {pd.Timestamp(self.log_start_ms, unit='ms'):%Y-%m-%d %H:%M} UTC"
            for i, rid, t in zip(np.flatnonzero(ok)[early], req.request_id[early], req.time_ms[early]):
                errors[i] = (f"request {int(rid)}: time_ms {int(t)} is before the log begins ({start}): request "
                             "times are epoch milliseconds")
            ok[np.flatnonzero(ok)[early]] = False
            req = req.take(np.flatnonzero(~early))
        items = np.full((b, k), PAD, np.int64)
        scores = np.full((b, k), -np.inf, np.float32)
        channels = self.channels
        timing = {n: 0.0 for n in (*self.STAGE_NAMES, *(f"retrieval/{c}" for c in channels))}
        stages: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        origin = None
        if ok.any():
            seen = self.seen if filter_seen else None
            t0 = time.perf_counter()
            channel_s: dict[str, float] = {}  # per call: threads may share the cascade
            ro = None
            if channels:
                ri, rs, ro = select_unseen_origin(self.retriever, req, n_r, seen, channel_s)
            else:
                ri, rs = select_unseen(self.retriever, req, n_r, seen)
            t1 = time.perf_counter()
            if self.prerank_quotas:
                quotas = self.retriever.quotas
                if quotas is None:  # a score-normalised union: each channel's share of the request's union
                    quotas = origin_shares(ro, len(channels))
                pi, ps, _ = quota_cut(ri, self.preranker.scores(req, ri), ro, quotas, n_p)
            else:
                pi, ps = self.preranker.select(req, ri, n_p)
            t2 = time.perf_counter()
            fi, fs = self.ranker.select(req, pi, n_k)
            t3 = time.perf_counter()
            timing.update({"retrieval": t1 - t0, "prerank": t2 - t1, "rank": t3 - t2})
            if channels:
                timing.update({f"retrieval/{c}": channel_s[c] for c in channels})
            items[ok, :n_k], scores[ok, :n_k] = fi, fs
        if return_stages:  # every stage, padding where a request was not served or the catalogue ran out
            for name, width, got in zip(self.STAGE_NAMES, (n_retrieve, n_prerank, k),
                                        ((ri, rs), (pi, ps), (fi, fs)) if ok.any() else (None,) * 3):
                full_i, full_s = np.full((b, width), PAD, np.int64), np.full((b, width), -np.inf, np.float32)
                if got is not None:
                    full_i[ok, :got[0].shape[1]], full_s[ok, :got[0].shape[1]] = got
                stages[name] = (full_i, full_s)
            if channels:
                origin = np.full((b, n_retrieve), -1, np.int8)
                if ok.any():
                    origin[ok, :ro.shape[1]] = ro
        return CascadeResult(items, scores, errors, timing, stages, origin, channels)


# ---------------------------------------------------------------------------------------------------------------
# the cascade of a finished run


CHANNELS_VARIANT = "distilled+channels"  # the distilled two-tower and the classic channels in one retrieval stage
TWO_TOWER_QUOTA = 0.5  # the two-tower's share of the retrieval slots beside the channels where none is set


def build_cascade(data: RunData, retrieval: Towers, prerank: Towers, ranker: torch.nn.Module, index,
                  seen: EventHistory | None = None, channels: Mapping[str, Stage] | None = None,
                  two_tower_quota: float | None = None, prerank_quotas: bool = False,
                  channel_quotas: Mapping[str, float] | None = None, autocast: str = "auto",
                  merge: str = "quotas") -> Cascade:
    """retrieval tower + index -> pre-rank tower -> ranker (teacher or distilled student). channels: classic
    channels (name -> stage) retrieving beside the two-tower (:func:`merged_retriever`, with ``two_tower_quota``
    (None: :data:`TWO_TOWER_QUOTA`) and ``channel_quotas``, or ``merge="scores"``), or None / {}: the two-tower
    alone; prerank_quotas: the pre-rank keeps their quotas (:class:`Cascade`)."""
    retriever = (merged_retriever(data, retrieval, index, channels, two_tower_quota, channel_quotas, merge)
                 if channels else Retriever(lambda r: retrieval.user_embed(data, r), index, retrieval, data))
    return cascade_from(data, retriever, prerank, ranker, seen, prerank_quotas, autocast)


def cascade_from(data: RunData, retriever: Stage, prerank: Towers, ranker: torch.nn.Module,
                 seen: EventHistory | None = None, prerank_quotas: bool = False, autocast: str = "auto") -> Cascade:
    """``retriever`` (the two-tower, a merged retrieval stage or one classic channel alone) -> the pre-rank tower
    -> ``ranker`` (its bf16 scoring: ``autocast``, :func:`~cascade.models.scoring.ranker_scorer`), each request's
    context checked against the data's kinds."""
    return Cascade(retriever, PairScorer(prerank.scorer(data), prerank.refresh),
                   PairScorer(ranker_scorer(ranker, data, autocast)), seen,
                   context_kinds=data.context_kinds, prerank_quotas=prerank_quotas,
                   log_start_ms=int(data.impressions["time_ms"].min()), n_items=len(data.item_ids))


def merged_retriever(data: RunData, retrieval: Towers, index, channels: Mapping[str, Stage],
                     two_tower_quota: float | None, channel_quotas: Mapping[str, float] | None = None,
                     merge: str = "quotas") -> MergedRetriever:
    """The two-tower retriever (user tower + index) and ``channels`` as one retrieval stage (in ``channels``'
    order, which breaks ties between equal keys). merge "quotas": the two-tower takes ``two_tower_quota`` of the
    slots, the channels share the rest (:func:`channel_shares`); "scores": the score-normalised union
    (:class:`~cascade.channels.MergedRetriever`), where the quotas are not used."""
    two_tower = Retriever(lambda r: retrieval.user_embed(data, r), index, retrieval, data)
    unused_quota_settings(merge, {"two_tower_quota": two_tower_quota, "channel_quotas": channel_quotas})
    if merge != "quotas":  # MergedRetriever checks the name
        return MergedRetriever({"two_tower": two_tower, **channels}, None, merge)
    two_tower_quota = TWO_TOWER_QUOTA if two_tower_quota is None else two_tower_quota
    if channels and not 0.0 < two_tower_quota < 1.0:
        raise ValueError(f"two_tower_quota must be in (0, 1) beside channels, got {two_tower_quota}")
    return MergedRetriever({"two_tower": two_tower, **channels},
                           {"two_tower": two_tower_quota, **channel_shares(list(channels), two_tower_quota,
                                                                           channel_quotas)})


def channel_shares(channels: Sequence[str], two_tower_quota: float,
                   channel_quotas: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each classic channel's share of the retrieval slots beside a two-tower that takes ``two_tower_quota``: the
    rest, 1 - two_tower_quota, split in proportion to ``channel_quotas`` (channel -> weight > 0; a channel it does
    not name weighs 1; None: evenly). A weight for a channel not in ``channels`` raises: it would do nothing."""
    weights = dict(channel_quotas or {})
    outside = sorted(set(weights) - set(channels))
    if outside:
        raise ValueError(f"replay.channel_quotas weighs {outside}, which the multi-channel cascade does not hold "
                         f"(its channels: {list(channels)})")
    bad = {k: v for k, v in weights.items() if not (np.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"replay.channel_quotas: every weight must be a finite number > 0, got {bad}")
    w = np.array([float(weights.get(n, 1.0)) for n in channels])
    return {n: float(x) for n, x in zip(channels, (1.0 - two_tower_quota) * w / max(w.sum(), 1e-300))}


@dataclass(frozen=True)
class ChannelSettings:
    """How a run's replay builds "distilled+channels": its channels, the two-tower's share of the retrieval slots,
    each channel's weight in the rest (``channel_quotas``, aligned with ``channels``; :func:`channel_shares`),
    whether the pre-rank keeps the channels' quotas (:class:`Cascade`), and how the union merges (``merge``:
    "quotas", or "scores" where there are no quotas and the pre-rank keeps each channel's share of the request's
    union instead)."""

    channels: tuple[str, ...]
    two_tower_quota: float | None
    prerank_quotas: bool
    channel_quotas: tuple[float, ...] = ()
    merge: str = "quotas"

    @property
    def quotas(self) -> dict[str, float] | None:
        """Each classic channel's weight, by name (what :func:`build_cascade` takes as ``channel_quotas``); None for
        a score-normalised union, which has none."""
        return None if self.merge == "scores" else dict(zip(self.channels, self.channel_quotas))


#: the order of the multi-channel union's channels where the replay does not name them (it breaks ties between
#: equal interleaving keys)
UNION_ORDER = ("popular", "itemcf", "als", "recent", "content", "ease")


def union_channels(configured: Sequence[str] | None, saved: Sequence[str]) -> tuple[str, ...]:
    """The classic channels of the multi-channel cascade: ``configured`` (replay.channels) as given, or where it is
    unset (None) every channel of ``saved`` (those the channels step built) in :data:`UNION_ORDER`."""
    if configured is not None:
        return tuple(configured)
    return tuple(n for n in UNION_ORDER if n in saved) + tuple(sorted(set(saved) - set(UNION_ORDER)))


def channel_settings(channels: Sequence[str], two_tower_quota: float | None = None,
                     prerank_quotas: bool | None = None,
                     channel_quotas: Mapping[str, float] | None = None,
                     merge: str | None = None) -> ChannelSettings:
    """The :class:`ChannelSettings` of a replay's ``channels``, an unset (None) quota, pre-rank or merge choice
    taking the default: :data:`TWO_TOWER_QUOTA`, channels weighing 1 each, a pre-rank that keeps the quotas, and
    the union by quotas. A ``channel_quotas`` weight for a channel not in ``channels`` raises
    (:func:`channel_shares`), and so does a quota setting beside ``merge="scores"`` (it would do nothing)."""
    keep = True if prerank_quotas is None else bool(prerank_quotas)
    if merge not in (None, *MERGES):
        raise ValueError(f"replay.merge must be one of {list(MERGES)}, got {merge!r}")
    unused_quota_settings(merge, {"two_tower_quota": two_tower_quota, "channel_quotas": channel_quotas})
    if merge == "scores":
        return ChannelSettings(tuple(channels), None, keep, (), "scores")
    quota = TWO_TOWER_QUOTA if two_tower_quota is None else float(two_tower_quota)
    channel_shares(channels, quota, channel_quotas)  # checks the weights
    weights = tuple(float((channel_quotas or {}).get(n, 1.0)) for n in channels)
    return ChannelSettings(tuple(channels), quota, keep, weights)


def run_channel_settings(run_dir: str | Path) -> ChannelSettings:
    """The :class:`ChannelSettings` of a run's replay: from the replay step's manifest when the replay has run (its
    config_hash checked), else from the run's config.json (:func:`channel_settings`; unset channels: those the
    run's channels step saved, :func:`union_channels`). A run from before ``replay.prerank_quotas`` existed was
    replayed without them (False)."""
    run_dir = Path(run_dir)
    manifest = run_dir / "replay" / A.MANIFEST
    if manifest.is_file():
        m = A.read_json(manifest)
        if A.stable_hash(m.get("config")) != m.get("config_hash"):
            raise A.ArtifactError(f"{manifest}: its config does not match its config_hash: the file is altered")
        replay, where = m["config"], manifest
    else:
        replay, where = A.read_json(run_dir / "config.json").get("replay", {}), run_dir / "config.json"
    if "channels" not in replay or "two_tower_quota" not in replay:
        raise A.ArtifactError(f"{where}: no replay.channels / replay.two_tower_quota: the run predates the "
                              f"{CHANNELS_VARIANT!r} cascade")
    channels = union_channels(replay["channels"], saved_channel_names(run_dir / "channels"))
    return channel_settings(channels, replay["two_tower_quota"], replay.get("prerank_quotas", False),
                            replay.get("channel_quotas"), replay.get("merge"))


def cascade_variants(run_dir: str | Path) -> list[str]:
    """The cascades a finished run can serve: its two-tower variants (students/<variant>/ with a retrieval tower:
    "distilled", "ground_truth") and "distilled+channels" where the run has a distilled tower, a finished channels
    step and replay.channels names channels."""
    run_dir = Path(run_dir)
    students = run_dir / "students"
    towers = sorted(p.name for p in students.iterdir() if (p / "retrieval").is_dir()) if students.is_dir() else []
    if "distilled" in towers and (run_dir / "channels" / A.MANIFEST).is_file() and \
            ((run_dir / "replay" / A.MANIFEST).is_file() or (run_dir / "config.json").is_file()):
        if run_channel_settings(run_dir).channels:
            towers.append(CHANNELS_VARIANT)
    return towers


def load_cascade(run_dir: str | Path, variant: str = "distilled", ranker: str = "teacher",
                 data: RunData | None = None, autocast: str = "auto") -> tuple[RunData, Cascade]:
    """The servable cascade of a finished run: (RunData, Cascade). variant: a students/ sub-folder ("distilled" or
    "ground_truth": its two-tower retrieves alone) or "distilled+channels" (the distilled two-tower and the classic
    channels of the run's channels step in one retrieval stage, with the channels and quotas of the run's replay:
    :func:`run_channel_settings`; the replay's variant of that name, request for request); :func:`cascade_variants`
    lists what a run has, and another name raises naming them. ranker: "teacher" or "student" (the distilled rank
    student). The cascade filters seen items where the run's data step decided to (as the replay did). autocast:
    the ranker's bfloat16 scoring ("auto": where a probe finds it faster for the size of pass, which may differ
    between a batch and a single request, and between processes; "off": float32 always, the same list for a
    request alone or in any batch, its scores to the last digits, as passes of different sizes sum in different
    orders; "bf16"). Threads may share the cascade: a call returns what it returns alone. data: the run's
    RunData, where the caller has it loaded.

    Every file it loads is checked against the sha256 its step's manifest records (RunData checks the data step's
    tables): an altered checkpoint, table, index or channel raises ArtifactError naming the file. The run's lock is
    held while it loads: a run another process is writing raises RunLockedError naming it."""
    run_dir = Path(run_dir)
    if ranker not in ("teacher", "student"):
        raise ValueError(f"ranker {ranker!r} must be 'teacher' or 'student'")
    check_autocast(autocast, "load_cascade")  # before anything is loaded
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.json").is_file() or not (run_dir / "data").is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.json and data/ step written by `cascade "
                                "run`)")
    if data is not None and not isinstance(data, RunData):
        raise TypeError(f"data must be the run's RunData, got {type(data).__name__}")
    if data is not None and data.dir.resolve() != (run_dir / "data").resolve():
        raise ValueError(f"data is the RunData of {data.dir}, not of this run ({run_dir / 'data'})")
    with _reading(run_dir):
        return _load_cascade(run_dir, variant, ranker, data, autocast)


@contextlib.contextmanager
def _reading(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for a consistent read (a read-only run folder, which cannot hold a lock file and which
    no process can be writing: none)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(run_dir, command="load_cascade"))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        yield


def _load_cascade(run_dir: Path, variant: str, ranker: str, data: RunData | None,
                  autocast: str) -> tuple[RunData, Cascade]:
    have = cascade_variants(run_dir)
    if variant not in have:
        raise FileNotFoundError(f"{run_dir}: no cascade variant {variant!r} (the run has {have})")
    with_channels = variant == CHANNELS_VARIANT
    tower = "distilled" if with_channels else variant
    data = data or RunData(run_dir / "data")
    sdir = run_dir / "students" / tower
    towers = [f"{tower}/{stage}/{f}" for stage in ("retrieval", "prerank") for f in ("model.pt", "config.json")]
    ranker_files = ["rank_student/model.pt", "rank_student/config.json"] if ranker == "student" else []
    A.verify_listed(run_dir / "students", towers + ranker_files)
    if ranker == "teacher":
        # the teacher's collaborative term where the step saved one (or a file claims one): a missing term or an
        # unlisted one raises
        term = "teacher/collaborative.json"
        listed = term in A.read_json(run_dir / "teacher" / A.MANIFEST).get("outputs", {})
        A.verify_listed(run_dir / "teacher", ["teacher/model.pt", "teacher/config.json",
                                              *([term] if listed or (run_dir / "teacher" / term).exists() else [])])
    retr, pre = load_towers(sdir / "retrieval", data), load_towers(sdir / "prerank", data)
    model_dir = run_dir / "teacher" / "teacher" if ranker == "teacher" else run_dir / "students" / "rank_student"
    model = load_ranker(model_dir, data.spec)
    # the index checks its own files and that it holds this tower's items (naming both hashes), then the step's
    # manifest confirms that the whole index folder is the one the index step wrote
    index = ItemIndex.load(run_dir / "index" / tower,
                           expect_model_hash=A.sha256_file(sdir / "retrieval" / "model.pt"),
                           expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
    A.verify_listed(run_dir / "index", [f"{tower}/{f}" for f in ("manifest.json", "index.faiss", "item_ids.npy")])
    seen = data.seen_filter[0]
    if not with_channels:
        return data, build_cascade(data, retr, pre, model, index, seen, autocast=autocast)
    settings = run_channel_settings(run_dir)
    channels = load_channels(run_dir / "channels", data.history, list(settings.channels))
    return data, build_cascade(data, retr, pre, model, index, seen, channels=channels,
                               two_tower_quota=settings.two_tower_quota, prerank_quotas=settings.prerank_quotas,
                               channel_quotas=settings.quotas, autocast=autocast, merge=settings.merge)


def trace_requests(data: RunData, cascade: Cascade, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                   show: int = 10) -> list[pd.DataFrame]:
    """For each request, a table of its final items with the rank each got at every stage (a funnel trace); with a
    multi-channel retriever also the channel that proposed each item ("channel"). Served as ``recommend`` serves
    them (seen items filtered where the cascade holds the seen history); a request it cannot serve raises naming
    why."""
    res = cascade.recommend(requests, n_retrieve, n_prerank, k, return_stages=True)
    bad = [e for e in res.errors if e is not None]
    if bad:
        raise ValueError(f"trace_requests: {len(bad)} request(s) cannot be served, the first: {bad[0]}")
    tables = []
    for b in range(len(requests)):
        final = res.items[b][:show]
        t = pd.DataFrame({"item_id": final, "final_score": res.scores[b][:show]})
        for st, (items, _) in res.stages.items():
            pos = {int(x): j + 1 for j, x in enumerate(items[b]) if x != PAD}
            t[f"{st}_rank"] = [pos.get(int(x)) for x in final]
        extra = []
        if res.origin is not None and "retrieval" in res.stages:
            by_item = {int(x): res.channels[o] for x, o in zip(res.stages["retrieval"][0][b], res.origin[b]) if o >= 0}
            t["channel"] = [by_item.get(int(x)) for x in final]
            extra = ["channel"]
        tables.append(t.merge(data.items, on="item_id", how="left")[
            ["item_id", "retrieval_rank", "prerank_rank", "rank_rank", "final_score", *extra]
            + [c for c in ("item_key", "tag", "author_id", "video_type") if c in data.items.columns]])
    return tables
