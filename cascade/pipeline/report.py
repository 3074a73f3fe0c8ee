"""The report step: report.json / report.md / report.html from the run's step manifests and artifacts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch

from .. import artifacts as A
from ..eval.report import write_report
from .config import ReportSection
from .histories import training_histories
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
    run_dir = ctx.inputs["data"].parent
    data = build_report_data(run_dir, ctx.config)
    files = write_report(data, ctx.out)
    return StepResult(list(files), {}, "report.html, report.md, report.json written")


def build_report_data(run_dir: Path, report_cfg: ReportSection | None = None) -> dict:
    """Assemble the report's input from a run folder's step manifests and artifacts."""
    run_dir = Path(run_dir)
    steps = ("data", "channels", "teacher", "ranklog", "students", "index", "replay")
    m = {s: A.read_manifest(run_dir / s, verify=False) for s in steps if (run_dir / s / A.MANIFEST).exists()}
    here = ", ".join(x for x in (platform.machine(), platform.processor()) if x)
    report_machine = (f"{here}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"cuda {'yes' if torch.cuda.is_available() else 'no'}")
    out: dict[str, Any] = {"run": {"name": run_dir.name, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "machine": run_machine(m), "report_machine": report_machine,
                                   "config": {s: mm["config"] for s, mm in m.items()},
                                   "versions": next(iter(m.values()))["versions"] if m else {},
                                   "step_wall_s": {s: mm.get("wall_s") for s, mm in m.items()}}}
    if "data" in m:
        out["data"] = A.read_json(run_dir / "data" / "summary.json")
    models = []
    for s in ("teacher", "students"):
        if s in m:  # the manifest's rows hold the measured latencies too (models.json does not)
            models += m[s]["metrics"].get("models") or A.read_json(run_dir / s / "models.json")
    out["models"] = models
    out["training"] = training_histories(run_dir) or None
    if "index" in m:
        variant, first = next(iter(m["index"]["metrics"].items()), (None, None))
        if first:
            shown = run_dir / "index" / variant / A.MANIFEST  # the shown variant's own index, not any glob's first
            im = A.read_json(shown) if shown.exists() else {}
            recall = first.get("recall") or {}
            out["index"] = {"variant": variant, "factory": first["factory"], "backend": first["backend"],
                            "metric": im.get("metric", "ip"), "is_exact": im.get("is_exact"),
                            "n_items": im.get("n_items"), "dim": im.get("embedding_dim"),
                            "recall_vs_exact": recall.get("recall_at_k"), "recall_k": recall.get("k"),
                            "recall_target": (m["index"].get("config") or {}).get("recall_target"),
                            "operating_points": first.get("operating_points", []),
                            "operating_point": _operating_point(first)}
    out["choices"] = choices(run_dir, m)
    if "replay" in m:
        summ = A.read_json(run_dir / "replay" / "summary.json")
        latency = m["replay"]["metrics"].get("latency", {})  # measured times live in the manifest
        out["cascades"] = {v: _cascade_entry({**s, **latency.get(v, {})}) for v, s in summ["variants"].items()}
        n_items = (out.get("data") or {}).get("summary", {}).get("n_items")
        out["outcomes"] = outcome_rows(summ, whole_catalogue_flags(summ, n_items) + gate_flags(out["choices"]))
        out["outcomes"]["n_rand_requests_with_clicks"] = rand_requests_with_clicks(run_dir, summ)
        out["channels"] = summ.get("channels")  # the multi-channel cascade's channels, each alone and in the union
    if report_cfg is not None and report_cfg.ablation:
        out["ablation"] = {**A.read_json(report_cfg.ablation), "source": Path(report_cfg.ablation).name}
    return out


def run_machine(manifests: dict) -> str | None:
    """The machine the run's steps ran on, from their manifests' machine records (CPU model, logical cores, torch
    threads and version); steps on different machines each named; None where no manifest records one."""
    described: dict[str, list[str]] = {}
    for step, mm in manifests.items():
        rec = mm.get("machine")
        if not isinstance(rec, dict) or not rec.get("cpu_model"):
            continue
        threads = (rec.get("threads") or {}).get("torch")
        text = ", ".join(x for x in (
            rec["cpu_model"], rec.get("logical_cores") and f"{rec['logical_cores']} logical cores",
            threads and f"{threads} torch thread{'s' if threads != 1 else ''}",
            (rec.get("versions") or {}).get("torch") and f"torch {rec['versions']['torch']}") if x)
        described.setdefault(text, []).append(step)
    if len(described) <= 1:
        return next(iter(described), None)
    return "; ".join(f"{', '.join(steps)}: {text}" for text, steps in described.items())


def rand_requests_with_clicks(run_dir: Path, summary: dict) -> int | None:
    """How many of the replayed random-exposure requests have a click (the random slice's click metrics are means
    over these), from a cascade's per-request rows and the data step's impressions; None where either is missing."""
    name = next(iter(summary.get("variants") or {}), None)
    rows_path, imp_path = run_dir / "replay" / f"{name}_requests.parquet", run_dir / "data" / "impressions.parquet"
    if name is None or not (rows_path.exists() and imp_path.exists()):
        return None
    rows = pd.read_parquet(rows_path, columns=["request_id", "rank_click_recall"])
    try:
        rand = pd.read_parquet(imp_path, columns=["request_id"], filters=[("is_rand", "==", 1)])
    except (KeyError, ValueError, pa.ArrowInvalid):  # impressions written without an is_rand column
        return None
    with_clicks = rows["rank_click_recall"].notna().to_numpy()  # NaN: a request without clicks
    return int((with_clicks & rows["request_id"].isin(rand["request_id"]).to_numpy()).sum())


STAGE_KEYS_OF = {"retrieval": ("replay.n_retrieve", "N1"), "prerank": ("replay.n_prerank", "N2"),
                 "rank": ("replay.k", "K")}


def whole_catalogue_flags(summary: dict, n_items: int | None) -> list[str]:
    """A warning for each stage whose output keeps the whole catalogue (size >= n_items): its recall is trivially
    1 (the check the pipeline logs before the run)."""
    sizes = next(iter((summary.get("variants") or {}).values()), {}).get("sizes") or {}
    if not n_items:
        return []
    return [f"The {st} stage keeps {STAGE_KEYS_OF[st][1]} = {sizes[st]:,} of the {n_items:,} items, the whole "
            f"catalogue: its recall is trivially 1 (a smaller {STAGE_KEYS_OF[st][0]} makes the stage choose)."
            for st in STAGES if sizes.get(st) is not None and sizes[st] >= n_items]


STAGES = ("retrieval", "prerank", "rank")
STAGE_KEYS = ("click_recall", "hit_rate", "click_ndcg", "teacher_recall", "teacher_ndcg")


def _cascade_entry(s: dict) -> dict:
    """One cascade variant of the replay summary in the report's ``cascades`` layout."""
    q = s["quality"]
    stages = {}
    for st in STAGES:
        lat = s["latency_batch1"][f"{st}_ms"]
        stages[st] = {"size": s["sizes"][st], **{k: q.get(f"{st}_{k}") for k in STAGE_KEYS},
                      **{k: s["stage_auc"].get(st, {}).get(k) for k in ("auc", "gauc", "rand_auc")},
                      "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"]}
    e2e = s["latency_batch1"]["end_to_end_ms"]
    return {"stages": stages,
            "end_to_end": {**{k: e2e[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                           "requests_per_s_batch1": s["latency_batch1"]["requests_per_s"],
                           "requests_per_s_batched": s["latency_batched"]["requests_per_s"],
                           "batch_size": s["latency_batched"]["batch_size"]},
            "oracle": ({k: q[k] for k in ("oracle_clicks", "oracle_best", "oracle_ratio")}
                       if "oracle_ratio" in q else None),
            "recall_curves": s["curves"], "latency_samples_ms": s.get("latency_samples_ms")}


def choices(run_dir: Path, manifests: dict) -> dict:
    """What the run chose on validation, and on what: the seen-item filter, the channels' settings, the teacher's
    exposure weight and collaborative term, the students' distillation scales and the teacher-quality gates."""
    out: dict[str, Any] = {}
    if "data" in manifests:
        out["filter_seen"] = A.read_json(run_dir / "data" / "summary.json")["summary"].get("filter_seen")
    if "channels" in manifests:
        mc = manifests["channels"]["metrics"]
        out["channels"] = {k: v for k, v in mc.items()}
    if "teacher" in manifests:
        out["entire_space"] = manifests["teacher"]["metrics"].get("entire_space")
        out["collaborative"] = manifests["teacher"]["metrics"].get("collaborative")
    if "replay" in manifests:
        out["ranker"] = (manifests["replay"].get("config") or {}).get("ranker")
    if (run_dir / "students" / "selection.json").exists():
        out["students"] = A.read_json(run_dir / "students" / "selection.json")
    return out


def gate_flags(choices: dict) -> list[str]:
    """Headline warnings where the teacher was not better than the ground-truth-only student on validation by more
    than one standard error, each with what the run serves: a positive gain within one SE is "not distinguishable",
    not "not better"."""
    flags = []
    sel = choices.get("students") or {}
    for stage in ("retrieval", "prerank"):
        g = (sel.get(stage) or {}).get("gate")
        if g and not g["teacher_better"]:
            measure = (f"AUC on the {g['impressions']:,} randomly shown validation impressions"
                       if g.get("judged_by") == "random_auc" else f"click-recall@{sel[stage]['size']}")
            verdict, within = (("not distinguishable from", "within ") if g["gain"] > 0 else ("not better than", ""))
            flags.append(f"The teacher is {verdict} the ground-truth-only {stage} student on validation "
                         f"({measure} {g['teacher']:.3f} vs {g['ground_truth_student']:.3f}; "
                         f"gain {g['gain']:+.3f}, {within}one standard error {g['standard_error']:.3f}): validation "
                         "does not show that distilling it helps." + _served_tower(stage, sel[stage]))
    g = (sel.get("rank_student") or {}).get("gate")
    if g and not g["teacher_better"]:
        margin = (f"; gain {g['gain']:+.4f}, one standard error {g['standard_error']:.4f}" if "standard_error" in g
                  else "")
        served = ""
        if choices.get("ranker") == "teacher":
            served = (" The replay ranks with the teacher itself (replay.ranker = teacher): the rank student is not "
                      "served.")
        elif (scale := sel["rank_student"].get("chosen_scale")) is not None:
            served = (f" The replay's rank student is served at distillation scale {scale:g}"
                      + (" (ground truth only)." if scale == 0 else "."))
        flags.append(f"The teacher's validation AUC ({g['teacher_valid_auc']:.4f}) is not above the plain rank "
                     f"student's ({g['plain_student_valid_auc']:.4f}{margin}) by more than one standard error."
                     + served)
    return flags


def _served_tower(stage: str, choice: dict) -> str:
    """Which distillation scale the distilled cascade serves for a tower (the ground_truth cascade's is 0)."""
    scale = choice.get("chosen_scale")
    if scale is None:
        return ""
    if scale == 0:
        return (f" The distilled cascade serves the {stage} student at distillation scale 0 (ground truth only, as "
                "the ground_truth cascade does).")
    return f" The distilled cascade still serves the {stage} student at distillation scale {scale:g}."


def outcome_rows(summary: dict, extra_flags: list[str] | None = None) -> dict:
    """The report's outcome table: one row per cascade variant, reference (the teacher's own ranking of the
    corpus) and baseline, with the end-to-end click metrics at K, the click-recall kept at each stage size, the
    random-slice numbers, oracle clicks, agreement with the teacher and the diversity of the final lists; and the
    flags that a reader must see first (a cascade that loses to most-popular: :func:`below_popular`)."""
    kinds = {"variants": "cascade", "references": "reference", "baselines": "baseline"}
    rows = []
    for group, kind in kinds.items():
        for name, s in (summary.get(group) or {}).items():
            q = s["quality"]
            row = {"name": name, "kind": kind, "k": s["sizes"]["rank"],
                   **{k: q.get(f"rank_{k}") for k in STAGE_KEYS},
                   **{f"{k}_rand": q.get(f"rank_{k}_rand") for k in ("click_recall", "hit_rate")},
                   **{f"{st}_click_recall": q.get(f"{st}_click_recall") for st in ("retrieval", "prerank")},
                   **{f"{st}_size": s["sizes"][st] for st in ("retrieval", "prerank")},
                   **{k: q.get(k) for k in ("oracle_clicks", "oracle_ratio", "expected_click_recall_rand",
                                            "final_distinct", "final_coverage", "final_top_share",
                                            "n_requests", "n_requests_with_clicks", "n_rand_requests")}}
            rows.append(row)
    paired = summary.get("paired") or {}
    return {"rows": rows, "flags": below_popular(rows, paired) + list(extra_flags or []),
            "verdict": verdict(rows, paired), "gaps": gap_rows(rows, paired), "filter_seen": summary.get("filter_seen")}


def verdict(rows: list[dict], paired: dict) -> dict | None:
    """Which list the run's outcomes favour, judged by the outcome the headline leads with (the oracle's share of the
    best possible clicks where the data have an oracle, else the click-recall of the logged test clicks): the best
    cascade, its paired gaps to the best classic baseline and to the next cascade, and, where the oracle judges, the
    list logged click-recall would pick instead. {"judge", "best", "value", "against": [{"other", "role", "value",
    "gap"}], "logged_best", "text"}; None without a cascade scored by that outcome."""
    oracle = any(r.get("oracle_ratio") is not None for r in rows)
    key, metric = ("oracle_ratio", "oracle_ratio") if oracle else ("click_recall", "rank_click_recall")
    scored = [r for r in rows if r.get(key) is not None]
    cascades = sorted((r for r in scored if r["kind"] == "cascade"), key=lambda r: -r[key])
    if not cascades:
        return None
    best, k = cascades[0], cascades[0]["k"]
    what = (f"the oracle's share of the best possible clicks (oracle ratio@{k}: the true click model, which the "
            "logging policy does not bias)" if oracle else f"click-recall@{k} of the held-out clicks")
    fmt = "{:.4f}"
    text = f"Verdict, by {what}: {best['name']} leads the cascades ({fmt.format(best[key])})."
    against = []
    baselines = sorted((r for r in scored if r["kind"] == "baseline"), key=lambda r: -r[key])
    for role, other in (("the best classic baseline", baselines[0] if baselines else None),
                        ("the next cascade", cascades[1] if len(cascades) > 1 else None)):
        gap = paired.get(best["name"], {}).get(other["name"], {}).get(metric) if other else None
        if gap is None:
            continue
        against.append({"other": other["name"], "role": role, "value": other[key], "gap": gap})
        beyond = beyond_two_se(gap)
        text += f" Against {role}, {other['name']} ({fmt.format(other[key])}): "
        if beyond is None:
            text += "too few requests to tell."
        else:
            word = ("ahead" if gap["diff"] > 0 else "behind") if beyond else "a tie on these requests"
            text += (f"{gap['diff']:+.4f} ± {gap['se']:.4f} paired over {gap['n']} requests, {word} "
                     f"({'beyond' if beyond else 'within'} 2 SE).")
    teacher = next((r for r in scored if r["kind"] == "reference" and r["name"] == "teacher_corpus"), None)
    if teacher is not None:
        text += (f" The teacher's own list over the whole corpus scores {fmt.format(teacher[key])}; the cascade "
                 f"minus it: {best[key] - teacher[key]:+.4f}.")
    logged_best = None
    if oracle:
        logged = [r for r in rows if r["kind"] in ("cascade", "baseline") and r.get("click_recall") is not None]
        top = max(logged, key=lambda r: r["click_recall"], default=None)
        if top is not None and top["name"] != best["name"] and best.get("click_recall") is not None:
            logged_best = top["name"]
            text += (f" Logged click-recall@{k} would pick {top['name']} ({top['click_recall']:.4f}; {best['name']} "
                     f"{best['click_recall']:.4f}): the logged clicks follow what the logging policy showed, which "
                     "the oracle does not.")
    return {"judge": metric, "best": best["name"], "value": best[key], "against": against,
            "logged_best": logged_best, "text": text}


def below_popular(rows: list[dict], paired: dict) -> list[str]:
    """A flag for each cascade below a popularity baseline (most-popular, the classic prior most-popular + EASE) on
    the outcome the headline leads with: oracle clicks where the data have an oracle (the world: its logged clicks
    follow the logging policy), else the click-recall of the logged test clicks; with the paired gap."""
    oracle = any(r.get("oracle_clicks") is not None for r in rows)
    key, metric = ("oracle_clicks", "oracle_ratio") if oracle else ("click_recall", "rank_click_recall")
    flags = []
    popular = [r for r in rows if r["kind"] == "baseline" and r["name"].startswith("popular")]
    for r in rows:
        if r["kind"] != "cascade":
            continue
        for p in popular:
            mine, theirs = r.get(key), p.get(key)
            if mine is None or theirs is None or mine >= theirs:
                continue
            gap = paired.get(r["name"], {}).get(p["name"], {}).get(metric)
            if oracle:
                what = f"gets fewer oracle clicks than {p['name']} (oracle clicks@{r['k']} {mine:.3f} < {theirs:.3f}"
                share = "the oracle's share "
            else:
                what = (f"finds fewer of the test clicks than {p['name']} (click-recall@{r['k']} {mine:.4f} < "
                        f"{theirs:.4f}")
                share = ""
            flags.append(f"The {r['name']} cascade {what}" + (f"; {share}{describe_gap(gap)}" if gap else "") + ").")
    return flags


def beyond_two_se(gap: dict) -> bool | None:
    """Whether a paired difference ({"diff", "se", "n"}) is beyond 2 SE of the requests' noise; None when there are
    too few requests to tell."""
    if not gap.get("n") or gap.get("se") is None or gap["se"] != gap["se"]:
        return None
    return bool(abs(gap["diff"]) > 2 * gap["se"])


def describe_gap(gap: dict) -> str:
    """A paired difference in words: its size, SE and whether it is beyond 2 SE of the requests' noise."""
    beyond = beyond_two_se(gap)
    if beyond is None:
        return "too few requests to judge the gap"
    return (f"paired over {gap['n']} requests {gap['diff']:+.4f} ± {gap['se']:.4f} (SE): "
            + ("beyond 2 SE" if beyond else "within 2 SE, not distinguishable on these requests"))


def gap_rows(rows: list[dict], paired: dict) -> list[dict]:
    """Each cascade against ground truth, most-popular and the best other baseline (a multi-channel cascade
    "X+channels" also against X, its two-tower alone), paired on the same requests: one row per (cascade, other
    list, metric) with the mean difference, its SE and the number of requests."""
    baselines = [r for r in rows if r["kind"] == "baseline"]
    out = []
    for metric, key in (("rank_click_recall", "click_recall"), ("oracle_ratio", "oracle_ratio"),
                        ("expected_click_recall_rand", "expected_click_recall_rand")):
        scored = [r for r in baselines if r.get(key) is not None]
        best = max(scored, key=lambda r: r[key])["name"] if scored else None
        popular = [r["name"] for r in scored if r["name"].startswith("popular")]
        for cascade, against in paired.items():
            alone = cascade.split("+")[0] if "+" in cascade else None
            others = dict.fromkeys(o for o in (alone, "ground_truth", *popular, best) if o and o != cascade)
            for other in others:
                gap = against.get(other, {}).get(metric)
                if gap is not None:
                    out.append({"cascade": cascade, "other": other, "metric": metric, **gap,
                                "beyond_2se": beyond_two_se(gap)})
    return out


def _operating_point(index_metrics: dict) -> dict | None:
    """The swept setting the index step chose ({param, value}), from the search parameters its recall was
    measured with; None for an exact index (nothing swept)."""
    points, recall = index_metrics.get("operating_points") or [], index_metrics.get("recall") or {}
    if not points:
        return None
    param = points[0]["param"]
    return {"param": param, "value": recall.get("nprobe" if param == "nprobe" else "ef_search")}
