"""The data step: load or generate the logs, split by time, fit the encoder, write the encoded splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from .. import artifacts as A
from ..data import custom, kuairand, movielens
from ..data.features import CrossFeatureStore, FeatureEncoder, build_encoded
from ..data.history import EventHistory
from ..data.requests import request_start_ms
from ..data.schema import SIDES
from ..data.split import time_split
from ..data.world import generate_world
from ..run_data import SPLIT_CODES
from .config import DataSection
from .judge import decide_filter_seen
from .runner import StepContext, StepResult


def _load_source(c: DataSection, out: Path, seed: int, progress: bool):
    if c.source == "world":
        world_cfg = dataclasses.replace(c.world, seed=c.world.seed + seed)
        world = generate_world(out / "world", world_cfg, progress=progress)
        return kuairand.load_kuairand(out / "world"), world
    if c.source == "kuairand":
        return kuairand.load_kuairand(c.path), None
    if c.source == "movielens-100k":
        return movielens.load_movielens_100k(c.path), None
    if c.source == "movielens-1m":
        return movielens.load_movielens_1m(c.path), None
    return custom.load_custom(c.path), None


def kuairand_offset() -> float:
    return float(kuairand.BEIJING_UTC_OFFSET_HOURS)


def run(ctx: StepContext) -> StepResult:
    c: DataSection = ctx.config
    ds, world = _load_source(c, ctx.out, ctx.seed, ctx.progress)
    # KuaiRand (and the world, which writes its layout) keep Beijing time: split on Beijing calendar days.
    utc_offset = kuairand_offset() if c.source in ("world", "kuairand") else 0.0
    masks = time_split(ds, valid_days=c.valid_days, test_days=c.test_days, utc_offset_hours=utc_offset)
    cross = CrossFeatureStore(window_days=c.cross_window_days, tag_column=c.cross_tag_column,
                              author_column=c.cross_author_column).fit(ds.impressions, ds.items)
    enc = FeatureEncoder(ds.schema, min_count=c.min_count, numeric=c.numeric,
                         history_length=c.history_length).fit(ds, masks["train"], cross)
    enc.save(ctx.out / "encoder")
    tables = build_encoded(ds, masks, enc, cross, privileged=True)
    outputs = []
    for split, t in tables.items():
        A.write_npz(ctx.out / f"encoded_{split}.npz", **t.arrays())
        outputs.append(f"encoded_{split}.npz")
    spec = next(iter(tables.values())).spec
    A.write_json(ctx.out / "spec.json", spec.to_dict())
    A.write_json(ctx.out / "schema.json", ds.schema.to_dict())
    imp = ds.impressions.copy()
    split_col = np.full(len(imp), -1, np.int8)
    for name, m in masks.items():
        split_col[np.asarray(m)] = SPLIT_CODES[name]
    imp["split"] = split_col
    A.write_parquet(ctx.out / "users.parquet", ds.users)
    A.write_parquet(ctx.out / "items.parquet", ds.items)
    A.write_parquet(ctx.out / "impressions.parquet", imp)
    outputs += ["spec.json", "schema.json", "users.parquet", "items.parquet", "impressions.parquet"]
    outputs += [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "encoder").rglob("*")) if p.is_file()]
    if world is not None:
        outputs += [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "world").iterdir())
                    if p.is_file() and p.suffix in (".json", ".npz")]
    splits = {}
    for name, m in masks.items():
        sub = imp[np.asarray(m)]
        splits[name] = {"rows": int(len(sub)), "requests": int(sub.request_id.nunique()),
                        "ctr": float(sub.click.mean()),
                        "start": pd.to_datetime(sub.time_ms.min(), unit="ms").isoformat(),
                        "end": pd.to_datetime(sub.time_ms.max(), unit="ms").isoformat()}
    tr = imp[split_col == SPLIT_CODES["train"]]
    train_events = EventHistory(tr["user_id"].to_numpy(np.int64), tr["item_id"].to_numpy(np.int64),
                                request_start_ms(tr), tr["click"].to_numpy())
    repeat_share = train_events.repeat_share(int(tr.time_ms.min()), int(tr.time_ms.max()) + 1)
    applied, why = decide_filter_seen(c.filter_seen, repeat_share)
    summary = {"source": c.source, "n_users": int(len(ds.users)), "n_items": int(len(ds.items)),
               "n_impressions": int(len(imp)), "n_requests": int(imp.request_id.nunique()),
               "ctr": float(imp.click.mean()),
               "random_share": float(imp.is_rand.mean()), "n_cat_columns": len(spec.cat_names),
               "n_num_columns": len(spec.num_names),
               # share of train clicks on an item the same user had been shown before: re-consumption
               "repeat_click_share": repeat_share,
               "filter_seen": {"applied": applied, "why": why},
               "sides": {s: len(spec.cat_index(s)) + len(spec.num_index(s)) for s in SIDES},
               "history_attributes": enc.history_attrs_}
    A.write_json(ctx.out / "summary.json", {"summary": summary, "splits": splits})
    outputs.append("summary.json")
    metrics = {"summary": summary, "splits": splits}
    if world is not None:  # wall times go to the manifest only, so that summary.json is reproducible
        metrics["world_seconds"] = world.summary().get("seconds")
    return StepResult(outputs, metrics,
                      f"{len(imp):,} impressions, {len(ds.users):,} users, {len(ds.items):,} items")
