"""How to choose the teacher's collaborative term on validation: the best score or the one-SE rule? Offline.

For each finished run, on its validation and test requests with clicks (the judge of cascade.pipeline.judge, seen
items filtered as the run decided), the teacher's own ranking score over the whole corpus (its collaborative term
taken off) plus weight x the request's EASE scores standardised over the corpus
(:mod:`cascade.models.collaborative`), for every (lambda, weight) of the grids: click-recall@K on validation and
test. Then per run the (lambda, weight) each rule takes on validation (the best score, ties to the smaller weight,
as :func:`cascade.train.collaborative.grid_choice`; or the lambda of the best score and the smallest weight within
one SE of the best there, :func:`cascade.eval.selection.one_se_choice`), for the default lambda alone and for the
channels' lambda grid, and its test click-recall@K minus the teacher's own list and minus the run's most-popular,
paired on the same requests and pooled over the runs. Writes <out>/<name>.{json,md}.

    python benchmarks/collaborative_choice.py runs/ml-*/ --out benchmarks/results
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from offline_runs import offline_main

from cascade.arrays import topk_rows
from cascade.channels import load_channels
from cascade.eval.metrics import paired_difference, pooled_difference
from cascade.eval.selection import one_se_choice
from cascade.models.scoring import ranker_scorer
from cascade.pipeline.config import COLLABORATIVE_LAMBDAS, COLLABORATIVE_WEIGHTS, EASE_LAMBDAS
from cascade.pipeline.judge import split_judge
from cascade.run_data import RunData, load_ranker
from cascade.train.collaborative import corpus_scores, grid_choice

WEIGHTS = (0.0, *COLLABORATIVE_WEIGHTS)
LAMBDAS = tuple(sorted({*EASE_LAMBDAS, *COLLABORATIVE_LAMBDAS}))


def one_run(run: Path, k: int) -> dict:
    """Per split: {"popular": [R], "lambda,weight": [R]} per-request click-recall@k (float64 lists)."""
    data = RunData(run / "data")
    teacher = load_ranker(run / "teacher" / "teacher", data.spec)
    teacher.collaborative = None  # the teacher's own ranking score
    score = ranker_scorer(teacher, data)
    popular = load_channels(run / "channels", data.history, ["popular"])["popular"]
    out = {}
    for split in ("valid", "test"):
        judge = split_judge(data, split, 10**9, seed=0)
        req = judge.requests
        ids, base = corpus_scores(score, data, req, judge.seen)
        rec = {"popular": judge.recall(judge.lists(popular, k), k)}
        for lam in LAMBDAS:
            z = data.ease(lam).standardised(req, ids)
            for w in WEIGHTS:
                rec[f"{lam:g},{w:g}"] = judge.recall(topk_rows(base + np.float32(w) * z, ids, k)[0], k)
        out[split] = {key: v.tolist() for key, v in rec.items()}
    return out


def choose(valid: dict, lams: tuple[float, ...], rule: str) -> tuple[float, float]:
    """The (lambda, weight) ``rule`` ("best" | "one_se") takes on the validation recalls ``valid``."""
    mean = {(lam, w): float(np.nanmean(valid[f"{lam:g},{w:g}"])) for lam in lams for w in WEIGHTS}
    lam, w = grid_choice(mean)
    if rule == "one_se":
        n = len(valid["popular"])
        w, _ = one_se_choice(WEIGHTS, lambda w_, u: float(np.nanmean(np.asarray(valid[f"{lam:g},{w_:g}"])[u])), n)
    return lam, w


def summarise(runs: dict) -> dict:
    """For each (lambda grid, rule): the choice per run and the pooled test gains over the teacher and most-popular."""
    out = {}
    for grid_name, lams in (("default lambda", COLLABORATIVE_LAMBDAS), ("channels' lambda grid", EASE_LAMBDAS)):
        for rule in ("best", "one_se"):
            picks, vs_teacher, vs_popular = {}, [], []
            for name, r in runs.items():
                lam, w = choose(r["valid"], lams, rule)
                picks[name] = [lam, w]
                test = {key: np.asarray(v) for key, v in r["test"].items()}
                chosen, own = test[f"{lam:g},{w:g}"], test[f"{lams[0]:g},0"]
                vs_teacher.append(paired_difference(chosen, own))
                vs_popular.append(paired_difference(chosen, test["popular"]))
            out[f"{grid_name}, {rule}"] = {"picks": picks, "minus_teacher": pooled_difference(vs_teacher),
                                           "minus_popular": pooled_difference(vs_popular)}
    teacher = [paired_difference(np.asarray(r["test"][f"{LAMBDAS[0]:g},0"]), np.asarray(r["test"]["popular"]))
               for r in runs.values()]
    out["teacher alone"] = {"minus_popular": pooled_difference(teacher)}
    return out


def markdown(res: dict) -> str:
    k = res["k"]
    lines = [f"The teacher + weight x standardised EASE over the corpus, test click-recall@{k} paired and pooled over "
             f"{len(res['runs'])} runs (mean ± SE over requests, as if the runs' requests were disjoint: runs of one "
             f"period with other seeds share theirs, so the SE is too small); "
             f"{res['date']}, {res['machine']}.", "",
             "| lambda grid, rule | weight 0 chosen in | minus the teacher's own list | minus most-popular |",
             "| --- | ---: | ---: | ---: |"]
    for name, s in res["summary"].items():
        if "picks" not in s:
            continue
        zero = sum(w == 0 for _, w in s["picks"].values())
        t, p = s["minus_teacher"], s["minus_popular"]
        lines.append(f"| {name} | {zero} of {len(s['picks'])} | {t['diff']:+.4f} ± {t['se']:.4f} | "
                     f"{p['diff']:+.4f} ± {p['se']:.4f} |")
    p = res["summary"]["teacher alone"]["minus_popular"]
    lines += ["", f"the teacher's own list minus most-popular: {p['diff']:+.4f} ± {p['se']:.4f}", "",
              "choices per run (lambda, weight):", ""]
    for name, s in res["summary"].items():
        if "picks" in s:
            lines.append(f"- {name}: " + "; ".join(f"{r} ({lam:g}, {w:g})" for r, (lam, w) in s["picks"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return offline_main(__doc__, "collaborative_choice", "finished runs (data, channels, teacher steps)",
                        one_run, summarise, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
