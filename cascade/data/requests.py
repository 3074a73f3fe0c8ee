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

from .io import MAX_PLAUSIBLE_MS
from .schema import DataValidationError

#: Kinds of context values a cascade can encode: integer codes, any text (str keys), numbers.
CONTEXT_KINDS = ("int", "str", "float")


@dataclass
class Requests:
    """A batch of B requests. user_id, time_ms: [B] (int64 once validated); context: name -> array [B] (e.g. hour,
    tab); request_id: int64 [B] (default 0..B-1).

    Rows may be invalid (a missing, fractional, negative or non-numeric user id or time, a context value of the
    wrong type): :meth:`validity` gives each its own error message, and a cascade serves the other rows.
    Shapes are checked here: every array must be 1-d with B rows.
    """

    user_id: np.ndarray
    time_ms: np.ndarray
    context: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_id = np.asarray(self.user_id)
        if self.user_id.ndim != 1:
            raise ValueError(f"Requests: user_id must be 1-d [B], got shape {self.user_id.shape}")
        self.time_ms = np.asarray(self.time_ms)
        if self.time_ms.dtype.kind in "ib" or self.time_ms.dtype.kind == "u" and self.time_ms.dtype.itemsize < 8:
            self.time_ms = self.time_ms.astype(np.int64)  # a uint64 above 2**63 would wrap: validity names it
        b = len(self.user_id)
        if self.time_ms.shape != (b,):
            raise ValueError(f"Requests: time_ms has shape {self.time_ms.shape}, expected ({b},)")
        self.context = {k: np.asarray(v) for k, v in self.context.items()}
        for k, v in self.context.items():
            if v.shape != (b,):
                raise ValueError(f"Requests: context {k!r} has shape {v.shape}, expected ({b},)")
        if self.request_id is None:
            self.request_id = np.arange(b, dtype=np.int64)
        self.request_id = np.asarray(self.request_id)
        if self.request_id.shape != (b,):
            raise ValueError(f"Requests: request_id has shape {self.request_id.shape}, expected ({b},)")

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, idx: np.ndarray) -> Requests:
        return Requests(self.user_id[idx], self.time_ms[idx], {k: np.asarray(v)[idx] for k, v in self.context.items()},
                        self.request_id[idx])

    def validity(self, context_kinds: dict[str, str] | None = None) -> list[str | None]:
        """Per request: None when valid, else the reason it cannot be served (one message per bad row).

        user_id, time_ms (epoch milliseconds) and request_id must be integers >= 0 (an integral float or a numeric
        text counts; NaN, None, 1.5, "abc" or -1 do not). context_kinds: context name -> "int" (integer codes: an
        int, an integral float or a numeric text; NaN / None is a missing value, served as unknown), "float" (a
        number or NaN) or "str" (anything); a context column it names that the batch lacks raises ValueError naming
        it and the columns there are."""
        out: list[str | None] = [None] * len(self)
        if context_kinds:
            missing = [c for c in context_kinds if c not in self.context]
            if missing:
                raise ValueError(f"requests have no context column {missing[0]!r} (the cascade reads "
                                 f"{list(context_kinds)}; the requests have {list(self.context)})")
        checks = [("user_id", self.user_id, "int_id"), ("time_ms", self.time_ms, "int_id"),
                  ("request_id", self.request_id, "int_id")]
        checks += [(f"context {c!r}", self.context[c], k) for c, k in (context_kinds or {}).items()]
        for what, values, kind in checks:
            for i in np.flatnonzero(_bad_values(values, kind)):
                if out[i] is None:
                    out[i] = f"request {_show(self.request_id[i])}: invalid {what} {_show(values[i])} " + {
                        "int_id": "(an integer >= 0 is needed)", "int": "(an integer code is needed)",
                        "float": "(a number is needed)"}[kind]
        with np.errstate(invalid="ignore"):
            late = _numbers(self.time_ms) >= MAX_PLAUSIBLE_MS
        for i in np.flatnonzero(late):
            if out[i] is None:
                out[i] = (f"request {_show(self.request_id[i])}: time_ms {_show(self.time_ms[i])} lies past the year "
                          "5138: request times are epoch milliseconds (this looks like microseconds or nanoseconds)")
        return out

    def valid_rows(self, context_kinds: dict[str, str] | None = None) -> Requests:
        """This batch with user_id / time_ms / request_id as int64 and the context columns of ``context_kinds``
        as numbers where they are "int" or "float" (call on rows :meth:`validity` accepted)."""
        ctx = dict(self.context)
        for c, kind in (context_kinds or {}).items():
            if kind != "str" and ctx[c].dtype.kind not in "iufb":
                ctx[c] = _numbers(ctx[c])  # numeric texts -> numbers; a missing value stays NaN (unknown)
        return Requests(_as_int64(self.user_id), _as_int64(self.time_ms), ctx, _as_int64(self.request_id))


def _show(x) -> str:
    return repr(x.item() if isinstance(x, np.generic) else x)


def _numbers(values: np.ndarray) -> np.ndarray:
    """float64 [B] of any array: numbers as they are, numeric texts parsed, anything else NaN."""
    if values.dtype.kind in "iufb":
        return values.astype(np.float64)
    return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)


def _bad_values(values: np.ndarray, kind: str) -> np.ndarray:
    """bool [B]: rows whose value does not fit ``kind`` ("int_id", "int", "float", "str")."""
    if kind == "str":
        return np.zeros(len(values), dtype=bool)
    if values.dtype.kind == "i" or (values.dtype.kind == "u" and values.dtype.itemsize < 8):  # integral, finite
        return values < 0 if kind == "int_id" else np.zeros(len(values), dtype=bool)
    missing = pd.isna(values) if values.dtype.kind == "O" else (np.isnan(values) if values.dtype.kind == "f"
                                                               else np.zeros(len(values), dtype=bool))
    v = _numbers(values)
    with np.errstate(invalid="ignore"):
        if kind == "float":
            return ~missing & ~np.isfinite(v)
        integral = np.isfinite(v) & (v == np.floor(v)) & (np.abs(v) < 2.0**63)
        if kind == "int":
            return ~missing & ~integral
        return ~integral | (v < 0)  # int_id: never missing, never negative


def _as_int64(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "O":  # exact for big integers written as text (no float round trip)
        return np.array([int(x) if isinstance(x, str) and x.strip().lstrip("+-").isdigit() else int(float(x))
                         for x in values], dtype=np.int64)
    return values.astype(np.int64)


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
