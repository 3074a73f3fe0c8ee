"""Teacher training with DistributedDataParallel and sharded rank-log scoring, on a run's data folder.

Run it under torchrun (one process per GPU on a GPU node, or N CPU processes with gloo):

    torchrun --nproc_per_node 2 benchmarks/ddp_ranklog.py --data runs/tiny/data --out runs/ddp
    torchrun --nnodes 2 --node_rank K --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        benchmarks/ddp_ranklog.py --data runs/default/data --out /shared/runs/ddp --device cuda

or as one plain process (no torchrun: no process group, the single-process baseline). Every rank reads the data
folder, trains the teacher (the default pipeline's DCNv2; ``--batch-size`` is PER RANK, the effective batch is
world x batch), rank 0 writes ``OUT/teacher/`` (model.pt, manifest.json, config.json, loadable with
cascade.serve.run.load_ranker); then every rank scores its block of the sampled train requests and writes
``OUT/log/shard-r-of-W/``, rank 0 merges them into one log (``RankLog(OUT/log)``) and writes
``OUT/ddp_ranklog.json`` with the timings, which it also prints.
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
from cascade.distill.shard_runner import build_rank_log_distributed
from cascade.models.ranker import Ranker
from cascade.pipeline import RankLogSection, TeacherSection, rank_log_inputs
from cascade.serve.run import RunData, ranker_scorer, to_requests
from cascade.train import distributed as D
from cascade.train.loop import fit


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
        A.write_json(out / "ddp_ranklog.json", summary)
        print(json.dumps(summary, indent=2))
    D.destroy()


if __name__ == "__main__":
    main()
