"""The students step: two-tower pre-rank / retrieval students and the rank student, their distillation chosen on
validation outcomes.

Every student learns from the clicks (its ground-truth terms) plus distillation from the teacher scaled by one
number. With ``students.distill = "auto"`` each tower is trained at every scale of ``distill_grid`` (0 included:
the ground-truth-only student), scored by the validation clicks its tower keeps at its stage size (click-recall@N1
for retrieval, @N2 for pre-rank, over the whole corpus, on the validation judge of :mod:`cascade.pipeline.judge`),
and the scale the one-SE rule of :mod:`cascade.eval.selection` picks is served as the ``distilled`` variant: among
the scales within one standard error of the best score, the one closest to a reference that the teacher-quality
gate below decides (0, no distillation, unless the gate finds the teacher better; then the configured weights,
scale 1), so neither distilling nor not distilling is chosen on a gain smaller than the validation requests' noise
against what the gate's independent comparison supports. Scale 0 is saved as ``ground_truth`` for the comparison.
The rank student's distillation scale is chosen the same way by validation AUC (its SE bootstrapped over
validation requests), its gate the teacher's validation AUC against the plain student's. Where a student's
distillation has a softmax temperature (the retrieval tower's listnet term; the rank student's Hinton KD), the
student is also trained at its served scale (chosen, or fixed by the config) at every temperature of
``kd_temperature_grid``, and the one-SE rule serves the one closest to the configured temperature.

The teacher-quality gate: at each tower's size, the teacher's own top list over the corpus is compared with the
ground-truth-only tower on the same validation requests; the teacher counts as better only when the mean per-request
gain in click-recall exceeds one standard error of it (paired over requests). Where the validation split has a
random-exposure slice, logged clicks would favour whatever copies the logging policy, so the gate compares the AUC of
the teacher's ranking score and of the ground-truth-only tower on those randomly shown impressions instead (the
gain against one bootstrap standard error, resampling requests). When the teacher is not better, distillation can
only copy a ranking no better than the clicks give, and the report says so in its headline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from .. import artifacts as A
from ..arrays import topk_rows
from ..channels import PopularChannel, load_channels
from ..channels.prior import PRIOR_FILE, PopularityPrior
from ..config import to_dict
from ..data.requests import Requests, impression_requests
from ..distill.ranklog import RankLog
from ..eval.metrics import auc, paired_difference, row_mean
from ..eval.selection import (
    gap_se,
    one_se_choice,
    one_se_columns,
    paired_bootstrap,
    rows_of_units,
    unit_ranges,
    widen_top,
)
from ..models.ranker import Ranker
from ..models.scoring import ranker_scorer
from ..models.two_tower import TwoTower, build_two_tower, item_embeddings
from ..run_data import RunData, Towers, load_ranker
from ..serve.replay import teacher_top_over_corpus
from ..train.entire_space import has_random_slice, random_slice
from ..train.joint import DistillConfig, DistilledStudent, JointRanker, joint_loss, pfd_configs, teacher_first_loss
from ..train.loop import evaluate, fit, predict
from ..train.students import (
    ClickLists,
    evaluate_on_log,
    is_ground_truth,
    kd_temperature,
    train_student,
    with_kd_temperature,
)
from .common import model_row, save_ranker, seeded, with_seed, without_timings
from .config import StudentsSection
from .judge import Judge, validation_judge
from .runner import StepContext, StepResult
from .tower_epochs import EpochChoice

log = logging.getLogger(__name__)

STAGES = ("prerank", "retrieval")
CURVE_REQUESTS = 1000  # rank-log requests the two-tower students' training curves are measured on


def click_lists(data, inputs, frame: pd.DataFrame) -> ClickLists:
    tr = data.split_impressions("train")
    imp = tr[tr.request_id.isin(frame.request_id)]
    return ClickLists.from_long(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                                inputs.user_rows(data.map_users(imp["user_id"].to_numpy())),
                                inputs.item_rows(imp["item_id"].to_numpy(np.int64)), imp["click"].to_numpy(np.float32))


def trusted_requests(rank_log: RankLog, clicks: ClickLists, n_rows: int) -> np.ndarray:
    """bool [n_rows] by request row: whether the teacher's logged list ordered the request's impressed items at
    least as well as chance (AUC of its logits over the impressed items >= 0.5). Requests with clicks of one class
    only (or not in the log) cannot be checked and are trusted."""
    trusted = np.ones(n_rows, bool)
    # the teacher's logit of each impressed item: look the (request row, item row) pairs up in the log
    width = max(int(rank_log.items.max(initial=0)), int(clicks.items.max(initial=0))) + 1
    log_keys = rank_log.request_rows[:, None] * width + rank_log.items
    order = np.argsort(log_keys[rank_log.mask])
    keys_sorted, logits_sorted = log_keys[rank_log.mask][order], rank_log.logits[rank_log.mask][order]
    keys = clicks.request_rows[:, None] * width + clicks.items
    pos = np.minimum(np.searchsorted(keys_sorted, keys), max(len(keys_sorted) - 1, 0))
    found = clicks.mask & (keys_sorted[pos] == keys) if len(keys_sorted) else np.zeros(keys.shape, bool)
    logit = np.where(found, logits_sorted[pos] if len(keys_sorted) else 0.0, np.nan)
    y = clicks.labels > 0
    # per-request AUC from average ranks among the request's found items (the others rank last): Mann-Whitney U
    ranks = rankdata(np.where(found, logit, np.inf), axis=1, method="average")
    n_pos, n_neg = (found & y).sum(1), (found & ~y).sum(1)
    u = np.where(found & y, ranks, 0.0).sum(1) - n_pos * (n_pos + 1) / 2.0
    checkable = (n_pos > 0) & (n_neg > 0)
    trusted[clicks.request_rows[checkable]] = u[checkable] / (n_pos[checkable] * n_neg[checkable]) >= 0.5
    return trusted


class _ExactTowers:
    """A trained tower pair as an exact retrieval stage over the corpus (for validation), with its prior if any."""

    def __init__(self, towers: Towers, data: RunData) -> None:
        self.towers, self.data = towers, data

    def select(self, requests: Requests, candidates, n: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.towers
        u = t.user_embed(self.data, requests)
        scores = u @ t.item_emb[: t.n_real].T * np.float32(1.0 / t.model.temperature)
        if t.prior is not None:
            scores += t.prior.boost_corpus(requests, u)
        return topk_rows(scores, np.broadcast_to(t.inputs.item_ids[: t.n_real], scores.shape), n)


def _tower_recall(towers: Towers, data: RunData, judge: Judge, n: int) -> np.ndarray:
    return judge.recall(judge.lists(_ExactTowers(towers, data), n), n)


def served_towers(model, inputs) -> Towers:
    """A trained tower pair (put in eval mode) with its item embeddings, as it is served without a prior."""
    model.eval()
    return Towers(model, inputs, item_embeddings(model.item_tower, inputs.item_cat, inputs.item_num))


def with_prior(towers: Towers, popular: PopularChannel | None, weight: float) -> Towers:
    """``towers`` with the recent-popularity prior over ``popular``'s counts at ``weight`` (0: none)."""
    prior = (PopularityPrior(popular, weight, towers.item_emb[: towers.n_real], towers.item_index,
                             towers.model.temperature) if weight else None)
    return dataclasses.replace(towers, prior=prior)


def choose_prior(model, inputs, data: RunData, judge: Judge, n: int, popular: PopularChannel | None,
                 grid: tuple[float, ...], seed: int, doublings: int = 0) -> tuple[float, np.ndarray, list[dict]]:
    """The weight of a tower's recent-popularity prior (:class:`PopularityPrior` over ``popular``'s counts; None:
    no prior): the smallest of the weights tried within one SE of the best validation click-recall@n (one-SE
    rule). The weights tried: ``grid``, widened by :func:`~cascade.eval.selection.widen_top` (``doublings``).
    Returns (weight, the per-request click-recall at that weight, one row per weight tried)."""
    towers = served_towers(model, inputs)
    if popular is None:
        return 0.0, _tower_recall(towers, data, judge, n), []

    def recall_at(w: float) -> np.ndarray:
        return _tower_recall(with_prior(towers, popular, w), data, judge, n)

    recall = widen_top({float(w): recall_at(float(w)) for w in grid}, recall_at, np.nanmean, doublings)
    chosen, rows = one_se_choice(list(recall), lambda w, units: row_mean(recall[w][units]),
                                 len(judge.requests), seed=seed)
    return chosen, recall[chosen], [{"weight": r["value"], f"valid_click_recall@{n}": r["score"],
                                     **one_se_columns(r)} for r in rows]


CONFIGURED_SCALE = 1.0  # the distillation terms at the weights the config gives them (the ``fixed`` variant)


def train_grid(scales, train: Callable[[float], object], statistic: Callable[[object, np.ndarray], float],
               n_units: int, doublings: int = 0) -> dict:
    """Train at every distillation scale and widen the grid while its largest scale scores best
    (:func:`cascade.eval.selection.widen_top`, at most ``doublings`` times); statistic(model, request indices) ->
    its score over those validation requests. Returns {scale: model}."""
    everything = np.arange(n_units)
    return widen_top({float(scale): train(float(scale)) for scale in sorted(scales)}, train,
                     lambda m: statistic(m, everything), doublings)


def choose_scale(models: dict, statistic: Callable[[object, np.ndarray], float], n_units: int, seed: int,
                 teacher_better: bool) -> tuple[float, list, float]:
    """The served scale of the trained ``models`` ({scale: model}) by the one-standard-error rule
    (:func:`cascade.eval.selection.one_se_choice`) with a reference the teacher-quality gate decides: 0 (no
    distillation) unless the gate found the teacher better, then CONFIGURED_SCALE. Among the scales within one SE
    of the best validation score the one closest to the reference is served, so a setting that wins by less than
    the validation split's noise never replaces the one the independent evidence supports. Returns (the chosen
    scale, [{"scale", "score", "gap", "se", "within_one_se"}] in scale order, the reference)."""
    reference = CONFIGURED_SCALE if teacher_better else 0.0
    chosen, rows = one_se_choice(list(models), lambda v, units: statistic(models[v], units), n_units, seed=seed,
                                 prefer=reference)
    return chosen, [{"scale": r.pop("value"), **r} for r in rows], reference


def choose_temperature(model, scale: float, configured: float | None, grid, train_at: Callable[[float], object],
                       statistic: Callable[[object, np.ndarray], float], n_units: int, seed: int,
                       score_key: str, extra: Callable[[object], dict] = lambda m: {}) -> tuple[object, dict]:
    """The KD temperature of a student trained at its chosen ``scale``: ``model`` was trained at the ``configured``
    temperature (None: its distillation terms have none); train_at(t) trains it at temperature t. Among the
    configured and ``grid``'s temperatures, the one-SE rule serves the one closest to the configured one within
    one SE of the best validation score (statistic(model, request indices) -> its score, recorded as
    ``score_key``; extra(model) -> more columns of its row). Returns (the served model, {"configured", "chosen",
    "searched": True, "grid": rows} or {"configured", "searched": False, "why"})."""
    if configured is None:
        return model, {"configured": None, "searched": False, "why": "no distillation term with a temperature"}
    if scale == 0 or not set(grid) - {configured}:
        why = "scale 0 (no distillation)" if scale == 0 else "the grid holds the configured temperature alone"
        return model, {"configured": configured, "searched": False, "why": why}
    tried = {configured: model, **{float(t): train_at(float(t)) for t in sorted(set(grid) - {configured})}}
    chosen, rows = one_se_choice(list(tried), lambda t, units: statistic(tried[t], units), n_units, seed=seed,
                                 prefer=configured)
    return tried[chosen], {"configured": configured, "chosen": chosen, "searched": True,
                           "grid": [{"temperature": r["value"], score_key: r["score"], **one_se_columns(r),
                                     **extra(tried[r["value"]])} for r in rows]}


def teacher_gate(teacher: np.ndarray, student: np.ndarray) -> dict:
    """Paired comparison of per-request validation click-recall (float [R], nan = no click): the teacher is better
    when its mean gain over the ground-truth-only student exceeds one standard error of the gain."""
    gap = paired_difference(teacher, student)
    return {"teacher": float(np.nanmean(teacher)), "ground_truth_student": float(np.nanmean(student)),
            "gain": gap["diff"], "standard_error": gap["se"],
            "teacher_better": bool(gap["n"] > 1 and gap["diff"] > gap["se"])}


def auc_gate(y: np.ndarray, teacher: np.ndarray, student: np.ndarray, request_id: np.ndarray, seed: int) -> dict:
    """The teacher-quality gate by AUC: labels y [N] and the two models' scores [N] of the same impressions, paired
    over their requests (``request_id`` [N]): the teacher is better when its AUC gain over the ground-truth-only
    student exceeds one bootstrap standard error of the gain (resampling requests)."""
    order, starts, lengths = unit_ranges(request_id)
    y, teacher, student = y[order], teacher[order], student[order]

    def at(s: np.ndarray):
        def score(units: np.ndarray) -> float:
            rows = rows_of_units(starts, lengths, units)
            return auc(y[rows], s[rows])
        return score

    scores, boot = paired_bootstrap({"teacher": at(teacher), "student": at(student)}, len(starts), seed=seed)
    gain, se = scores["teacher"] - scores["student"], gap_se(boot["teacher"], boot["student"])
    return {"judged_by": "random_auc", "impressions": int(len(y)), "teacher": scores["teacher"],
            "ground_truth_student": scores["student"], "gain": gain, "standard_error": se,
            "teacher_better": bool(np.isfinite(se) and gain > se)}


def random_slice_gate(teacher, data: RunData, seed: int) -> Callable[[Towers], dict]:
    """The teacher-quality gate where the validation split has a random-exposure slice: gate(towers) compares the
    AUC of the teacher's ranking score (the order of its own list over the corpus) and of the ground-truth-only
    ``towers`` as served on those impressions, what users click among items shown at random, free of the logging
    policy's choice (:func:`auc_gate`). The teacher scores the slice once, for every stage's gate."""
    shown = random_slice(data.split_impressions("valid"), "the students' teacher gate")
    requests = impression_requests(shown, data.context_names)
    items = shown["item_id"].to_numpy(np.int64)[:, None]
    y, request_id = shown["click"].to_numpy(), shown["request_id"].to_numpy()
    t = ranker_scorer(teacher, data)(requests, items)[:, 0]
    return lambda towers: auc_gate(y, t, towers.scores(data, requests, items)[:, 0], request_id, seed)


def _scaled(cfg: DistillConfig, scale: float) -> DistillConfig:
    """``cfg`` with every distillation weight (KD, hint, CR, RCR, PFD lambda) multiplied by ``scale``."""
    pfd = None if cfg.pfd_lambda is None else min(1.0, cfg.pfd_lambda * scale)
    return dataclasses.replace(cfg, w_kd=cfg.w_kd * scale, w_hint=cfg.w_hint * scale, w_cr=cfg.w_cr * scale,
                               w_rcr=cfg.w_rcr * scale, pfd_lambda=pfd)


MACHINE_FACTS = ("seconds", "autocast")  # per-epoch history keys the machine decides: manifest only, never hashed


class TrainedTower(NamedTuple):
    """One tower of the grid: its weights (the chosen epoch's), training history (every epoch trained), validation
    click-recall per judge request at its stage size (with its prior), the prior's weight and grid, and its epoch
    choice (:meth:`EpochChoice.choose`, or {"configured", "trained"} where none was searched)."""

    model: TwoTower
    history: list[dict[str, Any]]
    recall: np.ndarray
    prior_weight: float
    prior_grid: list[dict]
    epochs: dict


def _tower_columns(m: TrainedTower) -> dict:
    """A trained tower's columns in the selection grids: its prior and its epoch choice."""
    return {"popularity_prior": m.prior_weight, "popularity_prior_grid": m.prior_grid, "epochs": m.epochs}


def _train_towers(ctx: StepContext, c: StudentsSection, sizes: dict, data: RunData, judge: Judge) -> tuple:
    """Train every tower of the grid; save the chosen / ground-truth / fixed variants; return outputs and metrics."""
    frame = pd.read_parquet(ctx.inputs["ranklog"] / "requests.parquet")
    inputs = data.tower_inputs(frame, c.tower.history_length)
    rank_log = RankLog(ctx.inputs["ranklog"] / "log")
    clicks = click_lists(data, inputs, frame)
    trusted = trusted_requests(rank_log, clicks, len(frame)) if c.confidence else None
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    t_lists, _ = teacher_top_over_corpus(teacher, data, judge.requests, max(sizes.values()), exclude_seen=judge.seen,
                                         workers=torch.get_num_threads())
    outputs, metrics = [], {"judge": judge.what}
    random_gate = (random_slice_gate(teacher, data, ctx.seed) if has_random_slice(data.split_impressions("valid"))
                   else None)  # where there is a random slice, the gate's judge is its AUC
    # a fixed sample of the rank log every two-tower student is evaluated on after each epoch (its training curve:
    # in-sample for a distilled student, the teacher's order it never trained on for a ground-truth one)
    curve_log = rank_log.subset(np.random.default_rng(ctx.seed).permutation(len(rank_log))[:CURVE_REQUESTS])
    popular = (load_channels(ctx.inputs["channels"], data.history, ["popular"])["popular"]
               if any(c.popularity_prior_grid) else None)
    if trusted is not None:
        metrics["confidence"] = {"trusted_share": float(trusted[rank_log.request_rows].mean())}
    for stage in STAGES:
        base, n = (c.prerank if stage == "prerank" else c.retrieval), sizes[stage]

        def train(scale: float, base=base, n=n, stage=stage, temperature: float | None = None):
            towers = build_two_tower(inputs, c.tower, seed=ctx.seed)
            scfg = dataclasses.replace(base, seed=ctx.seed, progress=ctx.progress, distill_scale=scale)
            label = f"{stage} student, distillation scale {scale:g}"
            if temperature is not None:
                scfg, label = with_kd_temperature(scfg, temperature), f"{label}, temperature {temperature:g}"
            needs_log = any(scfg.weight(t) and not is_ground_truth(scfg, t) for t in scfg.loss_weights)
            judged = None
            if c.max_epochs_factor > 1:
                judged = EpochChoice(lambda tw: _tower_recall(served_towers(tw, inputs), data, judge, n), scfg.epochs,
                                     c.patience(), f"valid_click_recall@{n}")
                scfg = dataclasses.replace(scfg, epochs=scfg.epochs * c.max_epochs_factor)
            hist = train_student(towers, inputs, rank_log if needs_log else None, clicks, scfg, trusted=trusted,
                                 valid=curve_log, label=label, after_epoch=judged)
            epochs = (judged.choose(towers, ctx.seed) if judged is not None
                      else {"configured": scfg.epochs, "trained": len(hist)})
            weight, recall, prior_grid = choose_prior(towers, inputs, data, judge, n, popular,
                                                      c.popularity_prior_grid, ctx.seed, c.grid_doublings)
            return TrainedTower(towers, hist, recall, weight, prior_grid, epochs)

        def recall_over(m: TrainedTower, units: np.ndarray) -> float:
            return row_mean(m.recall[units])

        models = train_grid(c.scales(), train, recall_over, len(judge.requests),
                            c.grid_doublings if c.distill == "auto" else 0)
        gate = None
        if 0.0 in models and random_gate is not None:
            gate = random_gate(with_prior(served_towers(models[0.0].model, inputs), popular,
                                          models[0.0].prior_weight))
        elif 0.0 in models:
            gate = teacher_gate(judge.recall(t_lists, n), models[0.0].recall)
        best, table, reference = choose_scale(models, recall_over, len(judge.requests), ctx.seed,
                                              bool(gate and gate["teacher_better"]))
        grid = [{"scale": row["scale"], f"valid_click_recall@{n}": row["score"], **one_se_columns(row),
                 **_tower_columns(models[row["scale"]]),
                 "teacher_agreement": evaluate_on_log(models[row["scale"]].model, inputs, rank_log, k=10)}
                for row in table]
        chosen = best if c.distill == "auto" else float(c.distill)
        served, temperature = choose_temperature(
            models[chosen], chosen, kd_temperature(base), c.kd_temperature_grid,
            lambda t, train=train, s=chosen: train(s, temperature=t), recall_over, len(judge.requests), ctx.seed,
            f"valid_click_recall@{n}", _tower_columns)
        variants = {"distilled": chosen}
        if c.compare_ground_truth:
            variants["ground_truth"] = 0.0
        if c.keep_fixed:
            variants["fixed"] = CONFIGURED_SCALE
        for variant, scale in variants.items():
            t = served if variant == "distilled" else models[scale]
            d = ctx.out / variant / stage
            A.save_torch(d / "model.pt", t.model.state_dict())
            A.write_json(d / "config.json", to_dict(c.tower))
            A.write_json(d / "history.json",
                         [{k: v for k, v in h.items() if k not in MACHINE_FACTS} for h in t.history])
            outputs += [f"{variant}/{stage}/{f}" for f in ("model.pt", "config.json", "history.json")]
            if popular is not None:
                A.write_json(d / PRIOR_FILE, {"weight": t.prior_weight, **popular.params()})
                outputs.append(f"{variant}/{stage}/{PRIOR_FILE}")
        metrics[stage] = {"size": n, "grid": grid, "chosen_scale": chosen, "reference_scale": reference,
                          "temperature": temperature, "variants": variants, "gate": gate}
        metrics[f"{stage}_epoch_seconds"] = {str(sc): [h.get("seconds") for h in m.history]  # manifest only
                                             for sc, m in models.items()}
        metrics[f"{stage}_autocast"] = {str(sc): m.history[0]["autocast"] if m.history else None
                                        for sc, m in models.items()}
        log.info("students: %s scale %s chosen (%s); teacher gate %s", stage, chosen, grid, gate)
    return outputs, metrics


def _train_rank_students(ctx: StepContext, c: StudentsSection,
                         data: RunData) -> tuple[list[str], list[dict], dict, dict]:
    """The rank student at every scale of its grid, the one with the best validation AUC served; the last dict:
    scale -> the autocast each trained under."""
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    if c.rank_student_max_rows is not None and len(train) > c.rank_student_max_rows:
        train = train.take(slice(len(train) - c.rank_student_max_rows, None))
    tcfg = with_seed(dataclasses.replace(c.rank_student_train, progress=ctx.progress), ctx.seed)
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec).to(tcfg.device)  # scores the student's batches
    pfd = c.rank_distill.pfd_lambda is not None
    side = c.rank_pfd_side
    if pfd and not (train.spec.cat_index(side) or train.spec.num_index(side)):
        raise ValueError(f"students.rank_distill.pfd_lambda is set (PFD), but the data have no column on the "
                         f"{side!r} side (students.rank_pfd_side); sides with columns: "
                         f"{sorted(set(train.spec.cat_sides + train.spec.num_sides))}")

    autocast = {}  # scale -> what TrainConfig.autocast resolved to (manifest only: its probe varies run to run)

    def train_one(scale: float, temperature: float | None = None):
        seeded(ctx.seed)
        dcfg = _scaled(c.rank_distill, scale)
        extra = None
        label = f"rank student, distillation scale {scale:g}"
        if temperature is not None:
            dcfg, label = dataclasses.replace(dcfg, temperature=temperature), f"{label}, temperature {temperature:g}"
        if scale == 0:  # no distillation: the plain student on clicks
            model = Ranker(train.spec, c.rank_student)
            res = fit(model, train, valid, tcfg, label=label)
        elif not pfd:  # teacher-first: from the frozen teacher of the teacher step
            distilled = DistilledStudent(Ranker(train.spec, c.rank_student), teacher_hidden_dim=None, seed=ctx.seed)
            res = fit(distilled, train, valid, tcfg, loss_fn=teacher_first_loss(teacher, dcfg), label=label)
            model = distilled.student
        else:  # PFD: its own privileged teacher, trained synchronously with the student
            joint = JointRanker(train.spec, *pfd_configs(c.rank_student, "pfd", pfd_side=side),
                                private_student_columns=c.rank_pfd_private_columns, seed=ctx.seed)
            res = fit(joint, train, valid, tcfg, loss_fn=joint_loss(dcfg), label=label)
            model, extra = joint.export_student(), joint.teacher
        autocast[str(scale) if temperature is None else f"{scale:g} at temperature {temperature:g}"] = res.autocast
        return model.eval(), extra, res.history

    order, starts, lengths = unit_ranges(valid.request_id)
    label = valid.label[order]
    predicted: dict[int, np.ndarray] = {}  # id(model) -> its validation scores in request order

    def auc_over(scores: np.ndarray) -> Callable[[np.ndarray], float]:
        """The validation AUC of ``scores`` (request order) over a sample of validation requests."""
        def on(units: np.ndarray) -> float:
            rows = rows_of_units(starts, lengths, units)
            return auc(label[rows], scores[rows])
        return on

    def valid_scores(m) -> np.ndarray:
        if id(m[0]) not in predicted:
            predicted[id(m[0])] = predict(m[0], valid)[order]
        return predicted[id(m[0])]

    def valid_auc(m, units: np.ndarray) -> float:
        return auc_over(valid_scores(m))(units)

    trained = train_grid(c.rank_scales(), train_one, valid_auc, len(starts),
                         c.grid_doublings if c.rank_distill_scale == "auto" else 0)
    plain, _, plain_history = trained[0.0]
    scores, boot = paired_bootstrap({"teacher": auc_over(predict(teacher, valid)[order]),
                                     "plain": auc_over(valid_scores(trained[0.0]))}, len(starts), seed=ctx.seed)
    gate = {"teacher_valid_auc": scores["teacher"], "plain_student_valid_auc": scores["plain"],
            "gain": scores["teacher"] - scores["plain"], "standard_error": gap_se(boot["teacher"], boot["plain"])}
    # the same margin as the towers' gate: better only by more than one standard error of the paired gain
    gate["teacher_better"] = bool(gate["gain"] > gate["standard_error"])
    best, table, reference = choose_scale(trained, valid_auc, len(starts), ctx.seed, gate["teacher_better"])
    grid = [{"scale": row["scale"], "valid_auc": row["score"], **one_se_columns(row)} for row in table]
    chosen = best if c.rank_distill_scale == "auto" else float(c.rank_distill_scale)
    served_model, temperature = choose_temperature(trained[chosen], chosen, c.rank_distill.soft_target_temperature,
                                                   c.kd_temperature_grid,
                                                   lambda t: train_one(chosen, t), valid_auc, len(starts), ctx.seed,
                                                   "valid_auc")
    served, pfd_teacher, served_history = served_model
    how = "PFD" if pfd else "logit KD" if c.rank_distill.kd_loss == "mse" else c.rank_distill.kd_loss
    rows = [model_row("rank student (no distillation)", "student", plain, evaluate(plain, test), train.spec),
            model_row(f"rank student (served: {how} at scale {chosen:g}"
                      f"{', chosen on validation AUC' if c.rank_distill_scale == 'auto' else ''})", "student",
                      served, evaluate(served, test), train.spec)]
    if pfd_teacher is not None:
        rows.append(model_row(f"its PFD teacher (also reads the {side} side; not served)", "pfd_teacher",
                              pfd_teacher, evaluate(pfd_teacher, test), train.spec))
    outputs = save_ranker(served, c.rank_student, ctx.out / "rank_student")
    A.write_json(ctx.out / "rank_student" / "history.json", served_history)
    A.write_json(ctx.out / "rank_student" / "history_no_distillation.json", plain_history)
    outputs += ["rank_student/history.json", "rank_student/history_no_distillation.json"]
    return outputs, rows, {"grid": grid, "chosen_scale": chosen, "reference_scale": reference,
                           "temperature": temperature, "gate": gate}, autocast


def run(ctx: StepContext) -> StepResult:
    c: StudentsSection = ctx.config["students"]
    sizes: dict = ctx.config["select_at"]
    data = RunData(ctx.inputs["data"])
    judge = validation_judge(data, c.select_requests, ctx.seed)
    outputs, metrics = _train_towers(ctx, c, sizes, data, judge)
    rank_outputs, rows, metrics["rank_student"], autocast = _train_rank_students(ctx, c, data)
    outputs += rank_outputs
    A.write_json(ctx.out / "models.json", without_timings(rows))  # the latencies: in the manifest
    A.write_json(ctx.out / "selection.json", {k: v for k, v in metrics.items()
                                              if not k.endswith(("epoch_seconds", "_autocast"))})
    metrics["rank_student_autocast"] = autocast
    outputs += ["models.json", "selection.json"]
    metrics["models"] = rows
    summary = ", ".join(f"{st} scale {metrics[st]['chosen_scale']:g}" for st in STAGES)
    return StepResult(outputs, metrics, f"distillation chosen on validation: {summary}, rank student scale "
                      f"{metrics['rank_student']['chosen_scale']:g}")
