"""The data step: load or generate the logs, split by time, fit the encoder, write the encoded splits."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .. import artifacts as A
from ..data import custom, kuairand, movielens
from ..data.features import CrossFeatureStore, FeatureEncoder, build_encoded
from ..data.history import EventHistory
from ..data.leakage import check_leakage
from ..data.requests import request_start_ms
from ..data.schema import SIDES, DataValidationError
from ..data.split import drop_last_days, quantile_split_days, time_split
from ..data.world import generate_world
from ..run_data import SPLIT_CODES
from .config import DataSection, DataStepConfig
from .judge import decide_filter_seen
from .runner import StepContext, StepResult

log = logging.getLogger(__name__)


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


def input_fingerprint(c: DataSection) -> dict[str, str]:
    """sha256 over the names, sizes and contents of the files the data step reads (the mapping and the files it
    names; every file of a dataset folder), so that editing a data file re-runs the step. The world is generated
    from the config and the shipped side tables: no entry."""
    if c.source == "world" or c.path is None:
        return {}
    path = Path(c.path)
    if c.source == "custom":
        files = custom.mapping_files(path)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"files": A.stable_hash([[str(p), p.stat().st_size, A.sha256_file(p)] for p in files])}


def split_days(c: DataSection, ds, utc_offset: float) -> tuple[int, int, str]:
    """(valid_days, test_days, how): data.valid_days / data.test_days, or where unset the quantile rule of
    :func:`cascade.data.split.quantile_split_days` (logged)."""
    if c.valid_days is not None and c.test_days is not None:
        return c.valid_days, c.test_days, "config"
    q_valid, q_test = quantile_split_days(ds, utc_offset)
    valid = c.valid_days if c.valid_days is not None else q_valid
    test = c.test_days if c.test_days is not None else q_test
    log.info("data: split days chosen from the data (the last ~10%%/10%% of the requests): valid_days=%d, "
             "test_days=%d (set data.valid_days / data.test_days to choose)", valid, test)
    return valid, test, "quantile of the request days"


#: each source's item columns of a tag and an author, where data.cross_tag_column / cross_author_column are unset
#: (the cross features count them; the content channel takes the tag): the KuaiRand layout's (the world's, and what
#: a custom mapping maps onto), and MovieLens's first genre for both, as movies have neither
SOURCE_ITEM_COLUMNS = {"movielens-100k": ("genre", "genre"), "movielens-1m": ("genre", "genre")}
DEFAULT_ITEM_COLUMNS = ("tag", "author_id")


def check_min_count(min_count: int, train_items: pd.Series, source: str) -> None:
    """Refuse a data.min_count that leaves fewer than two item ids in the vocabulary (every item would share the
    out-of-vocabulary code: the towers' click histories could not tell items apart); warn where the items below it
    hold more than half of the train impressions. train_items: the item id of each train impression."""
    counts = train_items.value_counts()
    kept = counts[counts >= min_count]
    if len(kept) < 2:
        raise DataValidationError(
            f"data.min_count = {min_count}: {len(kept)} item id(s) of the train split ({source}) reach it (the most "
            f"shown item has {int(counts.max()) if len(counts) else 0:,} train impressions), so every item id would "
            "fall to the out-of-vocabulary code; lower data.min_count")
    share = 1.0 - kept.sum() / counts.sum()
    if share > 0.5:
        log.warning("data.min_count = %d: items shown fewer times hold %.0f%% of the train impressions; their ids "
                    "all share the out-of-vocabulary code", min_count, 100 * share)


def choose_item_columns(c: DataSection, ds) -> dict:
    """{"tag", "author": the item columns of data.cross_tag_column / cross_author_column, each unset one the
    source's own (:data:`SOURCE_ITEM_COLUMNS`; "": none), "chosen_by": {key: how}}. A column set in the config that
    the items lack raises naming the key, before any work; an unset one the items lack is "" (none: its user x
    column cross features are left out, with a warning where there are cross features; the content channel, which
    takes the tag, is then left out where channels.build is unset)."""
    own = SOURCE_ITEM_COLUMNS.get(c.source, DEFAULT_ITEM_COLUMNS)
    out, chosen = {}, {}
    for (key, part), col in zip((("cross_tag_column", "tag"), ("cross_author_column", "author")), own):
        given = getattr(c, key)
        out[part] = col if given is None else given
        chosen[key] = "the source's own" if given is None else "config"
        if given is None and col not in ds.items.columns:
            out[part] = ""
            chosen[key] = f"the source's own {col!r}: the items have none"
            if c.cross_features:
                log.warning("data.%s unset: the items (%s) have no %r column, the %s source's own, so the user x %s "
                            "cross features are left out; map a column of yours onto %r, or set data.%s to one of "
                            "%s", key, ds.source("items"), col, c.source, part, col, key, list(ds.items.columns))
        elif out[part] and out[part] not in ds.items.columns:
            raise DataValidationError(
                f"data.{key} = {given!r}: the items ({ds.source('items')}) have no column {out[part]!r} (they have "
                f"{list(ds.items.columns)}); set data.{key} to one of them, \"\" to leave out the user x "
                f"{part} cross features, or data.cross_features = false for none at all")
    return {**out, "chosen_by": chosen}


def cross_store(c: DataSection, ds, columns: dict) -> CrossFeatureStore | None:
    """The fitted cross-feature store of data.cross_* over the item ``columns`` (:func:`choose_item_columns`); None with
    data.cross_features = false."""
    if not c.cross_features:
        return None
    return CrossFeatureStore(window_days=c.cross_window_days, tag_column=columns["tag"],
                             author_column=columns["author"]).fit(ds.impressions, ds.items)


def run(ctx: StepContext) -> StepResult:
    c: DataSection = ctx.config
    ds, world = _load_source(c, ctx.out, ctx.seed, ctx.progress)
    columns = choose_item_columns(c, ds)
    # the log's local calendar days (KuaiRand and the world, which writes its layout: Beijing; your own logs: the
    # mapping's time.utc_offset_hours)
    utc_offset = ds.utc_offset_hours
    n_logged = len(ds.impressions)
    ds = drop_last_days(ds, c.drop_last_days, utc_offset)
    try:
        valid_days, test_days, chosen = split_days(c, ds, utc_offset)
    except DataValidationError as e:
        if not c.drop_last_days:
            raise
        raise DataValidationError(f"{e} (after data.drop_last_days = {c.drop_last_days} left out the log's last "
                                  f"{c.drop_last_days} days: leave out fewer)") from None
    masks = time_split(ds, valid_days=valid_days, test_days=test_days, utc_offset_hours=utc_offset)
    check_leakage(ds, masks["train"])
    check_min_count(c.min_count, ds.impressions["item_id"][np.asarray(masks["train"])], ds.source("impressions"))
    cross = cross_store(c, ds, columns)
    # the teacher's behaviour sequence (teacher.sequence_length, carried by the step's config: DataStepConfig)
    n_seq = c.sequence_length if isinstance(c, DataStepConfig) else 0
    enc = FeatureEncoder(ds.schema, min_count=c.min_count, numeric=c.numeric,
                         history_length=n_seq).fit(ds, masks["train"], cross)
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
    tr = imp[split_col == SPLIT_CODES["train"]]
    splits = {}
    for name, m in masks.items():
        sub = imp[np.asarray(m)]
        splits[name] = {"rows": int(len(sub)), "requests": int(sub.request_id.nunique()),
                        "ctr": float(sub.click.mean()),
                        "start": pd.to_datetime(sub.time_ms.min(), unit="ms").isoformat(),
                        "end": pd.to_datetime(sub.time_ms.max(), unit="ms").isoformat()}
        if name != "train":  # cold start: what no model learned from train can know
            first = sub.drop_duplicates("request_id")
            clicks = sub[sub.click == 1]
            splits[name]["requests_of_new_users"] = (float((~first.user_id.isin(tr.user_id)).mean()) if len(first)
                                                     else None)
            splits[name]["clicks_on_new_items"] = (float((~clicks.item_id.isin(tr.item_id)).mean()) if len(clicks)
                                                   else None)
    train_events = EventHistory(tr["user_id"].to_numpy(np.int64), tr["item_id"].to_numpy(np.int64),
                                request_start_ms(tr), tr["click"].to_numpy())
    repeat_share = train_events.repeat_share(int(tr.time_ms.min()), int(tr.time_ms.max()) + 1)
    applied, why = decide_filter_seen(c.filter_seen, repeat_share)
    summary = {"source": c.source, "n_users": int(len(ds.users)), "n_items": int(len(ds.items)),
               "n_impressions": int(len(imp)), "n_requests": int(imp.request_id.nunique()),
               "ctr": float(imp.click.mean()),
               "random_share": float(imp.is_rand.mean()), "n_cat_columns": len(spec.cat_names),
               "split_days": {"valid_days": valid_days, "test_days": test_days, "chosen_by": chosen,
                              "utc_offset_hours": utc_offset,
                              "drop_last_days": c.drop_last_days,
                              "dropped_impressions": n_logged - int(len(imp))},
               "n_num_columns": len(spec.num_names),
               # share of train clicks on an item the same user had been shown before: re-consumption
               "repeat_click_share": repeat_share,
               "filter_seen": {"applied": applied, "why": why},
               "sides": {s: len(spec.cat_index(s)) + len(spec.num_index(s)) for s in SIDES},
               "history_attributes": enc.history_attrs_,
               # the item columns of a tag and an author (the cross features', the content channel's tag)
               "item_columns": columns}
    A.write_json(ctx.out / "summary.json", {"summary": summary, "splits": splits})
    outputs.append("summary.json")
    metrics = {"summary": summary, "splits": splits}
    if world is not None:  # wall times go to the manifest only, so that summary.json is reproducible
        metrics["world_seconds"] = world.summary().get("seconds")
    return StepResult(outputs, metrics,
                      f"{len(imp):,} impressions, {len(ds.users):,} users, {len(ds.items):,} items")
