"""Throughput of the rank log: build_rank_log with a synthetic MLP ranker as scorer, and the RankLog reader.

A realistic small ranker: every (request, candidate) pair has ~30 embedded categorical columns (user, context and
item sides), concatenated and fed through an MLP. The scorer does what the pipeline's does: one gather of item
features and one forward per batch of many requests. The script reports scored pairs/s of the whole
build_rank_log (scoring + ranking + parquet writing), the share of time in the scorer, the sampler's and the
reader's rows/s, and writes benchmarks/results/bench_ranklog.json.

    python benchmarks/bench_ranklog.py --requests 20000 --candidates 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cascade.artifacts import package_versions, write_json
from cascade.distill.ranklog import RankLog, build_rank_log, sample_candidates


class SyntheticRanker(nn.Module):
    """Embeds user + context codes [R, Cuc] and item codes [R, L, Ci] (one table, per-column offsets), MLP -> [R, L].

    split=True computes the same function faster: the first linear layer is W [x_uc; x_i] = W_uc x_uc + W_i x_i,
    so the user + context part runs once per request instead of once per (request, candidate) pair.
    """

    def __init__(self, n_uc: int, n_item: int, vocab: int, emb_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        n_cols = n_uc + n_item
        self.n_uc, self.emb_dim = n_uc, emb_dim
        self.emb = nn.Embedding(n_cols * vocab, emb_dim)
        self.register_buffer("offsets", torch.arange(n_cols) * vocab)
        self.first = nn.Linear(n_cols * emb_dim, hidden[0])
        layers, d = [nn.ReLU(inplace=True)], hidden[0]
        for h in hidden[1:]:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, 1))
        self.rest = nn.Sequential(*layers)

    def forward(self, user_ctx: torch.Tensor, item: torch.Tensor, split: bool = True) -> torch.Tensor:
        r, l, _ = item.shape
        if not split:
            codes = torch.cat([user_ctx[:, None, :].expand(r, l, -1), item], dim=2) + self.offsets  # [R, L, C]
            return self.rest(self.first(self.emb(codes).flatten(2))).squeeze(-1)
        k = self.n_uc * self.emb_dim
        x_uc = self.emb(user_ctx + self.offsets[: self.n_uc]).flatten(1)  # [R, Cuc * e]
        x_i = self.emb(item + self.offsets[self.n_uc:]).flatten(2)  # [R, L, Ci * e]
        h = x_i @ self.first.weight[:, k:].T  # [R, L, h]: the only per-pair part of the first layer
        h += (x_uc @ self.first.weight[:, :k].T + self.first.bias)[:, None, :]  # in place: h is the big tensor
        return self.rest(h).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--user-cols", type=int, default=10)
    ap.add_argument("--ctx-cols", type=int, default=4)
    ap.add_argument("--item-cols", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--emb-dim", type=int, default=8)
    ap.add_argument("--hidden", type=str, default="256,128")
    ap.add_argument("--requests-per-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scorer", choices=("split", "naive"), default="split",
                    help="split: first MLP layer's user/context part once per request (same function, less work)")
    ap.add_argument("--bf16", action="store_true", help="score under CPU bf16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_ranklog.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    n_cols = args.user_cols + args.ctx_cols + args.item_cols
    model = SyntheticRanker(args.user_cols + args.ctx_cols, args.item_cols, args.vocab, args.emb_dim, hidden).eval()
    user_cat = torch.from_numpy(rng.integers(0, args.vocab, (args.users, args.user_cols)))
    ctx_cat = torch.from_numpy(rng.integers(0, args.vocab, (args.requests, args.ctx_cols)))
    item_cat = torch.from_numpy(rng.integers(0, args.vocab, (args.items, args.item_cols)))
    requests = pd.DataFrame({
        "request_id": np.arange(args.requests, dtype=np.int64),
        "user_id": rng.integers(0, args.users, args.requests).astype(np.int64),
        "time_ms": np.arange(args.requests, dtype=np.int64) * 1000,
    })
    requests["user_row"] = requests["user_id"]
    user_row = torch.from_numpy(requests["user_row"].to_numpy().copy())

    @torch.inference_mode()
    def scorer(rows: np.ndarray, cand: np.ndarray) -> torch.Tensor:
        r = torch.from_numpy(rows)
        uc = torch.cat([user_cat[user_row[r]], ctx_cat[r]], dim=1)  # one gather of user + context codes
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            return model(uc, item_cat[torch.from_numpy(cand)], split=args.scorer == "split").float()

    pop = rng.pareto(1.2, args.items) + 1e-3
    impressed = rng.integers(0, args.items, (args.requests, 20))
    t = time.perf_counter()
    cand = sample_candidates(impressed, args.items, args.candidates, pop_weights=pop, rng=rng)
    sample_s = time.perf_counter() - t
    n_pairs = int((cand >= 0).sum())

    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (allocator, thread pool) on a slice, then the timed run
        build_rank_log(requests.iloc[:512].reset_index(drop=True), cand[:512], scorer, Path(tmp) / "warm",
                       requests_per_batch=args.requests_per_batch, progress=False)
        t, c = time.perf_counter(), time.process_time()
        man = build_rank_log(requests, cand, scorer, Path(tmp) / "log", requests_per_batch=args.requests_per_batch,
                             progress=False)
        build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - c
        score_s = man["metrics"]["score_s"]
        t = time.perf_counter()
        rl = RankLog(Path(tmp) / "log")
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        rl_nv = RankLog(Path(tmp) / "log", verify=False)
        read_nv_s = time.perf_counter() - t
        assert rl_nv.items.shape == rl.items.shape == cand.shape
        disk = sum(p.stat().st_size for p in (Path(tmp) / "log").glob("*.parquet"))

    result = {
        "benchmark": "bench_ranklog",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": list(os.getloadavg())},
        "versions": package_versions(),
        "config": vars(args) | {"out": str(args.out.name), "n_cols": n_cols, "hidden": list(hidden)},
        "n_pairs": n_pairs,
        "sample_candidates_rows_per_s": args.requests / sample_s,
        "build_pairs_per_s": n_pairs / build_s,
        "build_s": build_s,
        # CPU seconds of all this process's threads: on a shared machine pairs per CPU-second x threads is the
        # throughput the run would have had with its cores to itself (wall time also counts waiting)
        "build_cpu_s": build_cpu_s,
        "build_pairs_per_cpu_s": n_pairs / build_cpu_s,
        "scorer_s": score_s,
        "scorer_share": score_s / build_s,
        "log_machinery_pairs_per_s": n_pairs / max(build_s - score_s, 1e-9),
        "reader_rows_per_s_verified": n_pairs / read_s,
        "reader_rows_per_s_unverified": n_pairs / read_nv_s,
        "bytes_per_pair_on_disk": disk / n_pairs,
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "config")}, indent=2))


if __name__ == "__main__":
    main()
