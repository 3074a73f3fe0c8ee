"""Can a ranker learned on validation from the channels' ranks beat the teacher's order of the multi-channel
cascade's candidates? Offline, on finished runs.

For each run, the multi-channel cascade (``load_cascade(RUN, "distilled+channels")``, seen items filtered as the
run decided) ranks its pre-rank candidates, the run's own n_prerank of them, for the validation and test requests
with clicks (the judge of cascade.pipeline.judge). Each candidate gets the features: the ranking score standardised
in its list, its rank there, 1 / (10 + its rank) in each channel's own list of n_retrieve (0 where the channel does
not hold it) and log(1 + the user's logged events before the request). A stacker fitted on the validation lists
(a clicked item is relevant) then orders the test lists: LightGBM lambdarank (small: 4 leaves, 100 trees, >= 100
rows per leaf; medium: 8 leaves, 200 trees, >= 50) and a logistic regression (scikit-learn, C = 1). Their test
click-recall@K (on the world also the oracle ratio: the expected clicks of the top K under the world's click
model over those of its best K) minus the teacher's order is paired on the same requests and pooled over the runs.
Writes <out>/<name>.{json,md}.

    python benchmarks/channel_stacker.py runs/bench-movielens-100k-seed*/ --out benchmarks/results
"""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
from offline_runs import offline_main
from sklearn.linear_model import LogisticRegression

from cascade import artifacts as A
from cascade.arrays import PAD
from cascade.data.world import World
from cascade.eval.metrics import click_recall, paired_difference, pooled_difference
from cascade.pipeline.judge import split_judge
from cascade.serve.cascade import load_cascade, select_unseen

STACKERS = {
    "lambdarank, small": dict(n_estimators=100, learning_rate=0.05, num_leaves=4, min_child_samples=100),
    "lambdarank, medium": dict(n_estimators=200, learning_rate=0.05, num_leaves=8, min_child_samples=50),
}
ORDERS = ("teacher's order", *STACKERS, "logistic")  # the teacher's, then each stacker's


def standardised_in_list(x: np.ndarray) -> np.ndarray:
    """x [B, N] standardised per row over its finite entries; padding (non-finite) -> -10."""
    x = np.where(np.isfinite(x), x, np.nan)
    z = (x - np.nanmean(x, 1, keepdims=True)) / (np.nanstd(x, 1, keepdims=True) + 1e-9)
    return np.nan_to_num(z, nan=-10.0)


def row_positions(x: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The position of each x[b, j] in lists[b] (first occurrence), -1 where the row lacks it or x is padding: int64
    [B, N] for x [B, N] and lists [B, L], one sort over every row's keys (row * id span + id)."""
    if x.size == 0 or lists.size == 0:
        return np.full(x.shape, -1, np.int64)
    lo = min(int(x.min()), int(lists.min()))
    span = max(int(x.max()), int(lists.max())) - lo + 1
    rows = np.arange(len(x), dtype=np.int64)[:, None] * span
    list_keys = (rows + lists - lo).ravel()
    order = np.argsort(list_keys, kind="stable")
    keys = (rows + x - lo).ravel()
    at = np.minimum(np.searchsorted(list_keys[order], keys), list_keys.size - 1)
    pos = np.where(list_keys[order][at] == keys, order[at] % lists.shape[1], -1).reshape(x.shape)
    return np.where(x == PAD, -1, pos)


def channel_rank_feature(candidates: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """1 / (10 + the candidate's position in the row's channel list), 0 where the list lacks it: float64 [B, N]."""
    pos = row_positions(candidates, lists)
    return np.where(pos >= 0, 1.0 / (10 + np.maximum(pos, 0)), 0.0)


def split_lists(data, cascade, split: str, n_retrieve: int, n_prerank: int):
    """(features float64 [R, N, F], relevance int32 [R, N], candidates int64 [R, N], clicked, requests) of a
    split's judged requests, N = n_prerank candidates in the cascade's final order."""
    judge = split_judge(data, split, 10**9, seed=0)
    out = cascade.recommend(judge.requests, n_retrieve, n_prerank, n_prerank)
    cands = out.items
    feats = [standardised_in_list(np.where(cands == PAD, np.nan, out.scores)),
             np.broadcast_to(np.arange(n_prerank) / n_prerank, cands.shape)]
    feats += [channel_rank_feature(cands, select_unseen(ch, judge.requests, n_retrieve, judge.seen)[0])
              for ch in cascade.retriever.channels]
    lo, hi = data.history.before(judge.requests.user_id, judge.requests.time_ms)
    feats.append(np.broadcast_to(np.log1p(hi - lo)[:, None], cands.shape))
    clicked = np.asarray(judge.clicked)
    rel = (row_positions(cands, clicked) >= 0).astype(np.int32)
    return np.stack(feats, -1), rel, cands, clicked, judge.requests


def one_run(run: Path, k: int) -> dict:
    """Per order (the teacher's, each stacker's): test click-recall@k and, on the world, oracle ratio (expected
    clicks of the top k under the world's click model / those of its best k), as :func:`run_summary`; the splits'
    sizes."""
    cfg = A.read_json(run / "replay" / "manifest.json")["config"]
    data, cascade = load_cascade(run, "distilled+channels")
    xv, yv, _, _, _ = split_lists(data, cascade, "valid", cfg["n_retrieve"], cfg["n_prerank"])
    xt, _, ct, clicked, req = split_lists(data, cascade, "test", cfg["n_retrieve"], cfg["n_prerank"])
    xv, yv = xv[yv.sum(1) > 0], yv[yv.sum(1) > 0]
    f = xv.shape[-1]
    scores = {"teacher's order": np.zeros(ct.shape)}
    for name, params in STACKERS.items():
        m = lgb.LGBMRanker(objective="lambdarank", verbose=-1, random_state=0, **params)
        m.fit(xv.reshape(-1, f), yv.reshape(-1), group=[xv.shape[1]] * len(xv))
        scores[name] = m.predict(xt.reshape(-1, f)).reshape(ct.shape)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(xv.reshape(-1, f), yv.reshape(-1))
    scores["logistic"] = lr.decision_function(xt.reshape(-1, f)).reshape(ct.shape)
    tops = {name: np.take_along_axis(ct, np.argsort(-s, 1, kind="stable")[:, :k], 1) for name, s in scores.items()}
    per_request = {"click_recall": {name: click_recall(clicked, top) for name, top in tops.items()}}
    world_dir = run / "data" / "world"
    if (world_dir / "world.json").exists():
        world = World.load(world_dir)
        hour, tab = req.context["hour"], req.context["tab"]
        best = world.oracle_topk(req.user_id, hour, tab, k)[1].sum(axis=1)

        def expected_clicks(top: np.ndarray) -> np.ndarray:
            ok = (top != PAD).ravel()
            p = np.zeros(top.size)
            p[ok] = world.true_click_prob(np.repeat(req.user_id, k)[ok], top.ravel()[ok], np.repeat(hour, k)[ok],
                                          np.repeat(tab, k)[ok])
            return p.reshape(top.shape).sum(axis=1)

        per_request["oracle_ratio"] = {name: expected_clicks(top) / best for name, top in tops.items()}
    return {"valid_requests": int(len(xv)), "test_requests": int(len(ct)), **run_summary(per_request)}


def run_summary(per_request: dict) -> dict:
    """metric -> order -> {"mean", "n" (requests it is finite on), "minus_teacher": the paired gap} of one run's
    per-request values (metric -> order -> float64 [R])."""
    return {metric: {name: {"mean": float(np.nanmean(v)), "n": int(np.isfinite(v).sum()),
                            "minus_teacher": paired_difference(v, by_order["teacher's order"])}
                     for name, v in by_order.items()}
            for metric, by_order in per_request.items()}


def summarise(runs: dict) -> dict:
    """Per metric and order: its mean over the runs' test requests and its gap to the teacher's order, paired per
    run (:func:`run_summary`) and pooled."""
    out = {}
    for metric in ("click_recall", "oracle_ratio"):
        have = [r[metric] for r in runs.values() if metric in r]
        if not have:
            continue
        out[metric] = {name: {"mean": sum(h[name]["mean"] * h[name]["n"] for h in have) / sum(h[name]["n"]
                                                                                        for h in have),
                              "minus_teacher": pooled_difference([h[name]["minus_teacher"] for h in have])}
                       for name in have[0]}
    return out


def markdown(res: dict) -> str:
    k, runs = res["k"], res["runs"]
    valid = [r["valid_requests"] for r in runs.values()]
    lines = [f"Stackers fitted on validation over the multi-channel cascade's candidates, on the test requests with "
             f"clicks of {len(runs)} runs ({min(valid)}-{max(valid)} validation requests with clicks each); minus "
             "the teacher's order paired and pooled over the runs (mean ± SE over requests, as if the runs' requests "
             "were disjoint: runs of one period with other seeds share theirs, so the SE is too small); "
             f"{res['date']}, {res['machine']}.", ""]
    for metric, by_order in res["summary"].items():
        label = {"click_recall": f"click-recall@{k}", "oracle_ratio": f"oracle ratio@{k}"}[metric]
        lines += [f"| order | {label} | minus the teacher's order |", "| --- | ---: | ---: |"]
        for name in ORDERS:  # a JSON read back holds them sorted by name
            s, g = by_order[name], by_order[name]["minus_teacher"]
            lines.append(f"| {name} | {s['mean']:.4f} | {g['diff']:+.4f} ± {g['se']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return offline_main(__doc__, "channel_stacker", "finished runs with the classic channels (a replay step)",
                        one_run, summarise, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
