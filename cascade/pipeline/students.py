"""The students step: two-tower pre-rank / retrieval students (distilled and ground-truth-only) and the rank
students."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from .. import artifacts as A
from ..config import to_dict
from ..distill.ranklog import RankLog
from ..models.ranker import Ranker
from ..models.two_tower import build_two_tower
from ..run_data import RunData, load_ranker
from ..train.joint import DistilledStudent, JointRanker, joint_loss, pfd_configs, teacher_first_loss
from ..train.loop import evaluate, fit
from ..train.students import ClickLists, evaluate_on_log, train_student
from .common import model_row, save_ranker, seeded, with_seed
from .config import StudentsSection
from .runner import StepContext, StepResult

log = logging.getLogger(__name__)

CURVE_REQUESTS = 1000  # rank-log requests the two-tower students' training curves are measured on


def click_lists(data, inputs, frame: pd.DataFrame):
    tr = data.split_impressions("train")
    imp = tr[tr.request_id.isin(frame.request_id)]
    return ClickLists.from_long(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                                inputs.user_rows(data.map_users(imp["user_id"].to_numpy())),
                                inputs.item_rows(imp["item_id"].to_numpy(np.int64)), imp["click"].to_numpy(np.float32))


def run(ctx: StepContext) -> StepResult:
    c: StudentsSection = ctx.config
    data = RunData(ctx.inputs["data"])
    frame = pd.read_parquet(ctx.inputs["ranklog"] / "requests.parquet")
    inputs = data.tower_inputs(frame)
    log_ = RankLog(ctx.inputs["ranklog"] / "log")
    clicks = click_lists(data, inputs, frame)
    outputs, metrics, rows = [], {}, []
    # a fixed sample of the rank log that every two-tower student is evaluated on after each epoch (the training
    # curves: in-sample for the distilled students, the teacher's order they never saw for the ground-truth ones)
    curve_log = log_.subset(np.random.default_rng(ctx.seed).permutation(len(log_))[:CURVE_REQUESTS])
    variants = {"distilled": (c.prerank, c.retrieval)}
    if c.compare_ground_truth:
        variants["ground_truth"] = (c.prerank_gt, c.retrieval_gt)
    for variant, (pre_cfg, ret_cfg) in variants.items():
        for stage, scfg in (("prerank", pre_cfg), ("retrieval", ret_cfg)):
            towers = build_two_tower(inputs, c.tower, seed=ctx.seed)
            scfg = dataclasses.replace(scfg, seed=ctx.seed, progress=ctx.progress)
            hist = train_student(towers, inputs, log_, clicks, scfg, valid=curve_log, label=f"{variant} {stage}")
            d = ctx.out / variant / stage
            A.save_torch(d / "model.pt", towers.state_dict())
            A.write_json(d / "config.json", to_dict(c.tower))
            A.write_json(d / "history.json", hist)
            outputs += [f"{variant}/{stage}/{f}" for f in ("model.pt", "config.json", "history.json")]
            ev = evaluate_on_log(towers, inputs, log_, k=10)
            metrics[f"{variant}_{stage}"] = ev
            log.info("students: %s %s on the logged lists: %s", variant, stage, ev)
    # rank students: without distillation and distilled from the teacher (teacher-first)
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    if c.rank_student_max_rows is not None and len(train) > c.rank_student_max_rows:
        train = train.take(slice(len(train) - c.rank_student_max_rows, None))
    tcfg = with_seed(dataclasses.replace(c.rank_student_train, progress=ctx.progress), ctx.seed)
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec).to(tcfg.device)  # scores the student's batches
    seeded(ctx.seed)
    plain = Ranker(train.spec, c.rank_student)
    plain_fit = fit(plain, train, valid, tcfg, label="rank student (no distillation)")
    rows.append(model_row("rank student (no distillation)", "student", plain, evaluate(plain, test), train.spec))
    seeded(ctx.seed)
    pfd_rows = []  # PFD's own teacher, reported after the student it taught
    if c.rank_distill.pfd_lambda is None:  # teacher-first: from the frozen teacher of the teacher step
        distilled = DistilledStudent(Ranker(train.spec, c.rank_student), teacher_hidden_dim=None, seed=ctx.seed)
        served_fit = fit(distilled, train, valid, tcfg, loss_fn=teacher_first_loss(teacher, c.rank_distill),
                         label="rank student (distilled)")
        served, name = distilled.student.eval(), "rank student (distilled)"
    else:  # PFD: its own privileged teacher, trained synchronously with the student
        side = c.rank_pfd_side
        if not (train.spec.cat_index(side) or train.spec.num_index(side)):
            raise ValueError(f"students.rank_distill.pfd_lambda is set (PFD), but the data have no column on the "
                             f"{side!r} side (students.rank_pfd_side); sides with columns: "
                             f"{sorted(set(train.spec.cat_sides + train.spec.num_sides))}")
        joint = JointRanker(train.spec, *pfd_configs(c.rank_student, "pfd", pfd_side=side),
                            private_student_columns=c.rank_pfd_private_columns, seed=ctx.seed)
        served_fit = fit(joint, train, valid, tcfg, loss_fn=joint_loss(c.rank_distill), label="rank student (PFD)")
        served = joint.export_student().eval()
        name = f"rank student (distilled, PFD on the {side} side)"
        pfd_rows.append(model_row(f"its PFD teacher (also reads the {side} side; not served)", "pfd_teacher",
                                  joint.teacher, evaluate(joint.teacher, test), train.spec))
    rows += [model_row(name, "student", served, evaluate(served, test), train.spec)] + pfd_rows
    outputs += save_ranker(served, c.rank_student, ctx.out / "rank_student")
    A.write_json(ctx.out / "rank_student" / "history.json", served_fit.history)
    A.write_json(ctx.out / "rank_student" / "history_no_distillation.json", plain_fit.history)
    outputs += ["rank_student/history.json", "rank_student/history_no_distillation.json"]
    A.write_json(ctx.out / "models.json", rows)
    outputs.append("models.json")
    metrics["models"] = rows
    return StepResult(outputs, metrics, "students trained: " + ", ".join(f"{k} {v['teacher_recall@10']:.3f}"
                                                                         for k, v in metrics.items() if k != "models"))
