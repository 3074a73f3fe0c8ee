"""Time-based train / valid / test split of the impressions.

A request is assigned to a split by its START time (the smallest ``time_ms`` among its impressions), so a
request never straddles two splits and every item of a request sees the same history. Days are calendar days
of the request start times, shifted by ``utc_offset_hours`` (KuaiRand's logs are in China time, UTC+8): the last
``test_days`` days that hold any request are test, the ``valid_days`` days before them are valid, the rest train.
:func:`drop_last_days` first leaves out the log's last days, for a backtest on an earlier period.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from .requests import request_start_ms
from .schema import Dataset, DataValidationError

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
SPLITS = ("train", "valid", "test")


def _fmt_ms(ms: int) -> str:
    return pd.Timestamp(int(ms), unit="ms").strftime("%Y-%m-%d %H:%M:%S UTC")


def time_split(dataset: Dataset, valid_days: int = 1, test_days: int = 1,
               utc_offset_hours: float = 0.0) -> dict[str, np.ndarray]:
    """Boolean masks ``{"train", "valid", "test"}`` over ``dataset.impressions`` rows (each bool [N]).

    Day ``d`` of a row is ``floor((request_start_ms + utc_offset_hours h) / 1 day)``. With ``D`` the last day,
    test = days ``(D - test_days, D]``, valid = days ``(D - test_days - valid_days, D - test_days]``, train = the
    earlier days. ``valid_days = 0`` gives an empty valid mask on purpose; any other empty part raises
    :class:`DataValidationError` naming the part and the time range it would cover.
    """
    if test_days < 1:
        raise ValueError(f"time_split: test_days must be >= 1, got {test_days}")
    if valid_days < 0:
        raise ValueError(f"time_split: valid_days must be >= 0, got {valid_days}")
    imp = dataset.impressions
    src = dataset.source("impressions")
    if len(imp) == 0:
        raise DataValidationError(f"{src}: no impressions to split")
    start = request_start_ms(imp)
    offset_ms = int(round(utc_offset_hours * 3_600_000))
    day = np.floor_divide(start + offset_ms, DAY_MS)
    last = int(day.max())
    test_from = last - test_days + 1
    valid_from = test_from - valid_days
    masks = {
        "train": day < valid_from,
        "valid": (day >= valid_from) & (day < test_from),
        "test": day >= test_from,
    }
    bounds = {  # [first day, last day] each part covers, for the error message
        "train": (int(day.min()), valid_from - 1),
        "valid": (valid_from, test_from - 1),
        "test": (test_from, last),
    }
    for part in SPLITS:
        if part == "valid" and valid_days == 0:
            continue
        if not masks[part].any():
            lo, hi = bounds[part]
            raise DataValidationError(
                f"{src}: split {part!r} is empty: no request starts in "
                f"[{_fmt_ms(lo * DAY_MS - offset_ms)}, {_fmt_ms((hi + 1) * DAY_MS - offset_ms)}) "
                f"(request starts span {_fmt_ms(start.min())} .. {_fmt_ms(start.max())}; "
                f"valid_days={valid_days}, test_days={test_days}, utc_offset_hours={utc_offset_hours})"
            )
    log.info("time_split: %s", {k: int(v.sum()) for k, v in masks.items()})
    return masks


def drop_last_days(dataset: Dataset, days: int, utc_offset_hours: float = 0.0) -> Dataset:
    """``dataset`` without the requests of its last ``days`` calendar days (request start days, as
    :func:`time_split` counts them; 0: ``dataset`` itself), and without the users and items that only those
    requests had: the log as it stood ``days`` days before it ends, for a backtest of an earlier period. Raises
    :class:`DataValidationError` when nothing is left."""
    if days < 0:
        raise ValueError(f"drop_last_days: days must be >= 0, got {days}")
    if days == 0:
        return dataset
    imp = dataset.impressions
    day = request_days(dataset, utc_offset_hours)
    last = int(day.max())
    keep = day <= last - days
    if not keep.any():
        raise DataValidationError(
            f"{dataset.source('impressions')}: data.drop_last_days = {days} leaves no request (the requests span "
            f"{last - int(day.min()) + 1} calendar day(s))")
    kept = imp[keep].reset_index(drop=True)
    gone = imp[~keep]
    # users / items first seen in the dropped days did not exist yet; those without any impression stay
    users = dataset.users[~dataset.users["user_id"].isin(np.setdiff1d(gone["user_id"], kept["user_id"]))]
    items = dataset.items[~dataset.items["item_id"].isin(np.setdiff1d(gone["item_id"], kept["item_id"]))]
    log.info("drop_last_days: %d day(s), %d of %d impressions, %d users, %d items left out", days, len(gone),
             len(imp), len(dataset.users) - len(users), len(dataset.items) - len(items))
    return dataclasses.replace(dataset, users=users.reset_index(drop=True), items=items.reset_index(drop=True),
                               impressions=kept)


def request_days(dataset: Dataset, utc_offset_hours: float = 0.0) -> np.ndarray:
    """Calendar day (days since the epoch, local time) of each impression's request start, int64 [N]."""
    start = request_start_ms(dataset.impressions)
    return np.floor_divide(start + int(round(utc_offset_hours * 3_600_000)), DAY_MS)


def quantile_split_days(dataset: Dataset, utc_offset_hours: float = 0.0, valid_share: float = 0.1,
                        test_share: float = 0.1) -> tuple[int, int]:
    """(valid_days, test_days) for :func:`time_split` when none are given: the last days that hold about
    ``test_share`` of the requests are test, the days before them that hold about ``valid_share`` valid.

    Counted in requests, not calendar days, so sparse or uneven logs (a few busy days, long quiet gaps) still get
    a test period with about a tenth of the traffic. With q_test the day of the (1 - test_share) quantile of the
    request start days and D the last day, test_days = D - q_test + 1 (at least 1); likewise valid_days from the
    (1 - test_share - valid_share) quantile, at least 1. Raises DataValidationError when the data span fewer than
    three days (no train / valid / test split by day is possible)."""
    imp = dataset.impressions
    first = ~imp["request_id"].duplicated().to_numpy()
    day = request_days(dataset, utc_offset_hours)[first]  # one entry per request
    days = np.unique(day)
    if len(days) < 3:
        raise DataValidationError(
            f"{dataset.source('impressions')}: the requests span {len(days)} calendar day(s); a split by day into "
            "train, valid and test needs at least 3"
        )
    last = int(days[-1])
    q_test = int(np.quantile(day, 1.0 - test_share, method="higher"))
    test_days = max(1, last - q_test + 1)
    valid_end = last - test_days  # last valid day
    q_valid = int(np.quantile(day, 1.0 - test_share - valid_share, method="higher"))
    valid_days = max(1, valid_end - q_valid + 1)
    # the train part must keep at least one day with data
    while valid_days > 1 and not (day < valid_end - valid_days + 1).any():
        valid_days -= 1
    while test_days > 1 and not (day < last - test_days + 1 - valid_days).any():
        test_days -= 1
    return int(valid_days), int(test_days)


def split_summary(dataset: Dataset, masks: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per split: impressions, requests, users, items, clicks, CTR, random-exposure share, time range."""
    imp = dataset.impressions
    start = request_start_ms(imp)
    rows = []
    for part, m in masks.items():
        m = np.asarray(m)
        if m.dtype != bool or m.shape != (len(imp),):
            raise ValueError(f"split_summary: mask {part!r} must be bool [{len(imp)}], got {m.dtype} {m.shape}")
        sub = imp[m]
        n = len(sub)
        rows.append({
            "split": part,
            "impressions": n,
            "requests": int(sub["request_id"].nunique()),
            "users": int(sub["user_id"].nunique()),
            "items": int(sub["item_id"].nunique()),
            "clicks": int(sub["click"].sum()),
            "ctr": float(sub["click"].mean()) if n else float("nan"),
            "rand_share": float(sub["is_rand"].mean()) if n else float("nan"),
            "start": _fmt_ms(start[m].min()) if n else "",
            "end": _fmt_ms(start[m].max()) if n else "",
        })
    return pd.DataFrame(rows).set_index("split")
