"""The real KuaiRand-Pure side tables the world is built on: read, checked, resized, written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...artifacts import atomic_path
from ..schema import DataValidationError, check_columns, check_id_column
from .config import ACTIVITY_LEVEL, USER_CAT_COLUMNS, USER_FEATURES_FILE, VIDEO_FEATURES_FILE


def value_codes(values: pd.Series) -> np.ndarray:
    """Dense integer codes of a column; NaN gets its own code (0..n_unique)."""
    codes, _ = pd.factorize(values, sort=True, use_na_sentinel=False)
    return codes.astype(np.int64)


def first_tag(tag: pd.Series, source: str) -> np.ndarray:
    """KuaiRand's ``tag`` is a string, sometimes a comma list ("2,11"), sometimes NaN: the first tag, -1 for NaN."""
    first = tag.astype("string").str.split(",").str[0].str.strip()
    num = pd.to_numeric(first, errors="coerce")
    bad = first.notna() & num.isna()
    if bad.any():
        raise DataValidationError(f"{source}: column 'tag' has a non-numeric tag {first[bad].iloc[0]!r}")
    return num.fillna(-1).astype(np.int64).to_numpy()


def read_tables(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [data_dir / USER_FEATURES_FILE, data_dir / VIDEO_FEATURES_FILE]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"KuaiRand-Pure side table not found: {p}")
    users = pd.read_csv(paths[0])
    items = pd.read_csv(paths[1], dtype={"tag": "string", "video_type": "string", "upload_type": "string"})
    check_columns(users, {"user_id": "int", **{c: "any" for c in USER_CAT_COLUMNS}}, str(paths[0]))
    check_id_column(users, "user_id", str(paths[0]), unique=True)
    check_columns(items, {"video_id": "int", "author_id": "int", "video_duration": "number", "music_type": "number",
                          "tag": "any", "video_type": "any", "upload_type": "any"}, str(paths[1]))
    check_id_column(items, "video_id", str(paths[1]), unique=True)
    unknown = ~users["user_active_degree"].isin(list(ACTIVITY_LEVEL))
    if unknown.any():
        value = users["user_active_degree"][unknown].iloc[0]
        raise DataValidationError(
            f"{paths[0]}: column 'user_active_degree' has an unknown value {value!r} (known: {sorted(ACTIVITY_LEVEL)})"
        )
    if len(users) == 0 or len(items) == 0:
        raise DataValidationError(f"{data_dir}: empty side table(s)")
    return users.sort_values("user_id", kind="stable").reset_index(drop=True), \
        items.sort_values("video_id", kind="stable").reset_index(drop=True)


def resize_users(users: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """The output user table: [n] rows.

    Fewer than the real users: a seeded subsample (ids kept). More: all real users plus copies of random real
    users with new ids after the largest real id; in each copy every onehot_feat column is, with probability 0.2,
    replaced by that column of another random real user (keeps each column's marginal, makes copies distinct).
    """
    n_real = len(users)
    if n is None or n == n_real:
        return users.copy()
    if n < n_real:
        src = np.sort(rng.choice(n_real, size=n, replace=False))
        return users.iloc[src].reset_index(drop=True)
    extra = n - n_real
    src_extra = rng.integers(0, n_real, size=extra)
    new = users.iloc[src_extra].reset_index(drop=True)
    for col in (c for c in users.columns if c.startswith("onehot_feat")):
        swap = rng.random(extra) < 0.2
        donor = rng.integers(0, n_real, size=extra)
        vals = new[col].to_numpy(copy=True)
        vals[swap] = users[col].to_numpy()[donor[swap]]
        new[col] = vals
    new["user_id"] = int(users["user_id"].max()) + 1 + np.arange(extra, dtype=np.int64)
    return pd.concat([users, new], ignore_index=True)


def resize_items(items: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """The output video table: [n] rows.

    More than the real videos: new videos perturb random real ones (new ids after the largest real id): the
    author is kept with probability 0.7, else drawn from the real author column; the tag is kept with probability
    0.8, else drawn from the real tag column (both keep the real distributions); the duration is jittered by a
    log-normal factor (sigma 0.3). Vectorised: works for millions of rows.
    """
    n_real = len(items)
    if n is None or n == n_real:
        return items.copy()
    if n < n_real:
        src = np.sort(rng.choice(n_real, size=n, replace=False))
        return items.iloc[src].reset_index(drop=True)
    extra = n - n_real
    src_extra = rng.integers(0, n_real, size=extra)
    cols = {c: items[c].to_numpy()[src_extra] for c in items.columns}
    swap = rng.random(extra) < 0.3
    donor = items["author_id"].to_numpy()[rng.integers(0, n_real, size=extra)]
    cols["author_id"] = np.where(swap, donor, cols["author_id"])
    swap = rng.random(extra) < 0.2
    cols["tag"] = np.where(swap, items["tag"].to_numpy()[rng.integers(0, n_real, size=extra)], cols["tag"])
    dur = cols["video_duration"].astype(np.float64) * np.exp(0.3 * rng.standard_normal(extra))
    cols["video_duration"] = np.round(np.clip(dur, 1000.0, None))
    cols["video_id"] = int(items["video_id"].max()) + 1 + np.arange(extra, dtype=np.int64)
    new = pd.DataFrame(cols).astype(items.dtypes.to_dict())
    return pd.concat([items, new], ignore_index=True)


def write_side_table(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
