"""Several retrieval channels as one retrieval stage: their union, de-duplicated, with quotas and origins."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from ..arrays import PAD, first_occurrence_columns
from ..data.requests import Requests
from .classic import check_select


class MergedRetriever:
    """The union of several channels' lists, cut to n, each candidate tagged with the channel that placed it.

    channels: name -> a stage answering ``select(requests, None, n)`` (the two-tower Retriever, the classic
    channels). quotas: name -> share of the n slots (> 0; normalised to sum 1). Weighted interleaving: channel c's
    item at rank r (0-based) gets the key (r + 0.5) / quota_c; the union is taken in key order and an item several
    channels propose keeps its best key, so every channel fills about its quota of the slots and a shared item
    takes one. scores: -key (higher comes first). ``last_timing_s``: seconds per channel in the last call.
    """

    def __init__(self, channels: Mapping[str, object], quotas: Mapping[str, float]) -> None:
        if not channels:
            raise ValueError("MergedRetriever: no channels")
        if set(quotas) != set(channels):
            raise ValueError(f"MergedRetriever: quotas name {sorted(quotas)}, the channels are {sorted(channels)}")
        bad = {k: v for k, v in quotas.items() if not (np.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"MergedRetriever: every quota must be finite and > 0, got {bad}")
        self.names = list(channels)
        self.channels = [channels[k] for k in self.names]
        total = float(sum(quotas.values()))
        self.quotas = np.array([quotas[k] / total for k in self.names])
        self.last_timing_s: dict[str, float] = {}

    def select_with_origin(self, requests: Requests, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items int64 [B, n], scores float32 [B, n], origin int8 [B, n]: index into ``names``, -1 at PAD)."""
        check_select("merged", None, n)
        items, keys, origin = [], [], []
        for c, ch in enumerate(self.channels):
            t0 = time.perf_counter()
            i, _ = ch.select(requests, None, n)
            self.last_timing_s[self.names[c]] = time.perf_counter() - t0
            key = (np.arange(i.shape[1]) + 0.5) / self.quotas[c]
            items.append(i)
            keys.append(np.where(i == PAD, np.inf, key[None, :]))
            origin.append(np.full(i.shape, c, np.int8))
        items, keys, origin = (np.concatenate(x, axis=1) for x in (items, keys, origin))
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
