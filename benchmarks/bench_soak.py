"""Soak test: replay at least 100,000 requests through the cascade at batch 1 and batched, and check it holds up.

The "Reliability" issue asks: memory does not grow (RSS at start and end), p99 latency stays within 1.5x of the
first 10% of the replay, and no request is dropped. For each mode (batch 1, then batches of --batch-size) this
script cycles the test-day requests of a pipeline run (request ids made unique) through ``Cascade.recommend`` and
records, per call, the wall time and the thread's CPU time (``time.thread_time``: faiss and torch run on the
calling thread at 1 thread), plus the process RSS at the start and after every 10% of the requests.

Checks (all reported, none hidden):
- served == sent: every request came back without an error, and every final list has k real items;
- p99 of the last 10% and of the whole replay <= 1.5 x p99 of the first 10% (wall and CPU time both reported;
  wall time on a machine shared with other jobs also measures their load, CPU time does not);
- RSS at the end <= RSS after the first 10% (the warm state) + max(5%, 20 MiB); RSS at the very start is reported
  too (the first requests pay one-off allocations).

The run: ``bench_serving.pipeline_config`` (the same synthetic world runs as the serving benchmark; --n-items
picks the corpus, default 10K items with an exact Flat index), built or resumed under --runs-dir.
Usage: ``nice python benchmarks/bench_soak.py --runs-dir <dir>``. Writes JSON and Markdown to --out (and .md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark module, run as a script or imported

from bench_serving import cycle, ensure_run, machine_info, pipeline_config  # noqa: E402

from cascade.arrays import PAD  # noqa: E402
from cascade.artifacts import package_versions, write_json  # noqa: E402
from cascade.data.requests import Requests  # noqa: E402
from cascade.serve.cascade import Cascade  # noqa: E402

log = logging.getLogger("bench_soak")

MIB = 2**20


def rss_bytes() -> int:
    """The process's resident set size now, in bytes (from /proc/self/status, VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line: cannot measure RSS on this system")


def p99(x: np.ndarray) -> float:
    return float(np.percentile(x, 99))


def soak(cascade: Cascade, requests: Requests, n_requests: int, batch_size: int, n_retrieve: int, n_prerank: int,
         k: int, checkpoints: int = 10, rss=rss_bytes, progress: bool = False) -> dict:
    """Serve ``n_requests`` (``requests`` cycled, ids unique) in batches of ``batch_size``, in order.

    Returns: sent, served (requests without error), complete (requests whose list has k real items),
    rss_mib [(requests sent, MiB)] at the start and after each 1/``checkpoints`` of the requests, and per-call
    latency summaries (ms): "wall" / "cpu" -> {"p50_all", "p99_all", "p99_first", "p99_last", "p99_by_part"
    (p99 of each 1/checkpoints part), "ratio_all", "ratio_last" (p99 / p99_first)}, plus "checks" (pass flags).
    """
    if n_requests < 1 or batch_size < 1 or checkpoints < 1:
        raise ValueError(f"need n_requests, batch_size, checkpoints >= 1, got {n_requests}, "
                         f"{batch_size}, {checkpoints}")
    reqs = cycle(requests, n_requests)
    starts = np.arange(0, n_requests, batch_size)
    n_calls = len(starts)
    # the call after which each checkpoint's share of the requests has been sent
    marks = {int(math.ceil(n_requests * c / checkpoints / batch_size)) - 1: c for c in range(1, checkpoints + 1)}
    wall = np.empty(n_calls)
    cpu = np.empty(n_calls)
    served = complete = 0
    rss_log = [(0, rss() / MIB)]
    for j in tqdm(range(n_calls), desc=f"soak b={batch_size}", disable=not progress, leave=False):
        sub = reqs.take(np.arange(starts[j], min(starts[j] + batch_size, n_requests)))
        t0, c0 = time.perf_counter(), time.thread_time()
        res = cascade.recommend(sub, n_retrieve, n_prerank, k)
        wall[j], cpu[j] = time.perf_counter() - t0, time.thread_time() - c0
        ok = np.array([e is None for e in res.errors])
        served += int(ok.sum())
        complete += int((ok & (res.items != PAD).all(axis=1)).sum())
        if j in marks:
            rss_log.append((int(min(starts[j] + batch_size, n_requests)), rss() / MIB))
            log.info("soak b=%d: %d/%d requests, RSS %.1f MiB, p99 so far %.2f ms", batch_size, rss_log[-1][0],
                     n_requests, rss_log[-1][1], p99(wall[: j + 1]) * 1e3)
    part = max(1, n_calls // checkpoints)  # calls per 1/checkpoints of the replay
    lat = {}
    for name, t in (("wall", wall * 1e3), ("cpu", cpu * 1e3)):
        first, last = p99(t[:part]), p99(t[-part:])
        lat[name] = {"p50_all": float(np.median(t)), "p99_all": p99(t), "p99_first": first, "p99_last": last,
                     "p99_by_part": [p99(t[i * part:(i + 1) * part]) for i in range(checkpoints)
                                     if len(t[i * part:(i + 1) * part])],
                     "ratio_all": p99(t) / first, "ratio_last": last / first, "calls_per_part": part}
    rss_warm, rss_end = rss_log[1][1], rss_log[-1][1]
    allowed = max(0.05 * rss_warm, 20.0)
    checks = {"no_request_dropped": served == n_requests and complete == n_requests,
              "p99_wall_within_1.5x": lat["wall"]["ratio_all"] <= 1.5 and lat["wall"]["ratio_last"] <= 1.5,
              "p99_cpu_within_1.5x": lat["cpu"]["ratio_all"] <= 1.5 and lat["cpu"]["ratio_last"] <= 1.5,
              "rss_flat": rss_end <= rss_warm + allowed}
    return {"batch_size": batch_size, "sent": n_requests, "served": served, "complete": complete, "calls": n_calls,
            "requests_per_s": float(n_requests / wall.sum()), "rss_mib": rss_log,
            "rss_growth_mib": {"start_to_end": rss_end - rss_log[0][1], "warm_to_end": rss_end - rss_warm,
                               "allowed_warm_to_end": allowed},
            "latency_ms": lat, "checks": checks}


def render_markdown(res: dict) -> str:
    """BENCHMARKS-ready Markdown of a bench_soak result."""
    a, m = res["args"], res["machine"]
    L = [f"### Soak: {a['n_requests']:,} requests at batch 1 and batched ({res['date_utc'][:10]})", "",
         f"Machine: {m['platform']}, {m['cpu_count']} CPUs, load average {m['loadavg_before'][0]:.1f} before / "
         f"{m['loadavg_after'][0]:.1f} after (shared with other jobs running at the same time; run under `nice`). "
         f"faiss and torch on {a['threads']} thread. Wall time {res['wall_s'] / 60:.1f} min"
         + (f" (modes run side by side in {len(res['parts'])} processes, RSS measured per process)"
            if res.get("parts") else "") + ".", "",
         f"Cascade: the {a['n_items']:,}-item synthetic-world run of the serving benchmark "
         f"({res['run']['index']} index, "
         f"distilled towers, DCNv2 teacher as ranker), n_retrieve {a['n_retrieve']}, n_prerank {a['n_prerank']}, "
         f"k {a['k']}; its {res['run']['n_test_requests']:,} test-day requests cycled in time order. Latency is per "
         "call (a batch-B call serves B requests); *wall* is elapsed time, *cpu* the thread's CPU time (leaves out "
         "waiting for a core taken by other jobs). RSS from /proc/self/status.", "",
         "| mode | sent | served | complete lists | req/s | p50 wall ms | p99 first 10% | p99 all | p99 last 10% | "
         "ratio all / last | p99 cpu first / all / last | cpu ratio all / last | RSS start / after 10% / end MiB | "
         "checks |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["modes"]:
        w, c = r["latency_ms"]["wall"], r["latency_ms"]["cpu"]
        rss = r["rss_mib"]
        checks = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["checks"].items())
        L.append(f"| batch {r['batch_size']} | {r['sent']:,} | {r['served']:,} | {r['complete']:,} | "
                 f"{r['requests_per_s']:,.0f} | {w['p50_all']:.2f} | {w['p99_first']:.2f} | {w['p99_all']:.2f} | "
                 f"{w['p99_last']:.2f} | {w['ratio_all']:.2f} / {w['ratio_last']:.2f} | {c['p99_first']:.2f} / "
                 f"{c['p99_all']:.2f} / {c['p99_last']:.2f} | {c['ratio_all']:.2f} / {c['ratio_last']:.2f} | "
                 f"{rss[0][1]:.0f} / {rss[1][1]:.0f} / {rss[-1][1]:.0f} | {checks} |")
    L += ["", "RSS (MiB) after each 10% of the requests, and p99 wall / cpu ms of each 10% of the calls:", "",
          "| mode | " + " | ".join(f"{10 * (i + 1)}%" for i in range(len(res["modes"][0]["rss_mib"]) - 1)) + " |",
          "|---|" + "---:|" * (len(res["modes"][0]["rss_mib"]) - 1)]
    for r in res["modes"]:
        L.append(f"| batch {r['batch_size']} RSS | " + " | ".join(f"{x[1]:.0f}" for x in r["rss_mib"][1:]) + " |")
        w, c = r["latency_ms"]["wall"]["p99_by_part"], r["latency_ms"]["cpu"]["p99_by_part"]
        L.append(f"| batch {r['batch_size']} p99 | " + " | ".join(f"{x:.1f} / {y:.1f}" for x, y in zip(w, c)) + " |")
    L.append(f"\nPeak RSS of the process (ru_maxrss): {res['peak_rss_mib']:.0f} MiB.")
    return "\n".join(L) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench_serving")
    p.add_argument("--n-items", type=int, default=10_000, help="corpus of the bench_serving run to serve")
    p.add_argument("--n-users", type=int, default=3000)
    p.add_argument("--n-days", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-requests", type=int, default=100_000, help="requests per mode")
    p.add_argument("--modes", type=int, nargs="+", default=[1, 256], help="batch sizes to soak, one after the other")
    p.add_argument("--n-retrieve", type=int, default=500)
    p.add_argument("--n-prerank", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, and faiss's where an index sets none (the served indexes search on 1)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_soak.json")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="instead of soaking: combine the JSON results of earlier runs (e.g. one process per mode, run "
                        "side by side) into --out and its Markdown")
    return p.parse_args(argv)


def merge_results(results: list[dict]) -> dict:
    """One result from several runs of this script (same run and sizes, different modes): modes concatenated,
    machine load / wall time / peak RSS of each run kept under "parts"."""
    base = dict(results[0])
    keys = ("n_items", "n_requests", "n_retrieve", "n_prerank", "k", "threads")
    for r in results[1:]:
        if any(r["args"][k] != base["args"][k] for k in keys) or r["run"] != base["run"]:
            raise ValueError(f"cannot merge soak results of different runs or sizes: {[x['args'] for x in results]}")
    base["modes"] = [m for r in results for m in r["modes"]]
    base["parts"] = [{"modes": r["args"]["modes"], "machine": r["machine"], "wall_s": r["wall_s"],
                      "peak_rss_mib": r["peak_rss_mib"], "date_utc": r["date_utc"]} for r in results]
    base["args"] = {**base["args"], "modes": [m["batch_size"] for m in base["modes"]]}
    base["wall_s"] = max(r["wall_s"] for r in results)
    base["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    base["machine"] = {**base["machine"], "loadavg_after": max((r["machine"] for r in results),
                                                               key=lambda m: m["loadavg_after"][0])["loadavg_after"]}
    return base


def main(argv=None) -> dict:
    import torch

    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import load_cascade

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cascade").setLevel(logging.WARNING)
    if args.merge:
        from cascade.artifacts import read_json

        res = merge_results([read_json(p) for p in args.merge])
        return _write(res, args.out)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    run_dir = ensure_run(pipeline_config(args.n_items, args.runs_dir, n_users=args.n_users, n_days=args.n_days,
                                         seed=args.seed))
    data, casc = load_cascade(run_dir)
    faiss.omp_set_num_threads(args.threads)  # after loading: single queries are fastest on one thread (bench_index)
    requests = to_requests(requests_frame(data.split_impressions("test"), data.context_names), data.context_names)
    modes = []
    for b in args.modes:
        r = soak(casc, requests, args.n_requests, b, args.n_retrieve, args.n_prerank, args.k, progress=False)
        log.info("soak b=%d: %s", b, r["checks"])
        modes.append(r)
    res = {"benchmark": "bench_soak", "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine_info(load_before), "versions": package_versions(),
           "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "run": {"index": casc.retriever.index.factory, "n_items": len(data.item_ids),
                   "n_test_requests": len(requests)},
           "wall_s": time.perf_counter() - t0,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "modes": modes}
    return _write(res, args.out)


def _write(res: dict, out: Path) -> dict:
    write_json(out, res)
    md = render_markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['wall_s'] / 60:.1f} min)")
    return res


if __name__ == "__main__":
    main()
