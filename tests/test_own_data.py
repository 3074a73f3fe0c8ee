"""Your own logs, first-class (issue #17, item 1): the example in examples/own_logs, from a CSV folder to a finished
report with two commands; text ids, canonical columns picked up, cross features by column or none, no context
feature, data files in the cache key, split days chosen from the data."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade import artifacts as A
from cascade.cli import main
from cascade.config import ConfigError
from cascade.data.custom import load_custom
from cascade.data.schema import Dataset, DataValidationError, Feature, Schema
from cascade.data.split import DAY_MS, quantile_split_days, time_split
from cascade.pipeline import load_config, run_pipeline
from cascade.run_data import RunData
from cascade.serve.cascade import load_cascade, trace_requests

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_logs"
TINY = ROOT / "pipelines" / "tiny.toml"

pytestmark = pytest.mark.slow


def own_logs(tmp_path: Path) -> Path:
    """A copy of the example (tests edit their copy); the mapping's path."""
    d = tmp_path / "own_logs"
    shutil.copytree(EXAMPLE, d, ignore=shutil.ignore_patterns("__pycache__"))
    return d / "mapping.toml"


def test_the_example_files_are_what_its_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_logs", EXAMPLE / "make_logs.py")
    make_logs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_logs)
    make_logs.write(tmp_path)
    for name in ("users.csv", "items.csv", "impressions.csv"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


def test_check_prints_what_it_found(capsys):
    assert main(["data", "custom", str(EXAMPLE / "mapping.toml"), "--check"]) == 0
    found = json.loads(capsys.readouterr().out)
    imp = pd.read_csv(EXAMPLE / "impressions.csv")
    assert (found["rows"], found["users"], found["items"], found["requests"]) == (len(imp), 400, 600, 1200)
    assert found["clicks"] == int(imp["clicked"].sum()) and found["random_share"] == pytest.approx(imp.is_rand.mean())
    assert found["days"] == {"first": "2024-01-01", "last": "2024-01-20", "span": 20, "with_requests": 20}
    assert found["features"]["user"] == {"user_id": "categorical", "country": "categorical", "age": "numeric"}
    assert found["features"]["context"] == {"hour": "categorical", "weekday": "categorical"}
    split = found["suggested_split"]
    assert split["test_days"] == 2 and split["valid_days"] == 3
    assert split["set_with"] == "--set data.valid_days=3 --set data.test_days=2"


def test_text_ids_and_canonical_columns_are_read(tmp_path, caplog):
    caplog.set_level("INFO", logger="cascade.data.custom")
    ds = load_custom(EXAMPLE / "mapping.toml")
    users = pd.read_csv(EXAMPLE / "users.csv")
    imp = pd.read_csv(EXAMPLE / "impressions.csv")
    # text ids -> 0..n-1 in sorted order, the original ids kept
    assert ds.users["user_id"].tolist() == list(range(400)) and ds.users["user_key"].tolist() == sorted(users.customer)
    key_of = dict(zip(ds.items["item_id"], ds.items["item_key"]))
    first = ds.impressions.sort_values("time_ms", kind="stable").iloc[0]
    assert key_of[first["item_id"]] == imp.sort_values("ts", kind="stable").iloc[0]["sku"]
    # position / is_rand / hour carry canonical names in the file: read without a mapping entry, never ignored
    assert ds.impressions["is_rand"].mean() == pytest.approx(imp["is_rand"].mean())
    assert sorted(ds.impressions["position"].unique()) == sorted(imp["position"].unique())
    assert "column 'is_rand' is picked up as the canonical impressions.is_rand" in caplog.text
    assert set(ds.items["tag"]) == set(pd.read_csv(EXAMPLE / "items.csv")["category"])  # mapped tag = "category"


def test_two_commands_from_a_csv_folder_to_a_report(tmp_path, monkeypatch, capsys):
    """The new user's path: check the mapping, then run on top of a pipeline config (here the tiny one)."""
    toml = own_logs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "custom", str(toml), "--check"]) == 0
    assert main(["run", str(TINY), "--data", f"custom:{toml}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "own-logs"  # named after the mapping's dataset
    assert f"report: {run_dir / 'report' / 'report.html'}" in out
    summary = A.read_json(run_dir / "data" / "summary.json")["summary"]
    assert summary["source"] == "custom" and summary["n_items"] == 600
    assert summary["split_days"] == {"valid_days": 3, "test_days": 2, "chosen_by": "quantile of the request days",
                                     "utc_offset_hours": 0.0, "drop_last_days": 0, "dropped_impressions": 0}
    assert summary["random_share"] > 0.04  # the is_rand column was used
    data = RunData(run_dir / "data")
    assert {"user_tag_clicks", "user_author_clicks"} <= set(data.encoder.cross_names_)
    # serving: original ids where users see them
    data, casc = load_cascade(run_dir)
    frame = data.split_impressions("test").drop_duplicates("request_id").head(2)
    from cascade.data.requests import requests_frame, to_requests
    req = to_requests(requests_frame(frame, data.context_names), data.context_names)
    tables = trace_requests(data, casc, req, 100, 40, 10)
    assert tables[0]["item_key"].str.startswith("sku-").all()
    # an unchanged re-run does nothing; an edited data file re-runs the data step
    assert main(["run", str(TINY), "--data", f"custom:{toml}", "--no-progress"]) == 0
    assert capsys.readouterr().err.count("skipped (up to date)") == 8
    imp = pd.read_csv(toml.parent / "impressions.csv")
    imp.loc[0, "clicked"] = 1 - imp.loc[0, "clicked"]
    imp.to_csv(toml.parent / "impressions.csv", index=False)
    assert main(["run", str(TINY), "--data", f"custom:{toml}", "--no-progress"]) == 0
    assert "[data] running (" in capsys.readouterr().err


def test_a_named_source_brings_its_own_item_columns_on_any_pipeline_config(tmp_path, caplog):
    """`cascade run CONFIG --data movielens-100k:DIR`: movies have no tag or author, and with data.cross_tag_column
    / cross_author_column and channels.content_column unset the source's own column (the first genre) serves the
    cross features and the content channel, recorded by the data step and read back by RunData; a column named
    in the config that the items lack is refused naming the key, and so is an unset one a custom log lacks."""
    from worlds import write_ml100k

    d = tmp_path / "ml-100k"
    write_ml100k(d)
    runs = tmp_path / "runs"

    def cfg(*overrides: str, spec: str = f"movielens-100k:{d}"):
        return load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", *overrides], data_spec=spec)

    run_pipeline(cfg(), progress=False, until="channels")
    summary = A.read_json(runs / "movielens-100k" / "data" / "summary.json")["summary"]
    assert summary["item_columns"] == {"tag": "genre", "author": "genre", "chosen_by": {
        "cross_tag_column": "the source's own", "cross_author_column": "the source's own"}}
    data = RunData(runs / "movielens-100k" / "data")
    assert (data.cross.tag_column, data.cross.author_column) == ("genre", "genre")
    assert {"user_tag_clicks", "user_author_clicks"} <= set(data.encoder.cross_names_)
    # the content channel's categories are the movies' genres (codes in the order of first appearance over the
    # sorted item ids)
    assert "content" in A.read_manifest(runs / "movielens-100k" / "channels")["metrics"]
    content = np.load(runs / "movielens-100k" / "channels" / "content" / "channel.npz")
    np.testing.assert_array_equal(content["item_ids_"], data.item_ids)
    genres = data.items.set_index("item_id")["genre"].reindex(data.item_ids).to_numpy()
    np.testing.assert_array_equal(content["category_"], pd.factorize(genres)[0])
    with pytest.raises(DataValidationError, match=r"data.cross_tag_column = 'tag': the items .* have no column 'tag'"):
        run_pipeline(cfg("data.cross_tag_column='tag'", "run.name='bad'"), progress=False, until="data")
    # a content column the movies lack: a config error naming the key, before any channel is fitted
    with pytest.raises(ConfigError, match=r"channels.content_column = 'plot' is not an item column \(items have "):
        run_pipeline(cfg("channels.content_column='plot'", "run.name='bad-content'"), progress=False,
                     until="channels")
    assert not (runs / "bad-content" / "channels").exists()
    # a custom log whose items lack the tag column: unset, the tag's cross features are left out with a warning and
    # so is the content channel, each saying why; named, the column is refused (above)
    toml = own_logs(tmp_path)
    text = toml.read_text(encoding="utf-8")
    toml.write_text(text.replace('tag = "category"', "").replace('name = "tag"', 'name = "category"'),
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cascade.pipeline.data"):
        run_pipeline(cfg("run.name='no-tag'", spec=f"custom:{toml}"), progress=False, until="channels")
    assert "data.cross_tag_column unset: the items" in caplog.text and "have no 'tag' column" in caplog.text
    summary = A.read_json(runs / "no-tag" / "data" / "summary.json")["summary"]
    assert summary["item_columns"]["tag"] == "" and summary["item_columns"]["author"] == "author_id"
    assert summary["item_columns"]["chosen_by"]["cross_tag_column"] == "the source's own 'tag': the items have none"
    names = RunData(runs / "no-tag" / "data").encoder.cross_names_
    assert "user_tag_clicks" not in names and "user_author_clicks" in names
    channels = A.read_manifest(runs / "no-tag" / "channels")["metrics"]
    assert "content" not in channels and "the items have no tag column" in channels["left_out"]["content"]


def test_cross_features_by_column_or_none_and_no_context_feature(tmp_path):
    toml = own_logs(tmp_path)
    runs = tmp_path / "runs"

    def cfg(*overrides: str, mapping: Path = toml):
        return load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", *overrides],
                           data_spec=f"custom:{mapping}")

    run_pipeline(cfg("data.cross_tag_column=''", "run.name='no-tag'"), progress=False, until="data")
    names = RunData(runs / "no-tag" / "data").encoder.cross_names_
    assert "user_tag_clicks" not in names and "user_author_clicks" in names and "item_ctr" in names
    run_pipeline(cfg("data.cross_features=false", "run.name='no-cross'"), progress=False, until="data")
    assert RunData(runs / "no-cross" / "data").spec.num_index("cross") == []
    # items without the default tag column: a clear error naming the key, before any work
    with pytest.raises(DataValidationError, match=r"data.cross_tag_column = 'colour': the items .* have no column "
                                                  r"'colour'"):
        run_pipeline(cfg("data.cross_tag_column='colour'", "run.name='bad'"), progress=False, until="data")
    # no context feature at all: the whole pipeline and serving work
    text = toml.read_text(encoding="utf-8")
    bare = toml.parent / "bare.toml"
    bare.write_text(text[: text.index('[[features]]\nname = "hour"')], encoding="utf-8")
    run_pipeline(cfg("run.name='no-context'", mapping=bare), progress=False)
    data, casc = load_cascade(runs / "no-context")
    assert data.context_names == []
    from cascade.data.requests import Requests
    res = casc.recommend(Requests(data.user_ids[:3], np.full(3, data.impressions.time_ms.max()), {}), 100, 40, 10)
    assert res.errors == [None] * 3 and (res.items >= 0).all()


def test_a_backtest_drops_the_last_days_before_the_split(tmp_path):
    toml = own_logs(tmp_path)
    runs = tmp_path / "runs"

    def cfg(*overrides: str):
        return load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", "data.valid_days=2", "data.test_days=2",
                                  *overrides], data_spec=f"custom:{toml}")

    run_pipeline(cfg("run.name='whole'"), progress=False, until="data")
    run_pipeline(cfg("run.name='earlier'", "data.drop_last_days=3"), progress=False, until="data")
    whole, earlier = (A.read_json(runs / n / "data" / "summary.json") for n in ("whole", "earlier"))
    imp = {n: pd.read_parquet(runs / n / "data" / "impressions.parquet") for n in ("whole", "earlier")}
    day = {n: (imp[n].groupby("request_id").time_ms.transform("min") // DAY_MS) for n in imp}
    # the kept log is the whole log's requests that start up to 3 days before its last day, row for row
    kept = imp["whole"][(day["whole"] <= day["whole"].max() - 3).to_numpy()]
    assert imp["earlier"].drop(columns="split").equals(kept.drop(columns="split").reset_index(drop=True))
    assert earlier["summary"]["split_days"]["drop_last_days"] == 3
    assert earlier["summary"]["split_days"]["dropped_impressions"] == len(imp["whole"]) - len(kept) > 0
    # the test period is the last 2 days of what is left: it ends 3 days before the whole log's
    test_days = {n: day[n][(imp[n].split == 2).to_numpy()] for n in imp}
    assert test_days["earlier"].max() == test_days["whole"].max() - 3
    assert test_days["earlier"].nunique() <= 2 and whole["summary"]["split_days"]["dropped_impressions"] == 0
    with pytest.raises(Exception, match="drop_last_days.*must be an integer >= 0"):
        cfg("data.drop_last_days=-1")
    # a backtest that leaves too few days to split: the message names the key that left them out
    short = load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", "run.name='short'",
                               "data.drop_last_days=18"], data_spec=f"custom:{toml}")
    with pytest.raises(DataValidationError, match=r"the requests span \d calendar day\(s\).* \(after "
                                                  r"data.drop_last_days = 18 left out the log's last 18 days: leave "
                                                  r"out fewer\)"):
        run_pipeline(short, progress=False, until="data")


def test_split_days_by_quantile_on_sparse_logs():
    # requests on days 0..2 (many), 10, 30, 31, 32, 33: the last ~10% of the requests are the test part
    days = np.array([0] * 30 + [1] * 30 + [2] * 20 + [10] * 5 + [30] * 5 + [31] * 4 + [32] * 3 + [33] * 3)
    n = len(days)
    imp = pd.DataFrame({"request_id": np.arange(n), "user_id": np.zeros(n, np.int64), "item_id": np.zeros(n, np.int64),
                        "time_ms": days * DAY_MS + 3_600_000, "position": 0, "click": np.arange(n) % 2,
                        "is_rand": 0})
    ds = Dataset(pd.DataFrame({"user_id": [0]}), pd.DataFrame({"item_id": [0]}), imp,
                 Schema((Feature("user_id", "users", "categorical", "user"),)))
    valid_days, test_days = quantile_split_days(ds)
    masks = time_split(ds, valid_days, test_days)
    # test: days 31..33 (10 of the 100 requests); valid: days 10..30 (the next 10), however sparse the days are
    assert (valid_days, test_days) == (21, 3)
    assert masks["test"].sum() == 10 and masks["valid"].sum() == 10 and masks["train"].sum() == 80
    two_days = ds.impressions.assign(time_ms=(days > 2) * DAY_MS)
    with pytest.raises(DataValidationError, match="span 2 calendar day"):
        quantile_split_days(Dataset(ds.users, ds.items, two_days, ds.schema))


def _same_load(a: Dataset, b: Dataset) -> None:
    for table in ("users", "items", "impressions"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_like=True)


def test_a_header_with_spaces_around_its_names_reads_as_the_names(tmp_path):
    """'session, customer, sku' is read as the columns the header check found (it crashed in pyarrow before)."""
    mapping = own_logs(tmp_path)
    for name in ("impressions.csv", "users.csv"):
        path = mapping.parent / name
        head, rest = path.read_text().split("\n", 1)
        path.write_text(", ".join(head.split(",")) + " \n" + rest)
    _same_load(load_custom(mapping), load_custom(EXAMPLE / "mapping.toml"))


def test_a_parquet_timestamp_column_is_read_as_the_instant_it_holds(tmp_path):
    """A time column stored as a parquet timestamp (what pandas writes for datetimes) in any unit: with a time zone
    the instant, without one the wall clock in the log's local time ([time] utc_offset_hours); [time] unit beside it
    would do nothing and is refused. Each loads exactly as the example's epoch seconds do."""
    mapping = own_logs(tmp_path)
    imp = pd.read_csv(mapping.parent / "impressions.csv")
    text = mapping.read_text()
    assert '[time]\nunit = "s"\n' in text
    want = load_custom(EXAMPLE / "mapping.toml")
    stamps = pd.to_datetime(imp["ts"], unit="s", utc=True)
    for ts, offset in ((stamps, 0), (stamps.dt.tz_convert("Asia/Tokyo").astype("datetime64[us, Asia/Tokyo]"), 0),
                       (stamps.dt.tz_convert("Etc/GMT-3").dt.tz_localize(None).astype("datetime64[ms]"), 3)):
        imp.assign(ts=ts).to_parquet(mapping.parent / "impressions.parquet")
        mapping.write_text(text.replace("impressions.csv", "impressions.parquet")
                           .replace('[time]\nunit = "s"\n', f"[time]\nutc_offset_hours = {offset}\n"))
        got = load_custom(mapping)
        if offset:  # the same instants; the log's local days are 3 hours later
            np.testing.assert_array_equal(got.impressions["time_ms"], want.impressions["time_ms"])
        else:
            _same_load(got, want)
    mapping.write_text(text.replace("impressions.csv", "impressions.parquet"))  # unit = "s" beside a timestamp
    with pytest.raises(DataValidationError, match=r"impressions.parquet: column 'ts' is a parquet timestamp "
                                                  r"\(timestamp\[ms\]\), which carries its own unit: \[time\] unit = "
                                                  r"'s' would do nothing; remove it"):
        load_custom(mapping)


def test_a_request_id_that_runs_for_days_is_refused_naming_it_and_its_lines(tmp_path):
    """A session column that names a customer, not a page view: its impressions run over the whole log, and the time
    split (which reads a request's first impression) would put later days' events in an earlier split. The run then
    failed deep in the teacher; now the loader refuses it, naming the request, its first and last lines."""
    mapping = own_logs(tmp_path)
    path = mapping.parent / "impressions.csv"
    imp = pd.read_csv(path)
    imp.loc[imp["customer"] == "c0276", "session"] = "c0276"
    imp.drop(columns="position").to_csv(path, index=False)
    rows = np.flatnonzero(imp["customer"].to_numpy() == "c0276")
    first, last = rows[np.argmin(imp["ts"].to_numpy()[rows])], rows[np.argmax(imp["ts"].to_numpy()[rows])]
    days = (imp["ts"].iloc[last] - imp["ts"].iloc[first]) / 86_400
    with pytest.raises(DataValidationError, match=(
            rf"impressions.csv line {last + 2}: request 'c0276' \(column 'session'\) runs {days:.1f} days past its "
            rf"first impression at .*impressions.csv line {first + 2}; a request is one serving call's list")):
        load_custom(mapping)
    # within a day it is one request (a page view whose impressions were logged over an hour, say)
    imp = pd.read_csv(EXAMPLE / "impressions.csv")
    one = imp["session"] == imp["session"].iloc[0]
    imp.loc[one, "ts"] = imp.loc[one, "ts"].to_numpy() + 3600 * np.arange(one.sum())
    imp.to_csv(path, index=False)
    assert load_custom(mapping).impressions["request_id"].nunique() == 1200


def test_messages_for_a_future_time_a_date_as_time_a_spaced_id_and_a_gap_fill_does_not_cover(tmp_path):
    """Four mistakes of real exports, each refused in one line that says what to do: an impression dated after today
    (it was accepted, and the suggested split spanned 27,000 days); ISO dates in the time column; an id with a space
    that the side table writes without one; a gap in a column mapped as the items' author that fill = true leaves."""
    mapping = own_logs(tmp_path)
    path = mapping.parent / "impressions.csv"
    original = path.read_text()
    imp = pd.read_csv(path)
    imp.loc[10, "ts"] = 4102448400  # 2100-01-01 01:00 UTC
    imp.to_csv(path, index=False)
    with pytest.raises(DataValidationError, match=r"impressions.csv line 12: column 'ts' holds 4102448400.0, which is "
                                                  r"2100-01-01 01:00 UTC, after today: a logged impression lies in the "
                                                  r"past"):
        load_custom(mapping)
    imp = pd.read_csv(mapping.parent / "impressions.csv")
    imp["ts"] = pd.to_datetime(imp["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    imp.to_csv(path, index=False)
    with pytest.raises(DataValidationError, match=r"column 'ts' must be float64 but line 2 holds "
                                                  r"'2024-01-01T00:25:21\+00:00', a date: give times as epoch numbers"):
        load_custom(mapping)
    path.write_text(original.replace("\ns01101,c0276,", "\ns01101, c0276,", 1))
    with pytest.raises(DataValidationError, match=r"unknown user ' c0276' .* has 'c0276': ids are compared as "
                                                  r"written, and spaces around an id are part of it"):
        load_custom(mapping)
    path.write_text(original)
    items = pd.read_csv(mapping.parent / "items.csv")
    items.loc[3, "brand"] = None
    items.to_csv(mapping.parent / "items.csv", index=False)
    mapping.write_text(mapping.read_text() + "\n[missing]\nfill = true\n")
    with pytest.raises(DataValidationError, match=r"items.csv: column 'brand' has a missing value at line 5; "
                                                  r"\[missing\] fill fills the declared features, and 'brand' is "
                                                  r"mapped as items.author_id without being one"):
        load_custom(mapping)


def test_check_names_a_feature_that_gives_the_click_away_as_run_would(tmp_path, capsys):
    """`--check` runs the data step's leakage guard on the suggested split's train rows: a post-click field declared
    on the context side is a problem there (exit 2), not only after `cascade run`'s data step."""
    mapping = own_logs(tmp_path)
    imp = pd.read_csv(mapping.parent / "impressions.csv")
    imp.assign(dwell_s=np.where(imp["clicked"] == 1, 30.0, 0.0)).to_csv(mapping.parent / "impressions.csv",
                                                                         index=False)
    mapping.write_text(mapping.read_text() + '\n[[features]]\nname = "dwell_s"\ntable = "impressions"\n'
                                             'kind = "numeric"\nside = "context"\n')
    assert main(["data", "custom", str(mapping), "--check"]) == 2
    found = json.loads(capsys.readouterr().out)
    assert len(found["problems"]) == 1
    assert "feature 'dwell_s' (side 'context') predicts the click perfectly on the train split" in found["problems"][0]
