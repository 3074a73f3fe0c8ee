"""How much do a run's test clicks reward anything beyond trailing popularity? Offline, on finished runs.

On ML-100K every cascade variant ends at most-popular's click-recall (BENCHMARKS.md, "Outcomes"). This measures
what the data would give a list that knows more than popularity, on the run's own validation and test requests
with clicks (the judge of cascade.pipeline.judge, seen items filtered as the run decided):

- most-popular of a trailing window of 1, 7 or 30 days, counting clicks (the popular channel) or every logged
  impression (on MovieLens: every rating, liked or not);
- the split's own most-clicked items, counted over the very requests judged (hindsight: no list that anything could
  serve; it ranks by clicks, not by each request's share of them, so it comes near, not exactly to, the best list
  that is the same for all users: what lies well above it must be personal);
- the run's most-popular re-ranked with its item-CF channel: score = log(1 + clicks in the window) + b x the
  request's item-CF score / its largest, over the popular list's top 200, b from a grid, chosen on validation
  click-recall@K (b = 0 is the popular list itself).

- EASE (Steck, "Embarrassingly Shallow Autoencoders", 2019: item-item weights in closed form from the train
  period's clicks, lambda from a grid) alone, over the user's every click before the request, and the run's
  most-popular blended with it over the whole corpus: score = log(1 + clicks in the window) + b x the request's
  EASE scores standardised over the corpus, (lambda, b) chosen on validation click-recall@K; and the same with the
  run's teacher's ranking score in place of the popularity term (b = 0: the teacher's own list over the corpus,
  what every cascade of the run ends at), b chosen on validation at the lambda the first blend chose. Runs with
  more than ``EASE_MAX_ITEMS`` items leave EASE out (the channel's dense items x items weights).

For each list: click-recall@K on validation and test (mean and SE over requests), and for each chosen blend its
test gain over most-popular paired on the same requests. Writes <out>/popularity_headroom.{json,md}.

    python benchmarks/popularity_headroom.py runs/ml-14d runs/ml-28d --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from cascade import artifacts as A
from cascade.arrays import PAD, topk_rows
from cascade.channels import EaseChannel, PopularChannel, load_channels
from cascade.channels.classic import EASE_MAX_ITEMS
from cascade.data.history import EventHistory
from cascade.data.ids import IdIndex
from cascade.data.requests import request_start_ms
from cascade.eval.metrics import paired_difference
from cascade.machine import machine_record
from cascade.models.scoring import ranker_scorer
from cascade.pipeline.judge import Judge, split_judge
from cascade.run_data import RunData, load_ranker

WINDOWS = (1.0, 7.0, 30.0)
EASE_LAMBDAS = (50.0, 200.0, 800.0)
BLEND = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
POOL = 200  # the popular items the blend re-ranks


class Blend:
    """The popular list's top POOL re-ranked by log(1 + count) + b x item-CF score / the request's largest."""

    def __init__(self, popular, itemcf, b: float) -> None:
        self.popular, self.itemcf, self.b = popular, itemcf, b

    def select(self, requests, candidates, n: int):
        ids, counts = self.popular.select(requests, None, max(n, POOL))
        score = np.where(ids == PAD, -np.inf, np.log1p(np.where(np.isfinite(counts), counts, 0.0)))
        if self.b:
            score += self.b * self._itemcf_share(requests, ids)
        return topk_rows(score.astype(np.float32), ids, n)

    def _itemcf_share(self, requests, ids: np.ndarray) -> np.ndarray:
        """float64 [B, N]: each listed item's item-CF score for its request over the request's largest (0 where
        item-CF does not propose it), looked up by one sorted (request, item) key."""
        cf_ids, cf = self.itemcf.select(requests, None, 1000)
        cf = np.where(cf_ids == PAD, 0.0, cf)
        cf /= np.maximum(cf.max(axis=1, keepdims=True), 1e-12)
        codes = np.unique(np.concatenate([ids.ravel(), cf_ids.ravel()]), return_inverse=True)[1]
        stride = np.arange(len(ids))[:, None] * (int(codes.max()) + 1)
        want = (stride + codes[: ids.size].reshape(ids.shape)).ravel()
        have = (stride + codes[ids.size:].reshape(cf_ids.shape)).ravel()
        order = np.argsort(have)
        pos = np.minimum(np.searchsorted(have[order], want), len(order) - 1)
        found = (have[order][pos] == want) & (ids.ravel() != PAD)
        return np.where(found, cf.ravel()[order][pos], 0.0).reshape(ids.shape)


class Hindsight:
    """One list for every request: the items most clicked in ``impressions`` (the split judged), ties by item id."""

    def __init__(self, impressions) -> None:
        clicks = impressions[impressions["click"] > 0].groupby("item_id").size()
        order = np.lexsort((clicks.index.to_numpy(), -clicks.to_numpy()))
        self.ids = clicks.index.to_numpy(np.int64)[order]
        self.counts = clicks.to_numpy(np.float32)[order]

    def select(self, requests, candidates, n: int):
        ids = np.full(n, PAD, np.int64)
        counts = np.full(n, -np.inf, np.float32)
        m = min(n, len(self.ids))
        ids[:m], counts[:m] = self.ids[:m], self.counts[:m]
        return np.tile(ids, (len(requests), 1)), np.tile(counts, (len(requests), 1))


def standardised(ease: EaseChannel, requests) -> np.ndarray:
    """float64 [R, I]: each request's EASE scores (:class:`cascade.channels.EaseChannel`) standardised over the
    corpus (the channel's ``item_ids_`` order)."""
    ids = np.broadcast_to(ease.item_ids_, (len(requests), len(ease.item_ids_)))
    return ease.standardised(requests, ids).astype(np.float64)


class TeacherEase:
    """Over the whole corpus: the run's teacher's ranking score (what its cascade ends at) + b x the request's EASE
    scores standardised over the corpus (b = 0: the teacher's own list over the corpus)."""

    def __init__(self, score, ease: EaseChannel, b: float) -> None:
        self.score, self.ease, self.b = score, ease, b

    def select(self, requests, candidates, n: int):
        ids = np.broadcast_to(self.ease.item_ids_, (len(requests), len(self.ease.item_ids_)))
        score = self.score(requests, np.ascontiguousarray(ids)).astype(np.float64)
        if self.b:
            score += self.b * standardised(self.ease, requests)
        return topk_rows(score, ids, n)


class PopularEase:
    """Over the whole corpus: log(1 + the popular channel's window clicks) + b x the request's EASE scores
    standardised over the corpus (b = 0: most-popular's order, ties to the lower id)."""

    def __init__(self, popular, ease: EaseChannel, b: float) -> None:
        self.popular, self.ease, self.b = popular, ease, b
        self.items = IdIndex(ease.item_ids_, "item_id", "EASE")

    def select(self, requests, candidates, n: int):
        ids = self.ease.item_ids_
        score = np.zeros((len(requests), len(ids)))
        period = requests.time_ms // self.popular.refresh_ms * self.popular.refresh_ms
        for s in np.unique(period):
            clicked, counts = self.popular.ranked(int(s))
            rows, found = self.items.find(clicked)
            score[np.ix_(period == s, rows[found])] = np.log1p(counts[found])
        if self.b:
            score += self.b * standardised(self.ease, requests)
        return topk_rows(score, np.broadcast_to(ids, score.shape), n)


def recall(judge: Judge, stage, k: int) -> np.ndarray:
    return judge.recall(judge.lists(stage, k), k)


def summary(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(len(x))), "n": int(len(x))}


def measure(run: Path, k: int) -> dict:
    data = RunData(run / "data")
    judges = {split: split_judge(data, split, 10**9, seed=0) for split in ("valid", "test")}
    chosen = load_channels(run / "channels", data.history, ["popular", "itemcf"])
    refresh = chosen["popular"].refresh_ms
    imp = data.impressions
    shown = EventHistory(imp["user_id"].to_numpy(), imp["item_id"].to_numpy(), request_start_ms(imp))
    lists = {}
    for w in WINDOWS:
        lists[f"most-popular, clicks, {w:g} days"] = PopularChannel(data.history, w, refresh)
        lists[f"most-popular, every impression, {w:g} days"] = PopularChannel(shown, w, refresh)
    per = {name: {s: recall(j, stage, k) for s, j in judges.items()} for name, stage in lists.items()}
    hindsight = "the split's own most-clicked (hindsight)"
    per[hindsight] = {s: recall(j, Hindsight(data.split_impressions(s)), k) for s, j in judges.items()}
    blend = {b: {s: recall(j, Blend(chosen["popular"], chosen["itemcf"], b), k) for s, j in judges.items()}
             for b in BLEND}
    best = max(BLEND, key=lambda b: (np.nanmean(blend[b]["valid"]), -b))
    base = blend[0.0]["test"]
    out = {"run": run.name, "popular": chosen["popular"].params(), "judges": {s: j.what for s, j in judges.items()},
           "lists": {name: {s: summary(v) for s, v in r.items()} for name, r in per.items()},
           "blend": {str(b): {s: summary(v) for s, v in r.items()} for b, r in blend.items()},
           "blend_chosen_on_valid": best,
           "blend_minus_popular_test": paired_difference(blend[best]["test"], base)}
    if len(data.item_ids) > EASE_MAX_ITEMS:
        out["ease"] = f"left out: {len(data.item_ids):,} items > {EASE_MAX_ITEMS:,}"
        return out
    train = data.split_history("train")
    ease = {}
    for lam in EASE_LAMBDAS:
        model = EaseChannel(data.history, lam).fit(train, data.item_ids)
        ease[f"EASE, lambda {lam:g}"] = {s: recall(j, model, k) for s, j in judges.items()}
        for b in BLEND[1:]:
            ease[f"its most-popular + {b:g} x EASE (lambda {lam:g})"] = {
                s: recall(j, PopularEase(chosen["popular"], model, b), k) for s, j in judges.items()}
    blends = [name for name in ease if name.startswith("its most-popular")]
    pick = max(blends, key=lambda name: np.nanmean(ease[name]["valid"]))
    # the teacher's own corpus list, and it + b x EASE at the lambda the popular blend chose
    lam = float(pick.rsplit("lambda ", 1)[1].rstrip(")"))
    model = EaseChannel(data.history, lam).fit(train, data.item_ids)
    score = ranker_scorer(load_ranker(run / "teacher" / "teacher", data.spec), data)
    for b in BLEND:
        ease[f"its teacher + {b:g} x EASE (lambda {lam:g})"] = {
            s: recall(j, TeacherEase(score, model, b), k) for s, j in judges.items()}
    teacher = [name for name in ease if name.startswith("its teacher")]
    pick_t = max(teacher, key=lambda name: np.nanmean(ease[name]["valid"]))
    out.update(teacher_ease_chosen_on_valid=pick_t,
               teacher_ease_minus_popular_test=paired_difference(ease[pick_t]["test"], base),
               teacher_minus_popular_test=paired_difference(ease[teacher[0]]["test"], base))
    out.update(ease={name: {s: summary(v) for s, v in r.items()} for name, r in ease.items()},
               ease_blend_chosen_on_valid=pick, ease_blend_minus_popular_test=paired_difference(ease[pick]["test"],
                                                                                                   base))
    return out


def markdown(res: dict) -> str:
    k = res["k"]
    lines = [f"Trailing popularity and what lies beyond it, click-recall@{k} (mean ± SE over requests); "
             f"{res['date']}, {res['machine']}.", ""]
    for r in res["runs"]:
        lines += [f"### {r['run']} (the run's popular channel: {r['popular']})", "",
                  f"validation: {r['judges']['valid']}; test: {r['judges']['test']}", "",
                  "| list | validation | test |", "| --- | ---: | ---: |"]
        rows = [(name, v) for name, v in r["lists"].items()]
        rows += [(f"its most-popular + {b} x item-CF" + (" (chosen on validation)"
                                                          if float(b) == r["blend_chosen_on_valid"] else ""), v)
                 for b, v in r["blend"].items()]
        for name, v in rows:
            lines.append(f"| {name} | {v['valid']['mean']:.4f} ± {v['valid']['se']:.4f} | "
                         f"{v['test']['mean']:.4f} ± {v['test']['se']:.4f} |")
        if isinstance(r.get("ease"), dict):
            for name, v in r["ease"].items():
                picks = (r["ease_blend_chosen_on_valid"], r["teacher_ease_chosen_on_valid"])
                chosen = " (chosen on validation)" if name in picks else ""
                lines.append(f"| {name}{chosen} | {v['valid']['mean']:.4f} ± {v['valid']['se']:.4f} | "
                             f"{v['test']['mean']:.4f} ± {v['test']['se']:.4f} |")
        d = r["blend_minus_popular_test"]
        lines += ["", f"chosen blend minus the run's most-popular on test, paired: {d['diff']:+.4f} ± {d['se']:.4f} "
                      f"({d['n']} requests)"]
        if isinstance(r.get("ease"), dict):
            d = r["ease_blend_minus_popular_test"]
            lines.append(f"chosen EASE blend minus the run's most-popular on test, paired: {d['diff']:+.4f} ± "
                         f"{d['se']:.4f} ({d['n']} requests)")
            for key, what in (("teacher_minus_popular_test", "the teacher's corpus list"),
                              ("teacher_ease_minus_popular_test", f"{r['teacher_ease_chosen_on_valid']} (chosen on "
                                                                  f"validation)")):
                d = r[key]
                lines.append(f"{what} minus the run's most-popular on test, paired: {d['diff']:+.4f} ± "
                             f"{d['se']:.4f} ({d['n']} requests)")
        elif "ease" in r:
            lines.append(f"EASE {r['ease']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished runs (their data, channels steps)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d"), "k": args.k, "machine": f"{os.cpu_count()} CPUs",
           "cpu": machine_record(), "runs": [measure(run, args.k) for run in args.runs]}
    res["wall_s"] = time.perf_counter() - t0
    A.write_json(args.out / "popularity_headroom.json", res)
    A.write_text(args.out / "popularity_headroom.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
