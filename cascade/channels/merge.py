"""Several retrieval channels as one retrieval stage: their union, de-duplicated, with origins, merged by quotas or
by each channel's standardised scores; and the same quotas kept when a later stage cuts the union
(:func:`quota_cut`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

from ..arrays import PAD, first_occurrence_columns
from ..data.requests import Requests
from .classic import check_select


def origin_shares(origin: np.ndarray, n_channels: int) -> np.ndarray:
    """Each channel's share of each row's filled entries: origin int [B, M] (channel index, < 0 at padding) ->
    float64 [B, n_channels], rows summing to 1 (0 where a row is empty)."""
    counts = np.zeros((origin.shape[0], n_channels))
    rows, cols = np.nonzero(origin >= 0)
    np.add.at(counts, (rows, origin[rows, cols]), 1.0)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def quota_keys(origin: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Weighted-interleaving keys float64 [B, M] of a list whose elements come from channels ``origin`` int [B, M]
    (index into ``quotas`` [C], or [B, C] for a quota per row; < 0 at padding), each channel's elements in its own
    order: the element that is channel c's r-th (0-based) in its row gets (r + 0.5) / quotas[c], padding inf.
    Taking elements in key order gives every channel about its quota of any prefix. (:class:`MergedRetriever` has
    each channel's list as one block, where r is the column: it computes these keys directly, 13x faster than here
    for 256 requests x 3,000.)"""
    order = np.argsort(origin, axis=1, kind="stable")  # each channel's elements together, in their own order
    grouped = np.take_along_axis(origin, order, 1)
    pos = np.broadcast_to(np.arange(origin.shape[1]), origin.shape)
    first = np.ones(origin.shape, bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    rank = np.empty(origin.shape, np.int64)
    np.put_along_axis(rank, order, pos - np.maximum.accumulate(np.where(first, pos, 0), axis=1), 1)
    c = np.maximum(origin, 0)
    q = quotas[c] if quotas.ndim == 1 else np.take_along_axis(quotas, c, 1)
    with np.errstate(divide="ignore"):  # a channel with no share in a row has no element there
        return np.where(origin >= 0, (rank + 0.5) / q, np.inf)


def quota_cut(items: np.ndarray, scores: np.ndarray, origin: np.ndarray, quotas: np.ndarray,
              n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n of each row that a later stage keeps when every channel keeps its quota (``quotas`` [C], or [B, C] per
    row): items int64 [B, M] (distinct per row, PAD-padded) scored ``scores`` [B, M] by that stage, from channels
    ``origin`` [B, M] (-1 at PAD); each channel's items in score order, interleaved by :func:`quota_keys` (a channel
    with fewer items leaves its slots to the others). Returns (items, scores, origin) [B, n], best score first,
    PAD / -inf / -1 where a row is short."""
    order = np.argsort(-np.where(items == PAD, -np.inf, scores), axis=1, kind="stable")
    items, scores, origin = (np.take_along_axis(x, order, 1) for x in (items, scores, origin))
    origin = np.where(items == PAD, -1, origin)
    keep = np.sort(np.argsort(quota_keys(origin, quotas), axis=1, kind="stable")[:, :n], axis=1)  # score order
    out = [np.take_along_axis(x, keep, 1) for x in (items, scores, origin)]
    short = out[0] == PAD
    return out[0], np.where(short, -np.inf, out[1]).astype(np.float32), np.where(short, -1, out[2]).astype(np.int8)


def standardised(scores: np.ndarray, width: int | None = None) -> np.ndarray:
    """Each list of scores float [..., m] (one channel's list of one request on the last axis; -inf at padding) as
    z-scores, (s - mean) / std, with the mean and std of the finite entries among its first ``width`` (None: all;
    a list fetched longer than asked, to filter seen items, standardises as the list asked for would); 0 where
    those entries are all equal. A non-finite score (padding, NaN, inf) counts as no score: -inf. float64 [..., m]."""
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    head, okh = s[..., :width], ok[..., :width]
    count = np.maximum(okh.sum(axis=-1, keepdims=True), 1)
    mean = np.where(okh, head, 0.0).sum(axis=-1, keepdims=True) / count
    std = np.sqrt(np.where(okh, (head - mean) ** 2, 0.0).sum(axis=-1, keepdims=True) / count)
    z = np.divide(s - mean, std, out=np.zeros_like(s), where=ok & (std > 0))
    return np.where(ok, z, -np.inf)


#: how a :class:`MergedRetriever` merges its channels' lists
Merge = Literal["quotas", "scores"]
MERGES: tuple[str, ...] = get_args(Merge)
#: the most channels one union holds (origins are int8)
MAX_CHANNELS = 127


def unused_quota_settings(merge: str | None, settings: Mapping[str, object]) -> None:
    """Raise ValueError naming each quota setting of ``settings`` (replay key -> value, None where unset) that is
    set beside ``merge = "scores"``, whose union has no quotas: it would do nothing."""
    if merge != "scores":
        return
    given = {k: v for k, v in settings.items() if v is not None}
    if given:
        raise ValueError(f"replay.merge = 'scores' merges the channels by their standardised scores, without "
                         f"quotas, but {', '.join(f'replay.{k} = {v}' for k, v in given.items())} "
                         f"{'is' if len(given) == 1 else 'are'} set: it would do nothing (leave "
                         f"{'it' if len(given) == 1 else 'them'} unset, or set replay.merge = 'quotas')")


class MergedRetriever:
    """The union of several channels' lists, cut to n, each candidate tagged with the channel that placed it.

    channels: name -> a stage answering ``select(requests, None, n)`` (the two-tower Retriever, the classic
    channels). merge "quotas": quotas (name -> share of the n slots, > 0; normalised to sum 1) by weighted
    interleaving: channel c's item at rank r (0-based) gets the key (r + 0.5) / quota_c, so every channel fills
    about its quota of the slots. merge "scores" (quotas None): a score-normalised union (CombMAX over z-scores):
    each channel's scores are standardised over its own list of the request (:func:`standardised`), and the key is
    minus that z-score, so a channel takes the slots where its scores stand out of its own list. Either way the
    union is taken in key order and an item several channels propose keeps its best key (a shared item takes one
    slot; ties: the earlier channel). scores: -key (higher comes first). It holds no state a call changes: threads
    may share it.
    """

    def __init__(self, channels: Mapping[str, object], quotas: Mapping[str, float] | None,
                 merge: str = "quotas") -> None:
        if not channels:
            raise ValueError("MergedRetriever: no channels")
        if merge not in MERGES:
            raise ValueError(f"MergedRetriever: merge must be one of {list(MERGES)}, got {merge!r}")
        if len(channels) > MAX_CHANNELS:
            raise ValueError(f"MergedRetriever: at most {MAX_CHANNELS} channels (origins are int8), got "
                             f"{len(channels)}")
        self.names = list(channels)
        self.channels = [channels[k] for k in self.names]
        self.merge = merge
        self.quotas: np.ndarray | None = None
        if merge == "scores":
            if quotas is not None:
                raise ValueError("MergedRetriever: a score-normalised union (merge='scores') has no quotas; they "
                                 "would do nothing: pass quotas=None")
            return
        if quotas is None or set(quotas) != set(channels):
            raise ValueError(f"MergedRetriever: quotas name {sorted(quotas or ())}, the channels are "
                             f"{sorted(channels)}")
        bad = {k: v for k, v in quotas.items() if not (np.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"MergedRetriever: every quota must be finite and > 0, got {bad}")
        total = float(sum(quotas.values()))
        self.quotas = np.array([quotas[k] / total for k in self.names])

    def refresh(self, t_ms: np.ndarray) -> int:
        """Each channel's per-period state for the times ``t_ms`` [B], where it has some (``refresh``); returns how
        many periods were prepared."""
        return sum(ch.refresh(t_ms) for ch in self.channels if hasattr(ch, "refresh"))

    def select_with_origin(self, requests: Requests, n: int, timing: dict[str, float] | None = None,
                           asked: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items int64 [B, n], scores float32 [B, n], origin int8 [B, n]: index into ``names``, -1 at PAD).
        timing: where given, each channel's wall seconds are added to ``timing[name]``. asked: the n a caller that
        over-fetches (to filter seen items) asked for; a score-normalised union standardises each channel's scores
        over that many, so that the extra items do not move the others (None: n)."""
        check_select("merged", None, n)
        lists = []
        for name, ch in zip(self.names, self.channels):
            t0 = time.perf_counter()
            lists.append(ch.select(requests, None, n))
            if timing is not None:
                timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
        w = max(i.shape[1] for i, _ in lists)  # a channel may return fewer than n: padded to the widest
        if any(i.shape[1] < w for i, _ in lists):
            lists = [(np.pad(i, ((0, 0), (0, w - i.shape[1])), constant_values=PAD),
                      np.pad(s, ((0, 0), (0, w - s.shape[1])), constant_values=-np.inf)) for i, s in lists]
        items = np.stack([i for i, _ in lists], axis=1)  # [B, C, w]: every channel's list in channel order
        if self.quotas is not None:  # quota_keys of lists that are one channel's each
            keys = np.broadcast_to((np.arange(w) + 0.5) / self.quotas[:, None], items.shape)
        else:
            keys = -standardised(np.stack([s for _, s in lists], axis=1), asked)
        b, width = items.shape[0], len(lists) * w
        keys = np.where(items == PAD, np.inf, keys).reshape(b, width)
        items = items.reshape(b, width)
        origin = np.broadcast_to(np.repeat(np.arange(len(lists), dtype=np.int8), w), items.shape)
        order = np.argsort(keys, axis=1, kind="stable")  # ties: the earlier channel first
        items, keys, origin = (np.take_along_axis(x, order, 1) for x in (items, keys, origin))
        cols = first_occurrence_columns(items, n)
        ok = cols >= 0
        c = np.maximum(cols, 0)
        out_i = np.where(ok, np.take_along_axis(items, c, 1), PAD)
        out_s = np.where(ok, -np.take_along_axis(keys, c, 1), -np.inf).astype(np.float32)
        out_o = np.where(ok, np.take_along_axis(origin, c, 1), -1).astype(np.int8)
        return out_i, out_s, out_o

    def select(self, requests: Requests, candidates: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_select("merged", candidates, n)
        items, scores, _ = self.select_with_origin(requests, n)
        return items, scores
