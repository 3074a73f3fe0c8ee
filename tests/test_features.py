"""Time split, feature encoder, cross features (hand-worked, brute force, leakage) and encoded tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cascade.data.batches import EncodedTable
from cascade.data.features import CrossFeatureStore, FeatureEncoder, PairEncoder, build_encoded
from cascade.data.requests import request_start_ms
from cascade.data.schema import Dataset, DataValidationError, Feature, Schema
from cascade.data.split import DAY_MS, drop_last_days, split_summary, time_split

T0 = 1_650_000_000_000 - (1_650_000_000_000 % DAY_MS)  # a UTC midnight


def _schema() -> Schema:
    return Schema((
        Feature("user_id", "users", "categorical", "user"),
        Feature("city", "users", "categorical", "user"),
        Feature("age", "users", "numeric", "user"),
        Feature("item_id", "items", "categorical", "item"),
        Feature("tag", "items", "categorical", "item"),
        Feature("author_id", "items", "categorical", "item"),
        Feature("duration", "items", "numeric", "item"),
        Feature("hour", "impressions", "categorical", "context"),
        Feature("tab", "impressions", "categorical", "context"),
        Feature("play_time_ms", "impressions", "numeric", "privileged"),
        Feature("long_view", "impressions", "numeric", "privileged"),
    ))


def _random_dataset(seed: int = 0, n_users: int = 12, n_items: int = 15, n_requests: int = 90,
                    days: int = 5) -> Dataset:
    """Requests of 1-4 impressions, spread over ``days`` days; rows of one request are 10 ms apart."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({
        "user_id": np.arange(100, 100 + n_users, dtype=np.int64),
        "city": rng.choice(["a", "b", "c"], n_users),
        "age": np.where(rng.random(n_users) < 0.2, np.nan, rng.integers(15, 60, n_users).astype(float)),
    })
    items = pd.DataFrame({
        "item_id": np.arange(500, 500 + n_items, dtype=np.int64),
        "tag": rng.integers(0, 4, n_items),
        "author_id": rng.integers(0, 5, n_items) + 9000,
        "duration": rng.lognormal(10, 1, n_items),
    })
    sizes = rng.integers(1, 5, n_requests)
    starts = T0 + np.sort(rng.integers(0, days * DAY_MS, n_requests))
    req = np.repeat(np.arange(n_requests), sizes)
    pos = np.concatenate([np.arange(s) for s in sizes])
    n = len(req)
    imp = pd.DataFrame({
        "request_id": req.astype(np.int64) + 7,
        "user_id": users["user_id"].to_numpy()[rng.integers(0, n_users, n_requests)][req],
        "item_id": items["item_id"].to_numpy()[rng.integers(0, n_items, n)],
        "time_ms": starts[req] + 10 * pos,
        "position": pos.astype(np.int64),
        "click": (rng.random(n) < 0.4).astype(np.int64),
        "is_rand": (rng.random(n) < 0.1).astype(np.int64),
        "hour": rng.integers(0, 24, n),
        "tab": rng.integers(0, 3, n),
    })
    imp["play_time_ms"] = np.where(imp["click"] == 1, rng.integers(1000, 60000, n), 0).astype(float)
    imp["long_view"] = (imp["play_time_ms"] > 30000).astype(np.int64)
    return Dataset(users, items, imp, _schema(), name="rand").validate()


# ---------------------------------------------------------------------------------------------------- split


def test_time_split_by_request_start_and_calendar_day():
    # requests: r1 starts day 0; r2 starts day 1 at 23:59:59.990 and its 2nd row is on day 2 (stays valid);
    # r3 starts day 2 -> test; r4 day 2 -> test.
    ts = [T0 + 5, T0 + DAY_MS + DAY_MS - 10, T0 + 2 * DAY_MS + 20, T0 + 2 * DAY_MS + 100, T0 + 2 * DAY_MS + 500]
    imp = pd.DataFrame({"request_id": [1, 2, 2, 3, 4], "user_id": [1] * 5, "item_id": [1] * 5, "time_ms": ts,
                        "position": [0, 0, 1, 0, 0], "click": [0, 1, 0, 1, 0], "is_rand": [0] * 5})
    ds = Dataset(pd.DataFrame({"user_id": [1]}), pd.DataFrame({"item_id": [1]}), imp, Schema(()))
    m = time_split(ds, valid_days=1, test_days=1)
    assert m["train"].tolist() == [True, False, False, False, False]
    assert m["valid"].tolist() == [False, True, True, False, False]
    assert m["test"].tolist() == [False, False, False, True, True]
    np.testing.assert_array_equal(request_start_ms(imp), [ts[0], ts[1], ts[1], ts[3], ts[4]])
    s = split_summary(ds, m)
    assert s.loc["valid", "requests"] == 1 and s.loc["valid", "impressions"] == 2 and s.loc["valid", "ctr"] == 0.5
    assert s.loc["test", "clicks"] == 1
    # with UTC+8 the day boundary moves: 16:00 UTC is midnight, so r2 (23:59 UTC day 1) is day 2 local,
    # r3/r4 (00:00 UTC day 2) are also day 2 local -> all three in test; r1 (day 0, 08:00 local) train, valid empty
    with pytest.raises(DataValidationError, match="'valid' is empty"):
        time_split(ds, valid_days=1, test_days=1, utc_offset_hours=8)


def test_time_split_empty_part_names_part_and_range():
    ds = _random_dataset(days=1)
    with pytest.raises(DataValidationError, match=r"split 'train' is empty: no request starts in \[") as e:
        time_split(ds, valid_days=1, test_days=1)
    assert "UTC" in str(e.value) and "request starts span" in str(e.value)
    with pytest.raises(DataValidationError, match="'train' is empty"):
        time_split(ds, valid_days=0, test_days=1)


def test_drop_last_days_leaves_out_the_last_days_and_who_only_they_had():
    # requests start on days 0, 1, 2, 3 (r3 starts on day 2 and its 2nd row is on day 3: it stays with day 2);
    # user 3 and item 12 appear only on day 3, user 4 and item 13 never (they stay: nothing dates them)
    ts = [T0, T0 + DAY_MS, T0 + 3 * DAY_MS - 10, T0 + 3 * DAY_MS + 5, T0 + 3 * DAY_MS + 20]
    imp = pd.DataFrame({"request_id": [1, 2, 3, 3, 4], "user_id": [1, 2, 1, 1, 3], "item_id": [10, 11, 10, 11, 12],
                        "time_ms": ts, "position": [0, 0, 0, 1, 0], "click": [0, 1, 0, 1, 1], "is_rand": [0] * 5})
    ds = Dataset(pd.DataFrame({"user_id": [1, 2, 3, 4]}), pd.DataFrame({"item_id": [10, 11, 12, 13]}), imp,
                 Schema(()))
    assert drop_last_days(ds, 0) is ds
    cut = drop_last_days(ds, 1)
    assert cut.impressions["request_id"].tolist() == [1, 2, 3, 3]
    assert cut.users["user_id"].tolist() == [1, 2, 4] and cut.items["item_id"].tolist() == [10, 11, 13]
    assert ds.impressions is imp and len(imp) == 5  # the dataset given is not changed
    m = time_split(cut, valid_days=1, test_days=1)  # the test period now ends on day 2
    assert m["test"].tolist() == [False, False, True, True] and m["train"].tolist() == [True, False, False, False]
    assert drop_last_days(ds, 3).impressions["request_id"].tolist() == [1]
    with pytest.raises(DataValidationError, match="drop_last_days = 4 leaves no request"):
        drop_last_days(ds, 4)
    with pytest.raises(ValueError, match="days must be >= 0"):
        drop_last_days(ds, -1)


# ---------------------------------------------------------------------------------------------------- encoder


def _tiny_dataset() -> tuple[Dataset, np.ndarray]:
    users = pd.DataFrame({"user_id": [1, 2, 3], "city": ["a", "b", "c"], "age": [10.0, np.nan, 30.0]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "tag": [1, 1, 2], "author_id": [100, 101, 100],
                          "duration": [1.0, 3.0, 1000.0]})
    imp = pd.DataFrame({"request_id": [1, 1, 2, 3], "user_id": [1, 1, 2, 3], "item_id": [10, 11, 10, 12],
                        "time_ms": [T0, T0 + 1, T0 + 50, T0 + DAY_MS], "position": [0, 1, 0, 0],
                        "click": [1, 0, 0, 1], "is_rand": [0, 0, 0, 0], "hour": [8, 8, 9, 23], "tab": [0, 0, 1, 1],
                        "play_time_ms": [5000.0, 0.0, 0.0, 9000.0], "long_view": [1, 0, 0, 1]})
    ds = Dataset(users, items, imp, _schema()).validate()
    return ds, np.array([True, True, True, False])


def test_encoder_vocab_from_train_rows_min_count_and_standardize():
    ds, train = _tiny_dataset()
    enc = FeatureEncoder(ds.schema, numeric="standardize").fit(ds, train)
    ucat, unum = enc.encode_users(ds.users)
    # train user rows (one per train impression): u1, u1, u2 -> city vocab [a, b]; c (test only) -> OOV 0
    assert enc.user_spec().cat_names == ("user_id", "city")
    np.testing.assert_array_equal(ucat, [[1, 1], [2, 2], [0, 0]])
    # age over train rows: 10, 10, NaN -> median 10, filled [10, 10, 10], std 0 -> std 1:
    # u1 -> 0, u2 (NaN -> 10) -> 0, u3 -> (30 - 10) / 1 = 20
    np.testing.assert_allclose(unum[:, 0], [0.0, 0.0, 20.0])
    icat, inum = enc.encode_items(ds.items)
    # train item rows: 10, 11, 10 -> tags {1}, authors {100, 101}; item 12: tag 2 unseen -> 0, author 100 -> 1
    np.testing.assert_array_equal(icat, [[1, 1, 1], [2, 1, 2], [0, 0, 1]])
    # duration over train rows [1, 3, 1]: mean 5/3, std sqrt(8/9)
    np.testing.assert_allclose(inum[:, 0], (np.array([1.0, 3.0, 1000.0]) - 5 / 3) / math.sqrt(8 / 9), rtol=1e-6)
    assert enc.spec().cat_cardinality == (3, 3, 3, 2, 3, 3, 3)  # user_id, city, item_id, tag, author, hour, tab
    assert enc.spec().num_sides == ("user", "item", "privileged", "privileged")

    enc2 = FeatureEncoder(ds.schema, min_count=2).fit(ds, train)
    # counts over train rows: city a x2, b x1 -> only a survives; item 10 x2 kept, 11 x1 -> OOV
    np.testing.assert_array_equal(enc2.encode_users(ds.users)[0][:, 1], [1, 0, 0])
    np.testing.assert_array_equal(enc2.encode_items(ds.items)[0][:, 0], [1, 0, 0])


def test_encoder_log_standardize_and_quantile():
    ds, train = _tiny_dataset()
    enc = FeatureEncoder(ds.schema, numeric="log_standardize").fit(ds, train)
    # log1p([1, 3, 1]) = [a, 2a, a] with a = ln 2: mean 4a/3, std a*sqrt(2)/3 -> item 11: (2a/3)/(a sqrt2/3) = sqrt 2
    inum = enc.encode_items(ds.items)[1][:, 0]
    assert inum[1] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert inum[0] == pytest.approx(-1 / math.sqrt(2), rel=1e-6)

    encq = FeatureEncoder(ds.schema, numeric="quantile", n_buckets=2).fit(ds, train)
    # median of train durations [1, 3, 1] = 1 -> edges [1]; code = searchsorted(right) + 1:
    # 0.5 -> 1, 1 -> 2, 3 -> 2; duration moves to cat with cardinality len(edges) + 2 = 3
    icat, inum = encq.encode_items(pd.DataFrame({"item_id": [10, 10, 10], "tag": [1] * 3, "author_id": [100] * 3,
                                                 "duration": [0.5, 1.0, 3.0]}))
    assert encq.item_spec().cat_names[-1] == "duration" and encq.item_spec().cat_cardinality[-1] == 3
    np.testing.assert_array_equal(icat[:, -1], [1, 2, 2])
    assert inum.shape == (3, 0)


def test_encoder_save_load_encodes_identically_and_unseen_to_oov(tmp_path):
    ds = _random_dataset(seed=3)
    masks = time_split(ds)
    store = CrossFeatureStore(window_days=2).fit(ds.impressions, ds.items)
    enc = FeatureEncoder(ds.schema, numeric="quantile", n_buckets=4).fit(ds, masks["train"], store)
    enc.save(tmp_path / "enc")
    enc2 = FeatureEncoder.load(tmp_path / "enc")
    assert enc2.spec() == enc.spec()
    new_users = ds.users.copy()
    new_users.loc[0, "city"] = "never-seen"
    new_users.loc[1, "user_id"] = 99999
    for a, b in zip(enc.encode_users(new_users) + enc.encode_items(ds.items) + enc.encode_context(ds.impressions),
                    enc2.encode_users(new_users) + enc2.encode_items(ds.items) + enc2.encode_context(ds.impressions)):
        np.testing.assert_array_equal(a, b)
    cat = enc2.encode_users(new_users)[0]
    assert cat[0, 1] == 0 and cat[1, 0] == 0  # unseen city, unseen user id -> OOV
    t1 = build_encoded(ds, masks, enc, store)["test"]
    t2 = build_encoded(ds, masks, enc2, store)["test"]
    np.testing.assert_array_equal(t1.cat, t2.cat)
    np.testing.assert_array_equal(t1.num, t2.num)
    # an altered npz is refused by name
    p = tmp_path / "enc" / "feature_encoder.npz"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="feature_encoder.npz"):
        FeatureEncoder.load(tmp_path / "enc")


def test_arrays_are_encoded_as_their_dataframe_is():
    """A mapping of numpy arrays (a serving request's columns, read without pandas) encodes exactly as the same
    columns in a DataFrame: int, bool, float with a missing value, whole floats as categorical keys, strings."""
    from cascade.data.features.columns import cat_keys, float_values

    cols = {"i": np.array([3, 7, 3], np.int32), "b": np.array([True, False, True]),
            "f": np.array([1.0, np.nan, 2.0]), "w": np.array([4.0, 5.0, np.nan]),
            "s": np.array(["x", "y", "x"], dtype=object)}
    frame = pd.DataFrame(cols)
    for name, arr in cols.items():
        want = cat_keys(frame[name], "t", name)
        got = cat_keys(arr, "t", name)
        np.testing.assert_array_equal(got[0][got[1]], want[0][want[1]])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2] == want[2]
        if name != "s":
            np.testing.assert_array_equal(float_values(arr, "t", name), float_values(frame[name], "t", name))
    assert cat_keys(cols["i"], "t", "i", kind="str")[0].tolist() == ["3", "7", "3"]  # the fitted kind wins
    with pytest.raises(DataValidationError, match="non-integer float 1.5"):
        cat_keys(np.array([1.5]), "t", "w")
    with pytest.raises(DataValidationError, match="infinite"):
        float_values(np.array([1.0, np.inf]), "t", "f")
    with pytest.raises(DataValidationError, match="numeric column 's'"):
        float_values(cols["s"], "t", "s")
    ds = _random_dataset(seed=4)
    enc = FeatureEncoder(ds.schema).fit(ds, time_split(ds)["train"])
    ctx = ds.impressions.iloc[:50]
    as_arrays = {c: ctx[c].to_numpy() for c in ctx.columns}
    for a, b in zip(enc.encode_context(ctx), enc.encode_context(as_arrays, n_rows=len(ctx))):
        np.testing.assert_array_equal(a, b)


def test_encoder_bad_input_errors():
    ds, train = _tiny_dataset()
    with pytest.raises(ValueError, match="numeric='zscore'"):
        FeatureEncoder(ds.schema, numeric="zscore").fit(ds, train)
    enc = FeatureEncoder(ds.schema).fit(ds, train)
    with pytest.raises(DataValidationError, match="'city'"):
        enc.encode_users(ds.users.drop(columns=["city"]))

def test_a_log1p_column_takes_a_negative_value_met_after_train_on_the_mirrored_curve():
    """duration is non-negative in train (log1p over train rows [1, 3, 1]); -5 met later (validation, a served
    request) encodes as -log1p(5), in order below 0, where it used to stop the run and fail a served batch."""
    ds, train = _tiny_dataset()
    enc = FeatureEncoder(ds.schema).fit(ds, train)
    x = np.log1p(np.array([1.0, 3.0, 1.0]))
    mean, std = x.mean(), x.std()
    later = ds.items.copy()
    later["duration"] = [1.0, -5.0, 0.0]
    _, num = enc.encode_items(later)
    np.testing.assert_allclose(num[:, 0], (np.array([np.log1p(1.0), -np.log1p(5.0), 0.0]) - mean) / std, rtol=1e-6)
    np.testing.assert_array_equal(enc.encode_items(ds.items)[1][:, 0],  # train's range: log1p as before
                                  ((np.log1p(np.array([1.0, 3.0, 1000.0])) - mean) / std).astype(np.float32))


# ---------------------------------------------------------------------------------------------------- cross


def _hand_store() -> CrossFeatureStore:
    items = pd.DataFrame({"item_id": [10, 11, 12], "tag": [1, 1, 2], "author_id": [100, 101, 100]})
    ev = pd.DataFrame({  # e1..e5
        "user_id": [1, 1, 1, 2, 1],
        "item_id": [10, 11, 12, 10, 10],
        "time_ms": [1000, 2000, 3000, 3000, DAY_MS + 2500],
        "click": [1, 0, 1, 0, 1],
    })
    return CrossFeatureStore(window_days=1, prior_ctr=0.1, prior_strength=20).fit(ev, items)


def test_cross_hand_worked():
    store = _hand_store()
    q = store.query(np.array([1, 1, 2, 9, 1]), np.array([11, 12, 10, 10, 10]),
                    np.array([3000, DAY_MS + 2500, 3000, 10**12, DAY_MS + 1000]))
    # q0 (u1, item 11 tag 1 author 101, t=3000): window [3000-DAY, 3000) holds e1, e2 (e3/e4 at t=3000 are not
    #   strictly earlier). u1 on tag 1: e1 (click), e2 -> 1/2; on author 101: e2 -> 0/1; item 11: e2 -> 0/1,
    #   ctr (0 + 2) / (1 + 20) = 2/21; u1: e1, e2 -> 1/2, ctr (1 + 2) / (2 + 20) = 3/22.
    # q1 (u1, item 12 tag 2 author 100, t=DAY+2500): window [2500, DAY+2500) holds e3, e4 (e5 at t not counted).
    #   u1 tag 2: e3 -> 1/1; author 100: e3 -> 1/1 (e1 is out of the window); item 12: e3 -> 1/1; u1: e3 -> 1/1.
    # q2 (u2, item 10, t=3000): u2 has only e4 at 3000 -> zeros; item 10: e1 -> 1/1, ctr 3/21.
    # q3 (unknown user 9, t far in the future): nothing in the window -> zeros, ctr = prior 2/20.
    # q4 (u1, item 10 tag 1 author 100, t=DAY+1000): window [1000, DAY+1000) includes e1 at exactly t - W:
    #   tag 1: e1, e2 -> 1/2; author 100: e1, e3 -> 2/2; item 10: e1, e4 -> 1/2; u1: e1, e2, e3 -> 2/3.
    exp = {
        "user_tag_clicks": [1, 1, 0, 0, 1], "user_tag_exposures": [2, 1, 0, 0, 2],
        "user_author_clicks": [0, 1, 0, 0, 2], "user_author_exposures": [1, 1, 0, 0, 2],
        "item_clicks": [0, 1, 1, 0, 1], "item_exposures": [1, 1, 1, 0, 2],
        "item_ctr": [2 / 21, 3 / 21, 3 / 21, 2 / 20, 3 / 22],
        "user_clicks": [1, 1, 0, 0, 2], "user_exposures": [2, 1, 0, 0, 3],
        "user_ctr": [3 / 22, 3 / 21, 2 / 20, 2 / 20, 4 / 23],
        # u1's own history of the very item in the window: q0 item 11 (e2, no click); q1 item 12 (e3, a click);
        # q4 item 10 (e1, a click); u2 / the unknown user none
        "user_item_clicks": [0, 1, 0, 0, 1], "user_item_exposures": [1, 1, 0, 0, 1],
        # "recent" = the last DAY / 7 before t: q0 [3000 - DAY/7, 3000) holds e1, e2 -> item 11 has e2;
        # q1 [DAY + 2500 - DAY/7, DAY + 2500): nothing of item 12 (e3 is at t=3000, long before); q2 item 10: e1;
        # q4 [DAY + 1000 - DAY/7, DAY + 1000): item 10's e1 (t=1000) and e4 (t=3000) are older, e5 is later
        "item_recent_clicks": [0, 0, 1, 0, 0], "item_recent_exposures": [1, 0, 1, 0, 0],
    }
    assert set(q) == set(exp)
    for k, v in exp.items():
        assert q[k].dtype == np.float32
        np.testing.assert_allclose(q[k], v, rtol=1e-6, err_msg=k)
    with pytest.raises(DataValidationError, match="unknown item_id 77"):
        store.query(np.array([1]), np.array([77]), np.array([5]))


def _brute_force(ev: pd.DataFrame, items: pd.DataFrame, u: int, i: int, t: int, w: int) -> dict[str, float]:
    row = items.set_index("item_id").loc[i]
    ev = ev[(ev.time_ms < t) & (ev.time_ms >= t - w)].merge(items, on="item_id")
    mine = ev[ev.user_id == u]
    ut = mine[mine.tag == row.tag]
    ua = mine[mine.author_id == row.author_id]
    it = ev[ev.item_id == i]
    return {"user_tag_clicks": ut.click.sum(), "user_tag_exposures": len(ut), "user_author_clicks": ua.click.sum(),
            "user_author_exposures": len(ua), "item_clicks": it.click.sum(), "item_exposures": len(it),
            "item_ctr": (it.click.sum() + 0.5) / (len(it) + 5), "user_clicks": mine.click.sum(),
            "user_item_clicks": mine[mine.item_id == i].click.sum(), "user_item_exposures": (mine.item_id == i).sum(),
            "item_recent_clicks": it[it.time_ms >= t - w // 7].click.sum(),
            "item_recent_exposures": (it.time_ms >= t - w // 7).sum(),
            "user_exposures": len(mine), "user_ctr": (mine.click.sum() + 0.5) / (len(mine) + 5)}


def test_cross_matches_brute_force_on_random_table():
    rng = np.random.default_rng(7)
    items = pd.DataFrame({"item_id": rng.permutation(40) * 3 + 1, "tag": rng.choice(["x", "y", "z"], 40),
                          "author_id": rng.integers(0, 6, 40)})
    n = 400
    # sparse user ids (x 10**12) take the binary-search id lookup, the compact item ids the lookup table
    ev = pd.DataFrame({"user_id": rng.integers(0, 8, n) * 10**12, "item_id": rng.choice(items.item_id, n),
                       "time_ms": rng.integers(0, 5000, n) * 1000,  # coarse times: many exact ties
                       "click": rng.integers(0, 2, n)})
    w = int(1.5 * DAY_MS) // 100_000  # window_days * DAY_MS = 1296 s, i.e. about a quarter of the span
    store = CrossFeatureStore(window_days=w / DAY_MS, prior_ctr=0.1, prior_strength=5).fit(ev, items)
    nq = 150
    qu = rng.integers(0, 10, nq) * 10**12  # users 8e12, 9e12 have no events
    qi = rng.choice(items.item_id, nq)
    qt = np.concatenate([rng.choice(ev.time_ms, nq // 2), rng.integers(-1000, 6_000_000, nq - nq // 2)])
    got = store.query(qu, qi, qt)
    for k in range(nq):
        ref = _brute_force(ev, items, qu[k], qi[k], qt[k], w)
        for name, v in ref.items():
            assert got[name][k] == pytest.approx(v, rel=1e-6), (k, name)


def test_cross_features_do_not_leak_later_labels():
    ds = _random_dataset(seed=11, n_requests=120)
    imp = ds.impressions
    start = request_start_ms(imp)
    # a cut inside a multi-row request: its first row is before, later rows at/after the cut
    multi = imp.groupby("request_id")["time_ms"].transform("size").to_numpy() >= 3
    t_cut = int(start[multi][len(start[multi]) // 2]) + 5  # between the request's 1st (+0) and 2nd (+10) row
    before = start < t_cut
    assert (before & (imp["time_ms"].to_numpy() >= t_cut)).any()  # some rows straddle the cut
    store = CrossFeatureStore(window_days=2).fit(imp, ds.items)
    q1 = store.query_impressions(imp)
    flipped = imp.copy()
    late = flipped["time_ms"].to_numpy() >= t_cut
    flipped.loc[late, "click"] = 1 - flipped.loc[late, "click"]
    flipped.loc[late,
                "play_time_ms"] = np.random.default_rng(0).permutation(flipped.loc[late, "play_time_ms"].to_numpy())
    q2 = CrossFeatureStore(window_days=2).fit(flipped, ds.items).query_impressions(flipped)
    changed = np.zeros(len(imp), bool)
    for k in q1:
        np.testing.assert_array_equal(q1[k][before], q2[k][before], err_msg=k)
        changed |= q1[k] != q2[k]
    assert changed[~before].any()  # the flip is visible to later rows, so the check above could fail
    # all rows of a request see the same history: user-level features are constant within a request
    for k in ("user_clicks", "user_exposures", "user_ctr"):
        per_req = pd.Series(q1[k]).groupby(imp["request_id"].to_numpy()).nunique()
        assert (per_req == 1).all(), k


# ---------------------------------------------------------------------------------------------------- assembly


def test_build_encoded_layout_and_pairs_match():
    ds = _random_dataset(seed=5)
    masks = time_split(ds)
    store = CrossFeatureStore(window_days=3).fit(ds.impressions, ds.items)
    enc = FeatureEncoder(ds.schema).fit(ds, masks["train"], store)
    tables = build_encoded(ds, masks, enc, store)
    assert set(tables) == {"train", "valid", "test"}
    assert sum(len(t) for t in tables.values()) == len(ds.impressions)
    tr = tables["train"]
    assert isinstance(tr, EncodedTable) and tr.cat.dtype == np.int64 and tr.num.dtype == np.float32
    spec = tr.spec
    # num layout: user [age], item [duration], context [] (hour, tab are categorical), 14 cross, 2 privileged
    assert spec.num_index("cross") == list(range(2, 16))
    assert spec.num_names[:2] == ("age", "duration") and spec.num_names[-2:] == ("play_time_ms", "long_view")
    # cross columns are log1p-standardised with train statistics: mean 0 and std 1 (or 0 if constant) on train
    x = tr.num[:, spec.num_index("cross")].astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    assert np.all(np.isclose(x.std(axis=0), 1, atol=1e-4) | np.isclose(x.std(axis=0), 0))
    sub = ds.impressions[masks["train"]]
    np.testing.assert_array_equal(tr.label, sub["click"].to_numpy())
    np.testing.assert_array_equal(tr.extra["play_time_ms"], sub["play_time_ms"].to_numpy(np.float32))
    # cat vocab indices stay within cardinality
    assert np.all(tr.cat < np.array(spec.cat_cardinality)) and np.all(tr.cat >= 0)

    pe = PairEncoder(enc, store, ds.users, ds.items)
    te = tables["test"]
    tsub = ds.impressions[masks["test"]]
    cat, num = pe.encode_pairs(te.user_id, te.item_id, request_start_ms(ds.impressions)[masks["test"]],
                               {"hour": tsub["hour"].to_numpy(), "tab": tsub["tab"].to_numpy()})
    nonpriv = spec.select("user", "item", "context", "cross")
    assert pe.spec == nonpriv
    np.testing.assert_array_equal(cat, te.cat[:, spec.cat_index("user", "item", "context", "cross")])
    np.testing.assert_array_equal(num, te.num[:, spec.num_index("user", "item", "context", "cross")])
    # scalar context and time broadcast over candidates (one serving request)
    c1, n1 = pe.encode_pairs(np.full(3, te.user_id[0]), te.item_id[:3], int(te.time_ms[0]), {"hour": 7, "tab": 1})
    assert c1.shape == (3, len(nonpriv.cat_names)) and n1.shape == (3, len(nonpriv.num_names))
    assert (c1[:, nonpriv.cat_names.index("hour")] == c1[0, nonpriv.cat_names.index("hour")]).all()

    no_priv = build_encoded(ds, masks, enc, store, privileged=False)["valid"]
    assert no_priv.spec == nonpriv and "play_time_ms" not in no_priv.extra


def test_a_column_constant_up_to_rounding_standardises_with_scale_one_as_scikit_learn_decides():
    """The encoder's column statistics are axis-0 reductions of a 2-D array, whose rounding leaves a constant column a
    std of about 1e-14 (a custom log's user CTR, the same on every train row, then made every validation value
    ~1e13 and the teacher's scores ~1e30). scale() calls such a column constant as scikit-learn's StandardScaler
    does (scale 1), keeps a real spread, and keeps the absolute floor for spreads too small for float32."""
    from sklearn.preprocessing import StandardScaler

    from cascade.data.features.columns import scale

    c = float(np.log1p(np.float64(np.float32(0.1))))
    for n in (5192, 10346, 100_000):
        x = np.tile(np.array([[c, 0.0]]), (n, 1))
        x[:, 1] = np.linspace(0.0, 1.0, n)
        mean, std = x.mean(axis=0), x.std(axis=0)
        assert 0 < std[0] < 1e-12  # the rounding this guards against
        got = scale(std, mean, n)
        np.testing.assert_allclose(got, StandardScaler().fit(x).scale_)
        assert got[0] == 1.0 and got[1] == pytest.approx(std[1])
        assert abs((0.5 - mean[0]) / got[0] - (0.5 - c)) < 1e-12  # an unseen value stays on its own scale
        assert scale(std[0], mean[0], n) == 1.0  # a scalar as the numeric columns' fit passes it
    # a spread below 10 machine epsilons is constant too (0 and 4e-110: std 2e-110), and a plain column is kept
    assert scale(2e-110, 2e-110, 2) == 1.0 and scale(0.25, 3.0, 2) == 0.25
