"""Training throughput of the teacher (DeepFM, 16-d embeddings, MLP 400-400-400, batch 4096) on this CPU, side by
side with DeepCTR-Torch's DeepFM of the same sizes on the same data, plus the compute-bound limit and inference
latency of teacher and student per 100 candidates.

    python benchmarks/bench_train.py --data-dir runs/default/data --deepctr-python /tmp/deepctr-venv/bin/python

Data: the encoded tables of a pipeline data step (the default world), the model's sides user + item + context +
cross (the privileged side left out); the most recent ``--train-rows`` train rows, test whole. Each contender
trains ONE epoch over the same rows at batch 4096 and is scored on the test split (AUC, logloss).

- ours: :class:`cascade.models.ranker.Ranker` (backbone "deepfm") in the same step as ``cascade.train.loop.fit``
  (iter_batches slice -> to_tensors -> forward -> BCE -> backward -> step), with these set-ups: AdamW (fused;
  ``fit``'s default), Adam(fused=True), sparse embedding gradients with SparseAdam + fused Adam on the dense part
  (lazy Adam), sparse embeddings with Adagrad (``TrainConfig(optimizer="adagrad")``), and the forward under
  bfloat16 autocast (``TrainConfig(autocast="bf16")``: logits and losses in float32) with AdamW and with lazy Adam,
  and the step through ``torch.compile`` (``TrainConfig(compile=True)``), compiled for the epoch's batch shapes
  before its epoch is timed (the compilation's seconds are reported beside it).
- DeepCTR-Torch 0.3.0 runs in its OWN virtual environment (``--deepctr-python``; never a project dependency)
  on the same arrays, written to a temporary npz: ``DeepFM(dnn_hidden_units=(400, 400, 400))``, 16-d SparseFeat
  per categorical column, DenseFeat per numeric column, ``compile("adam", "binary_crossentropy")`` with no
  per-batch metric (its fastest setting), its defaults otherwise (L2 on embeddings 1e-5).
- compute-bound limit: FLOPs of one training sample (3 x the forward GEMM FLOPs of every Linear, plus the FM
  term; gathers and element-wise work not counted) against the float32 GEMM rate of torch.mm (2048^3) with the
  same thread count, measured right before and after each trainer's epoch (the shared machine's load moves it).
- the machine's own bounds (:func:`cascade.machine.machine_bounds`: float32 and bf16 GEMM GFLOP/s, memory GB/s,
  AMX present), measured at the start and printed; every trainer is also given as a % of the bound of the type
  its GEMMs run in (float32 or bf16), and the result records the CPU (:func:`cascade.machine.machine_record`).
- a second data set, Criteo-sized (26 fields x 100k ids: 42 M embedding parameters), shows the levers where the
  optimizer update over the embedding tables, not the MLP, dominates a step.
- latency: p50 / p99 ms of one forward pass over 100 test candidates (1 thread, inference_mode) for the
  benchmark DeepFM, the pipeline's teacher and the rank student.

Writes benchmarks/results/bench_train.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cascade import artifacts as A
from cascade.data.batches import EncodedTable, FeatureSpec, iter_batches
from cascade.distill.losses import click_bce
from cascade.machine import format_bounds, gemm_rates, largest_gemm, machine_bounds, machine_record, resolve_autocast
from cascade.models.layers import FactorizationMachine
from cascade.models.ranker import Ranker, RankerConfig
from cascade.pipeline import load_config
from cascade.train.loop import TrainConfig, _mark_sparse, make_optimizer, predict, score_metrics, to_tensors

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("user", "item", "context", "cross")
MODEL = RankerConfig(backbone="deepfm", emb_dim=16, mlp=(400, 400, 400), sides=SIDES)

DEEPCTR_SCRIPT = r'''
import json, sys, time
import numpy as np, torch
from sklearn.metrics import log_loss, roc_auc_score
from deepctr_torch.inputs import DenseFeat, SparseFeat
from deepctr_torch.models import DeepFM

d = np.load(sys.argv[1], allow_pickle=False)
threads, batch, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(seed)
cat_names, num_names, cards = list(d["cat_names"]), list(d["num_names"]), [int(c) for c in d["cards"]]
cols = [SparseFeat(n, vocabulary_size=c, embedding_dim=16) for n, c in zip(cat_names, cards)]
cols += [DenseFeat(n, 1) for n in num_names]

def inputs(prefix):
    x = {n: d[prefix + "_cat"][:, j] for j, n in enumerate(cat_names)}
    x.update({n: d[prefix + "_num"][:, j] for j, n in enumerate(num_names)})
    return x

model = DeepFM(cols, cols, dnn_hidden_units=(400, 400, 400), task="binary", device="cpu", seed=seed)
model.compile("adam", "binary_crossentropy")
x, y = inputs("train"), d["train_y"].astype(np.float32)
t0 = time.perf_counter()
model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
wall = time.perf_counter() - t0
p = model.predict(inputs("test"), batch_size=65536).reshape(-1)
yt = d["test_y"]
print(json.dumps({"fit_s": wall, "samples_per_s": len(y) / wall, "auc": float(roc_auc_score(yt, p)),
                  "logloss": float(log_loss(yt, np.clip(p, 1e-7, 1 - 1e-7))),
                  "params": int(sum(q.numel() for q in model.parameters())),
                  "torch": torch.__version__}))
'''


def load_split(data_dir: Path, split: str) -> EncodedTable:
    spec = FeatureSpec.from_dict(A.read_json(data_dir / "spec.json"))
    return EncodedTable.from_arrays(spec, A.read_npz(data_dir / f"encoded_{split}.npz"))


def synthetic_tables(n_train: int, n_test: int, n_fields: int = 26, vocab: int = 100_000, n_num: int = 13,
                     seed: int = 0) -> tuple[EncodedTable, EncodedTable]:
    """A Criteo-sized click table with planted structure: ``n_fields`` categorical columns of ``vocab`` values
    (Zipf-distributed ids, so popular ids repeat and can be learned) and ``n_num`` standard-normal numerics;
    click ~ Bernoulli(sigmoid(sum over fields of a per-id effect + a linear numeric term - 0.5)).

    Returns (train, test) EncodedTables; categorical codes in [1, vocab) (0 stays the OOV row).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    ids = np.minimum(rng.zipf(1.2, size=(n, n_fields)), vocab - 1).astype(np.int64)
    # a per-field random permutation so that the popular ids differ between fields
    perm = np.stack([rng.permutation(vocab - 1) + 1 for _ in range(n_fields)])
    cat = perm[np.arange(n_fields)[None, :], ids - 1]  # [n, n_fields]
    effect = rng.normal(0.0, 0.6 / np.sqrt(n_fields / 4), size=(n_fields, vocab)).astype(np.float32)
    num = rng.standard_normal((n, n_num)).astype(np.float32)
    logit = effect[np.arange(n_fields), cat].sum(1) + num @ rng.normal(0, 0.3, n_num).astype(np.float32) - 0.5
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    spec = FeatureSpec(tuple(f"c{j}" for j in range(n_fields)), ("item",) * n_fields, (vocab,) * n_fields,
                       tuple(f"n{j}" for j in range(n_num)), ("context",) * n_num)
    rows = np.arange(n, dtype=np.int64)
    full = EncodedTable(spec, cat, num, label, rows, rows % 1000, rows, rows, np.zeros(n, np.int8))
    return full.take(slice(0, n_train)), full.take(slice(n_train, n))


def train_flops_per_sample(model: Ranker) -> dict[str, float]:
    """FLOPs of one training sample: forward = 2 x MACs of every Linear + the FM term (about 3 F d); training =
    3 x forward (backward needs the input- and the weight-gradient GEMM; the input gradient of the first layer
    is needed because the embeddings train)."""
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    fwd = 2.0 * macs
    if any(isinstance(m, FactorizationMachine) for m in model.modules()):
        fwd += 3.0 * len(model.field_names) * model.cfg.emb_dim
    return {"linear_macs": float(macs), "forward_flops": fwd, "train_flops": 3.0 * fwd}


def optimizer_for(model: nn.Module, kind: str, lr: float, adagrad_lr: float) -> list[torch.optim.Optimizer]:
    sparse = [p for p in model.parameters() if getattr(p, "_cascade_sparse", False)]
    dense = [p for p in model.parameters() if not getattr(p, "_cascade_sparse", False)]
    if kind == "adamw":
        return [make_optimizer(list(model.parameters()), TrainConfig(optimizer="adamw", lr=lr))]
    if kind == "adam_fused":
        return [torch.optim.Adam(dense, lr=lr, fused=True)]
    if kind == "sparse_adam":
        return [torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr, fused=True)]
    return [make_optimizer(list(model.parameters()), TrainConfig(optimizer="adagrad", lr=adagrad_lr))]


DEEPCTR = "DeepCTR-Torch 0.3.0 DeepFM"
VARIANTS = {  # name -> (optimizer kind, sparse embedding gradients, TrainConfig.autocast, TrainConfig.compile)
    "ours: AdamW (fused, fit's default)": ("adamw", False, "off", False),  # float32: autocast off
    "ours: Adam fused": ("adam_fused", False, "off", False),
    "ours: sparse emb + SparseAdam, fused Adam dense": ("sparse_adam", True, "off", False),
    "ours: sparse emb + Adagrad": ("adagrad", True, "off", False),
    "ours: AdamW, bf16 autocast (TrainConfig(autocast=\"bf16\"))": ("adamw", False, "bf16", False),
    "ours: sparse emb + SparseAdam, fused Adam, bf16 autocast": ("sparse_adam", True, "bf16", False),
    "ours: AdamW, autocast \"auto\" (fit's default)": ("adamw", False, "auto", False),
    "ours: AdamW, torch.compile (TrainConfig(compile=True))": ("adamw", False, "off", True),
    "ours: AdamW, bf16 autocast + torch.compile": ("adamw", False, "bf16", True),
    "ours: sparse emb + SparseAdam, fused Adam, bf16 + torch.compile": ("sparse_adam", True, "bf16", True),
}


def train_one_epoch(model: Ranker, opts: list[torch.optim.Optimizer], train: EncodedTable, batch_size: int,
                    seed: int, bf16: bool = False) -> float:
    """One epoch of fit's step (batch slice -> tensors -> forward -> BCE -> backward -> step); returns seconds.

    bf16: run the forward under CPU autocast to bfloat16 (the GEMMs in bf16, weights and optimizer in float32), as
    ``fit`` does with ``TrainConfig(autocast="bf16")``.
    """
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for b in iter_batches(train, batch_size, rng):
        t = to_tensors({"cat": b["cat"], "num": b["num"], "label": b["label"]})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit = model(t["cat"], t["num"])
        loss = click_bce(logit.float(), t["label"])
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return time.perf_counter() - t0


def compiled_warm(model: Ranker, kind: str, train: EncodedTable, args, bf16: bool) -> tuple[nn.Module, float]:
    """``torch.compile(model)`` compiled for every batch shape of an epoch (a full batch, the epoch's tail) by
    training steps on the first rows with throw-away optimizers, then the weights put back: the timed epoch starts
    from the same weights as every other trainer's. Returns (compiled module, seconds the compilation took)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)
    tail = len(train) % args.batch_size
    rows = np.arange(min(len(train), 2 * args.batch_size + tail))
    t0 = time.perf_counter()
    warm = train.take(rows)
    train_one_epoch(compiled, optimizer_for(model, kind, args.lr, args.adagrad_lr), warm, args.batch_size, args.seed,
                    bf16=bf16)
    seconds = time.perf_counter() - t0
    model.load_state_dict(state)
    return compiled, seconds


def latency(model: nn.Module, table: EncodedTable, n: int = 100, repeats: int = 300, warmup: int = 20) -> dict:
    """p50 / p99 ms of one forward pass over ``n`` rows of ``table`` (1 thread, inference_mode)."""
    cat, num = torch.as_tensor(table.cat[:n]), torch.as_tensor(table.num[:n])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(cat, num)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "params": int(sum(p.numel() for p in model.parameters())),
            "size_mb": float(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)}


def run_deepctr(python: str, train: EncodedTable, test: EncodedTable, cat_idx: list[int], num_idx: list[int],
                threads: int, batch_size: int, seed: int) -> dict:
    spec = train.spec
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.npz"
        np.savez(path, cat_names=np.array([spec.cat_names[j] for j in cat_idx]),
                 num_names=np.array([spec.num_names[j] for j in num_idx]),
                 cards=np.array([spec.cat_cardinality[j] for j in cat_idx]),
                 train_cat=train.cat[:, cat_idx], train_num=train.num[:, num_idx], train_y=train.label,
                 test_cat=test.cat[:, cat_idx], test_num=test.num[:, num_idx], test_y=test.label)
        script = Path(d) / "deepctr_run.py"
        script.write_text(DEEPCTR_SCRIPT)
        r = subprocess.run([python, str(script), str(path), str(threads), str(batch_size), str(seed)],
                           capture_output=True, text=True, cwd=d)
    if r.returncode != 0:
        raise RuntimeError(f"DeepCTR-Torch run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_dataset(train: EncodedTable, test: EncodedTable, args, deepctr_python: str | None) -> dict:
    """Every trainer of VARIANTS (+ DeepCTR-Torch) for one epoch on ``train``; samples/s and test AUC each."""
    spec = train.spec
    cat_idx, num_idx = spec.cat_index(*SIDES), spec.num_index(*SIDES)
    results: dict[str, dict] = {}
    flops = None
    for name, (kind, sparse, autocast, compiled) in VARIANTS.items():
        model = Ranker(spec, dataclasses.replace(MODEL, sparse=sparse), seed=args.seed)
        _mark_sparse(model)
        amp = resolve_autocast(autocast, "cpu", largest_gemm(model, args.batch_size), what=name)
        bf16 = amp.bf16
        flops = flops or train_flops_per_sample(model)
        step_model, compile_s = model, None
        if compiled:
            step_model, compile_s = compiled_warm(model, kind, train, args, bf16)
        opts = optimizer_for(model, kind, args.lr, args.adagrad_lr)
        g0 = gemm_rates(n=2048, repeats=5)["median_gflops"]
        wall = train_one_epoch(step_model, opts, train, args.batch_size, args.seed, bf16=bf16)
        g1 = gemm_rates(n=2048, repeats=5)["median_gflops"]
        m = score_metrics(test.label, predict(model, test), test.user_id)
        results[name] = {"fit_s": wall, "samples_per_s": len(train) / wall, "auc": m["auc"], "logloss": m["logloss"],
                         "params": int(sum(q.numel() for q in model.parameters())), "gemm_gflops_adjacent": (g0, g1),
                         "autocast": amp.to_dict(), "compile_s": compile_s}
        print(f"  {name:48s} {results[name]['samples_per_s']:9,.0f} samples/s  AUC {m['auc']:.4f} "
              f"(GEMM {g0:.0f} / {g1:.0f} GFLOP/s)" + (f", compiled in {compile_s:.1f} s" if compiled else ""),
              flush=True)
    if deepctr_python:
        t = time.perf_counter()
        g0 = gemm_rates(n=2048, repeats=5)["median_gflops"]
        r = results[DEEPCTR] = run_deepctr(deepctr_python, train, test, cat_idx, num_idx, args.threads,
                                           args.batch_size, args.seed)
        r["gemm_gflops_adjacent"] = (g0, gemm_rates(n=2048, repeats=5)["median_gflops"])
        print(f"  {DEEPCTR:48s} {r['samples_per_s']:9,.0f} samples/s  AUC {r['auc']:.4f} "
              f"({time.perf_counter() - t:.0f} s with set-up)", flush=True)
    return {"rows": {"train": len(train), "test": len(test)}, "n_categorical": len(cat_idx),
            "n_numeric": len(num_idx), "vocabulary_rows": int(sum(spec.cat_cardinality[j] for j in cat_idx)),
            "flops_per_sample": flops, "trainers": results}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a pipeline data step folder (runs/<run>/data)")
    p.add_argument("--config", default=str(ROOT / "pipelines" / "default.toml"), help="for the latency models")
    p.add_argument("--deepctr-python", default=None, help="python of a venv with deepctr-torch (skipped if absent)")
    p.add_argument("--train-rows", type=int, default=150_000)
    p.add_argument("--synthetic-vocab", type=int, default=100_000,
                   help="also run a Criteo-sized synthetic set (26 fields x this vocabulary); 0 skips it")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adagrad-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load = {"start": os.getloadavg()}
    cfg = load_config(args.config)  # the latency models' configs; read first so a bad config fails before the runs

    data_dir = Path(args.data_dir)
    train_full, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    order = np.argsort(train_full.time_ms, kind="stable")[-args.train_rows:]  # the most recent rows
    train = train_full.take(np.sort(order))
    del train_full
    print(f"load average {load['start']}", flush=True)
    bounds = machine_bounds(args.threads)
    print(f"machine bounds: {format_bounds(bounds)}", flush=True)
    gemm = {"before": gemm_rates(n=2048, repeats=10)}
    print(f"GEMM before: {gemm['before']}", flush=True)
    datasets = {}
    print(f"world: {len(train):,} train rows", flush=True)
    datasets["world"] = bench_dataset(train, test, args, args.deepctr_python)
    if args.synthetic_vocab:
        s_train, s_test = synthetic_tables(args.train_rows, 50_000, vocab=args.synthetic_vocab, seed=args.seed)
        print(f"synthetic: {len(s_train):,} train rows, 26 x {args.synthetic_vocab:,} vocabulary", flush=True)
        datasets["synthetic"] = bench_dataset(s_train, s_test, args, args.deepctr_python)
    gemm["after"] = gemm_rates(n=2048, repeats=10)
    gemm["bf16"] = gemm_rates(torch.bfloat16, n=2048, repeats=10)
    load["end"] = os.getloadavg()
    # The load of the shared machine moves the GEMM rate during the run, so each trainer is held against the rate
    # measured right before and after its own epoch; the dataset's limit uses the mean of those rates.
    for d in datasets.values():
        train_flops = d["flops_per_sample"]["train_flops"]
        rates = [g for r in d["trainers"].values() for g in r["gemm_gflops_adjacent"]]
        d["gemm_gflops_mean"] = float(np.mean(rates))
        d["compute_bound_samples_per_s"] = d["gemm_gflops_mean"] * 1e9 / train_flops
        ref = d["trainers"].get(DEEPCTR)
        for r in d["trainers"].values():
            r["compute_bound_samples_per_s"] = float(np.mean(r["gemm_gflops_adjacent"])) * 1e9 / train_flops
            r["pct_of_compute_bound"] = 100.0 * r["samples_per_s"] / r["compute_bound_samples_per_s"]
            rate = bounds["bf16_gflops" if r.get("autocast", {}).get("dtype") == "bf16" else "float32_gflops"]
            r["pct_of_machine_bound"] = 100.0 * r["samples_per_s"] * train_flops / (rate * 1e9)
            if ref is not None:
                r["speedup_vs_deepctr"] = r["samples_per_s"] / ref["samples_per_s"]
                r["auc_minus_deepctr"] = r["auc"] - ref["auc"]
        # The fastest any trainer of this model can go here: every training FLOP at the best GEMM rate this CPU
        # reaches in float32 or in bfloat16 (the narrowest type torch trains in on a CPU), nothing else counted.
        d["bf16_compute_bound_samples_per_s"] = gemm["bf16"]["best_gflops"] * 1e9 / train_flops
        if ref is not None:
            d["ten_x_deepctr"] = {"samples_per_s": 10.0 * ref["samples_per_s"],
                                  "gflops_needed": 10.0 * ref["samples_per_s"] * train_flops / 1e9}

    spec = train.spec
    lat = {"benchmark DeepFM 16-d 400-400-400": latency(Ranker(spec, MODEL, seed=0), test),
           f"pipeline teacher ({cfg.teacher.model.backbone})": latency(Ranker(spec, cfg.teacher.model, seed=0), test),
           "rank student": latency(Ranker(spec, cfg.students.rank_student, seed=0), test)}

    titles = {"world": "default world (the most recent train rows; sides " + ", ".join(SIDES) + ")",
              "synthetic": f"synthetic Criteo-sized set (26 fields x {args.synthetic_vocab:,} Zipf ids, 13 numerics, "
                           "planted logistic clicks)"}
    lines = ["# Training throughput: the teacher DeepFM vs DeepCTR-Torch", "",
             f"DeepFM with 16-d embeddings and a 400-400-400 MLP, batch {args.batch_size}, one epoch each over the "
             f"same rows, {args.threads} torch thread(s), test AUC after that epoch. Load average of the "
             f"{os.cpu_count()}-core machine {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end (the "
             f"benchmark itself keeps {args.threads} busy); compare rates within this run: the GEMM rates measured "
             f"alongside show the share of the CPU it got. Machine bounds at the start: {format_bounds(bounds)}; "
             f"\"% of its bound\" holds each trainer against the GEMM rate of the type its GEMMs run in. float32 "
             f"GEMM (torch.mm 2048^3, same threads) median "
             f"{gemm['before']['median_gflops']:.1f} GFLOP/s at the start, {gemm['after']['median_gflops']:.1f} at "
             f"the end; bfloat16 GEMM best {gemm['bf16']['best_gflops']:.1f} GFLOP/s. The bf16 row runs "
             f"its GEMMs in bfloat16, so it can pass the float32 bound.", ""]
    fp32_best = max(gemm["before"]["best_gflops"], gemm["after"]["best_gflops"])
    for key, d in datasets.items():
        f = d["flops_per_sample"]
        lines += [f"## {titles[key]}", "",
                  f"{d['rows']['train']:,} train / {d['rows']['test']:,} test rows, {d['n_categorical']} categorical "
                  f"({d['vocabulary_rows']:,} embedding rows) + {d['n_numeric']} numeric columns. FLOPs per training "
                  f"sample {f['train_flops'] / 1e6:.2f} M (forward {f['forward_flops'] / 1e6:.2f} M); float32 GEMM "
                  f"{d['gemm_gflops_mean']:.1f} GFLOP/s on average -> compute-bound limit "
                  f"{d['compute_bound_samples_per_s']:,.0f} samples/s. Each trainer's % uses the GEMM rate measured "
                  f"right before and after its own epoch.", "",
                  "| trainer | samples/s | x DeepCTR | GEMM GFLOP/s (before / after) | % of float32 compute bound "
                  "| % of its bound | test AUC | logloss | params |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in d["trainers"].items():
            sp = f"{r['speedup_vs_deepctr']:.1f}" if "speedup_vs_deepctr" in r else "–"
            g0, g1 = r["gemm_gflops_adjacent"]
            lines.append(f"| {name} | {r['samples_per_s']:,.0f} | {sp} | {g0:.0f} / {g1:.0f} | "
                         f"{r['pct_of_compute_bound']:.0f}% | {_pct(r.get('pct_of_machine_bound'))} | "
                         f"{r['auc']:.4f} | {r['logloss']:.4f} | {r['params']:,} |")
        if "ten_x_deepctr" in d:
            t = d["ten_x_deepctr"]
            lines += ["", f"10x DeepCTR-Torch here would be {t['samples_per_s']:,.0f} samples/s, i.e. "
                          f"{t['gflops_needed']:,.0f} GFLOP/s of GEMM work alone: "
                          f"{t['gflops_needed'] / fp32_best:.1f}x this CPU's float32 GEMM rate and "
                          f"{t['gflops_needed'] / gemm['bf16']['best_gflops']:.1f}x its bfloat16 GEMM rate on the same "
                          f"threads (bfloat16 compute-bound limit {d['bf16_compute_bound_samples_per_s']:,.0f} "
                          f"samples/s = {d['bf16_compute_bound_samples_per_s'] / t['samples_per_s'] * 10:.1f}x "
                          f"DeepCTR-Torch)."]
        lines.append("")
    lines += ["## Inference latency per 100 candidates (world rows, 1 thread, one forward pass)", "",
              "| model | p50 ms | p99 ms | params | MB |", "|---|---|---|---|---|"]
    for name, r in lat.items():
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['params']:,} | {r['size_mb']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    A.write_text(out / "bench_train.md", md)
    A.write_json(out / "bench_train.json", {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "deepctr_python", "config")},
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "load_average": load,
        "cpu": machine_record(), "bounds": bounds,
        "versions": A.package_versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": MODEL.to_dict(), "gemm": gemm, "datasets": datasets, "latency_per_100": lat,
        "markdown": md, "wall_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
