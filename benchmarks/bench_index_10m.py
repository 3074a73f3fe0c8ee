"""The item index at 10 M items on the CPU: compressed IVF-PQ / OPQ indexes with re-ranking of the shortlist.

Corpus: N seeded clustered d-dim float32 embeddings (the recipe of ``cascade.index.exact.clustered_vectors``:
unit centres, gaussian noise of std spread / sqrt(d), norms uniform in [0.5, 2]; N / points_per_cluster planted
clusters), generated in chunks straight into one float32 array, so the corpus costs N x d x 4 bytes (2.56 GB at
10 M x 64) and never a float64 copy. Queries: unit vectors from the same centres.

Ground truth: the exact top-k of every query by chunked brute force (``exact_topk``: one GEMM per block of
65,536 items, peak extra memory ~64 MB).

Indexes (``--configs``, each "FACTORY/REFINE" with {nlist} filled in; built through ``ItemIndex.build`` on a
``--train-size`` sample): by default IVF-PQ16 with an exact float32 re-rank store (4d bytes per item more: the
reference, as large as the corpus), IVF-PQ16 with an 8-bit re-rank store (d bytes per item: the one that fits
where float32 does not) and the same behind an OPQ rotation. For each: build seconds, memory by part
(``ItemIndex.memory_bytes``), the process RSS before / after the build, and at every (nprobe, k_factor) operating
point: recall@k vs exact, batched QPS (``--threads`` faiss threads) and single-query p50 / p99 (1 thread).
k_factor 1 is the PQ shortlist alone (no re-ranking gain).

Writes ``benchmarks/results/bench_index_10m.json`` and ``.md`` (``--out`` stem). Usage:

    nice python benchmarks/bench_index_10m.py                 # 10 M items (see BENCHMARKS.md for its wall time)
    nice python benchmarks/bench_index_10m.py --n 1000000     # a check in a few minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from cascade.artifacts import package_versions, write_json, write_text
from cascade.eval.metrics import mean_recall_at_k
from cascade.index.exact import clustered_vectors, exact_topk
from cascade.index.faiss_index import ItemIndex

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules
from bench_index import time_single  # noqa: E402
from bench_soak import rss_bytes  # noqa: E402

log = logging.getLogger("bench_index_10m")

DEFAULT_CONFIGS = ("IVF{nlist},PQ16/Flat", "IVF{nlist},PQ16/SQ8", "OPQ16_64,IVF{nlist},PQ16/SQ8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000, help="corpus size (items)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--points-per-cluster", type=int, default=100)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=1_000_000, help="rows generated per chunk")
    p.add_argument("--nq", type=int, default=500, help="queries for ground truth, recall and batched QPS")
    p.add_argument("--nq-single", type=int, default=100, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=100)
    # 4096 lists (2,441 items per list at 10 M): k-means over 16384 lists on this CPU would take ~10 minutes of
    # training alone; 4096 trains in well under a minute on 64 x nlist sampled rows
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--train-size", type=int, default=None, help="rows sampled to train (default 64 x nlist)")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="FACTORY/REFINE, {nlist} filled in")
    # at 1 M, recall@100 was bound by nprobe (k_factor 8 matched 4 to 0.001); at 10 M with 4,096 lists both bind:
    # nprobe 256 gave 0.71 with PQ alone and 0.83 with a 4x shortlist, so the sweep goes to nprobe 1024 and 16x
    p.add_argument("--nprobes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--k-factors", type=int, nargs="+", default=[1, 4, 16])
    # one faiss thread: this 2-core machine is one physical core; 2 threads made batched search slower
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_index_10m",
                   help="output stem: writes STEM.json and STEM.md")
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_config(config: str, xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, I_exact: np.ndarray,
                 args: argparse.Namespace) -> dict:
    factory, _, refine = config.format(nlist=args.nlist).partition("/")
    refine = refine or "Flat"
    faiss.omp_set_num_threads(args.threads)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = ItemIndex.build(xb, ids, metric="ip", factory=factory, refine=refine, device="cpu", seed=args.seed,
                            train_size=args.train_size or 64 * args.nlist, k_factor=max(args.k_factors))
    build_s = time.perf_counter() - t0
    mem = index.memory_bytes()
    rss1 = rss_bytes()
    log.info("%s / %s: built in %.1f s, %.0f MB (codes %.0f MB, re-rank store %.0f MB), RSS +%.0f MB", factory,
             refine, build_s, mem["total"] / 1e6, mem["codes"] / 1e6, mem["refine"] / 1e6, (rss1 - rss0) / 1e6)
    points = []
    for nprobe in [v for v in args.nprobes if v <= args.nlist]:
        for kf in args.k_factors:
            index.set_search_params(nprobe=nprobe, k_factor=kf)
            faiss.omp_set_num_threads(args.threads)
            t = time.perf_counter()
            _, I = index.search_positions(xq, args.k)
            qps = len(xq) / (time.perf_counter() - t)
            faiss.omp_set_num_threads(1)
            row = {"nprobe": nprobe, "k_factor": kf, "recall_at_k": mean_recall_at_k(I_exact, I), "batched_qps": qps,
                   **time_single(index.search_positions, xq[: args.nq_single], args.k)}
            log.info("  nprobe %3d k_factor %d: recall@%d %.4f, %6.0f q/s batched, single p50 %.2f ms p99 %.2f ms",
                     nprobe, kf, args.k, row["recall_at_k"], qps, row["single_p50_ms"], row["single_p99_ms"])
            points.append(row)
    del index
    return {"factory": factory, "refine": refine, "build_s": build_s, "memory_bytes": mem,
            "rss_before_build": rss0, "rss_after_build": rss1, "peak_rss_after": peak_rss_bytes(), "points": points}


def to_markdown(out: dict) -> str:
    a = out["args"]
    lines = [
        f"# Item index at {a['n']:,} x {a['dim']} on the CPU ({out['date_utc']})", "",
        f"Machine: {out['machine']['processor']}, {out['machine']['cpu_count']} CPUs, load before "
        f"{out['machine']['loadavg_before'][0]:.2f}; faiss threads {a['threads']} (batched), 1 (single query). "
        f"Corpus {out['corpus_bytes'] / 1e9:.2f} GB float32, {out['clusters']:,} planted clusters; {a['nq']} queries, "
        f"recall@{a['k']} vs exact brute force ({out['exact_s']:.1f} s for all queries). Train sample "
        f"{a['train_size'] or 64 * a['nlist']:,} rows. Wall {out['wall_s'] / 60:.1f} min, peak RSS "
        f"{out['peak_rss_bytes'] / 1e9:.2f} GB (the corpus itself included).", "",
        "| factory | re-rank store | build s | index MB (codes / re-rank store) | RSS after build GB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in out["indexes"]:
        m = r["memory_bytes"]
        lines.append(f"| {r['factory']} | {r['refine']} | {r['build_s']:.0f} | {m['total'] / 1e6:,.0f} "
                     f"({m['codes'] / 1e6:,.0f} / {m['refine'] / 1e6:,.0f}) | {r['rss_after_build'] / 1e9:.2f} |")
    lines += ["", f"| factory | re-rank | nprobe | k_factor | recall@{a['k']} | batched q/s | single p50 ms | "
                  "single p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["indexes"]:
        for p in r["points"]:
            lines.append(f"| {r['factory']} | {r['refine']} | {p['nprobe']} | {p['k_factor']} | "
                         f"{p['recall_at_k']:.4f} | {p['batched_qps']:,.0f} | {p['single_p50_ms']:.2f} | "
                         f"{p['single_p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("cascade").setLevel(logging.WARNING)
    t_all = time.perf_counter()
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    clusters = max(1, args.n // args.points_per_cluster)
    t0 = time.perf_counter()
    xb, xq = clustered_vectors(args.n, args.dim, clusters, rng, n_queries=args.nq, spread=args.spread,
                               chunk_rows=args.chunk)
    ids = np.arange(args.n, dtype=np.int64)
    log.info("corpus %d x %d (%.2f GB) in %.1f s", args.n, args.dim, xb.nbytes / 1e9, time.perf_counter() - t0)
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, I_exact = exact_topk(xq, xb, args.k, metric="ip")
    exact_s = time.perf_counter() - t0
    log.info("exact top-%d of %d queries in %.1f s", args.k, args.nq, exact_s)
    indexes = [bench_config(c, xb, ids, xq, I_exact, args) for c in args.configs]
    out = {
        "benchmark": "bench_index_10m",
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": package_versions(),
        # the output stem by name only: no machine-specific absolute paths in committed results
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clusters": clusters, "corpus_bytes": int(xb.nbytes), "exact_s": exact_s,
        "indexes": indexes, "peak_rss_bytes": peak_rss_bytes(), "wall_s": time.perf_counter() - t_all,
    }
    write_json(args.out.with_suffix(".json"), out)
    md = to_markdown(out)
    write_text(args.out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
