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

Cross features are NOT part of the streaming path. :class:`~cascade.data.features.CrossFeatureStore` answers a
query from every earlier event of the user, the item and the user's tags / authors held in memory (sorted event
arrays with cumulative counts), which grows with the number of impressions; a streamed version would need
windowed per-key state updated in time order plus an out-of-core event index, which this module does not
implement. Encoders fitted here have no cross columns (``cross_names_ == []``), and models trained on these
tables must not list the ``cross`` side.
"""

from __future__ import annotations

import json
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
from cascade.data.features import FeatureEncoder, PairEncoder, _IdIndex, _cat_keys, _column, _float_values
from cascade.data.schema import Dataset, DataValidationError, Feature, Schema
from cascade.data.split import DAY_MS, SPLITS, request_start_ms
from cascade.data.world import USER_FEATURES_FILE, VIDEO_FEATURES_FILE
from cascade.data.world_stream import world_stream_files

log = logging.getLogger(__name__)

ENCODED_SPEC = "spec.json"
_BASE_ARRAYS = ("cat", "num", "label", "request_id", "user_id", "item_id", "time_ms", "is_rand")


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

    @property
    def n_rows(self) -> int:
        return self.impressions.count_rows()


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


def _quantile_linear(x: np.ndarray, c: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``np.quantile(v, probs)`` (method 'linear') of the multiset {x[j] repeated c[j] times}, x sorted:
    the same virtual index (n - 1) * q, the same order statistics and numpy's own lerp, so the result is equal."""
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


def _numeric_column(col: dict, x: np.ndarray, c: np.ndarray, n_nan: int, numeric: str, n_buckets: int,
                    source: str) -> np.ndarray | None:
    """Fill ``col`` (median, log1p, mean/std or cardinality) from the multiset of a numeric column's train values:
    x sorted distinct finite values, c their counts, n_nan the NaN count. Returns quantile edges or None."""
    n_fin = int(c.sum())
    if n_fin == 0:
        raise DataValidationError(f"{source}: numeric column {col['name']!r} is all NaN on the train rows")
    ends = np.cumsum(c)

    def order_stat(k: int) -> float:
        return float(x[np.searchsorted(ends, k, side="right")])

    median = order_stat(n_fin // 2) if n_fin % 2 else (order_stat(n_fin // 2 - 1) + order_stat(n_fin // 2)) / 2.0
    if n_nan:  # NaN is filled with the median before any transform
        pos = int(np.searchsorted(x, median))
        if pos < len(x) and x[pos] == median:
            c = c.copy()
            c[pos] += n_nan
        else:
            x, c = np.insert(x, pos, median), np.insert(c, pos, n_nan)
    use_log = numeric == "log_standardize" and float(x[0]) >= 0.0
    v = np.log1p(x) if use_log else x
    col.update(median=median, log1p=bool(use_log))
    if numeric == "quantile":
        edges = np.unique(_quantile_linear(v, c, np.linspace(0.0, 1.0, n_buckets + 1)[1:-1]))
        col.update(out="cat", cardinality=int(len(edges) + 2))
        return edges
    n = float(c.sum())
    mean = float(np.dot(c, v) / n)
    std = float(np.sqrt(np.dot(c, (v - mean) ** 2) / n))
    col.update(out="num", mean=mean, std=std if std > 0 else 1.0)
    return None


def fit_encoder_stream(sd: StreamDataset, split: StreamSplit, min_count: int = 1, numeric: str = "log_standardize",
                       n_buckets: int = 32, batch_rows: int = 1 << 20, progress: bool = False) -> FeatureEncoder:
    """A FeatureEncoder fitted on the train rows of ``split`` in one streaming pass (no cross features).

    Equal to ``FeatureEncoder(sd.schema, min_count, numeric, n_buckets).fit(dataset, train_mask)`` on the same rows
    in memory (see the module doc for what is exact and what agrees to rounding).
    """
    enc = FeatureEncoder(sd.schema, min_count=min_count, numeric=numeric, n_buckets=n_buckets)
    enc._check_args()
    feats = [f for f in sd.schema.features if FeatureEncoder._part(f) is not None]
    for f in feats:
        if f.kind == "sequence":
            raise ValueError(f"FeatureEncoder: sequence feature {f.name!r} is not supported")
    imp_feats = [f for f in feats if f.table == "impressions"]
    users, items = sd.users, sd.items
    u_order = np.argsort(users["user_id"].to_numpy(np.int64), kind="stable")
    i_order = np.argsort(items["item_id"].to_numpy(np.int64), kind="stable")
    u_index = _IdIndex(users["user_id"].to_numpy(np.int64)[u_order])
    i_index = _IdIndex(items["item_id"].to_numpy(np.int64)[i_order])
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
        u_count += np.bincount(u_order[u_index.positions(df["user_id"].to_numpy(), src, "user_id")],
                               minlength=len(users))
        i_count += np.bincount(i_order[i_index.positions(df["item_id"].to_numpy(), src, "item_id")],
                               minlength=len(items))
        for f in imp_feats:
            s = _column(df, f.name, src)
            if f.kind == "categorical":
                keys, valid, kinds[f.name] = _cat_keys(s, src, f.name, kind=kinds.get(f.name))
                counts[f.name].add(keys[valid])
            else:
                v = _float_values(s, src, f.name)
                nan = np.isnan(v)
                nan_counts[f.name] += int(nan.sum())
                counts[f.name].add(v[~nan])
        bar.update(len(df))
    bar.close()
    if n_train == 0:
        raise DataValidationError(f"{src}: the train split selects no impressions")

    columns, vocab, edges = [], {}, {}
    for f in feats:
        part = FeatureEncoder._part(f)
        col = {"name": f.name, "side": f.side, "part": part, "kind": f.kind}
        if part in ("user", "item"):
            table, w, source = (users, u_count, sd.source("users")) if part == "user" else \
                (items, i_count, sd.source("items"))
            s = _column(table, f.name, source)
            if f.kind == "categorical":
                keys, valid, kind = _cat_keys(s, source, f.name)
                vc = _ValueCounts()
                keep = valid & (w > 0)
                vc.add(keys[keep], w[keep])
                uk, uc = vc.keys, vc.counts
            else:
                v = _float_values(s, source, f.name)
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
            vocab[f.name] = uk[uc >= min_count]
            col.update(out="cat", key_kind=kind, cardinality=int(len(vocab[f.name]) + 1))
        else:
            e = _numeric_column(col, x, c, n_nan, numeric, n_buckets, source)
            if e is not None:
                edges[f.name] = e
        columns.append(col)
    enc.columns_, enc.vocab_, enc.edges_ = columns, vocab, edges
    enc.cross_names_, enc.cross_mean_, enc.cross_std_ = [], np.zeros(0), np.ones(0)
    log.info("fit_encoder_stream: %d columns from %d train rows", len(columns), n_train)
    return enc


# --------------------------------------------------------------------------------------------------------------
# pass 3: encoding into memory-mapped tables


def encode_stream(sd: StreamDataset, split: StreamSplit, encoder: FeatureEncoder, out_dir: str | Path,
                  parts: Sequence[str] = SPLITS, privileged: bool = True, cat_dtype: str = "int64",
                  batch_rows: int = 1 << 20, progress: bool = False) -> dict[str, EncodedTable]:
    """Encode the rows of each split in ``parts`` into ``out_dir/<part>/*.npy`` and return them memory-mapped.

    The arrays equal :func:`cascade.data.features.build_encoded` (``cross_store=None``) on the whole table.
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
    if encoder.cross_names_:
        raise ValueError("encode_stream: the encoder was fitted with cross features; the streaming path has none")
    out_dir = Path(out_dir)
    pairs = PairEncoder(encoder, None, sd.users, sd.items)
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
            del mm
            os.replace(out_dir / p / f".{k}.npy.tmp", out_dir / p / f"{k}.npy")
            outputs.append(f"{p}/{k}.npy")
        write_json(out_dir / p / ENCODED_SPEC, {"spec": spec.to_dict(), "rows": filled[p],
                                                "arrays": {k: str(np.dtype(dt)) for k, dt in dtypes.items()}})
        outputs.append(f"{p}/{ENCODED_SPEC}")
    files.clear()
    wall = time.perf_counter() - t0
    write_manifest(out_dir, stage="encode_stream", config={"privileged": privileged, "cat_dtype": cat_dtype,
                                                           "parts": list(parts), "valid_from": split.valid_from,
                                                           "test_from": split.test_from, "offset_ms": split.offset_ms},
                   seed=None, inputs={"dataset": str(sd.path)}, outputs=outputs, metrics={"rows": filled},
                   wall_s=round(wall, 3))
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
