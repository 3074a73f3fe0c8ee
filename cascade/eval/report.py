"""The per-run report: ``report.json`` (the data), ``report.md`` (tables) and ``report.html`` (one self-contained
page: inline CSS, plots as base64 PNG ``<img>``; no script, no external URL).

The pipeline assembles one plain dict ``report_data`` and calls :func:`write_report`. Its schema (every section is
optional; a missing or ``None`` section is rendered as a one-line "not computed in this run" note)::

    run:       {name, created, machine, config: dict, versions: dict, stage_wall_s: {stage: s}}
    data:      {summary: {fact: scalar}, splits: {train|valid|test: {rows, requests, ctr, start, end}}}
    cascades:  {variant: {stages: {retrieval|prerank|rank: {size, teacher_recall, click_recall, ndcg, auc, gauc,
                                                            p50_ms, p95_ms, p99_ms}},
                          end_to_end: {p50_ms, p95_ms, p99_ms, requests_per_s_batch1, requests_per_s_batched,
                                       batch_size},
                          oracle: {oracle_clicks, oracle_best, oracle_ratio} | None,
                          recall_curves: {stage: {k: [int], teacher_recall: [float]}},
                          latency_samples_ms: {stage | end_to_end: [float]}}}
    index:     {factory, backend, metric, n_items, dim, recall_vs_exact,
                operating_points: [{param, value, recall_at_k, qps}]}
    models:    [{name, role, auc, gauc, logloss, rand_auc?, rand_gauc?, latency_ms_per_100, n_params, size_mb}]
    ablation:  {metrics: [str], seeds: [int], rows: [{name, stage, values: {metric: {mean, std, n}}}]} | None

JSON has no NaN: ``report.json`` stores NaN / inf as ``null`` (strict JSON that any parser reads), so
:func:`load_report` gives ``None`` where the pipeline had NaN; the renderers show both as "–".
:func:`cascade.artifacts.to_jsonable` is exactly the transformation ``load_report(write_report(d))`` applies.

Both documents are built from one list of sections (title + blocks: tables, plots, notes, preformatted text), so
the Markdown and the HTML cannot drift apart; the Markdown leaves the plots to the HTML. Plots use matplotlib's
object API with an explicit Agg canvas: no pyplot global state, no backend switch in the caller's process.

:func:`render_screenshot` renders a report in headless Chromium (used by the render test and
``benchmarks/render_report.py``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cascade.artifacts import ArtifactError, read_json, to_jsonable, write_json, write_text

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_HTML",
    "write_report",
    "load_report",
    "render_markdown",
    "render_html",
    "format_value",
    "toml_dump",
    "markdown_table",
    "find_chromium",
    "render_screenshot",
]

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"

NOT_COMPUTED = "not computed in this run"
MISSING = "–"  # en dash: the cell of a value that is absent or NaN

STAGE_ORDER = ("retrieval", "prerank", "rank")
STAGE_METRICS = (
    ("size", "size"),
    ("teacher_recall", "teacher-recall"),
    ("click_recall", "click-recall"),
    ("ndcg", "NDCG"),
    ("auc", "AUC"),
    ("gauc", "GAUC"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
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
_STAGE_COLOURS = {"retrieval": "#1f77b4", "prerank": "#ff7f0e", "rank": "#2ca02c", "end_to_end": "#7f7f7f"}
_EXTRA_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_VARIANT_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_LINESTYLES = ("-", "--", ":", "-.")
_DPI = 100


# ----------------------------------------------------------------------------------------------------------------
# JSON


def load_report(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/report.json`` back into a dict (NaN were stored as None). Raises ArtifactError when the file
    is missing, not JSON, or not a JSON object."""
    path = Path(out_dir) / REPORT_JSON
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_report(report_data: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write report.json, report.md and report.html into ``out_dir`` (atomically, each file whole or not at all).

    Returns the file names written, relative to ``out_dir``. Raises ValueError naming the offending key when a
    section has the wrong type (e.g. ``report_data['cascades']`` is a list) or a curve's arrays disagree in length.
    """
    if not isinstance(report_data, Mapping):
        raise ValueError(f"report_data must be a dict, got {type(report_data).__name__}")
    data = to_jsonable(report_data, "report_data")
    # render both documents before writing anything, so bad input leaves no partial report behind
    md = render_markdown(data)
    page = render_html(data)
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, data, sort_keys=False)
    write_text(out_dir / REPORT_MD, md)
    write_text(out_dir / REPORT_HTML, page)
    log.info("report written to %s", out_dir)
    return [REPORT_JSON, REPORT_MD, REPORT_HTML]


# ----------------------------------------------------------------------------------------------------------------
# number formatting


def _decimals(key: str) -> int | None:
    """Decimals for a metric by its name: AUC-like 4, recall and ratios 3, milliseconds 2, throughput 1."""
    k = key.lower()
    if "recall" in k or "ratio" in k or k.startswith("oracle"):
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


def format_value(value: Any, key: str = "") -> str:
    """One table cell: ``value`` formatted for the metric named ``key`` (AUC 4 decimals, recall 3, ms 2, ...).

    None / NaN -> "–"; ints get thousands separators (except seeds); strings pass through; other floats get 4
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


def _label(metric: str) -> str:
    """Display name of a metric key (the key itself when it has none)."""
    return _LABELS.get(metric, metric)


def _lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return any(s in m for s in ("loss", "_ms", "latency", "error", "ece"))


def _num(v: Any) -> float:
    """A cell value as float (nan for None / non-numbers): used to pick the best cell."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return float(v)
    return math.nan


# ----------------------------------------------------------------------------------------------------------------
# document model: sections of blocks, rendered to Markdown and to HTML


@dataclass
class _Table:
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
class _Section:
    anchor: str
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("note"|"p"|"h3"|"pre", text) | ("table", _Table)
    #                                                   | ("img", png bytes, alt) | ("cards", [(title, [(label, value)])])

    def note(self, text: str) -> "_Section":
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


def _table_md(t: _Table) -> str:
    cells = t.cells()
    if t.bold is not None:
        cells = [[f"**{c}**" if t.bold[i, j] and c != MISSING else c for j, c in enumerate(row)]
                 for i, row in enumerate(cells)]
    header = [_flat_label(c) for c in t.frame.columns]
    out = markdown_table(header, cells, [bool(k) for k in t.keys])
    return (f"{t.caption}\n\n{out}" if t.caption else out)


def _table_html(t: _Table) -> str:
    e = html.escape
    cols = list(t.frame.columns)
    two_level = isinstance(t.frame.columns, pd.MultiIndex)
    parts = ['<div class="tw"><table class="wide">' if two_level else '<div class="tw"><table>']
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


def _kv_table(items: Mapping[str, Any], key_label: str = "fact", value_label: str = "value") -> _Table:
    """Two-column table of facts; each value formatted by its own key (pre-formatted, so one column mixes kinds)."""
    frame = pd.DataFrame({key_label: [str(k) for k in items], value_label: [format_value(v, str(k)) for k, v in items.items()]})
    return _Table(frame, ["", ""])


# ----------------------------------------------------------------------------------------------------------------
# input access with clear errors


def _mapping(obj: Any, path: str) -> Mapping | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} must be a dict, got {type(obj).__name__}")
    return obj


def _sequence(obj: Any, path: str) -> list | None:
    if obj is None:
        return None
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"{path} must be a list, got {type(obj).__name__}")
    return list(obj)


def _ordered(keys, first=STAGE_ORDER) -> list[str]:
    """Known stages in cascade order, then any others in the order given."""
    keys = list(keys)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


def _floats(values: Any, path: str) -> np.ndarray:
    """A list of numbers (None = NaN) as float64 [n]."""
    seq = _sequence(values, path) or []
    try:
        return np.array([math.nan if v is None else float(v) for v in seq], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path} must hold numbers") from None


# ----------------------------------------------------------------------------------------------------------------
# plots


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no "Software" text chunk: it would carry matplotlib's URL into the page's bytes
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _plain_log_ticks(axis) -> None:
    """Tick labels on a log axis as plain numbers (0.3, 2, 100) instead of 3x10^-1 mathtext."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda x, _: f"{x:g}")
    axis.set_major_formatter(fmt)
    # label minor ticks only when few decades are shown (otherwise the labels collide)
    lo, hi = axis.get_view_interval()
    if lo > 0 and hi / lo < 30:
        axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        axis.set_minor_formatter(fmt)
    else:
        axis.set_minor_formatter(FuncFormatter(lambda x, _: ""))


def _stage_colour(stage: str, extra: dict) -> str:
    if stage in _STAGE_COLOURS:
        return _STAGE_COLOURS[stage]
    return extra.setdefault(stage, _EXTRA_COLOURS[len(extra) % len(_EXTRA_COLOURS)])


def _plot_recall_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """curves[variant][stage] = (k [n], teacher_recall [n]) -> PNG: one line per stage and variant, log-x."""
    fig = _figure((9.5, 4.6))
    ax = fig.add_subplot()
    extra: dict = {}
    for vi, (variant, by_stage) in enumerate(curves.items()):
        for stage, (k, r) in by_stage.items():
            ax.plot(k, r, color=_stage_colour(stage, extra), linestyle=_LINESTYLES[vi % len(_LINESTYLES)],
                    marker="o", markersize=3, linewidth=1.6, label=f"{stage} · {variant}")
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("K (list length, log scale)")
    ax.set_ylabel("teacher-recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    # legend beside the axes: inside it would hide the curves' low-K start, where the stages differ most
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Share of the teacher's top-K kept by each stage")
    return _png(fig)


def _plot_latency(samples: dict[str, dict[str, np.ndarray]]) -> bytes:
    """samples[stage][variant] = per-request ms [n] -> PNG: one histogram panel per stage, variants overlaid,
    dashed line at each variant's p99. Log-spaced bins when the range spans more than 2x (latency tails are long)."""
    stages = list(samples)
    ncols = 1 if len(stages) == 1 else 2
    nrows = math.ceil(len(stages) / ncols)
    fig = _figure((10.5, 3.1 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, stage in zip(axes, stages):
        by_variant = samples[stage]
        allv = np.concatenate(list(by_variant.values()))
        lo, hi = float(allv.min()), float(allv.max())
        log_bins = lo > 0 and hi / lo > 2.0
        # ~1.5 sqrt(n) bins: 200 samples -> 21 bins; more bins only draw sampling noise
        nbins = int(np.clip(1.5 * np.sqrt(max(x.size for x in by_variant.values())), 10, 60))
        bins = np.geomspace(lo, hi, nbins + 1) if log_bins else np.linspace(lo, hi if hi > lo else lo + 1e-3, nbins + 1)
        for vi, (variant, x) in enumerate(by_variant.items()):
            colour = _VARIANT_COLOURS[vi % len(_VARIANT_COLOURS)]
            p99 = float(np.percentile(x, 99))
            # one filled step polygon per histogram: as readable as bars and ~10x cheaper to draw than 40 patches
            ax.hist(x, bins=bins, histtype="stepfilled", alpha=0.45, color=colour, edgecolor=colour, linewidth=1.0,
                    label=f"{variant} (n={x.size}, p99 {p99:.2f} ms)")
            ax.axvline(p99, color=colour, linestyle="--", linewidth=1.2)
        if log_bins:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        ax.set_title(f"{stage.replace('_', ' ')} (batch 1)", fontsize=10)
        ax.set_xlabel("ms per request")
        ax.set_ylabel("requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    return _png(fig)


def _plot_index(points: pd.DataFrame) -> bytes:
    """points: rows (param, value, recall_at_k, qps) -> PNG: QPS vs recall, one line per search parameter."""
    fig = _figure((8.5, 4.4))
    ax = fig.add_subplot()
    for pi, (param, grp) in enumerate(points.groupby("param", sort=False)):
        grp = grp.sort_values("value")
        colour = _VARIANT_COLOURS[pi % len(_VARIANT_COLOURS)]
        ax.plot(grp["recall_at_k"], grp["qps"], marker="o", color=colour, label=str(param))
        for rec, qps, val in zip(grp["recall_at_k"], grp["qps"], grp["value"]):
            if np.isfinite(rec) and np.isfinite(qps):
                ax.annotate(f"{param}={val}", (rec, qps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    q = points["qps"].to_numpy(dtype=np.float64)
    q = q[np.isfinite(q) & (q > 0)]
    if q.size and q.max() / q.min() > 10:
        ax.set_yscale("log")
    ax.margins(x=0.1, y=0.12)  # room for the point labels at the ends
    ax.set_xlabel("recall@k vs exact search")
    ax.set_ylabel("queries / s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Index operating points")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------------
# sections


def _header(data: Mapping) -> tuple[str, list[tuple[str, str]]]:
    run = _mapping(data.get("run"), "report_data['run']") or {}
    name = str(run.get("name") or "unnamed run")
    facts = [("created", format_value(run.get("created"))), ("machine", format_value(run.get("machine")))]
    return name, facts


def _variants(data: Mapping) -> dict[str, Mapping]:
    cascades = _mapping(data.get("cascades"), "report_data['cascades']") or {}
    out = {}
    for v, entry in cascades.items():
        e = _mapping(entry, f"report_data['cascades'][{v!r}]")
        if e is not None:
            out[str(v)] = e
    return out


def _stages_of(variant: str, entry: Mapping) -> dict[str, Mapping]:
    path = f"report_data['cascades'][{variant!r}]['stages']"
    stages = _mapping(entry.get("stages"), path) or {}
    return {s: (_mapping(stages[s], f"{path}[{s!r}]") or {}) for s in _ordered(stages)}


def _section_headline(variants: dict[str, Mapping]) -> _Section:
    sec = _Section("headline", "Headline")
    if not variants:
        return sec.note(f"Cascade replay {NOT_COMPUTED}.")
    cards, rows = [], []
    for v, entry in variants.items():
        stages = _stages_of(v, entry)
        final = stages.get("rank") or (stages[list(stages)[-1]] if stages else {})
        e2e = _mapping(entry.get("end_to_end"), f"report_data['cascades'][{v!r}]['end_to_end']") or {}
        oracle = _mapping(entry.get("oracle"), f"report_data['cascades'][{v!r}]['oracle']") or {}
        k = final.get("size")
        rows.append({
            "variant": v, "K": k, "teacher-recall@K": final.get("teacher_recall"),
            "oracle clicks": oracle.get("oracle_clicks"), "oracle best": oracle.get("oracle_best"),
            "oracle ratio": oracle.get("oracle_ratio"), "e2e p50 ms": e2e.get("p50_ms"), "e2e p99 ms": e2e.get("p99_ms"),
            "req/s batch 1": e2e.get("requests_per_s_batch1"), "req/s batched": e2e.get("requests_per_s_batched"),
            "batch": e2e.get("batch_size"),
        })
        cards.append((v, [
            (f"teacher-recall@{k if k is not None else 'K'}", format_value(final.get("teacher_recall"), "teacher_recall")),
            ("oracle ratio", format_value(oracle.get("oracle_ratio"), "oracle_ratio")),
            ("end-to-end p99", format_value(e2e.get("p99_ms"), "p99_ms") + (" ms" if e2e.get("p99_ms") is not None else "")),
        ]))
    sec.blocks.append(("cards", cards))
    keys = ["", "size", "teacher_recall", "oracle_clicks", "oracle_best", "oracle_ratio", "p50_ms", "p99_ms",
            "requests_per_s_batch1", "requests_per_s_batched", "batch_size"]
    sec.blocks.append(("table", _Table(pd.DataFrame(rows), keys)))
    sec.blocks.append(("p", "teacher-recall@K: share of the teacher's top-K over the whole corpus that the final list "
                            "keeps. Oracle ratio: expected clicks of the final list over those of the oracle top-K "
                            "under the true click model (synthetic world only)."))
    return sec


def _section_stages(variants: dict[str, Mapping]) -> _Section:
    sec = _Section("stages", "Per-stage metrics")
    per_variant = {v: _stages_of(v, e) for v, e in variants.items()}
    if not any(per_variant.values()):
        return sec.note(f"Per-stage metrics {NOT_COMPUTED}.")
    stage_names = _ordered(dict.fromkeys(s for st in per_variant.values() for s in st))
    e2e = {v: _mapping(e.get("end_to_end"), f"report_data['cascades'][{v!r}]['end_to_end']") for v, e in variants.items()}
    row_names = stage_names + (["end to end"] if any(e2e.values()) else [])
    vnames = list(per_variant)
    two_level = len(vnames) > 1
    columns, keys, cols_data = [("stage", "") if two_level else "stage"], [""], [row_names]
    for key, label in STAGE_METRICS:
        by_variant = {}
        for v in vnames:
            vals = []
            for s in row_names:
                src = (e2e[v] or {}) if s == "end to end" else per_variant[v].get(s, {})
                vals.append(src.get(key))
            if any(x is not None for x in vals):  # metric absent for this variant everywhere: no empty column
                by_variant[v] = vals
        if key == "size" and two_level and len(by_variant) == len(vnames) \
                and all(x == by_variant[vnames[0]] for x in by_variant.values()):
            by_variant = {"": by_variant[vnames[0]]}  # same N1 / N2 / K in every variant: one column is enough
        for v, vals in by_variant.items():
            columns.append((label, v) if two_level else label)
            keys.append(key)
            cols_data.append(vals)
    frame = pd.DataFrame(dict(enumerate(cols_data)))
    frame.columns = pd.MultiIndex.from_tuples(columns) if two_level else columns
    caption = ("variants side by side: " + ", ".join(vnames)) if two_level else f"variant: {vnames[0]}"
    sec.blocks.append(("table", _Table(frame, keys, caption=caption)))
    sec.blocks.append(("p", "size: the stage's output length (N1 / N2 / K). teacher-recall and NDCG are measured "
                            "against the teacher's top-K; click-recall against the clicked items; AUC / GAUC of the "
                            "stage's scoring function on the test impressions; latency per request at batch 1."))
    return sec


def _section_curves(variants: dict[str, Mapping]) -> _Section:
    sec = _Section("curves", "Teacher-recall@K curves")
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for v, entry in variants.items():
        path = f"report_data['cascades'][{v!r}]['recall_curves']"
        rc = _mapping(entry.get("recall_curves"), path) or {}
        for stage in _ordered(rc):
            c = _mapping(rc[stage], f"{path}[{stage!r}]")
            if not c:
                continue
            k = _floats(c.get("k"), f"{path}[{stage!r}]['k']")
            r = _floats(c.get("teacher_recall"), f"{path}[{stage!r}]['teacher_recall']")
            if k.shape != r.shape:
                raise ValueError(f"{path}[{stage!r}]: 'k' has {k.size} values but 'teacher_recall' has {r.size}")
            if k.size == 0:
                continue
            if not (np.isfinite(k).all() and (k >= 1).all()):
                raise ValueError(f"{path}[{stage!r}]['k'] must hold list lengths >= 1 (the axis is log-scaled)")
            curves.setdefault(v, {})[stage] = (k, r)
    if not curves:
        return sec.note(f"Recall curves {NOT_COMPUTED}.")
    sec.blocks.append(("img", _plot_recall_curves(curves), "teacher-recall@K per stage and variant, log-x"))
    return sec


def _section_latency(variants: dict[str, Mapping]) -> _Section:
    sec = _Section("latency", "Latency at batch 1")
    samples: dict[str, dict[str, np.ndarray]] = {}
    for v, entry in variants.items():
        path = f"report_data['cascades'][{v!r}]['latency_samples_ms']"
        ls = _mapping(entry.get("latency_samples_ms"), path) or {}
        for stage in _ordered(ls, STAGE_ORDER + ("end_to_end",)):
            x = _floats(ls[stage], f"{path}[{stage!r}]")
            x = x[np.isfinite(x)]
            if x.size:
                samples.setdefault(stage, {})[v] = x
    if not samples:
        return sec.note(f"Latency samples {NOT_COMPUTED}.")
    sec.blocks.append(("img", _plot_latency(samples), "per-request latency histograms per stage and end to end"))
    return sec


def _section_index(data: Mapping) -> _Section:
    sec = _Section("index", "Index")
    idx = _mapping(data.get("index"), "report_data['index']")
    if not idx:
        return sec.note(f"Index {NOT_COMPUTED}.")
    facts = {k: v for k, v in idx.items() if k != "operating_points"}
    if facts:
        sec.blocks.append(("table", _kv_table(facts, "property")))
    ops = _sequence(idx.get("operating_points"), "report_data['index']['operating_points']") or []
    rows = [_mapping(p, f"report_data['index']['operating_points'][{i}]") or {} for i, p in enumerate(ops)]
    if not rows:
        return sec.note(f"Operating points {NOT_COMPUTED}.")
    frame = pd.DataFrame([{c: r.get(c) for c in ("param", "value", "recall_at_k", "qps")} for r in rows])
    shown = frame.rename(columns={"param": "search parameter", "recall_at_k": "recall@k vs exact", "qps": "queries / s"})
    sec.blocks.append(("table", _Table(shown, ["", "value", "recall_at_k", "qps"])))
    pts = frame.assign(recall_at_k=pd.to_numeric(frame["recall_at_k"], errors="coerce"),
                       qps=pd.to_numeric(frame["qps"], errors="coerce"),
                       param=frame["param"].astype(str))
    if pts[["recall_at_k", "qps"]].notna().all(axis=1).any():
        sec.blocks.append(("img", _plot_index(pts), "index recall@k against queries per second"))
    return sec


def _best_mask(values: np.ndarray, groups: Sequence[Any], lower_better: Sequence[bool]) -> np.ndarray:
    """values [rows, cols] (nan = none) -> bool [rows, cols]: per column, the best value within each group (ties
    all marked); lower_better[j] flips column j's direction."""
    mask = np.zeros(values.shape, dtype=bool)
    g = np.asarray([str(x) for x in groups])
    for grp in dict.fromkeys(g):
        rows = g == grp
        for j in range(values.shape[1]):
            col = values[rows, j]
            if not np.isfinite(col).any():
                continue
            best = np.nanmin(col) if lower_better[j] else np.nanmax(col)
            mask[np.flatnonzero(rows), j] = col == best
    return mask


def _section_models(data: Mapping) -> _Section:
    sec = _Section("models", "Models")
    models = _sequence(data.get("models"), "report_data['models']")
    if not models:
        return sec.note(f"Model comparison {NOT_COMPUTED}.")
    rows = [_mapping(m, f"report_data['models'][{i}]") or {} for i, m in enumerate(models)]
    present = [(k, label) for k, label in MODEL_COLUMNS if any(r.get(k) is not None for r in rows)]
    frame = pd.DataFrame({"model": [r.get("name") for r in rows], "role": [r.get("role") for r in rows],
                          **{label: [r.get(k) for r in rows] for k, label in present}})
    keys = ["", ""] + [k for k, _ in present]
    # bold the best quality metric over all models (latency / size are trade-offs, not "best")
    quality = [k in ("auc", "gauc", "logloss", "rand_auc", "rand_gauc") for k in keys]
    vals = np.array([[_num(v) if q else math.nan for v, q in zip(row, quality)]
                     for row in frame.itertuples(index=False)], dtype=np.float64).reshape(len(frame), len(keys))
    bold = _best_mask(vals, ["all"] * len(frame), [_lower_is_better(k) for k in keys])
    sec.blocks.append(("table", _Table(frame, keys, bold=bold)))
    sec.blocks.append(("p", "Scores on the test impressions (and on the random-exposure slice where there is one); "
                            "best quality value in bold. ms / 100 pairs: scoring time of 100 (user, item) pairs."))
    return sec


def _section_ablation(data: Mapping) -> _Section:
    sec = _Section("ablation", "Distillation ablation")
    ab = _mapping(data.get("ablation"), "report_data['ablation']")
    if not ab:
        return sec.note(f"Ablation {NOT_COMPUTED}.")
    rows = [_mapping(r, f"report_data['ablation']['rows'][{i}]") or {}
            for i, r in enumerate(_sequence(ab.get("rows"), "report_data['ablation']['rows']") or [])]
    if not rows:
        return sec.note(f"Ablation rows {NOT_COMPUTED}.")
    metrics = [str(m) for m in (_sequence(ab.get("metrics"), "report_data['ablation']['metrics']") or [])]
    if not metrics:  # fall back to the metrics the rows carry, in first-seen order
        metrics = list(dict.fromkeys(m for r in rows for m in (_mapping(r.get("values"), "values") or {})))
    seeds = _sequence(ab.get("seeds"), "report_data['ablation']['seeds']") or []
    # group rows by stage (first-seen order) so "best per stage" reads down one block
    stage_order = list(dict.fromkeys(str(r.get("stage")) for r in rows))
    rows = sorted(rows, key=lambda r: stage_order.index(str(r.get("stage"))))
    cells, means = [], []
    for i, r in enumerate(rows):
        vals = _mapping(r.get("values"), f"report_data['ablation']['rows'][{i}]['values']") or {}
        line, mline = [], []
        for m in metrics:
            st = _mapping(vals.get(m), f"report_data['ablation']['rows'][{i}]['values'][{m!r}]") or {}
            mean, std, n = st.get("mean"), st.get("std"), st.get("n")
            text = format_value(mean, m)
            if mean is not None and std is not None:
                text += f" ± {format_value(std, m)}"
            if mean is not None and n is not None and seeds and n != len(seeds):
                text += f" (n={n})"
            line.append(text)
            mline.append(_num(mean))
        cells.append(line)
        means.append(mline)
    frame = pd.DataFrame({"stage": [r.get("stage") for r in rows], "variant": [r.get("name") for r in rows],
                          **{_label(m): [c[j] for c in cells] for j, m in enumerate(metrics)}})
    keys = ["", ""] + metrics
    vals = np.concatenate([np.full((len(rows), 2), math.nan), np.array(means, dtype=np.float64).reshape(len(rows), -1)], axis=1)
    bold = _best_mask(vals, frame["stage"].tolist(), [_lower_is_better(k) for k in keys])
    seeds_txt = ", ".join(format_value(s, "seed") for s in seeds) if seeds else MISSING
    cap = f"mean ± std over seeds [{seeds_txt}]; best mean per stage in bold"
    sec.blocks.append(("table", _Table(frame, keys, bold=bold, caption=cap)))
    return sec


def _section_data(data: Mapping) -> _Section:
    sec = _Section("data", "Data")
    d = _mapping(data.get("data"), "report_data['data']")
    if not d:
        return sec.note(f"Data summary {NOT_COMPUTED}.")
    summary = _mapping(d.get("summary"), "report_data['data']['summary']")
    if summary:
        sec.blocks.append(("h3", "Summary"))
        sec.blocks.append(("table", _kv_table(summary)))
    splits = _mapping(d.get("splits"), "report_data['data']['splits']")
    if splits:
        names = _ordered(splits, ("train", "valid", "test"))
        recs = []
        for s in names:
            sp = _mapping(splits[s], f"report_data['data']['splits'][{s!r}]") or {}
            recs.append({"split": s, **{c: sp.get(c) for c in ("rows", "requests", "ctr", "start", "end")}})
        sec.blocks.append(("h3", "Splits (by time)"))
        sec.blocks.append(("table", _Table(pd.DataFrame(recs), ["", "rows", "requests", "ctr", "", ""])))
    if not summary and not splits:
        sec.note(f"Data summary {NOT_COMPUTED}.")
    return sec


def _toml_value(v: Any) -> str:
    if v is None:
        return '"<unset>"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


def _toml_key(k: Any) -> str:
    k = str(k)
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def toml_dump(cfg: Mapping, prefix: tuple[str, ...] = ()) -> str:
    """A nested dict as TOML-like text: scalars first, then one ``[a.b]`` table per nested dict (None shown as
    "<unset>", since TOML has no null)."""
    lines = []
    scalars = {k: v for k, v in cfg.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in cfg.items() if isinstance(v, Mapping)}
    if prefix and (scalars or not tables):
        lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        if lines:
            lines.append("")
        lines.append(toml_dump(v, prefix + (str(k),)))
    return "\n".join(lines)


def _section_run(data: Mapping) -> _Section:
    sec = _Section("run", "Run: configuration, versions, stage times")
    run = _mapping(data.get("run"), "report_data['run']")
    if not run:
        return sec.note(f"Run details {NOT_COMPUTED}.")
    walls = _mapping(run.get("stage_wall_s"), "report_data['run']['stage_wall_s']")
    if walls:
        frame = pd.DataFrame({"stage": list(walls), "wall s": list(walls.values())})
        total = sum(_num(v) for v in walls.values() if np.isfinite(_num(v)))
        frame = pd.concat([frame, pd.DataFrame({"stage": ["total"], "wall s": [total]})], ignore_index=True)
        sec.blocks.append(("h3", "Stage wall time"))
        sec.blocks.append(("table", _Table(frame, ["", "wall_s"])))
    versions = _mapping(run.get("versions"), "report_data['run']['versions']")
    sec.blocks.append(("h3", "Versions"))
    if versions:
        sec.blocks.append(("table", _kv_table(versions, "package", "version")))
    else:
        sec.note(f"Versions {NOT_COMPUTED}.")
    cfg = run.get("config")
    sec.blocks.append(("h3", "Resolved configuration"))
    if cfg is None:
        sec.note(f"Configuration {NOT_COMPUTED}.")
    elif isinstance(cfg, Mapping):
        sec.blocks.append(("pre", toml_dump(cfg) or "# (empty)"))
    else:
        sec.blocks.append(("pre", str(cfg)))
    return sec


def _sections(data: Mapping) -> list[_Section]:
    variants = _variants(data)
    return [_section_headline(variants), _section_stages(variants), _section_curves(variants),
            _section_latency(variants), _section_index(data), _section_models(data), _section_ablation(data),
            _section_data(data), _section_run(data)]


# ----------------------------------------------------------------------------------------------------------------
# renderers


def render_markdown(report_data: Mapping[str, Any]) -> str:
    """The report as Markdown text (tables; the plots are only in the HTML)."""
    data = to_jsonable(report_data, "report_data")
    name, facts = _header(data)
    out = [f"# cascade report: {name}", "", " · ".join(f"{k}: {v}" for k, v in facts), ""]
    for sec in _sections(data):
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            kind = b[0]
            if kind == "note":
                out += [f"_{b[1]}_", ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "h3":
                out += [f"### {b[1]}", ""]
            elif kind == "pre":
                out += ["```toml", b[1], "```", ""]
            elif kind == "table":
                out += [_table_md(b[1]), ""]
            elif kind == "img":
                out += [f"_Plot in report.html: {b[2]}._", ""]
            elif kind == "cards":
                pass  # the headline table that follows carries the same numbers
    return "\n".join(out).rstrip() + "\n"


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --band: #f4f6fa; --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
       "DejaVu Sans", sans-serif; color: var(--fg); background: #fff; }
main { max-width: 1200px; margin: 0 auto; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header .meta { color: var(--muted); margin: 0 0 12px; }
nav { display: flex; flex-wrap: wrap; gap: 4px 14px; padding: 8px 0 12px; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); text-decoration: none; font-size: 13px; }
section { margin-top: 26px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--band); }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note { color: var(--muted); font-style: italic; margin: 4px 0; }
p.expl { color: var(--muted); font-size: 12.5px; max-width: 900px; }
.tw { overflow-x: auto; margin: 6px 0 10px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); font-size: 12px; padding: 2px 0 4px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { background: var(--band); font-weight: 600; border-bottom: 2px solid var(--line); }
table.wide th, table.wide td { padding: 4px 6px; }
th.grp { text-align: center; border-left: 1px solid var(--line); }
th.sub { font-weight: 500; color: var(--muted); font-size: 12px; }
td.num, th.num { text-align: right; }
td.lab, th.lab { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfd; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; margin: 4px 0 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 300px; background: var(--band); }
.card h4 { margin: 0 0 6px; font-size: 14px; color: var(--accent); }
.card dl { display: grid; grid-template-columns: auto auto; gap: 2px 18px; margin: 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; text-align: right; font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0 14px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; }
pre { background: var(--band); border: 1px solid var(--line); border-radius: 4px; padding: 10px 12px;
      font-size: 12px; line-height: 1.35; overflow-x: auto; max-height: 640px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def render_html(report_data: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data: URIs, no script)."""
    e = html.escape
    data = to_jsonable(report_data, "report_data")
    name, facts = _header(data)
    sections = _sections(data)
    body = [f"<header><h1>cascade report: {e(name)}</h1>",
            '<p class="meta">' + " &middot; ".join(f"{e(k)}: <b>{e(v)}</b>" for k, v in facts) + "</p></header>",
            "<nav>" + "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for sec in sections:
        body.append(f'<section id="{sec.anchor}"><h2>{e(sec.title)}</h2>')
        for b in sec.blocks:
            kind = b[0]
            if kind == "note":
                body.append(f'<p class="note">{e(b[1])}</p>')
            elif kind == "p":
                body.append(f'<p class="expl">{e(b[1])}</p>')
            elif kind == "h3":
                body.append(f"<h3>{e(b[1])}</h3>")
            elif kind == "pre":
                body.append(f"<pre>{e(b[1])}</pre>")
            elif kind == "table":
                body.append(_table_html(b[1]))
            elif kind == "img":
                b64 = base64.b64encode(b[1]).decode("ascii")
                body.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{b64}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
            elif kind == "cards":
                body.append('<div class="cards">')
                for title, items in b[1]:
                    dl = "".join(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in items)
                    body.append(f'<div class="card"><h4>{e(title)}</h4><dl>{dl}</dl></div>')
                body.append("</div>")
        body.append("</section>")
    body.append("<footer>Written by cascade.eval.report; the numbers are in report.json beside this file.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>cascade report: {e(name)}</title><style>{_CSS}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


# ----------------------------------------------------------------------------------------------------------------
# headless render check


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH (``chromium`` or ``chromium-browser``), or None."""
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def render_screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    chromium: str | None = None,
    window_size: tuple[int, int] = (1280, 2400),
    timeout_s: float = 120.0,
) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG screenshot of the window at ``png_path``.

    Network features are switched off (the page needs none; a request would show up as a failure to render
    offline). Raises FileNotFoundError when there is no Chromium or no page, RuntimeError when Chromium fails or
    writes no image (its stderr tail is in the message)."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such report page")
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found on PATH (looked for 'chromium' and 'chromium-browser')")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if png_path.exists():
        png_path.unlink()  # a stale screenshot must not pass for a fresh one
    w, h = window_size
    with tempfile.TemporaryDirectory(prefix="cascade-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png_path}", f"--window-size={w},{h}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"chromium did not finish rendering {html_path} within {timeout_s:.0f} s") from None
    if proc.returncode != 0 or not png_path.is_file():
        tail = (proc.stderr or "")[-1500:]
        raise RuntimeError(f"chromium exited with {proc.returncode} and wrote no screenshot {png_path}:\n{tail}")
    return png_path
