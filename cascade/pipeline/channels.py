"""The channels step: the classic retrieval channels, built from the train period and tuned on validation.

Each channel of ``channels.build`` is fitted on the train split's events only (so no later event shapes it) and
its settings are chosen from a small grid by click-recall@``tune_k`` on the validation judge
(:mod:`cascade.pipeline.judge`). The chosen channels are saved (``<name>/channel.json`` and ``channel.npz``) with
the whole grid in the manifest; the chosen ALS model also gets a FAISS index over its item factors
(``als/index/``), which serves its lists. The replay serves each channel alone as a reference baseline and with the
two-tower in the "distilled+channels" cascade, which ``load_cascade`` serves too
(:func:`cascade.channels.load_channels` reads them back).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from ..channels import (
    CHANNELS,
    ALSChannel,
    Channel,
    ContentChannel,
    EaseChannel,
    ItemCFChannel,
    PopularChannel,
    RecentChannel,
)
from ..config import ConfigError
from ..data.history import EventHistory
from ..run_data import RunData, item_columns
from .config import EMPTIED_BY_SEEN_FILTER, ChannelsSection
from .judge import Judge, validation_judge
from .runner import StepContext, StepResult

log = logging.getLogger(__name__)


def candidates(c: ChannelsSection, name: str, history: EventHistory, seed: int) -> list[Channel]:
    """The grid of one channel's settings (unfitted)."""
    if name == "popular":
        return [PopularChannel(history, w, int(c.refresh_minutes * 60_000)) for w in c.popular_window_days]
    if name == "recent":
        return [RecentChannel(history)]
    if name == "itemcf":
        return [ItemCFChannel(history, c.itemcf_neighbours, c.history_length, c.history_decay)]
    if name == "content":
        return [ContentChannel(history, c.history_length, c.history_decay)]
    if name == "ease":
        return [EaseChannel(history, lam) for lam in c.ease_lambdas]
    if name == "als":
        return [ALSChannel(history, f, r, a, c.als_iterations, seed)
                for f, r, a in itertools.product(c.als_factors, c.als_regularization, c.als_alpha)]
    raise ValueError(f"channels.build: unknown channel {name!r} (known: {sorted(CHANNELS)})")


def content_column(c: ChannelsSection, data: RunData) -> str:
    """The item column of the content channel's categories: channels.content_column, unset the data step's tag
    column (:func:`~cascade.run_data.item_columns`); one the items lack, or none, raises naming the key."""
    col = item_columns(data.manifest)["tag"] if c.content_column is None else c.content_column
    if not col or col not in data.items.columns:
        shown = (f"channels.content_column = {col!r}" if c.content_column is not None else
                 f"channels.content_column unset: the data step's tag column {col!r}")
        raise ConfigError(f"{shown} is not an item column (items have {sorted(data.items.columns)}); set "
                         "channels.content_column to one of them, or leave 'content' out of channels.build")
    return col


def fit_channel(ch: Channel, data: RunData, train: EventHistory, category_column: str | None) -> Channel:
    """``ch`` fitted on ``train``; a content channel's categories from the items' ``category_column``."""
    if isinstance(ch, ContentChannel):
        codes = data.items.set_index("item_id")[category_column].reindex(data.item_ids)
        return ch.fit(train, data.item_ids, np.asarray(codes.factorize()[0], np.int64))
    return ch.fit(train, data.item_ids)


def tune(c: ChannelsSection, name: str, data: RunData, train: EventHistory, judge: Judge, seed: int,
         category_column: str | None) -> tuple[Channel, list[dict]]:
    """The channel of the grid with the best validation click-recall@tune_k, and every grid point's score
    (``category_column``: the content channel's, :func:`content_column`)."""
    best, best_score, table = None, -np.inf, []
    for ch in candidates(c, name, data.history, seed):
        fit_channel(ch, data, train, category_column)
        score = float(np.nanmean(judge.recall(judge.lists(ch, c.tune_k), c.tune_k)))
        table.append({"params": ch.params(), f"valid_click_recall@{c.tune_k}": score})
        if score > best_score:
            best, best_score = ch, score
    log.info("channels: %s chose %s (valid click-recall@%d %.4f)", name, best.params(), c.tune_k, best_score)
    return best, table


def channels_to_build(c: ChannelsSection, filtered: bool, why: str,
                      tag_column: str = "tag") -> tuple[tuple[str, ...], dict[str, str]]:
    """(the channels to build, {left-out channel: why}) given whether the data step filters seen items (``why``:
    its reason) and the data step's tag column (``tag_column``; "": the items have none). Left out of the default
    list: a channel the filter empties (refused where ``build`` names it: it would return nothing), and content
    where neither the tag column nor channels.content_column gives its categories (:func:`content_column` refuses
    it where ``build`` names it)."""
    emptied = [n for n in c.names if filtered and n in EMPTIED_BY_SEEN_FILTER]
    if emptied and c.build is not None:
        raise ValueError(f"channels.build names {emptied}, but the data step filters seen items ({why}), which "
                         f"drops every item {emptied} proposes: it would return nothing; leave it out of "
                         "channels.build, or set data.filter_seen = false")
    left_out = {n: f"left out: it proposes only items the user was shown before, which the seen filter drops ({why})"
                for n in emptied}
    if "content" in c.names and c.build is None and c.content_column is None and not tag_column:
        left_out["content"] = ("left out: the items have no tag column for its categories (the data step's "
                               "item_columns); set channels.content_column to an item column")
    return tuple(n for n in c.names if n not in left_out), left_out


def run(ctx: StepContext) -> StepResult:
    c: ChannelsSection = ctx.config
    data = RunData(ctx.inputs["data"])
    seen, why = data.seen_filter
    names, left_out = channels_to_build(c, seen is not None, why, item_columns(data.manifest)["tag"])
    for name, reason in left_out.items():
        log.warning("channels: %s %s", name, reason)
    category = content_column(c, data) if "content" in names else None  # before any fit
    train = data.split_history("train")
    judge = validation_judge(data, c.tune_requests, ctx.seed)
    outputs, metrics, best = [], {"judge": judge.what, **({"left_out": left_out} if left_out else {})}, {}
    for name in names:
        ch, table = tune(c, name, data, train, judge, ctx.seed, category)
        metrics[name] = {"chosen": ch.params(), "grid": table}
        if isinstance(ch, ALSChannel):
            index = ch.build_index(c.als_index, c.als_index_recall, seed=ctx.seed)
            metrics[name]["index"] = {"factory": index.factory, "nprobe": index.nprobe, "recall": index.recall_,
                                      "items": index.n_items}
        outputs += [f"{name}/{f}" for f in ch.save(ctx.out / name)]
        best[name] = max(row[f"valid_click_recall@{c.tune_k}"] for row in table)
    return StepResult(outputs, metrics, f"valid click-recall@{c.tune_k}: "
                      + ", ".join(f"{n} {v:.3f}" for n, v in best.items()))

