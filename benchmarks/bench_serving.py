"""Serving benchmark: retrieval overhead, index operating points and end-to-end cascade latency, 10K to 1M items.

What it measures, all in one process so the ratios sit side by side:

1. Retrieval throughput of our :class:`~cascade.serve.cascade.Retriever` against a bare ``faiss`` search on the
   same index file and the identical query vectors, at batch 1 and batched. Four rows per corpus: bare faiss,
   :meth:`ItemIndex.search` (id map, padding), the retriever's search part (``Retriever.select`` with the user tower
   replaced by a lookup of the precomputed query vectors) and the full retriever (user tower + search). The 10%
   overhead target applies to the retriever's search part over the bare faiss search on identical queries; the
   user tower is a model cost, reported beside it.
2. Exact (Flat) vs IVF / HNSW operating points on the trained retrieval tower's item embeddings: recall@k against
   exact inner-product search, batched q/s and single-query latency.
3. End-to-end cascade latency at batch 1 (p50 / p95 / p99, per stage) with the run's real stages (distilled
   retrieval + pre-rank towers, DCNv2 teacher as the ranker), plus a finer breakdown of each stage (user tower,
   index search, pre-rank scoring, pair-feature building incl. cross features, teacher forward, top-k), and batched
   throughput.
4. How retrieval and end-to-end cost grow with the corpus (10K, 100K, 1M items).

Where the cascades come from: the pipeline (``cascade.pipeline.run_pipeline(cfg, until="index")``) on a synthetic
world per corpus size with few users and days and small models (``pipeline_config``). Each size is a separately
trained run (data, teacher, rank log, students, index), so stage costs compare across sizes but model quality
does not (not measured here). Queries are the test-day requests of each run.

5. With ``--channels`` (its own results file, bench_serving_channels.json): the multi-channel cascade
   (``load_cascade(run, "distilled+channels")``: the two-tower and the classic channels in one retrieval stage)
   against the two-tower alone, batch-1 end to end and per channel, interleaved request by request; and each
   channel's served path against the plain whole-corpus computation it replaces (cascade/channels/reference.py).

Usage: ``nice python benchmarks/bench_serving.py --runs-dir <dir>`` (runs are resumed when present). Writes JSON
(machine, date, versions, args, results) to --out and Markdown beside it, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from cascade.arrays import topk_rows
from cascade.artifacts import package_versions, write_json
from cascade.data.requests import Requests
from cascade.eval.metrics import latency_summary, mean_recall_at_k
from cascade.index.exact import exact_topk
from cascade.index.factory import blas_threshold_for
from cascade.index.faiss_index import INDEX_FILE, ItemIndex
from cascade.serve.cascade import Cascade, PairScorer, Retriever
from cascade.serve.replay import replay_latency

log = logging.getLogger("bench_serving")

TINY_TOML = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------ runs


def pipeline_config(n_items: int, runs_dir: Path, n_users: int = 3000, n_days: int = 3, seed: int = 0,
                    extra: tuple[str, ...] = (),
                    sweep_queries: int = 500):
    """The pipeline config of the benchmark world with ``n_items`` items: pipelines/tiny.toml's small models with
    a 32-d retrieval tower, ``n_users`` users over ``n_days`` days, the index chosen by corpus size (Flat below
    200K items, IVF above) at recall@100 >= 0.95, and no ground-truth comparison students (not served here).

    The channels step (built before the teacher: ``until="index"`` includes it) keeps pipelines/tiny.toml's grids
    except ALS, which is fitted once with the settings the default world's run chose (128 factors,
    regularization 0.01, alpha 10) and 5 iterations: the serving cost of the largest model (it depends on the
    factors and the index, not on how long ALS trained), without fitting a 128-factor grid at 1M items on a
    shared 2-core machine; its item-factor index is chosen by corpus size as the two-tower's.

    The teacher's exposure weight and the students' distillation scale are chosen on 50 validation requests (each
    choice scores every item for every judged request: the defaults' 1000 and 500 requests x 1M items took the
    better part of an hour on the 2 cores); they shape model quality, which this benchmark does not measure."""
    from cascade.pipeline import load_config

    overrides = [f"run.name=serving_w{n_items}", f"run.runs_dir={runs_dir}", f"run.seed={seed}", "run.threads=1",
                 f"data.world.n_users={n_users}", f"data.world.n_items={n_items}", f"data.world.n_days={n_days}",
                 "students.tower.emb_dim=16", "students.tower.hidden=[64]", "students.tower.out_dim=32",
                 "students.compare_ground_truth=false", "ranklog.n_candidates=100", "ranklog.max_requests=3000",
                 "index.k=100", f"index.sweep_queries={sweep_queries}", "index.recall_target=0.95",
                 "channels.als_factors=[128]", "channels.als_regularization=[0.01]", "channels.als_alpha=[10.0]",
                 "channels.als_iterations=5", "teacher.entire_space.select_requests=50", "students.select_requests=50",
                 *extra]
    return load_config(TINY_TOML, overrides)


def ensure_run(cfg, progress: bool = False, reuse: bool = False) -> Path:
    """Run (or resume) the pipeline of ``cfg`` up to the index step (the channels step included); return the run
    folder. reuse: take finished steps as they are even if the package's code or the config's defaults changed
    since (the timed serving code is always the current one; only the trained models, the fitted channels and the
    indexes come from the earlier run)."""
    from cascade.pipeline import run_pipeline

    t0 = time.perf_counter()
    steps = ("data", "channels", "teacher", "ranklog", "students", "index")
    run_pipeline(cfg, progress=progress, until="index", update=reuse, frozen=steps if reuse else ())
    log.info("run %s ready in %.0f s", cfg.run.name, time.perf_counter() - t0)
    return Path(cfg.run.runs_dir) / cfg.run.name


@dataclass
class ServingParts:
    """The callables of a cascade, exposed one by one so each step can be timed.

    user_embed(requests) -> float32 [B, d] (retrieval tower); index: an ItemIndex over the corpus;
    prerank_score(requests, candidates [B, N]) -> [B, N]; pair_features(requests, candidates [B, N]) -> (cat, num)
    [B*N, ...] ranker inputs (user, item, context and cross features); rank_forward(cat, num, list_len) -> [B*N]
    logits of B consecutive candidate lists of list_len rows (the served ranker's own call, forward_lists);
    cascade: the served :class:`Cascade` built from the same parts (for a run: ``build_cascade``, the real path).
    retrieval_prior(requests, u, ids [B, n], n) -> (ids, scores): the served retriever's rescoring of the index's
    answer with its towers' popularity prior (``Retriever.with_prior``), None when the retrieval tower has none.
    """

    user_embed: Callable[[Requests], np.ndarray]
    index: ItemIndex
    prerank_score: Callable[[Requests, np.ndarray], np.ndarray]
    pair_features: Callable[[Requests, np.ndarray], tuple[np.ndarray, np.ndarray]]
    rank_forward: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    cascade: Cascade
    retrieval_prior: Callable | None = None

    def with_index(self, index: ItemIndex) -> ServingParts:
        """The same parts serving another index over the same items (the retrieval tower's prior kept)."""
        served = self.cascade.retriever
        retriever = Retriever(self.user_embed, index, served.prior_towers, served.data)
        casc = Cascade(retriever, self.cascade.preranker, self.cascade.ranker)
        return ServingParts(self.user_embed, index, self.prerank_score, self.pair_features, self.rank_forward, casc,
                            retriever.with_prior if retriever.prior_towers is not None else None)


def parts_from_callables(user_embed, index, prerank_score, pair_features, rank_forward) -> ServingParts:
    """ServingParts whose cascade is assembled here as ``build_cascade`` does (the ranker scores pair features)."""

    def rank_score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
        cat, num = pair_features(requests, candidates)
        return np.asarray(rank_forward(cat, num, candidates.shape[1])).reshape(candidates.shape)

    casc = Cascade(Retriever(user_embed, index), PairScorer(prerank_score), PairScorer(rank_score))
    return ServingParts(user_embed, index, prerank_score, pair_features, rank_forward, casc)


def load_run(run_dir: Path, variant: str = "distilled"):
    """A run's serving parts (distilled towers, the DCNv2 teacher as ranker, the run's index loaded on 1 faiss
    thread), its test requests in time order, and the retrieval item embeddings: (parts, requests, xb [I, d], ids)."""
    from cascade import artifacts as A
    from cascade.data.requests import requests_frame, to_requests
    from cascade.models.scoring import score_pairs
    from cascade.run_data import RunData, load_ranker, load_towers
    from cascade.serve.cascade import build_cascade

    data = RunData(run_dir / "data")
    sdir = run_dir / "students" / variant
    retr, pre = load_towers(sdir / "retrieval", data), load_towers(sdir / "prerank", data)
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    index = ItemIndex.load(run_dir / "index" / variant,
                           expect_model_hash=A.sha256_file(sdir / "retrieval" / "model.pt"),
                           expect_dim=retr.item_emb.shape[1], expect_metric="ip", device="cpu", omp_threads=1)
    casc = build_cascade(data, retr, pre, teacher, index)
    parts = ServingParts(lambda r: retr.user_embed(data, r), index, pre.scorer(data), data.pair_features,
                         lambda cat, num, n: score_pairs(teacher, cat, num, list_len=n), casc,
                         casc.retriever.with_prior if casc.retriever.prior_towers is not None else None)
    requests = to_requests(requests_frame(data.split_impressions("test"), data.context_names), data.context_names)
    n_real = len(data.item_ids)  # item rows past n_real are the OOV row, never indexed
    return parts, requests, retr.item_emb[:n_real], retr.inputs.item_ids[:n_real]


def bare_faiss_copy(index_dir: Path, index: ItemIndex):
    """The faiss index stored in ``index_dir`` read with plain ``faiss.read_index``, with ``index``'s search
    settings (nprobe / efSearch): the same index, searched without any of our code."""
    import faiss

    bare = faiss.read_index(str(index_dir / INDEX_FILE))
    ps = faiss.ParameterSpace()
    if index.nprobe is not None:
        ps.set_index_parameter(bare, "nprobe", float(index.nprobe))
    if index.ef_search is not None:
        ps.set_index_parameter(bare, "efSearch", float(index.ef_search))
    return bare


def cycle(requests: Requests, n: int) -> Requests:
    """The first n requests, repeating the sequence when there are fewer (request ids stay unique)."""
    idx = np.arange(n) % len(requests)
    out = requests.take(idx)
    out.request_id = np.arange(n, dtype=np.int64)
    return out


# ------------------------------------------------------------------------------------------------ measurements


def time_retrieval(bare, index: ItemIndex, user_embed, xq: np.ndarray, requests: Requests, k: int, batch_size: int,
                   rounds: int = 5, chunk_queries: int = 32, seed: int = 0, served: Retriever | None = None) -> dict:
    """Queries per second of bare faiss vs our wrappers on identical queries.

    bare: a faiss index equal to ``index`` (same file, same search settings); xq: [nq, d] the user-tower vectors of
    ``requests`` (nq of them), searched in batches of ``batch_size``. The methods are interleaved finely, so load
    changes on a machine shared with other jobs hit all of them alike: the batches are cut into chunks of about
    ``chunk_queries`` queries (at least one batch) and every chunk is run by each method in turn, in an order drawn
    afresh (seeded) for every round. A method's overhead is the median over rounds of its total time / bare faiss's
    - 1, on the wall clock and on the thread's CPU time (``time.thread_time``; faiss runs on the calling thread at 1
    thread), which leaves out time spent waiting for a core taken by other jobs. Raises if the wrappers' ids differ
    from bare faiss. Returns {"batch_size", "nq", "k", "rounds", "wall" / "cpu": {"qps": {method: median q/s},
    "overhead_vs_bare": {method: fraction}}}.
    """
    nq, d = xq.shape
    if len(requests) != nq:
        raise ValueError(f"{len(requests)} requests but {nq} query vectors")
    starts = range(0, nq, batch_size)
    qs = [np.ascontiguousarray(xq[s:s + batch_size], dtype=np.float32) for s in starts]
    reqs = [requests.take(np.arange(s, min(s + batch_size, nq))) for s in starts]
    by_request = {id(r): q for r, q in zip(reqs, qs)}
    # the retriever's search part: Retriever.select exactly, with the user tower swapped for a lookup of the same
    # vectors the bare search gets
    search_part = Retriever(lambda r: by_request[id(r)], index)
    full = Retriever(user_embed, index)

    def run_bare(sl: slice):
        # the same BLAS-threshold value ItemIndex.search sets for this batch size, so both do identical work
        with blas_threshold_for(len(qs[0]), index.blas_threshold):
            return [bare.search(q, k)[1] for q in qs[sl]]

    methods = {
        "bare_faiss": run_bare,
        "item_index": lambda sl: [index.search(q, k)[1] for q in qs[sl]],
        "retriever_search": lambda sl: [search_part.select(r, None, k)[0] for r in reqs[sl]],
        "retriever_full": lambda sl: [full.select(r, None, k)[0] for r in reqs[sl]],
        "user_tower": lambda sl: [user_embed(r) for r in reqs[sl]],
    }
    if served is not None:  # the served retriever with its towers' popularity prior: user tower, search, rescoring
        methods["retriever_served"] = lambda sl: [served.select(r, None, k)[0] for r in reqs[sl]]
    everything = slice(None)
    ids_bare = np.concatenate(run_bare(everything))  # warm-up, and the reference for the identity check
    ids_bare = np.where(ids_bare >= 0, index.item_ids[np.maximum(ids_bare, 0)], -1)
    for name in ("item_index", "retriever_search"):
        got = np.concatenate(methods[name](everything))
        if not np.array_equal(got, ids_bare):
            raise AssertionError(f"{name} returned other items than bare faiss on identical queries")
    per_chunk = max(1, chunk_queries // batch_size)
    chunks = [slice(c, c + per_chunk) for c in range(0, len(qs), per_chunk)]
    names = list(methods)
    rng = np.random.default_rng(seed)
    wall = np.zeros((rounds, len(names)))
    cpu = np.zeros((rounds, len(names)))
    for r in range(rounds):
        order = rng.permutation(len(names))
        for sl in chunks:
            for m in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                methods[names[m]](sl)
                wall[r, m] += time.perf_counter() - t0
                cpu[r, m] += time.thread_time() - c0
    out = {"batch_size": batch_size, "nq": nq, "k": k, "rounds": rounds, "chunk_queries": per_chunk * batch_size}
    for clock, t in (("wall", wall), ("cpu", cpu)):
        out[clock] = {"qps": {m: float(nq / np.median(t[:, j])) for j, m in enumerate(names)},
                      "overhead_vs_bare": {m: float(np.median(t[:, j] / t[:, 0]) - 1) for j, m in enumerate(names)
                                           if j > 0}}
    return out


def single_query_latency(index: ItemIndex, xq: np.ndarray, k: int) -> dict:
    """Per-query latency of ``index.search`` one row at a time: {"p50_ms", "p99_ms", "qps"}."""
    index.search(xq[:1], k)  # warm-up: the first call pays lazy allocations
    lat = np.empty(len(xq))
    for i in range(len(xq)):
        t0 = time.perf_counter()
        index.search(xq[i:i + 1], k)
        lat[i] = time.perf_counter() - t0
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "qps": float(len(xq) / lat.sum())}


def operating_points(index: ItemIndex, xq: np.ndarray, I_exact: np.ndarray, k: int, values=(None,),
                     nq_single: int = 200, build_s: float | None = None, repeats: int = 3) -> list[dict]:
    """Recall@k vs exact search, batched q/s and single-query latency of ``index`` at each search setting.

    xq: [nq, d] queries; I_exact: [nq, k] exact item ids (not positions) of xq; values: nprobe (IVF) or efSearch
    (HNSW) settings, (None,) for Flat; batched q/s is the best of ``repeats`` timings. The index keeps the last
    setting.
    """
    kind = index.spec["kind"]
    param = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind)
    rows = []
    for v in values:
        if param == "nprobe":
            index.set_search_params(nprobe=int(v))
        elif param == "efSearch":
            index.set_search_params(ef_search=int(v))
        index.search(xq[:8], k)
        batched_s = math.inf
        for _ in range(repeats):  # best of a few: other jobs share the machine
            t0 = time.perf_counter()
            _, I = index.search(xq, k)
            batched_s = min(batched_s, time.perf_counter() - t0)
        single = single_query_latency(index, xq[:nq_single], k)
        rows.append({"factory": index.factory, "param": param, "value": v, "k": k, "nq": int(len(xq)),
                     "recall_at_k": mean_recall_at_k(I_exact, I), "batched_qps": float(len(xq) / batched_s),
                     "single_p50_ms": single["p50_ms"], "single_p99_ms": single["p99_ms"], "build_s": build_s,
                     "index_mb": index.index_bytes() / 2**20})
        log.info("%s %s=%s recall@%d %.4f batched %.0f q/s single p50 %.2f ms", index.factory, param, v, k,
                 rows[-1]["recall_at_k"], rows[-1]["batched_qps"], single["p50_ms"])
    return rows


def exact_ids(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """[nq, k] item ids of the exact inner-product top-k of xq [nq, d] over xb [n, d] (ids [n])."""
    _, I = exact_topk(xq, xb, k, metric="ip")
    return np.where(I >= 0, ids[np.maximum(I, 0)], -1)


def stage_breakdown(parts: ServingParts, requests: Requests, n_retrieve: int, n_prerank: int, k: int) -> dict:
    """Batch-1 latency of every step of the cascade, run one request at a time in the cascade's own order:
    retrieval user tower, index search, pre-rank scoring, pre-rank top-k, pair features (user / item / context /
    cross), ranker forward, final top-k.

    Returns {"wall": {step: latency_summary (ms)}, "cpu": {...}} with a "total" step in each. "cpu" is the thread's
    CPU time (``time.thread_time``; faiss and torch run on the calling thread at 1 thread): on a machine shared with
    other jobs it leaves out the time spent waiting for the core, so it approximates the latency on an idle core.
    """
    steps = ("user_tower", "index_search", "retrieval_prior", "prerank_score", "prerank_topk", "pair_features",
             "rank_forward", "rank_topk")
    wall = np.empty((len(requests), len(steps) + 1))
    cpu = np.empty_like(wall)

    def mark(i: int, j: int) -> None:
        wall[i, j] = time.perf_counter()
        cpu[i, j] = time.thread_time()

    for i in range(len(requests)):
        r = requests.take(np.array([i]))
        mark(i, 0)
        u = parts.user_embed(r)
        mark(i, 1)
        _, cand = parts.index.search(u, n_retrieve)
        mark(i, 2)
        if parts.retrieval_prior is not None:
            cand = parts.retrieval_prior(r, u, np.asarray(cand, np.int64), n_retrieve)[0]
        mark(i, 3)
        ps = parts.prerank_score(r, cand)
        mark(i, 4)
        pi, _ = topk_rows(np.asarray(ps, np.float32), cand, n_prerank)
        mark(i, 5)
        cat, num = parts.pair_features(r, pi)
        mark(i, 6)
        s = np.asarray(parts.rank_forward(cat, num, pi.shape[1])).reshape(pi.shape)
        mark(i, 7)
        topk_rows(s, pi, k)
        mark(i, 8)
    out = {}
    for name, t in (("wall", wall), ("cpu", cpu)):
        d = np.maximum(np.diff(t, axis=1), 0.0)
        out[name] = {s: latency_summary(d[:, j]) for j, s in enumerate(steps)}
        out[name]["total"] = latency_summary(d.sum(axis=1))
    return out


def end_to_end(parts: ServingParts, requests: Requests, n_retrieve: int, n_prerank: int, k: int, n_batch1: int,
               batch_size: int, n_batched: int, warmup: int = 20) -> dict:
    """Batch-1 latency through ``Cascade.recommend`` (p50/p95/p99 per stage and end to end, via replay_latency),
    the finer per-step breakdown on the same requests, and batched throughput. Requests are cycled if too few."""
    casc = parts.cascade
    casc.recommend(cycle(requests, warmup), n_retrieve, n_prerank, k)  # warm-up: lazy allocations, caches
    lat1 = replay_latency(casc, cycle(requests, n_batch1), n_retrieve, n_prerank, k, batch_size=1)
    lat1.pop("samples_ms")
    breakdown = stage_breakdown(parts, cycle(requests, n_batch1), n_retrieve, n_prerank, k)
    latb = replay_latency(casc, cycle(requests, n_batched), n_retrieve, n_prerank, k, batch_size=batch_size)
    latb.pop("samples_ms")
    return {"n_retrieve": n_retrieve, "n_prerank": n_prerank, "k": k, "batch1": lat1, "breakdown": breakdown,
            "batched": latb}


# ------------------------------------------------------------------------------------------------ per corpus


def ivf_nlist(n: int) -> int:
    """IVF list count for n items by the library's rule (``default_factory``): 4 sqrt(n) rounded to a power of two."""
    return 2 ** int(round(math.log2(4 * math.sqrt(n))))


def build_index(xb, ids, factory: str, seed: int, **kw) -> tuple[ItemIndex, float]:
    t0 = time.perf_counter()
    index = ItemIndex.build(xb, ids, metric="ip", factory=factory, device="cpu", seed=seed, omp_threads=1, **kw)
    return index, time.perf_counter() - t0


def bench_size(n_items: int, args) -> dict:
    """Everything measured on the run with ``n_items`` items."""
    cfg = pipeline_config(n_items, args.runs_dir, n_users=args.n_users, n_days=args.n_days, seed=args.seed,
                          extra=tuple(args.overrides))
    run_dir = ensure_run(cfg, reuse=args.reuse_runs)
    parts, requests, xb, ids = load_run(run_dir)
    index = parts.index
    out: dict = {"n_items": n_items, "dim": int(xb.shape[1]), "run_index": index.factory,
                 "n_test_requests": len(requests)}
    nq = min(args.nq, len(requests))
    q_req = requests.take(np.arange(nq))
    xq = parts.user_embed(q_req)
    k_op = args.k_recall

    # 2. operating points on the trained item embeddings (recall@k_op vs exact)
    I_ex = exact_ids(xq, xb, ids, k_op)
    points: list[dict] = []
    flat = None
    if n_items in args.points_sizes:
        flat, s = (index, None) if index.is_exact else build_index(xb, ids, "Flat", args.seed)
        points += operating_points(flat, xq, I_ex, k_op, build_s=s, nq_single=args.nq_single)
        nlist = ivf_nlist(n_items)
        if index.spec["kind"] == "ivf":
            ivf, s = index, None  # the run's own IVF index (built by the pipeline's index step)
        else:
            ivf, s = build_index(xb, ids, f"IVF{nlist},Flat", args.seed)
        points += operating_points(ivf, xq, I_ex, k_op, [v for v in args.nprobes if v <= ivf.spec["nlist"]],
                                   build_s=s, nq_single=args.nq_single)
        if ivf is not index:
            del ivf
        if n_items <= args.hnsw_max_n:
            hnsw, s = build_index(xb, ids, f"HNSW{args.hnsw_m}", args.seed, ef_construction=args.ef_construction)
            points += operating_points(hnsw, xq, I_ex, k_op, args.ef_searches, build_s=s, nq_single=args.nq_single)
            del hnsw
        else:
            out["hnsw_skipped"] = f"n_items > --hnsw-max-n {args.hnsw_max_n} (HNSW builds take minutes here)"
    out["operating_points"] = points

    # the served operating point: for IVF, the cheapest nprobe with recall@n_retrieve >= target on these queries
    # (the pipeline picked its nprobe at recall@100 on validation requests)
    served = {"factory": index.factory}
    if index.spec["kind"] == "ivf":
        I_ret = exact_ids(xq, xb, ids, args.n_retrieve)
        chosen = None
        for v in [v for v in args.nprobes if v <= index.spec["nlist"]]:
            index.set_search_params(nprobe=v)
            r = mean_recall_at_k(I_ret, index.search(xq, args.n_retrieve)[1])
            served.setdefault("recall_by_nprobe", {})[v] = r
            if r >= args.recall_target:
                chosen = (v, r)
                break
        if chosen is None:
            raise RuntimeError(f"{n_items} items: no nprobe in {args.nprobes} reaches recall@{args.n_retrieve} "
                               f">= {args.recall_target}: {served['recall_by_nprobe']}")
        index.set_search_params(nprobe=chosen[0])
        served.update({"nprobe": chosen[0], f"recall_at_{args.n_retrieve}": chosen[1],
                       f"recall_at_{k_op}": mean_recall_at_k(I_ex, index.search(xq, k_op)[1])})
    out["served_index"] = served

    # 1. retrieval overhead: bare faiss vs our wrappers, identical queries, at batch 1 and batched
    bare = bare_faiss_copy(run_dir / "index" / "distilled", index)
    out["retrieval"] = {
        f"batch{b}": time_retrieval(bare, index, parts.user_embed, xq[: (args.nq_single if b == 1 else nq)],
                                    q_req.take(np.arange(args.nq_single if b == 1 else nq)), args.n_retrieve, b,
                                    rounds=args.rounds,
                                    served=parts.cascade.retriever if parts.retrieval_prior is not None else None)
        for b in (1, args.batch_size)}
    del bare
    log.info("%d items: retrieval overhead %s", n_items,
             {b: (round(v["wall"]["overhead_vs_bare"]["retriever_search"], 4),
                  round(v["cpu"]["overhead_vs_bare"]["retriever_search"], 4)) for b, v in out["retrieval"].items()})

    # 3./4. end-to-end latency with the served index (and, above the Flat range, with exact Flat search too)
    e2e = {index.factory + (f" nprobe={index.nprobe}" if index.nprobe else ""):
           end_to_end(parts, requests, args.n_retrieve, args.n_prerank, args.k, args.n_latency, args.batch_size,
                      args.n_batched)}
    if not index.is_exact:
        if flat is None or flat is index:
            flat, _ = build_index(xb, ids, "Flat", args.seed)
        e2e["Flat"] = end_to_end(parts.with_index(flat), requests, args.n_retrieve, args.n_prerank, args.k,
                                 args.n_latency, args.batch_size, args.n_batched)
    out["end_to_end"] = e2e
    for name, e in e2e.items():
        log.info("%d items, %s: batch-1 p50 %.2f p99 %.2f ms; batched %.0f req/s", n_items, name,
                 e["batch1"]["end_to_end_ms"]["p50_ms"], e["batch1"]["end_to_end_ms"]["p99_ms"],
                 e["batched"]["requests_per_s"])
    del parts, flat, index
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------ channels


def interleaved_latency(cascades: dict, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                        seed: int = 0) -> dict:
    """Batch-1 latency through ``Cascade.recommend`` of several cascades on the same requests, interleaved: each
    request is served by every cascade in turn, in an order drawn afresh per request (seeded), so load changes on a
    machine shared with other jobs hit them alike. Per cascade: end-to-end p50/p95/p99 on the wall clock and on the
    thread's CPU clock (faiss and torch run on the calling thread), per stage, and per retrieval channel
    ("retrieval_channels_ms", from ``CascadeResult.timing_s``)."""
    names = list(cascades)
    rng = np.random.default_rng(seed)
    wall = {n: np.empty(len(requests)) for n in names}
    cpu = {n: np.empty(len(requests)) for n in names}
    timing: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for i in range(len(requests)):
        r = requests.take(np.array([i]))
        for j in rng.permutation(len(names)):
            name = names[j]
            t0, c0 = time.perf_counter(), time.thread_time()
            res = cascades[name].recommend(r, n_retrieve, n_prerank, k)
            wall[name][i], cpu[name][i] = time.perf_counter() - t0, time.thread_time() - c0
            if res.errors != [None]:
                raise RuntimeError(f"{name}: request {i} was not served: {res.errors[0]}")
            for key, v in res.timing_s.items():
                timing[name].setdefault(key, []).append(v)
    out = {}
    for n in names:
        t = timing[n]
        out[n] = {"n_requests": len(requests), "end_to_end_ms": latency_summary(wall[n]),
                  "end_to_end_cpu_ms": latency_summary(cpu[n]),
                  **{f"{st}_ms": latency_summary(np.array(t[st])) for st in Cascade.STAGE_NAMES},
                  "retrieval_channels_ms": {key.split("/", 1)[1]: latency_summary(np.array(v))
                                            for key, v in t.items() if key.startswith("retrieval/")}}
    return out


def channel_paths(merged, requests: Requests, n: int) -> dict:
    """Each channel's served path against the plain whole-corpus computation it replaces
    (cascade/channels/reference.py), batch 1 on the same requests: p50/p99 of both and whether the lists agree
    (identical lists; ALS: recall@n of the served list against the exact one, as its index may be approximate).
    Most-popular's plain and served work is its per-period refresh (a request only reads the list): both are timed
    counting one period's list afresh."""
    from cascade.channels import ALSChannel, ContentChannel, ItemCFChannel, PopularChannel
    from cascade.channels.reference import als_lists, content_lists, itemcf_lists, popular_lists

    def paths(ch):
        """(served, plain) of one channel: each maps a request to its (items, scores); None: no plain path."""
        def served(r):
            return ch.select(r, None, n)

        if isinstance(ch, PopularChannel):
            def refresh(r):
                ch._cache.clear()  # a refresh: the period's list counted afresh
                return ch.select(r, None, n)

            return refresh, lambda r: popular_lists(ch, r, n)
        if isinstance(ch, ItemCFChannel):
            return served, lambda r: itemcf_lists(ch, r, n)
        if isinstance(ch, ContentChannel):
            return served, lambda r: content_lists(ch, r, n)
        if isinstance(ch, ALSChannel):
            return served, lambda r: als_lists(ch, r, n)
        return None

    out = {}
    reqs = [requests.take(np.array([i])) for i in range(len(requests))]
    for name, ch in zip(merged.names, merged.channels):
        pair = paths(ch)
        if pair is None:
            continue
        served, plain = pair
        t_served, t_plain, same, recall = [], [], True, []
        for r in reqs:  # interleaved, one request at a time
            t0 = time.perf_counter()
            a = served(r)
            t1 = time.perf_counter()
            b = plain(r)
            t_served.append(t1 - t0)
            t_plain.append(time.perf_counter() - t1)
            if isinstance(ch, ALSChannel):
                recall.append(mean_recall_at_k(b[0], a[0]) if (b[0] != -1).any() else 1.0)
            else:
                same &= bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
        row = {"served_ms": latency_summary(np.array(t_served)), "plain_ms": latency_summary(np.array(t_plain)),
               "n_requests": len(reqs)}
        if isinstance(ch, ALSChannel):
            row.update({"index": None if ch.index is None else ch.index.factory, "items_indexed": len(ch._scored),
                        "nprobe": None if ch.index is None else ch.index.nprobe,
                        f"recall_at_{n}_vs_dense": float(np.mean(recall))})
        else:
            row["identical_lists"] = same
        if isinstance(ch, PopularChannel):
            ch._cache.clear()
        out[name] = row
        log.info("channel %s: served p50 %.2f ms, plain p50 %.2f ms", name, row["served_ms"]["p50_ms"],
                 row["plain_ms"]["p50_ms"])
    return out


BY_SCORE = "distilled+channels, pre-rank by score"  # the multi-channel cascade before its pre-rank kept the quotas


def bench_channels(n_items: int, args) -> dict:
    """The distilled+channels cascade of the run with ``n_items`` items (``load_cascade``, the DCNv2 teacher as
    ranker; its pre-rank keeping the channels' quotas, and the same cascade with a pre-rank that cuts by its score
    alone) against the two-tower cascade alone, batch 1, interleaved; per-channel latency; each channel's served
    path against its plain computation."""
    from cascade import artifacts as A
    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import CHANNELS_VARIANT, load_cascade

    cfg = pipeline_config(n_items, args.runs_dir, n_users=args.n_users, n_days=args.n_days, seed=args.seed,
                          extra=tuple(args.overrides))
    run_dir = ensure_run(cfg, reuse=args.reuse_runs)
    data, alone = load_cascade(run_dir, "distilled")
    _, loaded = load_cascade(run_dir, CHANNELS_VARIANT, data=data)
    # both pre-rank cuts over the same stages, whatever the run's replay.prerank_quotas says (a run made before it
    # existed reads False)
    multi, by_score = (Cascade(loaded.retriever, loaded.preranker, loaded.ranker, loaded.seen, loaded.context_kinds,
                               prerank_quotas=q) for q in (True, False))
    requests = to_requests(requests_frame(data.split_impressions("test"), data.context_names), data.context_names)
    timed = cycle(requests, args.n_latency)
    merged = multi.retriever
    out: dict = {"n_items": n_items, "n_test_requests": len(requests), "channels": merged.names,
                 "merge": merged.merge, "quotas": None if merged.quotas is None else
                 dict(zip(merged.names, merged.quotas.tolist()))}
    index = alone.retriever.index
    out["two_tower_index"] = {"factory": index.factory, "nprobe": index.nprobe, "recall": index.recall_}
    out["channels_step"] = {k: v for k, v in A.read_manifest(run_dir / "channels")["metrics"].items() if k != "judge"}
    for v in out["channels_step"].values():
        if isinstance(v, dict):
            v.pop("grid", None)
    # what the stages keep per refresh period (most-popular's lists, the towers' popularity priors) for the periods
    # the timed requests fall in, prepared ahead: a server refreshes them on a timer, off the request path
    # (Cascade.refresh; most-popular's own cost is also in channel_paths)
    t0 = time.perf_counter()
    prepared = sum(casc.refresh(timed.time_ms) for casc in (alone, multi, by_score))
    out["refresh"] = {"periods": prepared, "ms_per_period": (time.perf_counter() - t0) * 1e3 / max(prepared, 1)}
    for casc in (alone, multi, by_score):  # warm-up: lazy allocations, caches
        casc.recommend(cycle(requests, 20), args.n_retrieve, args.n_prerank, args.k)
    out["batch1"] = interleaved_latency({"two_tower": alone, CHANNELS_VARIANT: multi, BY_SCORE: by_score}, timed,
                                        args.n_retrieve, args.n_prerank, args.k, seed=args.seed)
    for name, e in out["batch1"].items():
        log.info("%d items, %s: batch-1 e2e p50 %.2f p99 %.2f ms (cpu p99 %.2f)", n_items, name,
                 e["end_to_end_ms"]["p50_ms"], e["end_to_end_ms"]["p99_ms"], e["end_to_end_cpu_ms"]["p99_ms"])
    out["channel_paths"] = channel_paths(merged, cycle(requests, args.n_plain), args.n_retrieve)
    del alone, multi, by_score, loaded, data
    gc.collect()
    return out


def render_channels_markdown(res: dict) -> str:
    """BENCHMARKS-ready Markdown of a bench_serving --channels result."""
    a, m = res["args"], res["machine"]
    L = [f"### Serving with the classic channels: batch-1 latency ({res['date_utc'][:10]})", "",
         f"Machine: {m['platform']}, {m['cpu_count']} CPUs, load average {m['loadavg_before'][0]:.1f} before / "
         f"{m['loadavg_after'][0]:.1f} after (the benchmark itself keeps one core busy; other jobs shared the "
         "cores: wall-clock times are pessimistic, the cpu-time columns leave out waiting for a core)"
         + (f", run under nice {m['nice']}. " if m.get("nice") else ". ") +
         f"faiss {res['versions'].get('faiss-cpu', '?')}, torch {res['versions'].get('torch', '?')}; faiss and torch "
         f"on {a['threads']} thread. Wall time {res['wall_s'] / 60:.1f} min.", "",
         f"Each corpus is the pipeline run of bench_serving's other sections (`until=\"index\"`, which includes the "
         f"channels step) on the synthetic world with {a['n_users']} users and {a['n_days']} days. The cascades "
         "are `load_cascade(run, \"distilled\")` (the two-tower retrieves alone) and `load_cascade(run, "
         "\"distilled+channels\")` (the two-tower and the classic channels in one retrieval stage, as the replay "
         "builds it, its pre-rank keeping the channels' " + ("shares of each request's union: a score-normalised "
         "union, `replay.merge = \"scores\"`" if res["sizes"][0].get("merge") == "scores" else "quotas") + "; "
         "and the same stages with a pre-rank that keeps its best n_prerank by score, as before "
         "`replay.prerank_quotas`), all with the DCNv2 teacher as ranker and "
         "the run's own index settings; every request is served by each in turn, in a random order per request "
         f"({a['n_latency']} test requests). Cascade sizes: "
         f"n_retrieve {a['n_retrieve']}, n_prerank {a['n_prerank']}, k {a['k']}. What the stages keep per "
         "refresh period (most-popular's lists, the towers' popularity priors) is prepared before timing "
         "(`Cascade.refresh`, as a server's timer does"
         + "".join(f"; {s['n_items']:,} items: {s['refresh']['periods']} (cascade, stage, period) preparations, "
                   f"{s['refresh']['ms_per_period']:.1f} ms each" for s in res["sizes"] if "refresh" in s)
         + "); most-popular's own refresh is also in the last table.", ""]
    L += ["**Check** (budget: batch-1 e2e p99 <= 20 ms at 100,000 items; 1M reported):", ""]
    for s in res["sizes"]:
        e = s["batch1"]["distilled+channels"]
        t = s["batch1"]["two_tower"]
        ok = e["end_to_end_ms"]["p99_ms"] <= 20
        L.append(f"- {s['n_items']:,} items: distilled+channels e2e p99 {e['end_to_end_ms']['p99_ms']:.1f} ms wall"
                 + (f" {'PASS' if ok else 'FAIL'}" if s["n_items"] == 100_000 else "")
                 + f", {e['end_to_end_cpu_ms']['p99_ms']:.1f} ms cpu-time; the two-tower alone "
                 f"{t['end_to_end_ms']['p99_ms']:.1f} ms wall, {t['end_to_end_cpu_ms']['p99_ms']:.1f} ms cpu-time.")
    L += ["", "**End to end** (batch 1, ms).", "",
          "| items | cascade | two-tower index | e2e p50 | e2e p95 | e2e p99 | cpu-time p50 / p99 "
          "| retrieval p50 / p99 | pre-rank p50 / p99 | rank p50 / p99 |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        ix = s["two_tower_index"]
        idx = ix["factory"] + (f" nprobe={ix['nprobe']}" if ix.get("nprobe") else "")
        for name, e in s["batch1"].items():
            def f(key, e=e):
                return f"{e[key]['p50_ms']:.2f} / {e[key]['p99_ms']:.2f}"

            L.append(f"| {s['n_items']:,} | {name} | {idx} | {e['end_to_end_ms']['p50_ms']:.2f} | "
                     f"{e['end_to_end_ms']['p95_ms']:.2f} | **{e['end_to_end_ms']['p99_ms']:.2f}** | "
                     f"{f('end_to_end_cpu_ms')} | {f('retrieval_ms')} | {f('prerank_ms')} | {f('rank_ms')} |")
    names, quotas = res["sizes"][0]["channels"], res["sizes"][0]["quotas"]
    merged = ("the union by standardised scores, no quotas" if quotas is None else
              f"quotas: the two-tower {quotas['two_tower']:.2f}, the others sharing the rest")
    L += ["", "**Per channel** inside the distilled+channels retrieval stage (batch 1, p50 / p99 ms; "
          f"`CascadeResult.timing_s[\"retrieval/<channel>\"]`; {merged}).", "",
          "| items | " + " | ".join(names) + " | ALS index |", "|---:|" + "---:|" * len(names) + "---|"]
    for s in res["sizes"]:
        ch = s["batch1"]["distilled+channels"]["retrieval_channels_ms"]
        als = s["channels_step"].get("als", {}).get("index") or {}
        rec = (als.get("recall") or {}).get("recall_at_k")
        als_txt = (als.get("factory", "-") + (f" nprobe={als['nprobe']}" if als.get("nprobe") else "")
                   + (f" over the {als['items']:,} items with factors" if "items" in als else "")
                   + (f", recall@100 {rec:.3f}" if rec is not None else ""))
        L.append(f"| {s['n_items']:,} | " + " | ".join(f"{ch[n]['p50_ms']:.2f} / {ch[n]['p99_ms']:.2f}" for n in names)
                 + f" | {als_txt} |")
    L += ["", f"**Served path vs the plain computation** of each channel (batch 1, {a['n_plain']} requests, p50 / p99 "
          "ms; the plain ones are cascade/channels/reference.py: ALS scores every item and masks those without "
          "factors, the served ALS searches an index of the items with factors; most-popular: one refresh of a "
          "period's list). Lists: identical, or ALS's recall against the exact lists.", "",
          "| items | channel | plain | served | speed-up (p50) | lists |", "|---:|---|---:|---:|---:|---|"]
    for s in res["sizes"]:
        for name, r in s["channel_paths"].items():
            recall_key = f"recall_at_{a['n_retrieve']}_vs_dense"
            agree = (("identical" if r["identical_lists"] else "**differ**") if "identical_lists" in r
                     else f"recall@{a['n_retrieve']} {r[recall_key]:.3f}")
            L.append(f"| {s['n_items']:,} | {name} | {r['plain_ms']['p50_ms']:.2f} / {r['plain_ms']['p99_ms']:.2f} | "
                     f"{r['served_ms']['p50_ms']:.2f} / {r['served_ms']['p99_ms']:.2f} | "
                     f"{r['plain_ms']['p50_ms'] / max(r['served_ms']['p50_ms'], 1e-9):.0f}x | {agree} |")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------ report


def _refresh(lat: dict) -> str:
    """A replay_latency result's period refreshes, in words ("-" for results from before they were timed apart)."""
    r = lat.get("refresh")
    return "-" if r is None else f"{r['periods']} x {r['ms_per_period']:.1f} ms"


def render_markdown(res: dict) -> str:
    """BENCHMARKS-ready Markdown of a bench_serving result."""
    a = res["args"]
    m = res["machine"]
    L = [f"### Serving: retrieval overhead, index operating points, end-to-end latency ({res['date_utc'][:10]})", "",
         f"Machine: {m['platform']}, {m['cpu_count']} CPUs, load average {m['loadavg_before'][0]:.1f} before / "
         f"{m['loadavg_after'][0]:.1f} after (the benchmark itself keeps one core busy)"
         + (f", run under nice {m['nice']}. " if m.get("nice") else ". ") +
         f"faiss {res['versions'].get('faiss-cpu', '?')}, torch {res['versions'].get('torch', '?')}; faiss and torch "
         f"on {a['threads']} thread. Wall time {res['wall_s'] / 60:.1f} min.", "",
         *([bounds_line(m, a["n_retrieve"]), ""] if m.get("bounds") else []),
         f"Each corpus is its own pipeline run (`until=\"index\"`) on the synthetic world with {a['n_users']} users, "
         f"{a['n_days']} days, pipelines/tiny.toml models with a 32-d retrieval tower (distilled students, DCNv2 "
         "teacher as ranker); queries are the run's test-day requests. Cascade sizes: "
         f"n_retrieve {a['n_retrieve']}, n_prerank {a['n_prerank']}, k {a['k']}."
         + (f" Pipeline overrides: {', '.join(a['overrides'])}." if a.get("overrides") else ""), ""]
    L += ["**Checks** (overhead target: retriever search <= 10% over bare faiss; latency target: e2e p99 <= 20 ms at "
          "batch 1):", ""]
    for s in res["sizes"]:
        over = ", ".join(f"batch {r['batch_size']}: cpu {r['cpu']['overhead_vs_bare']['retriever_search']:+.1%} "
                         f"{'PASS' if r['cpu']['overhead_vs_bare']['retriever_search'] <= 0.10 else 'FAIL'} / wall "
                         f"{r['wall']['overhead_vs_bare']['retriever_search']:+.1%} "
                         f"{'PASS' if r['wall']['overhead_vs_bare']['retriever_search'] <= 0.10 else 'FAIL'}"
                         for r in s["retrieval"].values())
        lat = "; ".join(f"{name}: wall p99 {e['batch1']['end_to_end_ms']['p99_ms']:.1f} ms "
                        f"{'PASS' if e['batch1']['end_to_end_ms']['p99_ms'] <= 20 else 'FAIL'}, cpu-time p99 "
                        f"{e['breakdown']['cpu']['total']['p99_ms']:.1f} ms "
                        f"{'PASS' if e['breakdown']['cpu']['total']['p99_ms'] <= 20 else 'FAIL'}"
                        for name, e in s["end_to_end"].items())
        L.append(f"- {s['n_items']:,} items: retrieval overhead {over}. End-to-end {lat}.")
    L.append("")
    L += ["**Retrieval overhead** (q/s; medians over rounds; within a round every chunk of about 32 queries is run by "
          "each method in turn, in a random order per round; overhead = time / bare faiss - 1, "
          "identical query vectors, identical index file, k = n_retrieve). The 10% target applies to *retriever "
          "search*: `Retriever.select` with the user tower replaced by the precomputed vectors. *cpu* rows use the "
          "thread's CPU time (robust to other jobs' load), *wall* rows elapsed time.", "",
          "| items | index | batch | clock | bare faiss q/s | ItemIndex.search | retriever search | overhead | "
          "full retriever (+ user tower) | served retriever (+ popularity prior) | user tower alone q/s |",
          "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        served = s["served_index"]
        idx = served["factory"] + (f" nprobe={served['nprobe']}" if "nprobe" in served else "")
        for r in s["retrieval"].values():
            for clock in ("cpu", "wall"):
                q, o = r[clock]["qps"], r[clock]["overhead_vs_bare"]
                L.append(f"| {s['n_items']:,} | {idx} | {r['batch_size']} | {clock} | {q['bare_faiss']:,.0f} | "
                         f"{q['item_index']:,.0f} ({o['item_index']:+.1%}) | {q['retriever_search']:,.0f} | "
                         f"**{o['retriever_search']:+.1%}** | {q['retriever_full']:,.0f} "
                         f"({o['retriever_full']:+.1%}) | "
                         + (f"{q['retriever_served']:,.0f} ({o['retriever_served']:+.1%}) | " if "retriever_served" in q
                            else "- (no prior) | ") +
                         f"{q['user_tower']:,.0f} |")
    L += ["", f"**Operating points** on the trained retrieval tower's item embeddings (recall@{a['k_recall']} vs exact "
          f"inner-product search over {a['nq']} test queries; batched = one search of all queries; single = one query "
          "per call).", "",
          "| items | index | setting | recall | batched q/s | single p50 ms | single p99 ms | build s | MB |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        for p in s["operating_points"]:
            setting = f"{p['param']}={p['value']}" if p["param"] else "exact"
            b = "run's index" if p["build_s"] is None else f"{p['build_s']:.1f}"
            L.append(f"| {s['n_items']:,} | {p['factory']} | {setting} | {p['recall_at_k']:.4f} | "
                     f"{p['batched_qps']:,.0f} | "
                     f"{p['single_p50_ms']:.2f} | {p['single_p99_ms']:.2f} | {b} | {p['index_mb']:.0f} |")
        if "hnsw_skipped" in s:
            L.append(f"| {s['n_items']:,} | HNSW | skipped: {s['hnsw_skipped']} | | | | | | |")
    L += ["", f"**End-to-end latency at batch 1** through `Cascade.recommend` ({a['n_latency']} requests; ms) and "
          f"batched throughput (batch {a['batch_size']}, {a['n_batched']} requests). Target: "
          "p99 <= 20 ms. The cpu-time "
          "column is the per-step breakdown's total on the thread's CPU clock (same requests, run separately): what "
          "the cascade costs without waiting for a core taken by other jobs. What the stages keep per refresh "
          "period (most-popular's lists, the towers' popularity priors) is prepared before each period's first "
          "request, outside the timings, as a server's timer does (`Cascade.refresh`); its cost is the last "
          "column.", "",
          "| items | retrieval index | recall@500 | e2e p50 | e2e p95 | e2e p99 | retrieval p50 / "
          "p99 | pre-rank p50 / p99 "
          "| rank p50 / p99 | cpu-time e2e p50 / p99 | batched req/s | period refresh (off the path) |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        for name, e in s["end_to_end"].items():
            b1 = e["batch1"]
            rec = s["served_index"].get(f"recall_at_{a['n_retrieve']}") if name != "Flat" and "nprobe" in name else 1.0
            L.append(f"| {s['n_items']:,} | {name} | {rec:.3f} | {b1['end_to_end_ms']['p50_ms']:.2f} | "
                     f"{b1['end_to_end_ms']['p95_ms']:.2f} | **{b1['end_to_end_ms']['p99_ms']:.2f}** | "
                     f"{b1['retrieval_ms']['p50_ms']:.2f} / {b1['retrieval_ms']['p99_ms']:.2f} | "
                     f"{b1['prerank_ms']['p50_ms']:.2f} / {b1['prerank_ms']['p99_ms']:.2f} | "
                     f"{b1['rank_ms']['p50_ms']:.2f} / {b1['rank_ms']['p99_ms']:.2f} | "
                     f"{e['breakdown']['cpu']['total']['p50_ms']:.2f} / "
                     f"{e['breakdown']['cpu']['total']['p99_ms']:.2f} | "
                     f"{e['batched']['requests_per_s']:,.0f} | {_refresh(b1)} |")
    L += ["", "**Per-step breakdown at batch 1** (p50 / p99 ms over the same requests, steps timed one by one in the "
          "cascade's order). *wall* is elapsed time; *cpu* is the thread's CPU time, which leaves out waiting for a "
          "core taken by other jobs (close to what an idle core would give). The teacher's cost = pair features "
          "(user, item, context and cross features of the 100 candidates) + forward.", "",
          "| items | index | clock | user tower | index search | prior rescoring | pre-rank score | pair features | "
          "teacher forward | top-k (both, p50) | total |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        for name, e in s["end_to_end"].items():
            for clock in ("wall", "cpu"):
                bd = e["breakdown"][clock]

                def f(step, bd=bd):
                    return f"{bd[step]['p50_ms']:.2f} / {bd[step]['p99_ms']:.2f}"

                topk = bd["prerank_topk"]["p50_ms"] + bd["rank_topk"]["p50_ms"]
                prior = f("retrieval_prior") if "retrieval_prior" in bd else "-"
                L.append(f"| {s['n_items']:,} | {name} | {clock} | {f('user_tower')} | {f('index_search')} | {prior} | "
                         f"{f('prerank_score')} | {f('pair_features')} | {f('rank_forward')} | {topk:.2f} | "
                         f"**{f('total')}** |")
    L += ["", "**Growth with the corpus** (batch 1 p50 / p99 ms unless noted).", "",
          "| items | index | full retriever q/s (batch 1) | full retriever q/s (batched) | retrieval p50 / p99 | "
          "e2e p50 / p99 | e2e batched req/s |",
          "|---:|---|---:|---:|---:|---:|---:|"]
    for s in res["sizes"]:
        for name, e in s["end_to_end"].items():
            b1 = e["batch1"]
            served = name != "Flat" or s["served_index"]["factory"] == "Flat"
            r1 = f"{s['retrieval']['batch1']['wall']['qps']['retriever_full']:,.0f}" if served else "-"
            batched_key = f"batch{a['batch_size']}"
            rb = f"{s['retrieval'][batched_key]['wall']['qps']['retriever_full']:,.0f}" if served else "-"
            L.append(f"| {s['n_items']:,} | {name} | {r1} | {rb} | {b1['retrieval_ms']['p50_ms']:.2f} / "
                     f"{b1['retrieval_ms']['p99_ms']:.2f} | {b1['end_to_end_ms']['p50_ms']:.2f} / "
                     f"{b1['end_to_end_ms']['p99_ms']:.2f} | {e['batched']['requests_per_s']:,.0f} |")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench_serving", help="where the pipeline runs live")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="corpus sizes (items)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="take finished pipeline steps under --runs-dir as they are, even if the code changed since")
    p.add_argument("--prepare-only", action="store_true", help="build the pipeline runs and stop (nothing timed)")
    p.add_argument("--points-sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="sizes at which Flat / IVF / HNSW operating points are measured")
    p.add_argument("--n-users", type=int, default=3000)
    p.add_argument("--n-days", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-retrieve", type=int, default=500)
    p.add_argument("--n-prerank", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-recall", type=int, default=100, help="k of the operating-point recall")
    p.add_argument("--recall-target", type=float, default=0.95, help="recall@n_retrieve of the served IVF point")
    p.add_argument("--nq", type=int, default=1000, help="test queries for batched search and recall")
    p.add_argument("--nq-single", type=int, default=300, help="queries timed one at a time")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds of the retrieval overhead")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-latency", type=int, default=1000, help="requests for batch-1 end-to-end latency")
    p.add_argument("--n-batched", type=int, default=4096, help="requests for batched throughput")
    p.add_argument("--nprobes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-searches", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--hnsw-max-n", type=int, default=100_000, help="skip HNSW above this many items")
    # 1 thread: single queries are fastest on one faiss thread, and on this 2-core machine (one physical core)
    # shared with other jobs two threads fight for the core (bench_index)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, and faiss's where an index sets none (the served indexes search on 1)")
    p.add_argument("--channels", action="store_true",
                   help="only the multi-channel section: load_cascade(run, \"distilled+channels\") vs the two-tower "
                        "alone, per-channel latency, each channel's served path vs its plain computation (default "
                        "--out bench_serving_channels.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline override for every run (e.g. teacher.sequence_length=20: serving with the "
                        "behaviour-sequence teacher); use its own --runs-dir")
    p.add_argument("--n-plain", type=int, default=100, help="--channels: requests timing each channel's paths")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/bench_serving.json, or bench_serving_channels.json "
                        "with --channels)")
    p.add_argument("--render", action="store_true", help="only re-render the Markdown of an existing --out JSON")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("bench_serving_channels.json" if args.channels else "bench_serving.json")
    return args


def machine_info(load_before, threads: int = 1) -> dict:
    """The machine as this run saw it: platform, load, the CPU (cascade.machine.machine_record: model, bf16 / AMX
    flags, torch's view) and its bounds on ``threads`` threads (float32 / bf16 GEMM GFLOP/s, memory GB/s)."""
    from cascade.machine import machine_bounds, machine_record

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "nice": os.nice(0), "cpu": machine_record(), "bounds": machine_bounds(threads)}


def bounds_line(m: dict, n_candidates: int, dim: int = 32) -> str:
    """The machine's bounds and what they allow the pre-rank product (``n_candidates`` item vectors of ``dim``
    float32 dotted with one user vector): its bytes at the memory bandwidth, its FLOPs at the float32 GEMM rate;
    "" for a result recorded without bounds."""
    from cascade.machine import format_bounds

    b = m.get("bounds")
    if not b:
        return ""
    nbytes, flops = n_candidates * dim * 4, 2 * n_candidates * dim
    return (f"Machine bounds: {format_bounds(b)}. The pre-rank product ({n_candidates} candidates x {dim}-d float32) "
            f"reads {nbytes / 1024:.0f} KiB: {nbytes / (b['memory_gbs'] * 1e9) * 1e6:.1f} us at the memory bandwidth "
            f"(from DRAM; less where the rows are in cache), {flops / (b['float32_gflops'] * 1e9) * 1e6:.2f} us at the "
            "float32 GEMM rate: the pre-rank scoring time in the breakdown below against these.")


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.render:
        from cascade.artifacts import read_json

        res = read_json(args.out)
        md = (render_channels_markdown if res.get("mode") == "channels" else render_markdown)(res)
        args.out.with_suffix(".md").write_text(md)
        print(md)
        return res
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cascade").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.prepare_only:
        for n in args.sizes:
            ensure_run(pipeline_config(n, args.runs_dir, n_users=args.n_users, n_days=args.n_days, seed=args.seed,
                                       extra=tuple(args.overrides)),
                       reuse=args.reuse_runs)
        return {}
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    sizes = [(bench_channels if args.channels else bench_size)(n, args) for n in args.sizes]
    res = {"benchmark": "bench_serving", "mode": "channels" if args.channels else "stages",
           "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine_info(load_before, args.threads), "versions": package_versions(),
           # paths by name only: no machine-specific absolute paths in committed results
           "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "wall_s": time.perf_counter() - t0, "sizes": sizes}
    write_json(args.out, res)
    md = (render_channels_markdown if args.channels else render_markdown)(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({res['wall_s'] / 60:.1f} min)")
    return res


if __name__ == "__main__":
    main()
