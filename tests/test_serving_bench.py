"""Smoke tests of the serving and soak benchmarks' core functions on a toy corpus (no pipeline run needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serving as bs  # noqa: E402
import bench_soak as bk  # noqa: E402

from cascade.arrays import topk_rows  # noqa: E402
from cascade.data.requests import Requests  # noqa: E402
from cascade.index.exact import clustered_vectors  # noqa: E402
from cascade.index.faiss_index import ItemIndex  # noqa: E402
from cascade.pipeline.run import STEP_NAMES  # noqa: E402

N_ITEMS, DIM, N_USERS = 400, 8, 40


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Items with non-contiguous ids 1000, 1003, ...; users = clustered query vectors; the pre-ranker scores by
    inner product, the ranker by inner product + 3 * item bias, through (cat, num) "pair features"."""
    rng = np.random.default_rng(0)
    xb, xq = clustered_vectors(N_ITEMS, DIM, 10, rng, n_queries=N_USERS, spread=0.5)
    ids = 1000 + 3 * np.arange(N_ITEMS, dtype=np.int64)
    bias = rng.normal(size=N_ITEMS).astype(np.float32)
    index = ItemIndex.build(xb, ids, metric="ip", factory="Flat", device="cpu", omp_threads=1)
    index_dir = tmp_path_factory.mktemp("index")
    index.save(index_dir, model_hash="toy")

    def rows(items):
        return (np.asarray(items) - 1000) // 3

    def user_embed(r):
        return xq[r.user_id]

    def prerank(r, cand):
        return np.einsum("bd,bnd->bn", xq[r.user_id], xb[rows(cand)])

    def pair_features(r, cand):
        users = np.repeat(r.user_id, cand.shape[1])
        return users[:, None], rows(cand).reshape(-1, 1).astype(np.float32)

    def rank_forward(cat, num, list_len):
        u, i = cat[:, 0], num[:, 0].astype(np.int64)
        return np.einsum("nd,nd->n", xq[u], xb[i]) + 3 * bias[i]

    parts = bs.parts_from_callables(user_embed, index, prerank, pair_features, rank_forward)
    requests = Requests(np.arange(N_USERS), np.zeros(N_USERS, np.int64))
    return dict(xb=xb, xq=xq, ids=ids, bias=bias, index=index, index_dir=index_dir, parts=parts, requests=requests)


def test_retrieval_timing_checks_identical_results(toy):
    bare = bs.bare_faiss_copy(toy["index_dir"], toy["index"])
    for b in (1, 16):
        out = bs.time_retrieval(bare, toy["index"], toy["parts"].user_embed, toy["xq"], toy["requests"], k=20,
                                batch_size=b, rounds=2)
        assert out["batch_size"] == b and out["nq"] == N_USERS
        for clock in ("wall", "cpu"):
            assert set(out[clock]["qps"]) == {"bare_faiss", "item_index", "retriever_search", "retriever_full",
                                              "user_tower"}
            assert all(q > 0 for q in out[clock]["qps"].values())
    # the served retriever (with its towers' popularity prior, where they have one) is timed beside them
    served = bs.Retriever(toy["parts"].user_embed, toy["index"])
    out = bs.time_retrieval(bare, toy["index"], toy["parts"].user_embed, toy["xq"], toy["requests"], k=20,
                            batch_size=4, rounds=1, served=served)
    assert out["wall"]["qps"]["retriever_served"] > 0 and "retriever_served" in out["cpu"]["overhead_vs_bare"]
    # a "bare" index over other vectors must be caught: the overhead is only meaningful on identical work
    import faiss

    other = faiss.IndexFlatIP(DIM)
    other.add(np.ascontiguousarray(toy["xb"][::-1]))
    with pytest.raises(AssertionError, match="other items than bare faiss"):
        bs.time_retrieval(other, toy["index"], toy["parts"].user_embed, toy["xq"], toy["requests"], 20, 8, rounds=1)


def test_operating_points_recall_against_exact(toy):
    xb, ids, xq = toy["xb"], toy["ids"], toy["xq"]
    I_ex = bs.exact_ids(xq, xb, ids, 20)
    flat = bs.operating_points(toy["index"], xq, I_ex, 20, nq_single=5)
    assert flat[0]["recall_at_k"] == 1.0 and flat[0]["param"] is None
    ivf, _ = bs.build_index(xb, ids, "IVF16,Flat", seed=0)
    pts = bs.operating_points(ivf, xq, I_ex, 20, values=(1, 16), nq_single=5)
    # nprobe = nlist visits every list: exact search, so recall 1; one list of 16 misses neighbours across clusters
    assert pts[1]["recall_at_k"] == 1.0
    assert pts[0]["recall_at_k"] < 1.0
    assert ivf.nprobe == 16
    # 4 sqrt(n) rounded to a power of two: 4 * sqrt(1e6) = 4000 -> 4096; 4 * sqrt(1e5) = 1265 -> 1024
    assert bs.ivf_nlist(1_000_000) == 4096 and bs.ivf_nlist(100_000) == 1024


def test_breakdown_and_end_to_end_match_the_cascade(toy):
    parts, req = toy["parts"], toy["requests"]
    n_ret, n_pre, k = 50, 20, 5
    bd = bs.stage_breakdown(parts, req, n_ret, n_pre, k)
    assert set(bd) == {"wall", "cpu"}
    assert bd["cpu"]["total"]["n"] == N_USERS and bd["wall"]["rank_forward"]["n"] == N_USERS
    assert parts.retrieval_prior is None and bd["wall"]["retrieval_prior"]["n"] == N_USERS  # timed, nothing to do
    e2e = bs.end_to_end(parts, req, n_ret, n_pre, k, n_batch1=60, batch_size=16, n_batched=70, warmup=3)
    assert e2e["batch1"]["served"] == 60 and e2e["batched"]["served"] == 70  # cycled past the 40 requests
    # the assembled cascade = exact IP top-50 -> IP top-20 -> (IP + 3 bias) top-5, computed here by brute force
    res = parts.cascade.recommend(req, n_ret, n_pre, k)
    s = toy["xq"] @ toy["xb"].T
    top50 = np.argsort(-s, axis=1, kind="stable")[:, :n_ret]
    top20 = np.take_along_axis(top50, np.argsort(-np.take_along_axis(s, top50, 1), axis=1, kind="stable")[:, :n_pre], 1)
    final_s = np.take_along_axis(s, top20, 1) + 3 * toy["bias"][top20]
    want, _ = topk_rows(final_s, toy["ids"][top20], k)
    np.testing.assert_array_equal(res.items, want)


def test_soak_counts_checkpoints_and_drops(toy):
    casc, req = toy["parts"].cascade, toy["requests"]
    flat = bk.soak(casc, req, 50, 1, 50, 20, 5, checkpoints=5, rss=lambda: 100 * bk.MIB)
    assert (flat["sent"], flat["served"], flat["complete"], flat["calls"]) == (50, 50, 50, 50)
    assert [n for n, _ in flat["rss_mib"]] == [0, 10, 20, 30, 40, 50]
    assert flat["checks"]["no_request_dropped"] and flat["checks"]["rss_flat"]
    # batch 7: 8 calls; checkpoint c closes at call ceil(10 c / 7) - 1 = 1, 2, 4, 5, 7 -> sent 14, 21, 35, 42, 50
    grow = iter(np.arange(6) * 50.0 * bk.MIB)  # +50 MiB per checkpoint: 200 MiB over the warm 50 > allowed 20
    out = bk.soak(casc, req, 50, 7, 50, 20, 5, checkpoints=5, rss=lambda: next(grow))
    assert [n for n, _ in out["rss_mib"]] == [0, 14, 21, 35, 42, 50]
    assert out["rss_growth_mib"]["warm_to_end"] == 200.0 and not out["checks"]["rss_flat"]
    # invalid requests (negative user ids) come back as errors: counted as not served
    bad = Requests(np.r_[np.arange(8), [-1, -5]], np.zeros(10, np.int64))
    dropped = bk.soak(casc, bad, 20, 4, 50, 20, 5, checkpoints=2, rss=lambda: 0)
    assert dropped["served"] == 16 and dropped["complete"] == 16 and not dropped["checks"]["no_request_dropped"]

    def result(modes, load, n_items=N_ITEMS):
        return {"args": {"n_requests": 50, "threads": 1, "n_items": n_items, "n_retrieve": 50, "n_prerank": 20,
                         "k": 5, "modes": [m["batch_size"] for m in modes]},
                "machine": {"platform": "toy", "cpu_count": 2, "loadavg_before": [1, 1, 1],
                            "loadavg_after": [load, 1, 1]},
                "date_utc": "2026-01-01T00:00:00Z", "wall_s": load, "peak_rss_mib": 100.0 * load,
                "run": {"index": "Flat", "n_test_requests": N_USERS}, "modes": modes}

    # one process per mode, merged: modes in order, the worst load / longest wall / largest peak RSS kept
    merged = bk.merge_results([result([flat], 1.0), result([out], 3.0)])
    assert [m["batch_size"] for m in merged["modes"]] == [1, 7] and merged["args"]["modes"] == [1, 7]
    assert merged["wall_s"] == 3.0 and merged["peak_rss_mib"] == 300.0 and merged["machine"]["loadavg_after"][0] == 3.0
    with pytest.raises(ValueError, match="different runs or sizes"):
        bk.merge_results([result([flat], 1.0), result([out], 1.0, n_items=7)])
    md = bk.render_markdown(merged)
    assert "| batch 1 | 50 | 50 | 50 |" in md and "rss_flat FAIL" in md and "2 processes" in md


def test_pipeline_config_sets_the_world_size(tmp_path):
    cfg = bs.pipeline_config(12_345, tmp_path, n_users=100, n_days=2)
    assert cfg.data.world.n_items == 12_345 and cfg.data.world.n_users == 100 and cfg.data.world.n_days == 2
    assert cfg.run.name == "serving_w12345" and cfg.index.recall_target == 0.95 and cfg.students.tower.out_dim == 32
    # the channels step is built too (it runs before the index step), with one ALS setting
    assert cfg.channels.als_factors == (128,) and "channels" in STEP_NAMES[:STEP_NAMES.index("index")]


def test_channels_section_times_each_channel_and_checks_the_served_paths(toy):
    from cascade.channels import ALSChannel, ContentChannel, ItemCFChannel, MergedRetriever, PopularChannel
    from cascade.data.history import EventHistory
    from cascade.serve.cascade import Cascade

    rng = np.random.default_rng(1)
    n_ev = 3000
    users, items = rng.integers(N_USERS, size=n_ev), toy["ids"][rng.zipf(1.5, n_ev) % N_ITEMS]
    h = EventHistory(users, items, rng.integers(0, 10 * 86_400_000, n_ev), rng.random(n_ev) < 0.5)
    als = ALSChannel(h, factors=4, iterations=3).fit(h, toy["ids"])
    als.build_index()
    channels = {"popular": PopularChannel(h, 2.0), "itemcf": ItemCFChannel(h, neighbours=10).fit(h, toy["ids"]),
                "content": ContentChannel(h).fit(h, toy["ids"], np.arange(N_ITEMS) % 5), "als": als}
    alone = toy["parts"].cascade
    merged = MergedRetriever({"two_tower": alone.retriever, **channels}, {"two_tower": 0.5, **{c: 0.125 for c in
                                                                                              channels}})
    multi, by_score = (Cascade(merged, alone.preranker, alone.ranker, prerank_quotas=q) for q in (True, False))
    req = Requests(np.arange(N_USERS), np.full(N_USERS, 11 * 86_400_000, np.int64))
    lat = bs.interleaved_latency({"two_tower": alone, "distilled+channels": multi, bs.BY_SCORE: by_score}, req,
                                 50, 20, 5)
    assert lat["two_tower"]["retrieval_channels_ms"] == {}
    assert list(lat["distilled+channels"]["retrieval_channels_ms"]) == ["two_tower", "popular", "itemcf", "content",
                                                                         "als"]
    assert lat["distilled+channels"]["end_to_end_cpu_ms"]["n"] == N_USERS
    paths = bs.channel_paths(merged, req.take(np.arange(10)), 50)
    assert list(paths) == ["popular", "itemcf", "content", "als"]  # the two-tower has no plain path here
    assert all(paths[c]["identical_lists"] for c in ("popular", "itemcf", "content"))
    assert paths["als"]["index"] == "Flat" and paths["als"]["recall_at_50_vs_dense"] == 1.0
    res = {"args": {"threads": 1, "n_users": N_USERS, "n_days": 10, "n_latency": N_USERS, "n_retrieve": 50,
                    "n_prerank": 20, "k": 5, "n_plain": 10},
           "machine": {"platform": "toy", "cpu_count": 2, "loadavg_before": [1, 1, 1], "loadavg_after": [1, 1, 1]},
           "versions": {}, "date_utc": "2026-01-01T00:00:00Z", "wall_s": 1.0,
           "sizes": [{"n_items": 100_000, "channels": merged.names,
                      "quotas": dict(zip(merged.names, merged.quotas.tolist())),
                      "two_tower_index": {"factory": "Flat", "nprobe": None}, "batch1": lat,
                      "channels_step": {"als": {"index": {"factory": "Flat", "recall": {"recall_at_k": 1.0}}}},
                      "channel_paths": paths}]}
    md = bs.render_channels_markdown(res)
    assert "distilled+channels e2e p99" in md and ("PASS" in md or "FAIL" in md)
    assert f"| 100,000 | {bs.BY_SCORE} |" in md  # both pre-rank cuts of the multi-channel cascade are timed
    assert "| 100,000 | als |" in md and "identical" in md and "**differ**" not in md
