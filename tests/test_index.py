"""Item index tests: every index is checked against exact inner-product search on seeded clustered embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from cascade.artifacts import ArtifactError  # noqa: E402
from cascade.eval.metrics import mean_recall_at_k  # noqa: E402
from cascade.index.exact import (  # noqa: E402
    TorchExactIndex,
    clustered_vectors,
    exact_topk,
)
from cascade.index.factory import check_factory, default_factory, parse_factory  # noqa: E402
from cascade.index.faiss_index import (  # noqa: E402
    IDS_FILE,
    INDEX_FILE,
    IndexMismatchError,
    ItemIndex,
    UnreachableRecallError,
)

N, D, N_CLUSTERS, NQ = 20_000, 32, 64, 200


@pytest.fixture(scope="module")
def data():
    """20k clustered, non-normalised item vectors, 200 queries from the same clusters, shuffled non-contiguous ids."""
    xb, xq = clustered_vectors(N, D, N_CLUSTERS, np.random.default_rng(0), n_queries=NQ)
    ids = np.random.default_rng(2).permutation(N).astype(np.int64) * 3 + 1000
    return xb, xq, ids


@pytest.fixture(scope="module")
def ivf(data):
    xb, xq, ids = data
    index = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,Flat", seed=0)
    points = index.sweep(xq, 100)
    return index, points


def _reference_topk(xq, xb, k, metric="ip"):
    """Trusted reference: full score matrix, then a stable sort by (-score, id) per row."""
    s = xq.astype(np.float64) @ xb.astype(np.float64).T
    if metric == "l2":
        s = -((xq[:, None, :].astype(np.float64) - xb[None, :, :]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(xb.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


# ---------------------------------------------------------------- exact search


def test_exact_topk_hand_worked_with_ties_and_padding():
    xb = np.array([[1, 0], [0, 1], [1, 0], [2, 0]], dtype=np.float32)
    xq = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # q0 . xb = [1, 0, 1, 2] -> 3 (2), then 0 and 2 tie at 1: the lower id 0 first, then 2, then 1 (0), then padding
    # q1 . xb = [0, 1, 0, 0] -> 1 (1), then 0, 2, 3 tie at 0: ids in increasing order
    for chunk in (1, 2, 3, 100):  # blocks of 1..all rows must all merge to the same answer
        Dv, I = exact_topk(xq, xb, 5, metric="ip", chunk_rows=chunk, query_rows=1)
        np.testing.assert_array_equal(I, [[3, 0, 2, 1, -1], [1, 0, 2, 3, -1]])
        np.testing.assert_array_equal(Dv, [[2, 1, 1, 0, -np.inf], [1, 0, 0, 0, -np.inf]])
    # ten identical rows: every score ties, so the answer is the first k ids, whatever the block size
    for chunk in (4, 10):
        _, I = exact_topk(np.ones((1, 2)), np.ones((10, 2)), 3, chunk_rows=chunk)
        np.testing.assert_array_equal(I, [[0, 1, 2]])
        _, I = TorchExactIndex(np.ones((10, 2)), "ip", device="cpu", chunk_rows=chunk).search(np.ones((1, 2)), 3)
        np.testing.assert_array_equal(I, [[0, 1, 2]])
    # l2: ||q0 - xb||^2 = [0, 2, 0, 1] -> ids 0, 2 (0), 3 (1), 1 (2)
    Dl, Il = exact_topk(xq[:1], xb, 4, metric="l2", chunk_rows=3)
    np.testing.assert_array_equal(Il, [[0, 2, 3, 1]])
    np.testing.assert_allclose(Dl, [[0, 0, 1, 2]])


def test_exact_and_torch_break_ties_like_a_stable_sort():
    # integer vectors in {-2..2}^4: scores take few values, so most top-k boundaries are ties
    rng = np.random.default_rng(3)
    xb = rng.integers(-2, 3, size=(700, 4)).astype(np.float32)
    xq = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    ref_D, ref_I = _reference_topk(xq, xb, 25)
    D1, I1 = exact_topk(xq, xb, 25, chunk_rows=64, query_rows=7)
    np.testing.assert_array_equal(I1, ref_I)
    np.testing.assert_array_equal(D1, ref_D)
    D2, I2 = TorchExactIndex(xb, "ip", device="cpu", chunk_rows=64, query_rows=7).search(xq, 25)
    np.testing.assert_array_equal(I2, ref_I)
    np.testing.assert_array_equal(D2, ref_D)


def test_exact_chunked_equals_unchunked_and_reference(data):
    xb, xq, _ = data
    xb, xq = xb[:3000], xq[:60]
    D_full, I_full = exact_topk(xq, xb, 50, chunk_rows=10**9, query_rows=10**9)
    D_chunk, I_chunk = exact_topk(xq, xb, 50, chunk_rows=701, query_rows=17)
    np.testing.assert_array_equal(I_chunk, I_full)
    np.testing.assert_allclose(D_chunk, D_full, rtol=1e-6, atol=1e-6)
    ref_D, ref_I = _reference_topk(xq, xb, 50)
    np.testing.assert_array_equal(I_full, ref_I)
    np.testing.assert_allclose(D_full, ref_D, rtol=1e-5, atol=1e-5)
    for metric in ("l2",):
        Dl, Il = exact_topk(xq[:10], xb[:500], 20, metric=metric, chunk_rows=77)
        ref_Dl, ref_Il = _reference_topk(xq[:10], xb[:500], 20, metric=metric)
        np.testing.assert_array_equal(Il, ref_Il)
        np.testing.assert_allclose(Dl, -ref_Dl, rtol=1e-4, atol=1e-4)


def test_recall_at_k_hand_worked():
    # row 0: {1, 2} of {1, 2, 3} found -> 2/3; row 1: reference {4} (rest padding), found -> 1; mean 5/6.
    # One argument order everywhere: the reference (exact ids) first, then what was retrieved.
    I = np.array([[1, 2, 9], [4, 7, 8]])
    I_ref = np.array([[3, 2, 1], [4, -1, -1]])
    assert mean_recall_at_k(I_ref, I) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="no row has a reference id"):
        mean_recall_at_k(np.full((2, 3), -1), I)


def test_exact_rejects_bad_input():
    xb = np.ones((5, 3), dtype=np.float32)
    xb[2, 1] = np.nan
    with pytest.raises(ValueError, match="xb has a non-finite value nan at row 2, column 1"):
        exact_topk(np.ones((1, 3)), xb, 2)
    with pytest.raises(ValueError, match="xb has dimension 4, expected 3"):
        exact_topk(np.ones((1, 3)), np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="metric 'cos' is not supported"):
        exact_topk(np.ones((1, 3)), np.ones((5, 3)), 2, metric="cos")


# ---------------------------------------------------------------- faiss index


def test_flat_equals_exact_inner_product_and_not_l2(data):
    xb, xq, ids = data
    index = ItemIndex.build(xb, ids, metric="ip", factory="Flat")
    assert index.is_exact and index.backend == "faiss-cpu"
    scores, got = index.search(xq, 100)
    D_ip, I_ip = exact_topk(xq, xb, 100, metric="ip")
    np.testing.assert_array_equal(got, ids[I_ip])  # item ids through the (shuffled, non-contiguous) id map
    np.testing.assert_allclose(scores, D_ip, rtol=1e-5, atol=1e-5)
    # on non-normalised vectors the L2 neighbours are other items: a L2 index would fail the line above
    _, I_l2 = exact_topk(xq, xb, 100, metric="l2")
    assert mean_recall_at_k(I_ip, I_l2) < 0.5


def test_metric_is_required_and_checked(data):
    xb, _, ids = data
    with pytest.raises(TypeError, match="metric"):
        ItemIndex.build(xb[:100], ids[:100], factory="Flat")  # no silent default
    with pytest.raises(ValueError, match="metric 'cosine' is not supported"):
        ItemIndex.build(xb[:100], ids[:100], metric="cosine", factory="Flat")


def test_ivf_operating_point_reaches_target_and_survives_reload(data, ivf, tmp_path):
    xb, xq, ids = data
    index, points = ivf
    assert [p["value"] for p in points] == [1, 2, 4, 8, 16, 32, 64, 128]  # defaults up to 256, capped at nlist 128
    # more probes never lose recall on the same queries (the probed lists only grow)
    recalls = [p["recall_at_k"] for p in points]
    assert recalls == sorted(recalls) and recalls[0] < 0.9 and recalls[-1] > 0.99
    chosen = index.set_operating_point(0.95)
    assert chosen["recall_at_k"] >= 0.95 and index.nprobe == chosen["value"]
    previous = [p for p in points if p["value"] < chosen["value"]]
    assert previous and previous[-1]["recall_at_k"] < 0.95  # it is the cheapest point reaching the target
    assert not index.is_exact

    manifest = index.save(tmp_path / "idx", model_hash="a" * 64, extra={"note": "test"})
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk["recall"]["recall_at_k"] == chosen["recall_at_k"]
    assert on_disk["embedding_dim"] == D and on_disk["metric"] == "ip" and on_disk["factory"] == "IVF128,Flat"
    assert on_disk["n_items"] == N and on_disk["backend"] == "faiss-cpu" and on_disk["extra"] == {"note": "test"}
    assert len(on_disk["operating_points"]) == 8 and set(on_disk["outputs"]) == {INDEX_FILE, IDS_FILE}
    assert manifest["model_hash"] == "a" * 64

    loaded = ItemIndex.load(tmp_path / "idx", expect_model_hash="a" * 64, expect_dim=D, expect_metric="ip",
                            device="cpu")
    assert loaded.nprobe == chosen["value"]
    # re-measured recall at the loaded operating point equals what the manifest recorded
    assert loaded.measure_recall(xq, 100) == pytest.approx(on_disk["recall"]["recall_at_k"], abs=1e-12)
    s0, i0 = index.search(xq, 100)
    s1, i1 = loaded.search(xq, 100)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(s1, s0)


def test_unreachable_recall_target_is_refused(ivf):
    index, points = ivf
    # its own class (a ValueError), which `cascade index build` turns into a one-line error naming --recall-target
    with pytest.raises(UnreachableRecallError, match=r"reaches recall@100 >= 1.01: the best is [01]\.\d{4} at "
                                                     r"nprobe=128"):
        index.set_operating_point(1.01)


def test_hnsw_reaches_recorded_recall(data, tmp_path):
    xb, xq, ids = data
    index = ItemIndex.build(xb, ids, metric="ip", factory="HNSW32")
    points = index.sweep(xq, 20, ef_searches=(20, 40, 80, 160, 320))
    chosen = index.set_operating_point(0.99)
    assert chosen["param"] == "efSearch" and chosen["recall_at_k"] >= 0.99 and index.ef_search == chosen["value"]
    assert points[0]["recall_at_k"] < 0.99  # the target needed a wider beam than the smallest one
    index.save(tmp_path / "h", model_hash="h1")
    loaded = ItemIndex.load(tmp_path / "h", expect_model_hash="h1")
    assert loaded.ef_search == chosen["value"]
    assert loaded.measure_recall(xq, 20) == pytest.approx(chosen["recall_at_k"], abs=1e-12)


def test_pq_with_refine_reaches_stated_recall_with_exact_scores(data):
    xb, xq, ids = data
    # IVF128,PQ16x4: 8-byte codes (16x smaller than the vectors); the shortlist of k * 4 is re-ranked exactly
    index = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", k_factor=4, nprobe=32, seed=0)
    assert index.measure_recall(xq, 50) >= 0.95
    scores, got = index.search(xq, 50)
    # returned scores are exact inner products of the returned items: the re-rank used the stored float vectors
    row_of = np.empty(ids.max() + 1, dtype=np.int64)
    row_of[ids] = np.arange(N)
    exact_scores = np.einsum("qd,qkd->qk", xq, xb[row_of[got]])
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_opq_ivf_pq_with_refine_reaches_stated_recall(data):
    xb, xq, ids = data
    # OPQ rotates the space before 4-bit PQ; trained on 5000 rows to keep OPQ's 50 alternations fast.
    # Stated recall@50 >= 0.93 at nprobe 16 with a 4x shortlist (measured 0.95 when written)
    index = ItemIndex.build(xb, ids, metric="ip", factory="OPQ8,IVF64,PQ8x4", nprobe=16, train_size=5000, seed=0)
    assert index.k_factor == 4 and not index.is_exact
    assert index.measure_recall(xq, 50) >= 0.93


def test_compressed_sq8_refine_store_is_4x_smaller_and_keeps_recall(data, tmp_path):
    xb, xq, ids = data
    _, I_exact = exact_topk(xq, xb, 50, metric="ip")
    flat = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", k_factor=4, nprobe=32, seed=0)
    sq8 = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", k_factor=4, nprobe=32, seed=0,
                          refine="SQ8")
    # the re-rank store: float32 = 20000 x 32 x 4 = 2,560,000 bytes, SQ8 = 20000 x 32 x 1 = 640,000 bytes; the
    # rest (IVF lists, PQ codebooks, the SQ8 ranges of 2 x 32 floats, headers) is shared, so the difference is
    # 1,920,000 bytes up to a few hundred bytes of headers
    assert abs((flat.index_bytes() - sq8.index_bytes()) - 1_920_000) < 1_000
    # an 8-bit re-rank order is close to the exact one: stated recall@50 >= 0.93 (float32 store >= 0.95 above)
    r = sq8.measure_recall(xq, 50, I_exact=I_exact)
    assert r >= 0.93 and r <= flat.measure_recall(xq, 50) + 1e-9
    # scores are inner products with 8-bit reconstructions. Per dimension the step is range / 255 (range ~ 2.1 for
    # these vectors: step 0.0084), so each coordinate is off by a uniform error of std 0.0084 / sqrt(12) = 0.0024,
    # and <q, error> with |q| = 1 has std 0.0024 too: stated mean |error| < 0.005. Items outside the ranges
    # seen in training are clipped, so single scores may be off more: stated max < 0.1
    scores, got = sq8.search(xq, 10)
    row_of = np.empty(ids.max() + 1, dtype=np.int64)
    row_of[ids] = np.arange(N)
    err = np.abs(scores - np.einsum("qd,qkd->qk", xq, xb[row_of[got]]))
    assert err.mean() < 0.005 and err.max() < 0.1, (err.mean(), err.max())
    # no exact vectors inside: recall needs caller-given ground truth, and says so
    with pytest.raises(ValueError, match="holds no exact vectors: pass I_exact"):
        sq8.measure_recall(xq, 50)
    points = sq8.sweep(xq, 50, nprobes=(4, 32), I_exact=I_exact)
    assert points[0]["recall_at_k"] < points[1]["recall_at_k"] == pytest.approx(r, abs=1e-12)
    sq8.save(tmp_path / "sq8", model_hash="m")
    loaded = ItemIndex.load(tmp_path / "sq8", expect_model_hash="m", device="cpu")
    assert loaded.refine == "SQ8" and loaded.k_factor == 4
    np.testing.assert_array_equal(loaded.search(xq, 10)[1], got)


def test_k_factor_one_is_the_pq_shortlist_and_re_ranking_recovers_recall(data):
    xb, xq, ids = data
    _, I_exact = exact_topk(xq, xb, 50, metric="ip")
    # k_factor 1: the refine step only reorders PQ's own top-50, so recall is PQ's; a 8x shortlist re-ranked
    # exactly must find clearly more of the true top-50 (8-byte codes lose most of the fine order)
    pq_only = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", k_factor=1, nprobe=32, seed=0)
    wide = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", k_factor=8, nprobe=32, seed=0)
    r1, r8 = pq_only.measure_recall(xq, 50, I_exact=I_exact), wide.measure_recall(xq, 50, I_exact=I_exact)
    assert r8 > r1 + 0.1 and r8 >= 0.95, (r1, r8)
    # the same trained index with its shortlist cut to k_factor 1 is exactly the PQ-only index
    wide.set_search_params(k_factor=1)
    assert wide.measure_recall(xq, 50, I_exact=I_exact) == r1 and wide.k_factor == 1
    with pytest.raises(ValueError, match="k_factor must be an integer >= 1"):
        wide.set_search_params(k_factor=0)
    # memory by part, worked out: 20000 x 8-byte codes (PQ16x4) = 160,000; ids 20000 x 8 = 160,000; coarse
    # 128 x 32 x 4 = 16,384; codebooks 16 sub-quantizers x 16 centroids x 2 dims x 4 = 2,048; float32 re-rank
    # store 20000 x 32 x 4 = 2,560,000
    mem = wide.memory_bytes()
    assert mem == {"codes": 160_000, "ids": 160_000, "coarse": 16_384, "codebooks": 2_048, "refine": 2_560_000,
                   "total": 2_898_432}
    assert abs(wide.index_bytes() - mem["total"]) < 0.01 * mem["total"]  # the serialised size agrees


def test_refine_is_checked(data):
    xb, _, ids = data
    with pytest.raises(ValueError, match="refine 'SQ4' is not supported"):
        ItemIndex.build(xb[:2000], ids[:2000], metric="ip", factory="IVF8,PQ8", refine="SQ4")
    with pytest.raises(ValueError, match="applies to IVF-PQ indexes"):
        ItemIndex.build(xb[:2000], ids[:2000], metric="ip", factory="IVF8,Flat", refine="SQ8")


def test_k_larger_than_corpus_pads_with_minus_one(data):
    xb, xq, ids = data
    index = ItemIndex.build(xb[:30], ids[:30], metric="ip", factory="Flat")
    scores, got = index.search(xq[:3], 40)
    assert got.shape == (3, 40)
    assert (got[:, 30:] == -1).all() and np.isneginf(scores[:, 30:]).all()
    # the 30 real results are a permutation of all 30 item ids
    np.testing.assert_array_equal(np.sort(got[:, :30], axis=1), np.tile(np.sort(ids[:30]), (3, 1)))


def test_load_refuses_mismatched_hash_dim_and_metric(data, tmp_path):
    xb, _, ids = data
    ItemIndex.build(xb[:500], ids[:500], metric="ip", factory="Flat").save(tmp_path / "ip", model_hash="def456")
    with pytest.raises(IndexMismatchError, match="user tower hash abc123 does not match the index's def456"):
        ItemIndex.load(tmp_path / "ip", expect_model_hash="abc123")
    with pytest.raises(IndexMismatchError, match="dimension 64 does not match the index's 32"):
        ItemIndex.load(tmp_path / "ip", expect_dim=64)
    ItemIndex.build(xb[:500], ids[:500], metric="l2", factory="Flat").save(tmp_path / "l2", model_hash="def456")
    with pytest.raises(IndexMismatchError, match="expected metric 'ip' does not match the index's 'l2'"):
        ItemIndex.load(tmp_path / "l2")  # expect_metric defaults to "ip"
    assert ItemIndex.load(tmp_path / "l2", expect_metric="l2").metric == "l2"


@pytest.mark.parametrize("victim", [INDEX_FILE, IDS_FILE])
def test_load_refuses_corrupted_file(data, tmp_path, victim):
    xb, _, ids = data
    ItemIndex.build(xb[:500], ids[:500], metric="ip", factory="Flat").save(tmp_path, model_hash="m")
    path = tmp_path / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=rf"{victim}: sha256 .* does not match the manifest"):
        ItemIndex.load(tmp_path, expect_model_hash="m")


def test_torch_backend_is_exact_and_recorded(data, tmp_path):
    xb, xq, ids = data
    index = ItemIndex.build(xb[:5000], ids[:5000], metric="ip", factory="IVF32,Flat", device="torch", seed=0)
    assert index.backend == "torch" and index.is_exact
    scores, got = index.search(xq, 30)
    D_ip, I_ip = exact_topk(xq, xb[:5000], 30)
    np.testing.assert_array_equal(got, ids[:5000][I_ip])
    np.testing.assert_allclose(scores, D_ip, rtol=1e-5, atol=1e-5)
    m = index.save(tmp_path, model_hash="t")
    assert m["backend"] == "torch"
    # the saved file is the requested IVF index: loaded on the faiss CPU backend it is approximate again
    loaded = ItemIndex.load(tmp_path, device="cpu")
    assert loaded.backend == "faiss-cpu" and not loaded.is_exact and loaded.factory == "IVF32,Flat"


def test_build_rejects_bad_ids_and_factories(data):
    xb, _, ids = data
    with pytest.raises(ValueError, match="item_ids must be unique: id 1003 appears 2 times"):
        ItemIndex.build(xb[:3], np.array([1003, 7, 1003]), metric="ip", factory="Flat")
    with pytest.raises(ValueError, match="one per row of xb"):
        ItemIndex.build(xb[:3], ids[:2], metric="ip", factory="Flat")
    with pytest.raises(ValueError, match="factory 'LSH' is not supported"):
        ItemIndex.build(xb[:3], ids[:3], metric="ip", factory="LSH")
    with pytest.raises(ValueError, match="PQ5 needs the dimension 32 to be a multiple of 5"):
        parse_factory("IVF8,PQ5", 32)
    with pytest.raises(ValueError, match="nlist 64 exceeds the 10 items"):
        ItemIndex.build(xb[:10], ids[:10], metric="ip", factory="IVF64,Flat")
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes, not 'Flat'"):
        ItemIndex.build(xb[:10], ids[:10], metric="ip", factory="Flat", nprobe=4)


def test_factory_is_checked_against_the_corpus_before_any_work():
    """check_factory: the string and its sizes against n items of dimension d, the messages naming the string as
    the caller calls it (the CLI: --factory)."""
    assert check_factory("IVF10,Flat", 10, 8) == {"kind": "ivf", "nlist": 10}
    with pytest.raises(ValueError, match=r"^factory 'IVF11,Flat': nlist 11 exceeds the 10 items to cluster$"):
        check_factory("IVF11,Flat", 10, 8)
    with pytest.raises(ValueError, match=r"^--factory 'IVF9999,Flat': nlist 9999 exceeds the 1,682 items to cluster$"):
        check_factory("IVF9999,Flat", 1682, 16, "--factory")
    with pytest.raises(ValueError, match=r"^--factory 'IVF4,PQ5': PQ5 needs the dimension 16 to be a multiple of 5$"):
        check_factory("IVF4,PQ5", 1682, 16, "--factory")
    with pytest.raises(ValueError, match=r"^--factory 'LSH' is not supported"):
        check_factory("LSH", 1682, 16, "--factory")


def test_default_factory_follows_corpus_size():
    assert default_factory(1_000) == "Flat"
    assert default_factory(199_999) == "Flat"
    # 4 * sqrt(1e6) = 4000 -> nearest power of two 4096; 4 * sqrt(3e5) = 2191 -> 2048
    assert default_factory(1_000_000) == "IVF4096,Flat"
    assert default_factory(300_000) == "IVF2048,Flat"


# ---------------------------------------------------------------- GPU (skipped where there is none)


@pytest.mark.gpu
def test_faiss_gpu_backend_matches_exact(data):
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (CPU build or no CUDA device)")
    xb, xq, ids = data
    index = ItemIndex.build(xb, ids, metric="ip", factory="Flat", device="gpu")
    assert index.backend == "faiss-gpu"
    _, got = index.search(xq, 50)
    _, I_ip = exact_topk(xq, xb, 50)
    assert mean_recall_at_k(ids[I_ip], got) > 0.999  # GPU float summation order may swap near-equal scores
    ivfpq = ItemIndex.build(xb, ids, metric="ip", factory="IVF128,PQ16x4", nprobe=32, device="gpu")
    assert ivfpq.measure_recall(xq, 50) >= 0.95


@pytest.mark.gpu
def test_torch_cuda_exact_matches_numpy(data):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    xb, xq, _ = data
    D, I = TorchExactIndex(xb, "ip", device="cuda", chunk_rows=4096, query_rows=64).search(xq, 50)
    D_ref, I_ref = exact_topk(xq, xb, 50)
    assert mean_recall_at_k(I_ref, I) > 0.999
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-4)


def test_faiss_threads_are_set_only_while_faiss_works(data, tmp_path):
    """An index built, searched or loaded with omp_threads = 1 runs faiss on 1 thread and leaves the OpenMP count as
    it found it. Where torch is imported before faiss (as the package does) the two share one OpenMP runtime, and
    that count is torch's intra-op threads: building an index used to set it for good, so every later step of a
    pipeline trained on 1 thread whatever run.threads said. (This suite imports faiss first, which gives faiss its
    own runtime; the shared case runs in a fresh interpreter.)"""
    import subprocess
    import sys

    import faiss

    xb, _, ids = data
    index = ItemIndex.build(xb, ids, metric="ip", factory="IVF16,Flat", nprobe=4, device="cpu", omp_threads=1)
    faiss.omp_set_num_threads(2)
    seen = []

    class Recording:  # stands in for the faiss index: what thread count does a search run under?
        def search(self, xq, k):
            seen.append(faiss.omp_get_max_threads())
            return index._live.search(xq, k)

    _, rows = index._faiss_search(Recording(), xb[:3], 5)
    assert seen == [1] and faiss.omp_get_max_threads() == 2
    np.testing.assert_array_equal(rows, index.search_positions(xb[:3], 5)[1])
    with pytest.raises(ValueError, match="omp_threads must be an integer >= 1"):
        ItemIndex.build(xb, ids, metric="ip", factory="Flat", device="cpu", omp_threads=0)
    script = f"""
import numpy as np, torch
torch.set_num_threads(2)
from cascade.index.faiss_index import ItemIndex
import faiss
faiss.omp_set_num_threads(2)
assert torch.get_num_threads() == 2
faiss.omp_set_num_threads(1)
shared = torch.get_num_threads() == 1  # one OpenMP runtime for both
faiss.omp_set_num_threads(2)
xb = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
index = ItemIndex.build(xb, np.arange(2000), metric="ip", factory="IVF8,Flat", nprobe=2, device="cpu", omp_threads=1)
after_build = torch.get_num_threads()
index.search(xb[:4], 5)
after_search = torch.get_num_threads()
index.save({str(tmp_path / "ix")!r}, model_hash="towers")
ItemIndex.load({str(tmp_path / "ix")!r}, device="cpu", omp_threads=1).search(xb[:4], 5)
print(shared, after_build, after_search, torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "2", "2", "2"], out.stdout


def test_searches_from_several_threads_get_what_each_gets_alone():
    """faiss's BLAS threshold is one process-wide value that a search of >= 20 queries sets low and a smaller one
    sets back; the two paths' scores differ in the last digits. Two threads of single queries beside a thread of
    25-query batches changed 5-11 of 300 batches' scores (and some single queries') before the searches took turns
    by value."""
    import threading

    rng = np.random.default_rng(0)
    index = ItemIndex.build(rng.standard_normal((20_000, 32)).astype(np.float32), np.arange(20_000), factory="Flat",
                            metric="ip", omp_threads=1)
    xq = rng.standard_normal((25, 32)).astype(np.float32)
    batch_alone, single_alone = index.search(xq, 50)[0], index.search(xq[:1], 50)[0]
    stop, single_diffs = threading.Event(), []

    def singles():
        while not stop.is_set():
            single_diffs.append(not np.array_equal(index.search(xq[:1].copy(), 50)[0], single_alone))

    threads = [threading.Thread(target=singles) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        batch_diffs = sum(not np.array_equal(index.search(xq, 50)[0], batch_alone) for _ in range(300))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert batch_diffs == 0 and sum(single_diffs) == 0 and len(single_diffs) > 100
