"""Teacher training with DistributedDataParallel and sharded rank-log scoring, on a run's data folder: the
multi-GPU / multi-process entry point (:func:`run_distributed_ranklog`; the command line is ``cascade ddp-ranklog``).

Run it under torchrun (one process per GPU on a GPU node, or N CPU processes with gloo):

    torchrun --standalone --nproc_per_node 2 -m cascade.cli ddp-ranklog --data runs/tiny/data --out runs/ddp
    torchrun --nnodes 2 --node_rank K --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m cascade.cli ddp-ranklog --data runs/default/data --out /shared/runs/ddp --device cuda

or as one plain process (``cascade ddp-ranklog ...``: no process group, the single-process baseline). Every rank
reads the data
folder, trains the teacher (the default pipeline's DCNv2; ``--batch-size`` is PER RANK, the effective batch is
world x batch), rank 0 writes ``OUT/teacher/`` (model.pt, manifest.json, config.json, loadable with
cascade.run_data.load_ranker); then every rank scores its block of the sampled train requests and writes
``OUT/log/shard-r-of-W/``, rank 0 merges them into one log (``RankLog(OUT/log)``) and writes
``OUT/ddp_ranklog.json`` with the timings (the command prints them).

With ``--students`` every rank then trains the distilled two-tower pre-rank and retrieval students (the default
pipeline's StudentsSection: tower, loss weights, its configured epochs, not the pipeline's choice of training
length, which needs the validation judge; ``--student-batch-size`` is PER RANK) on that log with
DistributedDataParallel (cascade.train.students.train_student), and rank 0 writes
``OUT/students/distilled/{prerank,retrieval}/`` (model.pt, config.json, history.json: the pipeline's layout,
loadable with cascade.run_data.load_towers). The students train on the CPU even in a ``--device cuda`` job.
In-batch softmax negatives are per rank (see cascade/train/students.py).

    torchrun --standalone --nproc_per_node 2 -m cascade.cli ddp-ranklog --data runs/tiny/data --out runs/ddp --students
"""

from __future__ import annotations

import dataclasses
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
    rank 0 writes ``out/distilled/{stage}/`` (stage: the cascade stage, prerank or retrieval). Returns
    {stage: {"fit_s", "steps", "valid" metrics, ...}}."""
    section = StudentsSection()
    inputs = data.tower_inputs(frame, section.tower.history_length)
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


def run_distributed_ranklog(data_dir: str | Path, out: str | Path, epochs: int = 1, batch_size: int = 2048,
                            lr: float = 2e-3, max_requests: int = 2000, n_candidates: int = 200, device: str = "cpu",
                            seed: int = 0, students: bool = False, student_batch_size: int | None = None,
                            student_epochs: int | None = None) -> dict | None:
    """Join torchrun's process group (none in a plain process), train the default pipeline's teacher with DDP on
    ``data_dir`` (``batch_size`` per rank), score the sampled train requests into a sharded rank log and, with
    ``students``, train the distilled two-tower students on it; see the module docstring. Rank 0 writes
    ``out/ddp_ranklog.json`` and returns the summary (timings, throughput, validation AUC); other ranks return None.
    """
    env = D.init_from_env(backend="nccl" if device == "cuda" else "gloo")
    out = Path(out)
    data = RunData(data_dir)
    train, valid = data.encoded("train"), data.encoded("valid")
    teacher_section = TeacherSection()
    # --batch-size is per rank and taken as given: no small-log floor (fit refuses one under torch.distributed)
    train_cfg = dataclasses.replace(teacher_section.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                    seed=seed, device=device, progress=env.is_main, min_steps_per_epoch=None)
    torch.manual_seed(seed)
    model = Ranker(train.spec, teacher_section.model)  # DDP broadcasts rank 0's initial weights to every rank
    D.barrier()
    t0 = time.perf_counter()
    res = fit(model, train, valid, train_cfg, ckpt_dir=out / "teacher")
    fit_s = time.perf_counter() - t0
    if env.is_main:
        A.write_json(out / "teacher" / "config.json", teacher_section.model.to_dict())
    model.eval()

    # no channels step here: impressed items and corpus samples only
    frame, cands, item_ids, _ = rank_log_inputs(data, dataclasses.replace(
        RankLogSection(), max_requests=max_requests, n_candidates=n_candidates, channel_share=0.0), seed)
    score = ranker_scorer(model, data)
    requests = to_requests(frame, data.context_names)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    D.barrier()
    t0 = time.perf_counter()
    man = build_rank_log_distributed(frame, cands, scorer, out / "log", progress=env.is_main, item_ids=item_ids,
                                     seed=seed, workers=torch.get_num_threads())
    log_s = time.perf_counter() - t0
    student_summary = (train_students(data, frame, out / "log", out / "students", student_batch_size,
                                      student_epochs, seed, env.is_main) if students else None)
    summary = None
    if env.is_main:
        n_steps = res.history[-1]["step"] if res.history else 0
        summary = {
            "world_size": env.world_size, "backend": env.backend, "device": env.device,
            "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "train_rows": len(train), "per_rank_batch": batch_size,
            "effective_batch": batch_size * env.world_size, "epochs": epochs, "steps": n_steps,
            "fit_s": fit_s, "train_rows_per_s": n_steps * batch_size * env.world_size / fit_s,
            "best_valid_auc": res.best_valid_auc, "rank_log_s": log_s, "rank_log_pairs": man["n_rows"],
            "rank_log_pairs_per_s": man["n_rows"] / log_s,
        }
        if student_summary is not None:
            summary["students"] = student_summary
        A.write_json(out / "ddp_ranklog.json", summary)
    D.destroy()
    return summary
