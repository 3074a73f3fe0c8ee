"""KuaiRand-Pure / KuaiRand-1K (and the synthetic world, which writes the same layout) -> canonical tables.

Official layout of a KuaiRand directory (``<v>`` is the variant: ``pure``, ``1k``, ...)::

    user_features_<v>.csv            user_id + 30 user features
    video_features_basic_<v>.csv     video_id, author_id, video_type, upload_dt, upload_type, visible_status,
                                     video_duration, server_width, server_height, music_id, music_type, tag
    log_standard_*_<v>.csv           the production feed (is_rand = 0), one or several files
    log_random_*_<v>.csv             the randomly exposed slice (is_rand = 1)

Every log has the header of :data:`LOG_COLUMNS`: ``date`` is the Beijing (UTC+8) day as YYYYMMDD, ``hourmin`` the
Beijing hour as HH00 (HHMM is accepted as well), ``time_ms`` epoch milliseconds.

Requests. KuaiRand has no request id. A request here is one (user_id, date, hourmin, tab, is_rand) group: the
videos one user was shown in one feed tab within one hour, random and standard traffic kept apart.
``position`` is the 0-based order by ``time_ms`` within the request (ties keep file order); ``request_id`` is
dense, 0..R-1 in time order of each request's first impression.

Features. Ids and small-vocabulary codes are categorical (missing codes get their own value: -1, or "missing"
for text); counts and durations are numeric (a missing numeric gets the column median plus a 0/1
``<col>_missing`` flag, see :func:`cascade.data.io.fill_missing_numeric`). ``tag`` is the FIRST tag of the
comma-separated list. Context: hour, weekday (Beijing time) and tab. Privileged (post-click): play_time_ms,
long_view, is_like, is_follow, is_comment, is_forward, is_hate, is_profile_enter, profile_stay_time,
comment_stay_time. ``duration_ms`` (the video's length) stays an impression column but is no feature: the item
table's ``video_duration`` carries it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .io import (
    MISSING_INT,
    assign_requests,
    check_time_unit,
    data_line,
    fill_missing_categorical,
    fill_missing_numeric,
    group_ids,
    hour_weekday,
    py_scalar,
    read_csv_strict,
    sort_impressions,
    yyyymmdd,
)
from .schema import Dataset, DataValidationError, Feature, Schema

log = logging.getLogger(__name__)

BEIJING_UTC_OFFSET_HOURS = 8.0

#: Header of every official log file, in order.
LOG_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)
#: 0/1 columns of the logs.
_LOG_FLAGS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
              "is_profile_enter", "is_rand")
#: Durations: read as float (some releases write "1234.0"), must be whole, non-negative milliseconds.
_LOG_DURATIONS = ("play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time")
_LOG_DTYPES = {c: "int64" for c in ("user_id", "video_id", "date", "hourmin", "tab") + _LOG_FLAGS}
_LOG_DTYPES.update({c: "float64" for c in ("time_ms",) + _LOG_DURATIONS})

#: Post-click impression columns offered as privileged (training-only) numeric features.
PRIVILEGED_COLUMNS: tuple[str, ...] = (
    "play_time_ms", "long_view", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "is_profile_enter",
    "profile_stay_time", "comment_stay_time",
)

VIDEO_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status", "video_duration",
    "server_width", "server_height", "music_id", "music_type", "tag",
)
_VIDEO_DTYPES = {
    "video_id": "int64", "author_id": "int64", "video_type": "str", "upload_dt": "str", "upload_type": "str",
    "visible_status": "float64", "video_duration": "float64", "server_width": "float64", "server_height": "float64",
    "music_id": "int64", "music_type": "float64", "tag": "str",
}
_ITEM_CATEGORICAL = ("item_id", "author_id", "video_type", "upload_type", "music_id", "music_type", "tag")
_ITEM_NUMERIC = ("video_duration", "server_width", "server_height")

_USER_NUMERIC = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
_USER_CATEGORICAL_TEXT = ("user_active_degree", "follow_user_num_range", "fans_user_num_range",
                          "friend_user_num_range", "register_days_range")
_USER_CATEGORICAL_CODES = ("is_lowactive_period", "is_live_streamer", "is_video_author") + tuple(
    f"onehot_feat{k}" for k in range(18)
)
USER_COLUMNS: tuple[str, ...] = ("user_id",) + _USER_CATEGORICAL_TEXT + _USER_CATEGORICAL_CODES + _USER_NUMERIC
_USER_DTYPES = {"user_id": "int64", **{c: "str" for c in _USER_CATEGORICAL_TEXT},
                **{c: "float64" for c in _USER_CATEGORICAL_CODES + _USER_NUMERIC}}


def _one_file(directory: Path, pattern: str) -> Path:
    paths = sorted(directory.glob(pattern))
    if len(paths) != 1:
        found = [p.name for p in paths] or "none"
        raise DataValidationError(f"{directory}: expected exactly one file matching {pattern!r}, found {found}")
    return paths[0]


def _detect_variant(directory: Path) -> str:
    paths = sorted(directory.glob("user_features_*.csv"))
    if len(paths) != 1:
        found = [p.name for p in paths] or "none"
        raise DataValidationError(
            f"{directory}: cannot tell the KuaiRand variant: expected exactly one user_features_<variant>.csv, "
            f"found {found}; keep one variant's files in the folder"
        )
    return paths[0].stem[len("user_features_"):]


def read_users(path: Path) -> tuple[pd.DataFrame, list[Feature]]:
    """The user table (user_id int64 + features) and its features, from ``user_features_*.csv``."""
    df = read_csv_strict(path, USER_COLUMNS, _USER_DTYPES, nullable=USER_COLUMNS[1:],
                         nonnegative=("user_id",) + _USER_NUMERIC, unique=("user_id",), usecols=USER_COLUMNS)
    src = str(path)
    fill_missing_categorical(df, _USER_CATEGORICAL_TEXT + _USER_CATEGORICAL_CODES, src)
    flags = fill_missing_numeric(df, _USER_NUMERIC, src)
    feats = [Feature("user_id", "users", "categorical", "user")]
    feats += [Feature(c, "users", "categorical", "user") for c in _USER_CATEGORICAL_TEXT + _USER_CATEGORICAL_CODES]
    feats += [Feature(c, "users", "numeric", "user") for c in _USER_NUMERIC]
    feats += [Feature(c, "users", "categorical", "user") for c in flags]
    return df, feats


def first_tag(tags: pd.Series, source: str) -> np.ndarray:
    """int64 [N]: the first id of each comma-separated tag list ("20,43" -> 20); missing -> -1."""
    head = tags.str.split(",", n=1).str[0].str.strip()
    num = pd.to_numeric(head, errors="coerce")
    bad = head.notna() & num.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataValidationError(
            f"{source}: column 'tag' must hold comma-separated integer tags, line {data_line(source, row)} holds "
            f"{py_scalar(tags.iloc[row])!r}"
        )
    return num.fillna(MISSING_INT).to_numpy().astype(np.int64)


def read_items(path: Path) -> tuple[pd.DataFrame, list[Feature]]:
    """The item table (item_id = video_id, int64, + features) and its features, from ``video_features_basic_*``."""
    df = read_csv_strict(path, VIDEO_COLUMNS, _VIDEO_DTYPES, nullable=VIDEO_COLUMNS[1:],
                         nonnegative=("video_id", "video_duration", "server_width", "server_height"),
                         unique=("video_id",), usecols=VIDEO_COLUMNS)
    src = str(path)
    df = df.rename(columns={"video_id": "item_id"})
    df["tag"] = first_tag(df["tag"], src)
    fill_missing_categorical(df, [c for c in _ITEM_CATEGORICAL if c != "item_id"], src)
    flags = fill_missing_numeric(df, _ITEM_NUMERIC, src)
    feats = [Feature(c, "items", "categorical", "item") for c in _ITEM_CATEGORICAL]
    feats += [Feature(c, "items", "numeric", "item") for c in _ITEM_NUMERIC]
    feats += [Feature(c, "items", "categorical", "item") for c in flags]
    return df, feats


def read_log(path: Path) -> pd.DataFrame:
    """One official log file, type-checked, with its time columns checked against ``time_ms`` (UTC+8)."""
    df = read_csv_strict(path, LOG_COLUMNS, _LOG_DTYPES,
                         nonnegative=("user_id", "video_id", "time_ms", "tab") + _LOG_DURATIONS, usecols=LOG_COLUMNS)
    src = str(path)
    for col in ("time_ms",) + _LOG_DURATIONS:
        v = df[col].to_numpy()
        frac = v != np.floor(v)
        if frac.any():
            row = int(np.flatnonzero(frac)[0])
            line = data_line(src, row)
            raise DataValidationError(
                f"{src}: column {col!r} must hold whole milliseconds, line {line} holds {py_scalar(v[row])!r}"
            )
        df[col] = v.astype(np.int64)
    for col in _LOG_FLAGS:
        v = df[col].to_numpy()
        bad = (v != 0) & (v != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            line = data_line(src, row)
            raise DataValidationError(f"{src}: column {col!r} must be 0/1, line {line} holds {py_scalar(v[row])!r}")
        df[col] = v.astype(np.int8)
    t = df["time_ms"].to_numpy()
    check_time_unit(t, "ms", src, "time_ms", line_of=lambda row: data_line(src, row))
    hourmin = df["hourmin"].to_numpy()
    bad = (hourmin < 0) | (hourmin // 100 > 23) | (hourmin % 100 > 59)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataValidationError(
            f"{src}: column 'hourmin' must be HHMM, line {data_line(src, row)} holds {py_scalar(hourmin[row])!r}"
        )
    hour, weekday = hour_weekday(t, BEIJING_UTC_OFFSET_HOURS)
    date = yyyymmdd(t, BEIJING_UTC_OFFSET_HOURS)
    minute = (t // 60_000) % 60
    # hourmin is the Beijing hour floored to the hour (HH00) in the official release; HHMM must match exactly.
    hm = hourmin % 100
    bad = (df["date"].to_numpy() != date) | (hourmin // 100 != hour) | ((hm != 0) & (hm != minute))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line = data_line(src, row)
        raise DataValidationError(
            f"{src}: line {line}: date={int(df['date'].iloc[row])}, hourmin={int(hourmin[row])} disagree with "
            f"time_ms={int(t[row])}, which is {int(date[row])} {int(hour[row]):02d}:{int(minute[row]):02d} in "
            f"Beijing time (UTC+8)"
        )
    df["hour"] = hour
    df["weekday"] = weekday
    return df


def warn_repeated_rows(logs: pd.DataFrame, files: np.ndarray) -> int:
    """Warn where rows of the logs repeat another row in every column (a log file copied beside itself, which the
    file patterns match twice, doubles every impression): how many, and the files of the first one. Kept: the
    official files may hold such rows. Returns the number of repeats. files: each row's file name [N]."""
    key = pd.util.hash_pandas_object(logs, index=False)  # one 64-bit hash a row: a repeat shares it
    if not key.duplicated().any():
        return 0
    again = logs.duplicated(keep=False).to_numpy()
    if not again.any():
        return 0
    rows = np.flatnonzero(again)
    same = rows[(logs.iloc[rows] == logs.iloc[rows[0]]).all(axis=1).to_numpy()]
    n = int(logs.duplicated().sum())
    log.warning("KuaiRand logs: %d row(s) repeat another row in every column (%.2f%% of %d); the first is in %s. "
                "A log file copied beside itself doubles every impression: keep one copy in the folder", n,
                100 * n / len(logs), len(logs), " and ".join(sorted({files[i] for i in same})))
    return n


def load_kuairand(directory: str | Path, logs: Sequence[str] = ("standard", "random"),
                  variant: str | None = None) -> Dataset:
    """Load a KuaiRand directory in the official layout into a validated :class:`Dataset`.

    directory: the folder holding user_features_<v>.csv, video_features_basic_<v>.csv and the logs.
    logs: which logs to read, any of "standard" (log_standard_*) and "random" (log_random_*); every file that
      matches is read, in name order, standard before random.
    variant: the file-name suffix ("pure", "1k", ...); None = detected from the one user_features_*.csv.
    Returns Dataset(users, items, impressions, schema, name="kuairand-<v>", sources) with impressions sorted by
    (request_id, position); see the module docstring for requests, positions and features.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataValidationError(f"{directory}: KuaiRand directory not found")
    unknown = [k for k in logs if k not in ("standard", "random")]
    if unknown or not logs:
        raise ValueError(f"load_kuairand: logs must be a non-empty subset of ('standard', 'random'), got {logs!r}")
    variant = variant or _detect_variant(directory)
    user_path = _one_file(directory, f"user_features_{variant}.csv")
    item_path = _one_file(directory, f"video_features_basic_{variant}.csv")
    users, user_feats = read_users(user_path)
    items, item_feats = read_items(item_path)

    log_paths: list[Path] = []
    kinds: list[str] = []
    for kind in ("standard", "random"):
        if kind in logs:
            pattern = f"log_{kind}_*{variant}*.csv"
            found = sorted(directory.glob(pattern))
            if not found:
                raise DataValidationError(
                    f"{directory / pattern}: no {kind} log file matches (the official layout has one; from Python, "
                    f"load_kuairand(..., logs=...) without {kind!r} skips it)"
                )
            log_paths += found
            kinds += [kind] * len(found)
    frames = []
    for p, kind in zip(log_paths, kinds):
        frames.append(read_log(p))
        log.info("read %s: %d rows", p, len(frames[-1]))
        other = np.flatnonzero(frames[-1]["is_rand"].to_numpy() != (kind == "random"))
        if len(other):
            raise DataValidationError(f"{p}: a {kind} log, but line {data_line(p, int(other[0]))} has is_rand = "
                                      f"{int(frames[-1]['is_rand'].iloc[other[0]])} (the {kind} log's rows have "
                                      f"is_rand = {int(kind == 'random')}): a row of the other log, or a misnamed file")
    imp = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    warn_repeated_rows(imp, np.repeat([p.name for p in log_paths], [len(f) for f in frames]))
    imp = imp.rename(columns={"video_id": "item_id", "is_click": "click"})
    t = imp["time_ms"].to_numpy()
    group = group_ids(imp, ["user_id", "date", "hourmin", "tab", "is_rand"])
    # Row order of the concatenation is the file order: it breaks ties in time.
    imp["request_id"], imp["position"] = assign_requests(group, t)
    imp["click"] = imp["click"].astype(np.int64)
    imp["is_rand"] = imp["is_rand"].astype(np.int64)
    front = ["request_id", "user_id", "item_id", "time_ms", "position", "click", "is_rand", "hour", "weekday", "tab"]
    imp = sort_impressions(imp[front + [c for c in imp.columns if c not in front]])

    features = [*user_feats, *item_feats,
                Feature("hour", "impressions", "categorical", "context"),
                Feature("weekday", "impressions", "categorical", "context"),
                Feature("tab", "impressions", "categorical", "context"),
                *(Feature(c, "impressions", "numeric", "privileged") for c in PRIVILEGED_COLUMNS)]
    sources = {"users": str(user_path), "items": str(item_path),
               "impressions": str(log_paths[0]) if len(log_paths) == 1 else
               ", ".join(str(directory / f"log_{k}_*{variant}*.csv") for k in ("standard", "random") if k in logs)}
    ds = Dataset(users, items, imp, Schema(tuple(features)), name=f"kuairand-{variant}", sources=sources,
                 utc_offset_hours=BEIJING_UTC_OFFSET_HOURS)
    return ds.validate()
