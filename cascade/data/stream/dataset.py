"""A streamed dataset: side tables in memory, impressions scanned from parquet in whole requests; the time split
in one streaming pass (pass 1)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from .. import kuairand
from ..requests import request_start_ms
from ..schema import Dataset, DataValidationError, Feature, Schema
from ..split import DAY_MS, SPLITS
from ..world import USER_FEATURES_FILE, VIDEO_FEATURES_FILE, world_stream_files

log = logging.getLogger(__name__)


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
