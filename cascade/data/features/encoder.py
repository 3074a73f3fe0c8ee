"""The feature encoder: vocabularies and numeric statistics fitted on the train impressions, applied with
vectorised numpy; saved as JSON + npz (no pickle)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ...artifacts import read_json, read_npz, sha256_file, write_json, write_npz
from ..batches import FeatureSpec
from ..ids import IdIndex
from ..requests import request_start_ms
from ..schema import Dataset, DataValidationError, Schema
from .columns import NUMERIC_MODES, cat_keys, column, concat_specs, float_values, scale, vocab_lookup
from .fit import (
    TrainValues,
    check_cross_names,
    encoded_features,
    fit_categorical,
    fit_numeric,
    history_attributes,
    history_names,
)

if TYPE_CHECKING:
    from .cross import CrossFeatureStore

log = logging.getLogger(__name__)

ENCODER_JSON = "feature_encoder.json"
ENCODER_NPZ = "feature_encoder.npz"


class FeatureEncoder:
    """Fits vocabularies and numeric statistics on train impressions; encodes users, items, context, privileged.

    numeric: ``"standardize"`` ((x - mean) / std), ``"log_standardize"`` (log1p first for every column whose
    train minimum is >= 0: log1p is monotone, tames heavy tails such as follower counts or watch time, and only
    rescales a bounded column; a value below 0 met later, at validation or serving, takes -log1p(-x), the same curve
    mirrored, so it stays in order below 0 instead of failing), or ``"quantile"`` (``n_buckets`` train quantile
    buckets, encoded as a categorical column with indices 1..B+1; the bucketed column moves from ``num`` to
    ``cat``). NaN is filled with the train median before any transform. A column that is constant in train
    standardises to 0.

    Learned attributes (after :meth:`fit`): ``columns_`` (per-column metadata, JSON-able), ``vocab_`` (column
    name -> sorted vocabulary array; index i of the vocabulary encodes as i + 1), ``edges_`` (column name ->
    quantile edges), ``cross_names_``, ``cross_mean_``, ``cross_std_`` (log1p-standardisation of the cross
    features on the train rows), ``history_attrs_`` (the item attributes of the behaviour sequence).

    history_length: N > 0 adds the user's behaviour sequence (side "history"): for each attribute of
    ``history_attrs_`` (``item_id``, then the cross features' tag and author columns where they are categorical
    item features) N categorical columns ``hist_<attr>_<j>`` holding the j-th most recent clicked item's value,
    coded with the attribute's own vocabulary (padding and unknown values: OOV 0); they read the attribute's
    embedding table (``FeatureSpec.cat_shares``). The items come from the cross-feature store
    (:meth:`CrossFeatureStore.history`), so a fit with history needs the store.
    """

    def __init__(self, schema: Schema, min_count: int = 1, numeric: str = "log_standardize", n_buckets: int = 32,
                 history_length: int = 0):
        self.schema = schema
        self.min_count = min_count
        self.numeric = numeric
        self.n_buckets = n_buckets
        self.history_length = history_length

    # ---- fitting ---------------------------------------------------------------------------------------------

    def check_args(self) -> None:
        """Raise ValueError on a bad numeric mode, min_count or n_buckets."""
        if self.numeric not in NUMERIC_MODES:
            raise ValueError(f"FeatureEncoder: numeric={self.numeric!r} is not one of {NUMERIC_MODES}")
        if self.min_count < 1:
            raise ValueError(f"FeatureEncoder: min_count must be >= 1, got {self.min_count}")
        if self.n_buckets < 2:
            raise ValueError(f"FeatureEncoder: n_buckets must be >= 2, got {self.n_buckets}")
        if self.history_length < 0:
            raise ValueError(f"FeatureEncoder: history_length must be >= 0, got {self.history_length}")

    def fit(self, dataset: Dataset, train_mask: np.ndarray,
            cross_store: CrossFeatureStore | None = None) -> FeatureEncoder:
        """Fit on the impressions selected by ``train_mask`` (bool [N] or int index array) and return self.

        User and item columns are read from the user / item rows of the train impressions (one row per train
        exposure). ``cross_store``, when given, is queried for the train rows at their request start time to
        fit the cross features' log1p-standardisation; it also names the tag and author columns of the behaviour
        sequence (needed when history_length > 0).
        """
        self.check_args()
        if self.history_length and cross_store is None:
            raise ValueError("FeatureEncoder.fit: history_length > 0 needs the cross-feature store (it answers the "
                             "behaviour sequences)")
        imp = dataset.impressions
        mask = np.asarray(train_mask)
        train = imp.iloc[np.flatnonzero(mask) if mask.dtype == bool else mask]
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
                s = s.iloc[rows] if isinstance(s, pd.Series) else s[rows]
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
            cross = (cross_store.feature_names, x.mean(axis=0), x.std(axis=0), len(x))
        history = None if cross_store is None else tuple(c for c in (cross_store.tag_column,
                                                                     cross_store.author_column) if c)
        return self.set_fitted(columns, vocab, edges, cross, history)

    def set_fitted(self, columns: list[dict], vocab: dict, edges: dict,
                   cross: tuple[Any, np.ndarray, np.ndarray, int] | None,
                   history_columns: tuple[str, ...] | None = None) -> FeatureEncoder:
        """Store what a fit learned: column metadata, vocabularies, quantile edges, the cross features'
        (names, mean [K], std [K], n train rows) of log1p (None: no cross features; std is guarded as every scale
        is) and the behaviour sequence's attributes from the candidate item columns ``history_columns`` (tag,
        author)."""
        self.history_attrs_ = history_attributes(columns, history_columns or (), self.history_length)
        clash = set(history_names(self.history_attrs_, self.history_length)) & set(self.schema.names)
        if clash:
            raise ValueError(f"FeatureEncoder: history column name(s) {sorted(clash)} clash with schema features")
        self.columns_, self.vocab_, self.edges_ = columns, vocab, edges
        self.cross_names_: list[str] = []
        self.cross_mean_ = np.zeros(0)
        self.cross_std_ = np.ones(0)
        if cross is not None:
            names, mean, std, n = cross
            self.cross_names_, self.cross_mean_, self.cross_std_ = list(names), mean, scale(std, mean, n)
        log.info("FeatureEncoder fitted: %d columns, %d cross features, behaviour sequence of %d x %s", len(columns),
                 len(self.cross_names_), self.history_length, self.history_attrs_)
        return self

    # ---- encoding --------------------------------------------------------------------------------------------

    def _fitted(self) -> None:
        if not hasattr(self, "columns_"):
            raise RuntimeError("FeatureEncoder is not fitted: call fit() or FeatureEncoder.load()")

    def _encode_part(self, part: str, frame: Any, source: str,
                     n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._fitted()
        cols = [c for c in self.columns_ if c["part"] == part]
        cat_out, num_out = [], []
        n = len(frame) if isinstance(frame, pd.DataFrame) else n_rows
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
            if c["log1p"]:  # sign(x) log1p(|x|): log1p on the train range, monotone beyond it
                v = np.sign(v) * np.log1p(np.abs(v))
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

    def encode_context(self, impressions: Any, n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Context columns (impression table, non-privileged) of a DataFrame or a mapping of arrays [N] (n_rows:
        N, needed for a mapping when the data have no context column)."""
        return self._encode_part("context", impressions, "impressions", n_rows)

    def encode_privileged(self, impressions: Any) -> tuple[np.ndarray, np.ndarray]:
        """Privileged (post-click) columns; training only, never a serving-time input."""
        return self._encode_part("privileged", impressions, "impressions")

    def encode_cross(self, cross: Mapping[str, np.ndarray]) -> np.ndarray:
        """Cross features (name -> [N] counts / CTRs) -> float32 [N, K]: log1p, then train standardisation."""
        self._fitted()
        missing = [n for n in self.cross_names_ if n not in cross]
        if missing:
            raise ValueError(f"encode_cross: missing cross feature(s) {missing}; the encoder was "
                             f"fitted on {self.cross_names_}")
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

    def history_spec(self) -> FeatureSpec:
        """The behaviour sequence's columns (attribute-major), each reading its attribute's table."""
        self._fitted()
        names = history_names(self.history_attrs_, self.history_length)
        card = {c["name"]: c["cardinality"] for c in self.columns_ if c["out"] == "cat"}
        attrs = [a for a in self.history_attrs_ for _ in range(self.history_length)]
        return FeatureSpec(tuple(names), ("history",) * len(names), tuple(card[a] for a in attrs),
                           cat_shares=tuple(attrs))

    def spec(self, privileged: bool = True) -> FeatureSpec:
        """Combined layout: user, item, context, cross, history, then (if ``privileged``) privileged columns."""
        parts = [self.user_spec(), self.item_spec(), self.context_spec(), self.cross_spec(), self.history_spec()]
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
            "params": {"min_count": self.min_count, "numeric": self.numeric, "n_buckets": self.n_buckets,
                       "history_length": self.history_length},
            "columns": self.columns_,
            "cross_names": self.cross_names_,
            "history_attrs": self.history_attrs_,
            "npz_sha256": sha256_file(d / ENCODER_NPZ),
        }
        write_json(d / ENCODER_JSON, meta)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> FeatureEncoder:
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
        enc.history_attrs_ = list(meta.get("history_attrs", []))
        enc.cross_mean_ = arrays["cross_mean"]
        enc.cross_std_ = arrays["cross_std"]
        return enc
