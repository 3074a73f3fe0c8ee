"""Canonical tables and the feature schema.

Every data source (the synthetic world, KuaiRand, MovieLens, a user's own logs) produces the same three
tables, held in a :class:`Dataset`:

- ``users``: ``user_id`` (int64, unique) + user features;
- ``items``: ``item_id`` (int64, unique) + item features;
- ``impressions``: one row per exposure with the columns of :data:`IMPRESSION_COLUMNS` (``request_id, user_id,
  item_id, time_ms, position, click, is_rand``), context fields (e.g. ``hour``, ``tab``) and post-click fields
  (e.g. ``play_time_ms``, ``long_view``).

A :class:`Schema` says for each feature its table, its kind (``categorical`` / ``numeric`` / ``sequence``) and
its *side* (``user``, ``item``, ``context``, ``cross``, ``history``, ``privileged``). Stage models pick their inputs
by side: towers take user/context and item sides, the ranker adds ``cross`` (and the teacher ``history``: the
user's behaviour sequence, built by the feature encoder, never a table column), a PFD teacher adds ``privileged``.

Validation is strict: a missing column, a wrong dtype, a NaN or duplicate id, or an impression that references
an unknown user or item raises :class:`DataValidationError` naming the file, the column and an example value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SIDES = ("user", "item", "context", "cross", "history", "privileged")
KINDS = ("categorical", "numeric", "sequence")
TABLES = ("users", "items", "impressions", "cross")

#: Required impression columns and the dtype family each must have ("int" or "float").
IMPRESSION_COLUMNS: dict[str, str] = {
    "request_id": "int",
    "user_id": "int",
    "item_id": "int",
    "time_ms": "int",
    "position": "int",
    "click": "int",
    "is_rand": "int",
}


class DataValidationError(ValueError):
    """Bad input data. The message names the file (or table), the column and an example offending value."""


@dataclass(frozen=True)
class Feature:
    """One model input.

    name: column name in its table. table: one of TABLES. kind: one of KINDS. side: one of SIDES.
    """

    name: str
    table: str
    kind: str
    side: str

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"feature {self.name!r}: table {self.table!r} is not one of {TABLES}")
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.side not in SIDES:
            raise ValueError(f"feature {self.name!r}: side {self.side!r} is not one of {SIDES}")


@dataclass(frozen=True)
class Schema:
    """The ordered list of features a dataset offers to models."""

    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"schema: duplicate feature name(s) {dup}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def by_side(self, *sides: str) -> list[Feature]:
        for s in sides:
            if s not in SIDES:
                raise ValueError(f"schema: side {s!r} is not one of {SIDES}")
        return [f for f in self.features if f.side in sides]

    def by_table(self, table: str) -> list[Feature]:
        return [f for f in self.features if f.table == table]

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"schema has no feature {name!r}; it has {self.names}")

    def to_dict(self) -> dict:
        return {"features": [vars(f).copy() for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Schema:
        return cls(tuple(Feature(**f) for f in d["features"]))

    def extend(self, features: Iterable[Feature]) -> Schema:
        return Schema(self.features + tuple(features))


def _dtype_family(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "int"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_float_dtype(s):
        return "float"
    return "other"


def show(value) -> str:
    """A value as a user would write it (numpy scalars unwrapped): ``77``, ``'abc'``, ``nan``."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _example(values: pd.Series) -> str:
    return show(values.iloc[0]) if len(values) else "<none>"


def check_columns(df: pd.DataFrame, required: Mapping[str, str], source: str) -> None:
    """Check that ``df`` has every required column with the right dtype family.

    required: column -> "int" | "float" | "number" | "any". A float column whose values are all whole numbers is
    not accepted where "int" is required unless it has no NaN (then it is the caller's job to cast).
    """
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing required column {missing[0]!r} (needs {list(required)}; has {list(df.columns)})"
        )
    for col, want in required.items():
        if want == "any":
            continue
        fam = _dtype_family(df[col])
        ok = fam == want or (want == "number" and fam in ("int", "float"))
        if not ok:
            bad = df[col]
            if fam == "other":
                num = pd.to_numeric(bad, errors="coerce")
                nonnum = bad[num.isna() & bad.notna()]
                bad = nonnum if len(nonnum) else bad
            raise DataValidationError(
                f"{source}: column {col!r} must be {want} but has dtype {df[col].dtype} (example value {_example(bad)})"
            )


def check_id_column(df: pd.DataFrame, col: str, source: str, unique: bool) -> None:
    """Ids must be integer, non-null and (for entity tables) unique."""
    s = df[col]
    if s.isna().any():
        raise DataValidationError(f"{source}: column {col!r} has NaN ids (value NaN first at row "
                                  f"{int(np.flatnonzero(s.isna().to_numpy())[0])})")
    if _dtype_family(s) != "int":
        raise DataValidationError(f"{source}: column {col!r} must hold integer ids, has dtype {s.dtype} "
                                  f"(example value {_example(s)})")
    if unique:
        dup = s[s.duplicated()]
        if len(dup):
            raise DataValidationError(f"{source}: column {col!r} has duplicate id {_example(dup)}")


def check_finite(df: pd.DataFrame, cols: Iterable[str], source: str, nonnegative: Iterable[str] = ()) -> None:
    """Numeric columns must be finite; those in ``nonnegative`` must also be >= 0."""
    nonneg = set(nonnegative)
    for col in cols:
        v = df[col].to_numpy()
        if v.dtype.kind == "f":
            bad = ~np.isfinite(v)
            if bad.any():
                raise DataValidationError(f"{source}: column {col!r} has a non-finite value {show(v[bad][0])} at row "
                                          f"{int(np.flatnonzero(bad)[0])}")
        if col in nonneg and v.dtype.kind in "fiu":
            bad = v < 0
            if bad.any():
                raise DataValidationError(f"{source}: column {col!r} has a negative value {show(v[bad][0])} at row "
                                          f"{int(np.flatnonzero(bad)[0])}")


@dataclass
class Dataset:
    """The three canonical tables, the schema, and where they came from.

    sources: table name -> the file (or label) each table was read from, used in error messages.
    utc_offset_hours: the log's local time (KuaiRand: Beijing, UTC+8; your own logs: the mapping's
    ``utc_offset_hours``): its calendar days, which the time split cuts, and its hours and weekdays.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    impressions: pd.DataFrame
    schema: Schema
    name: str = "dataset"
    sources: dict[str, str] = field(default_factory=dict)
    utc_offset_hours: float = 0.0

    def source(self, table: str) -> str:
        return self.sources.get(table, f"{self.name}:{table}")

    def validate(self) -> Dataset:
        """Raise DataValidationError on the first problem found; return self when all is well."""
        u, i, imp = self.users, self.items, self.impressions
        check_columns(u, {"user_id": "any"}, self.source("users"))
        check_id_column(u, "user_id", self.source("users"), unique=True)
        check_columns(i, {"item_id": "any"}, self.source("items"))
        check_id_column(i, "item_id", self.source("items"), unique=True)
        src = self.source("impressions")
        if len(imp) == 0:
            raise DataValidationError(f"{src}: no impressions")
        for col in ("request_id", "user_id", "item_id"):
            if col in imp.columns:
                check_id_column(imp, col, src, unique=False)
        check_columns(imp, IMPRESSION_COLUMNS, src)
        numeric = [c for c in imp.columns if _dtype_family(imp[c]) in ("int", "float")]
        check_finite(imp, numeric, src, nonnegative=("time_ms", "position", "play_time_ms"))
        for col, allowed in (("click", (0, 1)), ("is_rand", (0, 1))):
            bad = ~imp[col].isin(allowed)
            if bad.any():
                raise DataValidationError(f"{src}: column {col!r} must be 0/1, found {_example(imp[col][bad])}")
        unknown = ~imp["user_id"].isin(u["user_id"])
        if unknown.any():
            raise DataValidationError(
                f"{src}: column 'user_id' references unknown user {_example(imp['user_id'][unknown])} "
                f"(not in {self.source('users')})"
            )
        unknown = ~imp["item_id"].isin(i["item_id"])
        if unknown.any():
            raise DataValidationError(
                f"{src}: column 'item_id' references unknown item {_example(imp['item_id'][unknown])} "
                f"(not in {self.source('items')})"
            )
        for f in self.schema.features:
            table = {"users": u, "items": i, "impressions": imp}.get(f.table)
            if table is not None and f.name not in table.columns:
                raise DataValidationError(
                    f"{self.source(f.table)}: schema feature {f.name!r} (side {f.side}) is not a "
                    f"column of table {f.table}"
                )
        return self
