"""The report's building blocks: number formatting, the document model (sections of tables, notes, plots) with
its Markdown and HTML tables, and access to the report data with errors that name the key."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

NOT_COMPUTED = "not computed in this run"
MISSING = "–"  # en dash: the cell of a value that is absent or NaN

STAGE_ORDER = ("retrieval", "prerank", "rank")
STAGE_METRICS = (
    ("size", "size"),
    ("click_recall", "click-recall"),
    ("hit_rate", "HitRate"),
    ("click_ndcg", "click-NDCG@K"),
    ("teacher_recall", "teacher-recall"),
    ("teacher_ndcg", "teacher-NDCG@K"),
    ("auc", "AUC"),
    ("gauc", "GAUC"),
    ("rand_auc", "AUC (random slice)"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
)
# the per-stage table is split into one table per family, so each stays narrow (Markdown has no column groups);
# a metric of STAGE_METRICS in no family gets a table of its own at the end
STAGE_FAMILIES = (
    ("Outcomes: the held-out clicks", ("click_recall", "hit_rate", "click_ndcg")),
    ("Agreement with the teacher", ("teacher_recall", "teacher_ndcg")),
    ("AUC of each stage's served score on the test impressions", ("auc", "gauc", "rand_auc")),
    ("Latency per request (batch 1)", ("p50_ms", "p95_ms", "p99_ms")),
)
MODEL_COLUMNS = (
    ("auc", "AUC"),
    ("gauc", "GAUC"),
    ("logloss", "logloss"),
    ("rand_auc", "AUC (random slice)"),
    ("rand_gauc", "GAUC (random slice)"),
    ("latency_ms_per_100", "ms / 100 pairs"),
    ("n_params", "params"),
    ("size_mb", "size MB"),
)


def _decimals(key: str) -> int | None:
    """Decimals for a metric by its name: AUC-like 4, recall and ratios 3, milliseconds 2, throughput 1."""
    k = key.lower()
    if k.endswith("_rand") and any(s in k for s in ("recall", "hit_rate")):
        return 6 if k.startswith("expected") else 4  # a top-K of thousands holds few random-exposure clicks
    if any(s in k for s in ("recall", "ratio", "hit_rate", "coverage", "share")) or k.startswith("oracle"):
        return 3
    if any(s in k for s in ("auc", "ndcg", "logloss", "loss", "ctr")):
        return 4
    if k.endswith("_ms") or "ms_per" in k or "_ms_" in k or k == "ms":
        return 2
    if "qps" in k or "per_s" in k:
        return 1
    if k.endswith("_mb") or k.endswith("_s") or k.endswith("wall"):
        return 2
    return None


def is_count(key: str) -> bool:
    """Whether the metric named ``key`` counts things (parameters, rows, items): shown as an integer."""
    k = key.lower()
    return k.startswith("n_") or k in _COUNTS


_COUNTS = {"size", "rows", "requests", "batch_size", "batch", "params", "k", "dim"}


def format_value(value: Any, key: str = "") -> str:
    """One table cell: ``value`` formatted for the metric named ``key`` (AUC 4 decimals, recall 3, ms 2, ...).

    None / NaN -> "–"; ints get thousands separators (except seeds), and so do whole floats of a count
    (:func:`is_count`: a column of ints with a gap is float in pandas); strings pass through; other floats get 4
    significant digits (or one decimal from 1000 up)."""
    if value is None:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value)) if "seed" in key.lower() else f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return MISSING
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if is_count(key) and v.is_integer():
            return f"{int(v):,}"
        dec = _decimals(key)
        if dec is not None:
            return f"{v:,.{dec}f}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(value, str):
        return value
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_LABELS = {"teacher_recall": "teacher-recall", "click_recall": "click-recall", "ndcg": "NDCG", "auc": "AUC",
           "gauc": "GAUC", "logloss": "logloss", "rand_auc": "AUC (random slice)", "rand_gauc": "GAUC (random slice)"}


def metric_label(metric: str) -> str:
    """Display name of a metric key (the key itself when it has none)."""
    return _LABELS.get(metric, metric)


def lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return any(s in m for s in ("loss", "_ms", "latency", "error", "ece"))


def cell_number(v: Any) -> float:
    """A cell value as float (nan for None / non-numbers): used to pick the best cell."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return float(v)
    return math.nan


@dataclass
class Table:
    """A table of raw cell values. ``frame`` columns are flat labels or a 2-level MultiIndex (metric, variant);
    ``keys[j]`` names column j's metric for :func:`format_value` ("" = a label column, left-aligned);
    ``bold`` [rows, cols] marks the cells to emphasise."""

    frame: pd.DataFrame
    keys: list[str]
    bold: np.ndarray | None = None
    caption: str = ""

    def cells(self) -> list[list[str]]:
        return [[format_value(v, k) for v, k in zip(row, self.keys)] for row in self.frame.itertuples(index=False)]


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("note"|"p"|"h3"|"pre", text) | ("table", Table)
    #                                                   | ("img", png bytes, alt)
    #                                                   | ("cards", [(title, [(label, value)])])

    def note(self, text: str) -> Section:
        self.blocks.append(("note", text))
        return self


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table of string cells; ``right[j]`` right-aligns column j. Pipes in cells are
    escaped and newlines flattened, so a cell can never break the table."""

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    n = len(header)
    for i, r in enumerate(rows):
        if len(r) != n:
            raise ValueError(f"markdown_table: row {i} has {len(r)} cells, the header has {n}")
    right = list(right) if right is not None else [False] * n
    sep = ["---:" if r else "---" for r in right]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _flat_label(col: Any) -> str:
    if isinstance(col, tuple):
        return " ".join(str(c) for c in col if str(c))
    return str(col)


def table_md(t: Table) -> str:
    cells = t.cells()
    if t.bold is not None:
        cells = [[f"**{c}**" if t.bold[i, j] and c != MISSING else c for j, c in enumerate(row)]
                 for i, row in enumerate(cells)]
    header = [_flat_label(c) for c in t.frame.columns]
    out = markdown_table(header, cells, [bool(k) for k in t.keys])
    return (f"{t.caption}\n\n{out}" if t.caption else out)


WIDE_COLUMNS = 12  # a table with more columns (or two header levels) gets narrower cell padding


def table_html(t: Table) -> str:
    e = html.escape
    cols = list(t.frame.columns)
    two_level = isinstance(t.frame.columns, pd.MultiIndex)
    wide = two_level or len(cols) > WIDE_COLUMNS
    parts = ['<div class="tw"><table class="wide">' if wide else '<div class="tw"><table>']
    if t.caption:
        parts.append(f"<caption>{e(t.caption)}</caption>")
    parts.append("<thead>")
    if two_level:
        # top row: label columns span both rows, metric names span their variants
        top, j = [], 0
        while j < len(cols):
            name, sub = cols[j]
            if not str(sub):
                top.append(f'<th rowspan="2" class="{"num" if t.keys[j] else "lab"}">{e(str(name))}</th>')
                j += 1
                continue
            span = 1
            while j + span < len(cols) and cols[j + span][0] == name and str(cols[j + span][1]):
                span += 1
            top.append(f'<th colspan="{span}" class="grp">{e(str(name))}</th>')
            j += span
        # let long variant names break after '_' so a wide side-by-side table still fits the page
        subs = [f'<th class="num sub">{e(str(c[1])).replace("_", "_<wbr>")}</th>' for c in cols if str(c[1])]
        parts.append("<tr>" + "".join(top) + "</tr><tr>" + "".join(subs) + "</tr>")
    else:
        parts.append("<tr>" + "".join(f'<th class="{"num" if k else "lab"}">{e(str(c))}</th>'
                                      for c, k in zip(cols, t.keys)) + "</tr>")
    parts.append("</thead><tbody>")
    for i, row in enumerate(t.cells()):
        tds = []
        for j, c in enumerate(row):
            cls = "num" if t.keys[j] else "lab"
            text = e(c)
            if t.bold is not None and t.bold[i, j] and c != MISSING:
                text = f"<b>{text}</b>"
            tds.append(f'<td class="{cls}">{text}</td>')
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def kv_table(items: Mapping[str, Any], key_label: str = "fact", value_label: str = "value") -> Table:
    """Two-column table of facts; each value formatted by its own key (pre-formatted, so one column mixes kinds)."""
    frame = pd.DataFrame({key_label: [str(k) for k in items],
                          value_label: [format_value(v, str(k)) for k, v in items.items()]})
    return Table(frame, ["", ""])


def as_mapping(obj: Any, path: str) -> Mapping | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} must be a dict, got {type(obj).__name__}")
    return obj


def as_list(obj: Any, path: str) -> list | None:
    if obj is None:
        return None
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"{path} must be a list, got {type(obj).__name__}")
    return list(obj)


def stage_order(keys, first=STAGE_ORDER) -> list[str]:
    """Known stages in cascade order, then any others in the order given."""
    keys = list(keys)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


def as_floats(values: Any, path: str) -> np.ndarray:
    """A list of numbers (None = NaN) as float64 [n]."""
    seq = as_list(values, path) or []
    try:
        return np.array([math.nan if v is None else float(v) for v in seq], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path} must hold numbers") from None
