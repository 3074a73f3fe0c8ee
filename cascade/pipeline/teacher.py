"""The teacher step: the ranking teacher (early-stopped on valid AUC) and the LightGBM baseline."""

from __future__ import annotations

import dataclasses

from .. import artifacts as A
from ..models.gbdt import GBDTRanker
from ..models.ranker import Ranker
from ..run_data import RunData
from ..train.loop import evaluate, fit, score_metrics
from .common import model_row, save_ranker, seeded, with_seed
from .config import TeacherSection
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
    c: TeacherSection = ctx.config
    data = RunData(ctx.inputs["data"])
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    seeded(ctx.seed)
    model = Ranker(train.spec, c.model)
    res = fit(model, train, valid, with_seed(dataclasses.replace(c.train, progress=ctx.progress), ctx.seed),
              label="teacher")
    model.eval()
    outputs = save_ranker(model, c.model, ctx.out / "teacher")
    A.write_json(ctx.out / "history.json", res.history)  # per evaluation: train loss terms, valid metrics
    outputs.append("history.json")
    rows = [model_row(f"teacher ({c.model.backbone})", "teacher", model, evaluate(model, test), train.spec)]
    if c.lightgbm:
        gb_train = train if c.lightgbm_max_rows is None else train.take(slice(max(0, len(train) - c.lightgbm_max_rows),
                                                                              None))
        gb = GBDTRanker(objective="binary", n_estimators=c.lightgbm_trees, seed=ctx.seed, num_threads=2,
                        progress=ctx.progress).fit(gb_train, valid)
        m = score_metrics(test.label, gb.predict(test.cat, test.num), test.user_id, test.is_rand)
        rows.append({"name": f"LightGBM (binary, {len(gb_train):,} most recent train rows)", "role": "baseline", **m})
        A.write_text(ctx.out / "lightgbm.txt", gb.booster_.model_to_string())
        outputs.append("lightgbm.txt")
    A.write_json(ctx.out / "models.json", rows)
    outputs.append("models.json")
    return StepResult(outputs, {"models": rows, "best_valid_auc": res.best_valid_auc},
                      f"teacher test AUC {rows[0].get('auc', float('nan')):.4f}")
