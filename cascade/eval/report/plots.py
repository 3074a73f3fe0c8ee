"""The report's plots (PNG bytes): matplotlib's object API on an explicit Agg canvas, no pyplot state."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

_STAGE_COLOURS = {"retrieval": "#1f77b4", "prerank": "#ff7f0e", "rank": "#2ca02c", "end_to_end": "#7f7f7f"}
_EXTRA_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_VARIANT_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_LINESTYLES = ("-", "--", ":", "-.")
_DPI = 100


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


def plot_recall_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """curves[variant][stage] = (k [n], teacher_recall [n]) -> PNG: one line per stage and variant, log-x (the
    teacher-recall@K of each K: the teacher's top-K over the corpus against the stage's first K items)."""
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
    ax.set_title("Teacher-recall@K: the share of the teacher's top-K in each stage's first K")
    return _png(fig)


def plot_latency(samples: dict[str, dict[str, np.ndarray]]) -> bytes:
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


def plot_index(points: pd.DataFrame, chosen: tuple[str, float] | None = None) -> bytes:
    """points: rows (param, value, recall_at_k, qps) -> PNG: QPS vs recall, one line per search parameter; the
    chosen operating point (param, value) circled and named in the legend."""
    fig = _figure((8.5, 4.4))
    ax = fig.add_subplot()
    for pi, (param, grp) in enumerate(points.groupby("param", sort=False)):
        grp = grp.sort_values("value")
        colour = _VARIANT_COLOURS[pi % len(_VARIANT_COLOURS)]
        ax.plot(grp["recall_at_k"], grp["qps"], marker="o", color=colour, label=str(param))
        for rec, qps, val in zip(grp["recall_at_k"], grp["qps"], grp["value"]):
            if np.isfinite(rec) and np.isfinite(qps):
                ax.annotate(f"{param}={val}", (rec, qps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if chosen is not None:
        hit = points[(points["param"] == str(chosen[0])) & (points["value"] == chosen[1])]
        if hit.empty:
            raise ValueError(f"plot_index: the operating point {chosen[0]}={chosen[1]} is not among the swept points")
        ax.scatter(hit["recall_at_k"], hit["qps"], s=260, facecolors="none", edgecolors="black", linewidths=2.2,
                   zorder=5, label=f"operating point: {chosen[0]}={chosen[1]}")
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


def plot_training(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, str | None]]) -> bytes:
    """curves[model] = (x [n] evaluation number (epoch), loss [n], valid [n] (nan = none), valid label) -> PNG:
    one panel per model, the train loss on the left axis, the validation metric dashed on the right axis."""
    n = len(curves)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _figure((3.6 * ncols + 0.6, 2.7 * nrows + 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (model, (x, loss, valid, valid_label)) in zip(axes, curves.items()):
        ax.plot(x, loss, marker="o", markersize=3, color=_VARIANT_COLOURS[0], label="train loss")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("train loss", fontsize=8, color=_VARIANT_COLOURS[0])
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if x.size:
            ax.set_xticks(np.unique(x))
        if np.isfinite(valid).any():
            right = ax.twinx()
            right.plot(x, valid, marker="s", markersize=3, linestyle="--", color=_VARIANT_COLOURS[1])
            right.set_ylabel(valid_label or "valid", fontsize=8, color=_VARIANT_COLOURS[1])
            right.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _png(fig)
