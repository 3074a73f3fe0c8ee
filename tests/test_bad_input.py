"""Bad input: every malformed file raises DataValidationError naming the file, the column and the value."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.config import ConfigError, load_toml
from cascade.data.custom import load_custom
from cascade.data.io import assign_requests, check_time_unit, read_csv_strict, read_parquet_strict, read_table_strict
from cascade.data.kuairand import load_kuairand
from cascade.data.movielens import load_movielens_1m, load_movielens_100k
from cascade.data.schema import DataValidationError
from worlds import T0, log_row, write_log

DTYPES = {"user_id": "int64", "score": "float64", "name": "str"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raises(match_all: list[str], fn, *args, **kwargs) -> str:
    """Call fn, require a DataValidationError whose message contains every string of ``match_all``."""
    with pytest.raises(DataValidationError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for s in match_all:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def read(p: Path, **kw) -> pd.DataFrame:
    return read_csv_strict(p, ["user_id", "score", "name"], DTYPES, **kw)


def test_good_file_reads(tmp_path):
    df = read(write(tmp_path / "ok.csv", "user_id,score,name\n1,0.5,a\n2,1.5,b\n"))
    assert df["user_id"].tolist() == [1, 2] and df["score"].tolist() == [0.5, 1.5] and df["name"].tolist() == ["a", "b"]


def test_missing_file(tmp_path):
    raises(["nope.csv", "not found"], read, tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    raises(["empty.csv", "empty"], read, write(tmp_path / "empty.csv", "\n  \n"))


def test_header_only(tmp_path):
    raises(["head.csv", "no data rows"], read, write(tmp_path / "head.csv", "user_id,score,name\n"))


def test_wrong_delimiter_is_named(tmp_path):
    p = write(tmp_path / "semi.csv", "user_id;score;name\n1;0.5;a\n")
    raises(["semi.csv", "seems to use ';'"], read, p)
    p = write(tmp_path / "tab.csv", "user_id\tscore\tname\n1\t0.5\ta\n")
    raises(["tab.csv", "tab"], read, p)


def test_truncated_last_line(tmp_path):
    p = write(tmp_path / "trunc.csv", "user_id,score,name\n1,0.5,a\n2,1.5,b\n3,0.")
    # Header is line 1, so the fourth line holds the truncated row "3,0." (two fields of three).
    raises(["trunc.csv", "line 4", "2 field(s), expected 3"], read, p)


def test_missing_required_column(tmp_path):
    p = write(tmp_path / "cols.csv", "user_id,name\n1,a\n")
    raises(["cols.csv", "'score'"], read, p)


def test_text_in_numeric_column(tmp_path):
    p = write(tmp_path / "text.csv", "user_id,score,name\n1,0.5,a\n2,high,b\n")
    raises(["text.csv", "'score'", "'high'", "line 3"], read, p)
    p = write(tmp_path / "text2.csv", "user_id,score,name\n1,0.5,a\n2.5,1.0,b\n")
    raises(["text2.csv", "'user_id'", "'2.5'", "line 3"], read, p)


def test_nan_inf_negative(tmp_path):
    raises(["nan.csv", "'score'", "line 3"], read, write(tmp_path / "nan.csv", "user_id,score,name\n1,0.5,a\n2,,b\n"))
    p = write(tmp_path / "nan2.csv", "user_id,score,name\n1,NaN,a\n")
    raises(["nan2.csv", "'score'", "nan", "line 2"], read, p)
    raises(["inf.csv", "'score'", "inf"], read, write(tmp_path / "inf.csv", "user_id,score,name\n1,inf,a\n"))
    p = write(tmp_path / "neg.csv", "user_id,score,name\n1,0.5,a\n2,-3.0,b\n")
    raises(["neg.csv", "'score'", "-3.0", "line 3"], read, p, nonnegative=["score"])
    # Allowed where declared nullable: NaN comes back, inf still does not.
    df = read(write(tmp_path / "nullable.csv", "user_id,score,name\n1,,\n"), nullable=["score", "name"])
    assert np.isnan(df["score"].iloc[0]) and df["name"].isna().iloc[0]


def test_duplicate_ids(tmp_path):
    p = write(tmp_path / "dup.csv", "user_id,score,name\n1,0.5,a\n2,0.5,b\n1,0.7,c\n")
    raises(["dup.csv", "'user_id'", "duplicate id 1", "lines 2 and 4"], read, p, unique=["user_id"])


def test_parquet_reader_checks(tmp_path):
    p = tmp_path / "t.parquet"
    pd.DataFrame({"user_id": [1, 1], "score": [0.5, np.inf]}).to_parquet(p)
    raises(["t.parquet", "'score'", "inf"], read_parquet_strict, p, ["user_id", "score"])
    raises(["t.parquet", "duplicate id 1", "lines 1 and 2"], read_parquet_strict, p, ["user_id"], usecols=["user_id"],
           unique=["user_id"])
    raises(["t.parquet", "'name'"], read_parquet_strict, p, ["user_id", "name"])
    pd.DataFrame({"user_id": ["1", "x"]}).to_parquet(p)
    raises(["t.parquet", "'user_id'", "'x'", "line 2"], read_parquet_strict, p, ["user_id"], {"user_id": "int64"})


def test_multichar_separator_and_latin1(tmp_path):
    p = tmp_path / "m.dat"
    p.write_bytes("1::Caf\xe9::3\n2::Na\xefve::4\n".encode("latin-1"))
    df = read_csv_strict(p, ["a", "b", "c"], {"a": "int64", "b": "str", "c": "int64"}, sep="::", names=["a", "b", "c"],
                         encoding="latin-1", quoting=False)
    assert df["b"].tolist() == ["Caf\xe9", "Na\xefve"] and df["c"].tolist() == [3, 4]
    p.write_bytes(b"1,Cafe,3\n")
    raises(["m.dat", "seems to use ','"], read_csv_strict, p, ["a", "b", "c"], sep="::", names=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------- loaders


def test_kuairand_time_in_seconds(kuairand_logs):
    d = kuairand_logs
    p = d / "log_random_4_22_to_5_08_pure.csv"
    write_log(p, [log_row(0, 16, T0 // 1000, is_rand=1)])
    raises([str(p), "'time_ms'", "looks like seconds", str(T0 // 1000), "line 2"], load_kuairand, d)


def test_kuairand_date_hourmin_disagree_with_time(kuairand_logs):
    d = kuairand_logs
    p = d / "log_random_4_22_to_5_08_pure.csv"
    # T0 + 1 h is 17:00 Beijing time, but the row says hourmin 1600.
    write_log(p, [log_row(0, 16, T0 + 1000, is_rand=1), log_row(0, 17, T0 + 3_600_000, is_rand=1)])
    raises([str(p), "line 3", "hourmin=1600", f"time_ms={T0 + 3_600_000}", "20220408 17:00"], load_kuairand, d)
    # 8 hours off = the UTC date/hour instead of Beijing's.
    write_log(p, [log_row(0, 16, T0 + 1000, is_rand=1, hourmin=800)])
    raises([str(p), "line 2", "hourmin=800"], load_kuairand, d)


def test_kuairand_unknown_user_and_item(kuairand_logs):
    d = kuairand_logs
    p = d / "log_random_4_22_to_5_08_pure.csv"
    write_log(p, [log_row(99999, 16, T0 + 1000, is_rand=1)])
    raises(["log_random_*pure*.csv", "unknown user 99999", "user_features_pure.csv"], load_kuairand, d)
    write_log(p, [log_row(0, 99999, T0 + 1000, is_rand=1)])
    raises(["unknown item 99999", "video_features_basic_pure.csv"], load_kuairand, d)


def test_kuairand_bad_label_and_missing_log(kuairand_logs):
    d = kuairand_logs
    p = d / "log_random_4_22_to_5_08_pure.csv"
    write_log(p, [log_row(0, 16, T0 + 1000, is_rand=1, click=2)])
    raises([str(p), "'is_click'", "0/1", "line 2"], load_kuairand, d)
    p.unlink()
    raises(["log_random_*pure*.csv", "no random log"], load_kuairand, d)


def test_movielens_1m_bad_genre(ml1m_dir):
    (ml1m_dir / "movies.dat").write_text("10::X (1995)::Action|Sci-Fy\n", encoding="latin-1")
    raises(["movies.dat", "'genres'", "'Sci-Fy'", "line 1"], load_movielens_1m, ml1m_dir)


def test_movielens_1m_time_in_milliseconds(ml1m_dir):
    (ml1m_dir / "ratings.dat").write_text("1::10::5::978300760000\n", encoding="latin-1")
    raises(["ratings.dat", "'timestamp'", "looks like milliseconds"], load_movielens_1m, ml1m_dir)


def test_custom_unknown_toml_key(custom_example):
    toml = custom_example
    text = toml.read_text(encoding="utf-8")
    write(toml, text.replace('unit = "s"', 'unit = "s"\nrequest_gap = 1800'))
    raises([str(toml), "'request_gap'"], load_custom, toml)
    write(toml, text.replace('time_ms = "ts"', 'time_sm = "ts"'))
    raises(["columns.impressions.", "'time_sm'"], load_custom, toml)
    write(toml, text + '\n[[features]]\nname = "x"\ntable = "users"\nkind = "numeric"\nside = "user"\ncolour = 1\n')
    raises(["'colour'"], load_custom, toml)


def test_custom_wrong_time_unit_and_unknown_item(custom_example, tmp_path):
    toml = custom_example
    text = toml.read_text(encoding="utf-8")
    write(toml, text.replace('unit = "s"', 'unit = "ms"'))
    raises(["impressions.csv", "'ts'", "looks like seconds", "line 2"], load_custom, toml)
    write(toml, text)
    imp = pd.read_csv(tmp_path / "impressions.csv")
    imp.loc[2, "sku"] = 555
    imp.to_csv(tmp_path / "impressions.csv", index=False)
    raises(["impressions.csv", "unknown item 555", "items.csv"], load_custom, toml)


def test_custom_missing_feature_value(custom_example, tmp_path):
    toml = custom_example
    write(tmp_path / "users.csv", "uid,country,age\n7,de,31\n8,fr,\n")
    raises(["users.csv", "'age'", "line 3"], load_custom, toml)
    write(toml, toml.read_text(encoding="utf-8").replace("fill = false", "fill = true"))
    ds = load_custom(toml)
    # Median of the one present age (31) fills the gap; the flag says so.
    assert ds.users["age"].tolist() == [31.0, 31.0] and ds.users["age_missing"].tolist() == [0, 1]
    assert ds.schema["age_missing"].side == "user"


# ---------------------------------------------------------------------------------------------------- properties

_names = st.text(alphabet=st.characters(whitelist_categories=("L", "N"), max_codepoint=0x17F), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(0, 2**62), st.floats(-1e12, 1e12, allow_nan=False), _names),
                     min_size=1, max_size=12, unique_by=lambda r: r[0]))
def test_csv_and_parquet_round_trip(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["user_id", "score", "name"])
    csv_p, pq_p = tmp_path / "t.csv", tmp_path / "t.parquet"
    df.to_csv(csv_p, index=False, float_format="%.17g")
    df.to_parquet(pq_p)
    for back in (read(csv_p, unique=["user_id"]), read_parquet_strict(pq_p, list(DTYPES), DTYPES, unique=["user_id"])):
        assert back["user_id"].tolist() == df["user_id"].tolist()
        assert back["score"].tolist() == df["score"].tolist()
        assert back["name"].tolist() == df["name"].tolist()


def _reference_requests(group, time_ms):
    """Plain-pandas reference of assign_requests (row order breaks ties)."""
    df = pd.DataFrame({"g": group, "t": time_ms, "row": np.arange(len(group))})
    df = df.sort_values(["g", "t", "row"], kind="stable")
    df["pos"] = df.groupby("g").cumcount()
    firsts = df[df["pos"] == 0].sort_values(["t", "row"], kind="stable")
    rank = pd.Series(np.arange(len(firsts)), index=firsts["g"].to_numpy())
    df["rid"] = rank.loc[df["g"].to_numpy()].to_numpy()
    df = df.sort_values("row")
    return df["rid"].to_numpy(), df["pos"].to_numpy()


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=1, max_size=30))
def test_assign_requests_matches_reference(data):
    group = np.array([g for g, _ in data])
    t = np.array([x for _, x in data]) * 1000
    rid, pos = assign_requests(group, t)
    ref_rid, ref_pos = _reference_requests(group, t)
    assert rid.tolist() == ref_rid.tolist() and pos.tolist() == ref_pos.tolist()


@given(st.integers(10**8, 10**11 - 1))
def test_seconds_never_pass_as_milliseconds(x):
    with pytest.raises(DataValidationError, match=re.escape(f"{x!r}")):
        check_time_unit(np.array([x]), "ms", "f.csv", "time_ms")
    check_time_unit(np.array([x]), "s", "f.csv", "time_ms")


# ---------------------------------------------------------------------------------------------------- own logs

# 1_700_000_000 s = 2023-11-14 22:13:20 UTC, a Tuesday (weekday 1).
SHOP_MAPPING = """[files]
users = "users.csv"
items = "items.csv"
impressions = "impressions.csv"

[columns.impressions]
time_ms = "ts"
click = "clicked"

[time]
unit = "s"
"""
SHOP_IMPRESSIONS = "user_id,item_id,ts,clicked\n7,100,1700000000,1\n7,101,1700000060,0\n8,100,1700000030,0\n"


def shop(d: Path, impressions: str = SHOP_IMPRESSIONS, users: str = "user_id\n7\n8\n",
         items: str = "item_id\n100\n101\n", mapping: str = SHOP_MAPPING) -> Path:
    """A tiny own-logs folder in ``d`` (the CSV texts as given) and its mapping; the mapping's path."""
    write(d / "users.csv", users)
    write(d / "items.csv", items)
    write(d / "impressions.csv", impressions)
    return write(d / "mapping.toml", mapping)


def context_feature(name: str, table: str = "impressions", side: str = "context") -> str:
    return f'\n[[features]]\nname = "{name}"\ntable = "{table}"\nkind = "categorical"\nside = "{side}"\n'


def test_custom_shop_loads(tmp_path):
    ds = load_custom(shop(tmp_path))
    assert ds.impressions["user_id"].tolist() == [7, 7, 8] and ds.impressions["hour"].tolist() == [22, 22, 22]


def test_custom_own_hour_and_weekday_columns_are_used_and_checked(tmp_path):
    """A file's hour / weekday column is read, declared as a feature or not, mapped or not; never recomputed."""
    imp = ("user_id,item_id,ts,clicked,hour,weekday\n"
           "7,100,1700000000,1,5,6\n7,101,1700000060,0,5,6\n8,100,1700000030,0,4,0\n")
    toml = shop(tmp_path, imp, mapping=SHOP_MAPPING + context_feature("hour") + context_feature("weekday"))
    ds = load_custom(toml)
    assert ds.impressions["hour"].tolist() == [5, 5, 4] and ds.impressions["weekday"].tolist() == [6, 6, 0]
    write(toml, SHOP_MAPPING)  # not features: still read, not derived (22 h, Tuesday)
    assert load_custom(toml).impressions["hour"].tolist() == [5, 5, 4]
    write(tmp_path / "impressions.csv", imp.replace(",4,0", ",99,0"))
    raises(["impressions.csv line 4", "column 'hour'", "0..23", "99"], load_custom, toml)
    write(tmp_path / "impressions.csv", imp.replace("1,5,6\n7", "1,5,7\n7"))
    raises(["impressions.csv line 2", "column 'weekday'", "0..6", "7"], load_custom, toml)
    # mapped: checked the same way, under the file's name
    write(toml, SHOP_MAPPING.replace('click = "clicked"', 'click = "clicked"\nhour = "hr"'))
    write(tmp_path / "impressions.csv",
          "user_id,item_id,ts,clicked,hr\n7,100,1700000000,1,3\n8,101,1700000030,0,noon\n")
    raises(["impressions.csv line 3", "column 'hr'", "'noon'"], load_custom, toml)
    # parquet: a missing hour is not passed over
    pd.DataFrame({"user_id": [7, 8], "item_id": [100, 101], "ts": [1_700_000_000, 1_700_000_030], "clicked": [1, 0],
                  "hour": [3.0, np.nan]}).to_parquet(tmp_path / "imp.parquet")
    write(toml, SHOP_MAPPING.replace("impressions.csv", "imp.parquet") + context_feature("hour"))
    raises(["imp.parquet", "column 'hour'", "missing value at line 2", "[missing] fill = true"], load_custom, toml)


def test_custom_utc_offset_sets_the_logs_local_days_beside_its_own_hour_and_weekday(tmp_path):
    from cascade.data.describe import describe_dataset
    from cascade.data.split import request_days

    # 1700000000 s is Tuesday 2023-11-14 22:13 UTC, Wednesday 2023-11-15 00:13 at UTC+2
    imp = "user_id,item_id,ts,clicked,hour,weekday\n7,100,1700000000,1,5,6\n"
    toml = shop(tmp_path, imp, mapping=SHOP_MAPPING + "utc_offset_hours = 2\n")
    ds = load_custom(toml)
    assert ds.utc_offset_hours == 2.0  # the time split cuts the local days, so the key does something here too
    assert (ds.impressions["hour"].tolist(), ds.impressions["weekday"].tolist()) == ([5], [6])  # the file's own
    assert describe_dataset(ds, ds.utc_offset_hours)["days"]["first"] == "2023-11-15"
    assert request_days(ds, ds.utc_offset_hours).tolist() == [19676]  # 2023-11-15 as days since 1970-01-01
    write(tmp_path / "impressions.csv", imp.replace(",weekday", "").replace(",6\n", "\n"))
    assert load_custom(toml).impressions["weekday"].tolist() == [2]  # derived at UTC+2: Wednesday 00:13
    write(toml, SHOP_MAPPING)
    assert load_custom(toml).utc_offset_hours == 0.0


def test_custom_items_tag_column_is_read_unmapped(tmp_path):
    toml = shop(tmp_path, items="item_id,tag\n100,shoe\n101,hat\n",
                mapping=SHOP_MAPPING + context_feature("tag", "items", "item"))
    assert load_custom(toml).items["tag"].tolist() == ["shoe", "hat"]
    write(tmp_path / "items.csv", "item_id,category\n100,shoe\n101,hat\n")
    raises(["items.csv", "'tag'"], load_custom, toml)


def test_custom_ids_with_leading_zeros_are_text(tmp_path):
    """"0007" is a text id: it never meets 7 (refused, naming both spellings), and "0001" and "1" are two users."""
    toml = shop(tmp_path, users="user_id\n0007\n8\n")
    raises(["impressions.csv line 2", "column 'user_id'", "unknown user 7", "users.csv has '0007'"], load_custom, toml)
    imp = "user_id,item_id,ts,clicked\n0001,100,1700000000,1\n1,101,1700000060,0\n"
    ds = load_custom(shop(tmp_path, imp, users="user_id\n0001\n1\n"))
    assert ds.users["user_key"].tolist() == ["0001", "1"] and sorted(ds.impressions["user_id"]) == [0, 1]
    # one integer written twice: both lines and spellings
    shop(tmp_path, users="user_id\n7\n 7\n8\n")
    raises(["users.csv", "column 'user_id'", "duplicate id 7", "line 2 '7'", "line 3 ' 7'"], load_custom, toml)


def test_custom_line_numbers_count_blank_lines(tmp_path):
    imp = "user_id,item_id,ts,clicked\n7,100,1700000000,1\n\n\r\n7,101,1700000060,7\n"
    raises(["impressions.csv line 5", "'clicked'", "7"], load_custom, shop(tmp_path, imp))
    p = write(tmp_path / "b.csv", "user_id,score,name\n1,0.5,a\n\n\n2,,b\n")
    raises(["b.csv", "'score'", "line 5"], read, p)
    p = write(tmp_path / "c.csv", "user_id,score,name\n\n1,0.5,a\n\n2,high,b\n")
    raises(["c.csv", "'high'", "line 5"], read, p)


def test_custom_repeated_impression_without_position_is_refused(tmp_path):
    imp = SHOP_IMPRESSIONS + "7,100,1700000000,1\n"
    raises(["impressions.csv line 5", "impressions.csv line 2", "user_id=7", "item_id=100", "ts=1700000000",
            "position column"], load_custom, shop(tmp_path, imp))
    # the same item again a second later is another impression
    assert len(load_custom(shop(tmp_path, SHOP_IMPRESSIONS + "7,100,1700000001,0\n")).impressions) == 4


def test_custom_mapping_file_itself(tmp_path):
    shop(tmp_path)
    raises([str(tmp_path), "is a directory", "mapping.toml"], load_custom, tmp_path)
    p = tmp_path / "latin.toml"
    p.write_bytes('name = "x"\n# caf\xe9\n'.encode("latin-1"))
    raises([str(p), "line 2", "not valid UTF-8", "0xe9"], load_custom, p)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.timeout(60)
def test_a_fifo_given_as_a_file_is_refused_not_read(tmp_path):
    """Reading a FIFO blocks until a writer comes: every file a loader or the config reads is refused unread (a
    hang here fails by the timeout, not by passing)."""
    toml = shop(tmp_path)
    (tmp_path / "users.csv").unlink()
    os.mkfifo(tmp_path / "users.csv")
    raises([str(toml), "files.users = 'users.csv'", "not a regular file"], load_custom, toml)
    os.mkfifo(tmp_path / "fifo.toml")
    raises([str(tmp_path / "fifo.toml"), "not a regular file"], load_custom, tmp_path / "fifo.toml")
    for name in ("c.csv", "c.parquet"):
        os.mkfifo(tmp_path / name)
        raises([str(tmp_path / name), "not a regular file"], read_table_strict, tmp_path / name, ["user_id"])
    ml = tmp_path / "ml"
    ml.mkdir()
    for name in ("u.data", "u.user", "u.item"):
        os.mkfifo(ml / name)
    raises([str(ml / "u.data"), "not a regular file"], load_movielens_100k, ml)
    with pytest.raises(ConfigError, match="fifo.toml is not a regular file"):
        load_toml(tmp_path / "fifo.toml")


@pytest.mark.parametrize("section, line, named", [
    ("csv", 'sep = ""', ["csv.sep", "''"]),
    ("csv", "sep = 5", ["csv.sep", "5"]),
    ("time", 'utc_offset_hours = "abc"', ["time.utc_offset_hours", "'abc'"]),
    ("time", "utc_offset_hours = nan", ["time.utc_offset_hours", "nan"]),
    ("time", "utc_offset_hours = 1000", ["time.utc_offset_hours", "-12..14", "1000"]),
    ("time", 'request_gap_s = "x"', ["time.request_gap_s", "'x'"]),
    ("time", "request_gap_s = true", ["time.request_gap_s", "True"]),
    ("time", "request_gap_s = inf", ["time.request_gap_s", "inf"]),
    ("columns", 'users = "customer"', ["columns.users must be a table", "'customer'"]),
])
def test_custom_bad_mapping_values_are_named_before_reading(tmp_path, section, line, named):
    """Refused from the mapping alone: no data file exists."""
    p = write(tmp_path / "mapping.toml", SHOP_MAPPING + ("" if section == "time" else f"\n[{section}]\n") + line + "\n")
    raises([str(p), *named], load_custom, p)


def test_custom_mapping_declares_a_feature_twice_or_an_empty_file(tmp_path):
    p = write(tmp_path / "mapping.toml", SHOP_MAPPING + context_feature("age", "users", "user")
              + context_feature("age", "users", "user"))
    raises([str(p), "features[1]", "'age'", "features[0]"], load_custom, p)  # no data file exists
    p = write(tmp_path / "mapping.toml", SHOP_MAPPING.replace('users = "users.csv"', 'users = ""'))
    raises([str(p), "files.users is empty"], load_custom, p)
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "mapping.toml", SHOP_MAPPING.replace('users = "users.csv"', 'users = "sub"'))
    raises([str(p), "files.users = 'sub'", "directory"], load_custom, p)


def test_custom_request_gap_beside_request_ids_is_refused(tmp_path):
    """request_gap_s would do nothing where the files name the requests: mapped, or under the canonical name."""
    imp = "user_id,item_id,ts,clicked,session\n7,100,1700000000,1,s1\n7,101,1700000060,0,s1\n8,100,1700000030,0,s2\n"
    toml = shop(tmp_path, imp, mapping=SHOP_MAPPING.replace('click = "clicked"', 'click = "clicked"\n'
                                                            'request_id = "session"') + "request_gap_s = 60\n")
    raises([str(toml), "time.request_gap_s does nothing", "'session'"], load_custom, toml)
    shop(tmp_path, imp.replace("session", "request_id"), mapping=SHOP_MAPPING + "request_gap_s = 60\n")
    raises([str(toml), "time.request_gap_s does nothing", "impressions.csv", "'request_id'"], load_custom, toml)
    write(toml, SHOP_MAPPING)
    assert load_custom(toml).impressions["request_id"].nunique() == 2


def test_custom_bad_position_values(tmp_path):
    imp = "user_id,item_id,ts,clicked,position\n7,100,1700000000,1,0\n7,101,1700000060,0,first\n"
    raises(["impressions.csv line 3", "column 'position'", "'first'"], load_custom, shop(tmp_path, imp))
    imp = "user_id,item_id,ts,clicked,position\n7,100,1700000000,1,0\n\n7,101,1700000060,0,0\n"
    raises(["impressions.csv line 4", "column 'position'", "repeats position 0", "impressions.csv line 2"],
           load_custom, shop(tmp_path, imp))


def test_custom_unreadable_file(tmp_path, monkeypatch):
    import builtins

    toml = shop(tmp_path)
    real_open, real_read_bytes = builtins.open, Path.read_bytes

    def refuse(path, *args, **kwargs):
        if Path(path).name == "users.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refuse_bytes(self):
        if self.name == "users.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse_bytes)
    raises(["users.csv", "cannot be read", "Permission denied"], load_custom, toml)
    raises(["users.csv", "cannot be read", "Permission denied"], read, tmp_path / "users.csv")


def test_custom_compressed_or_parquet_file_under_a_csv_name(tmp_path):
    import gzip

    toml = shop(tmp_path)
    (tmp_path / "impressions.csv").write_bytes(gzip.compress(SHOP_IMPRESSIONS.encode()))
    raises(["impressions.csv", "gzip-compressed", "decompress"], load_custom, toml)
    pd.read_csv(io.StringIO(SHOP_IMPRESSIONS)).to_parquet(tmp_path / "impressions.csv")
    raises(["impressions.csv", "a parquet file", "*.parquet"], load_custom, toml)


def test_custom_unknown_ids_name_the_file_column_and_line(tmp_path):
    """An unknown integer user inside a session is named as such (not as a session of two users)."""
    mapping = SHOP_MAPPING.replace("[columns.impressions]", '[columns.users]\nuser_id = "customer"\n\n'
                                   '[columns.impressions]\nuser_id = "customer"\nrequest_id = "session"')
    imp = "customer,item_id,ts,clicked,session\n7,100,1700000000,1,s1\n9,101,1700000060,0,s1\n"
    toml = shop(tmp_path, imp, users="customer\n7\n8\n", mapping=mapping)
    raises(["impressions.csv line 3", "column 'customer'", "unknown user 9", "users.csv"], load_custom, toml)
    write(tmp_path / "impressions.csv", imp.replace("9,101", "8,101"))
    raises(["impressions.csv line 3", "request 's1'", "column 'session'", "more than one user",
            "impressions.csv line 2"], load_custom, toml)


def test_custom_fractional_milliseconds_name_the_line(tmp_path):
    toml = shop(tmp_path, "user_id,item_id,ts,clicked\n7,100,1700000000000,1\n7,101,1700000060000.5,0\n",
                mapping=SHOP_MAPPING.replace('unit = "s"', 'unit = "ms"'))
    raises(["impressions.csv line 3", "column 'ts'", "whole milliseconds", "1700000060000.5"], load_custom, toml)


def test_custom_feature_sides_ids_and_a_csv_table_beside_parquet_files_are_checked(tmp_path):
    """A users / items column describes the user / the item; an id is a categorical feature of its own table;
    a [csv] table where every file is parquet would do nothing: each refused from the mapping, naming it."""
    raises(["features[0] ('colour')", "a column of the items table describes the item, so its side is 'item', "
            "not 'context'"], load_custom, shop(tmp_path, mapping=SHOP_MAPPING + context_feature("colour", "items")))
    numeric_id = '\n[[features]]\nname = "user_id"\ntable = "users"\nkind = "numeric"\nside = "user"\n'
    raises(["features[0] ('user_id'): an id is a categorical feature of the users table", "got kind 'numeric'"],
           load_custom, shop(tmp_path, mapping=SHOP_MAPPING + numeric_id))
    d = tmp_path / "pq"
    d.mkdir()
    pd.DataFrame({"user_id": [7, 8]}).to_parquet(d / "users.parquet")
    pd.DataFrame({"item_id": [100, 101]}).to_parquet(d / "items.parquet")
    pd.DataFrame({"user_id": [7, 7, 8], "item_id": [100, 101, 100], "ts": [1700000000, 1700000060, 1700000030],
                  "clicked": [1, 0, 0]}).to_parquet(d / "impressions.parquet")
    mapping = SHOP_MAPPING.replace(".csv", ".parquet")
    assert len(load_custom(write(d / "mapping.toml", mapping)).impressions) == 3
    raises(["mapping.toml: [csv] is set but every file is parquet: its settings would do nothing"],
           load_custom, write(d / "mapping.toml", mapping + '\n[csv]\nsep = ";"\n'))
