"""Teacher training with DistributedDataParallel and sharded rank-log scoring, on a run's data folder.

Run it under torchrun (one process per GPU on a GPU node, or N CPU processes with gloo):

    torchrun --nproc_per_node 2 benchmarks/ddp_ranklog.py --data runs/tiny/data --out runs/ddp
    torchrun --nnodes 2 --node_rank K --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        benchmarks/ddp_ranklog.py --data runs/default/data --out /shared/runs/ddp --device cuda

or as one plain process (no torchrun: no process group, the single-process baseline). Every rank reads the data
folder, trains the teacher (the default pipeline's DCNv2; ``--batch-size`` is PER RANK, the effective batch is
world x batch), rank 0 writes ``OUT/teacher/`` (model.pt, manifest.json, config.json, loadable with
cascade.run_data.load_ranker); then every rank scores its block of the sampled train requests and writes
``OUT/log/shard-r-of-W/``, rank 0 merges them into one log (``RankLog(OUT/log)``) and writes
``OUT/ddp_ranklog.json`` with the timings, which it also prints.

With ``--students`` every rank then trains the distilled two-tower pre-rank and retrieval students (the default
pipeline's StudentsSection: tower, loss weights, epochs; ``--student-batch-size`` is PER RANK) on that log with
DistributedDataParallel (cascade.train.students.train_student), and rank 0 writes
``OUT/students/distilled/{prerank,retrieval}/`` (model.pt, config.json, history.json: the pipeline's layout,
loadable with cascade.run_data.load_towers). The students train on the CPU even in a ``--device cuda`` job.
In-batch softmax negatives are per rank (see cascade/train/students.py).

    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_ranklog.py --data runs/tiny/data --out runs/ddp --students
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cascade import artifacts as A
from cascade import distributed as D
from cascade.config import to_dict
from cascade.data.requests import to_requests
from cascade.distill.ranklog import RankLog
from cascade.distill.shard_runner import build_rank_log_distributed
from cascade.models.ranker import Ranker
from cascade.models.scoring import ranker_scorer
from cascade.models.two_tower import build_two_tower
from cascade.pipeline.config import RankLogSection, StudentsSection, TeacherSection
from cascade.pipeline.ranklog import rank_log_inputs
from cascade.pipeline.students import click_lists
from cascade.run_data import RunData
from cascade.train.loop import fit
from cascade.train.students import evaluate_on_log, train_student


def train_students(data: RunData, frame, log_dir: Path, out: Path, batch_size: int | None, epochs: int | None,
                   seed: int, progress: bool) -> dict:
    """The distilled pre-rank and retrieval students on the rank log in ``log_dir`` (DDP under a process group);
    rank 0 writes ``out/distilled/{stage}/``. Returns {stage: {"fit_s", "steps", "valid" metrics, ...}}."""
    section = StudentsSection()
    inputs = data.tower_inputs(frame)
    log_ = RankLog(log_dir)
    clicks = click_lists(data, inputs, frame)
    summary = {}
    for stage, scfg in (("prerank", section.prerank), ("retrieval", section.retrieval)):
        scfg = dataclasses.replace(scfg, seed=seed, progress=progress,
                                   **({"batch_size": batch_size} if batch_size else {}),
                                   **({"epochs": epochs} if epochs else {}))
        towers = build_two_tower(inputs, section.tower, seed=seed)  # DDP broadcasts rank 0's weights
        D.barrier()
        t0 = time.perf_counter()
        hist = train_student(towers, inputs, log_, clicks, scfg)
        fit_s = time.perf_counter() - t0
        if D.is_main():
            d = out / "distilled" / stage
            A.save_torch(d / "model.pt", towers.state_dict())
            A.write_json(d / "config.json", to_dict(section.tower))
            A.write_json(d / "history.json", hist)
            summary[stage] = {"fit_s": fit_s, "per_rank_batch": scfg.batch_size, "epochs": scfg.epochs,
                              "requests_per_s": scfg.epochs * len(log_) / fit_s, "final_loss": hist[-1]["loss"],
                              "train_log": evaluate_on_log(towers, inputs, log_, k=10)}
    D.barrier()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a run's data folder (runs/<name>/data)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048, help="per rank")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--n-candidates", type=int, default=200)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--students", action="store_true", help="also train the two-tower students with DDP")
    ap.add_argument("--student-batch-size", type=int, default=None, help="per rank (default: the pipeline's)")
    ap.add_argument("--student-epochs", type=int, default=None, help="default: the pipeline's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    env = D.init_from_env(backend="nccl" if args.device == "cuda" else "gloo")
    out = Path(args.out)
    data = RunData(args.data)
    train, valid = data.encoded("train"), data.encoded("valid")
    teacher_section = TeacherSection()
    train_cfg = dataclasses.replace(teacher_section.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    seed=args.seed, device=args.device, progress=env.is_main)
    torch.manual_seed(args.seed)
    model = Ranker(train.spec, teacher_section.model)  # DDP broadcasts rank 0's initial weights to every rank
    D.barrier()
    t0 = time.perf_counter()
    res = fit(model, train, valid, train_cfg, ckpt_dir=out / "teacher")
    fit_s = time.perf_counter() - t0
    if env.is_main:
        A.write_json(out / "teacher" / "config.json", teacher_section.model.to_dict())
    model.eval()

    frame, cands, item_ids = rank_log_inputs(data, dataclasses.replace(
        RankLogSection(), max_requests=args.max_requests, n_candidates=args.n_candidates), args.seed)
    score = ranker_scorer(model, data)

    requests = to_requests(frame, data.context_names)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    D.barrier()
    t0 = time.perf_counter()
    man = build_rank_log_distributed(frame, cands, scorer, out / "log", progress=env.is_main, item_ids=item_ids,
                                     seed=args.seed)
    log_s = time.perf_counter() - t0
    students = (train_students(data, frame, out / "log", out / "students", args.student_batch_size,
                               args.student_epochs, args.seed, env.is_main) if args.students else None)
    if env.is_main:
        n_steps = res.history[-1]["step"] if res.history else 0
        summary = {
            "world_size": env.world_size, "backend": env.backend, "device": env.device,
            "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "train_rows": len(train), "per_rank_batch": args.batch_size,
            "effective_batch": args.batch_size * env.world_size, "epochs": args.epochs, "steps": n_steps,
            "fit_s": fit_s, "train_rows_per_s": n_steps * args.batch_size * env.world_size / fit_s,
            "best_valid_auc": res.best_valid_auc, "rank_log_s": log_s, "rank_log_pairs": man["n_rows"],
            "rank_log_pairs_per_s": man["n_rows"] / log_s,
        }
        if students is not None:
            summary["students"] = students
        A.write_json(out / "ddp_ranklog.json", summary)
        print(json.dumps(summary, indent=2))
    D.destroy()


if __name__ == "__main__":
    main()
