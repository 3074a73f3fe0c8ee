"""Real-data loaders: KuaiRand (real side tables + hand-written logs), ML-100K (real), ML-1M (tiny files), custom."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cascade.data.custom import load_custom
from cascade.data.kuairand import load_kuairand
from cascade.data.movielens import load_movielens_1m, load_movielens_100k
from worlds import KUAIRAND_SIDE, ML100K, T0


def test_kuairand_requests_positions_and_tables(kuairand_logs):
    ds = load_kuairand(kuairand_logs)
    imp = ds.impressions
    # Requests by first impression time: A (T0+1000) -> 0, E (+1500) -> 1, C (+2000) -> 2, B (+3000) -> 3,
    # D (+3600010) -> 4. Within A: video 11 (+1000) pos 0, video 10 (+5000, earlier line) pos 1, video 13 pos 2.
    got = {int(v): (int(r), int(p)) for v, r, p in imp[["item_id", "request_id", "position"]].to_numpy()}
    assert got == {11: (0, 0), 10: (0, 1), 13: (0, 2), 16: (1, 0), 14: (2, 0), 12: (3, 0), 15: (4, 0)}
    # Sorted by (request_id, position).
    assert imp["item_id"].tolist() == [11, 10, 13, 16, 14, 12, 15]
    assert imp["is_rand"].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert imp["click"].tolist() == [0, 1, 0, 0, 0, 0, 1]
    assert imp["hour"].tolist() == [16, 16, 16, 16, 16, 16, 17]
    assert set(imp["weekday"]) == {4}  # Friday
    assert imp["time_ms"].iloc[0] == T0 + 1000
    # Side tables: every real row, id columns renamed, first tag.
    assert len(ds.users) == 27285 and len(ds.items) == 7583
    raw = pd.read_csv(KUAIRAND_SIDE / "video_features_basic_pure.csv", dtype={"tag": "string"})
    items = ds.items.set_index("item_id")
    assert items.loc[5, "tag"] == 20  # raw tag "20,43"
    missing_tag = raw.loc[raw["tag"].isna(), "video_id"].to_numpy()
    assert len(missing_tag) == 96 and (items.loc[missing_tag, "tag"] == -1).all()
    # video_duration: NaN -> median of the present values, flagged.
    miss = raw["video_duration"].isna().to_numpy()
    assert np.allclose(ds.items["video_duration"].to_numpy()[miss], np.median(raw["video_duration"][~miss]))
    assert ds.items["video_duration_missing"].sum() == miss.sum() == 239
    # Schema sides.
    sch = ds.schema
    assert sch["user_id"].side == "user" and sch["item_id"].side == "item" and sch["item_id"].kind == "categorical"
    assert {f.name for f in sch.by_side("context")} == {"hour", "weekday", "tab"}
    assert "play_time_ms" in {f.name for f in sch.by_side("privileged")}
    assert sch["video_duration"].kind == "numeric" and sch["author_id"].kind == "categorical"
    assert ds.sources["users"].endswith("user_features_pure.csv")


def test_kuairand_standard_only(kuairand_logs):
    ds = load_kuairand(kuairand_logs, logs=("standard",), variant="pure")
    # Without the random log the request order is A, C, B, D.
    assert ds.impressions["item_id"].tolist() == [11, 10, 13, 14, 12, 15]
    assert ds.impressions["request_id"].tolist() == [0, 0, 0, 1, 2, 3]
    assert ds.name == "kuairand-pure"


def test_kuairand_a_log_copied_beside_itself_is_warned_and_kept(kuairand_logs, caplog):
    import logging
    import shutil

    with caplog.at_level(logging.WARNING, logger="cascade.data.kuairand"):
        assert len(load_kuairand(kuairand_logs).impressions) == 7 and "repeat another row" not in caplog.text
        # the copy matches log_standard_*pure*.csv too: its five rows repeat the original's in every column
        shutil.copy(kuairand_logs / "log_standard_4_08_to_4_21_pure.csv", kuairand_logs / "log_standard_copy_pure.csv")
        ds = load_kuairand(kuairand_logs)
    assert len(ds.impressions) == 12  # kept: the official files may hold such rows
    assert "KuaiRand logs: 5 row(s) repeat another row in every column (41.67% of 12); the first is in " \
           "log_standard_4_08_to_4_21_pure.csv and log_standard_copy_pure.csv" in caplog.text


@pytest.mark.parametrize("write", ["ml100k", "ml1m"])
def test_movielens_a_user_who_rated_a_movie_twice_is_refused_naming_the_lines(tmp_path, write):
    from cascade.data.schema import DataValidationError
    from worlds import write_ml1m, write_ml100k

    d = tmp_path / write
    (write_ml100k if write == "ml100k" else write_ml1m)(d)
    name, sep = ("u.data", "\t") if write == "ml100k" else ("ratings.dat", "::")
    lines = (d / name).read_text(encoding="latin-1").splitlines()
    user, movie = lines[1].split(sep)[:2]
    lines.insert(3, sep.join([user, movie, "1", lines[1].split(sep)[3]]))  # line 4: line 2's pair rated again
    (d / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    load = load_movielens_100k if write == "ml100k" else load_movielens_1m
    with pytest.raises(DataValidationError, match=rf"{name}: user {user} rated movie {movie} twice \(lines 2 and 4; "
                                                  r"1 repeated pair\(s\) in all\): a MovieLens ratings file holds "
                                                  r"one rating per user and movie"):
        load(d)


@pytest.fixture(scope="module")
def ml100k():
    if ML100K is None or not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found (CASCADE_ML100K={ML100K}; research licence: never copied into the repo)")
    return load_movielens_100k(ML100K)


def test_movielens_100k_real(ml100k):
    ds = ml100k
    raw = np.loadtxt(ML100K / "u.data", dtype=np.int64)  # user item rating unix_s
    assert len(ds.impressions) == 100_000 and len(ds.users) == 943 and len(ds.items) == 1682
    assert ds.impressions["click"].mean() == pytest.approx((raw[:, 2] >= 4).mean(), abs=0)
    # One request per user-day (UTC), counted independently.
    n_days = len({(u, t // 86400) for u, t in zip(raw[:, 0].tolist(), raw[:, 3].tolist())})
    assert ds.impressions["request_id"].nunique() == n_days
    assert ds.impressions["time_ms"].sum() == raw[:, 3].sum() * 1000
    # Positions are 0..n-1 within each request, ordered by (time, item_id).
    imp = ds.impressions
    size = imp.groupby("request_id")["position"].transform("size")
    assert (imp.groupby("request_id")["position"].transform("max") == size - 1).all()
    nxt = imp.groupby("request_id").shift(-1)
    same = nxt["time_ms"].notna()
    assert (imp["time_ms"][same] <= nxt["time_ms"][same]).all()
    # Request ids follow the time of the first impression.
    first = imp[imp["position"] == 0].sort_values("request_id")["time_ms"].to_numpy()
    assert (np.diff(first) >= 0).all()
    # The rating is a label source only.
    assert "rating" not in ds.schema.names and not any("rating" in n for n in ds.schema.names)
    items = ds.items.set_index("item_id")
    assert items.loc[1, "genre"] == "Animation" and items.loc[1, "genre_comedy"] == 1.0  # Toy Story
    assert items.loc[1, "release_year"] == 1995
    assert items.loc[267, "release_year_missing"] == 1  # the "unknown" movie has no release date
    users = ds.users.set_index("user_id")
    assert users.loc[1, "age_bucket"] == 18 and users.loc[1, "zip_prefix"] == "8"  # 24 years, zip 85711


def test_movielens_1m_small(ml1m_dir):
    ds = load_movielens_1m(ml1m_dir)
    imp = ds.impressions
    # Request 0: user 1, day 11322: item 30 (978300000), then 10 and 20 (978300760, tie -> item_id order).
    # Request 1: user 2 (first at 978301000). Request 2: user 1, day 11324 (item 40).
    assert imp[["request_id", "user_id", "item_id", "position"]].to_numpy().tolist() == [
        [0, 1, 30, 0], [0, 1, 10, 1], [0, 1, 20, 2], [1, 2, 10, 0], [2, 1, 40, 0]]
    assert imp["click"].tolist() == [1, 1, 0, 1, 0]  # ratings 4, 5, 3, 4, 2
    assert imp["time_ms"].iloc[0] == 978_300_000_000
    items = ds.items.set_index("item_id")
    assert items.loc[10, "genre"] == "Action"
    assert items.loc[10, ["genre_action", "genre_adventure", "genre_thriller", "genre_drama"]].tolist() == [1, 1, 1, 0]
    assert items.loc[30, "genre_childrens"] == 1
    # Item 40 has no "(year)": median of 1995, 1995, 1995 and the flag.
    assert items.loc[40, "release_year"] == 1995 and items.loc[40, "release_year_missing"] == 1
    assert items.loc[40, "title"] == "Caf\xe9 Film"  # latin-1 decoded
    users = ds.users.set_index("user_id")
    assert users.loc[2, ["age_bucket", "gender", "occupation", "zip_prefix"]].tolist() == [56, "M", 16, "7"]
    assert "genre_unknown" not in ds.items.columns and "rating" not in ds.schema.names


def test_custom_example(custom_example):
    ds = load_custom(custom_example)
    imp = ds.impressions
    # s1 starts at 1_700_000_000 (request 0: sku 100 then 101), s2 at +30 (request 1), s3 a day later (2).
    assert imp[["request_id", "user_id", "item_id", "position", "click"]].to_numpy().tolist() == [
        [0, 7, 100, 0, 0], [0, 7, 101, 1, 1], [1, 8, 100, 0, 0], [2, 7, 102, 0, 1]]
    assert imp["time_ms"].iloc[0] == 1_700_000_000_000
    assert imp["hour"].iloc[0] == 23 and imp["weekday"].iloc[0] == 1  # 23:13 on a Tuesday at UTC+1
    # 1_700_090_000 = +90000 s = 25 h later: 2023-11-16 00:13:20 at UTC+1, a Thursday.
    assert imp["hour"].iloc[3] == 0 and imp["weekday"].iloc[3] == 3
    assert ds.items.set_index("item_id").loc[100, "price"] == 59.9  # renamed from price_eur
    assert ds.name == "example-shop"
    assert ds.schema["dwell_s"].side == "privileged" and ds.schema["user_id"].side == "user"
    assert ds.schema["item_id"].kind == "categorical"


def test_custom_parquet_glob_and_derived_requests(tmp_path):
    d = tmp_path / "shop"
    d.mkdir()
    pd.DataFrame({"user_id": [1, 2]}).to_parquet(d / "u.parquet")
    pd.DataFrame({"item_id": [5, 6, 7]}).to_parquet(d / "i.parquet")
    (d / "imp").mkdir()
    # User 1: 0 s, 100 s, then 2000 s (gap 1900 > 1800: new request); user 2: 50 s. Milliseconds in the files.
    base = 1_700_000_000_000
    pd.DataFrame({"user_id": [1, 2], "item_id": [5, 6], "t": [base, base + 50_000], "c": [True, False]}
                 ).to_parquet(d / "imp" / "part0.parquet")
    pd.DataFrame({"user_id": [1, 1], "item_id": [7, 6], "t": [base + 2_000_000, base + 100_000], "c": [False, True]}
                 ).to_parquet(d / "imp" / "part1.parquet")
    (d / "map.toml").write_text(
        '[files]\nusers = "u.parquet"\nitems = "i.parquet"\nimpressions = "imp/*.parquet"\n'
        '[columns.impressions]\ntime_ms = "t"\nclick = "c"\n[time]\nunit = "ms"\n', encoding="utf-8")
    ds = load_custom(d / "map.toml")
    # Requests by first time: user 1 at base (items 5, 6 at +100 s) -> 0; user 2 at +50 s -> 1; user 1 at +2000 s -> 2.
    assert ds.impressions[["request_id", "user_id", "item_id", "position", "click"]].to_numpy().tolist() == [
        [0, 1, 5, 0, 1], [0, 1, 6, 1, 1], [1, 2, 6, 0, 0], [2, 1, 7, 0, 0]]
    assert ds.impressions["is_rand"].tolist() == [0, 0, 0, 0]
    assert ds.schema.names == ["user_id", "item_id"]


def test_movielens_and_kuairand_messages_give_the_physical_line_past_blank_lines(tmp_path, kuairand_logs):
    from cascade.data.schema import DataValidationError
    from worlds import write_ml100k

    d = tmp_path / "ml"
    write_ml100k(d)
    lines = (d / "u.data").read_text(encoding="latin-1").splitlines()
    user, movie, _, t = lines[2].split("\t")
    lines[2] = "\t".join([user, movie, "9", t])  # physical line 5 once two blank lines come before it
    (d / "u.data").write_text("\n".join([lines[0], "", "", *lines[1:]]) + "\n", encoding="latin-1")
    with pytest.raises(DataValidationError, match=r"u.data: column 'rating' must be in 1..5, line 5 holds 9"):
        load_movielens_100k(d)
    log = kuairand_logs / "log_standard_4_08_to_4_21_pure.csv"
    rows = log.read_text().splitlines()
    cells = rows[3].split(",")
    cells[rows[0].split(",").index("is_click")] = "2"
    rows[3] = ",".join(cells)  # the third data row: physical line 5 after one blank line
    log.write_text("\n".join([rows[0], "", *rows[1:]]) + "\n")
    with pytest.raises(DataValidationError, match=r"log_standard_4_08_to_4_21_pure.csv: column 'is_click' must be "
                                                  r"0/1, line 5 holds 2"):
        load_kuairand(kuairand_logs)


def test_kuairand_a_row_of_the_other_log_is_refused_naming_its_line(kuairand_logs):
    from cascade.data.schema import DataValidationError

    log = kuairand_logs / "log_standard_4_22_to_5_08_pure.csv"
    rows = log.read_text().splitlines()
    cells = rows[1].split(",")
    cells[rows[0].split(",").index("is_rand")] = "1"
    log.write_text("\n".join([rows[0], ",".join(cells)]) + "\n")
    with pytest.raises(DataValidationError, match=r"log_standard_4_22_to_5_08_pure.csv: a standard log, but line 2 "
                                                  r"has is_rand = 1 \(the standard log's rows have is_rand = 0\)"):
        load_kuairand(kuairand_logs)
