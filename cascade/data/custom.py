"""Your own logs -> canonical tables, driven by a TOML mapping (see ``pipelines/custom.example.toml``).

The TOML names three files (CSV or parquet, paths relative to the TOML's folder; ``impressions`` may be a glob
whose files are concatenated in name order), maps your column names onto the canonical ones and declares the
model features::

    name = "my-shop"                      # optional, default: the TOML's file stem
    [files]     users = "u.parquet"  items = "i.csv"  impressions = "imp/*.parquet"
                allow_outside = false     # optional: true lets paths leave the TOML's folder
    [csv]       sep = ","  encoding = "utf-8"      # optional, for the CSV files
    [columns.users]        user_id = "uid"            # canonical name = your column name
    [columns.items]        item_id = "iid"
    [columns.impressions]  user_id = "uid"  item_id = "iid"  time_ms = "ts"  click = "clicked"
                           request_id = "session"  position = "pos"  is_rand = "random"   # optional
    [time]      unit = "s"  utc_offset_hours = 0  request_gap_s = 1800
    [missing]   fill = false
    [[features]] name = "age"  table = "users"  kind = "numeric"  side = "user"

Rules:

- Paths are relative to the TOML's folder and must stay inside it (no absolute path, no ``..`` out of it, no
  symbolic link out of it) unless ``[files] allow_outside = true``; a path that leaves it is refused unread.
- A column not named under ``[columns.<table>]`` keeps its own name. A key there must be a canonical column or a
  declared feature of that table; any other key (and any unknown key anywhere in the file) raises, naming it.
- Optional canonical columns (impressions: ``request_id``, ``position``, ``is_rand``, ``hour``, ``weekday``; items:
  ``tag``, ``author_id``, the columns the cross features count) are read when a file has a column of that name,
  even if not mapped or declared as a feature (logged), so a ``is_rand`` column is never silently ignored.
- Ids: integer columns are the ids; text ids (e.g. ``"A1B2"``, ``"sku-42"``) are mapped to int64 ids 0..n-1 in
  sorted order of the users / items table, and the original ids kept in a ``user_key`` / ``item_key`` column of
  the users / items table (a float id such as 1.5 or NaN raises, naming the column and line). An integer is
  written without a leading zero or "+": ``"0276"`` is a text id, kept as written, and never meets ``276`` (an
  impression naming it where the side table has the other spelling is refused as an unknown id, naming both).
- A feature may not be the click label: the ``click`` column, or another name for the same file column, is refused
  as a feature on every side.
- ``time_ms`` is converted from ``[time] unit`` ("ms" or "s") to epoch milliseconds and its unit is checked; a
  parquet timestamp column (any unit) is read as the instant it holds, one without a time zone in the log's local
  time (``utc_offset_hours``), and ``[time] unit`` beside it is refused; a time after today is refused.
- ``request_id`` absent: a request is a run of one user's impressions in which consecutive impressions are at
  most ``request_gap_s`` seconds apart (default 1800 = 30 minutes, the usual web-session cut-off); the user's next
  impression after a longer gap opens a new request. Present: any values (text or numbers) naming sessions; one
  session must belong to one user, and its impressions must lie within one day of its first (a request is one
  serving call's list; the time split and the features from earlier events read its first impression's time, so
  a session id that runs for days would put later days' events in an earlier split); ``request_gap_s`` set beside it
  would do nothing, so it is refused. Either way
  request ids are re-numbered 0..R-1 in time order of the request's first impression.
- ``position`` absent: 0-based order by (time, file order) within the request, and an impression repeated exactly
  (same request or user, item, time and click) raises naming both lines (the copy would count its click twice).
  Present: must be non-negative integers, unique within a request.
- ``is_rand`` absent: 0 (no randomly exposed traffic). ``click``: 0/1 or booleans.
- ``hour`` and ``weekday`` are the impressions' own columns where they have them (mapped or not; whole numbers
  0..23 / 0..6, checked), else derived from ``time_ms`` shifted by ``utc_offset_hours`` (-12..14, the log's local
  time, whose calendar days the time split cuts: ``Dataset.utc_offset_hours``); declare them as ``context``
  features to use them.
- ``user_id`` and ``item_id`` are always categorical features (sides user / item), added when not declared.
- ``[missing] fill = false`` (default): a NaN in a feature column raises. ``true``: categorical NaN gets its own
  value (-1 / "missing"), numeric NaN the column median plus a 0/1 ``<col>_missing`` categorical feature.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import (
    assign_requests,
    check_file,
    check_time_unit,
    data_line,
    epoch_ms_of_timestamps,
    expand_glob,
    fill_missing_categorical,
    fill_missing_numeric,
    hour_weekday,
    parquet_timestamp,
    py_scalar,
    read_table_strict,
    sort_impressions,
    table_columns,
)
from .schema import IMPRESSION_COLUMNS, Dataset, DataValidationError, Feature, Schema
from .split import DAY_MS

log = logging.getLogger(__name__)

_TOP_KEYS = {"name", "files", "csv", "columns", "time", "missing", "features"}
_SECTION_KEYS = {
    "files": {"users", "items", "impressions", "allow_outside"},
    "csv": {"sep", "encoding"},
    "columns": {"users", "items", "impressions"},
    "time": {"unit", "utc_offset_hours", "request_gap_s"},
    "missing": {"fill"},
}
_FEATURE_KEYS = {"name", "table", "kind", "side"}
_CANONICAL = {
    "users": {"user_id"},
    "items": {"item_id", "tag", "author_id"},
    "impressions": set(IMPRESSION_COLUMNS) | {"hour", "weekday"},
}
#: Canonical columns read when a file has them (mapped or not); the others are required.
_OPTIONAL = {"users": [], "items": ["tag", "author_id"],
             "impressions": ["request_id", "position", "is_rand", "hour", "weekday"]}
_REQUIRED = {"users": ["user_id"], "items": ["item_id"], "impressions": ["user_id", "item_id", "time_ms", "click"]}
_ID_COLUMN = {"users": "user_id", "items": "item_id"}
DEFAULT_REQUEST_GAP_S = 1800.0


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str, toml_path: Path) -> None:
    for key in d:
        if key not in allowed:
            raise DataValidationError(f"{toml_path}: unknown key {where}{key!r} (allowed: {sorted(allowed)})")


def _number(d: Mapping[str, Any], key: str, default: float, where: str, toml_path: Path) -> float:
    """``d[key]`` (default ``default``): an int or float, not a boolean, finite; else raise naming ``where``."""
    val = d.get(key, default)
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        raise DataValidationError(f"{toml_path}: {where}{key} must be a finite number, got {val!r}")
    return float(val)


def _read_toml(toml_path: Path) -> dict:
    """The mapping file's TOML; every way of not being a readable UTF-8 TOML file raises naming it."""
    if not toml_path.exists():
        raise DataValidationError(f"{toml_path}: mapping file not found")
    if toml_path.is_dir():
        raise DataValidationError(f"{toml_path}: is a directory; give the mapping TOML file (e.g. "
                                  f"{toml_path / 'mapping.toml'})")
    check_file(toml_path)
    try:
        raw = toml_path.read_bytes()
    except OSError as exc:
        raise DataValidationError(f"{toml_path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataValidationError(f"{toml_path}: line {line} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); a "
                                  "TOML file is UTF-8: save it so") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataValidationError(f"{toml_path}: not valid TOML ({exc})") from None


def _parse(toml_path: Path) -> dict:
    """Read and strictly check the mapping TOML; return it with defaults filled in."""
    cfg = _read_toml(toml_path)
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
        if not files[table].strip():
            raise DataValidationError(f"{toml_path}: files.{table} is empty; name the {table} file")
    feats = cfg.get("features", [])
    if not isinstance(feats, list):
        raise DataValidationError(f"{toml_path}: 'features' must be an array of tables ([[features]])")
    features = []
    for k, f in enumerate(feats):
        if not isinstance(f, dict):
            raise DataValidationError(f"{toml_path}: features[{k}] must be a table ([[features]]), got {f!r}")
        _check_keys(f, _FEATURE_KEYS, f"features[{k}].", toml_path)
        missing = _FEATURE_KEYS - set(f)
        if missing:
            raise DataValidationError(f"{toml_path}: features[{k}] lacks key {sorted(missing)[0]!r}")
        if not isinstance(f["name"], str) or not f["name"]:
            raise DataValidationError(f"{toml_path}: features[{k}].name must be a column name, got {f['name']!r}")
        if f["table"] not in ("users", "items", "impressions"):
            raise DataValidationError(
                f"{toml_path}: features[{k}] ({f['name']!r}): table {f['table']!r} must be users, items or impressions"
            )
        try:
            features.append(Feature(f["name"], f["table"], f["kind"], f["side"]))
        except ValueError as exc:
            raise DataValidationError(f"{toml_path}: features[{k}]: {exc}") from None
        first = next(j for j, g in enumerate(features) if g.name == f["name"])
        if first < k:
            raise DataValidationError(f"{toml_path}: features[{k}] repeats the name {f['name']!r} of "
                                      f"features[{first}]; a feature name is declared once")
        own = {"users": "user", "items": "item"}.get(f["table"])
        if own is not None and f["side"] != own:
            raise DataValidationError(f"{toml_path}: features[{k}] ({f['name']!r}): a column of the {f['table']} "
                                      f"table describes the {own}, so its side is {own!r}, not {f['side']!r}")
        ids = {"user_id": "users", "item_id": "items"}
        if f["name"] in ids and (f["kind"] != "categorical" or f["table"] != ids[f["name"]]):
            raise DataValidationError(f"{toml_path}: features[{k}] ({f['name']!r}): an id is a categorical feature "
                                      f"of the {ids[f['name']]} table (kind = \"categorical\", table = "
                                      f"\"{ids[f['name']]}\"), got kind {f['kind']!r}, table {f['table']!r}")
    columns = cfg.get("columns", {})
    for table in ("users", "items", "impressions"):
        mapping = columns.get(table, {})
        if not isinstance(mapping, dict):
            raise DataValidationError(f"{toml_path}: columns.{table} must be a table ([columns.{table}] with lines "
                                      f"canonical = \"your column\"), got {mapping!r}")
        allowed = _CANONICAL[table] | {f.name for f in features if f.table == table}
        _check_keys(mapping, allowed, f"columns.{table}.", toml_path)
        for key, val in mapping.items():
            if not isinstance(val, str):
                raise DataValidationError(f"{toml_path}: columns.{table}.{key} must be a column name string")
    time = cfg.get("time", {})
    unit = time.get("unit", "ms")
    if unit not in ("ms", "s"):
        raise DataValidationError(f"{toml_path}: time.unit must be 'ms' or 's', got {unit!r}")
    gap = _number(time, "request_gap_s", DEFAULT_REQUEST_GAP_S, "time.", toml_path)
    if not gap > 0:
        raise DataValidationError(f"{toml_path}: time.request_gap_s must be > 0, got {gap!r}")
    request_src = columns.get("impressions", {}).get("request_id")
    if "request_gap_s" in time and request_src is not None:
        raise DataValidationError(f"{toml_path}: time.request_gap_s does nothing: the requests are the sessions of "
                                  f"columns.impressions.request_id = {request_src!r}; remove one of the two")
    offset = _number(time, "utc_offset_hours", 0.0, "time.", toml_path)
    if not -12 <= offset <= 14:
        raise DataValidationError(f"{toml_path}: time.utc_offset_hours must lie in -12..14 (the world's time zones), "
                                  f"got {offset!r}")
    sep = cfg.get("csv", {}).get("sep", ",")
    if not isinstance(sep, str) or not sep or any(ch in sep for ch in '"\r\n'):
        raise DataValidationError(f"{toml_path}: csv.sep must be a non-empty string such as \",\" or \"\\t\" (no quote "
                                  f"or line break), got {sep!r}")
    encoding = cfg.get("csv", {}).get("encoding", "utf-8")
    if not isinstance(encoding, str):
        raise DataValidationError(f"{toml_path}: csv.encoding must be a string such as \"latin-1\"")
    fill = cfg.get("missing", {}).get("fill", False)
    if not isinstance(fill, bool):
        raise DataValidationError(f"{toml_path}: missing.fill must be true or false, got {fill!r}")
    outside = files.get("allow_outside", False)
    if not isinstance(outside, bool):
        raise DataValidationError(f"{toml_path}: files.allow_outside must be true or false, got {outside!r}")
    click_src = columns.get("impressions", {}).get("click", "click")
    for f in features:
        src = columns.get(f.table, {}).get(f.name, f.name)
        if f.name == "click" or (f.table == "impressions" and src == click_src):
            raise DataValidationError(
                f"{toml_path}: feature {f.name!r} is the click label (column {src!r} of the impressions): a model "
                "that reads its own label learns nothing; remove it from [[features]]"
            )
    return {"name": str(cfg.get("name", toml_path.stem)), "files": files, "sep": sep, "encoding": encoding,
            "columns": columns, "unit": unit, "utc_offset_hours": offset, "gap_s": gap, "fill": fill,
            "features": features, "allow_outside": outside, "set_in_time": set(time),
            "csv_set": bool(cfg.get("csv"))}


def _confined(base: Path, rel: str, key: str, toml_path: Path, allow_outside: bool) -> Path:
    """``base / rel``, refused (unread) when it leaves ``base`` and ``allow_outside`` is false."""
    p = Path(rel).expanduser()
    if allow_outside:
        return p if p.is_absolute() else base / p
    if p.is_absolute():
        raise DataValidationError(f"{toml_path}: files.{key} is an absolute path; paths are relative to the "
                                  "mapping's folder (set [files] allow_outside = true to allow others)")
    root = base.resolve()
    target = (base / p).resolve()
    if target != root and root not in target.parents:
        raise DataValidationError(f"{toml_path}: files.{key} leaves the mapping's folder {base} (through '..' or a "
                                  "symbolic link); set [files] allow_outside = true to allow it")
    return base / p


def mapping_files(mapping_toml_path: str | Path) -> list[Path]:
    """Every file a mapping reads: the TOML itself, then the users, items and impression files (globs expanded).
    Raises like :func:`load_custom` for a bad mapping or a path outside the mapping's folder."""
    toml_path = Path(mapping_toml_path)
    cfg = _parse(toml_path)
    user_path, item_path, imp_paths, _ = _paths(cfg, toml_path)
    return [toml_path, user_path, item_path, *imp_paths]


def _paths(cfg: dict, toml_path: Path) -> tuple[Path, Path, list[Path], Path]:
    """(users file, items file, impression files, impressions path or pattern) of a parsed mapping."""
    base, files, outside = toml_path.parent, cfg["files"], cfg["allow_outside"]
    user_path = _confined(base, files["users"], "users", toml_path, outside)
    item_path = _confined(base, files["items"], "items", toml_path, outside)
    imp_pattern = _confined(base, files["impressions"], "impressions", toml_path, outside)
    if any(ch in files["impressions"] for ch in "*?["):
        imp_paths = expand_glob(imp_pattern)
        for q in imp_paths:
            _confined(base, os.path.relpath(q, base), "impressions", toml_path, outside)
    else:
        imp_paths = [imp_pattern]
    for key, paths in (("users", [user_path]), ("items", [item_path]), ("impressions", imp_paths)):
        for q in paths:
            try:
                check_file(q)
            except DataValidationError as e:
                raise DataValidationError(f"{toml_path}: files.{key} = {files[key]!r}: {e}") from None
    if cfg["csv_set"] and all(q.suffix.lower() in (".parquet", ".pq") for q in [user_path, item_path, *imp_paths]):
        raise DataValidationError(f"{toml_path}: [csv] is set but every file is parquet: its settings would do "
                                  "nothing; remove the [csv] table")
    return user_path, item_path, imp_paths, imp_pattern


def _sources(paths: list[Path], table: str, cfg: dict) -> dict[str, str]:
    """canonical name -> file column of one table's canonical columns, from the headers alone: the mapped ones, and
    the optional ones (:data:`_OPTIONAL`) that the files have under their own name (logged), declared as features
    or not. The files of a table must agree on the optional columns they have."""
    rename = dict(cfg["columns"].get(table, {}))
    headers = [table_columns(q, cfg["sep"], cfg["encoding"]) for q in paths]
    for c in _OPTIONAL[table]:
        if c in rename:
            continue
        have = [c in h for h in headers]
        if all(have):
            log.info("%s: column %r is picked up as the canonical %s.%s (present, not mapped)", paths[0], c, table, c)
            rename[c] = c
        elif any(have):
            lacking = paths[have.index(False)]
            raise DataValidationError(f"{lacking}: has no column {c!r}, which {paths[have.index(True)]} has; the "
                                      f"files of {table!r} must have the same columns")
    return rename


def _read(paths: list[Path], table: str, cfg: dict, features: list[Feature],
          rename: dict[str, str]) -> tuple[pd.DataFrame, list[int]]:
    """Read the files of one table, rename columns to canonical names (``rename``: canonical -> file column, see
    :func:`_sources`); also return each file's row count. Ids are read as the files hold them (integers or text,
    see :func:`_ids`); a feature the files lack raises, except the impressions' ``hour`` / ``weekday`` (derived
    from time) and the other optional impression columns (derived too)."""
    required_canon = _REQUIRED[table]
    feat_names = [f.name for f in features if f.table == table and f.name not in required_canon]
    src = lambda c: rename.get(c, c)  # noqa: E731 - a one-line lookup
    required = [src(c) for c in required_canon] + [rename[c] for c in _OPTIONAL[table] if c in rename]
    required += [src(c) for c in feat_names if c not in _OPTIONAL[table] or table != "impressions"]
    dtypes: dict[str, str] = {src(c): "str" for c in required_canon if c in ("user_id", "item_id")}
    if table == "impressions":
        dtypes[src("time_ms")] = "float64"
    for f in features:
        if f.table == table and f.kind == "numeric" and f.name not in required_canon:
            dtypes[src(f.name)] = "float64"
    id_cols = [src(c) for c in required_canon if c in ("user_id", "item_id")]
    # a gap in a feature column is filled with fill on, and named with the remedy with it off; a canonical column
    # that is not a feature is never filled, and with fill on a gap in one gets its own message
    gaps = {src(c): "feature" for c in feat_names}
    if cfg["fill"]:
        gaps = {rename[c]: f"{table}.{c}" for c in _OPTIONAL[table] if c in rename and c not in feat_names}
    frames, counts = [], []
    for q in paths:
        checks: dict[str, Any] = {"unique": id_cols if table != "impressions" else ()}
        if q.suffix.lower() not in (".parquet", ".pq"):
            checks["sep"] = cfg["sep"]
            checks["encoding"] = cfg["encoding"]
        stamp = parquet_timestamp(q, src("time_ms")) if table == "impressions" else None
        if stamp is not None and "unit" in cfg["set_in_time"]:
            raise DataValidationError(
                f"{q}: column {src('time_ms')!r} is a parquet timestamp ({stamp}), which carries its own unit: "
                f"[time] unit = {cfg['unit']!r} would do nothing; remove it")
        # Columns neither canonical nor declared as features are not read: they may hold anything.
        df = read_table_strict(q, required, {c: t for c, t in dtypes.items() if stamp is None or c != src("time_ms")},
                               usecols=list(dict.fromkeys(required)),
                               nullable=[*(src(c) for c in feat_names), *gaps] if cfg["fill"] else [*gaps], **checks)
        for col, what in gaps.items():
            if col in df.columns and df[col].isna().any():  # an impressions' hour / weekday may be derived
                at = f"{q}: column {col!r} has a missing value at line {data_line(q, int(df[col].isna().argmax()))}"
                raise DataValidationError(
                    f"{at}; [missing] fill = true in the mapping fills gaps in feature columns (categorical: a value "
                    "of their own; numeric: the train median and a <column>_missing flag)" if what == "feature" else
                    f"{at}; [missing] fill fills the declared features, and {col!r} is mapped as {what} without "
                    "being one: fill it in the file, or declare it as a feature")
        if stamp is not None:  # epoch milliseconds, the default unit
            df[src("time_ms")] = epoch_ms_of_timestamps(df[src("time_ms")], cfg["utc_offset_hours"])
        # canonical name <- its source column; one source may serve two names (a feature and the cross tag)
        own = {c for c in (*required_canon, *feat_names) if c not in rename}  # read under their own names
        renamed = {k: df[v] for k, v in rename.items()}
        df = pd.DataFrame({**{c: df[c] for c in df.columns if c not in rename.values() or c in own}, **renamed})
        for c in ("user_id", "item_id"):
            if c in df.columns:
                df[c] = _id_values(df[c], str(q), src(c), lambda row, q=q: data_line(q, row),
                                   unique=table != "impressions")
        frames.append(df)
        counts.append(len(df))
    return (pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]), counts


#: An integer id written as text: digits without a leading zero or a "+" sign. "0276" or "+5" is a text id, kept as
#: written (so it meets no 276 or 5 in another file: refused as unknown, never silently merged).
_INT_TEXT = r"\s*(0|-?[1-9]\d*)\s*"
_FLOAT_TEXT = r"\s*([+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)|[+-]?(nan|NaN|NAN|inf|Inf|INF))\s*"


def _id_values(s: pd.Series, source: str, col: str, line_of, unique: bool = False) -> pd.Series:
    """An id column as read (CSV: text; parquet: as stored) -> int64 (integer ids) or str (text ids). A float id
    (``7.0``, ``1.5``, NaN), a boolean or a negative integer raises naming the column, the value and its line
    (``line_of(row)``); so does, with ``unique``, one integer written twice (``" 7"`` and ``"7"``)."""
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_float_dtype(s):
        v = s.to_numpy()
        bad = (~np.isfinite(v) | (v != np.floor(v))) if pd.api.types.is_float_dtype(s) else np.ones(len(v), bool)
        row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        raise DataValidationError(f"{source}: column {col!r} must hold integer or text ids, but line "
                                  f"{line_of(row)} holds {py_scalar(v[row])!r} (the column is stored as "
                                  f"{s.dtype})")
    if not pd.api.types.is_integer_dtype(s):
        text = s.astype(str)
        is_int = text.str.fullmatch(_INT_TEXT).to_numpy(bool)
        if not is_int.all():
            floaty = text.str.fullmatch(_FLOAT_TEXT).to_numpy(bool)
            if floaty.any():
                row = int(np.flatnonzero(floaty)[0])
                raise DataValidationError(f"{source}: column {col!r} must hold integer or text ids, but line "
                                          f"{line_of(row)} holds {text.iloc[row]!r}")
            return text  # text ids
        num = pd.to_numeric(text)
        if num.dtype != np.int64:  # beyond int64: text ids, exactly as written
            return text
        dup = num.duplicated().to_numpy() if unique else np.zeros(len(num), bool)
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            first = int(np.flatnonzero(num.to_numpy() == num.iloc[row])[0])
            raise DataValidationError(f"{source}: column {col!r} has duplicate id {int(num.iloc[row])} (line "
                                      f"{line_of(first)} {text.iloc[first]!r}, line {line_of(row)} "
                                      f"{text.iloc[row]!r})")
        s = num
    v = s.to_numpy(np.int64)
    if (v < 0).any():
        row = int(np.flatnonzero(v < 0)[0])
        raise DataValidationError(f"{source}: column {col!r} has a negative id {py_scalar(v[row])!r} at line "
                                  f"{line_of(row)} (integer ids are >= 0; text ids are fine too)")
    return s.astype(np.int64)


def _ids(users: pd.DataFrame, items: pd.DataFrame, imp: pd.DataFrame, sources: dict[str, str],
         names: dict[str, dict[str, str]], where) -> None:
    """In place: text ids -> int64 ids 0..n-1 in sorted order of the side table (original in ``<entity>_key``).

    Where one table holds text ids of an entity and another integer ones, the integers are read as text (``7``
    meets ``"7"``, never ``"007"``). An impression naming an id its side table lacks raises, naming the id, the
    impressions' column (``names[table][col]``: the file's name) and line (``where(row)``), and a spelling of the
    same number that the side table has (``0276`` / ``276``)."""
    for col, side, key in (("user_id", users, "user_key"), ("item_id", items, "item_key")):
        table = "users" if col == "user_id" else "items"
        text = not (side[col].dtype == np.int64 and imp[col].dtype == np.int64)
        keys = side[col].astype(str).to_numpy() if text else side[col].to_numpy()
        vocab = pd.Index(np.sort(keys))
        rows = vocab.get_indexer(imp[col].astype(str).to_numpy() if text else imp[col].to_numpy())
        if (rows < 0).any():
            row = int(np.flatnonzero(rows < 0)[0])
            bad = py_scalar(imp[col].iloc[row])
            number = str(bad).strip().lstrip("0")
            alike = [k for k in map(str, keys) if k.strip().lstrip("0") == number and k != str(bad)][:1]
            why = ("spaces around an id are part of it" if alike and alike[0].strip() == str(bad).strip()
                   else "an id with a leading zero is text, not a number")
            hint = f"; {sources[table]} has {alike[0]!r}: ids are compared as written, and {why}" if alike else ""
            raise DataValidationError(f"{where(row)}: column {names['impressions'][col]!r} references unknown "
                                      f"{table[:-1]} {bad!r} (not in column {names[table][col]!r} of "
                                      f"{sources[table]}){hint}")
        if not text:
            continue
        side[key] = keys
        side[col] = vocab.get_indexer(keys).astype(np.int64)
        imp[col] = rows.astype(np.int64)
        log.info("%s: text ids mapped to 0..%d (sorted; the original ids are in column %r)", sources[table],
                 len(vocab) - 1, key)


def _whole(s: pd.Series, where, source_col: str, top: int | None = None) -> np.ndarray:
    """A column of whole numbers 0..``top`` (numbers, or texts of numbers) -> int64 [N], or float64 [N] keeping
    its missing values as NaN (the reader lets them through only where ``[missing] fill`` allows). Any other value
    raises naming its file and line (``where(row)``), the column and the value."""
    missing = s.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=np.float64)
    else:
        v = pd.to_numeric(s.astype(str).str.strip(), errors="coerce").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~missing & ~((v >= 0) & (v == np.floor(v)) & (v <= (np.inf if top is None else top)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        allowed = f"0..{top}" if top is not None else ">= 0"
        raise DataValidationError(f"{where(row)}: column {source_col!r} must hold whole numbers {allowed}, but "
                                  f"holds {py_scalar(s.iloc[row])!r}")
    return v if missing.any() else v.astype(np.int64)


def _duplicate_impressions(imp: pd.DataFrame, where, names: dict[str, str]) -> None:
    """Impressions without a position column: raise at the first row that repeats an earlier one (same request or
    user, item, time and click, as read), naming both lines. Nothing tells the two apart, and the copy would count
    its click twice."""
    keys = [c for c in ("request_id", "user_id", "item_id", "time_ms", "click") if c in imp.columns]
    again = imp.duplicated(subset=keys).to_numpy()
    if not again.any():
        return
    row = int(np.flatnonzero(again)[0])
    first = int(np.flatnonzero(np.logical_and.reduce([imp[c].to_numpy() == imp[c].iloc[row] for c in keys]))[0])
    shown = ", ".join(f"{names[c]}={_plain(imp[c].iloc[row])!r}" for c in keys)
    raise DataValidationError(f"{where(row)}: repeats the impression of {where(first)} ({shown}) and there is no "
                              "position column to tell them apart; a copy counts its click twice: remove it (or "
                              "give the impressions a position column)")


def _plain(x):
    """A value as read, for messages: a whole float (a time read as float64) as an int."""
    x = py_scalar(x)
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _derive_requests(imp: pd.DataFrame, gap_ms: float, where, names: dict[str, str]
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Request group [N] from the given request_id column, or from user + time gap; and the given positions.
    Messages name the file's columns (``names``) and lines (``where(row)``)."""
    user = imp["user_id"].to_numpy(np.int64)
    t = imp["time_ms"].to_numpy(np.int64)
    if "request_id" in imp.columns:
        group, _ = pd.factorize(imp["request_id"], use_na_sentinel=True)
        if (group < 0).any():
            row = int(np.flatnonzero(group < 0)[0])
            raise DataValidationError(f"{where(row)}: column {names['request_id']!r} has a missing value")
        users_per = pd.Series(user).groupby(group).nunique()
        if (users_per > 1).any():
            g = int(users_per.index[users_per.to_numpy() > 1][0])
            rows = np.flatnonzero(group == g)
            other = int(rows[user[rows] != user[rows[0]]][0])
            raise DataValidationError(
                f"{where(other)}: request {py_scalar(imp['request_id'].iloc[other])!r} (column "
                f"{names['request_id']!r}) holds impressions of more than one user (another at {where(int(rows[0]))}); "
                "a request is one user's"
            )
        spread = pd.Series(t).groupby(group).agg(["min", "max"])
        long = spread.index[(spread["max"] - spread["min"]).to_numpy() > DAY_MS]
        if len(long):
            rows = np.flatnonzero(group == long[0])
            first, last = int(rows[np.argmin(t[rows])]), int(rows[np.argmax(t[rows])])
            raise DataValidationError(
                f"{where(last)}: request {py_scalar(imp['request_id'].iloc[last])!r} (column "
                f"{names['request_id']!r}) runs {(t[last] - t[first]) / DAY_MS:.1f} days past its first impression "
                f"at {where(first)}; a request is one serving call's list, and the time split and the features from "
                "earlier events read its first impression's time. Map a column that names one page view or call, "
                "or leave request_id unmapped to cut each user's impressions into requests at gaps of [time] "
                "request_gap_s"
            )
    else:
        order = np.lexsort((np.arange(len(imp)), t, user))
        u, ts = user[order], t[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (np.diff(ts) > gap_ms)]
        group = np.empty(len(imp), dtype=np.int64)
        group[order] = np.cumsum(new) - 1
    position = None
    if "position" in imp.columns:
        position = _whole(imp["position"], where, names["position"])
        if position.dtype != np.int64:
            row = int(np.flatnonzero(np.isnan(position))[0])
            raise DataValidationError(f"{where(row)}: column {names['position']!r} has a missing value")
        dup = pd.DataFrame({"g": group, "p": position}).duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            first = int(np.flatnonzero((group == group[row]) & (position == position[row]))[0])
            raise DataValidationError(
                f"{where(row)}: column {names['position']!r} repeats position {int(position[row])} of its request "
                f"(also at {where(first)}); positions are unique within a request"
            )
    return np.asarray(group, dtype=np.int64), position


def _locate(row: int, paths: list[Path], counts: list[int]) -> str:
    """'FILE line N' of row ``row`` of the impressions concatenated from ``paths`` (``counts`` rows each)."""
    for q, n in zip(paths, counts):
        if row < n:
            return f"{q} line {data_line(q, row)}"
        row -= n
    return f"row {row}"


def _binary(imp: pd.DataFrame, col: str, where, source_col: str) -> None:
    """In place: a 0/1 column (numbers 0 / 1, booleans, or the texts "0" / "1" / "true" / "false") -> int64;
    any other value raises naming it and its file and line (``where(row)``)."""
    s = imp[col]
    if pd.api.types.is_bool_dtype(s):
        imp[col] = s.to_numpy().astype(np.int64)
        return
    if pd.api.types.is_numeric_dtype(s):
        v = s.to_numpy(dtype=np.float64)
    else:
        text = s.astype(str).str.strip().str.lower()
        v = pd.to_numeric(text.replace({"true": "1", "false": "0"}), errors="coerce").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isin(v, (0.0, 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataValidationError(f"{where(row)}: column {source_col!r} must be 0/1 (or true/false), but holds "
                                  f"{py_scalar(s.iloc[row])!r}")
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


def _check_time_keys(cfg: dict, imp_columns: dict[str, str], imp_file: Path, toml_path: Path) -> None:
    """Refuse a [time] key that the impressions' own columns (``imp_columns``: canonical -> file column) make do
    nothing: request_gap_s beside a request_id column. (utc_offset_hours always does something: the time split
    cuts the log's local days.)"""
    if "request_gap_s" in cfg["set_in_time"] and "request_id" in imp_columns:
        raise DataValidationError(f"{toml_path}: time.request_gap_s does nothing: {imp_file} has a column "
                                  "'request_id', whose sessions are the requests; remove request_gap_s (or the column)")


def load_custom(mapping_toml_path: str | Path) -> Dataset:
    """Load your own users / items / impressions files as described by a mapping TOML (see module docstring).

    Returns a validated Dataset named by ``name`` (default: the TOML's stem), sources = the files read.
    """
    toml_path = Path(mapping_toml_path)
    cfg = _parse(toml_path)
    features = list(cfg["features"])
    declared = {f.name for f in features}
    for name, table, side in (("user_id", "users", "user"), ("item_id", "items", "item")):
        if name not in declared:
            features.insert(0 if table == "users" else len(features), Feature(name, table, "categorical", side))
    user_path, item_path, imp_paths, imp_pattern = _paths(cfg, toml_path)
    # The headers first: a mapping that cannot work is refused before any data is read.
    rename = {"users": _sources([user_path], "users", cfg), "items": _sources([item_path], "items", cfg),
              "impressions": _sources(imp_paths, "impressions", cfg)}
    _check_time_keys(cfg, rename["impressions"], imp_paths[0], toml_path)

    users, _ = _read([user_path], "users", cfg, features, rename["users"])
    items, _ = _read([item_path], "items", cfg, features, rename["items"])
    imp, counts = _read(imp_paths, "impressions", cfg, features, rename["impressions"])
    imp_src = str(imp_paths[0]) if len(imp_paths) == 1 else str(imp_pattern)
    # The files' own column names, for messages.
    names = {table: {c: rename[table].get(c, c) for c in _CANONICAL[table]} for table in rename}
    mapped = names["impressions"]

    def where(row: int) -> str:
        return _locate(row, imp_paths, counts)

    if "position" not in imp.columns:
        _duplicate_impressions(imp, where, mapped)
    _ids(users, items, imp, {"users": str(user_path), "items": str(item_path), "impressions": imp_src}, names, where)

    # Time: per file, so that an error names the file and its line.
    t = imp["time_ms"].to_numpy(np.float64)
    start = 0
    for p, n in zip(imp_paths, counts):
        check_time_unit(t[start:start + n], cfg["unit"], str(p), mapped["time_ms"],
                        line_of=lambda row, p=p: data_line(p, row))
        start += n
    scale = 1000.0 if cfg["unit"] == "s" else 1.0
    t_ms = np.rint(t * scale)
    if cfg["unit"] == "ms" and (t_ms != t).any():
        row = int(np.flatnonzero(t_ms != t)[0])
        raise DataValidationError(
            f"{where(row)}: column {mapped['time_ms']!r} must hold whole milliseconds, but holds {py_scalar(t[row])!r}"
        )
    imp["time_ms"] = t_ms.astype(np.int64)
    late = t_ms > pd.Timestamp.now(tz="UTC").value // 10**6 + DAY_MS  # a day of slack for the time zone
    if late.any():
        row = int(np.flatnonzero(late)[0])
        raise DataValidationError(
            f"{where(row)}: column {mapped['time_ms']!r} holds {py_scalar(t[row])!r}, which is "
            f"{pd.Timestamp(int(t_ms[row]), unit='ms'):%Y-%m-%d %H:%M} UTC, after today: a logged impression "
            "lies in the past")

    _binary(imp, "click", where, mapped["click"])
    if "is_rand" in imp.columns:
        _binary(imp, "is_rand", where, mapped["is_rand"])
    else:
        imp["is_rand"] = np.zeros(len(imp), dtype=np.int64)
    # The file's own hour / weekday, checked; else derived from the time.
    hour, weekday = hour_weekday(imp["time_ms"].to_numpy(), cfg["utc_offset_hours"])
    for col, top, derived in (("hour", 23, hour), ("weekday", 6, weekday)):
        imp[col] = _whole(imp[col], where, mapped[col], top) if col in imp.columns else derived
    group, given_position = _derive_requests(imp, cfg["gap_s"] * 1000.0, where, mapped)
    request_id, position = assign_requests(group, imp["time_ms"].to_numpy())
    imp["request_id"] = request_id
    imp["position"] = position if given_position is None else given_position

    if cfg["fill"]:
        for df, table, s in ((users, "users", str(user_path)), (items, "items", str(item_path)),
                             (imp, "impressions", imp_src)):
            features += _side_missing(df, features, table, s)
    front = ["request_id", "user_id", "item_id", "time_ms", "position", "click", "is_rand"]
    imp = sort_impressions(imp[front + [c for c in imp.columns if c not in front]])
    sources = {"users": str(user_path), "items": str(item_path), "impressions": imp_src}
    ds = Dataset(users, items, imp, Schema(tuple(features)), name=cfg["name"], sources=sources,
                 utc_offset_hours=cfg["utc_offset_hours"])
    return ds.validate()
