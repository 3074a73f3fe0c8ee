"""Checks of a pipeline config against its data, known only once the data step is done (ran or skipped): they run
before any later step, so an impossible size or an unlearnable split is named before training starts."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import artifacts as A
from ..config import ConfigError
from ..data.schema import DataValidationError
from ..index.factory import parse_factory
from .channels import channels_to_build
from .config import EMPTIED_BY_SEEN_FILTER, PipelineConfig

log = logging.getLogger(__name__)


def check_against_data(cfg: PipelineConfig, data_dir: Path,
                       steps: tuple[str, ...] = ("teacher", "ranklog", "index", "replay")) -> list[str]:
    """Raise ConfigError / DataValidationError for what cannot work on the data of ``data_dir`` (naming the keys and
    the data's sizes); log and return warnings for what works but misleads (a stage that keeps the whole corpus).
    steps: the steps that will run (the keys of the others are not checked).

    Errors: replay.n_retrieve (>= n_prerank >= k) above the number of items; an IVF factory with more lists than
    items; a train or valid split whose clicks are all 0 or all 1 (nothing to learn or to stop on); ranklog.channels,
    replay.channels or replay.channel_quotas naming a channel the channels step leaves out on these data (the
    user's recent items where seen items are filtered, content where the items have no tag column).
    Warnings: a stage size >= the corpus (its recall is trivially 1), ranklog.n_candidates or index.k above it
    (cut to the corpus)."""
    summary = A.read_json(data_dir / "summary.json")
    n_items = int(summary["summary"]["n_items"])
    splits = summary["splits"]
    for part in ("train", "valid") if "teacher" in steps else ():
        ctr = splits[part]["ctr"]
        if ctr in (0.0, 1.0):
            raise DataValidationError(
                f"{summary['summary']['source']} data: the {part} split ({splits[part]['rows']:,} impressions) has "
                f"{'no click' if ctr == 0.0 else 'only clicks'}: the teacher cannot "
                f"{'learn' if part == 'train' else 'be early-stopped'} from one class; check the click column "
                "or choose other split days (data.valid_days / data.test_days)")
    r = cfg.replay
    if "replay" in steps and r.n_retrieve > n_items:
        raise ConfigError(
            f"replay.n_retrieve = {r.n_retrieve} is more than the {n_items:,} items of the data: set "
            f"replay.n_retrieve <= {n_items} (and k <= n_prerank <= n_retrieve: replay.k = {r.k}, "
            f"replay.n_prerank = {r.n_prerank})")
    # what the channels step leaves out of its default list on these data (channels_to_build); a later key that
    # names one would fail only at its step
    filtered = summary["summary"].get("filter_seen", {})
    tag = (summary["summary"].get("item_columns") or {"tag": "tag"})["tag"]  # a run from before: its config's tag
    left_out = channels_to_build(cfg.channels, bool(filtered.get("applied")), filtered.get("why", ""), tag)[1] \
        if cfg.channels.build is None else {}
    why = {**{n: f"the data step filters seen items ({filtered.get('why')}), which drops every item it proposes; "
                 "leave it out, or set data.filter_seen = false" for n in EMPTIED_BY_SEEN_FILTER},
           "content": "the items have no tag column for its categories; leave it out, or set channels.content_column "
                      "to an item column"}
    named_by = (("ranklog.channels", cfg.ranklog.channels, "ranklog"), ("replay.channels", r.channels, "replay"),
                ("replay.channel_quotas", r.channel_quotas, "replay"))
    for key, named, step in named_by:
        out = [n for n in named or () if n in left_out and step in steps]
        if out:
            raise ConfigError(f"{key} names {out[0]!r}, which the channels step leaves out here: {why[out[0]]}")
    if "index" in steps and cfg.index.factory is not None:
        spec = parse_factory(cfg.index.factory, cfg.students.tower.out_dim)
        if spec.get("nlist", 0) > n_items:
            raise ConfigError(f"index.factory = {cfg.index.factory!r}: {spec['nlist']} inverted lists for "
                              f"{n_items:,} items; use at most {n_items} lists (or 'Flat' for a small corpus)")
    warnings = []
    for key, size in (("replay.n_retrieve", r.n_retrieve), ("replay.n_prerank", r.n_prerank), ("replay.k", r.k)):
        if "replay" in steps and size >= n_items:
            warnings.append(f"{key} = {size} keeps all {n_items:,} items: that stage's recall is trivially 1; "
                            "choose a smaller size for a meaningful replay")
    if "ranklog" in steps and cfg.ranklog.n_candidates > n_items:
        warnings.append(f"ranklog.n_candidates = {cfg.ranklog.n_candidates} is more than the {n_items:,} items: "
                        f"each list holds at most {n_items} candidates")
    if "index" in steps and cfg.index.k > n_items:
        warnings.append(f"index.k = {cfg.index.k} is more than the {n_items:,} items: the index sweep measures "
                        f"recall@{n_items}")
    for w in warnings:
        log.warning("%s", w)
    return warnings
