"""The encoder's fit rules, one definition for the in-memory fit (:class:`~.encoder.FeatureEncoder`) and the
streaming fit (:func:`cascade.data.stream.fit_encoder_stream`): each holds a column's train values its own way
(:class:`TrainValues` in memory, :class:`WeightedValues` as a streamed multiset) and hands them to the same rules.
"""

from __future__ import annotations

import logging

import numpy as np

from ..schema import DataValidationError, Feature, Schema
from .columns import part_of, scale

log = logging.getLogger(__name__)


class TrainValues:
    """A numeric column's train values held in memory: float64 [N] (NaN = missing)."""

    def __init__(self, v: np.ndarray) -> None:
        self.v = v

    @property
    def n_finite(self) -> int:
        return int((~np.isnan(self.v)).sum())

    def median(self) -> float:
        return float(np.median(self.v[~np.isnan(self.v)]))

    def filled(self, value: float) -> TrainValues:
        return TrainValues(np.where(np.isnan(self.v), value, self.v))

    def min(self) -> float:
        return float(self.v.min())

    def log1p(self) -> TrainValues:
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

    def filled(self, value: float) -> WeightedValues:
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

    def log1p(self) -> WeightedValues:
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
    col.update(out="num", mean=mean, std=scale(std, mean, values.n_finite))
    return None


def encoded_features(schema: Schema) -> list[tuple[Feature, str]]:
    """(feature, part) of every schema feature the encoder reads from a table, in schema order; a sequence
    feature raises (not supported); cross-table features are left to CrossFeatureStore."""
    out = []
    for f in schema.features:
        part = part_of(f)
        if part is None:
            log.info("FeatureEncoder: schema feature %r of table 'cross' is computed by CrossFeatureStore", f.name)
            continue
        if f.kind == "sequence":
            raise ValueError(f"FeatureEncoder: sequence feature {f.name!r} is not supported")
        out.append((f, part))
    return out


HISTORY_PREFIX = "hist_"


def history_attributes(columns: list[dict], candidates, history_length: int) -> list[str]:
    """The item attributes of a behaviour sequence: ``item_id``, then each of ``candidates`` (the cross features'
    tag and author columns) that is a categorical item column, each once. Empty when history_length is 0. A history
    without the item id itself raises; a candidate that is not a categorical item column is left out (logged)."""
    if history_length < 0:
        raise ValueError(f"FeatureEncoder: history_length must be >= 0, got {history_length}")
    if history_length == 0:
        return []
    cat_items = [c["name"] for c in columns if c["part"] == "item" and c["kind"] == "categorical"]
    if "item_id" not in cat_items:
        raise ValueError("FeatureEncoder: behaviour sequences (history_length > 0) need 'item_id' as a categorical "
                         f"item feature; the categorical item features are {cat_items}")
    attrs = ["item_id"]
    for name in candidates:
        if name in attrs:
            continue
        if name in cat_items:
            attrs.append(name)
        else:
            log.info("FeatureEncoder: the behaviour sequence leaves out %r (not a categorical item feature)", name)
    return attrs


def history_names(attrs, history_length: int) -> list[str]:
    """Column names of a behaviour sequence, attribute-major: hist_<attr>_<j>, j = 0 the most recent."""
    return [f"{HISTORY_PREFIX}{a}_{j}" for a in attrs for j in range(history_length)]


def check_cross_names(schema: Schema, names) -> None:
    clash = set(names) & set(schema.names)
    if clash:
        raise ValueError(f"FeatureEncoder: cross feature name(s) {sorted(clash)} clash with schema features")
