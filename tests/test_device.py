"""The run's one device switch: run.device (`cascade run --device cuda`) reaches every training step (the teacher,
the rank students, the two-tower students); on a machine without CUDA it is refused before any work, and the
students' loop refuses a CUDA config it cannot honour. Where there is a GPU, the students train on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.config import ConfigError
from cascade.models.two_tower import TowerConfig, build_two_tower
from cascade.pipeline import load_config, run_pipeline
from cascade.train.students import ClickLists, StudentConfig, train_student
from worlds import tower_world

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"
NO_CUDA = not torch.cuda.is_available()


def test_run_device_reaches_every_training_config():
    cfg = load_config(TINY, ['run.device="cuda"'])
    s = cfg.students
    devices = [cfg.teacher.train.device, s.rank_student_train.device, s.prerank.device, s.retrieval.device]
    assert devices == ["cuda"] * 4
    assert load_config(TINY).teacher.train.device == "cpu" and load_config(TINY).students.prerank.device == "cpu"
    for key in ("teacher.train.device", "students.prerank.device", "students.rank_student_train.device"):
        with pytest.raises(ConfigError, match=f"{key} cannot be set in a pipeline config: run.device"):
            load_config(TINY, [f'{key}="cuda"'])


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
def test_cuda_is_refused_before_any_work_without_a_gpu(tmp_path):
    cfg = load_config(TINY, ['run.device="cuda"', f"run.runs_dir={json.dumps(str(tmp_path / 'runs'))}"])
    with pytest.raises(ConfigError, match="run.device = 'cuda' .* sees no CUDA device"):
        run_pipeline(cfg, progress=False)
    r = subprocess.run([sys.executable, "-m", "cascade.cli", "run", str(TINY), "--device", "cuda", "--set",
                        f"run.runs_dir={json.dumps(str(tmp_path / 'cli'))}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("cascade: error: run.device = 'cuda' (--device cuda)"), r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cli").exists()
    inputs, towers, clicks = _student_inputs()
    with pytest.raises(RuntimeError, match="StudentConfig.device='cuda' but torch sees no CUDA device"):
        train_student(towers, inputs, None, clicks, StudentConfig(loss_weights={"click_bce": 1.0}, device="cuda"))


def _student_inputs():
    inputs, _, requests, imp, n_train, rng = tower_world(0)
    y = (rng.random(imp[:n_train].shape) < 0.2).astype(np.float32)
    clicks = ClickLists(np.arange(n_train), requests["user_row"].to_numpy()[:n_train], imp[:n_train].astype(np.int64),
                        y)
    return inputs, build_two_tower(inputs, TowerConfig(emb_dim=4, hidden=(8,), out_dim=8), seed=0), clicks


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_students_train_on_cuda_and_come_back_on_the_cpu():
    """Click-trained pre-rank and retrieval students on the GPU: finite, falling losses like on the CPU, towers
    handed back on the CPU (where the pipeline saves and serves them)."""
    losses = {}
    for device in ("cpu", "cuda"):
        for stage, w in (("prerank", {"click_bce": 1.0}), ("retrieval", {"sampled_softmax": 1.0})):
            inputs, towers, clicks = _student_inputs()
            hist = train_student(towers, inputs, None, clicks,
                                 StudentConfig(stage=stage, loss_weights=w, epochs=3, batch_size=50, device=device))
            assert next(towers.parameters()).device.type == "cpu"
            losses[device, stage] = [h["loss"] for h in hist]
    for stage in ("prerank", "retrieval"):
        cpu, cuda = losses["cpu", stage], losses["cuda", stage]
        assert np.isfinite(cuda).all() and cuda[-1] < cuda[0], cuda
        assert abs(cuda[-1] - cpu[-1]) < 0.25 * abs(cpu[0] - cpu[-1]) + 0.05, (cpu, cuda)
