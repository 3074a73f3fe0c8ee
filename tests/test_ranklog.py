"""Candidate sampler, rank-log writer / reader, sharding and hash verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade.artifacts import ArtifactError
from cascade.data.sampling import CdfSampler
from cascade.distill.ranklog import RankLog, build_rank_log, merge_manifests, sample_candidates
from worlds import rank_log_world


def _no_repeats(c: np.ndarray) -> bool:
    s = np.sort(np.where(c < 0, -np.arange(1, c.shape[1] + 1)[None, :], c), axis=1)  # pads become distinct
    return bool((s[:, 1:] != s[:, :-1]).all())


def test_sampler_impressed_first_no_repeats_and_size():
    rng = np.random.default_rng(0)
    imp = np.array([[7, 7, 3, -1], [-1, -1, -1, -1], [0, 1, 2, 9]])
    c = sample_candidates(imp, n_items=50, n_candidates=12, rng=rng)
    assert c.shape == (3, 12) and c.dtype == np.int64
    # the repeated 7 is kept once, in order, before any sample
    assert c[0, :2].tolist() == [7, 3]
    assert c[2, :4].tolist() == [0, 1, 2, 9]
    assert (c >= 0).all() and (c < 50).all()
    assert _no_repeats(c)


def test_sampler_small_corpus_pads_with_minus_one():
    # 7 items, 10 slots: every row holds all 7 items once, then 3 pads
    imp = np.array([[6, -1], [2, 4]])
    c = sample_candidates(imp, n_items=7, n_candidates=10, rng=np.random.default_rng(1))
    assert (c[:, 7:] == -1).all()
    assert (np.sort(c[:, :7], axis=1) == np.arange(7)).all()
    assert c[0, 0] == 6 and c[1, :2].tolist() == [2, 4]


def test_sampler_popularity_weighting_effect():
    n_items, r = 1000, 400
    w = np.ones(n_items)
    w[:20] = 200.0  # the 20 "head" items hold 20*200 / (20*200 + 980) = 80.3% of the popularity mass
    imp = np.full((r, 1), -1)
    pop = sample_candidates(imp, n_items, 10, pop_weights=w, uniform_frac=0.0, rng=np.random.default_rng(2))
    uni = sample_candidates(imp, n_items, 10, pop_weights=w, uniform_frac=1.0, rng=np.random.default_rng(2))
    mix = sample_candidates(imp, n_items, 10, pop_weights=w, uniform_frac=0.5, rng=np.random.default_rng(2))
    def head(c):
        return float((c < 20).mean())
    # uniform: 10 of 1000 per row -> head share 20/1000 = 0.02. Pure popularity without replacement: the first
    # draws are mostly head items, so well over half the slots; the 50/50 mix lies in between.
    assert head(uni) < 0.05
    assert head(pop) > 0.5
    assert head(uni) < head(mix) < head(pop)
    assert _no_repeats(pop) and _no_repeats(mix)


def test_pop_sampler_equals_binary_search():
    # the guide-table sampler must return exactly the inverse-CDF answer searchsorted(cdf, u * total, "right"),
    # also for zero-weight items (never drawn) and one huge weight beside many tiny ones (long forward scans)
    rng = np.random.default_rng(3)
    for w in (np.r_[np.zeros(5), rng.pareto(1.2, 3000), np.zeros(4)], np.r_[1e9, np.full(5000, 1e-6)], np.ones(7)):
        ps = CdfSampler.from_weights(w)
        u = np.r_[0.0, np.nextafter(1.0, 0.0), rng.random(20000)]
        ref = np.minimum(np.searchsorted(np.cumsum(w), u * np.cumsum(w)[-1], side="right"), len(w) - 1)
        got = ps.draw(u)
        np.testing.assert_array_equal(got, ref)
        assert (w[got] > 0).all()


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        sample_candidates(np.array([[5]]), n_items=5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="pop_weights"):
        sample_candidates(np.array([[1]]), n_items=5, pop_weights=np.ones(4), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        sample_candidates(np.array([[1]]), n_items=5)


# ---------------------------------------------------------------------------------------------------------------

def test_rank_log_round_trip(tmp_path):
    requests, cand, scorer, item_ids, expected, calls = rank_log_world()
    man = build_rank_log(requests, cand, scorer, tmp_path, requests_per_batch=8, shard_rows=100,
                         progress=False, item_ids=item_ids)
    assert calls == [8, 8, 8, 8, 5]  # 37 requests in batches of 8
    n_pairs = int((cand >= 0).sum())
    assert man["n_rows"] == n_pairs and man["n_requests"] == 37
    assert len(man["shards"]) > 1 and sum(s["rows"] for s in man["shards"]) == n_pairs

    rl = RankLog(tmp_path)
    valid = cand >= 0
    assert len(rl) == 37 and rl.width == 9
    np.testing.assert_array_equal(rl.items, cand)
    np.testing.assert_array_equal(rl.mask, valid)
    np.testing.assert_allclose(rl.logits[valid], expected[valid], rtol=1e-6)
    np.testing.assert_array_equal(rl.request_rows, np.arange(37))
    np.testing.assert_array_equal(rl.request_ids, requests["request_id"].to_numpy())
    np.testing.assert_array_equal(rl.user_rows, requests["user_row"].to_numpy())
    # rank = 1 + number of valid candidates with a higher logit (logits are distinct here), 0 at pads
    higher = (rl.logits[:, None, :] > rl.logits[:, :, None]) & valid[:, None, :]
    np.testing.assert_array_equal(rl.ranks, np.where(valid, 1 + higher.sum(-1), 0))
    rl.check_inputs(item_ids, request_ids=requests["request_id"].to_numpy())
    with pytest.raises(ArtifactError, match="another encoding"):
        rl.check_inputs(item_ids[::-1].copy())

    got = [b["items"] for b in rl.batches(10, rng=np.random.default_rng(0))]
    assert [len(g) for g in got] == [10, 10, 10, 7]
    assert sorted(np.concatenate([g.numpy() for g in got]).tolist()) == sorted(cand.tolist())


def test_rank_log_detects_corrupt_shard(tmp_path):
    requests, cand, scorer, item_ids, _, _ = rank_log_world()
    man = build_rank_log(requests, cand, scorer, tmp_path, requests_per_batch=8, shard_rows=100, progress=False)
    victim = tmp_path / man["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=victim.name):
        RankLog(tmp_path)


def test_sharded_build_and_merge_equals_one_pass(tmp_path):
    requests, cand, scorer, item_ids, _, _ = rank_log_world(r=41)
    build_rank_log(requests, cand, scorer, tmp_path / "one", requests_per_batch=16, progress=False, item_ids=item_ids)
    for k in (1, 0):  # order of workers does not matter
        m = build_rank_log(requests, cand, scorer, tmp_path / "sh", requests_per_batch=16, n_shards=2,
                           shard_index=k, progress=False, item_ids=item_ids)
        assert m["request_row_range"] == ([0, 20] if k == 0 else [20, 41])  # linspace(0, 41, 3) rounded
    merged = merge_manifests(tmp_path / "sh", n_shards=2)
    assert merged["n_requests"] == 41 and merged["n_rows"] == int((cand >= 0).sum())
    a, b = RankLog(tmp_path / "one"), RankLog(tmp_path / "sh")
    for name in ("items", "ranks", "logits", "mask", "request_rows", "request_ids", "user_rows", "time_ms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_merge_refuses_missing_shard(tmp_path):
    requests, cand, scorer, _, _, _ = rank_log_world(r=20)
    build_rank_log(requests, cand, scorer, tmp_path, n_shards=3, shard_index=0, progress=False)
    build_rank_log(requests, cand, scorer, tmp_path, n_shards=3, shard_index=2, progress=False)
    with pytest.raises(ArtifactError, match="shard-00001-of-00003"):
        merge_manifests(tmp_path, n_shards=3)


def test_build_rejects_bad_scorer_and_requests(tmp_path):
    requests, cand, scorer, _, _, _ = rank_log_world(r=10)

    def nan_scorer(rows, c):
        out = scorer(rows, c)
        out[rows == 4] = np.nan
        return out

    with pytest.raises(ValueError, match="request_id 1012"):  # request row 4 has id 1000 + 4 * 3
        build_rank_log(requests, cand, nan_scorer, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="shape"):
        build_rank_log(requests, cand, lambda r, c: np.zeros((len(r), 2)), tmp_path / "b", progress=False)
    with pytest.raises(Exception, match="user_row"):
        build_rank_log(requests.drop(columns="user_row"), cand, scorer, tmp_path / "c", progress=False)


def test_sources_round_trip_through_shards(tmp_path):
    requests, cand, scorer, item_ids, _, _ = rank_log_world(r=41)
    # slots 0-2 impressed (0), 3-5 a channel (1), the rest samples (2); -1 at the padded slots
    src = np.where(cand >= 0, np.minimum(np.arange(cand.shape[1]) // 3, 2)[None, :], -1).astype(np.int8)
    names = ["impressed", "popular", "sample"]
    for k in range(2):
        build_rank_log(requests, cand, scorer, tmp_path, requests_per_batch=16, n_shards=2, shard_index=k,
                       progress=False, item_ids=item_ids, sources=src, source_names=names)
    merged = merge_manifests(tmp_path, n_shards=2)
    # 41 lists: 3 impressed and 3 channel slots each; 9 - 6 = 3 sample slots, 2 fewer in the 9 lists r % 5 == 0
    assert merged["source_counts"] == {"impressed": 123, "popular": 123, "sample": 41 * 3 - 9 * 2}
    assert merged["source_share"]["impressed"] == pytest.approx(123 / (41 * 9 - 18))
    rl = RankLog(tmp_path)
    assert rl.source_names == names
    np.testing.assert_array_equal(rl.sources, src)
    np.testing.assert_array_equal(rl.subset(np.array([5, 2])).sources, src[[5, 2]])
    assert RankLog(tmp_path / "shard-00000-of-00002").sources.shape == (20, 9)
    with pytest.raises(ValueError, match="not an index into source_names"):
        build_rank_log(requests, cand, scorer, tmp_path / "bad", progress=False, sources=src,
                       source_names=names[:2])
    plain = build_rank_log(requests, cand, scorer, tmp_path / "plain", progress=False)
    assert "source_names" not in plain and RankLog(tmp_path / "plain").sources is None


def test_workers_score_batches_side_by_side_into_the_same_log(tmp_path):
    requests, cand, scorer, item_ids, _, _ = rank_log_world(r=53)
    torch_threads_seen = []

    def threaded(rows, c):
        torch_threads_seen.append(torch.get_num_threads())
        return scorer(rows, c)

    before = torch.get_num_threads()
    one = build_rank_log(requests, cand, scorer, tmp_path / "one", requests_per_batch=4, shard_rows=60,
                         progress=False, item_ids=item_ids)
    three = build_rank_log(requests, cand, threaded, tmp_path / "three", requests_per_batch=4, shard_rows=60,
                           progress=False, item_ids=item_ids, workers=3)
    assert torch.get_num_threads() == before  # restored
    assert len(torch_threads_seen) == 14 and set(torch_threads_seen) == {1}  # 53 requests in batches of 4
    # the same parts, byte for byte: the batches are written in their order
    assert [(s["path"], s["rows"], s["sha256"]) for s in one["shards"]] == \
        [(s["path"], s["rows"], s["sha256"]) for s in three["shards"]]
    a, b = RankLog(tmp_path / "one"), RankLog(tmp_path / "three")
    for name in ("items", "ranks", "logits", "request_rows"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    with pytest.raises(ValueError, match="workers must be > 0"):
        build_rank_log(requests, cand, scorer, tmp_path / "bad", progress=False, workers=0)
