"""The report's sections, each built from the report data: headline, per-stage metrics, recall curves, latency,
index, models, training curves, distillation ablation, data, run (with the resolved config as TOML)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .blocks import (
    MISSING,
    MODEL_COLUMNS,
    NOT_COMPUTED,
    STAGE_FAMILIES,
    STAGE_METRICS,
    STAGE_ORDER,
    Section,
    Table,
    as_floats,
    as_list,
    as_mapping,
    cell_number,
    format_value,
    kv_table,
    lower_is_better,
    metric_label,
    stage_order,
)
from .plots import plot_index, plot_latency, plot_recall_curves, plot_training


def header(data: Mapping) -> tuple[str, list[tuple[str, str]]]:
    run = as_mapping(data.get("run"), "report_data['run']") or {}
    name = str(run.get("name") or "unnamed run")
    facts = [("report built", format_value(run.get("created")))]
    if run.get("machine") is not None:  # the run's steps' machine, as their manifests record it
        facts.append(("run's machine", format_value(run.get("machine"))))
    if run.get("report_machine") is not None:
        facts.append(("report built on", format_value(run.get("report_machine"))))
    return name, facts


def _variants(data: Mapping) -> dict[str, Mapping]:
    cascades = as_mapping(data.get("cascades"), "report_data['cascades']") or {}
    out = {}
    for v, entry in cascades.items():
        e = as_mapping(entry, f"report_data['cascades'][{v!r}]")
        if e is not None:
            out[str(v)] = e
    return out


def _stages_of(variant: str, entry: Mapping) -> dict[str, Mapping]:
    path = f"report_data['cascades'][{variant!r}]['stages']"
    stages = as_mapping(entry.get("stages"), path) or {}
    return {s: (as_mapping(stages[s], f"{path}[{s!r}]") or {}) for s in stage_order(stages)}


OUTCOME_COLUMNS = (
    ("click_recall", "click-recall@K"), ("hit_rate", "HitRate@K"), ("click_ndcg", "click-NDCG@K"),
    ("click_recall_rand", "click-recall@K (random slice)"),
    ("expected_click_recall_rand", "expected click-recall@K (random slice)"),
    ("oracle_clicks", "oracle clicks@K"),
    ("retrieval_click_recall", "click-recall@N1"), ("prerank_click_recall", "click-recall@N2"),
    ("teacher_recall", "teacher-recall@K"), ("final_distinct", "distinct items"), ("final_coverage", "coverage"),
    ("final_top_share", "top-10 share"),
)


def _gap_cell(gap: Mapping | None) -> str:
    """A paired difference as a table cell: "+d ± se", starred beyond 2 SE; "–" without one."""
    if not gap or gap.get("se") is None or gap["se"] != gap["se"]:
        return MISSING
    return _gap_text(gap) + (" *" if abs(gap["diff"]) > 2 * gap["se"] else "")


def _gap_text(gap: Mapping) -> str:
    """A paired difference "+d ± se": 4 decimals, 6 for the random slice's expected click-recall (about 0.003)."""
    dec = 6 if str(gap.get("metric")).endswith("_rand") else 4
    return f"{gap['diff']:+.{dec}f} ± {gap['se']:.{dec}f}"


def _section_headline(data: Mapping, variants: dict[str, Mapping]) -> Section:
    """Outcomes first: what users would get (held-out clicks; on the world, oracle clicks), then agreement."""
    sec = Section("headline", "Headline: outcomes")
    outcomes = as_mapping(data.get("outcomes"), "report_data['outcomes']") or {}
    rows = [as_mapping(r, f"report_data['outcomes']['rows'][{i}]") or {}
            for i, r in enumerate(as_list(outcomes.get("rows"), "report_data['outcomes']['rows']") or [])]
    if not rows:
        return sec.note(f"Cascade replay {NOT_COMPUTED}.")
    for flag in as_list(outcomes.get("flags"), "report_data['outcomes']['flags']") or []:
        sec.blocks.append(("p", f"Warning: {flag}"))
    verdict = as_mapping(outcomes.get("verdict"), "report_data['outcomes']['verdict']")
    if verdict and verdict.get("text"):
        sec.blocks.append(("p", str(verdict["text"])))
    oracle = any(r.get("oracle_clicks") is not None for r in rows)
    cards = []
    for r in rows:
        if r.get("kind") != "cascade":
            continue
        k = r.get("k")
        lead = [(f"click-recall@{k}", format_value(r.get("click_recall"), "click_recall"))]
        if oracle:
            lead = [(f"oracle clicks@{k}", format_value(r.get("oracle_clicks"), "oracle_clicks"))] + lead
        cards.append((str(r.get("name")), lead + [
            (f"teacher-recall@{k}", format_value(r.get("teacher_recall"), "teacher_recall")),
            ("distinct items", format_value(r.get("final_distinct"), "final_distinct"))]))
    sec.blocks.append(("cards", cards))
    present = [(key, label) for key, label in OUTCOME_COLUMNS if any(r.get(key) is not None for r in rows)]
    frame = pd.DataFrame({"list": [r.get("name") for r in rows], "kind": [r.get("kind") for r in rows],
                          **{label: [r.get(key) for r in rows] for key, label in present}})
    keys = ["", ""] + [key for key, _ in present]
    k = rows[0].get("k")
    sizes = f"N1 = {rows[0].get('retrieval_size')}, N2 = {rows[0].get('prerank_size')}, K = {k}"
    sec.blocks.append(("table", Table(frame, keys, caption=f"test requests{_test_period(data)}; {sizes}. "
                                                          + _request_counts(data, rows[0], outcomes))))
    gaps = [as_mapping(g, f"report_data['outcomes']['gaps'][{i}]") or {}
            for i, g in enumerate(as_list(outcomes.get("gaps"), "report_data['outcomes']['gaps']") or [])]
    if gaps:
        label = {"rank_click_recall": f"click-recall@{k}", "oracle_ratio": "oracle ratio",
                 "expected_click_recall_rand": f"expected click-recall@{k} (random slice)"}
        frame = pd.DataFrame({
            "cascade": [g.get("cascade") for g in gaps], "minus": [g.get("other") for g in gaps],
            "metric": [label.get(str(g.get("metric")), g.get("metric")) for g in gaps],
            "difference ± SE": [_gap_text(g) if g.get("beyond_2se") is not None else MISSING for g in gaps],
            "beyond 2 SE": [g.get("beyond_2se") for g in gaps],
            "requests": [g.get("n") for g in gaps]})
        ratio = any(g.get("metric") == "oracle_ratio" for g in gaps)
        sec.blocks.append(("table", Table(frame, ["", "", "", "", "beyond", "requests"],
                                          caption="paired on the same test requests: the cascade's per-request "
                                                  "value minus the other list's, mean ± standard error"
                                                  + ("; oracle ratio: a request's oracle clicks@K over the most any "
                                                     f"{k} items could get it (the oracle clicks@K column, per "
                                                     "request on a common scale)" if ratio else ""))))
    fs = as_mapping(outcomes.get("filter_seen"), "report_data['outcomes']['filter_seen']") or {}
    has = {key for key, _ in present}
    text = ("click-recall@K: share of each request's held-out clicked items that the list keeps (HitRate: any of "
            "them; click-NDCG: their positions); @N1 / @N2: what the retrieval and pre-rank stages keep.")
    if "click_recall_rand" in has:
        text += (" Random slice: the randomly exposed requests, free of the logging policy's bias; their clicks land "
                 "on random items, so a top-K holds few of them.")
    if "expected_click_recall_rand" in has:
        text += (" 'expected': what that click-recall converges to under the true click model (the list's share of "
                 "the slice's expected clicks).")
    if oracle:
        text += " Oracle clicks: expected clicks of the final list under the true click model."
    text += (" teacher-recall: agreement with the teacher's top-K over the corpus (worth as much as the teacher).")
    if any(r.get("name") == "teacher_corpus" for r in rows):
        text += (" Reference 'teacher_corpus': the teacher's own top list over the corpus, the ceiling of "
                 "teacher-recall (1 by construction), not of the click metrics: a cascade can find more of the "
                 "held-out clicks than it.")
    sec.blocks.append(("p", text + (f" Seen items: {fs.get('why')}." if fs.get("why") else "")))
    return sec


def _request_counts(data: Mapping, row: Mapping, outcomes: Mapping) -> str:
    """How many test requests each measure of the headline is a mean over: the logged traffic's sample (those with
    clicks for the click metrics) and the random slice's random-exposure requests (those with clicks)."""
    d = as_mapping(data.get("data"), "report_data['data']") or {}
    test = as_mapping((as_mapping(d.get("splits"), "report_data['data']['splits']") or {}).get("test"),
                      "report_data['data']['splits']['test']") or {}
    n, total, clicks = row.get("n_requests"), test.get("requests"), row.get("n_requests_with_clicks")
    if n is None and clicks is None:
        return ""
    if n is None:
        logged = "Logged traffic: the replayed test requests"
    elif total is not None and n < total:
        logged = f"Logged traffic: an even sample of {format_value(n)} of the {format_value(total)} test requests"
    else:
        logged = f"Logged traffic: all {format_value(n)} test requests"
    if clicks is not None:
        logged += f" ({format_value(clicks)} with clicks: the click metrics are means over these)"
    n_rand = row.get("n_rand_requests")
    if n_rand is None:
        return logged + "."
    rand_clicks = outcomes.get("n_rand_requests_with_clicks")
    return (logged + f"; random slice: {format_value(n_rand)} random-exposure requests"
            + (f" ({format_value(rand_clicks)} with clicks)" if rand_clicks is not None else "") + ".")


def _test_period(data: Mapping) -> str:
    """" (START .. END)" of the test split's requests where the data section has them, as the log's local dates
    (the split's ``utc_offset_hours``, named) or, where the data step recorded no offset, as UTC dates (said so),
    with the days a backtest left out of the log (``data.drop_last_days``); "" where it has no test split."""
    d = as_mapping(data.get("data"), "report_data['data']") or {}
    test = as_mapping((as_mapping(d.get("splits"), "report_data['data']['splits']") or {}).get("test"),
                      "report_data['data']['splits']['test']") or {}
    if not (test.get("start") and test.get("end")):
        return ""
    days = as_mapping((as_mapping(d.get("summary"), "report_data['data']['summary']") or {}).get("split_days"),
                      "report_data['data']['summary']['split_days']") or {}
    drop = days.get("drop_last_days") or 0
    back = f"; a backtest: the log's last {drop} days left out" if drop else ""
    offset = days.get("utc_offset_hours")
    shift = pd.Timedelta(hours=float(offset or 0.0))
    start, end = ((pd.Timestamp(test[k]) + shift).strftime("%Y-%m-%d") for k in ("start", "end"))
    # a data step from before utc_offset_hours recorded no offset: its dates are UTC dates
    zone = " UTC" if offset is None else f", local dates at UTC{float(offset):+g}"
    return f" ({start} .. {end}{zone}{back})"


def _section_stages(variants: dict[str, Mapping], merged: bool = False) -> Section:
    """The per-stage tables of every variant; ``merged``: a variant's retrieval stage merges channels."""
    sec = Section("stages", "Per-stage metrics")
    per_variant = {v: _stages_of(v, e) for v, e in variants.items()}
    if not any(per_variant.values()):
        return sec.note(f"Per-stage metrics {NOT_COMPUTED}.")
    stage_names = stage_order(dict.fromkeys(s for st in per_variant.values() for s in st))
    e2e = {v: as_mapping(e.get("end_to_end"), f"report_data['cascades'][{v!r}]['end_to_end']") for v,
           e in variants.items()}
    row_names = stage_names + (["end to end"] if any(e2e.values()) else [])
    in_family = {k for _, keys in STAGE_FAMILIES for k in keys}
    families = list(STAGE_FAMILIES) + [(label, (key,)) for key, label in STAGE_METRICS
                                       if key != "size" and key not in in_family]
    for title, keys in families:
        table = _stage_table(per_variant, e2e, row_names, [(k, lab) for k, lab in STAGE_METRICS if k in keys])
        if table is not None:
            sec.blocks += [("h3", title), ("table", table)]
    sec.blocks.append(("p", "size: the stage's output length (N1 / N2 / K). click-recall / HitRate over the stage's "
                            "whole output and click-NDCG of its first K against the held-out clicks; teacher-recall "
                            "and teacher-NDCG against the teacher's top-K; AUC / GAUC of the stage's scoring function "
                            "on the test impressions (and on their random-exposure slice where there is one): the "
                            "rank stage's is the score the cascade ranks by (the teacher's: its model with the "
                            "exposure weight and collaborative term chosen on validation), not the Models table's "
                            "AUC of the model alone; latency per request at batch 1."
                            + (" A retrieval stage that merges channels has no AUC ('–'): each channel scores on its "
                               "own scale, so no one score orders the test impressions."
                               if merged and any((st.get("retrieval") or {}).get("auc") is None
                                                 for st in per_variant.values()) else "")))
    return sec


def _stage_table(per_variant: dict[str, dict[str, Mapping]], e2e: dict[str, Mapping | None], row_names: list[str],
                 metrics: list[tuple[str, str]]) -> Table | None:
    """One table of the per-stage section: a row per stage (and end to end) that has a value, the stage's size,
    then ``metrics`` [(key, label)], variants side by side. None when no row has a value."""
    vnames = list(per_variant)
    two_level = len(vnames) > 1

    def value(v: str, s: str, key: str):
        return ((e2e[v] or {}) if s == "end to end" else per_variant[v].get(s, {})).get(key)

    rows = [s for s in row_names if any(value(v, s, k) is not None for v in vnames for k, _ in metrics)]
    if not rows:
        return None
    columns, keys, cols_data = [("stage", "") if two_level else "stage"], [""], [rows]
    for key, label in [("size", "size")] + metrics:
        by_variant = {v: [value(v, s, key) for s in rows] for v in vnames}
        by_variant = {v: vals for v, vals in by_variant.items() if any(x is not None for x in vals)}
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
    return Table(frame, keys, caption=caption)


def _section_curves(variants: dict[str, Mapping]) -> Section:
    sec = Section("curves", "Teacher-recall@K curves")
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for v, entry in variants.items():
        path = f"report_data['cascades'][{v!r}]['recall_curves']"
        rc = as_mapping(entry.get("recall_curves"), path) or {}
        for stage in stage_order(rc):
            c = as_mapping(rc[stage], f"{path}[{stage!r}]")
            if not c:
                continue
            k = as_floats(c.get("k"), f"{path}[{stage!r}]['k']")
            r = as_floats(c.get("teacher_recall"), f"{path}[{stage!r}]['teacher_recall']")
            if k.shape != r.shape:
                raise ValueError(f"{path}[{stage!r}]: 'k' has {k.size} values but 'teacher_recall' has {r.size}")
            if k.size == 0:
                continue
            if not (np.isfinite(k).all() and (k >= 1).all()):
                raise ValueError(f"{path}[{stage!r}]['k'] must hold list lengths >= 1 (the axis is log-scaled)")
            curves.setdefault(v, {})[stage] = (k, r)
    if not curves:
        return sec.note(f"Recall curves {NOT_COMPUTED}.")
    sec.blocks.append(("img", plot_recall_curves(curves), "teacher-recall@K per stage and variant, log-x"))
    sec.blocks.append(("p", "teacher-recall@K: the share of the teacher's top-K over the whole corpus among the "
                            "first K items of a stage's output, mean over the logged traffic's sample of test "
                            "requests (the random-exposure requests replayed only for the random slice are left "
                            "out), the headline's logged-traffic requests. The rank stage's point at K = the final "
                            "list's length is the headline's teacher-recall@K; the per-stage "
                            "table's teacher-recall of retrieval and pre-rank is another measure (the teacher's "
                            "top-K of the final K anywhere in the stage's whole output)."))
    return sec


def _section_latency(variants: dict[str, Mapping]) -> Section:
    sec = Section("latency", "Latency at batch 1")
    samples: dict[str, dict[str, np.ndarray]] = {}
    for v, entry in variants.items():
        path = f"report_data['cascades'][{v!r}]['latency_samples_ms']"
        ls = as_mapping(entry.get("latency_samples_ms"), path) or {}
        for stage in stage_order(ls, STAGE_ORDER + ("end_to_end",)):
            x = as_floats(ls[stage], f"{path}[{stage!r}]")
            x = x[np.isfinite(x)]
            if x.size:
                samples.setdefault(stage, {})[v] = x
    if samples:
        sec.blocks.append(("img", plot_latency(samples), "per-request latency histograms per stage and end to end"))
    else:
        sec.note(f"Latency samples {NOT_COMPUTED}.")
    e2e = {v: as_mapping(e.get("end_to_end"), f"report_data['cascades'][{v!r}]['end_to_end']") or {}
           for v, e in variants.items()}
    rows = [{"variant": v, "requests / s at batch 1": t.get("requests_per_s_batch1"),
             "batch": t.get("batch_size"), "requests / s batched": t.get("requests_per_s_batched")}
            for v, t in e2e.items() if t.get("requests_per_s_batch1") is not None
            or t.get("requests_per_s_batched") is not None]
    if rows:
        sec.blocks.append(("h3", "Throughput end to end"))
        sec.blocks.append(("table", Table(pd.DataFrame(rows), ["", "requests_per_s", "batch", "requests_per_s"],
                                          caption="requests served per second, one request at a time and in "
                                                  "batches of the given size")))
    return sec


def _section_index(data: Mapping) -> Section:
    sec = Section("index", "Index")
    idx = as_mapping(data.get("index"), "report_data['index']")
    if not idx:
        return sec.note(f"Index {NOT_COMPUTED}.")
    k = idx.get("recall_k")
    labels = {"recall_vs_exact": f"recall@{k} vs exact" if k is not None else "recall vs exact",
              "variant": "variant shown", "is_exact": "exact", "recall_target": "recall target"}
    facts = {labels.get(key, key): v for key, v in idx.items()
             if key not in ("operating_points", "operating_point", "recall_k")}
    if facts:
        sec.blocks.append(("table", Table(pd.DataFrame({"property": list(facts), "value": [
            format_value(v, "recall" if key in ("recall target", labels["recall_vs_exact"]) else key)
            for key, v in facts.items()]}), ["", ""])))
    ops = as_list(idx.get("operating_points"), "report_data['index']['operating_points']") or []
    rows = [as_mapping(p, f"report_data['index']['operating_points'][{i}]") or {} for i, p in enumerate(ops)]
    if not rows and (idx.get("is_exact") or str(idx.get("factory")) == "Flat"):
        return sec.note("The index is exact (a flat search of every item): it returns the true top-k, so there is "
                        "no search parameter to sweep.")
    if not rows:
        return sec.note(f"Operating points {NOT_COMPUTED}.")
    frame = pd.DataFrame([{c: r.get(c) for c in ("param", "value", "recall_at_k", "qps")} for r in rows])
    shown = frame.rename(columns={"param": "search parameter", "recall_at_k": f"recall@{k or 'k'} vs exact",
                                  "qps": "queries / s"})
    op = as_mapping(idx.get("operating_point"), "report_data['index']['operating_point']")
    chosen = (str(op.get("param")), op.get("value")) if op else None
    is_chosen = np.array([chosen is not None and (str(r.get("param")), r.get("value")) == chosen for r in rows])
    if chosen is not None and not is_chosen.any():
        raise ValueError(f"report_data['index']['operating_point']: the operating point {chosen[0]}={chosen[1]} "
                         "is not among the swept points")
    sec.blocks.append(("table", Table(shown, ["", "value", "recall_at_k", "qps"],
                                      bold=np.repeat(is_chosen[:, None], 4, axis=1),
                                      caption=(f"operating point in bold: {chosen[0]}={chosen[1]}, the cheapest "
                                               "setting that reaches the recall target"
                                               + (f" ({format_value(idx['recall_target'], 'recall')})"
                                                  if idx.get("recall_target") is not None else "")
                                               if chosen else ""))))
    pts = frame.assign(recall_at_k=pd.to_numeric(frame["recall_at_k"], errors="coerce"),
                       qps=pd.to_numeric(frame["qps"], errors="coerce"),
                       param=frame["param"].astype(str))
    if pts[["recall_at_k", "qps"]].notna().all(axis=1).any():
        sec.blocks.append(("img", plot_index(pts, chosen),
                           "index recall@k against queries per second" + (", the operating point circled"
                                                                          if chosen else "")))
    return sec


def _section_training(data: Mapping) -> Section:
    sec = Section("training", "Training curves")
    tr = as_mapping(data.get("training"), "report_data['training']")
    if not tr:
        return sec.note(f"Training histories {NOT_COMPUTED}.")
    curves, rows = {}, []
    for model, h in tr.items():
        path = f"report_data['training'][{model!r}]"
        h = as_mapping(h, path) or {}
        x = as_floats(h.get("epoch"), f"{path}['epoch']")
        loss = as_floats(h.get("loss"), f"{path}['loss']")
        valid = as_floats(h.get("valid"), f"{path}['valid']")
        if not (x.shape == loss.shape == valid.shape):
            raise ValueError(f"{path}: 'epoch', 'loss' and 'valid' have {x.size}, {loss.size} and {valid.size} values")
        if x.size == 0:
            continue
        label = h.get("valid_metric")
        curves[str(model)] = (x, loss, valid, label)
        rows += [{"model": str(model), "epoch": int(e), "loss": lo, "metric": label or MISSING,
                  "value": None if np.isnan(v) else v} for e, lo, v in zip(x, loss, valid)]
    if not curves:
        return sec.note(f"Training histories {NOT_COMPUTED}.")
    sec.blocks.append(("img", plot_training(curves), "train loss and validation metric per epoch, one panel per model"))
    frame = pd.DataFrame(rows).rename(columns={"loss": "train loss", "metric": "validation metric"})
    sec.blocks.append(("table", Table(frame, ["", "epoch", "loss", "", "valid"])))
    sec.blocks.append(("p", "train loss: the weighted total of the model's loss terms, mean over the epoch (or since "
                            "the last evaluation). Validation: the rankers' AUC on the valid split; the two-tower "
                            "students' teacher-recall@10 on a fixed sample of the rank log, in-sample for the "
                            "distilled students and the teacher's order they never trained on for the "
                            "ground-truth ones."))
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


def _section_models(data: Mapping) -> Section:
    sec = Section("models", "Models")
    models = as_list(data.get("models"), "report_data['models']")
    if not models:
        return sec.note(f"Model comparison {NOT_COMPUTED}.")
    rows = [as_mapping(m, f"report_data['models'][{i}]") or {} for i, m in enumerate(models)]
    present = [(k, label) for k, label in MODEL_COLUMNS if any(r.get(k) is not None for r in rows)]
    frame = pd.DataFrame({"model": [r.get("name") for r in rows], "role": [r.get("role") for r in rows],
                          **{label: [r.get(k) for r in rows] for k, label in present}})
    keys = ["", ""] + [k for k, _ in present]
    # bold the best quality metric over all models (latency / size are trade-offs, not "best")
    quality = [k in ("auc", "gauc", "logloss", "rand_auc", "rand_gauc") for k in keys]
    vals = np.array([[cell_number(v) if q else math.nan for v, q in zip(row, quality)]
                     for row in frame.itertuples(index=False)], dtype=np.float64).reshape(len(frame), len(keys))
    bold = _best_mask(vals, ["all"] * len(frame), [lower_is_better(k) for k in keys])
    sec.blocks.append(("table", Table(frame, keys, bold=bold)))
    sec.blocks.append(("p", "Scores on the test impressions (and on the random-exposure slice where there is one); "
                            "best quality value in bold. ms / 100 pairs: scoring time of 100 (user, item) pairs. "
                            "The teacher's row scores the model alone (its click probability); the cascade's rank "
                            "stage ranks by its ranking score (with the exposure weight and collaborative term), "
                            "whose AUC is the per-stage table's rank row."))
    ranker = (as_mapping(data.get("choices"), "report_data['choices']") or {}).get("ranker")
    if ranker == "teacher" and any(str(r.get("name", "")).startswith("rank student (served") for r in rows):
        sec.blocks.append(("p", "The replay's cascades rank with the teacher (replay.ranker = \"teacher\"): the rank "
                                "student marked served is the one load_cascade(..., ranker=\"student\") serves, and "
                                "no cascade of this report ranks with it."))
    return sec


def _section_channels(data: Mapping) -> Section:
    """The multi-channel cascade's retrieval channels: each alone (click-recall at the retrieval size, the share of
    the teacher's top-K in its list of that size), what the union loses without it, and its share of the final
    lists' items."""
    sec = Section("channels", "Retrieval channels")
    ch = as_mapping(data.get("channels"), "report_data['channels']")
    if not ch:
        return sec.note(f"No multi-channel cascade was replayed (replay.channels is empty) or its channel report is "
                        f"{NOT_COMPUTED}.")
    per = as_mapping(ch.get("per_channel"), "report_data['channels']['per_channel']") or {}
    share = as_mapping(ch.get("final_origin_share"), "report_data['channels']['final_origin_share']") or {}
    rows, oracle = [], False
    for name, e in ((n, as_mapping(v, f"per_channel[{n!r}]") or {}) for n, v in per.items()):
        own = as_mapping(e.get("end_to_end"), f"per_channel[{name!r}]['end_to_end']") or {}
        gaps = as_mapping(own.get("union_minus_it"), f"per_channel[{name!r}]['end_to_end']['union_minus_it']") or {}
        oracle |= own.get("oracle_ratio") is not None
        rows.append({"channel": name, "quota": e.get("quota"), "click-recall@N1 alone": e.get("click_recall_alone"),
                     "teacher's top-K in its N1": e.get("teacher_recall_alone"),
                     "union without it": e.get("union_without"), "marginal": e.get("marginal"),
                     "share of final items": share.get(name),
                     "alone end to end: click-recall@K": own.get("rank_click_recall"),
                     "all channels minus it alone": _gap_cell(gaps.get("rank_click_recall")),
                     "alone: oracle ratio": own.get("oracle_ratio"),
                     "all minus it alone: oracle ratio": _gap_cell(gaps.get("oracle_ratio"))})
    keys = ["", "quota_share", "click_recall", "teacher_recall", "click_recall", "click_recall", "share",
            "click_recall", ""] + (["oracle_ratio", ""] if oracle else [])
    frame = pd.DataFrame(rows)
    if not oracle:
        frame = frame.drop(columns=["alone: oracle ratio", "all minus it alone: oracle ratio"])
    by_scores = ch.get("merge") == "scores"
    if by_scores:  # a score-normalised union has no quotas
        frame, keys = frame.drop(columns=["quota"]), keys[:1] + keys[2:]
    sec.blocks.append(("table", Table(frame, keys)))
    quota = "share of the request's union" if by_scores else "quota"
    cut = (f"the pre-rank keeps every channel's {quota} (each channel's candidates in pre-rank score order, "
           f"interleaved by {quota})" if ch.get("prerank_quotas") else
           "the pre-rank keeps its best N2 of the union by its own score")
    union = format_value(ch.get("union_click_recall"), "click_recall")
    how, others = (("each channel's scores standardised over its own list of the request, an item taking its best: "
                    "replay.merge = 'scores'", "the others merged the same way") if by_scores else
                   ("the channels interleaved by quota", "the others' quotas renormalised"))
    sec.blocks.append(("p", f"The union ({how}) has click-recall@N1 {union}; marginal: what it loses without the "
                            f"channel ({others}). Share of final items: the channel that placed each "
                            f"final item in the union; {cut}. Alone end to end: the channel as the whole retrieval "
                            f"stage, the same pre-rank and ranker after it (two_tower: the distilled cascade); all "
                            f"channels minus it alone: the multi-channel cascade's per-request value minus that "
                            f"cascade's, mean ± SE over the test requests (* beyond 2 SE)."))
    held = {r["channel"]: r["teacher's top-K in its N1"] for r in rows if r["teacher's top-K in its N1"] is not None}
    if held and ch.get("union_teacher_recall") is not None:
        best = max(held, key=held.get)
        sec.blocks.append(("p", f"Of the teacher's top-K over the corpus, the union's N1 holds "
                                f"{format_value(ch['union_teacher_recall'], 'teacher_recall')} and the best single "
                                f"channel's ({best}) {format_value(held[best], 'teacher_recall')}. No stage after "
                                f"retrieval adds an item, so where one channel's N1 already holds nearly all of it, "
                                f"a cascade ranked by the teacher ends near the teacher's own top-K whichever channels "
                                f"feed it, and the union can change little end to end; a smaller replay.n_retrieve "
                                f"makes the retrieval stage choose."))
    return sec


def _section_choices(data: Mapping) -> Section:
    """What the run chose on validation (the seen filter, channel settings, the teacher's exposure weight and
    collaborative term, the students' distillation scales) with every grid point, and the teacher-quality gates."""
    sec = Section("choices", "Choices made on validation")
    ch = as_mapping(data.get("choices"), "report_data['choices']")
    if not ch:
        return sec.note(f"Validation choices {NOT_COMPUTED}.")
    fs = as_mapping(ch.get("filter_seen"), "report_data['choices']['filter_seen']")
    if fs:
        sec.blocks.append(("p", f"Seen items: {fs.get('why')}."))
    channels = as_mapping(ch.get("channels"), "report_data['choices']['channels']") or {}
    rows = []
    for name, entry in channels.items():
        if name in ("judge", "left_out"):
            continue
        e = as_mapping(entry, f"report_data['choices']['channels'][{name!r}]")
        if not e:
            continue
        grid = as_list(e.get("grid"), "grid") or []
        best = max((v for g in grid for k, v in g.items() if k.startswith("valid_click_recall")), default=None)
        rows.append({"channel": name, "chosen": json.dumps(e.get("chosen")), "valid click-recall@10": best})
    if rows:
        sec.blocks.append(("h3", "Retrieval channels (settings chosen by validation click-recall)"))
        sec.blocks.append(("table", Table(pd.DataFrame(rows), ["", "", "click_recall"],
                                          caption=str(channels.get("judge", "")))))
    left_out = as_mapping(channels.get("left_out"), "report_data['choices']['channels']['left_out']") or {}
    for name, why in left_out.items():
        sec.blocks.append(("p", f"Channel {name}: {why}."))
    es = as_mapping(ch.get("entire_space"), "report_data['choices']['entire_space']")
    if es:
        grid = [as_mapping(g, "grid") or {} for g in as_list(es.get("grid"), "grid") or []]
        key = next((k for k in (grid[0] if grid else {}) if k.startswith(("valid_click_recall", "valid_random_auc"))),
                   None)
        label, fmt = _score_column(key)
        frame = pd.DataFrame({"exposure weight": [g.get("exposure_weight") for g in grid],
                              label: [g.get(key) for g in grid], **_one_se_frame(grid)})
        sec.blocks.append(("h3", f"Teacher: exposure weight of the corpus-wide ranking (chosen "
                                 f"{format_value(es.get('exposure_weight'))})"))
        sec.blocks.append(("table", Table(frame, ["", fmt, *_one_se_keys(grid)],
                                          caption=str(es.get("judge", "")))))
    co = as_mapping(ch.get("collaborative"), "report_data['choices']['collaborative']")
    if co and "off" in co:
        sec.blocks.append(("p", f"Teacher: no collaborative term ({co['off']})."))
    elif co:
        rows = [as_mapping(g, "grid") or {} for g in as_list(co.get("grid"), "grid") or []]
        grid = [g for g in rows if "part" not in g]  # (lambda, weight); then the popularity prior's rows
        prior = [g for g in rows if "part" in g]
        key = next((k for k in (grid[0] if grid else {}) if k.startswith(("valid_click_recall", "valid_random_auc"))),
                   "valid click-recall")
        label, fmt = _score_column(key)
        chosen = as_mapping(co.get("chosen"), "chosen")
        sec.blocks.append(("h3", f"Teacher: collaborative term added to its ranking score (chosen "
                                 f"{_collaborative_text(chosen, prior)})"))
        sec.blocks.append(("table", Table(pd.DataFrame({"EASE lambda": [g.get("lambda") for g in grid],
                                                        "weight": [g.get("weight") for g in grid],
                                                        label: [g.get(key) for g in grid], **_one_se_frame(grid)}),
                                          ["", "", fmt, *_one_se_keys(grid)], caption=str(co.get("judge", "")))))
        if es:
            sec.blocks.append(("p", "Weight 0 is the teacher's ranking score at the chosen exposure weight, scored "
                                    "as the cascade serves it (in bfloat16 where the scoring probe found it faster); "
                                    "the exposure weight's table scores in float32, so the same list can differ "
                                    "there in the fourth decimal."))
        if prior:
            sec.blocks.append(("p", "The classic prior most-popular + EASE (log(1 + clicks in the window) and the "
                                    "EASE scores, each standardised over the corpus): alone at each window and EASE "
                                    "weight, then the best of them beside the teacher, its weight in units of the SD "
                                    "of the teacher's score over the corpus (0: no prior), chosen by the one-SE rule: "
                                    "logged clicks take the largest weight within one SE of the best, the random "
                                    "slice's AUC (the SD over its randomly shown impressions) the smallest."))
            sec.blocks.append(("table", Table(pd.DataFrame({
                "part": [g.get("part") for g in prior], "window days": [g.get("popular_days") for g in prior],
                "EASE lambda": [g.get("prior_lambda") for g in prior],
                "EASE weight": [g.get("prior_ease_weight") for g in prior],
                "weight beside the teacher": [g.get("prior_weight") for g in prior],
                label: [g.get(key) for g in prior], **_one_se_frame(prior)}),
                ["", "", "", "", "", fmt, *_one_se_keys(prior)])))
        if co.get("popular_prior"):
            sec.blocks.append(("p", f"Teacher: popularity prior {co['popular_prior']}."))
    st = as_mapping(ch.get("students"), "report_data['choices']['students']") or {}
    epochs_searched = False
    for stage in ("retrieval", "prerank"):
        e = as_mapping(st.get(stage), f"report_data['choices']['students'][{stage!r}]")
        if not e:
            continue
        grid = [as_mapping(g, "grid") or {} for g in as_list(e.get("grid"), "grid") or []]
        n = e.get("size")
        prior = {}
        if any("popularity_prior" in g for g in grid):  # runs before the prior have no such column
            prior = {"popularity prior weight": [g.get("popularity_prior") for g in grid],
                     f"valid click-recall@{n} without it": [_weight_zero_score(g, n) for g in grid]}
        epochs = {}
        if any("chosen" in (g.get("epochs") or {}) for g in grid):  # only where the training length was searched
            epochs = {"epochs served (configured / trained)": [_epochs_text(g.get("epochs")) for g in grid]}
            epochs_searched = True
        frame = pd.DataFrame({"distillation scale": [g.get("scale") for g in grid],
                              f"valid click-recall@{n}": [g.get(f"valid_click_recall@{n}") for g in grid], **prior,
                              **epochs, "teacher-recall@10 on the rank log": [(g.get("teacher_agreement") or {}).get(
                                  "teacher_recall@10") for g in grid], **_one_se_frame(grid)})
        sec.blocks.append(("h3", f"{stage} student (scale {format_value(e.get('chosen_scale'))} chosen{_reference(e)}"
                                 "; 0 = ground truth only)"))
        sec.blocks.append(("table", Table(frame, ["", "click_recall", *(["", "click_recall"] if prior else []),
                                                  *([""] if epochs else []), "teacher_recall",
                                                  *_one_se_keys(grid)])))
        g = as_mapping(e.get("gate"), "gate")
        if g:
            verdict = "better" if g.get("teacher_better") else "NOT better"
            by_auc = g.get("judged_by") == "random_auc"
            cr = {k: format_value(g.get(k), "auc" if by_auc else "click_recall")
                  for k in ("teacher", "ground_truth_student", "gain", "standard_error")}
            what = (f"on the {format_value(g.get('impressions'))} randomly shown validation impressions the "
                    f"teacher's ranking score has AUC {cr['teacher']}, the ground-truth-only tower "
                    f"{cr['ground_truth_student']}" if by_auc else
                    f"the teacher's own top-{n} keeps {cr['teacher']} of the validation clicks, the "
                    f"ground-truth-only tower {cr['ground_truth_student']}")
            sec.blocks.append(("p", f"Teacher gate: {what} (gain {cr['gain']}, one standard error "
                                    f"{cr['standard_error']}): the teacher is {verdict}."))
        sec.blocks += _temperature_blocks(e, f"valid_click_recall@{n}", f"valid click-recall@{n}", "click_recall")
    rs = as_mapping(st.get("rank_student"), "report_data['choices']['students']['rank_student']")
    if rs:
        grid = [as_mapping(g, "grid") or {} for g in as_list(rs.get("grid"), "grid") or []]
        frame = pd.DataFrame({"distillation scale": [g.get("scale") for g in grid],
                              "valid AUC": [g.get("valid_auc") for g in grid], **_one_se_frame(grid)})
        sec.blocks.append(("h3", f"Rank student (scale {format_value(rs.get('chosen_scale'))} chosen{_reference(rs)})"))
        sec.blocks.append(("table", Table(frame, ["", "auc", *_one_se_keys(grid)])))
        g = as_mapping(rs.get("gate"), "gate")
        if g:
            verdict = "better" if g.get("teacher_better") else "NOT better"
            margin = (f" (gain {format_value(g.get('gain'), 'auc')}, one standard error "
                      f"{format_value(g.get('standard_error'), 'auc')})" if "standard_error" in g else "")
            sec.blocks.append(("p", f"Teacher gate: the teacher's validation AUC is "
                                    f"{format_value(g.get('teacher_valid_auc'), 'auc')}, the plain rank student's "
                                    f"{format_value(g.get('plain_student_valid_auc'), 'auc')}{margin}: the teacher "
                                    f"is {verdict} by more than one standard error."))
        sec.blocks += _temperature_blocks(rs, "valid_auc", "valid AUC", "auc")
    sec.blocks.append(("p", "A tower's popularity prior adds the popular channel's recent click counts to its scores "
                            "(its item embeddings are fixed when the index is built); its weight is chosen per "
                            "trained tower on the same validation requests before the distillation scale is."))
    if epochs_searched:
        sec.blocks.append(("p", "Each tower's training length was chosen on them too, before its prior: it trained "
                                "up to students.max_epochs_factor times its configured epochs, judged after every "
                                "epoch by its validation click-recall without the prior, and the epoch closest to "
                                "the configured count within one standard error of the best is served."))
    sec.blocks.append(("p", "Each grid is decided by the one-standard-error rule: the smallest value whose score is "
                            "within one standard error of the best score (the SE of the paired gap, bootstrapped "
                            "over the validation requests), so a setting that wins by less than the validation "
                            "split's noise does not replace a simpler one. Some grids have another reference: a "
                            "student's distillation scale takes the value closest to 1 (the configured weights) "
                            "where its teacher gate found the teacher better; the teacher's exposure weight, "
                            "where logged clicks judge it, the value closest to 1 (the product rule P(shown) "
                            "P(click | shown)); the classic prior's weight beside the teacher, where logged clicks "
                            "judge it, the largest value; a student's KD temperature the value closest to the "
                            "configured one. Before the rule, a student's grid (its distillation scale, its "
                            "popularity prior weight) whose largest value scores best is widened: that value doubled, "
                            "at most students.grid_doublings times, so a table may hold values beyond the configured "
                            "grid."))
    return sec


def _score_column(key: str | None) -> tuple[str, str]:
    """A validation grid's score column ("valid_click_recall@10", "valid_random_auc") as (label, format key)."""
    if key and key.startswith("valid_random_auc"):
        return "valid AUC (random slice)", "auc"
    return (key or "valid click-recall").replace("_", " ").replace("click recall", "click-recall"), "click_recall"


def _collaborative_text(chosen: Mapping | None, prior: list[Mapping]) -> str:
    """The chosen collaborative term in the grids' units: the EASE weight, and the classic prior as its window, its
    EASE weight and its weight beside the teacher (in SDs of the teacher's score), with the coefficients that
    multiply the standardised scores."""
    if not chosen:
        return "none: weight 0"
    what = f"{format_value(chosen.get('weight'))} x EASE (lambda {format_value(chosen.get('lam'))})"
    pw, ew = chosen.get("popular_weight"), chosen.get("popular_ease_weight") or 0.0
    if not pw:
        return what
    days = chosen.get("popular_days")
    sd = next((g.get("score_sd") for g in prior if g.get("part") == "beside the teacher"
               and g.get("popular_days") == days and g.get("prior_lambda") == chosen.get("popular_lam")
               and g.get("score_sd")), None)
    beside = (f" at weight {format_value(pw / sd)} beside the teacher (SDs of its score)" if sd else "")
    return (f"{what} + the classic prior (popularity over {_days(days)} + {format_value(ew / pw)} x EASE (lambda "
            f"{format_value(chosen.get('popular_lam'))})){beside}; on the standardised scores: "
            f"{format_value(pw)} x popularity + {format_value(ew)} x EASE")


def _days(days: Any) -> str:
    """A window length in days: "1 day", "30 days"."""
    return f"{format_value(days)} day" + ("" if days == 1 else "s")


def _epochs_text(epochs: Mapping | None) -> str:
    """A tower's epoch choice as a grid cell: "4 (2 / 6)" when searched, "2" when the configured count trained."""
    e = as_mapping(epochs, "epochs") or {}
    if "chosen" not in e:
        return format_value(e.get("trained"))
    return f"{e['chosen']} ({e.get('configured')} / {e.get('trained')})"


def _temperature_blocks(choice: Mapping, key: str, label: str, fmt: str) -> list[tuple]:
    """A student's KD temperature as its grid chose it: a table of the temperatures tried at the chosen scale (its
    score ``key`` as column ``label``, formatted as ``fmt``), or a line saying why none was searched (nothing for a
    run recorded before temperatures were)."""
    t = as_mapping(choice.get("temperature"), "temperature")
    if not t:
        return []
    if not t.get("searched"):
        return [("p", f"KD temperature: not searched ({t.get('why')}).")]
    grid = [as_mapping(g, "temperature grid") or {} for g in as_list(t.get("grid"), "temperature grid") or []]
    frame = pd.DataFrame({"KD temperature": [g.get("temperature") for g in grid],
                          label: [g.get(key) for g in grid], **_one_se_frame(grid)})
    return [("p", f"KD temperature at the chosen scale: {format_value(t.get('chosen'))} (configured "
                  f"{format_value(t.get('configured'))}; the closest to it within one SE of the best is served)."),
            ("table", Table(frame, ["", fmt, *_one_se_keys(grid)]))]


def _reference(choice: Mapping) -> str:
    """The one-SE rule's reference of a student's scale grid, as the report's heading states it (none for a run
    recorded before the gate decided it)."""
    ref = choice.get("reference_scale")
    if ref is None:
        return ""
    why = "the teacher gate found the teacher better" if ref else "the teacher gate did not find the teacher better"
    return f": within one SE of the best, the closest to {format_value(ref)}, as {why}"


def _one_se_keys(grid: list[Mapping]) -> list[str]:
    """The format keys of :func:`_one_se_frame`'s columns."""
    return ["gap", "gap", ""] if _one_se_frame(grid) else []


def _weight_zero_score(row: dict, n) -> float | None:
    """A tower grid row's validation click-recall@n without its popularity prior (weight 0 of its prior grid)."""
    for p in as_list(row.get("popularity_prior_grid"), "popularity_prior_grid") or []:
        if (as_mapping(p, "popularity_prior_grid") or {}).get("weight") == 0.0:
            return p.get(f"valid_click_recall@{n}")
    return None


def _one_se_frame(grid: list[Mapping]) -> dict[str, list]:
    """The one-SE rule's columns of a validation grid (gap to the best score, its SE, within one SE); none for a
    grid recorded without them."""
    if not any("se_of_gap" in g for g in grid):
        return {}
    return {"gap to best": [g.get("gap_to_best") for g in grid], "SE of the gap": [g.get("se_of_gap") for g in grid],
            "within one SE": [g.get("within_one_se") for g in grid]}


def _section_ablation(data: Mapping) -> Section:
    sec = Section("ablation", "Distillation ablation")
    ab = as_mapping(data.get("ablation"), "report_data['ablation']")
    if not ab:
        return sec.note(f"Ablation {NOT_COMPUTED}.")
    rows = [as_mapping(r, f"report_data['ablation']['rows'][{i}]") or {}
            for i, r in enumerate(as_list(ab.get("rows"), "report_data['ablation']['rows']") or [])]
    if not rows:
        return sec.note(f"Ablation rows {NOT_COMPUTED}.")
    metrics = [str(m) for m in (as_list(ab.get("metrics"), "report_data['ablation']['metrics']") or [])]
    if not metrics:  # fall back to the metrics the rows carry, in first-seen order
        metrics = list(dict.fromkeys(m for r in rows for m in (as_mapping(r.get("values"), "values") or {})))
    seeds = as_list(ab.get("seeds"), "report_data['ablation']['seeds']") or []
    sec.note(_ablation_origin(ab, len(seeds)))
    # group rows by stage (first-seen order) so "best per stage" reads down one block
    stage_order = list(dict.fromkeys(str(r.get("stage")) for r in rows))
    rows = sorted(rows, key=lambda r: stage_order.index(str(r.get("stage"))))
    cells, means = [], []
    for i, r in enumerate(rows):
        vals = as_mapping(r.get("values"), f"report_data['ablation']['rows'][{i}]['values']") or {}
        line, mline = [], []
        for m in metrics:
            st = as_mapping(vals.get(m), f"report_data['ablation']['rows'][{i}]['values'][{m!r}]") or {}
            mean, std, n = st.get("mean"), st.get("std"), st.get("n")
            text = format_value(mean, m)
            if mean is not None and std is not None:
                text += f" ± {format_value(std, m)}"
            if mean is not None and n is not None and seeds and n != len(seeds):
                text += f" (n={n})"
            line.append(text)
            mline.append(cell_number(mean))
        cells.append(line)
        means.append(mline)
    frame = pd.DataFrame({"stage": [r.get("stage") for r in rows], "variant": [r.get("name") for r in rows],
                          **{metric_label(m): [c[j] for c in cells] for j, m in enumerate(metrics)}})
    keys = ["", ""] + metrics
    vals = np.concatenate([np.full((len(rows), 2), math.nan), np.array(means, dtype=np.float64).reshape(len(rows), -1)],
                          axis=1)
    bold = _best_mask(vals, frame["stage"].tolist(), [lower_is_better(k) for k in keys])
    seeds_txt = ", ".join(format_value(s, "seed") for s in seeds) if seeds else MISSING
    cap = f"mean ± std over seeds [{seeds_txt}]; best mean per stage in bold"
    sec.blocks.append(("table", Table(frame, keys, bold=bold, caption=cap)))
    return sec


def _ablation_origin(ab: Mapping, n_seeds: int) -> str:
    """Where the ablation table comes from: its file, dataset and date, and the requests each seed measured on."""
    known = {k: ab.get(k) for k in ("source", "dataset", "date") if ab.get(k) is not None}
    origin = ", ".join(f"{k} {v}" if k != "source" else f"`{v}`" for k, v in known.items()) or MISSING
    settings = as_mapping((as_mapping(ab.get("config"), "report_data['ablation']['config']") or {}).get("ablation"),
                          "report_data['ablation']['config']['ablation']") or {}
    text = (f"From the ablation's own pipeline runs ({origin}; {n_seeds} seed{'s' if n_seeds != 1 else ''}), "
            "not this run's models.")
    n_test, n_corpus = settings.get("n_test_requests"), settings.get("n_corpus_requests")
    if n_test is not None:
        text += f" Per seed, list metrics over {format_value(n_test, 'count')} test requests"
        text += (f", corpus-wide ones over the first {format_value(n_corpus, 'count')} of them." if n_corpus is not None
                 else ".")
    return text


def _section_data(data: Mapping) -> Section:
    sec = Section("data", "Data")
    d = as_mapping(data.get("data"), "report_data['data']")
    if not d:
        return sec.note(f"Data summary {NOT_COMPUTED}.")
    summary = as_mapping(d.get("summary"), "report_data['data']['summary']")
    # MovieLens has no impressions: a "click" is a rating >= 4, so its ctr is the share of such ratings
    ctr = "ctr (share of ratings >= 4)" if str((summary or {}).get("source", "")).startswith("movielens") else "ctr"
    if summary:
        sec.blocks.append(("h3", "Summary"))
        flat = _flatten(summary)
        shown = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}  # lists in full too
        if "ctr" in shown:  # formatted as a ctr under its longer label
            shown = {(ctr if k == "ctr" else k): format_value(v, k) for k, v in shown.items()}
        sec.blocks.append(("table", kv_table(shown)))
    splits = as_mapping(d.get("splits"), "report_data['data']['splits']")
    if splits:
        names = stage_order(splits, ("train", "valid", "test"))
        recs = []
        for s in names:
            sp = as_mapping(splits[s], f"report_data['data']['splits'][{s!r}]") or {}
            recs.append({"split": s, "rows": sp.get("rows"), "requests": sp.get("requests"), ctr: sp.get("ctr"),
                         "requests of users new to train": sp.get("requests_of_new_users"),
                         "clicks on items new to train": sp.get("clicks_on_new_items"),
                         "start (UTC)": sp.get("start"), "end (UTC)": sp.get("end")})
        frame = pd.DataFrame(recs)
        unknown = [c for c in ("requests of users new to train", "clicks on items new to train")
                   if frame[c].isna().all()]  # runs written before these were counted have neither
        frame = frame.drop(columns=unknown)
        cold = 2 - len(unknown)
        sec.blocks.append(("h3", "Splits (by time)"))
        sec.blocks.append(("table", Table(frame, ["", "rows", "requests", "ctr", *(["share"] * cold), "", ""],
                                          caption="new to train: a user or item with no train impression, whom no "
                                                  "model fitted on train knows (cold start)" if cold else "")))
    if not summary and not splits:
        sec.note(f"Data summary {NOT_COMPUTED}.")
    return sec


def _flatten(facts: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested facts as one row per leaf ("split_days.test_days"), so no value is cut to fit a cell."""
    out: dict[str, Any] = {}
    for k, v in facts.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def _section_run(data: Mapping) -> Section:
    sec = Section("run", "Run: configuration, versions, step times")
    run = as_mapping(data.get("run"), "report_data['run']")
    if not run:
        return sec.note(f"Run details {NOT_COMPUTED}.")
    walls = as_mapping(run.get("step_wall_s"), "report_data['run']['step_wall_s']")
    if walls:
        frame = pd.DataFrame({"step": list(walls), "wall s": list(walls.values())})
        total = sum(cell_number(v) for v in walls.values() if np.isfinite(cell_number(v)))
        frame = pd.concat([frame, pd.DataFrame({"step": ["total"], "wall s": [total]})], ignore_index=True)
        sec.blocks.append(("h3", "Pipeline step wall time"))
        sec.blocks.append(("table", Table(frame, ["", "wall_s"])))
    versions = as_mapping(run.get("versions"), "report_data['run']['versions']")
    sec.blocks.append(("h3", "Versions"))
    if versions:
        sec.blocks.append(("table", kv_table(versions, "package", "version")))
    else:
        sec.note(f"Versions {NOT_COMPUTED}.")
    cfg = run.get("config")
    sec.blocks.append(("h3", "Resolved configuration"))
    if cfg is None:
        sec.note(f"Configuration {NOT_COMPUTED}.")
    elif isinstance(cfg, Mapping):
        data_cfg = cfg.get("data") if isinstance(cfg.get("data"), Mapping) else {}
        source = data_cfg.get("source")
        if "world" in data_cfg and source not in (None, "world"):
            # the world generator's settings do nothing for another source
            cfg = {**cfg, "data": {k: v for k, v in data_cfg.items() if k != "world"}}
            sec.blocks.append(("p", f"[data.world] left out: the synthetic world's generator settings do nothing "
                                    f"for data.source = {source!r}."))
        sec.blocks.append(("pre", toml_dump(cfg) or "# (empty)"))
    else:
        sec.blocks.append(("pre", str(cfg)))
    return sec


def report_sections(data: Mapping) -> list[Section]:
    variants = _variants(data)
    return [_section_headline(data, variants), _section_stages(variants, bool(data.get("channels"))),
            _section_channels(data),
            _section_curves(variants), _section_latency(variants), _section_index(data), _section_models(data),
            _section_training(data), _section_choices(data), _section_ablation(data), _section_data(data),
            _section_run(data)]
