"""Requests: what the cascade serves, and how logged impressions become requests.

A request is one user at one moment in one context (e.g. hour, tab); its logged impressions are the items shown.
:func:`requests_frame` turns impressions into one row per request, :func:`to_requests` a frame into the
:class:`Requests` batch that every stage of the cascade takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Requests:
    """A batch of B requests. user_id, time_ms: int64 [B]; context: name -> array [B] (e.g. hour, tab).

    Rows may be invalid (a negative or missing user id); those get an error message and an empty result
    without disturbing the rest of the batch.
    """

    user_id: np.ndarray
    time_ms: np.ndarray
    context: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_id = np.asarray(self.user_id)
        self.time_ms = np.asarray(self.time_ms, dtype=np.int64)
        b = len(self.user_id)
        if self.time_ms.shape != (b,):
            raise ValueError(f"Requests: time_ms has shape {self.time_ms.shape}, expected ({b},)")
        for k, v in self.context.items():
            if len(v) != b:
                raise ValueError(f"Requests: context {k!r} has {len(v)} rows, expected {b}")
        if self.request_id is None:
            self.request_id = np.arange(b, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, idx: np.ndarray) -> "Requests":
        return Requests(self.user_id[idx], self.time_ms[idx], {k: np.asarray(v)[idx] for k, v in self.context.items()},
                        self.request_id[idx])

    def validity(self) -> list[str | None]:
        """Per request: None when valid, else the reason it cannot be served."""
        out: list[str | None] = [None] * len(self)
        uid = self.user_id
        bad = np.zeros(len(self), dtype=bool)
        if uid.dtype.kind == "f":
            bad |= ~np.isfinite(uid)
        if uid.dtype.kind in "fiu":
            bad |= np.nan_to_num(uid.astype(np.float64), nan=-1) < 0
        else:
            bad |= True
        bad |= self.time_ms < 0
        for i in np.flatnonzero(bad):
            out[i] = f"request {int(self.request_id[i])}: invalid user_id {uid[i]!r} or time_ms {int(self.time_ms[i])}"
        return out


def requests_frame(impressions: pd.DataFrame, context_names: list[str]) -> pd.DataFrame:
    """One row per request (in time order): request_id, user_id, time_ms (the request's start) and context."""
    g = impressions.groupby("request_id", sort=False)
    first = g.head(1).set_index("request_id")
    out = pd.DataFrame({"request_id": first.index.to_numpy(np.int64), "user_id": first["user_id"].to_numpy(np.int64),
                        "time_ms": g["time_ms"].min().loc[first.index].to_numpy(np.int64)})
    for c in context_names:
        out[c] = first[c].to_numpy()
    return out.sort_values(["time_ms", "request_id"], kind="stable").reset_index(drop=True)


def to_requests(frame: pd.DataFrame, context_names: list[str]) -> Requests:
    return Requests(frame["user_id"].to_numpy(np.int64), frame["time_ms"].to_numpy(np.int64),
                    {c: frame[c].to_numpy() for c in context_names}, frame["request_id"].to_numpy(np.int64))
