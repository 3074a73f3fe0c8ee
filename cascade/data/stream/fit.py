"""Pass 2: a FeatureEncoder fitted on the train rows in one streaming pass, by the in-memory fit's own rules."""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from ..features import (
    CrossFeatureStore,
    FeatureEncoder,
    WeightedValues,
    cat_keys,
    check_cross_names,
    column,
    encoded_features,
    fit_categorical,
    fit_numeric,
    float_values,
)
from ..ids import IdIndex
from ..schema import DataValidationError
from .cross import WindowedCrossFeatures
from .dataset import StreamDataset, StreamSplit, scan

log = logging.getLogger(__name__)


class _MeanVar:
    """Column means and population variances merged batch by batch (Chan et al.'s pairwise update)."""

    def __init__(self, k: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(k), np.zeros(k)

    def add(self, x: np.ndarray) -> None:
        """x: float64 [n, k]."""
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta ** 2 * (self.n * nb / n)
        self.n = n

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


class _ValueCounts:
    """A growing multiset: sorted distinct keys with int64 counts, merged batch by batch."""

    def __init__(self) -> None:
        self.keys = np.zeros(0)
        self.counts = np.zeros(0, np.int64)
        self._empty = True

    def add(self, keys: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add ``keys`` [n] (each with weight 1, or ``weights`` [n] int)."""
        w = np.ones(len(keys), np.int64) if weights is None else np.asarray(weights, np.int64)
        if not self._empty:
            keys, w = np.concatenate([self.keys, keys]), np.concatenate([self.counts, w])
        uniq, inv = np.unique(keys, return_inverse=True)
        # bincount sums weights in float64: exact for counts below 2**53
        self.keys = uniq
        self.counts = np.bincount(inv.reshape(-1), weights=w, minlength=len(uniq)).astype(np.int64)
        self._empty = False


def fit_encoder_stream(sd: StreamDataset, split: StreamSplit, min_count: int = 1, numeric: str = "log_standardize",
                       n_buckets: int = 32, batch_rows: int = 1 << 20, progress: bool = False,
                       cross_window_days: float | None = None, cross_tag_column: str = "tag",
                       cross_author_column: str = "author_id", cross_chunk_days: float = 1.0,
                       history_length: int = 0) -> FeatureEncoder:
    """A FeatureEncoder fitted on the train rows of ``split`` in one streaming pass.

    Equal to ``FeatureEncoder(sd.schema, min_count, numeric, n_buckets).fit(dataset, train_mask, cross_store)`` on
    the same rows in memory (see the module doc for what is exact and what agrees to rounding), where cross_store is
    ``CrossFeatureStore(cross_window_days, tag_column=cross_tag_column, author_column=cross_author_column)`` fitted
    on the whole table, or None when ``cross_window_days`` is None (no cross columns). The cross features of the
    train rows come from :class:`WindowedCrossFeatures` (``cross_chunk_days`` per fitted chunk). history_length:
    the behaviour sequence's length (needs cross features: the windowed store answers the sequences).
    """
    enc = FeatureEncoder(sd.schema, min_count=min_count, numeric=numeric, n_buckets=n_buckets,
                         history_length=history_length)
    enc.check_args()
    if history_length and cross_window_days is None:
        raise ValueError("fit_encoder_stream: history_length > 0 needs cross_window_days (the windowed cross-feature "
                         "store answers the behaviour sequences)")
    feats = encoded_features(sd.schema)
    imp_feats = [f for f, _ in feats if f.table == "impressions"]
    cross = None
    if cross_window_days is not None:
        check_cross_names(sd.schema, CrossFeatureStore.feature_names)
        cross = WindowedCrossFeatures(sd, cross_window_days, cross_chunk_days, cross_tag_column, cross_author_column,
                                      batch_rows)
        cross_stats = _MeanVar(len(cross.feature_names))
    users, items = sd.users, sd.items
    src = sd.source("impressions")
    u_index = IdIndex(users["user_id"].to_numpy(np.int64), "user_id", src)
    i_index = IdIndex(items["item_id"].to_numpy(np.int64), "item_id", src)
    u_count = np.zeros(len(users), np.int64)
    i_count = np.zeros(len(items), np.int64)
    counts = {f.name: _ValueCounts() for f in imp_feats}
    nan_counts = {f.name: 0 for f in imp_feats}
    kinds: dict[str, str] = {}
    src = sd.source("impressions")
    n_train = 0
    bar = tqdm(total=split.rows["train"], disable=not progress, desc="fit encoder", unit="row")
    for df in scan(sd, ["user_id", "item_id", *(f.name for f in imp_feats)], batch_rows):
        df = df[split.part_of(df["request_start_ms"].to_numpy()) == 0]
        if len(df) == 0:
            continue
        n_train += len(df)
        if cross is not None:
            x = cross.query_frame(df)
            cross_stats.add(np.log1p(np.stack([x[n].astype(np.float64) for n in cross.feature_names], axis=1)))
        u_count += np.bincount(u_index.rows(df["user_id"].to_numpy()),
                               minlength=len(users))
        i_count += np.bincount(i_index.rows(df["item_id"].to_numpy()),
                               minlength=len(items))
        for f in imp_feats:
            s = column(df, f.name, src)
            if f.kind == "categorical":
                keys, valid, kinds[f.name] = cat_keys(s, src, f.name, kind=kinds.get(f.name))
                counts[f.name].add(keys[valid])
            else:
                v = float_values(s, src, f.name)
                nan = np.isnan(v)
                nan_counts[f.name] += int(nan.sum())
                counts[f.name].add(v[~nan])
        bar.update(len(df))
    bar.close()
    if n_train == 0:
        raise DataValidationError(f"{src}: the train split selects no impressions")

    columns, vocab, edges = [], {}, {}
    for f, part in feats:
        col = {"name": f.name, "side": f.side, "part": part, "kind": f.kind}
        if part in ("user", "item"):
            table, w, source = (users, u_count, sd.source("users")) if part == "user" else \
                (items, i_count, sd.source("items"))
            s = column(table, f.name, source)
            if f.kind == "categorical":
                keys, valid, kind = cat_keys(s, source, f.name)
                vc = _ValueCounts()
                keep = valid & (w > 0)
                vc.add(keys[keep], w[keep])
                uk, uc = vc.keys, vc.counts
            else:
                v = float_values(s, source, f.name)
                nan = np.isnan(v)
                vc = _ValueCounts()
                keep = ~nan & (w > 0)
                vc.add(v[keep], w[keep])
                x, c, n_nan = vc.keys, vc.counts, int(w[nan].sum())
        else:
            source = src
            if f.kind == "categorical":
                uk, uc, kind = counts[f.name].keys, counts[f.name].counts, kinds[f.name]
            else:
                x, c, n_nan = counts[f.name].keys, counts[f.name].counts, nan_counts[f.name]
        if f.kind == "categorical":
            vocab[f.name] = fit_categorical(col, uk, uc, kind, min_count)
        else:
            e = fit_numeric(col, WeightedValues(x, c, n_nan), numeric, n_buckets, source)
            if e is not None:
                edges[f.name] = e
        columns.append(col)
    enc.set_fitted(columns, vocab, edges,
                   None if cross is None else (cross.feature_names, cross_stats.mean, cross_stats.std(), cross_stats.n),
                   None if cross is None else tuple(c for c in (cross_tag_column, cross_author_column) if c))
    if cross is not None:
        log.info("fit_encoder_stream: cross features from %d chunk fits, at most %d events buffered",
                 cross.n_fits_, cross.max_events_)
    log.info("fit_encoder_stream: %d columns, %d cross features from %d train rows", len(columns),
             len(enc.cross_names_), n_train)
    return enc
