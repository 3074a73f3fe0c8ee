"""BENCHMARKS.md's summary table is generated from benchmarks/results/*.json and is up to date."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_summary_block_is_generated_from_the_committed_results():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summary.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    block = text.split("<!-- summary:begin", 1)[1].split("<!-- summary:end -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "benchmark" not in line[:12]]
    # every results file has a row (a file with two claims has two), each row links one results file
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    linked = [re.findall(r"\(benchmarks/results/([^)]+\.json)\)", r) for r in rows]
    assert all(len(files) == 1 for files in linked), [r for r, f in zip(rows, linked) if len(f) != 1]
    assert sorted({f[0] for f in linked}) == results
    assert text.index("<!-- summary:begin") < text.index("\n## ")  # at the top, before the sections
