"""What a loaded dataset holds, in numbers a user checks before a run (`cascade data SOURCE PATH --check`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .leakage import check_leakage
from .schema import SIDES, Dataset, DataValidationError
from .split import DAY_MS, quantile_split_days, request_days, time_split


def describe_dataset(ds: Dataset, utc_offset_hours: float = 0.0) -> dict:
    """rows, users, items, requests, clicks, CTR, random-exposure share, the days the requests span, the features
    per side (name: kind) and the suggested split days (:func:`cascade.data.split.quantile_split_days`; None with
    the reason when the data cannot be split by day) and the problems that `cascade run` would refuse (no
    split by day, clicks of one class, a feature that gives the click away on the suggested split's train rows)."""
    imp = ds.impressions
    day = request_days(ds, utc_offset_hours)
    first, last = int(day.min()), int(day.max())
    try:
        valid_days, test_days = quantile_split_days(ds, utc_offset_hours)
        split = {"valid_days": valid_days, "test_days": test_days,
                 "set_with": f"--set data.valid_days={valid_days} --set data.test_days={test_days}"}
    except DataValidationError as e:
        split = {"valid_days": None, "test_days": None, "problem": str(e)}
    clicks = int(imp["click"].sum())
    problems = [split["problem"]] if "problem" in split else []
    if clicks in (0, len(imp)):
        problems.append(f"{'no impression is a click' if clicks == 0 else 'every impression is a click'}: a "
                        "teacher cannot learn from one class (check the click column)")
    elif "problem" not in split:
        try:  # the leakage guard of the data step, on the train rows of the suggested split
            check_leakage(ds, time_split(ds, valid_days=valid_days, test_days=test_days,
                                         utc_offset_hours=utc_offset_hours)["train"])
        except DataValidationError as e:
            problems.append(str(e))
    return {
        "name": ds.name,
        "files": dict(ds.sources),
        "rows": int(len(imp)),
        "users": int(len(ds.users)),
        "items": int(len(ds.items)),
        "requests": int(imp["request_id"].nunique()),
        "clicks": clicks,
        "ctr": float(imp["click"].mean()),
        "random_share": float(imp["is_rand"].mean()),
        "days": {"first": _date(first), "last": _date(last), "span": last - first + 1,
                 "with_requests": int(len(np.unique(day)))},
        "features": {s: {f.name: f.kind for f in ds.schema.by_side(s)} for s in SIDES},
        "suggested_split": split,
        "problems": problems,
    }


def _date(day: int) -> str:
    return pd.Timestamp(day * DAY_MS, unit="ms").strftime("%Y-%m-%d")
