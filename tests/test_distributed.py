"""Data-parallel training (DDP over gloo, 2 CPU processes) and sharded rank-log scoring.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every distributed scenario (process start-up dominates the
cost); each rank saves what it ended with under tmp_path and the parent compares with single-process runs.
Uses the planted-signal table of tests/test_ranker.py and, for the two-tower students, the synthetic world of
tests/test_two_tower.py (its rank log is written by the parent before the spawn).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cascade import distributed as D
from cascade.artifacts import load_torch, read_manifest, save_torch
from cascade.distill.ranklog import RankLog, build_rank_log, sample_candidates
from cascade.distill.shard_runner import build_rank_log_distributed
from cascade.models.ranker import Ranker, RankerConfig
from cascade.models.two_tower import TowerConfig, build_two_tower
from cascade.train.joint import DistillConfig, JointRanker, joint_loss
from cascade.train.loop import CHECKPOINT, TrainConfig, fit
from cascade.train.students import ClickLists, StudentConfig, train_student
from worlds import SPEC, make_table, rank_log_world, tower_world

TINY = RankerConfig(emb_dim=4, mlp=(8,))
WORLD = 2
N_TRAIN = 1280  # = 10 global batches of 128: no tail, so every step of both runs averages the same 128 rows
BATCH = 128  # single-process batch; each of the 2 ranks takes BATCH // 2 rows of it
# Tolerance for DDP vs single process: the same rows per step and DDP's gradient mean (sum of 2 half-batch means
# / 2) differ from the full-batch mean only in float32 summation order (~1e-7 relative); 20 AdamW steps keep that
# well under 1e-5 (Adam divides by sqrt(v), so it does not amplify relative errors).
WEIGHT_ATOL = 1e-5
AUC_ATOL = 1e-4


# Two-tower students: 64 users x 4 = 256 training requests, 20 candidates each (full lists: no padding), 10
# impressed with clicks. Single-process batch 64 = 2 ranks x 32: 4 steps per epoch, 3 epochs, no tail.
STUDENT_BATCH = 64
STUDENT_TOWER = TowerConfig(emb_dim=4, hidden=(16,), out_dim=8)  # no dropout: it would draw per rank
# Terms without sampling whose batch value is a mean over requests or over list entries (every list is full, so
# a rank's half-batch has exactly half the entries): 2 ranks and one process take the same step up to float32
# summation order. Left out by design: bpr / tail_samples (pairs and negatives drawn per rank) and
# sampled_softmax (in-batch negatives are the rank's own 31 positives, not the 63 of one batch of 64).
STUDENT_WEIGHTS = {"pointwise": 1.0, "lambda_ndcg": 1.0, "approx_ndcg": 0.5, "listnet": 1.0, "logit_mse": 0.01,
                   "click_bce": 0.5}
# Tolerance for the students: 12 Adam steps from the same weights. Summation order changes the loss gradients by
# ~1e-7 relative; lambda_ndcg's weights depend on the student's sort order, which such noise cannot flip unless two
# scores tie to ~1e-6 (the check below would show it as a jump far above this tolerance). Observed: 7.5e-7.
STUDENT_ATOL = 1e-5


def _student_data(root: Path, build: bool = False):
    """(inputs, train RankLog, valid RankLog, ClickLists) of a small synthetic world; build=True writes the logs
    (the parent, before the spawn), else they are opened from root."""
    inputs, teacher, requests, imp, n_train, rng = tower_world(3, n_users=64, n_items=120, n_imp=10)
    cand = sample_candidates(imp, inputs.n_items, 20, rng=rng)
    train = (np.arange(len(requests)) < n_train)[:, None]
    if build:
        build_rank_log(requests, np.where(train, cand, -1), teacher, root / "student-train", progress=False)
        build_rank_log(requests, np.where(~train, cand, -1), teacher, root / "student-valid", progress=False)
    t = teacher(np.arange(n_train), imp[:n_train])
    y = (rng.random(t.shape) < 1 / (1 + np.exp(-(2.0 * (t - t.mean()) / t.std() - 2.0)))).astype(np.float32)
    clicks = ClickLists(np.arange(n_train), requests["user_row"].to_numpy()[:n_train], imp[:n_train].astype(np.int64),
                        y)
    return inputs, RankLog(root / "student-train"), RankLog(root / "student-valid"), clicks


def _student_cfg(batch_size: int, **kw) -> StudentConfig:
    return StudentConfig(**{"loss_weights": STUDENT_WEIGHTS, "epochs": 3, "batch_size": batch_size, "lr": 1e-2,
                            "seed": 2, **kw})


def _retrieval_cfg(batch_size: int) -> StudentConfig:
    return _student_cfg(batch_size, stage="retrieval", loss_weights={"sampled_softmax": 1.0, "bpr": 1.0},
                        softmax_positives="teacher_topk", n_uniform_negatives=16)


def _dump_student(path: Path, towers: torch.nn.Module, hist: list) -> None:
    save_torch(path, {"state": {k: v.detach().cpu() for k, v in towers.state_dict().items()},
                      "hist": [{k: v for k, v in h.items() if k != "seconds"} for h in hist]})


def _tables():
    return make_table(N_TRAIN, seed=41), make_table(800, seed=42)


def _train_cfg(batch_size: int, seed: int = 5) -> TrainConfig:
    return TrainConfig(lr=0.01, batch_size=batch_size, epochs=2, seed=seed)


def _joint() -> JointRanker:
    return JointRanker(SPEC, RankerConfig(emb_dim=4, mlp=(8,), sides=("user", "item", "context", "cross")),
                       RankerConfig(emb_dim=4, mlp=(4,), sides=("user", "item", "context")), seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dump(path: Path, model: torch.nn.Module, res) -> None:
    save_torch(path, {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "best_auc": res.best_valid_auc, "best_step": res.best_step,
                      "steps": [h["step"] for h in res.history]})


def _worker(rank: int, world: int, port: int, out: str, backend: str, device: str) -> None:
    """One rank: DDP teacher fit (whole table), DDP joint fit, DDP fit on a row shard, sharded rank log."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out)
    env = D.init_from_env(backend=backend)
    try:
        assert (env.rank, env.world_size, env.backend) == (rank, world, backend)
        train, valid = _tables()
        per_rank = BATCH // world
        m = Ranker(SPEC, TINY, seed=0)
        res = fit(m, train, valid, dataclasses.replace(_train_cfg(per_rank), device=device),
                  ckpt_dir=out / f"ckpt-rank{rank}")
        _dump(out / f"global-rank{rank}.pt", m, res)
        if backend == "nccl":
            return
        j = _joint()
        res = fit(j, train, valid, _train_cfg(per_rank), loss_fn=joint_loss(DistillConfig(w_kd=1.0)))
        _dump(out / f"joint-rank{rank}.pt", j, res)
        # each rank holds only its own contiguous rows
        m = Ranker(SPEC, TINY, seed=0)
        res = fit(m, train.take(D.shard_rows(len(train), rank, world)), valid, _train_cfg(per_rank),
                  train_shard=True)
        _dump(out / f"shard-rank{rank}.pt", m, res)
        requests, cand, scorer, item_ids, _, _ = rank_log_world(r=41)
        man = build_rank_log_distributed(requests, cand, scorer, out / "log", requests_per_batch=16, progress=False,
                                         item_ids=item_ids)
        save_torch(out / f"log-rank{rank}.pt", {"n_rows": man["n_rows"]})
        # two-tower students; each rank starts from other weights (seed=rank): DDP must broadcast rank 0's
        inputs, log_train, log_valid, clicks = _student_data(out)
        tt = build_two_tower(inputs, STUDENT_TOWER, seed=rank)
        hist = train_student(tt, inputs, log_train, clicks, _student_cfg(STUDENT_BATCH // world), valid=log_valid)
        _dump_student(out / f"student-rank{rank}.pt", tt, hist)
        tt = build_two_tower(inputs, STUDENT_TOWER, seed=rank)
        hist = train_student(tt, inputs, log_train, None, _retrieval_cfg(STUDENT_BATCH // world))
        _dump_student(out / f"retrieval-rank{rank}.pt", tt, hist)
    finally:
        D.destroy()


def _spawn(tmp: Path, backend: str = "gloo", device: str = "cpu", world: int = WORLD) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp), backend, device), nprocs=world, join=True)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _student_data(out, build=True)
    _spawn(out)
    return out


def _assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------------------------- unit


def test_shard_rows_drops_the_remainder_equally():
    # 10 rows over 3 ranks: 10 // 3 = 3 rows each -> [0,3), [3,6), [6,9); row 9 belongs to nobody
    assert [D.shard_rows(10, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 9)]
    with pytest.raises(ValueError, match="rank"):
        D.shard_rows(10, 3, 3)


def test_rank_batch_indices_split_each_global_batch():
    # n = 11, batch 2, world 2: global batches of 4 rows: [0..3], [4..7], then a tail of 3 rows [8, 9, 10]
    # -> rank 0: [0,1], [4,5], [8] (3 // 2 = 1 row each); rank 1: [2,3], [6,7], [9]; row 10 is dropped
    r0 = [b.tolist() for b in D.rank_batch_indices(11, 2, None, 0, 2)]
    r1 = [b.tolist() for b in D.rank_batch_indices(11, 2, None, 1, 2)]
    assert r0 == [[0, 1], [4, 5], [8]] and r1 == [[2, 3], [6, 7], [9]]
    # with a generator: both ranks cut the same permutation, and their union per step is the single-process batch
    perm = np.random.default_rng(7).permutation(12)
    got = [np.concatenate(p) for p in zip(*(D.rank_batch_indices(12, 3, np.random.default_rng(7), r, 2)
                                            for r in range(2)))]
    np.testing.assert_array_equal(np.concatenate(got), perm)
    assert [len(g) for g in got] == [6, 6]


def test_init_from_env_single_process_and_bad_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() == D.DistEnv() and D.is_main() and not D.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_from_env(backend="gloo")
    with pytest.raises(ValueError, match="backend 'mpi'"):
        D.init_from_env(backend="mpi")


# ------------------------------------------------------------------------------------------------- DDP


def test_ddp_two_ranks_match_single_process_and_only_rank0_writes(ddp_run):
    train, valid = _tables()
    single = Ranker(SPEC, TINY, seed=0)
    res = fit(single, train, valid, _train_cfg(BATCH), ckpt_dir=ddp_run / "single")
    ranks = [load_torch(ddp_run / f"global-rank{r}.pt") for r in range(WORLD)]
    # both ranks finished with the same history (10 steps per epoch, one evaluation per epoch) and weights
    assert ranks[0]["steps"] == ranks[1]["steps"] == [h["step"] for h in res.history] == [10, 20]
    _assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    _assert_states_close(ranks[0]["state"], single.state_dict(), atol=WEIGHT_ATOL)
    assert abs(ranks[0]["best_auc"] - res.best_valid_auc) < AUC_ATOL and ranks[1]["best_auc"] == ranks[0]["best_auc"]
    assert res.best_valid_auc > 0.6  # it learned the planted signal, so the match is not two untrained models
    # only rank 0 wrote its checkpoint; it holds the returned (best) weights and a manifest
    assert (ddp_run / "ckpt-rank0" / CHECKPOINT).exists() and not (ddp_run / "ckpt-rank1").exists()
    _assert_states_close(load_torch(ddp_run / "ckpt-rank0" / CHECKPOINT), ranks[0]["state"], atol=0)
    assert read_manifest(ddp_run / "ckpt-rank0")["metrics"]["auc"] == pytest.approx(ranks[0]["best_auc"], abs=1e-12)


def test_ddp_joint_model_through_loss_fn_matches_single_process(ddp_run):
    # joint_loss calls model.forward_both, not forward: DDP must still average every parameter's gradient
    train, valid = _tables()
    single = _joint()
    fit(single, train, valid, _train_cfg(BATCH), loss_fn=joint_loss(DistillConfig(w_kd=1.0)))
    ranks = [load_torch(ddp_run / f"joint-rank{r}.pt") for r in range(WORLD)]
    _assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    _assert_states_close(ranks[0]["state"], single.state_dict(), atol=WEIGHT_ATOL)


def test_ddp_on_row_shards_stays_in_sync_and_learns(ddp_run):
    # each rank saw only its 640 rows: 640 // 64 = 10 steps per epoch on both; the order differs from the
    # single-process run, so only quality is compared (stated tolerance 0.03 AUC), the weights must agree exactly
    train, valid = _tables()
    single_auc = fit(Ranker(SPEC, TINY, seed=0), train, valid, _train_cfg(BATCH)).best_valid_auc
    ranks = [load_torch(ddp_run / f"shard-rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [10, 20]
    _assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    assert abs(ranks[0]["best_auc"] - single_auc) < 0.03, (ranks[0]["best_auc"], single_auc)


def test_sharded_rank_log_reads_as_one_process_log(ddp_run, tmp_path):
    requests, cand, scorer, item_ids, _, _ = rank_log_world(r=41)
    build_rank_log(requests, cand, scorer, tmp_path / "one", requests_per_batch=16, progress=False, item_ids=item_ids)
    # linspace(0, 41, 3) rounded = [0, 20, 41]: rank 0 scored requests [0, 20), rank 1 [20, 41)
    for k, rows in ((0, [0, 20]), (1, [20, 41])):
        shard = read_manifest(ddp_run / "log" / f"shard-{k:05d}-of-{WORLD:05d}")
        assert shard["request_row_range"] == rows
    n_pairs = int((cand >= 0).sum())
    assert [load_torch(ddp_run / f"log-rank{r}.pt")["n_rows"] for r in range(WORLD)] == [n_pairs, n_pairs]
    a, b = RankLog(tmp_path / "one"), RankLog(ddp_run / "log")
    for name in ("items", "ranks", "logits", "mask", "request_rows", "request_ids", "user_rows", "time_ms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_ddp_two_tower_student_matches_single_process(ddp_run):
    # 2 ranks x 32 requests vs 1 process x 64 on the same permutation, with the sampling-free terms (see
    # STUDENT_WEIGHTS); the ranks started from different weights (seed 0 / 1), the single run from seed 0
    inputs, log_train, log_valid, clicks = _student_data(ddp_run)
    single = build_two_tower(inputs, STUDENT_TOWER, seed=0)
    hist = train_student(single, inputs, log_train, clicks, _student_cfg(STUDENT_BATCH), valid=log_valid)
    ranks = [load_torch(ddp_run / f"student-rank{r}.pt") for r in range(WORLD)]
    _assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    _assert_states_close(ranks[0]["state"], single.state_dict(), atol=STUDENT_ATOL)
    # the weights moved far more than the tolerance, so the match is not two untrained towers
    moved = build_two_tower(inputs, STUDENT_TOWER, seed=0).state_dict()
    assert max(float((single.state_dict()[k] - moved[k]).abs().max()) for k in moved) > 100 * STUDENT_ATOL
    # the same history on both ranks (validation on rank 0, broadcast; losses are means over ranks) and, within
    # float noise, the single process's: 3 epochs, each with every term of STUDENT_WEIGHTS
    assert ranks[0]["hist"] == ranks[1]["hist"] and len(hist) == 3
    for got, ref in zip(ranks[0]["hist"], hist):
        assert set(STUDENT_WEIGHTS) <= set(got) and got["valid"] == pytest.approx(ref["valid"], abs=1e-6)
        for k in (*STUDENT_WEIGHTS, "loss"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_ddp_retrieval_student_with_in_batch_negatives_stays_in_sync(ddp_run):
    # sampled softmax (in-batch negatives per rank) + bpr (pairs drawn per rank): no single-process twin by design,
    # but both ranks hold identical weights after every step and the softmax loss falls
    ranks = [load_torch(ddp_run / f"retrieval-rank{r}.pt") for r in range(WORLD)]
    _assert_states_close(ranks[0]["state"], ranks[1]["state"], atol=0)
    assert ranks[0]["hist"] == ranks[1]["hist"]
    assert ranks[0]["hist"][-1]["sampled_softmax"] < ranks[0]["hist"][0]["sampled_softmax"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_ddp_matches_single_gpu_run(tmp_path):
    # one rank per GPU, at most 2; with 1 GPU this is a 1-rank NCCL group: the same DDP code path
    world = min(2, torch.cuda.device_count())
    _spawn(tmp_path, backend="nccl", device="cuda", world=world)
    train, valid = _tables()
    single = Ranker(SPEC, TINY, seed=0)
    res = fit(single, train, valid, dataclasses.replace(_train_cfg(BATCH), device="cuda"))
    got = load_torch(tmp_path / "global-rank0.pt")
    _assert_states_close(got["state"], {k: v.cpu() for k, v in single.state_dict().items()}, atol=1e-4)
    assert abs(got["best_auc"] - res.best_valid_auc) < 1e-3
    assert (tmp_path / "ckpt-rank0" / CHECKPOINT).exists() and not (tmp_path / "ckpt-rank1").exists()
