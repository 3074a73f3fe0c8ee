"""Your own logs -> canonical tables, driven by a TOML mapping (see ``pipelines/custom.example.toml``).

The TOML names three files (CSV or parquet, paths relative to the TOML's folder; ``impressions`` may be a glob
whose files are concatenated in name order), maps your column names onto the canonical ones and declares the
model features::

    name = "my-shop"                      # optional, default: the TOML's file stem
    [files]     users = "u.parquet"  items = "i.csv"  impressions = "imp/*.parquet"
    [csv]       sep = ","                 # optional, for the CSV files
    [columns.users]        user_id = "uid"            # canonical name = your column name
    [columns.items]        item_id = "iid"
    [columns.impressions]  user_id = "uid"  item_id = "iid"  time_ms = "ts"  click = "clicked"
                           request_id = "session"  position = "pos"  is_rand = "random"   # optional
    [time]      unit = "s"  utc_offset_hours = 0  request_gap_s = 1800
    [missing]   fill = false
    [[features]] name = "age"  table = "users"  kind = "numeric"  side = "user"

Rules:

- A column not named under ``[columns.<table>]`` keeps its own name. A key there must be a canonical column or a
  declared feature of that table; any other key (and any unknown key anywhere in the file) raises, naming it.
- ``time_ms`` is converted from ``[time] unit`` ("ms" or "s") to epoch milliseconds and its unit is checked.
- ``request_id`` absent: a request is a run of one user's impressions in which consecutive impressions are at
  most ``request_gap_s`` seconds apart (default 1800 = 30 minutes, the usual web-session cut-off); the user's next
  impression after a longer gap opens a new request. Present: any values (text or numbers) naming sessions; one
  session must belong to one user. Either way request ids are re-numbered 0..R-1 in time order of the request's
  first impression.
- ``position`` absent: 0-based order by (time, file order) within the request. Present: must be non-negative
  integers, unique within a request.
- ``is_rand`` absent: 0 (no randomly exposed traffic). ``click``: 0/1 or booleans.
- ``hour`` and ``weekday`` are derived from ``time_ms`` (shifted by ``utc_offset_hours``) unless the impressions
  already have them; declare them as ``context`` features to use them.
- ``user_id`` and ``item_id`` are always categorical features (sides user / item), added when not declared.
- ``[missing] fill = false`` (default): a NaN in a feature column raises. ``true``: categorical NaN gets its own
  value (-1 / "missing"), numeric NaN the column median plus a 0/1 ``<col>_missing`` categorical feature.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import (
    assign_requests,
    check_time_unit,
    expand_glob,
    fill_missing_categorical,
    fill_missing_numeric,
    hour_weekday,
    py_scalar,
    read_table_strict,
    sort_impressions,
)
from .schema import IMPRESSION_COLUMNS, Dataset, DataValidationError, Feature, Schema

log = logging.getLogger(__name__)

_TOP_KEYS = {"name", "files", "csv", "columns", "time", "missing", "features"}
_SECTION_KEYS = {
    "files": {"users", "items", "impressions"},
    "csv": {"sep"},
    "columns": {"users", "items", "impressions"},
    "time": {"unit", "utc_offset_hours", "request_gap_s"},
    "missing": {"fill"},
}
_FEATURE_KEYS = {"name", "table", "kind", "side"}
_CANONICAL = {
    "users": {"user_id"},
    "items": {"item_id"},
    "impressions": set(IMPRESSION_COLUMNS) | {"hour", "weekday"},
}
_ID_COLUMN = {"users": "user_id", "items": "item_id"}
DEFAULT_REQUEST_GAP_S = 1800.0


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str, toml_path: Path) -> None:
    for key in d:
        if key not in allowed:
            raise DataValidationError(f"{toml_path}: unknown key {where}{key!r} (allowed: {sorted(allowed)})")


def _parse(toml_path: Path) -> dict:
    """Read and strictly check the mapping TOML; return it with defaults filled in."""
    if not toml_path.exists():
        raise DataValidationError(f"{toml_path}: mapping file not found")
    try:
        cfg = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataValidationError(f"{toml_path}: not valid TOML ({exc})") from None
    _check_keys(cfg, _TOP_KEYS, "", toml_path)
    for section, allowed in _SECTION_KEYS.items():
        sub = cfg.get(section, {})
        if not isinstance(sub, dict):
            raise DataValidationError(f"{toml_path}: [{section}] must be a table")
        _check_keys(sub, allowed, f"{section}.", toml_path)
    files = cfg.get("files", {})
    for table in ("users", "items", "impressions"):
        if not isinstance(files.get(table), str):
            raise DataValidationError(f"{toml_path}: [files] needs a path string for {table!r}")
    feats = cfg.get("features", [])
    if not isinstance(feats, list):
        raise DataValidationError(f"{toml_path}: 'features' must be an array of tables ([[features]])")
    features = []
    for k, f in enumerate(feats):
        _check_keys(f, _FEATURE_KEYS, f"features[{k}].", toml_path)
        missing = _FEATURE_KEYS - set(f)
        if missing:
            raise DataValidationError(f"{toml_path}: features[{k}] lacks key {sorted(missing)[0]!r}")
        if f["table"] not in ("users", "items", "impressions"):
            raise DataValidationError(
                f"{toml_path}: features[{k}] ({f['name']!r}): table {f['table']!r} must be users, items or impressions"
            )
        try:
            features.append(Feature(f["name"], f["table"], f["kind"], f["side"]))
        except ValueError as exc:
            raise DataValidationError(f"{toml_path}: features[{k}]: {exc}") from None
    columns = cfg.get("columns", {})
    for table in ("users", "items", "impressions"):
        mapping = columns.get(table, {})
        allowed = _CANONICAL[table] | {f.name for f in features if f.table == table}
        _check_keys(mapping, allowed, f"columns.{table}.", toml_path)
        for key, val in mapping.items():
            if not isinstance(val, str):
                raise DataValidationError(f"{toml_path}: columns.{table}.{key} must be a column name string")
    time = cfg.get("time", {})
    unit = time.get("unit", "ms")
    if unit not in ("ms", "s"):
        raise DataValidationError(f"{toml_path}: time.unit must be 'ms' or 's', got {unit!r}")
    gap = float(time.get("request_gap_s", DEFAULT_REQUEST_GAP_S))
    if not gap > 0:
        raise DataValidationError(f"{toml_path}: time.request_gap_s must be > 0, got {gap!r}")
    sep = cfg.get("csv", {}).get("sep", ",")
    fill = cfg.get("missing", {}).get("fill", False)
    if not isinstance(fill, bool):
        raise DataValidationError(f"{toml_path}: missing.fill must be true or false, got {fill!r}")
    return {"name": str(cfg.get("name", toml_path.stem)), "files": files, "sep": sep, "columns": columns,
            "unit": unit, "utc_offset_hours": float(time.get("utc_offset_hours", 0.0)), "gap_s": gap,
            "fill": fill, "features": features}


def _read(paths: list[Path], table: str, cfg: dict, features: list[Feature]) -> tuple[pd.DataFrame, list[int]]:
    """Read the files of one table, rename columns to canonical names; also return each file's row count."""
    rename = cfg["columns"].get(table, {})  # canonical -> source
    required_canon = {"users": ["user_id"], "items": ["item_id"],
                      "impressions": ["user_id", "item_id", "time_ms", "click"]}[table]
    optional_canon = ["request_id", "position", "is_rand", "hour", "weekday"] if table == "impressions" else []
    feat_names = [f.name for f in features if f.table == table and f.name not in required_canon]
    src = lambda c: rename.get(c, c)  # noqa: E731 - a one-line lookup
    required = [src(c) for c in required_canon] + [src(c) for c in feat_names if c not in optional_canon]
    for c in optional_canon:
        if c in rename:
            required.append(rename[c])
    dtypes = {src(c): "int64" for c in required_canon if c in ("user_id", "item_id")}
    if table == "impressions":
        dtypes[src("time_ms")] = "float64"
    for f in features:
        if f.table == table and f.kind == "numeric" and f.name not in required_canon:
            dtypes[src(f.name)] = "float64"
    id_cols = [src(c) for c in required_canon if c in ("user_id", "item_id")]
    nullable = [src(c) for c in feat_names] if cfg["fill"] else []
    frames, counts = [], []
    for p in paths:
        checks: dict[str, Any] = {"nonnegative": id_cols, "unique": id_cols if table != "impressions" else ()}
        if p.suffix.lower() not in (".parquet", ".pq"):
            checks["sep"] = cfg["sep"]
        # Columns neither canonical nor declared as features are not read: they may hold anything.
        df = read_table_strict(p, required, dtypes, usecols=list(dict.fromkeys(required)), nullable=nullable,
                               **checks)
        frames.append(df.rename(columns={v: k for k, v in rename.items()}))
        counts.append(len(df))
    return (pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]), counts


def _derive_requests(imp: pd.DataFrame, gap_ms: float, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Request group [N] from the given request_id column, or from user + time gap; and the given positions."""
    user = imp["user_id"].to_numpy(np.int64)
    t = imp["time_ms"].to_numpy(np.int64)
    if "request_id" in imp.columns:
        group, _ = pd.factorize(imp["request_id"], use_na_sentinel=True)
        if (group < 0).any():
            row = int(np.flatnonzero(group < 0)[0])
            raise DataValidationError(f"{source}: column 'request_id' has a missing value at row {row}")
        users_per = pd.Series(user).groupby(group).nunique()
        if (users_per > 1).any():
            g = int(users_per.index[users_per.to_numpy() > 1][0])
            row = int(np.flatnonzero(group == g)[0])
            raise DataValidationError(
                f"{source}: request {py_scalar(imp['request_id'].iloc[row])!r} holds impressions of more than one user"
            )
    else:
        order = np.lexsort((np.arange(len(imp)), t, user))
        u, ts = user[order], t[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (np.diff(ts) > gap_ms)]
        group = np.empty(len(imp), dtype=np.int64)
        group[order] = np.cumsum(new) - 1
    position = None
    if "position" in imp.columns:
        pos = imp["position"].to_numpy()
        if pos.dtype.kind == "f":
            frac = pos != np.floor(pos)
            if frac.any():
                raise DataValidationError(
                    f"{source}: column 'position' holds a non-integer {py_scalar(pos[frac][0])!r}"
                )
        position = pos.astype(np.int64)
        if (position < 0).any():
            raise DataValidationError(
                f"{source}: column 'position' holds a negative value {py_scalar(position[position < 0][0])!r}"
            )
        dup = pd.DataFrame({"g": group, "p": position}).duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise DataValidationError(
                f"{source}: column 'position' repeats {int(position[row])} within one request (row {row})"
            )
    return np.asarray(group, dtype=np.int64), position


def _binary(imp: pd.DataFrame, col: str, source: str) -> None:
    v = imp[col].to_numpy()
    if v.dtype.kind == "b":
        imp[col] = v.astype(np.int64)
        return
    with np.errstate(invalid="ignore"):
        bad = ~np.isin(v, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataValidationError(f"{source}: column {col!r} must be 0/1, row {row} holds {py_scalar(v[row])!r}")
    imp[col] = v.astype(np.int64)


def _side_missing(df: pd.DataFrame, features: list[Feature], table: str, source: str) -> list[Feature]:
    """Apply the [missing] fill policy to one table's features; return the flag features it adds."""
    cat = [f.name for f in features if f.table == table and f.kind == "categorical" and f.name in df.columns]
    num = [f.name for f in features if f.table == table and f.kind == "numeric" and f.name in df.columns]
    fill_missing_categorical(df, [c for c in cat if df[c].isna().any()], source)
    side = {"users": "user", "items": "item", "impressions": "context"}[table]
    sides = {f.name: f.side for f in features}
    flags = fill_missing_numeric(df, num, source)
    return [Feature(c, table, "categorical", sides[c[: -len("_missing")]] if table == "impressions" else side)
            for c in flags]


def load_custom(mapping_toml_path: str | Path) -> Dataset:
    """Load your own users / items / impressions files as described by a mapping TOML (see module docstring).

    Returns a validated Dataset named by ``name`` (default: the TOML's stem), sources = the files read.
    """
    toml_path = Path(mapping_toml_path)
    cfg = _parse(toml_path)
    base = toml_path.parent
    features = list(cfg["features"])
    declared = {f.name for f in features}
    for name, table, side in (("user_id", "users", "user"), ("item_id", "items", "item")):
        if name not in declared:
            features.insert(0 if table == "users" else len(features), Feature(name, table, "categorical", side))
    user_path = base / cfg["files"]["users"]
    item_path = base / cfg["files"]["items"]
    imp_pattern = base / cfg["files"]["impressions"]
    imp_paths = expand_glob(imp_pattern) if any(ch in cfg["files"]["impressions"] for ch in "*?[") else [imp_pattern]

    users, _ = _read([user_path], "users", cfg, features)
    items, _ = _read([item_path], "items", cfg, features)
    imp, counts = _read(imp_paths, "impressions", cfg, features)
    imp_src = str(imp_paths[0]) if len(imp_paths) == 1 else str(imp_pattern)

    # Time: per file, so that an error names the file and its row.
    t = imp["time_ms"].to_numpy(np.float64)
    start = 0
    time_col = cfg["columns"].get("impressions", {}).get("time_ms", "time_ms")  # the user's name, for messages
    for p, n in zip(imp_paths, counts):
        first_line = 1 if p.suffix.lower() in (".parquet", ".pq") else 2
        check_time_unit(t[start:start + n], cfg["unit"], str(p), time_col, first_line=first_line)
        start += n
    scale = 1000.0 if cfg["unit"] == "s" else 1.0
    t_ms = np.rint(t * scale)
    if cfg["unit"] == "ms" and (t_ms != t).any():
        row = int(np.flatnonzero(t_ms != t)[0])
        raise DataValidationError(
            f"{imp_src}: column {time_col!r} must hold whole milliseconds, row {row} holds {py_scalar(t[row])!r}"
        )
    imp["time_ms"] = t_ms.astype(np.int64)

    _binary(imp, "click", imp_src)
    if "is_rand" in imp.columns:
        _binary(imp, "is_rand", imp_src)
    else:
        imp["is_rand"] = np.zeros(len(imp), dtype=np.int64)
    group, given_position = _derive_requests(imp, cfg["gap_s"] * 1000.0, imp_src)
    request_id, position = assign_requests(group, imp["time_ms"].to_numpy())
    imp["request_id"] = request_id
    imp["position"] = position if given_position is None else given_position
    hour, weekday = hour_weekday(imp["time_ms"].to_numpy(), cfg["utc_offset_hours"])
    if "hour" not in imp.columns:
        imp["hour"] = hour
    if "weekday" not in imp.columns:
        imp["weekday"] = weekday

    if cfg["fill"]:
        for df, table, s in ((users, "users", str(user_path)), (items, "items", str(item_path)),
                             (imp, "impressions", imp_src)):
            features += _side_missing(df, features, table, s)
    front = ["request_id", "user_id", "item_id", "time_ms", "position", "click", "is_rand"]
    imp = sort_impressions(imp[front + [c for c in imp.columns if c not in front]])
    sources = {"users": str(user_path), "items": str(item_path), "impressions": imp_src}
    ds = Dataset(users, items, imp, Schema(tuple(features)), name=cfg["name"], sources=sources)
    return ds.validate()
