"""Feature encoding, user x item cross features, and encoded tables.

Three pieces, all fitted once and then applied with vectorised numpy only:

- :class:`FeatureEncoder` turns the schema's user / item / context / privileged columns into ``cat`` (int64,
  vocabulary indices, 0 = OOV) and ``num`` (float32) arrays. Everything it learns comes from the TRAIN
  impressions: vocabularies and numeric statistics are fitted on the user and item rows *as the train
  impressions see them* (each user / item row weighted by its number of train exposures), because that is the
  distribution the models train on. Consequently a value (an id, a tag, an author) that only appears in the
  valid / test days or only in the side table maps to OOV index 0, exactly like a cold-start value at serving
  time. Values seen fewer than ``min_count`` times in train also map to 0.
- :class:`CrossFeatureStore` answers user x item interaction statistics for ANY ``(user, item, t)`` from the
  events strictly before ``t`` in a trailing window: the user's clicks / exposures on the item's tag and on
  the item's author, the item's recent exposures and smoothed CTR, the user's recent exposures and smoothed CTR.
- :func:`build_encoded` / :class:`PairEncoder` assemble encoded tables for the impressions of each split and
  feature rows for arbitrary candidate pairs, with one column layout (a :class:`FeatureSpec`).

Column order of the assembled arrays: user, item, context, cross, privileged (cat and num alike).
Sequence features are not supported by this encoder (fit raises).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..artifacts import read_json, read_npz, sha256_file, write_json, write_npz
from .batches import OOV, EncodedTable, FeatureSpec
from .ids import IdIndex
from .schema import Dataset, DataValidationError, Feature, Schema
from .requests import request_start_ms

log = logging.getLogger(__name__)

NUMERIC_MODES = ("standardize", "log_standardize", "quantile")
PARTS = ("user", "item", "context", "privileged")  # which input table / row set a column is read from
ENCODER_JSON = "feature_encoder.json"
ENCODER_NPZ = "feature_encoder.npz"
DAY_MS = 86_400_000


# --------------------------------------------------------------------------------------------------------------
# column helpers


def column(frame: Any, name: str, source: str) -> pd.Series:
    """Column ``name`` of a DataFrame or a mapping of arrays, as a Series; a clear error when it is missing."""
    try:
        col = frame[name]
    except KeyError:
        have = list(frame.columns) if hasattr(frame, "columns") else list(frame)
        raise DataValidationError(f"{source}: missing feature column {name!r} (has {have})") from None
    return col if isinstance(col, pd.Series) else pd.Series(np.asarray(col))


def cat_keys(s: pd.Series, source: str, name: str, kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Sortable keys of a categorical column: (keys [N] int64 or str, valid bool [N], key kind "int" | "str").

    Integer columns give int64 keys; float columns must hold whole numbers (pandas stores an int column with
    NaN as float) and give int64 keys; anything else gives str keys. Missing values are invalid (-> OOV).
    ``kind`` forces the key kind fitted earlier, so ``"39"`` and ``39`` meet in the same vocabulary.
    """
    valid = ~s.isna().to_numpy()
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_integer_dtype(s):
        keys, got = s.to_numpy(dtype=np.int64, na_value=0), "int"
    elif pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = valid & ((v != np.round(v)) | ~np.isfinite(v))
        if bad.any():
            raise DataValidationError(
                f"{source}: categorical column {name!r} holds a non-integer float {v[bad][0]!r}; "
                "declare it numeric or cast it to int/str"
            )
        keys, got = np.where(valid, v, 0).astype(np.int64), "int"
    else:
        obj = s.to_numpy(dtype=object, copy=True)
        obj[~valid] = ""
        keys, got = obj.astype(str), "str"  # (Series.to_numpy(dtype=str) truncates to 1 char in pandas 3)
    if kind is not None and kind != got:
        if kind == "str":
            keys = keys.astype(str)  # int -> decimal text, so 39 meets "39"
        else:
            num = pd.to_numeric(pd.Series(keys[valid]), errors="coerce")
            if num.isna().any():
                raise DataValidationError(
                    f"{source}: categorical column {name!r} was fitted on integer values but holds "
                    f"{keys[valid][num.isna().to_numpy()][0]!r}"
                )
            ints = np.zeros(len(keys), dtype=np.int64)
            ints[valid] = num.to_numpy(dtype=np.int64)
            keys = ints
    return keys, valid, kind or got


def scale(std):
    """The standardisation divisor for ``std`` (a float or an array): 1.0 where a column is constant up to float
    rounding (below 10 machine epsilons, scikit-learn's StandardScaler rule). Dividing by such a std (say 1e-110,
    left by values 0 and 4e-110) turns any other value into inf in float32."""
    tiny = 10 * np.finfo(np.float64).eps
    if np.ndim(std) == 0:
        return float(std) if std >= tiny else 1.0
    return np.where(np.asarray(std) >= tiny, std, 1.0)


def vocab_lookup(vocab: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Index of each key in the sorted ``vocab`` plus 1; 0 (OOV) for unseen or invalid keys. int64 [N]."""
    if len(vocab) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    pos = np.searchsorted(vocab, keys)
    pos_c = np.minimum(pos, len(vocab) - 1)
    hit = valid & (vocab[pos_c] == keys)
    return np.where(hit, pos_c + 1, OOV).astype(np.int64)


def float_values(s: pd.Series, source: str, name: str) -> np.ndarray:
    """float64 [N] of a numeric column (NaN kept); inf or non-numbers raise."""
    if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
        raise DataValidationError(f"{source}: numeric column {name!r} has dtype {s.dtype} (example {s.iloc[0]!r})")
    v = s.to_numpy(dtype=np.float64, na_value=np.nan)
    inf = np.isinf(v)
    if inf.any():
        raise DataValidationError(f"{source}: numeric column {name!r} has an infinite value at row {int(np.flatnonzero(inf)[0])}")
    return v


def concat_specs(*specs: FeatureSpec) -> FeatureSpec:
    return FeatureSpec(*(sum((getattr(s, k) for s in specs), ()) for k in
                         ("cat_names", "cat_sides", "cat_cardinality", "num_names", "num_sides")))


# --------------------------------------------------------------------------------------------------------------
# the fit rules: one definition, for the in-memory fit and the streaming fit (cascade.data.stream)


class TrainValues:
    """A numeric column's train values held in memory: float64 [N] (NaN = missing)."""

    def __init__(self, v: np.ndarray) -> None:
        self.v = v

    @property
    def n_finite(self) -> int:
        return int((~np.isnan(self.v)).sum())

    def median(self) -> float:
        return float(np.median(self.v[~np.isnan(self.v)]))

    def filled(self, value: float) -> "TrainValues":
        return TrainValues(np.where(np.isnan(self.v), value, self.v))

    def min(self) -> float:
        return float(self.v.min())

    def log1p(self) -> "TrainValues":
        return TrainValues(np.log1p(self.v))

    def quantile(self, probs: np.ndarray) -> np.ndarray:
        return np.quantile(self.v, probs)

    def mean_std(self) -> tuple[float, float]:
        return float(self.v.mean()), float(self.v.std())


class WeightedValues:
    """A numeric column's train values as a multiset (the streaming fit): x sorted distinct finite values [K],
    c their int64 counts [K], n_nan the number of missing values. Every statistic equals :class:`TrainValues` on
    the expanded values exactly, except mean / std, which agree to float rounding (a weighted sum instead of
    numpy's pairwise sum)."""

    def __init__(self, x: np.ndarray, c: np.ndarray, n_nan: int = 0) -> None:
        self.x, self.c, self.n_nan = x, c, n_nan

    @property
    def n_finite(self) -> int:
        return int(self.c.sum())

    def _order_stat(self, k: int) -> float:
        return float(self.x[np.searchsorted(np.cumsum(self.c), k, side="right")])

    def median(self) -> float:
        n = self.n_finite
        return self._order_stat(n // 2) if n % 2 else (self._order_stat(n // 2 - 1) + self._order_stat(n // 2)) / 2.0

    def filled(self, value: float) -> "WeightedValues":
        x, c = self.x, self.c
        if self.n_nan:
            pos = int(np.searchsorted(x, value))
            if pos < len(x) and x[pos] == value:
                c = c.copy()
                c[pos] += self.n_nan
            else:
                x, c = np.insert(x, pos, value), np.insert(c, pos, self.n_nan)
        return WeightedValues(x, c)

    def min(self) -> float:
        return float(self.x[0])

    def log1p(self) -> "WeightedValues":
        return WeightedValues(np.log1p(self.x), self.c, self.n_nan)

    def quantile(self, probs: np.ndarray) -> np.ndarray:
        """``np.quantile(v, probs)`` (method 'linear') of the expanded values: the same virtual index (n - 1) * q,
        the same order statistics and numpy's own lerp, so the result is equal."""
        x, c = self.x, self.c
        n = int(c.sum())
        ends = np.cumsum(c)  # order statistic k is x[searchsorted(ends, k, 'right')]
        virtual = (n - 1) * probs
        prev = np.floor(virtual)
        gamma = virtual - prev
        prev_i = np.clip(prev.astype(np.int64), 0, n - 1)
        next_i = np.clip(prev_i + 1, 0, n - 1)
        a = x[np.searchsorted(ends, prev_i, side="right")]
        b = x[np.searchsorted(ends, next_i, side="right")]
        diff = b - a
        out = np.add(a, diff * gamma)
        np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
        return out

    def mean_std(self) -> tuple[float, float]:
        n = float(self.c.sum())
        mean = float(np.dot(self.c, self.x) / n)
        return mean, float(np.sqrt(np.dot(self.c, (self.x - mean) ** 2) / n))


def fit_categorical(col: dict, keys: np.ndarray, counts: np.ndarray, key_kind: str, min_count: int) -> np.ndarray:
    """Fill ``col`` (out, key_kind, cardinality) from a categorical column's distinct train keys [K] (sorted) and
    their counts [K]; return the vocabulary: the keys seen at least ``min_count`` times (index i encodes as i + 1,
    0 is OOV)."""
    vocab = keys[counts >= min_count]
    col.update(out="cat", key_kind=key_kind, cardinality=int(len(vocab) + 1))
    return vocab


def fit_numeric(col: dict, values: TrainValues | WeightedValues, numeric: str, n_buckets: int,
                source: str) -> np.ndarray | None:
    """Fill ``col`` (median, log1p, then out with mean / std or cardinality) from a numeric column's train values;
    return the quantile edges (numeric "quantile") or None. NaN is filled with the train median before any
    transform; "log_standardize" takes log1p when the train minimum is >= 0; a column constant up to float
    rounding standardises with scale 1."""
    if values.n_finite == 0:
        raise DataValidationError(f"{source}: numeric column {col['name']!r} is all NaN on the train rows")
    median = values.median()
    values = values.filled(median)
    use_log = numeric == "log_standardize" and values.min() >= 0.0
    if use_log:
        values = values.log1p()
    col.update(median=median, log1p=bool(use_log))
    if numeric == "quantile":
        edges = np.unique(values.quantile(np.linspace(0.0, 1.0, n_buckets + 1)[1:-1]))
        # searchsorted(side="right") + 1 gives 1..len(edges)+1; 0 stays free as the OOV index
        col.update(out="cat", cardinality=int(len(edges) + 2))
        return edges
    mean, std = values.mean_std()
    col.update(out="num", mean=mean, std=scale(std))
    return None


def encoded_features(schema: Schema) -> list[tuple[Feature, str]]:
    """(feature, part) of every schema feature the encoder reads from a table, in schema order; a sequence
    feature raises (not supported); cross-table features are left to CrossFeatureStore."""
    out = []
    for f in schema.features:
        part = FeatureEncoder.part_of(f)
        if part is None:
            log.info("FeatureEncoder: schema feature %r of table 'cross' is computed by CrossFeatureStore", f.name)
            continue
        if f.kind == "sequence":
            raise ValueError(f"FeatureEncoder: sequence feature {f.name!r} is not supported")
        out.append((f, part))
    return out


def check_cross_names(schema: Schema, names) -> None:
    clash = set(names) & set(schema.names)
    if clash:
        raise ValueError(f"FeatureEncoder: cross feature name(s) {sorted(clash)} clash with schema features")


# --------------------------------------------------------------------------------------------------------------
# FeatureEncoder


class FeatureEncoder:
    """Fits vocabularies and numeric statistics on train impressions; encodes users, items, context, privileged.

    numeric: ``"standardize"`` ((x - mean) / std), ``"log_standardize"`` (log1p first for every column whose
    train minimum is >= 0: log1p is monotone, tames heavy tails such as follower counts or watch time, and only
    rescales a bounded column), or ``"quantile"`` (``n_buckets`` train quantile buckets, encoded as a
    categorical column with indices 1..B+1; the bucketed column moves from ``num`` to ``cat``). NaN is filled
    with the train median before any transform. A column that is constant in train standardises to 0.

    Learned attributes (after :meth:`fit`): ``columns_`` (per-column metadata, JSON-able), ``vocab_`` (column
    name -> sorted vocabulary array; index i of the vocabulary encodes as i + 1), ``edges_`` (column name ->
    quantile edges), ``cross_names_``, ``cross_mean_``, ``cross_std_`` (log1p-standardisation of the cross
    features on the train rows).
    """

    def __init__(self, schema: Schema, min_count: int = 1, numeric: str = "log_standardize", n_buckets: int = 32):
        self.schema = schema
        self.min_count = min_count
        self.numeric = numeric
        self.n_buckets = n_buckets

    # ---- fitting ---------------------------------------------------------------------------------------------

    def check_args(self) -> None:
        """Raise ValueError on a bad numeric mode, min_count or n_buckets."""
        if self.numeric not in NUMERIC_MODES:
            raise ValueError(f"FeatureEncoder: numeric={self.numeric!r} is not one of {NUMERIC_MODES}")
        if self.min_count < 1:
            raise ValueError(f"FeatureEncoder: min_count must be >= 1, got {self.min_count}")
        if self.n_buckets < 2:
            raise ValueError(f"FeatureEncoder: n_buckets must be >= 2, got {self.n_buckets}")

    @staticmethod
    def part_of(f: Feature) -> str | None:
        """Which rows a feature's column is read from: "user", "item", "context", "privileged"; None for a
        cross-table feature (computed by CrossFeatureStore)."""
        if f.table == "users":
            return "user"
        if f.table == "items":
            return "item"
        if f.table == "impressions":
            return "privileged" if f.side == "privileged" else "context"
        return None  # table "cross": computed by CrossFeatureStore, not read from a table

    def fit(self, dataset: Dataset, train_mask: np.ndarray, cross_store: "CrossFeatureStore | None" = None) -> "FeatureEncoder":
        """Fit on the impressions selected by ``train_mask`` (bool [N] or int index array) and return self.

        User and item columns are read from the user / item rows of the train impressions (one row per train
        exposure). ``cross_store``, when given, is queried for the train rows at their request start time to
        fit the cross features' log1p-standardisation.
        """
        self.check_args()
        imp = dataset.impressions
        train = imp.iloc[np.flatnonzero(train_mask)] if np.asarray(train_mask).dtype == bool else imp.iloc[np.asarray(train_mask)]
        if len(train) == 0:
            raise DataValidationError(f"{dataset.source('impressions')}: train mask selects no impressions")
        users, items = dataset.users, dataset.items
        src = dataset.source("impressions")
        u_rows = IdIndex(users["user_id"].to_numpy(np.int64), "user_id", src).rows(train["user_id"].to_numpy())
        i_rows = IdIndex(items["item_id"].to_numpy(np.int64), "item_id", src).rows(train["item_id"].to_numpy())
        frames = {"user": (users, u_rows, dataset.source("users")), "item": (items, i_rows, dataset.source("items")),
                  "context": (train, None, dataset.source("impressions")),
                  "privileged": (train, None, dataset.source("impressions"))}

        columns: list[dict] = []
        vocab: dict[str, np.ndarray] = {}
        edges: dict[str, np.ndarray] = {}
        for f, part in encoded_features(self.schema):
            frame, rows, source = frames[part]
            s = column(frame, f.name, source)
            if rows is not None:
                s = s.iloc[rows]
            col = {"name": f.name, "side": f.side, "part": part, "kind": f.kind}
            if f.kind == "categorical":
                keys, valid, kind = cat_keys(s, source, f.name)
                uniq, counts = np.unique(keys[valid], return_counts=True)
                vocab[f.name] = fit_categorical(col, uniq, counts, kind, self.min_count)
            else:
                e = fit_numeric(col, TrainValues(float_values(s, source, f.name)), self.numeric, self.n_buckets, source)
                if e is not None:
                    edges[f.name] = e
            columns.append(col)
        cross = None
        if cross_store is not None:
            check_cross_names(self.schema, cross_store.feature_names)
            starts = request_start_ms(imp)[np.asarray(train_mask)]
            q = cross_store.query(train["user_id"].to_numpy(), train["item_id"].to_numpy(), starts)
            x = np.log1p(np.stack([q[n].astype(np.float64) for n in cross_store.feature_names], axis=1))
            cross = (cross_store.feature_names, x.mean(axis=0), x.std(axis=0))
        return self.set_fitted(columns, vocab, edges, cross)

    def set_fitted(self, columns: list[dict], vocab: dict, edges: dict,
                   cross: tuple[Any, np.ndarray, np.ndarray] | None) -> "FeatureEncoder":
        """Store what a fit learned: column metadata, vocabularies, quantile edges and the cross features'
        (names, mean [K], std [K]) of log1p (None: no cross features); std is guarded as every scale is."""
        self.columns_, self.vocab_, self.edges_ = columns, vocab, edges
        self.cross_names_: list[str] = []
        self.cross_mean_ = np.zeros(0)
        self.cross_std_ = np.ones(0)
        if cross is not None:
            names, mean, std = cross
            self.cross_names_, self.cross_mean_, self.cross_std_ = list(names), mean, scale(std)
        log.info("FeatureEncoder fitted: %d columns, %d cross features", len(columns), len(self.cross_names_))
        return self

    # ---- encoding --------------------------------------------------------------------------------------------

    def _fitted(self) -> None:
        if not hasattr(self, "columns_"):
            raise RuntimeError("FeatureEncoder is not fitted: call fit() or FeatureEncoder.load()")

    def _encode_part(self, part: str, frame: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
        self._fitted()
        cols = [c for c in self.columns_ if c["part"] == part]
        cat_out, num_out = [], []
        n = len(frame) if isinstance(frame, pd.DataFrame) else None
        for c in cols:
            s = column(frame, c["name"], source)
            if n is not None and len(s) != n:
                raise ValueError(f"{source}: column {c['name']!r} has {len(s)} rows, expected {n}")
            n = len(s)
            if c["kind"] == "categorical":
                keys, valid, _ = cat_keys(s, source, c["name"], kind=c["key_kind"])
                cat_out.append(vocab_lookup(self.vocab_[c["name"]], keys, valid))
                continue
            v = float_values(s, source, c["name"])
            v = np.where(np.isnan(v), c["median"], v)
            if c["log1p"]:
                if (v < 0).any():
                    raise DataValidationError(
                        f"{source}: column {c['name']!r} was non-negative in train (log1p) but holds {v[v < 0][0]!r}")
                v = np.log1p(v)
            if c["out"] == "cat":
                cat_out.append(np.searchsorted(self.edges_[c["name"]], v, side="right").astype(np.int64) + 1)
            else:
                num_out.append(((v - c["mean"]) / c["std"]).astype(np.float32))
        if n is None:
            raise ValueError(f"{source}: cannot tell the number of rows of a {type(frame).__name__} without columns")
        cat = np.stack(cat_out, axis=1) if cat_out else np.zeros((n, 0), np.int64)
        num = np.stack(num_out, axis=1) if num_out else np.zeros((n, 0), np.float32)
        return np.ascontiguousarray(cat), np.ascontiguousarray(num)

    def encode_users(self, users: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """User-table columns of ``users`` rows: (cat int64 [U, Cu], num float32 [U, Mu])."""
        return self._encode_part("user", users, "users")

    def encode_items(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Item-table columns of ``items`` rows: (cat int64 [I, Ci], num float32 [I, Mi])."""
        return self._encode_part("item", items, "items")

    def encode_context(self, impressions: Any) -> tuple[np.ndarray, np.ndarray]:
        """Context columns (impression table, non-privileged) of a DataFrame or a mapping of arrays [N]."""
        return self._encode_part("context", impressions, "impressions")

    def encode_privileged(self, impressions: Any) -> tuple[np.ndarray, np.ndarray]:
        """Privileged (post-click) columns; training only, never a serving-time input."""
        return self._encode_part("privileged", impressions, "impressions")

    def encode_cross(self, cross: Mapping[str, np.ndarray]) -> np.ndarray:
        """Cross features (name -> [N] counts / CTRs) -> float32 [N, K]: log1p, then train standardisation."""
        self._fitted()
        missing = [n for n in self.cross_names_ if n not in cross]
        if missing:
            raise ValueError(f"encode_cross: missing cross feature(s) {missing}; the encoder was fitted on {self.cross_names_}")
        if not self.cross_names_:
            n = len(next(iter(cross.values()))) if cross else 0
            return np.zeros((n, 0), np.float32)
        n = len(cross[self.cross_names_[0]])
        out = np.empty((n, len(self.cross_names_)), np.float32)
        for j, name in enumerate(self.cross_names_):
            out[:, j] = (np.log1p(np.asarray(cross[name], dtype=np.float64)) - self.cross_mean_[j]) / self.cross_std_[j]
        return out

    # ---- specs -----------------------------------------------------------------------------------------------

    def _spec_part(self, part: str) -> FeatureSpec:
        self._fitted()
        cols = [c for c in self.columns_ if c["part"] == part]
        cat = [c for c in cols if c["out"] == "cat"]
        num = [c for c in cols if c["out"] == "num"]
        return FeatureSpec(tuple(c["name"] for c in cat), tuple(c["side"] for c in cat),
                           tuple(c["cardinality"] for c in cat), tuple(c["name"] for c in num),
                           tuple(c["side"] for c in num))

    def user_spec(self) -> FeatureSpec:
        return self._spec_part("user")

    def item_spec(self) -> FeatureSpec:
        return self._spec_part("item")

    def context_spec(self) -> FeatureSpec:
        return self._spec_part("context")

    def privileged_spec(self) -> FeatureSpec:
        return self._spec_part("privileged")

    def cross_spec(self) -> FeatureSpec:
        self._fitted()
        return FeatureSpec(num_names=tuple(self.cross_names_), num_sides=("cross",) * len(self.cross_names_))

    def spec(self, privileged: bool = True) -> FeatureSpec:
        """Combined layout: user, item, context, cross, then (if ``privileged``) privileged columns."""
        parts = [self.user_spec(), self.item_spec(), self.context_spec(), self.cross_spec()]
        if privileged:
            parts.append(self.privileged_spec())
        return concat_specs(*parts)

    # ---- persistence -----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``feature_encoder.npz`` (vocabularies, edges) then ``feature_encoder.json`` (the rest, with the
        npz's sha256), both atomically. No pickle anywhere."""
        self._fitted()
        d = Path(directory)
        arrays = {f"vocab__{k}": v for k, v in self.vocab_.items()}
        arrays.update({f"edges__{k}": v for k, v in self.edges_.items()})
        arrays["cross_mean"] = np.asarray(self.cross_mean_, np.float64)
        arrays["cross_std"] = np.asarray(self.cross_std_, np.float64)
        write_npz(d / ENCODER_NPZ, **arrays)
        meta = {
            "format": 1,
            "schema": self.schema.to_dict(),
            "params": {"min_count": self.min_count, "numeric": self.numeric, "n_buckets": self.n_buckets},
            "columns": self.columns_,
            "cross_names": self.cross_names_,
            "npz_sha256": sha256_file(d / ENCODER_NPZ),
        }
        write_json(d / ENCODER_JSON, meta)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureEncoder":
        """Read what :meth:`save` wrote; a missing or altered file raises naming it."""
        d = Path(directory)
        meta = read_json(d / ENCODER_JSON)
        npz = d / ENCODER_NPZ
        if not npz.exists():
            raise FileNotFoundError(f"{npz}: missing (FeatureEncoder.load)")
        if sha256_file(npz) != meta["npz_sha256"]:
            raise ValueError(f"{npz}: sha256 does not match {d / ENCODER_JSON}; the file is truncated or altered")
        arrays = read_npz(npz)
        enc = cls(Schema.from_dict(meta["schema"]), **meta["params"])
        enc.columns_ = meta["columns"]
        enc.vocab_ = {k[len("vocab__"):]: v for k, v in arrays.items() if k.startswith("vocab__")}
        enc.edges_ = {k[len("edges__"):]: v for k, v in arrays.items() if k.startswith("edges__")}
        enc.cross_names_ = list(meta["cross_names"])
        enc.cross_mean_ = arrays["cross_mean"]
        enc.cross_std_ = arrays["cross_std"]
        return enc


# --------------------------------------------------------------------------------------------------------------
# Cross features


class _History:
    """Events of one key family, sorted by (key, time): answers windowed counts with two searchsorted calls.

    Keys are first made dense (0..K-1) and times replaced by their rank among the distinct event times, so
    ``dense_key * stride + time_rank`` fits int64 for any id range and any time span (both factors are at most
    the number of events) and one global ``searchsorted`` finds a (key, time) bound.
    """

    def __init__(self, keys: np.ndarray, time_rank: np.ndarray, click: np.ndarray, stride: int):
        self.keys, dense = np.unique(keys, return_inverse=True)
        if len(self.keys) and (len(self.keys) + 1) * stride >= 2**62:
            raise OverflowError(f"cross history: {len(self.keys)} keys x {stride} time ranks overflow int64")
        comb = dense.astype(np.int64) * stride + time_rank
        order = np.argsort(comb, kind="stable")
        self.comb = comb[order]
        self.cum_click = np.concatenate([[0], np.cumsum(click[order], dtype=np.int64)])
        self.stride = stride

    def counts(self, dense: np.ndarray, found: np.ndarray, rank_lo: np.ndarray, rank_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, exposures) int64 [N] of events with key ``dense`` and time rank in [rank_lo, rank_hi)."""
        base = np.where(found, dense, 0) * self.stride
        lo = np.searchsorted(self.comb, base + rank_lo)
        hi = np.searchsorted(self.comb, base + rank_hi)
        expo = np.where(found, hi - lo, 0)
        clicks = np.where(found, self.cum_click[hi] - self.cum_click[lo], 0)
        return clicks, expo

    def lookup(self, keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense key [N], found bool [N]) of raw keys; a key without events is not found."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return pos, valid & (self.keys[pos] == keys)


class CrossFeatureStore:
    """User x item interaction statistics from strictly earlier events, for any (user, item, t).

    For a query (u, i, t) with window W = ``window_days`` days, only events with ``t - W <= time_ms < t`` count:

    - ``user_tag_clicks`` / ``user_tag_exposures``: u's clicks / exposures on items with i's tag;
    - ``user_author_clicks`` / ``user_author_exposures``: the same for i's author;
    - ``item_clicks`` / ``item_exposures`` / ``item_ctr``: i's clicks / exposures (all users) and smoothed CTR;
    - ``user_clicks`` / ``user_exposures`` / ``user_ctr``: u's clicks / exposures (all items) and smoothed CTR.

    Smoothed CTR = (clicks + prior_ctr * prior_strength) / (exposures + prior_strength); the prior is a fixed
    number (not fitted on the history) so that no later event can move an earlier row's feature. The tag and
    author of an item come from ``items[tag_column]`` / ``items[author_column]`` (the whole value is the key;
    a missing tag gives zero user-tag counts). Fit on the whole impression history; features of an impression
    row use its request's start time (:meth:`query_impressions`), so no event of the same request can leak.
    """

    feature_names = ("user_tag_clicks", "user_tag_exposures", "user_author_clicks", "user_author_exposures",
                     "item_clicks", "item_exposures", "item_ctr", "user_clicks", "user_exposures", "user_ctr")

    def __init__(self, window_days: float = 7.0, prior_ctr: float = 0.1, prior_strength: float = 20.0,
                 tag_column: str = "tag", author_column: str = "author_id"):
        self.window_days = window_days
        self.prior_ctr = prior_ctr
        self.prior_strength = prior_strength
        self.tag_column = tag_column
        self.author_column = author_column

    def fit(self, impressions: pd.DataFrame, items: pd.DataFrame) -> "CrossFeatureStore":
        """Index every impression (user_id, item_id, time_ms, click) of ``impressions``; return self."""
        if self.window_days <= 0:
            raise ValueError(f"CrossFeatureStore: window_days must be > 0, got {self.window_days}")
        if not (0.0 <= self.prior_ctr <= 1.0) or self.prior_strength < 0:
            raise ValueError(f"CrossFeatureStore: prior_ctr must be in [0, 1] and prior_strength >= 0, "
                             f"got {self.prior_ctr}, {self.prior_strength}")
        for col in ("item_id", self.tag_column, self.author_column):
            column(items, col, "items")
        for col in ("user_id", "item_id", "time_ms", "click"):
            column(impressions, col, "impressions")
        item_ids = items["item_id"].to_numpy(np.int64)
        order = np.argsort(item_ids, kind="stable")
        self.item_ids_ = item_ids[order]
        self._item_index = IdIndex(self.item_ids_, "item_id", "impressions")
        # factorize works for int and str columns alike; NaN -> -1 (no tag / author)
        self.item_tag_ = pd.factorize(items[self.tag_column])[0][order].astype(np.int64)
        self.item_author_ = pd.factorize(items[self.author_column])[0][order].astype(np.int64)
        self.n_tags_ = int(self.item_tag_.max()) + 1 if len(order) else 0
        self.n_authors_ = int(self.item_author_.max()) + 1 if len(order) else 0

        user = impressions["user_id"].to_numpy(np.int64)
        item_row = self._item_index.rows(impressions["item_id"].to_numpy())
        t = impressions["time_ms"].to_numpy(np.int64)
        click = impressions["click"].to_numpy(np.int64)
        self.times_ = np.unique(t)
        rank = np.searchsorted(self.times_, t).astype(np.int64)
        stride = len(self.times_) + 1
        self.users_, ucode = np.unique(user, return_inverse=True)
        self._user_index = IdIndex(self.users_, "user_id")
        ucode = ucode.astype(np.int64)
        tag, author = self.item_tag_[item_row], self.item_author_[item_row]
        has_tag, has_author = tag >= 0, author >= 0
        self.user_tag_ = _History(ucode[has_tag] * max(self.n_tags_, 1) + tag[has_tag], rank[has_tag], click[has_tag], stride)
        self.user_author_ = _History(ucode[has_author] * max(self.n_authors_, 1) + author[has_author],
                                     rank[has_author], click[has_author], stride)
        self.item_ = _History(item_row, rank, click, stride)
        self.user_ = _History(ucode, rank, click, stride)
        log.info("CrossFeatureStore fitted on %d events (%d users, %d items)", len(t), len(self.users_), len(self.item_ids_))
        return self

    def query(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Cross features of each (user_ids[n], item_ids[n], t_ms[n]): name -> float32 [N].

        Users without history get zero counts (and the prior CTR); an item id unknown to the fitted items
        table raises.
        """
        if not hasattr(self, "times_"):
            raise RuntimeError("CrossFeatureStore is not fitted: call fit()")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        if user_ids.shape != item_ids.shape or user_ids.ndim != 1:
            raise ValueError(f"CrossFeatureStore.query: user_ids {user_ids.shape} and item_ids {item_ids.shape} must be equal 1-d")
        n = len(user_ids)
        # np.searchsorted is ~10x faster on sorted needles (each search starts from the previous hit and touches
        # the same, cached part of the history), so the searches into the histories run on needles put in
        # order by one argsort each: by time for the time ranks, by (item, time) for the item family and by
        # (user, time) for the three user families (user-tag / user-author needles are then sorted by user and
        # nearly sorted within a user).
        window_ms = int(round(self.window_days * DAY_MS))
        stride = len(self.times_) + 1
        o_t = np.argsort(t_ms)
        t_sorted = t_ms[o_t]
        # event rank < rank_hi <=> time < t ; event rank >= rank_lo <=> time >= t - W
        rank_hi, rank_lo = np.empty(n, np.int64), np.empty(n, np.int64)
        rank_hi[o_t] = np.searchsorted(self.times_, t_sorted)
        rank_lo[o_t] = np.searchsorted(self.times_, t_sorted - window_ms)

        item_row = self._item_index.rows(item_ids, "CrossFeatureStore.query")
        o_i = np.argsort(item_row * stride + rank_hi)
        d, f = self.item_.lookup(item_row[o_i], np.ones(n, bool))
        it_c, it_e = self.item_.counts(d, f, rank_lo[o_i], rank_hi[o_i])

        upos, uknown = self._user_index.find(user_ids)
        o_u = np.argsort(upos * stride + rank_hi)
        up, known = upos[o_u], uknown[o_u]
        lo, hi = rank_lo[o_u], rank_hi[o_u]
        tag, author = self.item_tag_[item_row[o_u]], self.item_author_[item_row[o_u]]
        d, f = self.user_tag_.lookup(up * max(self.n_tags_, 1) + tag, known & (tag >= 0))
        ut_c, ut_e = self.user_tag_.counts(d, f, lo, hi)
        d, f = self.user_author_.lookup(up * max(self.n_authors_, 1) + author, known & (author >= 0))
        ua_c, ua_e = self.user_author_.counts(d, f, lo, hi)
        # users_ are exactly the keys of the user history, so a user's position is its dense key
        us_c, us_e = self.user_.counts(up, known, lo, hi)

        def back(x: np.ndarray, order: np.ndarray) -> np.ndarray:
            out = np.empty(n, np.float64)
            out[order] = x
            return out

        ut_c, ut_e, ua_c, ua_e, us_c, us_e = (back(x, o_u) for x in (ut_c, ut_e, ua_c, ua_e, us_c, us_e))
        it_c, it_e = back(it_c, o_i), back(it_e, o_i)
        a, b = self.prior_ctr * self.prior_strength, self.prior_strength
        f32 = np.float32
        return {
            "user_tag_clicks": ut_c.astype(f32), "user_tag_exposures": ut_e.astype(f32),
            "user_author_clicks": ua_c.astype(f32), "user_author_exposures": ua_e.astype(f32),
            "item_clicks": it_c.astype(f32), "item_exposures": it_e.astype(f32),
            "item_ctr": ((it_c + a) / (it_e + b)).astype(f32),
            "user_clicks": us_c.astype(f32), "user_exposures": us_e.astype(f32),
            "user_ctr": ((us_c + a) / (us_e + b)).astype(f32),
        }

    def query_impressions(self, impressions: pd.DataFrame) -> dict[str, np.ndarray]:
        """Cross features of impression rows at their request's START time (all items of a request alike)."""
        return self.query(impressions["user_id"].to_numpy(), impressions["item_id"].to_numpy(),
                          request_start_ms(impressions))


# --------------------------------------------------------------------------------------------------------------
# Assembly


class PairEncoder:
    """Feature rows for arbitrary (user, item, time, context) pairs, in the impressions' column layout minus
    the privileged columns. Encodes the user and item tables once; each call is a few gathers.

    users / items: the side tables (every user / item a query may name must be in them).
    """

    def __init__(self, encoder: FeatureEncoder, cross_store: CrossFeatureStore | None,
                 users: pd.DataFrame, items: pd.DataFrame):
        encoder._fitted()
        if bool(encoder.cross_names_) != (cross_store is not None):
            raise ValueError("PairEncoder: the encoder was fitted "
                             + ("with" if encoder.cross_names_ else "without")
                             + " cross features but cross_store is " + ("None" if cross_store is None else "given"))
        self.encoder, self.cross_store = encoder, cross_store
        uid = users["user_id"].to_numpy(np.int64)
        iid = items["item_id"].to_numpy(np.int64)
        uo, io = np.argsort(uid, kind="stable"), np.argsort(iid, kind="stable")
        self.user_ids_, self.item_ids_ = uid[uo], iid[io]
        self._user_index = IdIndex(self.user_ids_, "user_id", "encode_pairs")
        self._item_index = IdIndex(self.item_ids_, "item_id", "encode_pairs")
        ucat, unum = encoder.encode_users(users)
        icat, inum = encoder.encode_items(items)
        self.user_cat_, self.user_num_ = ucat[uo], unum[uo]
        self.item_cat_, self.item_num_ = icat[io], inum[io]
        self.spec = encoder.spec(privileged=False)

    def encode_pairs(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray | int,
                     context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(cat int64 [N, C], num float32 [N, M]) laid out as ``self.spec``.

        user_ids, item_ids: int64 [N]; t_ms: [N] or a scalar (cross features use events strictly before it);
        context: context column name -> [N] array or a scalar (e.g. ``{"hour": 20, "tab": 1}``).
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        n = len(user_ids)
        upos = self._user_index.rows(user_ids)
        ipos = self._item_index.rows(item_ids)
        ctx = {}
        for c in self.encoder.columns_:
            if c["part"] == "context":
                if c["name"] not in context:
                    raise DataValidationError(f"encode_pairs: context has no column {c['name']!r} (has {list(context)})")
                v = context[c["name"]]
                v = v.to_numpy() if isinstance(v, pd.Series) else np.asarray(v)
                if v.ndim == 0 or len(v) == 1:  # one value for every pair (e.g. one request at serving)
                    v = np.repeat(v.reshape(-1)[:1], n)
                if v.shape != (n,):
                    raise ValueError(f"encode_pairs: context {c['name']!r} has shape {v.shape}, expected ({n},)")
                ctx[c["name"]] = v
        ccat, cnum = self.encoder.encode_context(pd.DataFrame(ctx, index=np.arange(n)))
        if self.cross_store is not None:
            xnum = self.encoder.encode_cross(self.cross_store.query(user_ids, item_ids, np.broadcast_to(np.asarray(t_ms, np.int64), (n,))))
        else:
            xnum = np.zeros((n, 0), np.float32)
        cat = np.concatenate([self.user_cat_[upos], self.item_cat_[ipos], ccat], axis=1)
        num = np.concatenate([self.user_num_[upos], self.item_num_[ipos], cnum, xnum], axis=1)
        return cat, num


def build_encoded(dataset: Dataset, masks: Mapping[str, np.ndarray], encoder: FeatureEncoder,
                  cross_store: CrossFeatureStore | None, privileged: bool = True) -> dict[str, EncodedTable]:
    """One :class:`EncodedTable` per split of ``masks`` (bool [N] over ``dataset.impressions``).

    Columns: user, item, context, cross (at each row's request start time), then privileged columns if
    ``privileged``. label = click (float32). extra: ``position`` (int64) and the raw privileged columns
    (float32, NaN kept) when ``privileged``.
    """
    pairs = PairEncoder(encoder, cross_store, dataset.users, dataset.items)
    spec = encoder.spec(privileged=privileged)
    imp = dataset.impressions
    starts = request_start_ms(imp)
    priv_names = [c["name"] for c in encoder.columns_ if c["part"] == "privileged"]
    out = {}
    for part, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != (len(imp),):
            raise ValueError(f"build_encoded: mask {part!r} has shape {mask.shape}, expected ({len(imp)},)")
        sub = imp[mask]
        cat, num = pairs.encode_pairs(sub["user_id"].to_numpy(), sub["item_id"].to_numpy(), starts[mask], sub)
        extra: dict[str, np.ndarray] = {}
        if "position" in sub.columns:
            extra["position"] = sub["position"].to_numpy(np.int64)
        if privileged:
            pcat, pnum = encoder.encode_privileged(sub)
            cat = np.concatenate([cat, pcat], axis=1)
            num = np.concatenate([num, pnum], axis=1)
            for name in priv_names:
                extra[name] = sub[name].to_numpy(np.float32, na_value=np.nan)
        out[part] = EncodedTable(
            spec, np.ascontiguousarray(cat), np.ascontiguousarray(num),
            sub["click"].to_numpy(np.float32), sub["request_id"].to_numpy(np.int64),
            sub["user_id"].to_numpy(np.int64), sub["item_id"].to_numpy(np.int64),
            sub["time_ms"].to_numpy(np.int64), sub["is_rand"].to_numpy(np.int8), extra,
        )
        log.info("build_encoded: %s %d rows, cat %s, num %s", part, len(sub), cat.shape, num.shape)
    return out
