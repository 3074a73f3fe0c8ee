"""Requests: what the cascade serves, and how logged impressions become requests.

A request is one user at one moment in one context (e.g. hour, tab); its logged impressions are the items shown.
One meaning of a request's time everywhere: its START, the smallest ``time_ms`` of its impressions
(:func:`request_start_ms`). Splits, cross features (events strictly before it) and serving all use it, so no item
of a request sees another one's click. :func:`requests_frame` turns impressions into one row per request,
:func:`to_requests` a frame into the :class:`Requests` batch that every stage of the cascade takes, and
:func:`impression_requests` makes each impression a one-item request (scoring logged pairs, e.g. for AUC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .schema import DataValidationError


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

    def take(self, idx: np.ndarray) -> Requests:
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


def request_start_ms(impressions: pd.DataFrame) -> np.ndarray:
    """Start time of each row's request: min ``time_ms`` over the rows sharing its ``request_id``. int64 [N]."""
    for col in ("request_id", "time_ms"):
        if col not in impressions.columns:
            raise DataValidationError(f"impressions: missing required column {col!r}")
    start = impressions.groupby("request_id", sort=False)["time_ms"].transform("min")
    return start.to_numpy(dtype=np.int64)


def requests_frame(impressions: pd.DataFrame, context_names: list[str]) -> pd.DataFrame:
    """One row per request (in time order): request_id, user_id, time_ms (the request's start) and context."""
    start = request_start_ms(impressions)
    first = ~impressions["request_id"].duplicated().to_numpy()  # each request's first row
    rows = impressions[first]
    out = pd.DataFrame({"request_id": rows["request_id"].to_numpy(np.int64),
                        "user_id": rows["user_id"].to_numpy(np.int64),
                        "time_ms": start[first]})
    for c in context_names:
        out[c] = rows[c].to_numpy()
    return out.sort_values(["time_ms", "request_id"], kind="stable").reset_index(drop=True)


def to_requests(frame: pd.DataFrame, context_names: list[str]) -> Requests:
    return Requests(frame["user_id"].to_numpy(np.int64), frame["time_ms"].to_numpy(np.int64),
                    {c: frame[c].to_numpy() for c in context_names}, frame["request_id"].to_numpy(np.int64))


def impression_requests(impressions: pd.DataFrame, context_names: list[str]) -> Requests:
    """Each impression as a one-item request (B = number of impressions) at its request's start, with the
    impression's context: score ``candidates = item_id[:, None]`` with a stage's scorer to get its score of every
    logged pair."""
    return Requests(impressions["user_id"].to_numpy(np.int64), request_start_ms(impressions),
                    {c: impressions[c].to_numpy() for c in context_names}, impressions["request_id"].to_numpy(np.int64))
