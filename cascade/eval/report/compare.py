"""Runs side by side: ``compare.md`` and ``compare.html`` (the report's document model and renderers) from one plain
dict ``comparison``::

    runs:        [{name, path, created, data}]
    config_diff: [{key, values: [one per run]}]        # only the keys where the runs differ
    metrics:     [{metric, key, values: [one per run]}]  # key names the metric for formatting (AUC 4 decimals, ...)

The best value of each metric row is bold (higher is better, lower for losses and latencies; none where all are
equal).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascade.artifacts import to_jsonable, write_json, write_text

from .blocks import Section, Table, cell_number, format_value, lower_is_better
from .render import document_html, document_markdown

COMPARE_MD = "compare.md"
COMPARE_HTML = "compare.html"
COMPARE_JSON = "compare.json"


def _config_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, default=str)


def comparison_sections(comparison: Mapping[str, Any]) -> list[Section]:
    """The comparison's three sections: the runs, their config differences, their metrics side by side."""
    runs = list(comparison.get("runs") or [])
    names = [str(r.get("name")) for r in runs]
    if len(set(names)) != len(names):  # two runs of one name from two folders: the column says which
        names = [f"{r.get('name')} ({r.get('path')})" for r in runs]
    sec_runs = Section("runs", "Runs")
    sec_runs.blocks.append(("table", Table(pd.DataFrame(
        {"run": names, "created": [r.get("created") for r in runs], "data": [r.get("data") for r in runs],
         "folder": [r.get("path") for r in runs]}), ["", "", "", ""])))

    sec_cfg = Section("config", "Config differences")
    diff = list(comparison.get("config_diff") or [])
    if diff:
        frame = pd.DataFrame({"key": [d["key"] for d in diff],
                              **{n: [_config_value(d["values"][i]) for d in diff] for i, n in enumerate(names)}})
        sec_cfg.blocks.append(("table", Table(frame, [""] * (1 + len(names)))))
        sec_cfg.blocks.append(("p", "Resolved config keys whose values differ between the runs ((absent): the run's "
                                    "config has no such key); where a run lives (run.name, run.runs_dir) is left out."))
    else:
        sec_cfg.note("The runs have the same resolved config.")

    sec_met = Section("metrics", "Metrics side by side")
    rows = list(comparison.get("metrics") or [])
    if rows:
        # a column holds one metric per row, so each cell is formatted by its row's key: pre-format the cells
        cells = pd.DataFrame({"metric": [r["metric"] for r in rows],
                              **{n: [format_value(r["values"][i], r["key"]) for r in rows]
                                 for i, n in enumerate(names)}})
        vals = np.array([[math.nan] + [cell_number(v) for v in r["values"]] for r in rows], dtype=np.float64)
        bold = np.zeros(vals.shape, dtype=bool)
        for i, r in enumerate(rows):
            line = vals[i, 1:]
            finite = line[np.isfinite(line)]
            if finite.size >= 2 and finite.min() < finite.max():  # "best" needs two runs that differ
                best = finite.min() if lower_is_better(r["key"]) else finite.max()
                bold[i, 1:] = line == best
        sec_met.blocks.append(("table", Table(cells, [""] + ["num"] * len(names), bold=bold)))
        sec_met.blocks.append(("p", "Headline metrics of each run (its replay summary and models tables); the best "
                                    "value of a row in bold. – : the run has no such metric."))
    else:
        sec_met.note("No run has metrics yet (no finished replay or teacher step).")
    return [sec_runs, sec_cfg, sec_met]


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    names = " vs ".join(str(r.get("name")) for r in comparison.get("runs") or [])
    return document_markdown(f"cascade runs compared: {names}", [], comparison_sections(comparison))


def comparison_html(comparison: Mapping[str, Any]) -> str:
    names = " vs ".join(str(r.get("name")) for r in comparison.get("runs") or [])
    return document_html(f"cascade runs compared: {names}", [], comparison_sections(comparison),
                         "Written by `cascade compare`; the numbers are in compare.json beside this file.")


def write_comparison(comparison: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write compare.json, compare.md and compare.html into ``out_dir`` (atomically); return their paths."""
    data = to_jsonable(comparison, "comparison")
    md, page = comparison_markdown(data), comparison_html(data)
    out_dir = Path(out_dir)
    return [write_json(out_dir / COMPARE_JSON, data, sort_keys=False), write_text(out_dir / COMPARE_MD, md),
            write_text(out_dir / COMPARE_HTML, page)]
