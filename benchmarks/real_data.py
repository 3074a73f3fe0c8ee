"""Outcomes of the cascade on the world and on real logs, over seeds: does distillation find more of what users click?

    python benchmarks/real_data.py --dataset world --dataset movielens-100k:path/to/ml-100k --seeds 0 1 2
    python benchmarks/real_data.py --dataset custom:path/to/mapping.toml --seeds 0

Each (dataset, seed) is a full run of the dataset's pipeline (world: pipelines/default.toml; MovieLens:
pipelines/movielens.toml; custom / kuairand: pipelines/default.toml with --data) with ``students.keep_fixed`` so the
replay serves three cascades that differ only in their students: ``ground_truth`` (distillation scale 0),
``fixed`` (scale 1: the configured distillation whatever validation says) and ``distilled`` (the scale chosen on
validation outcomes), beside the teacher's own top list over the corpus (the ceiling), the multi-channel cascade and
the channels measured alone (most-popular, item-CF, ALS, ...). The same run is then redone with
``students.confidence`` switched (``--update``: only the students and later steps), to measure confidence-aware
distillation. Rows: those lists; columns: end-to-end click-recall@K / click-NDCG@K / HitRate@K on the held-out test
clicks, what the retrieval and pre-rank stages keep, teacher-recall@K (agreement, a diagnostic), distinct items in
the final lists, and on the world the oracle ratio. Also the rank student's test AUC without and with distillation,
and the scales chosen on validation. Mean +- std over seeds to benchmarks/results/real_data.{json,md}.

``--origins K`` backtests K consecutive test periods per seed (rolling origin): the run as configured, then the same
with ``data.drop_last_days`` = test_days, 2 x test_days, ... (each a full run on the log as it stood that many days
earlier, its own train / valid / test split). A seed's rows are then the request-weighted means over the K test
periods and its paired gaps are pooled over their requests (disjoint sets), so a short test period (ML-100K's last 14
days hold 116 requests with clicks) is judged on K times as many; each period's own numbers are listed too.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from cascade import artifacts as A
from cascade.eval.metrics import pooled_difference
from cascade.pipeline import STEPS, load_config, run_pipeline

CONFIGS = {"world": "pipelines/default.toml", "movielens-100k": "pipelines/movielens.toml",
           "movielens-1m": "pipelines/movielens.toml"}
COLUMNS = ("rank_click_recall", "rank_click_ndcg", "rank_hit_rate", "retrieval_click_recall", "prerank_click_recall",
           "rank_teacher_recall", "final_distinct", "oracle_ratio", "rank_click_recall_rand",
           "expected_click_recall_rand")
CASCADES = ("ground_truth", "fixed", "distilled", "distilled+channels")


def quality_rows(summary: dict) -> dict[str, dict]:
    """Every list of a replay summary by row name -> its quality metrics (the held-out clicks' and agreement)."""
    rows = {v: s["quality"] for v, s in summary["variants"].items()}
    rows.update({f"reference: {r}": s["quality"] for r, s in summary.get("references", {}).items()})
    rows.update({f"baseline: {s['channel']}": s["quality"] for s in summary.get("baselines", {}).values()})
    rows.update({f"one channel: {n}": s["quality"] for n, s in summary.get("channel_cascades", {}).items()})
    return rows


def _settings(summary: dict) -> dict[str, str]:
    """Each baseline channel's setting chosen on validation ("popular (7 days)"), by channel."""
    return {s["channel"]: b for b, s in summary.get("baselines", {}).items()}


def _rank_students(run_dir: Path) -> dict[str, float]:
    """The rank students' test AUC: without distillation and as served (the scale chosen on validation)."""
    models = A.read_manifest(run_dir / "students")["metrics"]["models"]
    out = {}
    for m in models:
        key = "plain" if "no distillation" in m["name"] else "served" if "served" in m["name"] else None
        if key:
            out[key] = m["auc"]
    return out


def _choices(run_dir: Path) -> dict[str, float | None]:
    """The distillation scales chosen on validation, and the popularity prior weight and epochs of each served
    tower."""
    metrics = A.read_manifest(run_dir / "students")["metrics"]
    out = {s: metrics.get(s, {}).get("chosen_scale") for s in ("retrieval", "prerank", "rank_student")}
    for s in ("retrieval", "prerank"):
        row = [g for g in metrics.get(s, {}).get("grid", []) if g.get("scale") == out[s]]
        served = row[0] if row else {}
        t = metrics.get(s, {}).get("temperature") or {}
        if t.get("searched"):  # served at another temperature: its own prior weight and epochs
            served = next(r for r in t["grid"] if r["temperature"] == t["chosen"])
        out[f"{s}_prior"] = served.get("popularity_prior")
        epochs = served.get("epochs") or {}  # runs before the epochs were chosen have none
        out[f"{s}_epochs"] = [epochs["chosen"], epochs["configured"], epochs["trained"]] if "chosen" in epochs else None
    for s in ("retrieval", "prerank", "rank_student"):
        t = metrics.get(s, {}).get("temperature") or {}
        out[f"{s}_temperature"] = t.get("chosen") if t.get("searched") else None
    return out


def _paired(summary: dict) -> dict[str, dict]:
    """The distilled cascade minus every other list on the same requests (diff, SE, n), by row name; and under
    "distilled+channels minus distilled" the multi-channel cascade minus the two-tower alone."""
    shown = {b: f"baseline: {s['channel']}" for b, s in summary.get("baselines", {}).items()}
    shown["teacher_corpus"] = "reference: teacher_corpus"
    paired = summary.get("paired", {})
    out = {shown.get(other, other): gaps for other, gaps in paired.get("distilled", {}).items()}
    if "distilled" in paired.get("distilled+channels", {}):
        out["distilled+channels minus distilled"] = paired["distilled+channels"]["distilled"]
    for n, e in ((summary.get("channels") or {}).get("per_channel") or {}).items():
        if n != "two_tower" and "end_to_end" in e:  # the multi-channel cascade minus one classic channel's
            out[f"distilled+channels minus one channel: {n}"] = e["end_to_end"]["union_minus_it"]
    return out


def measure(run_dir: Path) -> dict:
    """One finished run's rows, paired gaps, rank-student AUCs, chosen scales and teacher test AUC."""
    summary = A.read_json(run_dir / "replay" / "summary.json")
    teacher = A.read_manifest(run_dir / "teacher")["metrics"]
    quality = summary["variants"]["distilled"]["quality"]
    rows = {name: {c: q[c] for c in COLUMNS if c in q} for name, q in quality_rows(summary).items()}
    return {"rows": rows, "rank_student_auc": _rank_students(run_dir), "chosen_scales": _choices(run_dir),
            "baseline_settings": _settings(summary), "paired": _paired(summary),
            "teacher_test_auc": teacher["models"][0]["auc"], "n_requests": quality["n_requests"],
            "n_requests_with_clicks": quality["n_requests_with_clicks"], "test_period": _test_period(run_dir),
            "n_rand_requests": quality.get("n_rand_requests"),
            "k": summary["variants"]["distilled"]["sizes"]["rank"]}


def _test_period(run_dir: Path) -> dict:
    """The run's test period: its first and last request times, test_days and drop_last_days."""
    data = A.read_json(run_dir / "data" / "summary.json")
    days = data["summary"]["split_days"]
    return {"start": data["splits"]["test"]["start"], "end": data["splits"]["test"]["end"],
            "test_days": days["test_days"], "drop_last_days": days.get("drop_last_days", 0)}


CLICK_COLUMNS = ("rank_click_recall", "rank_click_ndcg", "rank_hit_rate", "retrieval_click_recall",
                 "prerank_click_recall")


def pool(periods: list[dict]) -> dict:
    """One seed's measures over disjoint test periods (each :func:`measure`'s dict) as one: every column the mean
    over the periods weighted by their requests (with clicks, for the held-out clicks' columns), paired gaps over
    all the periods' requests (:func:`cascade.eval.metrics.pooled_difference`), AUCs weighted by requests; scales
    and baseline settings those of the first period (the log as given); "periods" keeps each period's measures. A
    row some period lacks is the mean over the periods that have it; a gap some period lacks is left out."""
    if len(periods) == 1:
        return periods[0]
    n = np.array([p["n_requests"] for p in periods], float)
    nc = np.array([p["n_requests_with_clicks"] for p in periods], float)

    def mean(values: list, w: np.ndarray):
        ok = [i for i, v in enumerate(values) if v is not None]
        return float(np.average([values[i] for i in ok], weights=w[ok])) if ok else None

    names = dict.fromkeys(name for p in periods for name in p["rows"])
    rows = {}
    for name in names:
        cols = dict.fromkeys(c for p in periods for c in p["rows"].get(name, {}))
        rows[name] = {c: mean([p["rows"].get(name, {}).get(c) for p in periods], nc if c in CLICK_COLUMNS else n)
                      for c in cols}
    paired = {}
    for other in dict.fromkeys(o for p in periods for o in p["paired"]):
        paired[other] = {}
        for metric in dict.fromkeys(m for p in periods for m in p["paired"].get(other, {})):
            gaps = [p["paired"].get(other, {}).get(metric) for p in periods]
            if any(g is None for g in gaps):
                continue  # a list one period lacks: no pooled gap
            paired[other][metric] = pooled_difference(gaps)
    first = periods[0]
    return {"rows": rows, "paired": paired,
            "rank_student_auc": {k: mean([p["rank_student_auc"].get(k) for p in periods], n)
                                 for k in first["rank_student_auc"]},
            "teacher_test_auc": mean([p["teacher_test_auc"] for p in periods], n),
            "chosen_scales": first["chosen_scales"], "baseline_settings": first["baseline_settings"],
            "n_requests": int(n.sum()), "n_requests_with_clicks": int(nc.sum()), "k": first["k"],
            "n_rand_requests": _total([p.get("n_rand_requests") for p in periods]),
            "wall_s": float(sum(p["wall_s"] for p in periods)), "periods": periods}


def _total(counts: list[int | None]) -> int | None:
    """The sum of per-period counts, None where a period has none (no random slice)."""
    return None if any(c is None for c in counts) else int(sum(counts))


def _config(dataset: str) -> tuple[str, str | None, str]:
    """(pipeline file, --data spec or None, short name) of a --dataset value."""
    source, _, path = dataset.partition(":")
    if source == "world":
        return CONFIGS["world"], None, "world"
    if source not in ("movielens-100k", "movielens-1m", "kuairand", "custom"):
        raise SystemExit(f"--dataset {dataset!r}: use world, movielens-100k:DIR, movielens-1m:DIR, kuairand:DIR or "
                         f"custom:MAPPING.toml")
    if not path:
        raise SystemExit(f"--dataset {dataset!r}: {source} needs a path ({source}:PATH)")
    return CONFIGS.get(source, "pipelines/default.toml"), dataset, source if source != "custom" else Path(path).stem


def _data_args(config: str, spec: str | None) -> tuple[list[str], str | None]:
    """(--set overrides, --data spec) naming the dataset: a pipeline file made for the dataset (MovieLens) keeps
    its [data] table and gets the source and path; any other takes --data (which replaces the table)."""
    if spec is None:
        return [], None
    source, _, path = spec.partition(":")
    if config == CONFIGS.get(source):
        return [f"data.source='{source}'", f"data.path='{Path(path).resolve()}'"], None
    return [], spec


REMEASURED = ("replay", "report")  # what --remeasure redoes; every other finished step is taken as it is


def run_one(dataset: str, seed: int, runs_dir: str, extra: list[str], config: str | None = None,
            confidence_too: bool = True, remeasure: bool = False, drop_days: int = 0) -> dict:
    """Both confidence settings of one (dataset, seed): the run as configured, then --update with it switched.
    config: a pipeline file instead of the dataset's own (e.g. pipelines/tiny.toml for a smoke run). remeasure:
    keep the run's finished models (written by earlier code) and redo only the replay and the report. drop_days:
    the log's last days left out (data.drop_last_days; its own run name)."""
    default_config, spec, name = _config(dataset)
    config = config or default_config
    run_name = f"bench-{name}-seed{seed}" + (f"-drop{drop_days}d" if drop_days else "")
    base = [f"run.seed={seed}", f"run.name='{run_name}'", f"run.runs_dir='{runs_dir}'",
            "students.keep_fixed=true", *([f"data.drop_last_days={drop_days}"] if drop_days else []), *extra]
    out = {}
    for confidence in (False, True) if confidence_too else (False,):
        sets, data_spec = _data_args(config, spec)
        cfg = load_config(config, [*sets, *base, f"students.confidence={'true' if confidence else 'false'}"],
                          data_spec=data_spec)
        t0 = time.perf_counter()
        frozen = tuple(st.name for st in STEPS if st.name not in REMEASURED) if remeasure else ()
        run_pipeline(cfg, progress=False, update=True, frozen=frozen)
        out["confidence" if confidence else "plain"] = {**measure(Path(runs_dir) / cfg.run.name),
                                                        "wall_s": time.perf_counter() - t0}
        print(f"{run_name} confidence={confidence}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def run_origins(dataset: str, seed: int, origins: int, args: argparse.Namespace) -> dict:
    """:func:`run_one` at ``origins`` consecutive test periods (the first as configured, each next one ending
    test_days earlier, test_days as the first run resolved them), pooled per confidence setting (:func:`pool`)."""
    def one(drop: int) -> dict:
        return run_one(dataset, seed, args.runs_dir, args.overrides, args.config, not args.no_confidence,
                       args.remeasure, drop)

    runs = [one(0)]
    step = runs[0]["plain"]["test_period"]["test_days"]
    runs += [one(j * step) for j in range(1, origins)]
    return {setting: pool([r[setting] for r in runs]) for setting in runs[0]}


def _row_key(name: str) -> str:
    """A row's name without the setting a baseline chose on validation ("baseline: popular (7 days)" -> "baseline:
    popular"), so that one channel is one row over seeds whatever each seed chose."""
    return name.split(" (")[0] if name.startswith("baseline: ") else name


def mean_std(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v)}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """mean +- std over seeds of every row and column, the rank-student AUCs and the chosen scales."""
    out = {}
    for setting in [x for x in ("plain", "confidence") if all(x in r for r in per_seed.values())]:
        runs = [{**r[setting], "rows": {_row_key(n): v for n, v in r[setting]["rows"].items()}}
                for r in per_seed.values()]
        rows = sorted({name for r in runs for name in r["rows"]}, key=lambda n: (n not in CASCADES, n))
        out[setting] = {
            "rows": {name: {c: mean_std([r["rows"].get(name, {}).get(c) for r in runs]) for c in COLUMNS
                            if any(c in r["rows"].get(name, {}) for r in runs)} for name in rows},
            "rank_student_auc": {k: mean_std([r["rank_student_auc"].get(k) for r in runs])
                                 for k in ("plain", "served")},
            "chosen_scales": [r["chosen_scales"] for r in runs],
            "teacher_test_auc": mean_std([r["teacher_test_auc"] for r in runs]),
            # paired over seeds: the same world / split / teacher, only the students differ
            "auto_minus_ground_truth": {c: mean_std([r["rows"]["distilled"][c] - r["rows"]["ground_truth"][c]
                                                      for r in runs])
                                        for c in ("rank_click_recall", "oracle_ratio", "rank_click_recall_rand",
                                                  "expected_click_recall_rand")
                                        if all(c in r["rows"]["distilled"] for r in runs)},
            "baseline_settings": [sorted(r["baseline_settings"].values()) if "baseline_settings" in r else
                                  sorted(n[10:] for n in r["rows"] if n.startswith("baseline: "))
                                  for r in (p[setting] for p in per_seed.values())],
            "paired": [r.get("paired", {}) for r in runs],
            "n_requests": [r["n_requests"] for r in runs], "k": runs[0]["k"],
            "n_rand_requests": [r.get("n_rand_requests") for r in runs],
            "periods": [r.get("periods") for r in runs],
            "wall_s": mean_std([r["wall_s"] for r in runs])}
    return out


def cell(s: dict, fmt: str) -> str:
    if s["mean"] is None:
        return "–"
    std = fmt.lstrip("+")
    return f"{s['mean']:{fmt}} ± {s['std']:{std}}" if s["std"] is not None else f"{s['mean']:{fmt}}"


def paired_lines(paired: list[dict], seeds: list[int], rows: dict) -> list[str]:
    """Per seed, the distilled cascade minus ground truth, most-popular and the best baseline on the same test
    requests (mean ± SE over requests): whether a gap is beyond the requests' noise, which the spread over seeds
    (the same test requests every seed) does not show."""
    if not any(paired):
        return []

    def line(label: str, what: str, gaps: list[dict], dec: int = 4) -> str:
        return f"- {label}, {what}: " + "; ".join(
            f"seed {s} {g['diff']:+.{dec}f} ± {g['se']:.{dec}f}" + (" *" if abs(g["diff"]) > 2 * g["se"] else "")
            for s, g in zip(seeds, gaps)) + f" ({gaps[0]['n']} requests)"

    out = []
    for metric, label in (("rank_click_recall", "click-recall@K"), ("oracle_ratio", "oracle ratio"),
                          ("expected_click_recall_rand", "the random slice's expected click-recall@K")):
        dec = 6 if metric.endswith("_rand") else 4
        base = {n: r[metric]["mean"] for n, r in rows.items() if n.startswith("baseline: ") and metric in r
                and r[metric]["mean"] is not None}
        if not base:
            continue
        best = max(base, key=base.get)
        for other in dict.fromkeys(("ground_truth", "baseline: popular", best)):
            gaps = [p.get(other, {}).get(metric) for p in paired]
            if all(g is not None for g in gaps):
                out.append(line(label, f"distilled minus {other}", gaps, dec))
        gaps = [p.get("distilled+channels minus distilled", {}).get(metric) for p in paired]
        if all(g is not None for g in gaps):
            out.append(line(label, "distilled+channels minus distilled (the two-tower alone)", gaps, dec))
        for key in dict.fromkeys(k for p in paired for k in p if k.startswith("distilled+channels minus one")):
            gaps = [p.get(key, {}).get(metric) for p in paired]
            if all(g is not None for g in gaps):
                out.append(line(label, key + " (that channel alone, end to end)", gaps, dec))
    return ["", "paired on the same test requests (mean ± SE over requests; * beyond 2 SE):", *out] if out else []


PERIOD_ROWS = ("distilled", "ground_truth", "baseline: popular", "reference: teacher_corpus")


def period_lines(periods: list, seeds: list[int]) -> list[str]:
    """With --origins: each seed's test periods, their click-recall@K of the distilled and ground-truth cascades,
    most-popular and the teacher's corpus list, and the distilled cascade minus most-popular (mean ± SE over the
    period's requests)."""
    if not any(periods):
        return []
    out = ["", "each test period (seed, the log's last days left out, test requests with clicks; click-recall@K):", "",
           "| seed | days left out | test period | requests | " + " | ".join(PERIOD_ROWS) +
           " | distilled minus popular |", "| ---: | ---: | --- | ---: |" + " ---: |" * (len(PERIOD_ROWS) + 1)]
    for seed, runs in zip(seeds, periods):
        for r in runs or []:
            t = r["test_period"]
            rows = {_row_key(n): v for n, v in r["rows"].items()}
            gap = r["paired"].get("baseline: popular", {}).get("rank_click_recall")
            cells = [f"{rows[n]['rank_click_recall']:.4f}" if n in rows else "–" for n in PERIOD_ROWS]
            out.append(f"| {seed} | {t['drop_last_days']} | {t['start'][:10]} .. {t['end'][:10]} | "
                       f"{r['n_requests_with_clicks']} | " + " | ".join(cells) + " | " +
                       (f"{gap['diff']:+.4f} ± {gap['se']:.4f}" if gap else "–") + " |")
    return out


def markdown(dataset: str, agg: dict, seeds: list[int]) -> str:
    lines = []
    for setting, title in (("plain", "students.confidence = false"), ("confidence", "students.confidence = true")):
        if setting not in agg:
            continue
        a = agg[setting]
        k = a["k"]
        cols = [c for c in COLUMNS if any(c in r for r in a["rows"].values())]
        head = {"rank_click_recall": f"click-recall@{k}", "rank_click_ndcg": f"click-NDCG@{k}",
                "rank_hit_rate": f"HitRate@{k}", "retrieval_click_recall": "click-recall@N1 (retrieval)",
                "prerank_click_recall": "click-recall@N2 (pre-rank)", "rank_teacher_recall": f"teacher-recall@{k}",
                "final_distinct": "distinct items", "oracle_ratio": "oracle ratio",
                "rank_click_recall_rand": f"random slice click-recall@{k}",
                "expected_click_recall_rand": f"random slice expected click-recall@{k}"}
        pooled = any(a.get("periods", []))
        lines += [f"### {dataset}, {title}", "",
                  (f"{len(a['periods'][0])} test periods per seed, pooled (rows: request-weighted means; paired "
                   "gaps: over all their requests); " if pooled else "") +
                  f"requests replayed per seed: {a['n_requests']}; teacher test AUC "
                  f"{cell(a['teacher_test_auc'], '.4f')};"
                  f" rank student test AUC: plain {cell(a['rank_student_auc']['plain'], '.4f')}, distilled (served) "
                  f"{cell(a['rank_student_auc']['served'], '.4f')}; wall per "
                  f"{'seed (all its periods)' if pooled else 'run'} {cell(a['wall_s'], '.0f')} s" +
                  (f"; random-exposure test requests per seed (the random slice's columns): {a['n_rand_requests']}"
                   if any(a.get("n_rand_requests") or []) else ""), "",
                  "| list | " + " | ".join(head[c] for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for name, r in a["rows"].items():
            fmt = {"final_distinct": ",.0f", "expected_click_recall_rand": ".5f"}
            cells = [cell(r[c], fmt.get(c, ".4f")) if c in r else "–" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "distilled (auto) minus ground truth, paired per seed: " + ", ".join(
            f"{c} {cell(v, '+.6f' if c == 'expected_click_recall_rand' else '+.4f')}"
            for c, v in a["auto_minus_ground_truth"].items()),
            "", "baseline settings chosen on validation per seed: " +
            "; ".join(f"seed {s}: {', '.join(b)}" for s, b in zip(seeds, a["baseline_settings"]))]
        lines += paired_lines(a["paired"], seeds, a["rows"])
        lines += period_lines(a.get("periods", []), seeds)
        lines += ["", "scales chosen on validation per seed (retrieval, pre-rank towers; rank student): " +
                  "; ".join(f"seed {s}: {c['retrieval']}, {c['prerank']}; {c['rank_student']}"
                            for s, c in zip(seeds, a["chosen_scales"])), ""]
        if any(c.get(f"{st}_temperature") is not None for c in a["chosen_scales"]
               for st in ("retrieval", "prerank", "rank_student")):
            lines += ["KD temperatures chosen at those scales per seed (retrieval, pre-rank towers; rank student; "
                      "- where none was searched): " +
                      "; ".join(f"seed {s}: " + ", ".join("-" if c.get(f"{st}_temperature") is None
                                                          else f"{c[f'{st}_temperature']:g}"
                                                          for st in ("retrieval", "prerank", "rank_student"))
                                for s, c in zip(seeds, a["chosen_scales"])), ""]
        if any(c.get("retrieval_epochs") is not None for c in a["chosen_scales"]):
            lines += ["epochs of the served towers per seed, served (configured / trained) (retrieval, pre-rank): " +
                      "; ".join(f"seed {s}: " + ", ".join("-" if c.get(f"{st}_epochs") is None else
                                                          "{} ({} / {})".format(*c[f"{st}_epochs"])
                                                          for st in ("retrieval", "prerank"))
                                for s, c in zip(seeds, a["chosen_scales"])), ""]
        if any(c.get("retrieval_prior") is not None for c in a["chosen_scales"]):
            lines += ["popularity prior weights of the served towers per seed (retrieval, pre-rank): " +
                      "; ".join(f"seed {s}: {c['retrieval_prior']}, {c['prerank_prior']}"
                                for s, c in zip(seeds, a["chosen_scales"])), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append",
                   help="world, movielens-100k:DIR, movielens-1m:DIR, kuairand:DIR or custom:MAPPING.toml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    p.add_argument("--config", default=None, help="a pipeline file for every dataset instead of its own")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="real_data", help="results file stem (default real_data)")
    p.add_argument("--no-confidence", action="store_true", help="skip the students.confidence = true runs")
    p.add_argument("--remeasure", action="store_true",
                   help="runs already in --runs-dir keep their models; only the replay and the report are redone")
    p.add_argument("--render", metavar="JSON", help="only aggregate and write the tables again from a results JSON")
    p.add_argument("--origins", type=int, default=1,
                   help="consecutive test periods per seed, each test_days earlier (data.drop_last_days), pooled")
    args = p.parse_args(argv)
    if args.origins < 1:
        p.error(f"--origins must be >= 1, got {args.origins}")
    if args.render:
        out = A.read_json(args.render)
        for r in out["datasets"].values():
            r["mean_std"] = aggregate({int(s): v for s, v in r["per_seed"].items()})
        return _write(out, args)
    results, t0 = {}, time.perf_counter()
    for dataset in args.dataset or []:
        per_seed = {s: run_origins(dataset, s, args.origins, args) for s in args.seeds}
        results[_config(dataset)[2]] = {"per_seed": per_seed, "mean_std": aggregate(per_seed)}
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    out = {"seeds": args.seeds, "overrides": args.overrides, "remeasured": args.remeasure, "origins": args.origins,
           "datasets": results,
           "date": time.strftime("%Y-%m-%d"),
           "machine": machine, "wall_s": time.perf_counter() - t0}
    return _write(out, args)


def _write(out: dict, args: argparse.Namespace) -> int:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    A.write_json(Path(args.out) / f"{args.name}.json", out)
    md = (f"Outcomes on held-out test clicks, seeds {out['seeds']}, mean ± std over seeds; {out['date']}, "
          f"{out['machine']}, "
          f"{out['wall_s'] / 60:.0f} min in all. Overrides: {out['overrides'] or 'none'}."
          + (" Remeasured: the runs' models as trained earlier, the replay and report redone by this code (wall per "
             "run: those two steps)." if out.get("remeasured") else "") + "\n\n" +
          "\n".join(markdown(d, r["mean_std"], out["seeds"]) for d, r in out["datasets"].items()))
    A.write_text(Path(args.out) / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
