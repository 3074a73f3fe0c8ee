"""The teacher step: the ranking teacher (early-stopped on valid AUC) and the LightGBM baseline.

With ``teacher.entire_space`` on (the default), the teacher is an entire-space ranker: a click model and an
exposure model trained on the impressions plus sampled unshown items, the exposure weight of its corpus-wide
ranking chosen by validation click-recall over the whole corpus (cascade/train/entire_space.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..channels.classic import EASE_MAX_ITEMS
from ..models.entire_space import EntireSpaceRanker, exposure_config
from ..models.gbdt import GBDTRanker
from ..models.ranker import Ranker
from ..run_data import RunData, drop_ease_fits
from ..train.collaborative import choose_collaborative
from ..train.entire_space import (
    MIN_SLICE_REQUESTS,
    choose_exposure_weight,
    choose_exposure_weight_by_random_auc,
    entire_space_loss,
    entire_space_table,
    has_random_slice,
    random_slice,
)
from ..train.loop import evaluate, fit, score_metrics
from .common import model_row, save_ranker, seeded, with_seed, without_timings
from .config import TeacherSection
from .judge import validation_judge
from .runner import StepContext, StepResult


def exposure_judge(setting: str, valid: pd.DataFrame) -> str:
    """What judges the exposure weight ("clicks" | "random_auc") for ``teacher.entire_space.judge = setting`` on the
    validation impressions ``valid``: "auto" takes the random slice where it has both labels; "random_auc" on data
    without one is a ValueError."""
    if setting == "random_auc":
        random_slice(valid, 'teacher.entire_space.judge = "random_auc"')
    if setting == "auto":
        return "random_auc" if has_random_slice(valid) else "clicks"
    return setting


def collaborative_off(c: TeacherSection, n_items: int) -> str | None:
    """Why the teacher has no collaborative term (``teacher.collaborative``), None where it is chosen; "on" for a
    catalogue above EASE's size raises."""
    if c.collaborative == "off":
        return "teacher.collaborative = \"off\""
    if n_items <= EASE_MAX_ITEMS:
        return None
    if c.collaborative == "on":
        raise ValueError(f"teacher.collaborative = \"on\", but the catalogue has {n_items:,} items and the EASE fit "
                         f"takes at most {EASE_MAX_ITEMS:,} (a dense items x items inverse): set it to \"auto\" or "
                         f"\"off\"")
    return f"teacher.collaborative = \"auto\": {n_items:,} items > {EASE_MAX_ITEMS:,} (EASE's dense fit)"


def collaborative_term(c: TeacherSection, model, data: RunData, by: str, seed: int, off: str | None) -> dict:
    """Choose the teacher's collaborative term (``teacher.collaborative``; train/collaborative.py) by the exposure
    weight's judge ``by`` ("random_auc" or logged clicks; for a plain teacher the random slice where the validation
    split has one), set it on ``model``, unless ``off`` (:func:`collaborative_off`) says why not; what the manifest
    records: {"setting", "chosen": {"lam", "weight", ...} | None, "grid", "judge"[, "prior_alone": {"window_days",
    "lam", "ease_weight", "refresh_ms"} (the classic prior alone chosen), "popular_prior" (why none was searched)]} or
    {"setting", "off": why}."""
    model.collaborative = None
    if off:
        return {"setting": c.collaborative, "off": off}
    es = c.entire_space
    judge = None if by == "random_auc" else validation_judge(data, es.select_requests, seed)
    term, grid = choose_collaborative(model, data, c.collaborative_lambdas, c.collaborative_weights, judge,
                                      es.select_k, seed, popular_days=c.collaborative_popular_days,
                                      refresh_ms=int(round(c.collaborative_refresh_minutes * 60_000)))
    out = {"setting": c.collaborative, "chosen": None if term is None else dataclasses.asdict(term), "grid": grid,
           "judge": "AUC on the validation split's random-exposure impressions" if judge is None else judge.what}
    beside = [g for g in grid if g.get("part") == "beside the teacher"]
    if beside:  # the prior alone that was chosen (the replay's baseline "popular + EASE")
        out["prior_alone"] = {"window_days": beside[0]["popular_days"], "lam": beside[0]["prior_lambda"],
                              "ease_weight": beside[0]["prior_ease_weight"],
                              "refresh_ms": int(round(c.collaborative_refresh_minutes * 60_000))}
    # the later steps of the process read the chosen ones, and the replay the prior alone's
    keep = set() if term is None else {term.lam, term.popular_lam}
    if "prior_alone" in out:
        keep.add(out["prior_alone"]["lam"])
    drop_ease_fits(keep=tuple(keep - {None}))
    if not c.collaborative_popular_days:
        out["popular_prior"] = "not searched: teacher.collaborative_popular_days is empty"
    return out


def run(ctx: StepContext) -> StepResult:
    c: TeacherSection = ctx.config
    data = RunData(ctx.inputs["data"])
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    seeded(ctx.seed)
    tcfg = with_seed(dataclasses.replace(c.train, progress=ctx.progress), ctx.seed)
    es = c.entire_space
    metrics = {}
    # before any training: data without a random slice is refused for judge = "random_auc"
    judge_by = exposure_judge(es.judge, data.split_impressions("valid")) if es.enabled else None
    no_term = collaborative_off(c, len(data.item_ids))  # "on" for a catalogue EASE cannot fit: refused before training
    term_judge = judge_by or exposure_judge("auto", data.split_impressions("valid"))  # the collaborative term's
    if es.enabled:
        columns = train.spec.cat_names + train.spec.num_names
        unknown = [n for n in es.exposure_exclude if n not in columns]
        if unknown:
            raise ValueError(f"teacher.entire_space.exposure_exclude names {unknown}, which the data step's features "
                             f"do not have; they are {list(columns)}")
        model = EntireSpaceRanker(train.spec, c.ranker, seed=ctx.seed,
                                  exposure_cfg=exposure_config(c.ranker, es.exposure_exclude, train.spec))
        rng = np.random.default_rng(ctx.seed)
        table = entire_space_table(data, "train", es.unshown_per_shown, es.popularity_share, rng)
        res = fit(model, table, valid, tcfg, loss_fn=entire_space_loss(es.w_exposure), label="teacher")
        model.cpu()  # trained on run.device; the corpus scoring below and every later step read it on the CPU
        if judge_by == "random_auc":
            choice, grid = choose_exposure_weight_by_random_auc(model, data, es.exposure_weights, ctx.seed)
            what = "AUC on the validation split's random-exposure impressions"
        else:
            judge = validation_judge(data, es.select_requests, ctx.seed)
            choice, grid = choose_exposure_weight(model, data, judge.requests, judge.clicked, es.exposure_weights,
                                                  es.select_k, judge.seen, seed=ctx.seed,
                                                  workers=torch.get_num_threads())
            what = judge.what
        if es.judge == "auto":
            what = (f"auto: {what}" + ("" if judge_by == "random_auc" else
                                       " (the validation split has no random-exposure impressions with both labels "
                                       f"from at least {MIN_SLICE_REQUESTS} requests)"))
        metrics["entire_space"] = {"exposure_weight": choice, "grid": grid, "judge": what, "judged_by": judge_by,
                                   "train_rows": {"shown": int(len(train)), "unshown": int(len(table) - len(train))}}
        del table  # the impressions and sampled items: freed before the collaborative term's EASE fit
        name = f"teacher ({c.ranker.backbone}, entire space: exposure weight {choice:g})"
    else:
        model = Ranker(train.spec, c.ranker)
        res = fit(model, train, valid, tcfg, label="teacher")
        name = f"teacher ({c.ranker.backbone})"
    model.cpu().eval()  # trained on run.device; the corpus scoring below and every later step read it on the CPU
    metrics["collaborative"] = collaborative_term(c, model, data, term_judge, ctx.seed, no_term)
    term = metrics["collaborative"].get("chosen")
    if term:
        popular = (f" + {term['popular_weight']:.3g} x popularity ({term['popular_days']:g} days)"
                   f" + {term['popular_ease_weight']:.3g} x EASE (lambda {term['popular_lam']:g})"
                   if term["popular_weight"] else "")
        name = name[:-1] + f", collaborative term {term['weight']:.3g} x EASE (lambda {term['lam']:g}){popular})"
    metrics["autocast"] = res.autocast  # manifest only (its probed speed-up varies from run to run)
    metrics["train_throughput"] = res.throughput()  # measured: the manifest's metrics, never summary.json
    metrics["train_batch_size"] = res.batch_size  # batch_size, or less where min_steps_per_epoch shrank it
    outputs = save_ranker(model, c.ranker, ctx.out / "teacher")
    A.write_json(ctx.out / "history.json", res.history)  # per evaluation: train loss terms, valid metrics
    outputs.append("history.json")
    rows = [model_row(name, "teacher", model, evaluate(model, test), train.spec)]
    if c.lightgbm:
        gb_train = train if c.lightgbm_max_rows is None else train.take(slice(max(0, len(train) - c.lightgbm_max_rows),
                                                                              None))
        gb = GBDTRanker(objective="binary", n_estimators=c.lightgbm_trees, seed=ctx.seed, num_threads=2,
                        progress=ctx.progress).fit(gb_train, valid)
        m = score_metrics(test.label, gb.predict(test.cat, test.num), test.user_id, test.is_rand)
        rows.append({"name": f"LightGBM (binary, {len(gb_train):,} most recent train rows)", "role": "baseline", **m})
        A.write_text(ctx.out / "lightgbm.txt", gb.booster_.model_to_string())
        outputs.append("lightgbm.txt")
    A.write_json(ctx.out / "models.json", without_timings(rows))  # the latencies: in the manifest
    outputs.append("models.json")
    return StepResult(outputs, {"models": rows, "best_valid_auc": res.best_valid_auc, **metrics},
                      f"teacher test AUC {rows[0].get('auc', float('nan')):.4f}")
