"""Teacher-first vs one loop ("one teacher, three students") pre-rank and retrieval students on a finished default run.

    nice python benchmarks/three_students.py --run runs/default [--max-requests 10000] [--epochs 2]

Reads the run folder (never writes there). Trains, on one seed and a capped sample of the run's training
requests (candidate lists built as the ranklog step builds them: impressed + popularity / uniform samples):

- one loop: cascade.train.three_students.train_three_students (teacher, rank student, pre-rank and retrieval
  students in one loop; the one-loop teacher sees only the sampled requests' impressions);
- teacher-first, same requests: the run's teacher ranks the same candidate lists into a rank log and the pipeline's
  student configs train on it (train_student), so only "one loop vs teacher-first" differs;
- teacher-first, pipeline: the run's own students (its rank log of ranklog.max_requests requests).

Evaluation: held-out candidate lists of test requests (impressed + sampled), ranked by each teacher; every
student's teacher-recall@10 / NDCG@10 within the lists (cascade.train.students.evaluate_on_log) against its own
teacher (the cascade's consistency) and against the run's teacher. Also the test AUC of the two teachers and
rank students. Writes benchmarks/results/joint_cascade.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cascade import artifacts as A
from cascade.config import from_dict
from cascade.data.requests import requests_frame, to_requests
from cascade.distill.ranklog import RankLog, build_rank_log
from cascade.models.scoring import score_pairs
from cascade.models.two_tower import build_two_tower
from cascade.pipeline import PipelineConfig
from cascade.pipeline.ranklog import candidate_lists, rank_log_inputs, ranklog_channels
from cascade.run_data import RunData, load_ranker
from cascade.train.loop import evaluate
from cascade.train.students import evaluate_on_log, train_student
from cascade.train.three_students import ThreeStudentsConfig, ThreeStudentsData, train_three_students

log = logging.getLogger("three_students")


def _scorer(model, data: RunData, requests, item_ids: np.ndarray):
    """build_rank_log scorer: (request rows [B], item rows [B, L]) -> logits [B, L] of ``model``."""

    def score(rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        cat, num = data.pair_features(requests.take(rows), item_ids[items])
        return score_pairs(model, cat, num).reshape(items.shape)

    return score


def _test_lists(data: RunData, n_requests: int, n_candidates: int, uniform_frac: float, seed: int,
                history_length: int):
    """Test requests (an even spread, time order) with user_row, their tower inputs (with each request's last
    ``history_length`` clicks) and candidate lists."""
    test = data.split_impressions("test")
    frame = requests_frame(test, data.context_names)
    if len(frame) > n_requests:
        frame = frame.iloc[np.linspace(0, len(frame) - 1, n_requests).round().astype(int)].reset_index(drop=True)
    inputs = data.tower_inputs(frame, history_length)
    frame["user_row"] = inputs.user_rows(data.map_users(frame["user_id"].to_numpy()))
    cands = candidate_lists(data, frame, test, inputs, n_candidates, uniform_frac, np.random.default_rng([seed, 7]))
    return frame, inputs, cands


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished default run folder (read only)")
    ap.add_argument("--max-requests", type=int, default=10000, help="training requests sampled (cap)")
    ap.add_argument("--test-requests", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg: PipelineConfig = from_dict(PipelineConfig, {k: v for k, v in A.read_json(run / "config.json").items()})
    sc = cfg.students
    data = RunData(run / "data")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    # ---- training requests and candidate lists, as the ranklog step builds them (capped)
    t0 = time.perf_counter()
    rl = dataclasses.replace(cfg.ranklog, max_requests=args.max_requests)
    frame, cands, item_ids, _ = rank_log_inputs(data, rl, args.seed, ranklog_channels(rl, run / "channels", data))
    inputs = data.tower_inputs(frame, sc.tower.history_length)
    requests = to_requests(frame, data.context_names)
    train = data.encoded("train")
    keep = np.flatnonzero(np.isin(train.request_id, frame["request_id"].to_numpy()))
    imp = train.take(keep)
    del train
    # the encoded tables also carry the privileged (post-click) numerics, which pair_features does not build and
    # no serving-time model reads: keep the pair-feature layout (data.spec), selecting its columns by name
    spec = data.spec
    if spec.cat_names != imp.spec.cat_names:
        raise ValueError(f"{run / 'data'}: encoded categorical columns differ from the pair features' columns")
    num_cols = [imp.spec.num_names.index(n) for n in spec.num_names]
    imp = dataclasses.replace(imp, spec=spec, num=np.ascontiguousarray(imp.num[:, num_cols]))
    jdata = ThreeStudentsData(imp, inputs.request_rows(imp.request_id), inputs.item_rows(data.map_items(imp.item_id)),
                              inputs,
                              frame["user_row"].to_numpy(), cands,
                              lambda rows, items: data.pair_features(requests.take(rows), item_ids[items]))
    timings["prepare_s"] = time.perf_counter() - t0
    log.info("%d requests, %d impressions, lists of %d", len(frame), len(imp), cands.shape[1])

    # ---- one loop
    jcfg = ThreeStudentsConfig(teacher=cfg.teacher.model, rank_student=sc.rank_student, rank_distill=sc.rank_distill,
                               tower=sc.tower, prerank=sc.prerank, retrieval=sc.retrieval, lr=cfg.teacher.train.lr,
                               epochs=args.epochs, batch_size=sc.prerank.batch_size, seed=args.seed, progress=True)
    t0 = time.perf_counter()
    one_loop = train_three_students(jdata, data.spec, jcfg)
    timings["one_loop_train_s"] = time.perf_counter() - t0

    teacher = load_ranker(run / "teacher" / "teacher", data.spec)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- teacher-first on the same requests: the run's teacher ranks the same lists, the pipeline configs train
        t0 = time.perf_counter()
        build_rank_log(frame, cands, _scorer(teacher, data, requests, item_ids), tmp / "train_log", progress=False,
                       item_ids=item_ids)
        train_log = RankLog(tmp / "train_log")
        timings["teacher_first_rank_log_s"] = time.perf_counter() - t0
        from cascade.pipeline.students import click_lists

        clicks = click_lists(data, inputs, frame)
        same = {}
        t0 = time.perf_counter()
        for stage, scfg in (("prerank", sc.prerank), ("retrieval", sc.retrieval)):
            tt = build_two_tower(inputs, sc.tower, seed=args.seed)
            train_student(tt, inputs, train_log, clicks, dataclasses.replace(scfg, seed=args.seed, epochs=args.epochs))
            same[stage] = tt
        timings["teacher_first_students_s"] = time.perf_counter() - t0

        # ---- held-out test lists ranked by each teacher
        t0 = time.perf_counter()
        tframe, tinputs, tcands = _test_lists(data, args.test_requests, cfg.ranklog.n_candidates,
                                              cfg.ranklog.uniform_frac, args.seed, sc.tower.history_length)
        treq = to_requests(tframe, data.context_names)
        logs = {}
        for name, model in (("run_teacher", teacher), ("one_loop_teacher", one_loop.teacher)):
            build_rank_log(tframe, tcands, _scorer(model, data, treq, tinputs.item_ids), tmp / name, progress=False,
                           item_ids=tinputs.item_ids)
            logs[name] = RankLog(tmp / name)

        def load_pipeline(stage: str):
            tt = build_two_tower(tinputs, sc.tower, seed=0)
            tt.load_state_dict(A.load_torch(run / "students" / "distilled" / stage / "model.pt"))
            return tt.eval()

        students = {
            "teacher-first (run's students)": ({"prerank": load_pipeline("prerank"),
                                                "retrieval": load_pipeline("retrieval")},
                                               "run_teacher"),
            "teacher-first (same requests)": (same, "run_teacher"),
            "one-loop": ({"prerank": one_loop.prerank, "retrieval": one_loop.retrieval}, "one_loop_teacher"),
        }
        results = {}
        for variant, (models, own) in students.items():
            row = {}
            for stage, tt in models.items():
                row[stage] = {ref: evaluate_on_log(tt, tinputs, logs[ref], k=10) for ref in logs}
                row[stage]["own_teacher"] = own
            results[variant] = row
        timings["evaluate_s"] = time.perf_counter() - t0

    test = data.encoded("test")
    test = dataclasses.replace(test, spec=spec, num=np.ascontiguousarray(test.num[:, num_cols]))
    rankers = {"run teacher": evaluate(teacher, test), "one-loop teacher": evaluate(one_loop.teacher, test),
               "run rank student (teacher-first)": evaluate(load_ranker(run / "students" / "rank_student", data.spec),
                                                            test),
               "one-loop rank student": evaluate(one_loop.rank_student, test)}
    timings["total_s"] = time.perf_counter() - t_all
    out = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.threads} torch thread(s), run under nice",
        "run": run.name, "seed": args.seed, "train_requests": len(frame), "train_impressions": len(imp),
        "run_train_requests": int(data.split_impressions("train").request_id.nunique()),
        "run_rank_log_requests": cfg.ranklog.max_requests, "n_candidates": int(cands.shape[1]),
        "epochs": args.epochs, "test_requests": len(tframe),
        "students": results, "rankers": rankers, "history": one_loop.history, "timings": timings,
    }
    out_dir = Path(args.out)
    A.write_json(out_dir / "three_students.json", out)
    A.write_text(out_dir / "three_students.md", _markdown(out))
    print((out_dir / "three_students.md").read_text())
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# One teacher, three students: one loop vs teacher-first",
        "",
        f"{r['date']}, {r['machine']}. Run `{r['run']}` (default world), seed {r['seed']} (one seed only: no spread "
        f"is measured, differences of a few points may be noise).",
        "",
        f"CPU budget: the one loop and the same-requests teacher-first students train on a CAPPED sample of "
        f"{r['train_requests']:,} of the run's {r['run_train_requests']:,} training requests "
        f"({r['train_impressions']:,} impressions), lists of {r['n_candidates']} candidates, {r['epochs']} epochs. "
        f"The one-loop teacher therefore sees only those impressions, while the run's teacher was trained on every "
        "training impression; the run's own students learned from a rank log of "
        f"{r['run_rank_log_requests']:,} requests.",
        "",
        f"Teacher-recall@10 within held-out candidate lists of {r['test_requests']} test requests "
        f"(impressed + sampled, {r['n_candidates']} per request), each list ranked by the one-loop teacher and by the "
        f"run's teacher. \"own\" = against the teacher the student was distilled from (the cascade's consistency).",
        "",
        "| students | stage | recall@10 vs own teacher | recall@10 vs run teacher | recall@10 vs one-loop "
        "teacher | NDCG@10 vs own |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in r["students"].items():
        for stage, m in row.items():
            own = m["own_teacher"]
            lines.append(f"| {variant} | {stage} | {m[own]['teacher_recall@10']:.3f} | "
                         f"{m['run_teacher']['teacher_recall@10']:.3f} | "
                         f"{m['one_loop_teacher']['teacher_recall@10']:.3f} | {m[own]['ndcg@10']:.3f} |")
    lines += ["", "Rankers on the test impressions:", "", "| model | AUC | GAUC | logloss |", "|---|---|---|---|"]
    for name, m in r["rankers"].items():
        lines.append(f"| {name} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} |")
    lines += ["",
              "How to read it: \"teacher-first (same requests)\" and \"one-loop\" differ only "
              "in the training mode (same "
              "requests, candidate lists, configs, epochs). The one-loop students learn from a teacher that starts "
              "untrained and moves every step, and that teacher sees only the capped impressions (compare the "
              "two teachers' AUC), so on this budget the comparison mixes the mode with a weaker teacher; the "
              "rank student reads the teacher's embeddings frozen (detached) while they are still moving. A "
              "like-for-like test of the mode at full scale (every training request, several seeds) is not run "
              "here.", ""]
    t = r["timings"]
    lines += ["Wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), "",
              "Reproduce: `nice python benchmarks/three_students.py --run runs/default` after `cascade run` of the "
              "default pipeline.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
