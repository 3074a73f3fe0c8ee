"""The command line of an offline measurement over finished runs: ``SCRIPT RUN... [--k K] [--name N] [--out DIR]``
measures each run, summarises them and writes <out>/<name>.{json,md} (benchmarks/collaborative_choice.py,
benchmarks/channel_stacker.py)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from cascade import artifacts as A
from cascade.machine import machine_record


def offline_main(doc: str, name: str, runs_help: str, one_run: Callable[[Path, int], dict],
                 summarise: Callable[[dict], dict], markdown: Callable[[dict], str], argv=None) -> int:
    """Parse the arguments, run ``one_run(run, k)`` per run, write {"date", "k", "machine", "cpu", "summary":
    summarise(runs), "runs", "wall_s"} as JSON and ``markdown`` of it, and print the markdown."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help=runs_help)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--name", default=name)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    t0 = time.time()
    runs = {run.name: one_run(run, args.k) for run in args.runs}
    res = {"date": time.strftime("%Y-%m-%d"), "k": args.k, "machine": f"{os.cpu_count()} CPUs",
           "cpu": machine_record(), "summary": summarise(runs), "runs": runs}
    res["wall_s"] = time.time() - t0
    A.write_json(args.out / f"{args.name}.json", res)
    A.write_text(args.out / f"{args.name}.md", markdown(res))
    print(markdown(res))
    return 0
