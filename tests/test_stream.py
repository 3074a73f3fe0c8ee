"""Tests of the chunked world writer (cascade.data.world.chunked) and the streaming data layer (cascade.data.stream)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from cascade.arrays import PAD
from cascade.artifacts import MANIFEST, read_npz
from cascade.data import stream as S
from cascade.data import world as W
from cascade.data.batches import EncodedTable
from cascade.data.features import CrossFeatureStore, FeatureEncoder, build_encoded
from cascade.data.requests import request_start_ms
from cascade.data.sampling import CdfSampler
from cascade.data.schema import DataValidationError
from cascade.data.split import DAY_MS, SPLITS, time_split
from cascade.data.world import chunked as WS
from cascade.models.ranker import Ranker, RankerConfig
from cascade.train.loop import TrainConfig, fit

TINY = W.WorldConfig(seed=3, n_users=300, n_items=500, n_days=4, mean_requests_per_user=6.0)


def _tables(out: Path) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted((out / WS.IMPRESSIONS_DIR).glob("part-*.parquet"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, WS.StreamWorldResult]:
    out = tmp_path_factory.mktemp("ws_tiny")
    return out, WS.generate_world_stream(out, TINY, chunk_hours=24)


@pytest.fixture(scope="module")
def opened(tiny):
    out, _ = tiny
    sd = S.open_stream_dataset(out)
    return sd, S.read_dataset(sd)


def test_cdf_sampler_on_a_normalised_cdf_is_exactly_the_binary_search():
    rng = np.random.default_rng(0)
    w = np.exp(2.0 * rng.standard_normal(5000))  # heavy-tailed: slices with many tiny items and huge items
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    u = np.concatenate([rng.random(200_000), cdf[:50], np.nextafter(cdf[:50], 0), [0.0, np.nextafter(1.0, 0)]])
    got = CdfSampler(cdf, max_steps=2).draw(u)
    np.testing.assert_array_equal(got, np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


def test_writer_is_deterministic_and_side_tables_match_the_in_memory_world(tiny, tmp_path):
    out, res = tiny
    again = WS.generate_world_stream(tmp_path / "again", TINY, chunk_hours=24)
    a, b = _tables(out), _tables(tmp_path / "again")
    assert len(a) == res.n_chunks == 4 and all(x.equals(y) for x, y in zip(a, b))
    assert again.rows_per_chunk == res.rows_per_chunk == [t.num_rows for t in a]
    # same seeded draws before the simulation: side tables and latent arrays are bit-identical to generate_world's
    mem = tmp_path / "mem"
    W.generate_world(mem, TINY)
    for f in (W.USER_FEATURES_FILE, W.VIDEO_FEATURES_FILE):
        assert (mem / f).read_bytes() == (out / f).read_bytes()
    sa, sb = read_npz(mem / W.WORLD_STATE), read_npz(out / W.WORLD_STATE)
    for k in W.World._ARRAY_KEYS:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    # rows sorted by (request_id, position); request ids dense from 0 in order of request start time
    t = pa.concat_tables(a).to_pandas()
    rid = t["request_id"].to_numpy()
    assert rid[0] == 0 and np.all(np.diff(rid) >= 0) and len(np.unique(rid)) == rid[-1] + 1
    start = t.groupby("request_id")["time_ms"].min().to_numpy()
    assert np.all(np.diff(start) >= 0)
    assert t["position"].to_numpy()[np.r_[True, np.diff(rid) > 0]].max() == 0


def test_impressions_follow_the_in_memory_model(tmp_path):
    """Same distribution, other random stream: summaries of two worlds of ~30k rows agree within sampling noise
    (standard errors: CTR ~0.003, position-0 CTR ~0.006, random-slice CTR ~0.015; tolerances ~4 sigma). A chunk
    rate without the 1 / n_days factor would give 4x the rows; a wrong position model moves the position CTRs."""
    cfg = W.WorldConfig(seed=5, n_users=800, n_items=3000, n_days=4, mean_requests_per_user=8.0)
    mem = W.generate_world(tmp_path / "mem", cfg).summary()
    st = WS.generate_world_stream(tmp_path / "st", cfg, chunk_hours=7).summary
    assert abs(st["rows"] / mem["rows"] - 1.0) < 0.05
    assert abs(st["rows_random"] / st["rows"] - mem["rows_random"] / mem["rows"]) < 0.01
    assert abs(st["ctr_standard"] - mem["ctr_standard"]) < 0.015
    assert abs(st["ctr_random"] - mem["ctr_random"]) < 0.06
    for p in (0, 3, 5):
        assert abs(st["ctr_by_position_standard"][p] - mem["ctr_by_position_standard"][p]) < 0.03
    assert abs(st["long_view_rate_of_clicks"] - mem["long_view_rate_of_clicks"]) < 0.03


def test_killed_write_resumes_or_restarts_into_the_same_dataset(tiny, tmp_path, monkeypatch):
    out, res = tiny
    ref = _tables(out)
    real = WS._simulate_chunk
    calls = {"n": 0}

    def dies_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    for resume in (True, False):
        d = tmp_path / f"resume_{resume}"
        calls["n"] = 0
        monkeypatch.setattr(WS, "_simulate_chunk", dies_after_two)
        with pytest.raises(KeyboardInterrupt):
            WS.generate_world_stream(d, TINY, chunk_hours=24)
        monkeypatch.setattr(WS, "_simulate_chunk", real)
        assert not (d / MANIFEST).exists() and len(_tables(d)) == 2
        r = WS.generate_world_stream(d, TINY, chunk_hours=24, resume=resume)
        assert r.resumed_from == (2 if resume else 0)
        got = _tables(d)
        assert len(got) == 4 and all(x.equals(y) for x, y in zip(got, ref))
        assert r.summary == res.summary and not (d / WS.PROGRESS).exists()
        S.open_stream_dataset(d)  # the manifest and its part files are valid


def test_kill_between_part_and_checkpoint_rewrites_that_part(tiny, tmp_path, monkeypatch):
    out, _ = tiny
    real = WS.write_npz
    calls = {"n": 0}

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    d = tmp_path / "w"
    monkeypatch.setattr(WS, "write_npz", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        WS.generate_world_stream(d, TINY, chunk_hours=24)
    monkeypatch.setattr(WS, "write_npz", real)
    assert len(_tables(d)) == 2  # part 1 written, its checkpoint not
    r = WS.generate_world_stream(d, TINY, chunk_hours=24)
    assert r.resumed_from == 1
    assert all(x.equals(y) for x, y in zip(_tables(d), _tables(out)))
    with pytest.raises(FileExistsError, match="another config"):
        WS.generate_world_stream(d, TINY, chunk_hours=12)


def test_stream_split_equals_time_split(opened):
    sd, ds = opened
    masks = time_split(ds, valid_days=1, test_days=1, utc_offset_hours=8.0)
    sp = S.stream_time_split(sd, 1, 1, utc_offset_hours=8.0, batch_rows=997)
    assert sp.rows == {k: int(m.sum()) for k, m in masks.items()}
    codes = np.concatenate([sp.part_of(df["request_start_ms"].to_numpy()) for df in S.scan(sd, [], 997)])
    np.testing.assert_array_equal(codes, np.select([masks["train"], masks["valid"]], [0, 1], 2))


@pytest.mark.parametrize("numeric,min_count", [("log_standardize", 3), ("quantile", 1), ("standardize", 20)])
def test_streaming_fit_equals_in_memory_fit(opened, numeric, min_count):
    sd, ds = opened
    masks = time_split(ds, utc_offset_hours=8.0)
    ref = FeatureEncoder(ds.schema, min_count=min_count, numeric=numeric, n_buckets=8).fit(ds, masks["train"])
    sp = S.stream_time_split(sd, utc_offset_hours=8.0, batch_rows=1500)
    got = S.fit_encoder_stream(sd, sp, min_count=min_count, numeric=numeric, n_buckets=8, batch_rows=1500)
    assert set(got.vocab_) == set(ref.vocab_) and set(got.edges_) == set(ref.edges_)
    for k, v in ref.vocab_.items():
        np.testing.assert_array_equal(got.vocab_[k], v, err_msg=k)
    for k, v in ref.edges_.items():
        np.testing.assert_array_equal(got.edges_[k], v, err_msg=k)
    assert len(got.columns_) == len(ref.columns_)
    for g, r in zip(got.columns_, ref.columns_):
        assert {k: v for k, v in g.items() if k not in ("mean", "std")} == \
               {k: v for k, v in r.items() if k not in ("mean", "std")}
        for k in ("mean", "std"):
            if k in r:
                assert g[k] == pytest.approx(r[k], rel=1e-12, abs=1e-12), (r["name"], k)
    # min_count bites: some item id shown fewer than min_count times in train is out of the vocabulary
    if min_count > 1:
        assert 0 < len(ref.vocab_["item_id"]) < len(np.unique(ds.impressions["item_id"][masks["train"]]))


@pytest.mark.parametrize("cat_dtype", ["int64", "int32"])
def test_chunked_encoding_equals_encoding_at_once(opened, tmp_path, cat_dtype):
    sd, ds = opened
    masks = time_split(ds, utc_offset_hours=8.0)
    sp = S.stream_time_split(sd, utc_offset_hours=8.0)
    enc = S.fit_encoder_stream(sd, sp, min_count=2)
    ref = build_encoded(ds, masks, enc, None, privileged=True)
    got = S.encode_stream(sd, sp, enc, tmp_path / "enc", cat_dtype=cat_dtype, batch_rows=1234)
    for part in ("train", "valid", "test"):
        r, g = ref[part], got[part]
        assert g.spec == r.spec and len(g) == len(r) > 0
        assert isinstance(g.cat, np.memmap) and g.cat.dtype == np.dtype(cat_dtype)
        for k, v in r.arrays().items():
            np.testing.assert_array_equal(g.arrays()[k], v, err_msg=f"{part}/{k}")
            if k != "cat":
                assert g.arrays()[k].dtype == v.dtype, k
    again = S.open_encoded(tmp_path / "enc", "valid", verify=True)
    np.testing.assert_array_equal(again.num, ref["valid"].num)


def test_fit_from_memmapped_table_gives_the_same_weights(opened, tmp_path):
    sd, _ = opened
    sp = S.stream_time_split(sd, utc_offset_hours=8.0)
    enc = S.fit_encoder_stream(sd, sp)
    mm = S.encode_stream(sd, sp, enc, tmp_path / "enc", parts=("train", "valid"), privileged=False,
                         cat_dtype="int32")
    # plain in-memory copies, cat as the int64 of the EncodedTable contract
    mem = {p: EncodedTable.from_arrays(t.spec, {k: np.array(v, dtype=np.int64 if k == "cat" else v.dtype)
                                                for k, v in t.arrays().items()}) for p, t in mm.items()}
    assert not isinstance(mem["train"].cat, np.memmap) and mem["train"].cat.dtype == np.int64
    cfg = TrainConfig(batch_size=256, epochs=1, seed=0, lr=3e-3)
    rcfg = RankerConfig(mlp=(16,), emb_dim=4, sides=("user", "item", "context"))
    states = []
    for tables in (mm, mem):
        model = Ranker(tables["train"].spec, rcfg, seed=0)
        res = fit(model, tables["train"], tables["valid"], cfg)
        states.append((res, model.state_dict()))
    (r1, s1), (r2, s2) = states
    assert r1.best_valid_auc == r2.best_valid_auc > 0.55  # it learned something, identically
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_scan_rejects_non_contiguous_requests(opened, tmp_path):
    sd, _ = opened
    t = pq.read_table(sd.files[0]).slice(0, 50)
    rid = t.column("request_id").to_numpy()[::-1].copy()
    bad = t.set_column(0, "request_id", pa.array(rid))
    pq.write_table(bad, tmp_path / "bad.parquet")
    sd2 = S.StreamDataset(sd.users, sd.items, pads.dataset(str(tmp_path / "bad.parquet")), sd.schema, tmp_path)
    with pytest.raises(DataValidationError, match="request_id' must be non-decreasing"):
        list(S.scan(sd2, []))


# ---- streamed cross features ---------------------------------------------------------------------------------

FIVE = W.WorldConfig(seed=4, n_users=250, n_items=400, n_days=5, mean_requests_per_user=7.0)


@pytest.fixture(scope="module")
def five_days(tmp_path_factory):
    out = tmp_path_factory.mktemp("ws_five")
    WS.generate_world_stream(out, FIVE, chunk_hours=24)
    sd = S.open_stream_dataset(out)
    return sd, S.read_dataset(sd)


@pytest.mark.parametrize("window_days,chunk_days", [(2.0, 1.0), (2.0, 0.3), (10.0, 1.0), (0.25, 0.7)])
def test_windowed_cross_features_equal_the_whole_table_store(five_days, window_days, chunk_days):
    sd, ds = five_days
    imp = ds.impressions
    if chunk_days == 0.3:
        # precondition of this case: its chunks end inside requests (rows of one request on both sides of a
        # boundary; a request's rows share one query time, its start, so its own rows never count)
        chunk_ms = int(round(chunk_days * DAY_MS))
        first = imp.groupby("request_id")["time_ms"].transform("min").to_numpy() // chunk_ms
        assert (imp["time_ms"].to_numpy() // chunk_ms != first).any()
    store = CrossFeatureStore(window_days).fit(imp, ds.items)
    ref = store.query_impressions(imp)
    ref_hist = store.history(imp["user_id"].to_numpy(), request_start_ms(imp), 6)
    wc = S.WindowedCrossFeatures(sd, window_days, chunk_days=chunk_days, batch_rows=700)
    parts = [wc.query_with_history(df["user_id"].to_numpy(), df["item_id"].to_numpy(),
                                   df["request_start_ms"].to_numpy(), 6)
             for df in S.scan(sd, ["user_id", "item_id"], 700)]
    for name in CrossFeatureStore.feature_names:
        got = np.concatenate([p[0][name] for p in parts])
        assert got.dtype == ref[name].dtype == np.float32
        np.testing.assert_array_equal(got, ref[name], err_msg=name)
    assert ref["user_tag_clicks"].max() > 0 and ref["item_exposures"].max() > 0  # the counts are not all zero
    # the behaviour sequences too: the last 6 distinct clicked items in the window, most recent first
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ref_hist)
    assert (ref_hist[:, 0] != PAD).mean() > 0.3 and (ref_hist[:, -1] == PAD).any()
    span_days = (imp["time_ms"].max() - imp["time_ms"].min()) / DAY_MS
    assert wc.n_fits_ >= int(span_days / chunk_days)  # several chunks
    if window_days < span_days:
        # the window bites (a longer one counts more), and the buffer held less than the whole log
        longer = CrossFeatureStore(window_days + 1).fit(imp, ds.items).query_impressions(imp)
        assert (longer["user_exposures"] > ref["user_exposures"]).any()
        assert wc.max_events_ < 0.85 * len(imp)


@pytest.mark.parametrize("window_days,history_length", [(2.0, 6), (10.0, 0)])
def test_streaming_cross_fit_and_encoding_equal_in_memory(five_days, tmp_path, window_days, history_length):
    sd, ds = five_days
    masks = time_split(ds, utc_offset_hours=8.0)
    store = CrossFeatureStore(window_days).fit(ds.impressions, ds.items)
    ref_enc = FeatureEncoder(ds.schema, min_count=2, history_length=history_length).fit(ds, masks["train"], store)
    sp = S.stream_time_split(sd, utc_offset_hours=8.0, batch_rows=900)
    enc = S.fit_encoder_stream(sd, sp, min_count=2, batch_rows=900, cross_window_days=window_days,
                               history_length=history_length)
    assert enc.history_attrs_ == ref_enc.history_attrs_
    assert enc.history_attrs_ == (["item_id", "tag", "author_id"] if history_length else [])
    assert enc.cross_names_ == ref_enc.cross_names_ == list(CrossFeatureStore.feature_names)
    np.testing.assert_allclose(enc.cross_mean_, ref_enc.cross_mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(enc.cross_std_, ref_enc.cross_std_, rtol=1e-12, atol=1e-12)
    assert [c["name"] for c in enc.columns_] == [c["name"] for c in ref_enc.columns_]
    ref = build_encoded(ds, masks, enc, store, privileged=True)
    got = S.encode_stream(sd, sp, enc, tmp_path / "enc", parts=("test", "train", "valid"), batch_rows=900,
                          cross_window_days=window_days)
    assert set(got) == {"train", "valid", "test"}
    for part in SPLITS:
        r, g = ref[part], got[part]
        assert g.spec == r.spec and len(g) == len(r) > 0 and "cross" in r.spec.num_sides
        for k, v in r.arrays().items():
            np.testing.assert_array_equal(g.arrays()[k], v, err_msg=f"{part}/{k}")
    # the cross columns carry information: standardised values are not all equal
    xcols = [j for j, s in enumerate(ref["test"].spec.num_sides) if s == "cross"]
    assert len(xcols) == 14 and np.ptp(got["test"].num[:, xcols], axis=0).min() > 0
    hcols = ref["test"].spec.cat_index("history")
    assert len(hcols) == 3 * history_length
    if history_length:
        assert (got["test"].cat[:, hcols[0]] > 0).mean() > 0.3  # most test rows have a coded history


def test_cross_options_must_match_the_encoder(five_days, tmp_path):
    sd, _ = five_days
    sp = S.stream_time_split(sd, utc_offset_hours=8.0)
    plain = S.fit_encoder_stream(sd, sp)
    with pytest.raises(ValueError, match="without cross features"):
        S.encode_stream(sd, sp, plain, tmp_path / "a", cross_window_days=2.0)
    plain.cross_names_ = list(CrossFeatureStore.feature_names)
    with pytest.raises(ValueError, match="with cross features"):
        S.encode_stream(sd, sp, plain, tmp_path / "b")
    wc = S.WindowedCrossFeatures(sd, 2.0)
    t = int(sd.impressions.to_table(columns=["time_ms"]).column(0).to_numpy().max())
    item = np.array([int(sd.items["item_id"].iloc[0])])
    wc.query(np.array([0]), item, np.array([t]))
    with pytest.raises(ValueError, match="request start order"):
        wc.query(np.array([0]), item, np.array([t - 2 * DAY_MS]))


def test_windowed_cross_rejects_requests_out_of_start_order(five_days, tmp_path):
    sd, _ = five_days
    t = pq.read_table(sd.files[0])
    rid, tm = t.column("request_id").to_numpy(), t.column("time_ms").to_numpy()
    late = rid < np.median(rid)  # the first half of the requests moved two days later: ids no longer in start order
    bad = t.set_column(t.schema.get_field_index("time_ms"), "time_ms", pa.array(tm + late * 2 * DAY_MS))
    pq.write_table(bad, tmp_path / "bad.parquet")
    sd2 = S.StreamDataset(sd.users, sd.items, pads.dataset(str(tmp_path / "bad.parquet")), sd.schema, tmp_path)
    wc = S.WindowedCrossFeatures(sd2, 1.0, batch_rows=100)
    with pytest.raises(DataValidationError, match="start times must be non-decreasing"):
        wc.query(t.column("user_id").to_numpy()[:1], t.column("item_id").to_numpy()[:1],
                 np.array([int(tm.max()) + 3 * DAY_MS]))
