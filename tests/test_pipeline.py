"""End to end: `cascade run pipelines/tiny.toml` — artifacts, manifests, caching, a SIGKILL midway, determinism.

One uninterrupted run (A) and one run killed with SIGKILL inside the students step and then resumed (B) must
give byte-identical data, encodings, rank logs and indexes, and the same metrics: this proves both that a killed
run resumes without corrupted artifacts and that the same config and seed reproduce a run on CPU.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade import artifacts as A
from cascade.config import ConfigError
from cascade.pipeline import STEPS, load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"
STEP_NAMES = [s.name for s in STEPS]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs_a")
    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", "run.threads=1"])
    res = run_pipeline(cfg, progress=False)
    return cfg, runs / "tiny", res


def _hashes(step_dir: Path) -> dict:
    return A.read_manifest(step_dir, verify=True)["outputs"]


def test_every_step_writes_verified_artifacts(run_a):
    cfg, run_dir, res = run_a
    assert [s for s, r in res.items() if r["status"] == "ran"] == STEP_NAMES
    for s in STEP_NAMES:
        m = A.read_manifest(run_dir / s, verify=True)  # every listed output exists with its sha256
        assert m["kind"] == s and m["outputs"] and m["wall_s"] >= 0
        assert m["versions"]["torch"] and m["config_hash"] == A.stable_hash(m["config"])
    for f in ("report.html", "report.md", "report.json"):
        assert (run_dir / "report" / f).stat().st_size > 1000
    summary = A.read_json(run_dir / "replay" / "summary.json")
    assert set(summary["variants"]) == {"distilled", "ground_truth"}
    for v in summary["variants"].values():
        q = v["quality"]
        for st in ("retrieval", "prerank", "rank"):
            for m in ("teacher_recall", "teacher_ndcg", "click_recall", "hit_rate", "click_ndcg"):
                assert 0.0 <= q[f"{st}_{m}"] <= 1.0, (st, m)
            assert 0.5 < v["stage_auc"][st]["auc"] < 1.0
        # a stage can only lose items: its output is a subset of the previous stage's
        for m in ("teacher_recall", "click_recall", "hit_rate"):
            assert q[f"retrieval_{m}"] >= q[f"prerank_{m}"] >= q[f"rank_{m}"] - 1e-12, m
        assert q["rank_hit_rate"] >= q["rank_click_recall"]  # a hit needs one click, recall all of them
        assert 0.0 < q["oracle_ratio"] <= 1.0 + 1e-9
        assert 1 <= q["final_distinct"] <= 5 * q["n_requests"] and 0 < q["final_top_share"] <= 1.0
        assert v["latency_batch1"]["served"] == v["latency_batch1"]["n_requests"]
    # the teacher's own top list over the corpus: agrees with itself, and keeps at least what any cascade keeps
    # of the teacher's top-K (it IS that list)
    ceiling = summary["references"]["teacher_corpus"]["quality"]
    assert ceiling["rank_teacher_recall"] == 1.0 and ceiling["rank_teacher_ndcg"] == pytest.approx(1.0)
    assert summary["filter_seen"]["why"]
    html = (run_dir / "report" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html.replace("https://kuairand.com", "")


def test_sigkill_midway_then_resume_matches_uninterrupted_run(run_a, tmp_path):
    _, run_a_dir, _ = run_a
    runs_b = tmp_path / "runs_b"
    # the same thread count as run A (float sums, and so the weights, depend on it)
    cmd = [sys.executable, "-m", "cascade.cli", "run", str(TINY), "--no-progress", "--set",
           f"run.runs_dir={json.dumps(str(runs_b))}",
           "--set", "run.threads=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill as soon as the students step has written its first model (it then still trains five more)
    first = runs_b / "tiny" / ".students.partial" / "distilled" / "prerank" / "model.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert first.exists(), "the run never reached the students step"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (runs_b / "tiny" / "students" / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for s in ("data", "teacher", "ranklog"):
        assert f"[{s:>8}] skipped" in done.stdout, done.stdout
    run_b_dir = runs_b / "tiny"
    # identical data, encodings, teacher weights, rank logs and index files (files that record measured speeds
    # -- models.json with latencies, nested manifests with pairs/s or QPS -- are left out of the comparison)
    # torch.save's archive carries a serialization id that can differ between processes: compare .pt by tensors
    def reproducible(h):
        return {k: v for k, v in h.items() if not k.endswith(("models.json", "manifest.json", ".pt"))}

    for s in ("data", "teacher", "ranklog"):
        ha, hb = _hashes(run_a_dir / s), _hashes(run_b_dir / s)
        assert reproducible(hb) == reproducible(ha), s
        for k in (k for k in ha if k.endswith(".pt")):
            ta, tb = A.load_torch(run_a_dir / s / k), A.load_torch(run_b_dir / s / k)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), (s, k)
    # The two-tower students train through sums whose float order can differ between processes: their item
    # embeddings (the index contents) agree to 1e-5 (measured: 1.5e-7), the id maps exactly.
    import faiss
    import numpy as np

    for v in ("distilled", "ground_truth"):
        xa = faiss.read_index(str(run_a_dir / "index" / v / "index.faiss"))
        xb = faiss.read_index(str(run_b_dir / "index" / v / "index.faiss"))
        np.testing.assert_allclose(xa.reconstruct_n(0, xa.ntotal), xb.reconstruct_n(0, xb.ntotal), atol=1e-5)
        assert np.array_equal(np.load(run_a_dir / "index" / v / "item_ids.npy"),
                              np.load(run_b_dir / "index" / v / "item_ids.npy"))
    assert any(k.endswith(".parquet") for k in _hashes(run_b_dir / "ranklog"))
    qa = A.read_json(run_a_dir / "replay" / "summary.json")
    qb = A.read_json(run_b_dir / "replay" / "summary.json")
    # metrics agree within 0.01 absolute (a 1e-7 difference in an embedding can swap two nearly tied items)
    for v in qa["variants"]:
        for k, x in qa["variants"][v]["quality"].items():
            y = qb["variants"][v]["quality"][k]
            # final_distinct is a count of items: one swapped item moves it by 1
            assert math.isclose(x, y, abs_tol=2 if k == "final_distinct" else 0.01), (v, k, x, y)


def test_rerun_skips_everything_and_a_change_reruns_only_dependants(run_a):
    cfg, run_dir, _ = run_a
    before = {s: _hashes(run_dir / s) for s in STEP_NAMES}
    res = run_pipeline(cfg, progress=False)
    assert all(r["status"] == "skipped" for r in res.values())
    assert {s: _hashes(run_dir / s) for s in STEP_NAMES} == before
    cfg2 = load_config(TINY, [f"run.runs_dir={json.dumps(str(run_dir.parent))}", "replay.k=5"])
    res = run_pipeline(cfg2, progress=False)
    assert [s for s, r in res.items() if r["status"] == "ran"] == ["replay", "report"]
    summary = A.read_json(run_dir / "replay" / "summary.json")
    assert summary["variants"]["distilled"]["sizes"]["rank"] == 5


def test_bad_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher.model]\nbackbone = 'dcnv2'\nmlpp = [8]\n")
    r = subprocess.run([sys.executable, "-m", "cascade.cli", "run", str(bad), "--set",
                        f"run.runs_dir={json.dumps(str(tmp_path / 'r'))}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "teacher.model.mlpp" in r.stderr
    assert not (tmp_path / "r").exists()
    for override, needle in (("replay.k=1000", "k <= n_prerank"), ("teacher.train.lr=-1", "lr"),
                             ("data.source='kuairand'", "data.path"), ("run.name='../escape'", "run name"),
                             ("students.tower.temperature=0", "temperature")):
        r = subprocess.run([sys.executable, "-m", "cascade.cli", "run", str(TINY), "--set", override,
                            "--set", f"run.runs_dir={json.dumps(str(tmp_path / 'r'))}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr, (override, r.stderr[-500:])
    assert not (tmp_path / "r").exists()


def test_walkthrough_notebook_executes_against_the_tiny_run(run_a, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _, run_dir, _ = run_a
    monkeypatch.setenv("CASCADE_RUN", str(run_dir))
    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "plots in the report" in outputs and "request " in outputs
    n_plots = int(outputs.split(" plots in the report")[0].split()[-1])
    assert n_plots >= 2  # recall@K curves and latency histograms (a Flat index has no operating-point plot)


def test_serving_maps_unknown_users_items_and_values_to_oov(run_a):
    import numpy as np

    from cascade.arrays import PAD
    from cascade.data.requests import Requests
    from cascade.serve.cascade import load_cascade

    _, run_dir, _ = run_a
    data, casc = load_cascade(run_dir, variant="distilled", ranker="student")
    known_user = int(data.user_ids[0])
    req = Requests(np.array([known_user, 987654321]), np.array([data.impressions.time_ms.max()] * 2),
                   {"hour": np.array([20, 99]), "weekday": np.array([2, 9]), "tab": np.array([1, 42])})
    res = casc.recommend(req, n_retrieve=100, n_prerank=40, k=10)
    assert res.errors == [None, None]
    assert (res.items != PAD).all() and np.isfinite(res.scores).all()
    # an unknown candidate item is scored through the OOV row instead of failing
    cand = np.array([[int(data.item_ids[0]), 123456789, PAD]])
    items, scores = casc.ranker.select(req.take(np.array([0])), cand, 3)
    assert set(items[0][:2]) == {int(data.item_ids[0]), 123456789} and items[0][2] == PAD
    # more candidates than the index holds: the retriever pads, the cascade still returns k real items
    res = casc.recommend(req, n_retrieve=len(data.item_ids) + 100, n_prerank=40, k=10, return_stages=True)
    assert (res.stages["retrieval"][0][:, len(data.item_ids):] == PAD).all() and (res.items != PAD).all()
    # an empty batch is answered with empty arrays
    empty = casc.recommend(req.take(np.array([], dtype=int)), 100, 40, 10)
    assert empty.items.shape == (0, 10) and empty.errors == []


def test_teacher_reads_the_behaviour_sequence_built_by_the_serving_path(run_a):
    """The default teacher reads the history side through attention; the pair features that the rank log, the rank
    stage and the replay build for a request (RunData.pair_features -> PairEncoder) equal the encoded test rows,
    history columns included."""
    import numpy as np

    from cascade.data.requests import impression_requests
    from cascade.run_data import RunData, load_ranker

    cfg, run_dir, _ = run_a
    assert "history" in cfg.teacher.model.sides and cfg.data.history_length == 20
    data = RunData(run_dir / "data")
    test = data.encoded("test")
    hist = test.spec.cat_index("history")
    assert len(hist) == 3 * 20 and data.encoder.history_attrs_ == ["item_id", "tag", "author_id"]
    assert (test.cat[:, hist[0]] > 0).mean() > 0.5  # most test rows have a clicked item in the window
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    assert teacher.click.attention is not None and teacher.exposure.attention is not None
    imp = data.split_impressions("test")
    req = impression_requests(imp, data.context_names)
    cat, num = data.pair_features(req, imp["item_id"].to_numpy(np.int64)[:, None])
    served = test.spec.select("user", "item", "context", "cross", "history")
    assert data.spec == served
    np.testing.assert_array_equal(cat, test.cat[:, test.spec.cat_index(*served.cat_sides)])
    np.testing.assert_array_equal(num, test.num[:, test.spec.num_index(*served.num_sides)])


def test_index_from_another_model_is_refused_naming_both_hashes(run_a, tmp_path):
    import shutil

    from cascade.index.faiss_index import IndexMismatchError
    from cascade.serve.cascade import load_cascade

    _, run_dir, _ = run_a
    fake = tmp_path / "mixed"
    shutil.copytree(run_dir, fake)
    shutil.rmtree(fake / "index" / "distilled")
    shutil.copytree(run_dir / "index" / "ground_truth", fake / "index" / "distilled")  # the other tower's index
    mine = A.sha256_file(fake / "students" / "distilled" / "retrieval" / "model.pt")
    theirs = A.sha256_file(fake / "students" / "ground_truth" / "retrieval" / "model.pt")
    with pytest.raises(IndexMismatchError) as e:
        load_cascade(fake, variant="distilled")
    assert mine[:12] in str(e.value) and theirs[:12] in str(e.value)


def test_pfd_rank_student_through_the_pipeline_and_serving(run_a, tmp_path):
    """students.rank_distill.pfd_lambda switches the rank student to PFD: the students step trains a privileged
    teacher with it, saves the student alone, and the replay serves that student as the ranker."""
    import shutil

    from cascade.run_data import RunData, load_ranker
    from cascade.train.loop import evaluate

    _, run_dir, _ = run_a
    shutil.copytree(run_dir, tmp_path / "tiny")
    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(tmp_path))}", "students.rank_distill.pfd_lambda=0.5",
                             "students.rank_distill.warmup_steps=5", "students.rank_distill_scale=1.0",
                             'replay.ranker="student"'])
    res = run_pipeline(cfg, progress=False)
    assert [s for s, r in res.items() if r["status"] == "ran"] == ["students", "index", "replay", "report"]
    rows = {r["name"]: r for r in A.read_json(tmp_path / "tiny" / "students" / "models.json")}
    student = rows["rank student (served: PFD at scale 1)"]
    teacher = rows["its PFD teacher (also reads the privileged side; not served)"]
    assert "rank student (no distillation)" in rows
    assert teacher["auc"] > student["auc"] + 0.1  # post-click fields nearly give the click away
    data = RunData(tmp_path / "tiny" / "data")
    served = load_ranker(tmp_path / "tiny" / "students" / "rank_student", data.spec)
    assert "privileged" not in served.cfg.sides and not served.private_columns
    assert evaluate(served, data.encoded("test"))["auc"] == pytest.approx(student["auc"], abs=1e-6)
    summary = A.read_json(tmp_path / "tiny" / "replay" / "summary.json")
    assert summary["variants"]["distilled"]["sizes"]["rank"] == cfg.replay.k
    # a side that is not one, or one the student reads itself, fails when the config is read, before any work
    for side, message in (("nope", "is not one of"), ("item", "read by the rank student itself")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, ["students.rank_distill.pfd_lambda=0.5", f'students.rank_pfd_side="{side}"'])


def test_ddp_ranklog_entry_point_in_one_process(run_a, tmp_path, capsys):
    """`cascade ddp-ranklog` (the torchrun entry point) as one plain process: teacher, rank log, students, summary."""
    from cascade.cli import main
    from cascade.distill.ranklog import RankLog
    from cascade.run_data import RunData, load_ranker, load_towers

    _, run_dir, _ = run_a
    out = tmp_path / "ddp"
    assert main(["ddp-ranklog", "--data", str(run_dir / "data"), "--out", str(out), "--max-requests", "80",
                 "--n-candidates", "30", "--batch-size", "1024", "--students", "--student-epochs", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == A.read_json(out / "ddp_ranklog.json")
    assert summary["world_size"] == 1 and summary["backend"] is None and summary["rank_log_pairs"] == 80 * 30
    assert 0.5 < summary["best_valid_auc"] < 1.0 and set(summary["students"]) == {"prerank", "retrieval"}
    data = RunData(run_dir / "data")
    load_ranker(out / "teacher", data.spec)  # the pipeline's layout: loadable as it is
    assert len(RankLog(out / "log")) == 80
    load_towers(out / "students" / "distilled" / "retrieval", data)
