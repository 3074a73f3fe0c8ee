"""Benchmark the item index: build time, size, batched / single-query throughput and recall@k vs exact search.

Corpora: seeded clustered embeddings (``cascade.index.exact.clustered_vectors``; random gaussians would make ANN
recall meaningless), n_items in --sizes x --dim, queries from the same clusters. Configurations: Flat (exact),
IVF at several nprobe, HNSW32 (only up to --hnsw-max-n items: it builds 10-30x slower than IVF here),
IVF-PQ with exact re-ranking of a k_factor x k shortlist, and the torch exact backend (on the CPU here).

Writes JSON (machine info, date, versions, one row per configuration and operating point) to --out, and prints a
table. Usage: ``python benchmarks/bench_index.py`` (default run: 100k and 1M x 64, a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import re
import time
from pathlib import Path

import faiss
import numpy as np

from cascade.artifacts import package_versions, write_json
from cascade.eval.metrics import mean_recall_at_k
from cascade.index.exact import TorchExactIndex, clustered_vectors, exact_topk
from cascade.index.factory import FLAT_MAX_ITEMS, default_factory
from cascade.index.faiss_index import ItemIndex

log = logging.getLogger("bench_index")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes (items)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--points-per-cluster", type=int, default=100,
                   help="planted clusters = n_items / this, so the structure stays alike across sizes")
    p.add_argument("--spread", type=float, default=0.5, help="cluster noise (0: points on the centres)")
    p.add_argument("--nq", type=int, default=500, help="queries for batched search and recall")
    p.add_argument("--nq-single", type=int, default=100, help="queries timed one at a time (1 thread)")
    p.add_argument("--k", type=int, default=100)
    # 1 thread by default: on this 2-core (1 physical core) machine shared with other jobs, 2 OpenMP threads made
    # batched Flat search 15x slower (spinning threads fight for the core) for at most 1.2x on an idle machine
    p.add_argument("--threads", type=int, default=1, help="faiss / torch threads for batched search and builds")
    p.add_argument("--nprobes", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--ef-searches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--pq-nprobes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--pq", default="PQ32x4", help="PQ part of the IVF-PQ factory (d must be a multiple of m)")
    p.add_argument("--k-factor", type=int, default=4)
    p.add_argument("--hnsw-max-n", type=int, default=200_000, help="skip HNSW above this many items")
    p.add_argument("--torch-max-n", type=int, default=1_000_000, help="skip the torch exact backend above this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_index.json")
    return p.parse_args(argv)


def time_batched(search, xq: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(queries per second, I) of one batched search of xq."""
    t0 = time.perf_counter()
    _, I = search(xq, k)
    return len(xq) / (time.perf_counter() - t0), I


def time_single(search, xq: np.ndarray, k: int) -> dict:
    """Per-query latency of searching xq one row at a time: p50 / p99 in ms and queries per second."""
    lat = np.empty(len(xq))
    search(xq[:1], k)  # warm-up (first call pays lazy allocations)
    for i in range(len(xq)):
        t0 = time.perf_counter()
        search(xq[i:i + 1], k)
        lat[i] = time.perf_counter() - t0
    return {"single_p50_ms": float(np.percentile(lat, 50) * 1e3), "single_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "single_qps": float(len(xq) / lat.sum())}


def bench_index(index: ItemIndex, build_s: float, xq, xq1, k, I_exact, threads, param=None,
                values=(None,)) -> list[dict]:
    rows = []
    size = index.index_bytes()
    for v in values:
        if param == "nprobe":
            index.set_search_params(nprobe=v)
        elif param == "efSearch":
            index.set_search_params(ef_search=v)
        faiss.omp_set_num_threads(threads)
        qps, I = time_batched(index.search_positions, xq, k)
        faiss.omp_set_num_threads(1)  # single queries are fastest on one thread (BENCHMARKS.md, bench_index)
        single = time_single(index.search_positions, xq1, k)
        row = {"factory": index.factory, "backend": index.backend, "param": param, "value": v, "build_s": build_s,
               "index_bytes": size, "recall_at_k": mean_recall_at_k(I_exact, I), "batched_qps": qps,
               "batched_threads": threads, **single}
        log.info("%-22s %-8s %-5s recall@%d %.4f  batched %8.0f q/s  single p50 %.2f ms", index.factory,
                 param or "", v if v is not None else "", k, row["recall_at_k"], qps, single["single_p50_ms"])
        rows.append(row)
    return rows


def run_size(n: int, args) -> dict:
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    clusters = max(1, n // args.points_per_cluster)
    xb, xq = clustered_vectors(n, args.dim, clusters, rng, n_queries=args.nq, spread=args.spread)
    ids = np.arange(n, dtype=np.int64)
    xq1 = xq[: args.nq_single]
    gen_s = time.perf_counter() - t0

    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, I_exact = exact_topk(xq, xb, args.k, metric="ip")
    exact_s = time.perf_counter() - t0
    log.info("n=%d: data %.1f s, numpy exact_topk of %d queries %.1f s (%.0f q/s)", n, gen_s, args.nq, exact_s,
             args.nq / exact_s)
    rows: list[dict] = []
    # the library's default IVF size (4 * sqrt(n) lists, a power of two), so the rows measure what a user gets
    nlist = int(re.match(r"IVF(\d+)", default_factory(max(n, FLAT_MAX_ITEMS))).group(1))

    def build(factory, **kw):
        faiss.omp_set_num_threads(args.threads)
        t = time.perf_counter()
        index = ItemIndex.build(xb, ids, metric="ip", factory=factory, device="cpu", seed=args.seed, **kw)
        return index, time.perf_counter() - t

    index, s = build("Flat")
    rows += bench_index(index, s, xq, xq1, args.k, I_exact, args.threads)
    del index
    index, s = build(f"IVF{nlist},Flat")
    rows += bench_index(index, s, xq, xq1, args.k, I_exact, args.threads, "nprobe",
                        [v for v in args.nprobes if v <= nlist])
    del index
    if n <= args.hnsw_max_n:
        index, s = build("HNSW32")
        rows += bench_index(index, s, xq, xq1, args.k, I_exact, args.threads, "efSearch", args.ef_searches)
        del index
    else:
        log.info("n=%d: HNSW32 skipped (n > --hnsw-max-n=%d: its build takes minutes here)", n, args.hnsw_max_n)
    index, s = build(f"IVF{nlist},{args.pq}", k_factor=args.k_factor)
    pq_rows = bench_index(index, s, xq, xq1, args.k, I_exact, args.threads, "nprobe",
                          [v for v in args.pq_nprobes if v <= nlist])
    rows += [{**r, "k_factor": args.k_factor} for r in pq_rows]
    del index
    if n <= args.torch_max_n:
        import torch

        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        tix = TorchExactIndex(xb, "ip", device="cpu")
        s = time.perf_counter() - t
        qps, I = time_batched(tix.search, xq, args.k)
        torch.set_num_threads(1)
        single = time_single(tix.search, xq1, args.k)
        rows.append({"factory": "torch-exact", "backend": "torch (cpu)", "param": None, "value": None, "build_s": s,
                     "index_bytes": int(xb.nbytes), "recall_at_k": mean_recall_at_k(I_exact, I), "batched_qps": qps,
                     "batched_threads": args.threads, **single})
        log.info("%-22s recall@%d %.4f  batched %8.0f q/s  single p50 %.2f ms", "torch-exact", args.k,
                 rows[-1]["recall_at_k"], qps, single["single_p50_ms"])
    return {"n_items": n, "dim": args.dim, "clusters": clusters, "spread": args.spread, "nq": args.nq,
            "nq_single": args.nq_single,
            "k": args.k, "nlist": nlist, "numpy_exact_s": exact_s, "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("cascade").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    results = [run_size(n, args) for n in args.sizes]
    out = {
        "benchmark": "bench_index",
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": package_versions(),
        # the output path is recorded by name only: no machine-specific absolute paths in committed results
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - t0,
        "results": results,
    }
    write_json(args.out, out)
    print(f"\n{'n':>8} {'factory':<22} {'param':<14} {'recall':>7} {'batch q/s':>10} "
          f"{'p50 ms':>7} {'build s':>8} {'MB':>7}")
    for res in results:
        for r in res["rows"]:
            p = f"{r['param']}={r['value']}" if r["param"] else ""
            print(f"{res['n_items']:>8} {r['factory']:<22} {p:<14} {r['recall_at_k']:>7.4f} {r['batched_qps']:>10.0f} "
                  f"{r['single_p50_ms']:>7.2f} {r['build_s']:>8.1f} {r['index_bytes'] / 2**20:>7.1f}")
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
