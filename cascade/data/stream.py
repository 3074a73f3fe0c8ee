"""Streaming data layer: a parquet impression dataset larger than RAM -> encoder -> on-disk EncodedTables.

A :class:`StreamDataset` is a folder written by :func:`cascade.data.world_stream.generate_world_stream`: side
tables (read into memory: they grow with users and items only) and impressions as a pyarrow dataset of parquet
files, scanned in record batches. Three streaming passes, each holding one batch at a time:

1. :func:`stream_time_split` reads ``request_id`` and ``time_ms`` and finds the split days exactly as
   :func:`cascade.data.split.time_split` does (a request belongs to the day of its START time; the last
   ``test_days`` days are test, the ``valid_days`` before valid, the rest train), and counts the rows per split.
2. :func:`fit_encoder_stream` fits a :class:`~cascade.data.features.FeatureEncoder` on the train rows in one pass.
   User / item columns: the pass counts each user's and item's train exposures (arrays [U] and [I]); each
   column's statistics are then those of the side-table values weighted by these counts, which is what
   ``FeatureEncoder.fit`` computes from one row per train exposure. Context / privileged columns: the pass merges
   per-batch value counts. Vocabularies (with ``min_count`` and OOV index 0), key kinds, medians, log1p decisions
   and quantile edges equal the in-memory fit exactly; means and standard deviations agree to float rounding
   (a weighted sum instead of numpy's pairwise sum). Memory: the distinct values of each impression column
   (bounded for the integer-valued KuaiRand columns; a float column with a distinct value per row would grow).
3. :func:`encode_stream` encodes batch by batch into ``.npy`` files (``np.lib.format.open_memmap``), one folder per
   split, with exactly the rows, order and values of :func:`cascade.data.features.build_encoded` on the whole
   table (same encoder); :func:`open_encoded` maps them (``mmap_mode='c'``: read-only on disk) as an
   :class:`~cascade.data.batches.EncodedTable` that :func:`cascade.train.loop.fit` trains on without loading it:
   each batch is one ``np.take`` gather from the mapped files (random reads served by the page cache).

Requests must be contiguous in the dataset (rows sorted by ``request_id``, as the chunked world writes them), so a
request's start time is known when its last row is read; a batch that ends inside a request carries that
request's rows over to the next batch. A decreasing ``request_id`` raises naming the file.

Cross features (optional: ``cross_window_days``). :class:`~cascade.data.features.CrossFeatureStore` answers a
query at time t from the events with ``t - W <= time_ms < t`` only, so the rows whose request starts in a time
chunk [c0, c1) need only the events of [c0 - W, c1). :class:`WindowedCrossFeatures` reads the events (user, item,
time, click) with a second scan that runs just ahead of the rows being encoded, keeps those of the trailing window,
and for each chunk (``chunk_days``, one day by default) fits a ``CrossFeatureStore`` on the events of
[c0 - W, c1) and answers the chunk's rows from it. The counts are those of a store fitted on the whole table
(bit for bit), and events of a row's own request never count (queries use the request START time). Memory: the
events of one window plus one chunk (plus the requests read ahead to finish the chunk, at most one scan batch),
25 bytes each in the buffer, plus the ``CrossFeatureStore`` built on them (four sorted event indexes, more while
it sorts); never the whole log. This relies on request start times being non-decreasing in dataset order
(the chunked world's dense request ids are in start-time order); a dataset that breaks it raises. Each event is
indexed (W + chunk) / chunk times over the pass: a window of 7 days with day chunks fits every event 8 times.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from tqdm.auto import tqdm

from cascade.artifacts import ArtifactError, read_json, read_manifest, write_json, write_manifest
from cascade.data import kuairand
from cascade.data.batches import EncodedTable, FeatureSpec
from cascade.data.features import (CrossFeatureStore, FeatureEncoder, PairEncoder, WeightedValues, cat_keys,
                                   check_cross_names, column, encoded_features, fit_categorical, fit_numeric,
                                   float_values)
from cascade.data.ids import IdIndex
from cascade.data.schema import Dataset, DataValidationError, Feature, Schema
from cascade.data.requests import request_start_ms
from cascade.data.split import DAY_MS, SPLITS
from cascade.data.world import USER_FEATURES_FILE, VIDEO_FEATURES_FILE
from cascade.data.world_stream import world_stream_files

log = logging.getLogger(__name__)

ENCODED_SPEC = "spec.json"


# --------------------------------------------------------------------------------------------------------------
# the dataset and its scan


@dataclass
class StreamDataset:
    """Side tables in memory, impressions on disk.

    users / items: canonical side tables (as :func:`cascade.data.kuairand.read_users` / ``read_items`` give them).
    impressions: a ``pyarrow.dataset.Dataset`` over the part files (canonical impression columns).
    schema: user, item, context (hour, weekday, tab) and privileged features, as ``load_kuairand`` lists them.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    impressions: pads.Dataset
    schema: Schema
    path: Path
    name: str = "world-stream"
    files: list[Path] = field(default_factory=list)

    def source(self, table: str) -> str:
        return {"users": str(self.path / USER_FEATURES_FILE), "items": str(self.path / VIDEO_FEATURES_FILE)}.get(
            table, str(self.path / "impressions"))


def open_stream_dataset(path: str | Path) -> StreamDataset:
    """Open a finished streamed world (its manifest must exist); reads the side tables, not the impressions."""
    path = Path(path)
    files = world_stream_files(path)
    users, user_feats = kuairand.read_users(path / USER_FEATURES_FILE)
    items, item_feats = kuairand.read_items(path / VIDEO_FEATURES_FILE)
    imp = pads.dataset([str(p) for p in files], format="parquet")
    need = ("request_id", "user_id", "item_id", "time_ms", "position", "click", "is_rand", "hour", "weekday", "tab",
            *kuairand.PRIVILEGED_COLUMNS)
    missing = [c for c in need if c not in imp.schema.names]
    if missing:
        raise DataValidationError(f"{path / 'impressions'}: missing impression column(s) {missing} "
                                  f"(has {imp.schema.names})")
    features = [*user_feats, *item_feats,
                Feature("hour", "impressions", "categorical", "context"),
                Feature("weekday", "impressions", "categorical", "context"),
                Feature("tab", "impressions", "categorical", "context"),
                *(Feature(c, "impressions", "numeric", "privileged") for c in kuairand.PRIVILEGED_COLUMNS)]
    return StreamDataset(users, items, imp, Schema(tuple(features)), path, files=files)


def scan(sd: StreamDataset, columns: Sequence[str], batch_rows: int = 1 << 20) -> Iterator[pd.DataFrame]:
    """The impressions in dataset order, as DataFrames of whole requests (about ``batch_rows`` rows each).

    Reads ``columns`` (``request_id`` and ``time_ms`` are always read) through ``pyarrow.dataset`` record batches;
    a batch that ends inside a request carries that request's rows to the next one. Each frame has a
    ``request_start_ms`` column (int64: the min ``time_ms`` of the row's request).
    """
    if batch_rows < 1:
        raise ValueError(f"scan: batch_rows must be >= 1, got {batch_rows}")
    cols = list(dict.fromkeys(["request_id", "time_ms", *columns]))
    carry: pd.DataFrame | None = None
    last_id = None
    src = str(sd.path / "impressions")
    for rb in sd.impressions.to_batches(columns=cols, batch_size=batch_rows):
        if rb.num_rows == 0:
            continue
        df = rb.to_pandas()
        rid = df["request_id"].to_numpy()
        down = np.flatnonzero(np.diff(rid) < 0)
        if len(down) or (last_id is not None and rid[0] < last_id):
            bad = int(rid[down[0] + 1]) if len(down) else int(rid[0])
            raise DataValidationError(f"{src}: column 'request_id' must be non-decreasing (requests contiguous), "
                                      f"found {bad} after a larger id")
        last_id = int(rid[-1])
        if carry is not None:
            df = pd.concat([carry, df], ignore_index=True)
            rid = df["request_id"].to_numpy()
        # hold back the last request: its rows may go on in the next batch
        cut = int(np.searchsorted(rid, rid[-1], side="left"))
        carry = df.iloc[cut:].reset_index(drop=True)
        if cut > 0:
            yield _with_start(df.iloc[:cut].reset_index(drop=True))
    if carry is not None and len(carry):
        yield _with_start(carry)


def _with_start(df: pd.DataFrame) -> pd.DataFrame:
    df["request_start_ms"] = request_start_ms(df)
    return df


def read_dataset(sd: StreamDataset) -> Dataset:
    """The whole dataset in memory as a validated :class:`Dataset` (small data only: tests, comparisons)."""
    imp = sd.impressions.to_table().to_pandas()
    for c in ("position", "click", "is_rand"):
        imp[c] = imp[c].astype(np.int64)
    sources = {"users": sd.source("users"), "items": sd.source("items"), "impressions": sd.source("impressions")}
    return Dataset(sd.users, sd.items, imp, sd.schema, name=sd.name, sources=sources).validate()


# --------------------------------------------------------------------------------------------------------------
# pass 1: time split


@dataclass(frozen=True)
class StreamSplit:
    """Day bounds of a time split and its row counts. A row's day is floor((request start + offset) / 1 day);
    train = day < valid_from, valid = valid_from <= day < test_from, test = day >= test_from."""

    valid_from: int
    test_from: int
    offset_ms: int
    rows: dict[str, int]

    def part_of(self, request_start_ms: np.ndarray) -> np.ndarray:
        """Split code of each row: int8 [N], 0 train, 1 valid, 2 test (the order of SPLITS)."""
        day = np.floor_divide(np.asarray(request_start_ms, np.int64) + self.offset_ms, DAY_MS)
        return ((day >= self.valid_from).astype(np.int8) + (day >= self.test_from)).astype(np.int8)


def stream_time_split(sd: StreamDataset, valid_days: int = 1, test_days: int = 1, utc_offset_hours: float = 0.0,
                      batch_rows: int = 1 << 20) -> StreamSplit:
    """The split of :func:`cascade.data.split.time_split` (same arguments, same rows), in one streaming pass."""
    if test_days < 1:
        raise ValueError(f"stream_time_split: test_days must be >= 1, got {test_days}")
    if valid_days < 0:
        raise ValueError(f"stream_time_split: valid_days must be >= 0, got {valid_days}")
    offset_ms = int(round(utc_offset_hours * 3_600_000))
    days: dict[int, int] = {}
    for df in scan(sd, [], batch_rows):
        d, c = np.unique(np.floor_divide(df["request_start_ms"].to_numpy() + offset_ms, DAY_MS), return_counts=True)
        for k, v in zip(d.tolist(), c.tolist()):
            days[k] = days.get(k, 0) + v
    if not days:
        raise DataValidationError(f"{sd.source('impressions')}: no impressions to split")
    day = np.array(sorted(days))
    cnt = np.array([days[k] for k in day.tolist()])
    test_from = int(day[-1]) - test_days + 1
    valid_from = test_from - valid_days
    rows = {"train": int(cnt[day < valid_from].sum()), "valid": int(cnt[(day >= valid_from) & (day < test_from)].sum()),
            "test": int(cnt[day >= test_from].sum())}
    for part in SPLITS:
        if rows[part] == 0 and not (part == "valid" and valid_days == 0):
            raise DataValidationError(f"{sd.source('impressions')}: split {part!r} is empty (days with requests: "
                                      f"{day.min()}..{day.max()} since the epoch; valid_days={valid_days}, "
                                      f"test_days={test_days}, utc_offset_hours={utc_offset_hours})")
    log.info("stream_time_split: %s", rows)
    return StreamSplit(valid_from, test_from, offset_ms, rows)


# --------------------------------------------------------------------------------------------------------------
# cross features over a trailing window


class WindowedCrossFeatures:
    """Cross features of streamed impression rows, equal to a :class:`CrossFeatureStore` fitted on the whole table.

    Call :meth:`query` with the rows in dataset order (request start times non-decreasing from call to call; within
    a call any order). The events come from a second scan of ``sd`` that reads ahead only as far as the queried
    times need; for each chunk of ``chunk_days`` (chunk k = [k, k + 1) * chunk_days since the epoch) a store is
    fitted on the buffered events of [chunk start - W, chunk end), W = ``window_days``. ``max_events_`` is the
    largest number of events buffered at once (the memory bound, for benchmarks).
    """

    feature_names = CrossFeatureStore.feature_names

    def __init__(self, sd: StreamDataset, window_days: float, chunk_days: float = 1.0, tag_column: str = "tag",
                 author_column: str = "author_id", batch_rows: int = 1 << 20):
        if not window_days > 0:
            raise ValueError(f"WindowedCrossFeatures: window_days must be > 0, got {window_days}")
        self.chunk_ms = int(round(chunk_days * DAY_MS))
        if self.chunk_ms < 1:
            raise ValueError(f"WindowedCrossFeatures: chunk_days must be > 0, got {chunk_days}")
        self.sd = sd
        self.window_days, self.chunk_days = window_days, chunk_days
        self.tag_column, self.author_column = tag_column, author_column
        self.window_ms = int(round(window_days * DAY_MS))  # as CrossFeatureStore.query rounds it
        self._items = sd.items[list(dict.fromkeys(["item_id", tag_column, author_column]))]
        self._events = scan(sd, ["user_id", "item_id", "click"], batch_rows)
        # (user, item, time, click, max time) of each buffered scan frame
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []
        self._read_start = np.iinfo(np.int64).min  # every request starting before this has been read
        self._done = False
        self._chunk: int | None = None
        self._store: CrossFeatureStore | None = None
        self.max_events_ = 0
        self.n_fits_ = 0

    def _read_until(self, t: int, drop_before: int) -> None:
        """Read events until every request starting before ``t`` is buffered; drop frames entirely before
        ``drop_before`` on the way."""
        src = self.sd.source("impressions")
        while not self._done and self._read_start < t:
            df = next(self._events, None)
            if df is None:
                self._done = True
                break
            start = df["request_start_ms"].to_numpy()
            if start[0] < self._read_start or np.any(np.diff(start) < 0):
                raise DataValidationError(f"{src}: request start times must be non-decreasing in dataset order "
                                          "(request ids in start-time order) for streamed cross features")
            self._read_start = int(start[-1])
            # copies: a view would keep the frame's whole int64 block (five columns) alive
            user, item, tm, click = (df[c].to_numpy(dt, copy=True) for c, dt in
                                     (("user_id", np.int64), ("item_id", np.int64), ("time_ms", np.int64),
                                      ("click", np.int8)))
            self._frames.append((user, item, tm, click, int(tm.max())))
            self._frames = [f for f in self._frames if f[4] >= drop_before]

    def _move_to(self, chunk: int) -> None:
        """Fit the store that answers queries of ``chunk`` (on the events of [start - W, end))."""
        lo, hi = chunk * self.chunk_ms - self.window_ms, (chunk + 1) * self.chunk_ms
        self._store = None  # let the previous chunk's index go before the next one is built
        # drop the events before the new window first, so the read-ahead below adds to the window only
        kept = []
        for user, item, tm, click, tmax in self._frames:
            if tmax >= lo:
                k = tm >= lo
                kept.append((user[k], item[k], tm[k], click[k], tmax))
        self._frames = kept
        self._read_until(hi, lo)
        self.max_events_ = max(self.max_events_, sum(len(f[2]) for f in self._frames))
        if len(self._frames) > 1:  # one array per column from here on (a copy of the window, once per chunk)
            self._frames = [(*(np.concatenate([f[k] for f in self._frames]) for k in range(4)),
                             max(f[4] for f in self._frames))]
        user, item, tm, click, _ = self._frames[0] if self._frames else (np.zeros(0, np.int64),) * 4 + (lo,)
        sel = tm < hi  # later events stay buffered for the next chunks
        events = pd.DataFrame({"user_id": user[sel], "item_id": item[sel], "time_ms": tm[sel], "click": click[sel]})
        del user, item, tm, click, sel
        self._store = CrossFeatureStore(self.window_days, tag_column=self.tag_column,
                                        author_column=self.author_column).fit(events, self._items)
        self._chunk = chunk
        self.n_fits_ += 1

    def query(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Cross features of (user_ids[n], item_ids[n]) at t_ms[n] (request start times): name -> float32 [N],
        as :meth:`CrossFeatureStore.query`. A time in a chunk before the last one queried raises."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        if user_ids.shape != item_ids.shape or user_ids.ndim != 1:
            raise ValueError(f"WindowedCrossFeatures.query: user_ids {user_ids.shape} and item_ids {item_ids.shape} "
                             "must be equal 1-d")
        n = len(user_ids)
        out = {name: np.zeros(n, np.float32) for name in self.feature_names}
        if n == 0:
            return out
        chunk = np.floor_divide(t_ms, self.chunk_ms)
        first, last = int(chunk.min()), int(chunk.max())
        if self._chunk is not None and first < self._chunk:
            raise ValueError(f"WindowedCrossFeatures.query: time chunk {first} comes after chunk {self._chunk}; "
                             "rows must be queried in request start order")
        for k in ([first] if first == last else np.unique(chunk).tolist()):
            rows = slice(None) if first == last else np.flatnonzero(chunk == k)
            if k != self._chunk:
                self._move_to(k)
            got = self._store.query(user_ids[rows], item_ids[rows], t_ms[rows])
            for name in self.feature_names:
                out[name][rows] = got[name]
        return out

    def query_frame(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Cross features of a :func:`scan` frame's rows at their ``request_start_ms``."""
        return self.query(df["user_id"].to_numpy(), df["item_id"].to_numpy(), df["request_start_ms"].to_numpy())


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


# --------------------------------------------------------------------------------------------------------------
# pass 2: fitting the encoder


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
                       cross_author_column: str = "author_id", cross_chunk_days: float = 1.0) -> FeatureEncoder:
    """A FeatureEncoder fitted on the train rows of ``split`` in one streaming pass.

    Equal to ``FeatureEncoder(sd.schema, min_count, numeric, n_buckets).fit(dataset, train_mask, cross_store)`` on
    the same rows in memory (see the module doc for what is exact and what agrees to rounding), where cross_store is
    ``CrossFeatureStore(cross_window_days, tag_column=cross_tag_column, author_column=cross_author_column)`` fitted
    on the whole table, or None when ``cross_window_days`` is None (no cross columns). The cross features of the
    train rows come from :class:`WindowedCrossFeatures` (``cross_chunk_days`` per fitted chunk).
    """
    enc = FeatureEncoder(sd.schema, min_count=min_count, numeric=numeric, n_buckets=n_buckets)
    enc.check_args()
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
                   None if cross is None else (cross.feature_names, cross_stats.mean, cross_stats.std()))
    if cross is not None:
        log.info("fit_encoder_stream: cross features from %d chunk fits, at most %d events buffered",
                 cross.n_fits_, cross.max_events_)
    log.info("fit_encoder_stream: %d columns, %d cross features from %d train rows", len(columns),
             len(enc.cross_names_), n_train)
    return enc


# --------------------------------------------------------------------------------------------------------------
# pass 3: encoding into memory-mapped tables


def encode_stream(sd: StreamDataset, split: StreamSplit, encoder: FeatureEncoder, out_dir: str | Path,
                  parts: Sequence[str] = SPLITS, privileged: bool = True, cat_dtype: str = "int64",
                  batch_rows: int = 1 << 20, progress: bool = False, cross_window_days: float | None = None,
                  cross_tag_column: str = "tag", cross_author_column: str = "author_id",
                  cross_chunk_days: float = 1.0) -> dict[str, EncodedTable]:
    """Encode the rows of each split in ``parts`` into ``out_dir/<part>/*.npy`` and return them memory-mapped.

    The arrays equal :func:`cascade.data.features.build_encoded` on the whole table with the same encoder and
    ``cross_store`` = ``CrossFeatureStore(cross_window_days, tag_column=cross_tag_column,
    author_column=cross_author_column)`` fitted on the whole table (None when ``cross_window_days`` is None; it
    must be given exactly when the encoder was fitted with cross features, with the window it was fitted with).
    cat_dtype: "int64" (the EncodedTable contract) or "int32" (half the disk for large runs; batches become
    int64 tensors in ``cascade.train.loop.to_tensors``; only valid while every cardinality fits int32).
    Files are written under temporary names and renamed after a flush; ``out_dir/manifest.json`` comes last.
    """
    t0 = time.perf_counter()
    if cat_dtype not in ("int64", "int32"):
        raise ValueError(f"encode_stream: cat_dtype must be 'int64' or 'int32', got {cat_dtype!r}")
    bad = [p for p in parts if p not in SPLITS]
    if bad or not parts:
        raise ValueError(f"encode_stream: parts must be a non-empty subset of {SPLITS}, got {list(parts)}")
    if bool(encoder.cross_names_) != (cross_window_days is not None):
        raise ValueError("encode_stream: the encoder was fitted " + ("with" if encoder.cross_names_ else "without")
                         + " cross features but cross_window_days is " + str(cross_window_days))
    if encoder.cross_names_ and list(encoder.cross_names_) != list(CrossFeatureStore.feature_names):
        raise ValueError(f"encode_stream: encoder cross features {encoder.cross_names_} are not "
                         f"{list(CrossFeatureStore.feature_names)}")
    parts = [p for p in SPLITS if p in parts]  # in time order: the cross features are queried forward in time
    out_dir = Path(out_dir)
    cross = None if cross_window_days is None else WindowedCrossFeatures(
        sd, cross_window_days, cross_chunk_days, cross_tag_column, cross_author_column, batch_rows)
    # the windowed store stands in for a CrossFeatureStore: PairEncoder only calls its query(user, item, t)
    pairs = PairEncoder(encoder, cross, sd.users, sd.items)
    spec = encoder.spec(privileged=privileged)
    if cat_dtype == "int32" and max(spec.cat_cardinality, default=0) >= 2**31:
        raise ValueError("encode_stream: a cardinality does not fit int32; use cat_dtype='int64'")
    priv = [c["name"] for c in encoder.columns_ if c["part"] == "privileged"] if privileged else []
    ctx = [c["name"] for c in encoder.columns_ if c["part"] in ("context", "privileged")]
    shapes = {"cat": (len(spec.cat_names),), "num": (len(spec.num_names),)}
    dtypes = {"cat": np.dtype(cat_dtype), "num": np.float32, "label": np.float32, "request_id": np.int64,
              "user_id": np.int64, "item_id": np.int64, "time_ms": np.int64, "is_rand": np.int8,
              "extra__position": np.int64, **{f"extra__{n}": np.float32 for n in priv}}
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a half-written earlier run: start over
    files: dict[str, dict[str, np.memmap]] = {}
    for p in parts:
        (out_dir / p).mkdir(parents=True)
        n = split.rows[p]
        files[p] = {k: np.lib.format.open_memmap(out_dir / p / f".{k}.npy.tmp", mode="w+", dtype=dt,
                                                 shape=(n, *shapes.get(k, ())))
                    for k, dt in dtypes.items()}
    filled = {p: 0 for p in parts}
    code = {p: SPLITS.index(p) for p in parts}
    bar = tqdm(total=sum(split.rows[p] for p in parts), disable=not progress, desc="encode", unit="row")
    for df in scan(sd, ["user_id", "item_id", "click", "is_rand", "position", *ctx], batch_rows):
        which = split.part_of(df["request_start_ms"].to_numpy())
        for p in parts:
            sub = df[which == code[p]]
            m = len(sub)
            if m == 0:
                continue
            lo, hi = filled[p], filled[p] + m
            if hi > split.rows[p]:
                raise ArtifactError(f"{sd.source('impressions')}: split {p!r} has more rows than the split pass "
                                    f"counted ({split.rows[p]}); the dataset changed during encoding")
            cat, num = pairs.encode_pairs(sub["user_id"].to_numpy(), sub["item_id"].to_numpy(),
                                          sub["request_start_ms"].to_numpy(), sub)
            if privileged:
                pcat, pnum = encoder.encode_privileged(sub)
                cat = np.concatenate([cat, pcat], axis=1)
                num = np.concatenate([num, pnum], axis=1)
            f = files[p]
            f["cat"][lo:hi] = cat
            f["num"][lo:hi] = num
            f["label"][lo:hi] = sub["click"].to_numpy(np.float32)
            for k in ("request_id", "user_id", "item_id", "time_ms"):
                f[k][lo:hi] = sub[k].to_numpy(np.int64)
            f["is_rand"][lo:hi] = sub["is_rand"].to_numpy(np.int8)
            f["extra__position"][lo:hi] = sub["position"].to_numpy(np.int64)
            for name in priv:
                f[f"extra__{name}"][lo:hi] = sub[name].to_numpy(np.float32, na_value=np.nan)
            filled[p] = hi
            bar.update(m)
    bar.close()
    outputs = []
    for p in parts:
        if filled[p] != split.rows[p]:
            raise ArtifactError(f"{sd.source('impressions')}: split {p!r} got {filled[p]} rows, the split pass "
                                f"counted {split.rows[p]}; the dataset changed during encoding")
        for k, mm in files[p].items():
            mm.flush()
            os.replace(out_dir / p / f".{k}.npy.tmp", out_dir / p / f"{k}.npy")
            outputs.append(f"{p}/{k}.npy")
        write_json(out_dir / p / ENCODED_SPEC, {"spec": spec.to_dict(), "rows": filled[p],
                                                "arrays": {k: str(np.dtype(dt)) for k, dt in dtypes.items()}})
        outputs.append(f"{p}/{ENCODED_SPEC}")
    files.clear()
    wall = time.perf_counter() - t0
    write_manifest(out_dir, stage="encode_stream", config={"privileged": privileged, "cat_dtype": cat_dtype,
                                                           "parts": list(parts), "valid_from": split.valid_from,
                                                           "test_from": split.test_from, "offset_ms": split.offset_ms,
                                                           "cross_window_days": cross_window_days,
                                                           "cross_tag_column": cross_tag_column,
                                                           "cross_author_column": cross_author_column,
                                                           "cross_chunk_days": cross_chunk_days},
                   seed=None, inputs={"dataset": str(sd.path)}, outputs=outputs, metrics={"rows": filled},
                   wall_s=round(wall, 3))
    if cross is not None:
        log.info("encode_stream: cross features from %d chunk fits, at most %d events buffered", cross.n_fits_,
                 cross.max_events_)
    log.info("encode_stream: %s rows in %.1f s -> %s", filled, wall, out_dir)
    return {p: open_encoded(out_dir, p) for p in parts}


def open_encoded(out_dir: str | Path, part: str, verify: bool = False) -> EncodedTable:
    """The table of split ``part`` written by :func:`encode_stream`, every array memory-mapped (``mmap_mode='c'``).

    The manifest must exist (a run killed midway has none). verify: re-hash every file (slow for large tables);
    otherwise only the shapes are checked.
    """
    out_dir = Path(out_dir)
    read_manifest(out_dir, verify=verify)
    meta = read_json(out_dir / part / ENCODED_SPEC)
    spec = FeatureSpec.from_dict(meta["spec"])
    arrays = {}
    for k in meta["arrays"]:
        # copy-on-write mapping: the file is never written, and batch views are writable, so torch.as_tensor
        # takes them without its non-writable-array warning (pages are copied only if someone writes to them)
        a = np.load(out_dir / part / f"{k}.npy", mmap_mode="c")
        if len(a) != meta["rows"]:
            raise ArtifactError(f"{out_dir / part / (k + '.npy')}: {len(a)} rows, {ENCODED_SPEC} says {meta['rows']}")
        arrays[k] = a
    return EncodedTable.from_arrays(spec, arrays)
