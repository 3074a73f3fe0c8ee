"""The rank log's candidates drawn from the retrieval channels: slot counts, sources, leak-freedom, config, re-runs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade import artifacts as A
from cascade.arrays import PAD
from cascade.channels import ItemCFChannel, PopularChannel, RecentChannel, load_channels, saved_channel_names
from cascade.config import ConfigError
from cascade.data.history import EventHistory
from cascade.data.requests import request_start_ms, requests_frame, to_requests
from cascade.distill.ranklog import RankLog
from cascade.pipeline import load_config, run_pipeline
from cascade.pipeline.channels import channels_to_build
from cascade.pipeline.config import ChannelsSection, RankLogSection
from cascade.pipeline.ranklog import (
    candidate_lists_with_sources,
    channel_lists,
    rank_log_inputs,
    ranklog_channels,
    source_names,
)
from cascade.run_data import RunData
from cascade.serve.cascade import union_channels
from worlds import tiny_channels

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


class FixedChannel:
    """A stub channel proposing the same item ids, in order, to every request (PAD beyond them)."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, np.int64)

    def select(self, requests, candidates, n):
        row = np.full(n, PAD, np.int64)
        row[:min(n, len(self.ids))] = self.ids[:n]
        return np.tile(row, (len(requests), 1)), np.zeros((len(requests), n), np.float32)


def _no_repeats(c: np.ndarray) -> bool:
    s = np.sort(np.where(c < 0, -np.arange(1, c.shape[1] + 1)[None, :], c), axis=1)  # pads become distinct
    return bool((s[:, 1:] != s[:, :-1]).all())


def _two_requests(data):
    """Two train requests, the first with impressed items I0, I9, I9 (item ids of the data), the second none."""
    frame = requests_frame(data.split_impressions("train"), data.context_names).iloc[:2].reset_index(drop=True)
    ids = data.item_ids
    rid = int(frame.request_id[0])
    imp = pd.DataFrame({"request_id": [rid] * 3, "item_id": [ids[0], ids[9], ids[9]], "position": [0, 1, 2]})
    return frame, imp, data.tower_inputs(frame), ids


def test_hand_worked_slots_impressed_then_channels_then_samples(tiny_data):
    frame, imp, inputs, ids = _two_requests(tiny_data)
    row = inputs.item_rows  # item id -> the log's item row
    # a = I0 I1 I2 I3 I4 ..., b = I1 I6 I7 I8 ...; equal quotas interleave a0 b0 a1 b1 ... (ties: a first):
    # I0(a) I1(b) [I1 again] I6(b) I2(a) I7(b) I3(a) I8(b) ...
    chans = {"a": FixedChannel(ids[[0, 1, 2, 3, 4, 5]]), "b": FixedChannel(ids[[1, 6, 7, 8, 10, 11]])}
    cands, src = candidate_lists_with_sources(tiny_data, frame, imp, inputs, 10, 0.5, np.random.default_rng(0),
                                              chans, 0.5)
    names = source_names(chans, 0.5)
    assert names == ["impressed", "a", "b", "sample"]
    # request 0: impressed I0, I9 (the repeat once); 10 - 2 = 8 free slots, floor(0.5 * 8 + 0.5) = 4 from the
    # channels: the merged list less I0 -> I1(b) I6(b) I2(a) I7(b); then 4 samples
    assert cands[0, :6].tolist() == row(ids[[0, 9, 1, 6, 2, 7]]).tolist()
    assert src[0].tolist() == [0, 0, 2, 2, 1, 2, 3, 3, 3, 3]
    # request 1: nothing impressed; floor(0.5 * 10 + 0.5) = 5 from the channels: I0(a) I1(b) I6(b) I2(a) I7(b)
    assert cands[1, :5].tolist() == row(ids[[0, 1, 6, 2, 7]]).tolist()
    assert src[1].tolist() == [1, 2, 2, 1, 2, 3, 3, 3, 3, 3]
    n_real = len(tiny_data.item_ids)
    assert (cands >= 0).all() and (cands < n_real).all()  # full lists, never the OOV row (the last one)
    assert _no_repeats(cands)
    # 3 of 7 free slots: floor(0.43 * 8 + 0.5) = 3 and floor(0.43 * 10 + 0.5) = 4
    _, src3 = candidate_lists_with_sources(tiny_data, frame, imp, inputs, 10, 0.5, np.random.default_rng(0),
                                           chans, 0.43)
    assert ((src3 == 1) | (src3 == 2)).sum(axis=1).tolist() == [3, 4]


def test_short_channels_leave_their_slots_to_samples(tiny_data):
    frame, imp, inputs, ids = _two_requests(tiny_data)
    # one channel with two items, one of them impressed in request 0: all free slots are asked for (share 1)
    chans = {"c": FixedChannel(ids[[9, 4]])}
    cands, src = candidate_lists_with_sources(tiny_data, frame, imp, inputs, 10, 0.5, np.random.default_rng(1),
                                              chans, 1.0)
    assert src[0].tolist() == [0, 0, 1] + [2] * 7  # I9 is impressed: only I4 from the channel
    assert src[1].tolist() == [1, 1] + [2] * 8
    assert cands[0, 2] == inputs.item_rows(ids[[4]])[0]
    assert (cands >= 0).all() and _no_repeats(cands)


def _real_channels(data, history: EventHistory):
    """popular, recent and itemcf reading ``history`` (itemcf's similarities fitted once, on the train split)."""
    cf = ItemCFChannel(history, neighbours=20).fit(data.split_history("train"), data.item_ids)
    return {"popular": PopularChannel(history, 1.0), "recent": RecentChannel(history), "itemcf": cf}


def test_real_channels_fill_about_their_share_deterministically(tiny_data):
    cfg = RankLogSection(max_requests=300, n_candidates=40, channel_share=0.5)
    chans = _real_channels(tiny_data, tiny_data.history)
    frame, cands, item_ids, src = rank_log_inputs(tiny_data, cfg, seed=3, channels=chans)
    assert cands.shape == (300, 40) and src.dtype == np.int8
    assert (cands >= 0).all() and (cands < len(tiny_data.item_ids)).all() and _no_repeats(cands)
    n_imp = (src == 0).sum(axis=1)
    from_channels = ((src >= 1) & (src <= 3)).sum(axis=1)
    want = np.floor(0.5 * (40 - n_imp) + 0.5)
    # impressed first, then channel items, then samples (sources never go back)
    kind = np.select([src == 0, src <= 3], [0, 1], 2)  # impressed, a channel, a sample
    assert (np.diff(kind, axis=1) >= 0).all()
    assert (from_channels <= want).all()
    # most-popular proposes a full list once a day of clicks is logged: almost every list gets its whole share
    assert (from_channels == want).mean() > 0.95
    again = rank_log_inputs(tiny_data, cfg, seed=3, channels=chans)
    np.testing.assert_array_equal(again[1], cands)
    np.testing.assert_array_equal(again[3], src)
    other = rank_log_inputs(tiny_data, cfg, seed=4, channels=chans)
    assert not np.array_equal(other[1], cands)
    # the channels' lists in chunks of 32 requests, two chunks side by side: the lists of one call over all
    requests = to_requests(frame, tiny_data.context_names)
    whole = channel_lists(chans, requests, 25, chunk=len(frame))
    side_by_side = channel_lists(chans, requests, 25, chunk=32, workers=2)
    assert (whole[0] != PAD).sum() > 1000
    for a, b in zip(whole, side_by_side):
        np.testing.assert_array_equal(a, b)


def test_a_later_event_leaves_earlier_lists_unchanged(tiny_data):
    # The requests before time t: their lists (channel items and samples) are the same whether or not the history
    # holds a burst of clicks at t on one item by every user; a request after t sees the burst.
    imp = tiny_data.impressions
    h = tiny_data.history
    frame = requests_frame(tiny_data.split_impressions("train"), tiny_data.context_names)
    t = int(np.quantile(frame.time_ms, 0.5))
    early = frame[frame.time_ms < t].iloc[::7].reset_index(drop=True)
    late = frame[frame.time_ms > t + 3_600_000].iloc[::7].reset_index(drop=True)
    users = np.unique(imp.user_id.to_numpy(np.int64))
    planted = int(tiny_data.item_ids[-1])
    burst = EventHistory(np.r_[imp.user_id.to_numpy(np.int64), users],
                         np.r_[imp.item_id.to_numpy(np.int64), np.full(len(users), planted)],
                         np.r_[request_start_ms(imp), np.full(len(users), t)],
                         np.r_[imp.click.to_numpy(), np.ones(len(users), bool)])

    def lists(fr, history):
        inputs = tiny_data.tower_inputs(fr)
        return candidate_lists_with_sources(tiny_data, fr, tiny_data.split_impressions("train"), inputs, 40, 0.5,
                                            np.random.default_rng(5), _real_channels(tiny_data, history), 0.5)

    before, after = lists(early, h), lists(early, burst)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    # the test can fail: later requests do get the planted item from the channels
    row = tiny_data.tower_inputs(late).item_rows(np.array([planted]))[0]
    got = lists(late, burst)
    assert ((got[0] == row) & (got[1] >= 1) & (got[1] <= 3)).any(axis=1).mean() > 0.9
    assert ((lists(late, h)[0] == row) & (lists(late, h)[1] >= 1)).any(axis=1).mean() < 0.5


# ------------------------------------------------------------------------------------------------ config


def _cfg(*sets: str):
    return load_config(TINY, ["run.runs_dir='unused'", *sets])


def test_config_defaults_and_errors():
    c = _cfg()
    assert c.ranklog.channels is None and c.ranklog.channel_share == 0.5
    assert c.channels.build is None and c.channels.names == ("popular", "recent", "itemcf", "content", "als")
    assert c.ranklog.channels_of(c.channels.names) == c.channels.names
    assert _cfg("ranklog.channel_share=0").ranklog.channels_of(c.channels.names) == ()
    assert _cfg("ranklog.channels=['popular']").ranklog.channels_of(c.channels.names) == ("popular",)
    with pytest.raises(ConfigError, match=r"ranklog.channels names \['als'\], which the channels step does not "
                                          r"build \(channels.build = \['popular', 'recent'\]\)"):
        _cfg(*tiny_channels("popular", "recent"), "ranklog.channels=['popular', 'als']")
    with pytest.raises(ConfigError, match=r"ranklog.channel_share = 0.5 but no channel to draw from"):
        _cfg(*tiny_channels(), "students.popularity_prior_grid=[0]")
    with pytest.raises(ConfigError, match=r"ranklog.channel_share = 0.3 but no channel to draw from"):
        _cfg("ranklog.channels=[]", "ranklog.channel_share=0.3")
    with pytest.raises(ConfigError, match=r"ranklog.channels = \('popular',\): names channels but "
                                          r"ranklog.channel_share = 0 takes nothing from them"):
        _cfg("ranklog.channels=['popular']", "ranklog.channel_share=0")
    with pytest.raises(ConfigError, match=r"ranklog.channel_share = 1.5: must be in \[0, 1\]"):
        _cfg("ranklog.channel_share=1.5")
    with pytest.raises(ConfigError, match=r"ranklog.channels = .*must name distinct channels"):
        _cfg("ranklog.channels=['two_tower']")
    assert _cfg(*tiny_channels(), "ranklog.channel_share=0",
                "students.popularity_prior_grid=[0]").ranklog.channels_of(()) == ()
    # the towers' popularity prior reads the popular channel: without it, a grid with a weight above 0 is refused
    with pytest.raises(ConfigError, match=r"students.popularity_prior_grid = \[0.0, 0.25, 0.5, 1.0, 2.0, 4.0\] "
                                          r"tries a recent-popularity prior, which reads the popular channel, but "
                                          r"channels.build = \['recent'\] does not build it"):
        _cfg(*tiny_channels("recent"))
    with pytest.raises(ConfigError, match=r"popularity_prior_grid.*must be values >= 0 that include 0 \(the "
                                          r"tower without a prior\)"):
        _cfg("students.popularity_prior_grid=[1.0]")


# ------------------------------------------------------------------------------------------------ the step


def test_step_records_sources_and_reruns_on_a_channels_change(tmp_path, caplog):
    sets = [f"run.runs_dir={json.dumps(str(tmp_path))}", "ranklog.max_requests=200", "ranklog.n_candidates=30",
            *tiny_channels("popular", "recent"), "teacher.train.epochs=1", "teacher.lightgbm_trees=5"]
    res = run_pipeline(load_config(TINY, sets), progress=False, until="ranklog")
    step = res["ranklog"]["manifest"]
    share = step["metrics"]["source_share"]
    assert list(share) == ["impressed", "popular", "recent", "sample"]
    assert abs(sum(share.values()) - 1.0) < 1e-9
    # half the free slots from the channels: their share equals the samples' within rounding (0.5 slot a list)
    assert abs(share["popular"] + share["recent"] - share["sample"]) < 0.5 / 30 + 1e-9
    log = RankLog(tmp_path / "tiny" / "ranklog" / "log")
    assert log.source_names == ["impressed", "popular", "recent", "sample"]
    assert log.sources.shape == log.items.shape and (log.sources[~log.mask] == -1).all()
    assert (log.sources[log.mask] >= 0).all()
    counts = np.bincount(log.sources[log.mask], minlength=4) / log.mask.sum()
    np.testing.assert_allclose(counts, list(share.values()))
    assert A.read_json(tmp_path / "tiny" / "ranklog" / "log" / "manifest.json")["source_share"] == share
    # a change of the channels step re-runs the rank log (its input changed), the teacher is kept
    with caplog.at_level(logging.INFO, logger="cascade.pipeline.runner"):
        res = run_pipeline(load_config(TINY, [*sets, "channels.popular_window_days=[2.0]"]), progress=False,
                           until="ranklog", update=True)
    assert res["teacher"]["status"] == "skipped" and res["ranklog"]["status"] == "ran"
    assert "[ranklog] running (inputs changed: new outputs of channels)" in caplog.text


# ------------------------------------------------------------------------------------------------ the seen filter


def test_seen_filter_leaves_the_recent_channel_out_or_refuses_it(tmp_path):
    """Every item "recent" proposes was shown to the user before, so where seen items are filtered it returns
    nothing: the default channel list leaves it out (and says why, down to the report), a list that names it is
    refused, before any work where the config already says so."""
    for name, sets in (("channels.build", tiny_channels("popular", "recent")),
                       ("ranklog.channels", ["ranklog.channels=['recent']"]),
                       ("replay.channels", ["replay.channels=['recent']"])):
        with pytest.raises(ConfigError, match=rf"{re.escape(name)} names \['recent'\], but data.filter_seen = "
                                              r"true drops every item the user was shown before.*return nothing"):
            _cfg("data.filter_seen=true", *sets)
    _cfg("data.filter_seen=false", *tiny_channels("popular", "recent"))  # no filter: fine
    with pytest.raises(ConfigError, match=r"replay.channels names \['als'\], which the channels step does not "
                                          r"build \(channels.build = \['popular'\]\)"):
        _cfg(*tiny_channels("popular"), "replay.channels=['popular', 'als']")
    sets = [f"run.runs_dir={json.dumps(str(tmp_path))}", "data.filter_seen=true"]
    run_pipeline(load_config(TINY, sets), progress=False, until="channels")
    folder = tmp_path / "tiny" / "channels"
    assert saved_channel_names(folder) == ["als", "content", "itemcf", "popular"]
    left_out = A.read_manifest(folder)["metrics"]["left_out"]
    assert list(left_out) == ["recent"] and "seen filter drops (data.filter_seen = true)" in left_out["recent"]
    assert union_channels(None, saved_channel_names(folder)) == ("popular", "itemcf", "als", "content")
    assert union_channels(("content", "popular"), saved_channel_names(folder)) == ("content", "popular")
    with pytest.raises(ValueError, match=r"no saved channel \['recent'\] .*; recent: left out: it proposes only "
                                         r"items the user was shown before"):
        load_channels(folder, RunData(tmp_path / "tiny" / "data").history, ["recent"])
    with pytest.raises(ValueError, match=r"ranklog.channels names \['recent'\], which the channels step did not "
                                         r"build \(it built \['als', 'content', 'itemcf', 'popular'\]; recent: left "
                                         r"out: it proposes only items the user was shown before"):
        ranklog_channels(RankLogSection(channels=("popular", "recent")), folder, RunData(tmp_path / "tiny" / "data"))
    # "auto" decides on the data: a list that names "recent" is refused by the step, naming the decision
    c = ChannelsSection(build=("popular", "recent"))
    with pytest.raises(ValueError, match=r"channels.build names \['recent'\], but the data step filters seen items "
                                         r"\(auto: 0.5% of train clicks\)"):
        channels_to_build(c, True, "auto: 0.5% of train clicks")
    assert channels_to_build(c, False, "auto: 9% of train clicks") == (("popular", "recent"), {})
    assert channels_to_build(ChannelsSection(), True, "x")[0] == ("popular", "itemcf", "content", "als")


def test_a_request_that_showed_more_items_than_a_list_holds_is_cut_and_the_cut_is_said(tiny_data, caplog):
    """Request 0 shows I0..I11 (12 distinct items, I5 twice) where a list holds 10: the first 10 by position are
    kept, and the log says how many requests and what share of the impressed items were left out (2 of 12)."""
    frame, _, inputs, ids = _two_requests(tiny_data)
    shown = ids[[0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11]]
    imp = pd.DataFrame({"request_id": int(frame.request_id[0]), "item_id": shown, "position": range(len(shown))})
    caplog.set_level("WARNING", logger="cascade.pipeline.ranklog")
    cands, src = candidate_lists_with_sources(tiny_data, frame, imp, inputs, 10, 0.5, np.random.default_rng(0))
    assert cands[0].tolist() == inputs.item_rows(ids[:10]).tolist() and (src[0] == 0).all()
    assert ("rank log: 1 of 2 requests showed more than 10 distinct items (ranklog.n_candidates, at most the "
            "corpus); their lists keep the first 10 by position, and 16.7% of the impressed items are left out") \
        in caplog.text
    caplog.clear()
    candidate_lists_with_sources(tiny_data, frame, imp.iloc[:11], inputs, 10, 0.5, np.random.default_rng(0))
    assert "rank log:" not in caplog.text  # 10 distinct items (I5 twice): nothing is cut
