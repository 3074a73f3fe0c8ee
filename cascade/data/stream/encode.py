"""Pass 3: the splits encoded batch by batch into memory-mapped ``.npy`` tables, and those tables opened."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ...artifacts import ArtifactError, read_json, read_manifest, write_json, write_manifest
from ..batches import EncodedTable, FeatureSpec
from ..features import CrossFeatureStore, FeatureEncoder, PairEncoder
from ..split import SPLITS
from .cross import WindowedCrossFeatures
from .dataset import StreamDataset, StreamSplit, scan

log = logging.getLogger(__name__)

ENCODED_SPEC = "spec.json"


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
    write_manifest(out_dir, kind="encode_stream", config={"privileged": privileged, "cat_dtype": cat_dtype,
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
