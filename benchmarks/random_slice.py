"""The random-exposure slice of finished runs: replay every random-exposure test request again and aggregate.

    python benchmarks/random_slice.py runs/bench-world-seed0 runs/bench-world-seed1 runs/bench-world-seed2

Logged clicks favour what the logging policy chose to show; the world's (and KuaiRand's) random-exposure requests
showed items at random, so click-recall there measures what users want, not what they were shown. Each run's replay
is redone (`cascade replay RUN`: the upstream steps are used as they are) with every random-exposure request of the
test period replayed beside the usual even spread (``replay.max_rand_requests``). Mean +- std over the runs of each
list's click-recall@K and oracle ratio on that slice, to benchmarks/results/random_slice.{json,md}.

A random request's clicks land on the random items it was shown, so a top-K out of thousands holds a handful of them
in a whole slice: the measured click-recall@K rests on a few hits. On the world the replay also gives its
expectation, the expected click-recall@K (the share of the slice's expected clicks that each list holds, from the
world's click model: what the slice's pooled click-recall converges to as its exposures are drawn again), and the
paired gap of the distilled cascade to every other list on it (ratio SE over the slice's requests).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from real_data import cell, mean_std, quality_rows

from cascade import artifacts as A
from cascade.cli import main as cascade_main

COLUMNS = ("rank_click_recall_rand", "rank_hit_rate_rand", "expected_click_recall_rand", "oracle_ratio_rand",
           "rank_click_recall", "oracle_ratio")
GAP = "expected_click_recall_rand"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="random_slice")
    p.add_argument("--no-replay", action="store_true", help="aggregate the runs' replays as they are")
    args = p.parse_args(argv)
    t0, per_run, gaps = time.perf_counter(), {}, {}
    for run in args.runs:
        replay = ["replay", run, "--set", "replay.max_rand_requests=1000000", "--update", "--no-progress", "-q"]
        if not args.no_replay and cascade_main(replay) != 0:
            raise SystemExit(f"cascade replay {run} failed")
        summary = A.read_json(Path(run) / "replay" / "summary.json")
        lists = quality_rows(summary)  # one row per channel
        per_run[Path(run).name] = {n: {c: q.get(c) for c in (*COLUMNS, "n_rand_requests")} for n, q in lists.items()}
        shown = {b: f"baseline: {s['channel']}" for b, s in summary.get("baselines", {}).items()}  # as the rows
        shown.update({r: f"reference: {r}" for r in summary.get("references", {})})
        gaps[Path(run).name] = {shown.get(o, o): g[GAP] for o, g in summary["paired"]["distilled"].items() if GAP in g}
    names = list(next(iter(per_run.values())))
    agg = {n: {c: mean_std([r[n][c] for r in per_run.values()])
               for c in COLUMNS if all(r[n].get(c) is not None for r in per_run.values())} for n in names}
    n_rand = [next(iter(r.values()))["n_rand_requests"] for r in per_run.values()]
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    out = {"runs": list(per_run), "per_run": per_run, "mean_std": agg, "n_rand_requests": n_rand,
           "distilled_minus": gaps,
           "date": time.strftime("%Y-%m-%d"), "machine": machine, "wall_s": time.perf_counter() - t0}
    A.write_json(Path(args.out) / f"{args.name}.json", out)
    head = ["click-recall@K (random slice)", "HitRate@K (random slice)", "expected click-recall@K (random slice)",
            "oracle ratio (random slice)", "click-recall@K (logged sample)", "oracle ratio (logged sample)"]
    lines = ["| list | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for n in names:
        cells = [cell(agg[n][c], ".5f" if c == GAP else ".4f") if c in agg[n] else "–" for c in COLUMNS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    md = (f"Random-exposure test requests of {list(per_run)} ({n_rand} requests per run), mean ± std over the runs; "
          f"{out['date']}, {machine}.\n\n" + "\n".join(lines) + "\n")
    if any(gaps.values()):
        md += ("\nexpected click-recall@K on the random slice, distilled minus each list, paired on the slice's "
               "requests (ratio SE; * beyond 2 SE):\n")
        for other in next(v for v in gaps.values() if v):
            per = [f"{r} {g[other]['diff']:+.6f} ± {g[other]['se']:.6f}"
                   + (" *" if abs(g[other]["diff"]) > 2 * g[other]["se"] else "")
                   for r, g in gaps.items() if other in g]
            md += f"- {other}: " + "; ".join(per) + "\n"
    A.write_text(Path(args.out) / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
