"""Logs and progress: the CLI configures the library's logger ``cascade`` only (faiss's loader lines stay silent),
--quiet keeps warnings only, and every progress bar says what it counts (epoch i/n, loss, the validation metric)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade.models.gbdt import GBDTRanker
from cascade.train.loop import TrainConfig, fit
from worlds import SPEC, make_table

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_logs_the_library_only_and_quiet_keeps_warnings(tmp_path):
    np.save(tmp_path / "items.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    r = _cli("index", "build", "--embeddings", "items.npy", "--out", "idx", "--model-hash", "h", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the library's INFO lines, and nothing from faiss's loader (it logs every SIMD build it tries at INFO, with
    # ModuleNotFoundError lines that read like failures)
    assert "INFO cascade.index.faiss_index: item index: built Flat over 50 x 8" in r.stderr
    assert "faiss.loader" not in r.stderr and "ModuleNotFoundError" not in r.stderr
    assert all(" cascade." in line for line in r.stderr.splitlines()), r.stderr
    q = _cli("--quiet", "index", "build", "--embeddings", "items.npy", "--out", "idx2", "--model-hash", "h",
             cwd=tmp_path)
    assert q.returncode == 0 and q.stderr == "" and '"n_items": 50' in q.stdout
    both = _cli("-v", "--quiet", "index", "build", "--embeddings", "items.npy", "--out", "idx3", cwd=tmp_path)
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.fixture
def every_update_drawn(monkeypatch):
    """tqdm draws at most every 0.1 s; these loops take less, so draw on every update to see each state."""
    from functools import partial

    from tqdm.auto import tqdm

    import cascade.models.gbdt
    import cascade.train.loop
    import cascade.train.students

    for module in (cascade.train.loop, cascade.train.students, cascade.models.gbdt):
        monkeypatch.setattr(module, "tqdm", partial(tqdm, mininterval=0, miniters=1))


def test_fit_bar_names_the_model_epoch_loss_and_valid_auc(capsys, every_update_drawn):
    train, valid = make_table(600, seed=3), make_table(300, seed=4)
    from cascade.models.ranker import Ranker, RankerConfig

    fit(Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,)), seed=0), train, valid,
        TrainConfig(lr=0.01, batch_size=100, epochs=2, progress=True), label="teacher")
    err = capsys.readouterr().err
    # 6 steps per epoch; the second epoch's bar shows the first evaluation's AUC
    assert "teacher epoch 1/2" in err and "teacher epoch 2/2" in err and "12/12" in err
    assert "loss=" in err and "valid_auc=0." in err


def test_student_bar_names_the_student_epoch_and_loss(capsys, every_update_drawn):
    from cascade.models.two_tower import TowerConfig, build_two_tower
    from cascade.train.students import ClickLists, StudentConfig, train_student
    from worlds import tower_world

    inputs, _, requests, imp, n_train, rng = tower_world(0)
    y = (rng.random(imp[:n_train].shape) < 0.2).astype(np.float32)
    clicks = ClickLists(np.arange(n_train), requests["user_row"].to_numpy()[:n_train],
                        imp[:n_train].astype(np.int64), y)
    towers = build_two_tower(inputs, TowerConfig(emb_dim=4, hidden=(8,), out_dim=8), seed=0)
    hist = train_student(towers, inputs, None, clicks, StudentConfig(loss_weights={"click_bce": 1.0}, epochs=2,
                                                                     batch_size=50, progress=True),
                         label="ground_truth prerank")
    err = capsys.readouterr().err
    assert len(hist) == 2
    assert "ground_truth prerank epoch 1/2" in err and "ground_truth prerank epoch 2/2" in err
    assert f"loss={hist[-1]['loss']:.4f}" in err  # the bar's last postfix is the epoch's mean loss


def test_lightgbm_shows_a_bar_or_a_periodic_log_line(capsys, caplog, every_update_drawn):
    train, valid = make_table(600, seed=5), make_table(300, seed=6)
    GBDTRanker(n_estimators=20, early_stopping_rounds=None, progress=True).fit(train, valid)
    err = capsys.readouterr().err
    assert "LightGBM (binary)" in err and "20/20" in err and "valid_auc=" in err
    with caplog.at_level(logging.INFO, logger="cascade.models.gbdt"):
        GBDTRanker(n_estimators=20, early_stopping_rounds=None).fit(train, valid)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LightGBM: tree")]
    assert [line.split()[2] for line in lines] == [f"{i}/20" for i in range(2, 21, 2)]  # every tenth of the rounds
    assert "valid_auc" in lines[-1]
    assert capsys.readouterr().err == ""  # no bar without progress
