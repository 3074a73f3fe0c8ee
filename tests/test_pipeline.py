"""End to end: `cascade run pipelines/tiny.toml` — artifacts, manifests, caching, a SIGKILL midway, determinism.

One uninterrupted run (A) and one run killed with SIGKILL inside the students step and then resumed (B) must
give byte-identical data, encodings, rank logs and indexes, and the same metrics: this proves both that a killed
run resumes without corrupted artifacts and that the same config and seed reproduce a run on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cascade import artifacts as A
from cascade.config import ConfigError
from cascade.data.world import World
from cascade.pipeline import STEPS, load_config, run_pipeline
from cascade.pipeline.judge import validation_judge
from cascade.pipeline.run import RunConfigMismatch
from cascade.pipeline.students import _tower_recall
from cascade.run_data import RunData, load_towers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"
STEP_NAMES = [s.name for s in STEPS]

pytestmark = pytest.mark.slow


# run A's settings: one thread, and every tower's training length chosen on validation (off by default), so that
# the run tests that choice end to end
A_SETS = ("run.threads=1", "students.max_epochs_factor=3")
A_CLI = tuple(a for kv in A_SETS for a in ("--set", kv))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs_a")
    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", *A_SETS, "tracking.tensorboard=true"])
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
    es = A.read_manifest(run_dir / "teacher")["metrics"]["entire_space"]
    assert es["judged_by"] == "random_auc" and es["judge"].startswith("auto: AUC")  # the world has a random slice
    summary = A.read_json(run_dir / "replay" / "summary.json")
    assert set(summary["variants"]) == {"distilled", "ground_truth", "distilled+channels"}
    stem_of = {**{v: v for v in summary["variants"]}, "teacher_corpus": "teacher_corpus",
               **{b: f"baseline_{s['channel']}" for b, s in summary["baselines"].items()}}
    assert set(summary["paired"]["distilled"]) == set(stem_of) - {"distilled"}
    latency = A.read_manifest(run_dir / "replay")["metrics"]["latency"]  # measured times: in the manifest only
    # the random slice's expected click-recall: each list's oracle clicks over the corpus's expected clicks, summed
    # over the random-exposure requests (recomputed here from the world and the per-request rows)
    rows = pd.read_parquet(run_dir / "replay" / "distilled_requests.parquet")
    test = RunData(run_dir / "data").split_impressions("test")
    ctx = test.groupby("request_id")[["user_id", "hour", "tab", "is_rand"]].first().loc[rows.request_id]
    rand = ctx.is_rand.to_numpy() == 1
    assert rand.sum() >= 10
    world = World.load(run_dir / "data" / "world")
    mass = world.corpus_click_mass(ctx.user_id.to_numpy()[rand], ctx.hour.to_numpy()[rand], ctx.tab.to_numpy()[rand])
    for name, v in summary["variants"].items():
        q = v["quality"]
        for st in ("retrieval", "prerank", "rank"):
            for m in ("teacher_recall", "teacher_ndcg", "click_recall", "hit_rate", "click_ndcg"):
                assert 0.0 <= q[f"{st}_{m}"] <= 1.0, (st, m)
            if st in v["stage_auc"]:  # the merged retrieval stage has no single scoring function
                assert 0.5 < v["stage_auc"][st]["auc"] < 1.0
        assert set(v["stage_auc"]) == ({"prerank", "rank"} if name.endswith("+channels")
                                       else {"retrieval", "prerank", "rank"})
        # a stage can only lose items: its output is a subset of the previous stage's
        for m in ("teacher_recall", "click_recall", "hit_rate"):
            assert q[f"retrieval_{m}"] >= q[f"prerank_{m}"] >= q[f"rank_{m}"] - 1e-12, m
        assert q["rank_hit_rate"] >= q["rank_click_recall"]  # a hit needs one click, recall all of them
        assert 0.0 < q["oracle_ratio"] <= 1.0 + 1e-9
        # the paired gaps are the per-request rows' mean differences (the rows the parquet files hold)
        mine = pd.read_parquet(run_dir / "replay" / f"{name}_requests.parquet")
        assert q["expected_click_recall_rand"] == pytest.approx(mine.oracle_clicks[rand].sum() / mass.sum())
        assert 10 / len(world.item_ids) < q["expected_click_recall_rand"] < 1.0  # above a random list's share
        for other, gaps in summary["paired"][name].items():
            theirs = pd.read_parquet(run_dir / "replay" / f"{stem_of[other]}_requests.parquet")
            assert (theirs.request_id.to_numpy() == mine.request_id.to_numpy()).all()
            assert set(gaps) == {"rank_click_recall", "oracle_ratio", "expected_click_recall_rand"}
            for metric, gap in gaps.items():
                if metric == "expected_click_recall_rand":
                    d = (mine.oracle_clicks - theirs.oracle_clicks)[rand].sum() / mass.sum()
                    assert gap["n"] == rand.sum() and gap["diff"] == pytest.approx(d), (name, other)
                    continue
                d = (mine[metric] - theirs[metric])[mine.in_sample].dropna()
                assert gap["n"] == len(d) and gap["diff"] == pytest.approx(d.mean()), (name, other, metric)
        assert 1 <= q["final_distinct"] <= 5 * q["n_requests"] and 0 < q["final_top_share"] <= 1.0
        assert "latency_batch1" not in v and latency[name]["latency_batch1"]["served"] == \
            latency[name]["latency_batch1"]["n_requests"]
        # the teacher-recall@K curves use every replayed request and the teacher's top-K for each K: the rank
        # stage's point at K = k is the final teacher-recall (the plot once showed top-10 of 200 requests only)
        curves = v["curves"]
        assert curves["rank"]["k"] == [1, 5, 10] and curves["retrieval"]["k"] == [1, 5, 10, 20, 50, 100]
        assert curves["rank"]["teacher_recall"][-1] == pytest.approx(q["rank_teacher_recall"], abs=1e-12)
        assert all(0.0 <= r <= 1.0 for c in curves.values() for r in c["teacher_recall"])
    # the teacher's own top list over the corpus: agrees with itself, and keeps at least what any cascade keeps
    # of the teacher's top-K (it IS that list)
    ceiling = summary["references"]["teacher_corpus"]["quality"]
    assert ceiling["rank_teacher_recall"] == 1.0 and ceiling["rank_teacher_ndcg"] == pytest.approx(1.0)
    assert summary["filter_seen"]["why"]
    # the multi-channel cascade: every channel's share of the final slots sums to 1, and a channel's marginal
    # contribution is the union's click-recall minus the union without it
    ch = summary["channels"]
    assert sum(ch["final_origin_share"].values()) == pytest.approx(1.0)
    multi = pd.read_parquet(run_dir / "replay" / "distilled+channels_requests.parquet")
    # the union measured by the channel report is the multi-channel cascade's own retrieval stage
    in_sample = multi[multi.in_sample]
    assert ch["union_click_recall"] == pytest.approx(in_sample.retrieval_click_recall.mean())
    assert ch["union_teacher_recall"] == pytest.approx(in_sample.retrieval_teacher_recall.mean())
    differs = {}
    for name, e in ch["per_channel"].items():
        assert e["marginal"] == pytest.approx(ch["union_click_recall"] - e["union_without"]), name
        # each channel alone through the pre-rank and the ranker: its end-to-end rows, and the multi-channel
        # cascade's per-request gap to it (the two-tower alone is the distilled cascade)
        alone = pd.read_parquet(run_dir / "replay" / ("distilled_requests.parquet" if name == "two_tower"
                                                      else f"channel_{name}_alone_requests.parquet"))
        own = e["end_to_end"]
        logged = alone[alone.in_sample]
        assert own["rank_click_recall"] == pytest.approx(logged.rank_click_recall.mean()), name
        d = (multi.rank_click_recall - alone.rank_click_recall)[multi.in_sample].dropna()
        assert own["union_minus_it"]["rank_click_recall"]["diff"] == pytest.approx(d.mean()), name
        if name != "two_tower":
            assert summary["channel_cascades"][name]["quality"]["rank_click_recall"] == own["rank_click_recall"]
            # a stage only drops items
            kept = alone.dropna(subset=["rank_click_recall"])
            assert (kept.rank_click_recall <= kept.retrieval_click_recall + 1e-12).all()
            differs[name] = any(set(a) != set(b) for a, b in zip(alone.final_items, multi.final_items))
    assert set(summary["channel_cascades"]) == set(ch["per_channel"]) - {"two_tower"}
    # N1 = 500 is this corpus, so a channel that ranks it all ends where the two-tower does; the user's recent items
    # are a few, and its cascade ends elsewhere
    assert differs["recent"], differs
    html = (run_dir / "report" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html.replace("https://kuairand.com", "")


def test_sigkill_midway_then_resume_matches_uninterrupted_run(run_a, tmp_path):
    _, run_a_dir, _ = run_a
    runs_b = tmp_path / "runs_b"
    # the same thread count as run A (float sums, and so the weights, depend on it)
    cmd = [sys.executable, "-m", "cascade.cli", "run", str(TINY), "--no-progress", "--set",
           f"run.runs_dir={json.dumps(str(runs_b))}", *A_CLI]
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
    for s in ("data", "teacher", "ranklog"):  # each step event logged once (no second, printed copy)
        assert done.stderr.count(f"[{s}] skipped (up to date)") == 1, done.stderr
    assert done.stderr.count("[students] running (no manifest)") == 1, done.stderr
    assert "faiss.loader" not in done.stderr
    run_b_dir = runs_b / "tiny"
    # byte-identical data, encodings, teacher checkpoint, models table and rank logs: step outputs hold no
    # timings (they live in the step manifests) and checkpoints no temporary file names
    for s in ("data", "teacher", "ranklog"):
        assert _hashes(run_b_dir / s) == _hashes(run_a_dir / s), s
    ta = A.load_torch(run_a_dir / "teacher" / "teacher" / "model.pt")
    tb = A.load_torch(run_b_dir / "teacher" / "teacher" / "model.pt")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
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
    # the same config from the command line, --quiet: nothing on stderr, the report's path on stdout
    q = subprocess.run([sys.executable, "-m", "cascade.cli", "--quiet", "run", str(TINY), *A_CLI,
                        "--set", f"run.runs_dir={json.dumps(str(run_dir.parent))}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert q.returncode == 0 and q.stderr == "" and q.stdout == f"report: {run_dir / 'report' / 'report.html'}\n"
    assert "[teacher] skipped (up to date)" in (run_dir / "run.log").read_text()  # run.log keeps the INFO lines
    cfg2 = load_config(TINY, [f"run.runs_dir={json.dumps(str(run_dir.parent))}", *A_SETS, "replay.k=5"])
    # a different config on an existing run is refused, naming the key, before anything is written
    with pytest.raises(RunConfigMismatch, match=r"replay.k: 10 -> 5\); a run is never overwritten"):
        run_pipeline(cfg2, progress=False)
    assert {s: _hashes(run_dir / s) for s in STEP_NAMES} == before
    assert A.read_json(run_dir / "config.json")["replay"]["k"] == 10
    r = subprocess.run([sys.executable, "-m", "cascade.cli", "run", str(TINY), "--set", "replay.k=5", *A_CLI,
                        "--set", f"run.runs_dir={json.dumps(str(run_dir.parent))}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("cascade: error: run 'tiny'"), r.stderr
    assert "replay.k: 10 -> 5" in r.stderr and "--set run.name=NEW" in r.stderr and "--update" in r.stderr
    res = run_pipeline(cfg2, progress=False, update=True)
    assert [s for s, r in res.items() if r["status"] == "ran"] == ["replay", "report"]
    summary = A.read_json(run_dir / "replay" / "summary.json")
    assert summary["variants"]["distilled"]["sizes"]["rank"] == 5
    # `cascade report RUN --set ...` does not rewrite a finished run's config either, unless --update
    from cascade.cli import main

    assert main(["report", str(run_dir), "--set", "replay.k=7"]) == 2
    assert A.read_json(run_dir / "config.json")["replay"]["k"] == 5
    # its refusal offers what a report or replay can do: --update, or a new run by `cascade run` (a replay's
    # --set run.name is refused)
    with pytest.raises(RunConfigMismatch, match=r"pass --update \(run_pipeline\(update=True\)\) to redo the steps "
                                                r"the change affects in this run, or `cascade run CONFIG --set "
                                                r"run.name=NEW ...` for a new run beside it"):
        run_pipeline(load_config(TINY, [f"run.runs_dir={json.dumps(str(run_dir.parent))}", *A_SETS, "replay.k=7"]),
                     force=("report",), progress=False, frozen=tuple(s for s in STEP_NAMES if s != "report"))


def test_training_curves_in_the_report_tensorboard_and_mlflow(run_a, tmp_path, monkeypatch):
    """Every model's train loss and validation metric per epoch: written by the steps, shown in the report, logged
    to TensorBoard (run A asked for it) and to MLflow (the logger run here on run A's folder)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cascade.pipeline.tracking import Trackers

    cfg, run_dir, res = run_a
    teacher = A.read_json(run_dir / "teacher" / "history.json")
    assert [r["epoch"] for r in teacher] == [0, 1]  # tiny.toml: 2 epochs, one evaluation each
    training = A.read_json(run_dir / "report" / "report.json")["training"]
    assert list(training) == ["teacher", "rank student (no distillation)", "rank student (served)",
                              "prerank student (distilled)", "retrieval student (distilled)",
                              "prerank student (ground_truth)", "retrieval student (ground_truth)"]
    assert training["teacher"]["loss"] == [r["train_total"] for r in teacher]
    assert training["teacher"]["valid"] == [r["valid_auc"] for r in teacher]
    pre = A.read_json(run_dir / "students" / "distilled" / "prerank" / "history.json")
    # tiny.toml: 2 epochs configured, trained up to 3x as long (run A), each epoch judged by its validation
    # click-recall
    sel = A.read_json(run_dir / "students" / "selection.json")["prerank"]
    epochs = next(g for g in sel["grid"] if g["scale"] == sel["chosen_scale"])["epochs"]
    key = f"valid_click_recall@{sel['size']}"
    assert epochs["configured"] == 2 and 2 <= epochs["trained"] <= 6 and 1 <= epochs["chosen"] <= epochs["trained"]
    assert training["prerank student (distilled)"]["epoch"] == list(range(1, epochs["trained"] + 1))
    assert [r[key] for r in pre] == [g[key] for g in epochs["grid"]]
    # the saved towers are the chosen epoch's: without their prior they keep that epoch's validation click-recall
    data = RunData(run_dir / "data")
    towers = dataclasses.replace(load_towers(run_dir / "students" / "distilled" / "prerank", data), prior=None)
    judge = validation_judge(data, cfg.students.select_requests, cfg.run.seed)
    served = float(np.nanmean(_tower_recall(towers, data, judge, sel["size"])))
    assert served == pytest.approx(epochs["grid"][epochs["chosen"] - 1][key], abs=1e-6)
    assert training["prerank student (distilled)"]["valid"] == [r["valid"]["teacher_recall@10"] for r in pre]
    # the served pre-rank student fits the teacher's lists better at the epoch served than after its first
    assert pre[epochs["chosen"] - 1]["valid"]["teacher_recall@10"] > pre[0]["valid"]["teacher_recall@10"] + 0.05
    assert "Training curves" in (run_dir / "report" / "report.md").read_text()

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    tb = [(e.step, e.value) for e in ea.Scalars("teacher/train_loss")]
    assert [t for t, _ in tb] == [1, 2] and np.allclose([v for _, v in tb], training["teacher"]["loss"], rtol=1e-6)
    tb = ea.Scalars("prerank student distilled/teacher-recall at 10 on a rank-log sample")
    assert np.allclose([e.value for e in tb], training["prerank student (distilled)"]["valid"], rtol=1e-6)
    recall = ea.Scalars("replay/distilled/rank_teacher_recall")[0].value
    assert recall == pytest.approx(res["replay"]["manifest"]["metrics"]["distilled"]["rank_teacher_recall"], rel=1e-6)

    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (the tracking or dev extra)")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, kept for tests
    uri = (tmp_path / "mlruns").as_uri()
    mcfg = load_config(TINY, ["tracking.mlflow=true", f"tracking.mlflow_tracking_uri={json.dumps(uri)}"])
    trackers = Trackers(mcfg.tracking, run_dir, "tiny", A.read_json(run_dir / "config.json"))
    for step, r in res.items():
        trackers.step(step, r["status"], r["manifest"])
    trackers.close(ok=True)
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(trackers.mlflow_run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["teacher.train.epochs"] == "2"
    hist = client.get_metric_history(run.info.run_id, "teacher/train_loss")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == pytest.approx(training["teacher"]["loss"])


def test_export_torch_program_matches_the_eager_models(run_a, tmp_path, capsys):
    """`cascade export RUN --format torch-export`: every ranker and tower of the run as a torch.export program,
    loaded back here and run on test rows it was not traced with (another batch size): max |exported - eager|
    below 1e-5 (measured: 0 to 2.4e-7)."""
    import numpy as np

    from cascade.cli import main
    from cascade.run_data import RunData, load_ranker, load_towers
    from cascade.serve.export import ExportError, export_run

    _, run_dir, _ = run_a
    out = tmp_path / "te"
    assert main(["export", str(run_dir), "--format", "torch-export", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = A.read_manifest(out, verify=True)
    names = {"teacher", "rank_student"} | {f"{v}_{s}_{t}_tower" for v in ("distilled", "ground_truth")
                                           for s in ("retrieval", "prerank") for t in ("user", "item")}
    assert set(m["models"]) == names and all(v["max_abs_diff"] < 1e-5 for v in m["models"].values())
    assert "teacher: " in printed and "max |exported - eager|" in printed
    assert m["models"]["teacher"]["inputs"][0]["shape"][0] == "batch"
    data = RunData(run_dir / "data")
    test = data.encoded("test")
    rows = slice(len(test) - 100, len(test))  # rows the export's own check did not use
    cat, num = torch.as_tensor(test.cat[rows]), torch.as_tensor(test.num[rows], dtype=torch.float32)
    program = torch.export.load(str(out / "teacher.pt2")).module()
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    with torch.inference_mode():
        diff = float((program(cat, num) - teacher(cat, num)).abs().max())
    assert diff < 1e-5, diff
    item = torch.export.load(str(out / "distilled_retrieval_item_tower.pt2")).module()
    towers = load_towers(run_dir / "students" / "distilled" / "retrieval", data)
    with torch.inference_mode():
        xi = towers.inputs.item_batch(np.arange(len(towers.inputs.item_ids)))
        assert float((item(*xi) - towers.model.item_tower(*xi)).abs().max()) < 1e-5
    assert m["inputs"]["distilled_retrieval_item_tower"] == A.sha256_file(run_dir / "students" / "distilled" /
                                                                         "retrieval" / "model.pt")
    # a user tower's entry says how serving scores with it: its temperature and, where it has one, its prior
    for v in ("distilled", "ground_truth"):
        for s in ("retrieval", "prerank"):
            about = m["models"][f"{v}_{s}_user_tower"]["serving_score"]
            t = load_towers(run_dir / "students" / v / s, data)
            assert about["temperature"] == pytest.approx(t.model.temperature)
            prior = A.read_json(run_dir / "students" / v / s / "prior.json")
            assert about.get("popularity_prior") == (prior if prior["weight"] > 0 else None)
    # the teacher's entry names its collaborative term, which the exported logit does not compute
    term = A.read_json(run_dir / "teacher" / "manifest.json")["metrics"]["collaborative"].get("chosen")
    assert m["models"]["teacher"].get("serving_score", {}).get("collaborative") == term
    with pytest.raises(ExportError, match="teacher: the torch-export model differs from the eager model by up to"):
        export_run(run_dir, "torch-export", tmp_path / "strict", tolerance=1e-12)
    with pytest.raises(ExportError, match=r"variant\(s\) \['nope'\] not in the run"):
        export_run(run_dir, "torch-export", tmp_path / "x", variants=("nope",))


def test_towers_read_the_recent_clicks_alike_in_training_and_serving(run_a):
    """The user tower's history: each request's last tower.history_length distinct clicked items strictly before
    it (checked against the log by hand, as sets where the user has no more), the same in the students' inputs and
    in serving's Towers.user_embed (embeddings equal to 1e-6)."""
    import numpy as np

    from cascade.data.requests import request_start_ms, requests_frame, to_requests
    from cascade.run_data import RunData, load_towers

    _, run_dir, _ = run_a
    data = RunData(run_dir / "data")
    towers = load_towers(run_dir / "students" / "distilled" / "retrieval", data)
    h = towers.model.cfg.history_length
    assert h == 20  # the pipeline's default
    frame = requests_frame(data.split_impressions("test"), data.context_names).iloc[:60].reset_index(drop=True)
    inputs = data.tower_inputs(frame, h)
    recent = data.recent_clicks(frame["user_id"].to_numpy(), frame["time_ms"].to_numpy(), h)  # ids [R, h]
    # the same query again (the pre-rank tower after the retrieval tower) is answered from the last lookup, read-only
    assert data.recent_clicks(frame["user_id"].to_numpy(), frame["time_ms"].to_numpy(), h) is recent
    assert not recent.flags.writeable
    np.testing.assert_array_equal(data.recent_clicks(frame["user_id"].to_numpy()[:3], frame["time_ms"].to_numpy()[:3],
                                                     h), recent[:3])
    # the tower reads their codes: 0 where the item-id vocabulary does not hold the item (e.g. first seen in test)
    np.testing.assert_array_equal(inputs.history, inputs.history_codes(recent))
    imp = data.impressions
    start, clicked = request_start_ms(imp), imp["click"].to_numpy() > 0
    checked = 0
    for r in range(len(frame)):
        before = set(imp["item_id"].to_numpy()[clicked & (imp["user_id"].to_numpy() == frame.user_id[r])
                                               & (start < frame.time_ms[r])].tolist())
        got = recent[r][recent[r] >= 0].tolist()
        assert len(set(got)) == len(got) == min(len(before), h)
        if len(before) <= h:
            assert set(got) == before
            checked += len(got) > 0
    assert checked >= 10
    served = towers.user_embed(data, to_requests(frame, data.context_names))
    with torch.inference_mode():
        trained = towers.model.user_tower(*inputs.user_batch(inputs.user_rows(data.map_users(
            frame["user_id"].to_numpy())), np.arange(len(frame)))).numpy()
    np.testing.assert_allclose(served, trained, atol=1e-6)


def test_towers_serve_the_popularity_prior_validation_chose(run_a):
    """Every saved tower records the prior weight its grid chose on validation (students/selection.json) and the
    popular channel's settings; serving (load_towers: Towers.scores, the retriever) adds the same term the
    students step judged with (_ExactTowers over the corpus), to float rounding."""
    import numpy as np

    from cascade.channels.prior import PRIOR_FILE
    from cascade.data.requests import requests_frame, to_requests
    from cascade.pipeline.students import _ExactTowers
    from cascade.run_data import RunData, load_towers

    _, run_dir, _ = run_a
    data = RunData(run_dir / "data")
    sel = A.read_json(run_dir / "students" / "selection.json")
    popular = A.read_json(run_dir / "channels" / "popular" / "channel.json")["params"]
    weights = []
    for stage in ("retrieval", "prerank"):
        by_scale = {g["scale"]: g for g in sel[stage]["grid"]}
        temp = sel[stage]["temperature"]  # the KD temperature: the retrieval tower's listnet has one, pre-rank none
        if stage == "prerank" or sel[stage]["chosen_scale"] == 0:
            assert not temp["searched"] and temp["why"] in ("no distillation term with a temperature",
                                                            "scale 0 (no distillation)"), temp
        else:
            assert temp["searched"] and temp["configured"] == 1.0
            assert [r["temperature"] for r in temp["grid"]] == [0.5, 1.0, 2.0]
            assert temp["chosen"] in [r["temperature"] for r in temp["grid"] if r["within_one_se"]]
            # the configured temperature's row is the scale grid's row of the chosen scale
            one = next(r for r in temp["grid"] if r["temperature"] == 1.0)
            key = f"valid_click_recall@{sel[stage]['size']}"
            assert one[key] == by_scale[sel[stage]["chosen_scale"]][key]
        for variant, scale in sel[stage]["variants"].items():
            saved = A.read_json(run_dir / "students" / variant / stage / PRIOR_FILE)
            row = by_scale[scale]
            if variant == "distilled" and temp["searched"]:  # served at the temperature chosen at that scale
                row = next(r for r in temp["grid"] if r["temperature"] == temp["chosen"])
            assert saved == {"weight": row["popularity_prior"], **popular}
            tried = [r["weight"] for r in row["popularity_prior_grid"]]
            assert tried[:6] == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0] and tried[6:] == [8.0, 16.0, 32.0][:len(tried) - 6]
            assert_doubled_only_at_the_edge(row["popularity_prior_grid"], 6, "valid_click_recall@")
            assert row["popularity_prior"] in [r["weight"] for r in row["popularity_prior_grid"]
                                               if r["within_one_se"]]
            weights.append(saved["weight"])
    assert any(w > 0 for w in weights)  # the tiny world's towers take a prior somewhere
    frame = requests_frame(data.split_impressions("test"), data.context_names).iloc[:40].reset_index(drop=True)
    req = to_requests(frame, data.context_names)
    for variant in ("distilled", "ground_truth"):
        for stage in ("retrieval", "prerank"):
            towers = load_towers(run_dir / "students" / variant / stage, data)
            w = A.read_json(run_dir / "students" / variant / stage / PRIOR_FILE)["weight"]
            assert (towers.prior is None) == (w == 0) and (towers.prior is None or towers.prior.weight == w)
            ids, scores = _ExactTowers(towers, data).select(req, None, 30)
            np.testing.assert_allclose(towers.scores(data, req, ids), scores, rtol=1e-4, atol=1e-4)


def assert_doubled_only_at_the_edge(rows: list[dict], n_grid: int, score_prefix: str, key: str = "weight") -> None:
    """Each value tried beyond the first ``n_grid`` grid rows is twice the largest before it, tried because that
    one scored best of all tried before it."""
    score = [next(v for k, v in r.items() if k.startswith(score_prefix)) for r in rows]
    for i in range(n_grid, len(rows)):
        assert rows[i][key] == 2 * rows[i - 1][key]
        assert max(range(i), key=lambda j: (score[j], -j)) == i - 1, (i, score)


def test_prior_weight_is_chosen_by_what_validation_clicks(run_a):
    """choose_prior on constructed judges: when every judged request clicked exactly the popular channel's three most
    clicked items, a prior above 0 is chosen and its lists keep nearly all of them; when the clicks are items nobody
    clicked in the window, the prior cannot help and 0 (no prior) is chosen."""
    import numpy as np

    from cascade.arrays import PAD
    from cascade.channels import PopularChannel
    from cascade.pipeline.judge import Judge, validation_judge
    from cascade.pipeline.students import _ExactTowers, choose_prior
    from cascade.run_data import RunData, load_towers

    _, run_dir, _ = run_a
    data = RunData(run_dir / "data")
    towers = load_towers(run_dir / "students" / "distilled" / "retrieval", data)
    towers.prior = None  # the tower alone: the constructed judges below are about its own lists
    base = validation_judge(data, 200, seed=0)
    popular = PopularChannel(data.history, 1.0, 3_600_000)
    top = popular.select(base.requests, None, 3)[0]
    keep = (top != PAD).all(axis=1)
    req = base.requests.take(np.flatnonzero(keep))
    grid = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0)
    w, recall, rows = choose_prior(towers.model, towers.inputs, data, Judge(req, top[keep], None, "popular"), 10,
                                   popular, grid, seed=0)
    assert len(req) >= 20 and w > 0 and np.nanmean(recall) >= 0.9
    assert rows[0]["weight"] == 0.0 and rows[0]["valid_click_recall@10"] < np.nanmean(recall)
    # a grid that stops short of the best weight is widened: doubled while its largest weight scores best
    judge = Judge(req, top[keep], None, "popular")
    _, _, short = choose_prior(towers.model, towers.inputs, data, judge, 10, popular, (0.0, 0.01), seed=0)
    assert [r["weight"] for r in short] == [0.0, 0.01]  # no doubling asked for
    _, _, wide = choose_prior(towers.model, towers.inputs, data, judge, 10, popular, (0.0, 0.01), seed=0,
                              doublings=12)
    scores = [r["valid_click_recall@10"] for r in wide]
    assert len(wide) > 3 and scores[-1] >= 0.9 > scores[1], wide  # 0.01 alone keeps few of the popular top 3
    assert_doubled_only_at_the_edge(wide, 2, "valid_click_recall@")
    assert len(wide) == 14 or max(scores[:-1]) >= scores[-1]  # stopped: the largest no longer scored best alone
    # the tower's own favourites that were clicked least in the window: the prior only pushes others ahead of them
    counts = np.zeros(len(data.item_ids))
    for s in np.unique((np.asarray(req.time_ms) // 3_600_000) * 3_600_000):
        ids, c = popular.ranked(int(s))
        counts[np.searchsorted(data.item_ids, ids)] += c
    own = _ExactTowers(towers, data).select(req, None, 50)[0]
    least = np.argsort(counts[np.searchsorted(data.item_ids, own)], axis=1, kind="stable")[:, :2]
    clicked = np.take_along_axis(own, least, axis=1)
    w, _, rows = choose_prior(towers.model, towers.inputs, data, Judge(req, clicked, None, "least clicked"), 50,
                              popular, grid, seed=0)
    assert w == 0.0 and rows[0]["valid_click_recall@50"] == 1.0, rows
    assert rows[-1]["valid_click_recall@50"] < 0.9  # a heavy prior pushes them out
    _, _, same = choose_prior(towers.model, towers.inputs, data, Judge(req, clicked, None, "least clicked"), 50,
                              popular, grid, seed=0, doublings=3)
    assert same == rows  # the best weight (0) is not the largest: nothing to widen


def test_popularity_headroom_benchmark_agrees_with_the_replay(run_a):
    """benchmarks/popularity_headroom.py on the tiny run: its blend at b = 0 is the run's most-popular, and that
    list's test click-recall@K equals the replay's most-popular baseline request for request at the replay's K (the
    replay fetches N1 and keeps K; the benchmark asks for K: the seen filter must not shrink either)."""
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import popularity_headroom as ph

    from cascade.channels import load_channels
    from cascade.pipeline.judge import split_judge
    from cascade.run_data import RunData

    _, run_dir, _ = run_a
    k = A.read_json(run_dir / "config.json")["replay"]["k"]  # another test of this module replays at k = 5
    res = ph.measure(run_dir, k)
    window = A.read_json(run_dir / "channels" / "popular" / "channel.json")["params"]["window_days"]
    assert res["blend"]["0.0"]["test"]["mean"] == pytest.approx(
        res["lists"][f"most-popular, clicks, {window:g} days"]["test"]["mean"])
    assert res["blend_chosen_on_valid"] in ph.BLEND and len(res["lists"]) == 2 * len(ph.WINDOWS) + 1
    assert len(res["ease"]) == (len(ph.EASE_LAMBDAS) + 1) * len(ph.BLEND)
    assert {res["ease_blend_chosen_on_valid"], res["teacher_ease_chosen_on_valid"]} <= set(res["ease"])
    # the hindsight list: the split's clicks counted, most first, ties by id, padded; the same for every request
    imp = pd.DataFrame({"item_id": [7, 3, 7, 5, 3, 9], "click": [1, 1, 1, 1, 1, 0]})
    ids, counts = ph.Hindsight(imp).select(list(range(2)), None, 5)
    assert ids.tolist() == [[3, 7, 5, -1, -1]] * 2 and counts[0, :3].tolist() == [2, 2, 1]
    data = RunData(run_dir / "data")
    judge = split_judge(data, "test", 10**9, seed=0)
    popular = load_channels(run_dir / "channels", data.history, ["popular"])["popular"]
    mine = pd.DataFrame({"request_id": np.asarray(judge.requests.request_id), "mine": ph.recall(judge, popular, k)})
    replay = pd.read_parquet(run_dir / "replay" / "baseline_popular_requests.parquet")
    both = mine.merge(replay[["request_id", "rank_click_recall"]], on="request_id")
    assert len(both) >= 50
    np.testing.assert_allclose(both["mine"], both["rank_click_recall"])
    # its teacher + 0 x EASE is the replay's teacher's own list over the corpus, request for request
    from cascade.channels import EaseChannel
    from cascade.models.scoring import ranker_scorer
    from cascade.run_data import load_ranker

    ease = EaseChannel(data.history, 200.0).fit(data.split_history("train"), data.item_ids)
    teacher = ph.TeacherEase(ranker_scorer(load_ranker(run_dir / "teacher" / "teacher", data.spec), data), ease, 0.0)
    mine = pd.DataFrame({"request_id": np.asarray(judge.requests.request_id), "mine": ph.recall(judge, teacher, k)})
    replay = pd.read_parquet(run_dir / "replay" / "teacher_corpus_requests.parquet")
    both = mine.merge(replay[["request_id", "rank_click_recall"]], on="request_id")
    assert len(both) >= 50
    np.testing.assert_allclose(both["mine"], both["rank_click_recall"])


def test_popularity_headroom_blends_most_popular_with_standardised_ease():
    """most-popular + b x EASE ranks the corpus by log(1 + window clicks) + b x the request's EASE scores
    standardised over the corpus; b = 0 is most-popular's order (ties by id)."""
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import popularity_headroom as ph

    from cascade.channels import EaseChannel, PopularChannel
    from cascade.data.history import EventHistory
    from cascade.data.requests import Requests

    # users 1-3 click items 10, 20, 30 (user 3 also sees 30 without a click, and clicks 10 twice)
    u = np.array([1, 1, 2, 2, 3, 3, 3, 3])
    i = np.array([10, 20, 20, 30, 10, 30, 10, 20])
    t = np.array([1, 2, 3, 4, 5, 6, 7, 8]) * 1000
    c = np.array([1, 1, 1, 1, 1, 0, 1, 1])
    log = EventHistory(u, i, t, c)
    ease = EaseChannel(log, lam=2.0).fit(log, np.array([30, 10, 20]))
    req = Requests(np.array([3]), np.array([7500]))  # user 3 has clicked 10 before: its EASE row is B[10]
    e = ease.weights_[0].astype(np.float64)
    z = (e - e.mean()) / e.std()
    np.testing.assert_allclose(ph.standardised(ease, req)[0], z, rtol=1e-6)
    popular = PopularChannel(log, None, 1000)  # clicks before 7000: 10 twice, 20 twice, 30 once
    ids, _ = ph.PopularEase(popular, ease, 0.0).select(req, None, 3)
    assert ids[0].tolist() == [10, 20, 30]
    ids, scores = ph.PopularEase(popular, ease, 3.0).select(req, None, 3)
    want = np.log1p([2.0, 2.0, 1.0]) + 3.0 * z  # items 10, 20, 30
    order = np.argsort(-want, kind="stable")
    assert ids[0].tolist() == np.array([10, 20, 30])[order].tolist()
    np.testing.assert_allclose(scores[0], want[order], rtol=1e-6)


def test_export_onnx_matches_the_eager_models_in_onnxruntime(run_a, tmp_path):
    """`--format onnx`: each model in onnxruntime against the eager model, max |onnx - eager| < 1e-5 (measured:
    3e-8 to 2.4e-7)."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason=f"{package} is not installed (pip install 'cascade-distill[export]')")
    import numpy as np
    import onnxruntime

    from cascade.run_data import RunData, load_ranker
    from cascade.serve.export import export_run

    _, run_dir, _ = run_a
    m = export_run(run_dir, "onnx", tmp_path / "onnx", variants=("distilled",))
    assert len(m["models"]) == 6 and all(v["max_abs_diff"] < 1e-5 for v in m["models"].values())
    data = RunData(run_dir / "data")
    test = data.encoded("test")
    cat, num = test.cat[-100:].astype(np.int64), test.num[-100:].astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "rank_student.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {"cat": cat, "num": num})[0]
    student = load_ranker(run_dir / "students" / "rank_student", data.spec)
    with torch.inference_mode():
        want = student(torch.as_tensor(cat), torch.as_tensor(num)).numpy()
    diff = float(np.abs(got - want).max())
    assert got.shape == (100,) and diff < 1e-5, diff


def test_an_unavailable_tracker_asked_for_is_an_error(monkeypatch):
    import cascade.pipeline.config as pc

    monkeypatch.setattr(pc, "_installed", lambda module: False)
    for key, package in (("tracking.tensorboard", "tensorboard"), ("tracking.mlflow", "mlflow")):
        with pytest.raises(ConfigError, match=f"{key} = true needs the {package} package, which is not installed"):
            load_config(TINY, [f"{key}=true"])
    load_config(TINY)  # nothing asked for: nothing needed
    with pytest.raises(ConfigError, match="tracking.mlflow_tracking_uri is set but tracking.mlflow is false"):
        load_config(TINY, ['tracking.mlflow_tracking_uri="file:x"'])


def test_a_tracking_store_mlflow_cannot_use_is_a_one_line_error_before_any_step(tmp_path):
    """mlflow-skinny (the dev extra's) has no database store, MLflow's default: the run stopped on a traceback."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (the tracking or dev extra)")
    r = subprocess.run([sys.executable, "-m", "cascade.cli", "run", str(TINY), "--set",
                        f"run.runs_dir={json.dumps(str(tmp_path / 'runs'))}", "--set", "tracking.mlflow=true", "--set",
                        'tracking.mlflow_tracking_uri="bogus://nowhere"'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cascade: error: tracking.mlflow: MLflow cannot use the tracking store (bogus://nowhere)" in r.stderr
    assert "tracking.mlflow_tracking_uri" in r.stderr.split("bogus://nowhere)", 1)[1]
    made = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert made == [".lock", "config.json", "run.log"]  # no step ran


def test_mlflows_long_refusal_keeps_its_remedy_and_the_hint_fits_the_installed_package(tmp_path, monkeypatch):
    """MLflow says what to do at the end of a long message (a file store: "set MLFLOW_ALLOW_FILE_STORE=true"): the
    one-line error keeps its start and its end; the hint names a database store only where one can be written."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (the tracking or dev extra)")
    from cascade.pipeline import tracking
    from cascade.pipeline.config import TrackingSection
    from cascade.pipeline.tracking import Trackers, one_line

    assert one_line("a  b\n c.") == "a b c."
    long = "start " + "x" * 500 + " end: set THIS=true to opt out."
    assert one_line(long, head=10, tail=25) == "start xxxx ... set THIS=true to opt out."

    def refuse(name):
        raise mlflow.exceptions.MlflowException("The filesystem backend is in maintenance mode.\n" + "y " * 300
                                                + "set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception.")

    monkeypatch.setattr(mlflow, "set_experiment", refuse)
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    cfg = TrackingSection(mlflow=True, mlflow_tracking_uri="file:///somewhere")
    for full, hint in ((True, "a database such as sqlite:///mlflow.db)"),
                       (False, "a database store needs the full mlflow package")):
        monkeypatch.setattr(tracking, "_installed", lambda name, full=full: full and name == "mlflow")
        with pytest.raises(ConfigError) as err:
            Trackers(cfg, tmp_path, "tiny", {})
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("tracking.mlflow: MLflow cannot use the tracking store "
                                                   "(file:///somewhere): MlflowException: The filesystem backend")
        assert "... y y" in msg and "`MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception. Set " in msg
        assert msg.endswith(hint + ("" if full else ": pip install 'cascade-distill[tracking]')"))


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
    """The notebook as Jupyter runs it: in notebooks/, with CASCADE_RUN relative to the repository root (a path
    resolved from the working folder would miss). It plots per-stage outcome metrics, measures where the two
    cascades disagree and traces the most disagreeing request through both."""
    import os

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _, run_dir, _ = run_a
    monkeypatch.setenv("CASCADE_RUN", os.path.relpath(run_dir, ROOT))
    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert f"run: {run_dir.resolve()}" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # outcome metrics per stage; agreement
    n = A.read_json(run_dir / "replay" / "summary.json")["variants"]["distilled"]["quality"]["n_requests"]
    assert f"{n} requests: the two final lists are identical for" in text
    assert "requests with clicks: distilled keeps more of them in" in text
    assert "through the distilled cascade" in text and "through the ground_truth cascade" in text
    tables = "\n".join(o["data"].get("text/plain", "") for o in outputs if "data" in o)
    assert "click_recall" in tables and "in the other list" in tables and "clicked" in tables


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


def test_load_cascade_serves_the_replays_channel_cascade(run_a):
    """load_cascade(run, "distilled+channels") gives, request for request, the final lists the replay's
    distilled+channels variant wrote (same channels, quotas, ranker, seen-item filter and batches)."""
    import numpy as np
    import pandas as pd

    from cascade.channels import saved_channel_names
    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import cascade_variants, load_cascade, union_channels

    _, run_dir, _ = run_a
    c = A.read_manifest(run_dir / "replay")["config"]  # the replay as it ran (other tests may have redone it)
    assert cascade_variants(run_dir) == ["distilled", "ground_truth", "distilled+channels"]
    data, casc = load_cascade(run_dir, variant="distilled+channels", ranker=c["ranker"])
    # replay.channels unset: every channel the channels step built, in the union's order
    assert c["channels"] is None
    names = union_channels(None, saved_channel_names(run_dir / "channels"))
    assert names == ("popular", "itemcf", "als", "recent", "content")  # the world re-consumes: nothing left out
    assert casc.channels == ("two_tower", *names)
    # neither set: the defaults, a pre-rank that keeps the quotas and half the slots for the two-tower
    assert c["prerank_quotas"] is None and c["two_tower_quota"] is None and casc.prerank_quotas is True
    rest = 0.5 / len(names)
    np.testing.assert_allclose(casc.retriever.quotas, [0.5] + [rest] * len(names))
    rows = pd.read_parquet(run_dir / "replay" / "distilled+channels_requests.parquet")
    frame = requests_frame(data.split_impressions("test"), data.context_names)
    frame = frame.set_index("request_id").loc[rows.request_id.to_numpy()].reset_index()
    req = to_requests(frame, data.context_names)
    casc.seen, _ = data.seen_filter
    b = c["batch_size"]
    finals = [casc.recommend(req.take(np.arange(s, min(s + b, len(req)))), c["n_retrieve"], c["n_prerank"], c["k"],
                             filter_seen=casc.seen is not None).items for s in range(0, len(req), b)]
    np.testing.assert_array_equal(np.concatenate(finals), np.stack(rows.final_items.to_list()))
    # the replay's latency of this variant has each channel's, named as the run's channels
    lat = A.read_manifest(run_dir / "replay")["metrics"]["latency"]["distilled+channels"]["latency_batch1"]
    assert set(lat["retrieval_channels_ms"]) == {"two_tower", *names}


def test_the_report_says_what_its_oracle_ratio_is_which_ranker_serves_and_what_a_channel_gap_compares(run_a):
    """Three things a first reader misread (a review of the default run's report): the paired gaps' oracle ratio,
    which the headline does not show; a rank student labelled served where the cascades rank with the teacher; and
    the channel table's gap, the union's cascade minus the channel's cascade alone (not the union without it)."""
    md = (run_a[1] / "report" / "report.md").read_text()
    k = A.read_manifest(run_a[1] / "replay")["config"]["k"]  # the replay as it ran (another test redoes it at 5)
    assert f"oracle ratio: a request's oracle clicks@K over the most any {k} items could get it" in md
    assert "| oracle ratio |" in md  # the paired table has such rows on the world
    assert ('The replay\'s cascades rank with the teacher (replay.ranker = "teacher"): the rank student marked '
            'served is the one load_cascade(..., ranker="student") serves') in md
    assert "| all channels minus it alone |" in md and "| all channels minus it |" not in md
    # the headline's verdict: the cascade with the best oracle share of the report's own rows, said before the table
    rows = A.read_json(run_a[1] / "report" / "report.json")["outcomes"]["rows"]
    best = max((r for r in rows if r["kind"] == "cascade"), key=lambda r: r["oracle_ratio"])
    verdict = (f"Verdict, by the oracle's share of the best possible clicks (oracle ratio@{k}: the true click model, "
               f"which the logging policy does not bias): {best['name']} leads the cascades "
               f"({best['oracle_ratio']:.4f}).")
    assert verdict in md and md.index(verdict) < md.index("| list | kind |")
    # what a reader asked after: the union's missing retrieval AUC, grids beyond the configured ones, and why the
    # exposure weight's and the collaborative term's tables differ in the last digit at weight 0
    assert "A retrieval stage that merges channels has no AUC ('–')" in md
    assert "at most students.grid_doublings times, so a table may hold values beyond the configured grid" in md
    assert "the exposure weight's table scores in float32" in md


def test_the_data_step_counts_the_cold_start_of_each_later_split_and_the_report_shows_it(run_a):
    """For valid and test: the share of requests whose user has no train impression, and of clicks on items with
    none (no model fitted on train knows them), recomputed here from the step's own impressions."""
    from cascade.run_data import SPLIT_CODES

    run_dir = run_a[1]
    splits = A.read_json(run_dir / "data" / "summary.json")["splits"]
    imp = pd.read_parquet(run_dir / "data" / "impressions.parquet", columns=["request_id", "user_id", "item_id",
                                                                              "click", "split"])
    train = imp[imp["split"] == SPLIT_CODES["train"]]
    assert "requests_of_new_users" not in splits["train"]
    for name in ("valid", "test"):
        sub = imp[imp["split"] == SPLIT_CODES[name]]
        users = sub.drop_duplicates("request_id")["user_id"]
        clicked = sub.loc[sub["click"] == 1, "item_id"]
        assert splits[name]["requests_of_new_users"] == pytest.approx((~users.isin(set(train["user_id"]))).mean())
        assert splits[name]["clicks_on_new_items"] == pytest.approx((~clicked.isin(set(train["item_id"]))).mean())
    md = (run_dir / "report" / "report.md").read_text()
    assert "| split | rows | requests | ctr | requests of users new to train | clicks on items new to train |" in md
    assert "new to train: a user or item with no train impression" in md


def _replayed_again(run_a, tmp_path, override: str) -> Path:
    """A copy of run A in tmp_path / "tiny" updated with a replay ``override``: only the replay and report run."""
    import shutil

    shutil.copytree(run_a[1], tmp_path / "tiny")
    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(tmp_path))}", *A_SETS, "tracking.tensorboard=true",
                             override])
    res = run_pipeline(cfg, progress=False, update=True)
    assert [s for s, r in res.items() if r["status"] == "ran"] == ["replay", "report"]
    return tmp_path / "tiny"


def test_channel_quotas_redo_only_the_replay_and_the_served_cascade_keeps_them(run_a, tmp_path):
    from cascade.serve.cascade import load_cascade

    _replayed_again(run_a, tmp_path, "replay.channel_quotas={popular=3}")
    names = ("popular", "itemcf", "als", "recent", "content")
    # the two-tower keeps half the slots; popular weighs 3 and the four others 1: 0.5 x 3/7 and 0.5 x 1/7
    want = {"two_tower": 0.5, "popular": 1.5 / 7, **{n: 0.5 / 7 for n in names[1:]}}
    recorded = A.read_json(tmp_path / "tiny" / "replay" / "summary.json")["variants"]["distilled+channels"]
    assert recorded["channels"]["quotas"] == pytest.approx(want)
    _, casc = load_cascade(tmp_path / "tiny", variant="distilled+channels")
    assert dict(zip(casc.retriever.names, casc.retriever.quotas)) == pytest.approx(want)
    # the report's channel table gives each channel the quota it took
    per_channel = A.read_json(tmp_path / "tiny" / "report" / "report.json")["channels"]["per_channel"]
    assert {n: e["quota"] for n, e in per_channel.items()} == pytest.approx(want)


def test_a_score_normalised_union_redoes_only_the_replay_and_the_served_cascade_merges_as_it_did(run_a, tmp_path):
    """replay.merge = "scores": the replay and report alone run again; load_cascade serves the replay's lists request
    for request, its union taken by the channels' standardised scores (not the quota union's lists), and the report
    shows no quotas."""
    import numpy as np
    import pandas as pd

    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import load_cascade

    run_dir = run_a[1]
    _replayed_again(run_a, tmp_path, 'replay.merge="scores"')
    recorded = A.read_json(tmp_path / "tiny" / "replay" / "summary.json")["variants"]["distilled+channels"]
    assert recorded["channels"] == {"merge": "scores", "quotas": None}
    data, casc = load_cascade(tmp_path / "tiny", variant="distilled+channels")
    # the pre-rank keeps each channel's share of the request's union (replay.prerank_quotas unset)
    assert casc.retriever.merge == "scores" and casc.retriever.quotas is None and casc.prerank_quotas is True
    c = A.read_manifest(tmp_path / "tiny" / "replay")["config"]
    rows = pd.read_parquet(tmp_path / "tiny" / "replay" / "distilled+channels_requests.parquet")
    frame = requests_frame(data.split_impressions("test"), data.context_names)
    req = to_requests(frame.set_index("request_id").loc[rows.request_id.to_numpy()].reset_index(), data.context_names)
    casc.seen, _ = data.seen_filter
    b = c["batch_size"]
    finals = [casc.recommend(req.take(np.arange(s, min(s + b, len(req)))), c["n_retrieve"], c["n_prerank"], c["k"],
                             filter_seen=casc.seen is not None).items for s in range(0, len(req), b)]
    np.testing.assert_array_equal(np.concatenate(finals), np.stack(rows.final_items.to_list()))
    # the union is not the quota union's: its retrieval lists differ on most requests
    _, quota_casc = load_cascade(run_dir, variant="distilled+channels")
    first = req.take(np.arange(min(b, len(req))))
    by_scores = casc.recommend(first, c["n_retrieve"], c["n_prerank"], c["k"], return_stages=True)
    by_quotas = quota_casc.recommend(first, c["n_retrieve"], c["n_prerank"], c["k"], return_stages=True)
    same = [set(x) == set(y) for x, y in zip(by_scores.stages["retrieval"][0], by_quotas.stages["retrieval"][0])]
    assert np.mean(same) < 0.5
    report = A.read_json(tmp_path / "tiny" / "report" / "report.json")["channels"]
    assert report["merge"] == "scores" and all(e["quota"] is None for e in report["per_channel"].values())
    md = (tmp_path / "tiny" / "report" / "report.md").read_text()
    section = md[md.index("## Retrieval channels\n"):]
    section = section[:section.index("\n## ")]
    assert "| channel | click-recall@N1 alone |" in section and "quota" not in section.split("\n\n")[1]
    assert "The union (each channel's scores standardised over its own list of the request, an item taking its " \
           "best: replay.merge = 'scores') has click-recall@N1" in section
    assert "the pre-rank keeps every channel's share of the request's union" in section


def test_a_served_run_filters_seen_items_as_its_data_step_decided_and_a_request_gets_one_list_in_any_batch(
        run_a, tmp_path):
    """load_cascade serves what the replay measured: seen items filtered where the run's data step decided so (here
    a copy of run A whose data step's recorded decision says so), and a request's list never depends on what the
    other requests of its batch saw (each row over-fetches by what its own user saw)."""
    import numpy as np

    from cascade.data.requests import requests_frame, to_requests
    from cascade.run_lock import RunLockedError
    from cascade.serve.cascade import load_cascade, trace_requests

    _, run_dir, _ = run_a
    run = tmp_path / "tiny"
    shutil.copytree(run_dir, run)
    manifest = A.read_json(run / "data" / "manifest.json")
    manifest["metrics"]["summary"]["filter_seen"] = {"applied": True, "why": "as if the log did not re-consume"}
    A.write_json(run / "data" / "manifest.json", manifest)
    data, casc = load_cascade(run, "distilled+channels", ranker="student", autocast="off")
    assert casc.seen is not None
    req = to_requests(requests_frame(data.split_impressions("test"), data.context_names), data.context_names)
    req = req.take(np.arange(min(60, len(req))))
    served = casc.recommend(req, 100, 40, 10, return_stages=True)
    shown = data.history.seen(req.user_id, served.items, req.time_ms)
    assert not shown.any()  # no final item was shown to its user before the request
    plain = casc.recommend(req, 100, 40, 10, filter_seen=False).items
    assert data.history.seen(req.user_id, plain, req.time_ms).any()  # the world re-consumes: there was some
    # the same list alone as in the batch, at every stage
    for b in range(0, len(req), 7):
        alone = casc.recommend(req.take(np.array([b])), 100, 40, 10, return_stages=True)
        np.testing.assert_array_equal(alone.items[0], served.items[b])
        np.testing.assert_array_equal(alone.stages["retrieval"][0][0], served.stages["retrieval"][0][b])
    # every channel's timing adds up its fetches (filtering fetches some rows twice)
    assert sum(served.timing_s[f"retrieval/{c}"] for c in casc.channels) <= served.timing_s["retrieval"]
    # a trace follows the served lists, and names a request it cannot serve
    assert [t["item_id"].tolist() for t in trace_requests(data, casc, req.take(np.arange(3)), 100, 40, 10)] == \
        [served.items[b].tolist() for b in range(3)]
    bad = req.take(np.arange(2))
    bad.user_id = np.array([-1, bad.user_id[1]])
    with pytest.raises(ValueError, match=r"trace_requests: 1 request\(s\) cannot be served, the first: request .* "
                                         r"invalid user_id -1"):
        trace_requests(data, casc, bad, 100, 40, 10)
    # a time in seconds reads as 1970, before the log: refused per request, the others served
    secs = req.take(np.arange(2))
    secs.time_ms = np.array([secs.time_ms[0] // 1000, secs.time_ms[1]])
    res = casc.recommend(secs, 100, 40, 10)
    assert res.errors[0].startswith(f"request {int(secs.request_id[0])}: time_ms {int(secs.time_ms[0])} is before "
                                    "the log begins") and "epoch milliseconds" in res.errors[0]
    assert res.errors[1] is None and (res.items[0] == -1).all()
    np.testing.assert_array_equal(res.items[1], served.items[1])
    # sizes that are no integers, and what is no Requests, are named
    with pytest.raises(TypeError, match=r"n_retrieve must be an integer, got 100.0"):
        casc.recommend(req, 100.0, 40, 10)
    with pytest.raises(TypeError, match=r"requests must be a cascade.data.requests.Requests .*got DataFrame"):
        casc.recommend(requests_frame(data.split_impressions("test"), data.context_names), 100, 40, 10)
    # a folder that is no run, and a run another process is writing
    with pytest.raises(FileNotFoundError, match=r"not a run folder"):
        load_cascade(run / "data")
    with pytest.raises(FileNotFoundError, match=r"no such run folder"):
        load_cascade(tmp_path / "nowhere")
    holder = subprocess.Popen([sys.executable, "-c", f"import time\nfrom cascade.run_lock import folder_lock\n"
                               f"with folder_lock({str(run)!r}, command='cascade run'):\n    print('locked', "
                               f"flush=True)\n    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} \(cascade run"):
            load_cascade(run)
    finally:
        holder.kill()
        holder.wait()


def test_channel_cascade_times_each_channel_traces_origins_and_refuses_unknown_variants(run_a, tmp_path):
    import shutil

    from cascade.arrays import PAD
    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import load_cascade, trace_requests

    cfg, run_dir, _ = run_a
    data, casc = load_cascade(run_dir, variant="distilled+channels", ranker="student")
    req = to_requests(requests_frame(data.split_impressions("test"), data.context_names).iloc[:3],
                      data.context_names)
    res = casc.recommend(req, 100, 40, 10, return_stages=True)
    assert {t for t in res.timing_s if t.startswith("retrieval/")} == \
        {f"retrieval/{n}" for n in casc.channels}
    items = res.stages["retrieval"][0]
    assert res.origin.shape == items.shape and ((res.origin == -1) == (items == PAD)).all()
    # each candidate's origin is a channel that proposes it (the two-tower: the retriever's own list)
    for c, name in enumerate(res.channels):
        own = casc.retriever.channels[c].select(req, None, 100)[0]
        mine = res.origin == c
        assert all(set(items[b][mine[b]]) <= set(own[b]) for b in range(len(req))), name
    tables = trace_requests(data, casc, req, 100, 40, 10)
    assert all(set(t["channel"]) <= set(res.channels) and t["channel"].notna().all() for t in tables)
    with pytest.raises(FileNotFoundError, match=r"no cascade variant 'ground_truth\+channels'.*distilled\+channels"):
        load_cascade(run_dir, variant="ground_truth+channels")
    from cascade.serve.export import ExportError, exportables

    with pytest.raises(ExportError, match="the distilled variant's towers"):  # export takes two-tower variants only
        exportables(run_dir, ("distilled+channels",))
    # a changed channel file is refused, naming it
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    npz = bad / "channels" / "itemcf" / "channel.npz"
    npz.write_bytes(npz.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(A.ArtifactError, match="itemcf/channel.npz"):
        load_cascade(bad, variant="distilled+channels")


def test_index_from_another_model_is_refused_naming_both_hashes(run_a, tmp_path):
    import shutil

    from cascade.index.faiss_index import IndexMismatchError
    from cascade.serve.cascade import load_cascade

    _, run_dir, _ = run_a
    fake = tmp_path / "mixed"
    shutil.copytree(run_dir, fake)
    # an index that records another tower (the variants may share one retrieval tower, at scale 0): the
    # pre-rank tower's weights stand for "another model"
    mine = A.sha256_file(fake / "students" / "distilled" / "retrieval" / "model.pt")
    theirs = A.sha256_file(fake / "students" / "distilled" / "prerank" / "model.pt")
    index_manifest = fake / "index" / "distilled" / "manifest.json"
    A.write_json(index_manifest, {**A.read_json(index_manifest), "model_hash": theirs})
    assert mine != theirs
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
    res = run_pipeline(cfg, progress=False, update=True)
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


def test_the_ease_channel_is_built_tuned_and_loaded_when_asked(tmp_path):
    """channels.build with "ease": the step fits one EASE per lambda of the grid, keeps the one with the best
    validation click-recall@tune_k and saves it; load_channels serves it; the replay names its baseline by lambda.
    Without "ease" in build its grid is refused as an option that would do nothing."""
    import numpy as np

    from cascade.channels import EaseChannel, load_channels
    from cascade.pipeline.replay import baseline_name
    from cascade.run_data import RunData
    from worlds import tiny_channels

    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(tmp_path))}", "run.threads=1",
                             *tiny_channels("popular", "ease"), "channels.ease_lambdas=[10.0, 100.0]",
                             'ranklog.channels=["popular"]', 'replay.channels=["popular"]'])
    run_pipeline(cfg, progress=False, until="channels")
    m = A.read_manifest(tmp_path / "tiny" / "channels", verify=True)
    grid = m["metrics"]["ease"]["grid"]
    assert [g["params"]["lam"] for g in grid] == [10.0, 100.0]
    best = max(grid, key=lambda g: g[f"valid_click_recall@{cfg.channels.tune_k}"])["params"]
    assert m["metrics"]["ease"]["chosen"] == best
    data = RunData(tmp_path / "tiny" / "data")
    ease = load_channels(tmp_path / "tiny" / "channels", data.history, ["ease"])["ease"]
    assert isinstance(ease, EaseChannel) and ease.lam == best["lam"]
    assert ease.weights_.shape == (len(data.item_ids), len(data.item_ids)) and np.all(np.diag(ease.weights_) == 0)
    assert baseline_name("ease", best) == f"ease (lambda {best['lam']:g})"
    with pytest.raises(ConfigError, match="ease_lambdas.*channels.build has no \"ease\""):
        load_config(TINY, ["channels.ease_lambdas=[10.0]"])


def test_cascade_refresh_prepares_the_periods_off_the_request_path(run_a):
    """Cascade.refresh(times) prepares what the stages keep per refresh period (the two towers' priors share one
    most-popular list per period); refreshed or not, the cascade serves the same lists; replay_latency refreshes
    outside its timings and reports it."""
    import numpy as np

    from cascade.data.requests import requests_frame, to_requests
    from cascade.serve.cascade import load_cascade
    from cascade.serve.replay import replay_latency

    _, run_dir, _ = run_a
    data, casc = load_cascade(run_dir, "distilled")
    retr, pre = casc.retriever.prior_towers, casc.preranker
    assert retr is not None and retr.prior is not None
    req = to_requests(requests_frame(data.split_impressions("test"), data.context_names), data.context_names)
    req = req.take(np.arange(min(40, len(req))))
    _, lazy = load_cascade(run_dir, "distilled")
    want = lazy.recommend(req, 50, 20, 5)
    refresh_ms = retr.prior.popular.refresh_ms
    n_periods = len(np.unique(np.asarray(req.time_ms) // refresh_ms))
    assert casc.refresh(req.time_ms) >= n_periods and casc.refresh(req.time_ms) == 0
    got = casc.recommend(req, 50, 20, 5)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.scores, want.scores)
    # one most-popular list per (window, refresh) in a process: the pre-rank tower's prior reads the same one
    pre_prior = pre._refresh.__self__.prior
    assert pre_prior is not None  # the tiny run's pre-rank tower has a prior too
    assert pre_prior.popular is retr.prior.popular
    _, fresh = load_cascade(run_dir, "distilled")
    lat = replay_latency(fresh, req, 50, 20, 5, batch_size=1)
    assert lat["refresh"]["periods"] >= n_periods and lat["refresh"]["ms_per_period"] > 0


def test_the_teachers_collaborative_term_is_chosen_saved_and_served(run_a, tmp_path):
    """teacher.collaborative (auto, a tiny catalogue): every (lambda, weight) of the grid is scored by the exposure
    weight's judge (the tiny world's random slice: the AUC of ranking score + weight x standardised EASE, checked
    against scikit-learn; the one-SE rule over the weights) and the choice saved beside the teacher; every scorer of
    the loaded teacher adds it; the clicks judge's click-recall@k over the corpus is the headroom benchmark's teacher
    + weight x EASE list; load_cascade refuses a run whose term file is missing or unlisted."""
    import shutil
    import sys

    import numpy as np
    from sklearn.metrics import roc_auc_score

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import popularity_headroom as ph

    from cascade.channels import EaseChannel, PopularEase
    from cascade.data.requests import Requests, impression_requests
    from cascade.models.collaborative import CollaborativeTerm
    from cascade.models.scoring import ranker_scorer
    from cascade.pipeline.judge import validation_judge
    from cascade.run_data import RunData, load_ranker
    from cascade.serve.cascade import load_cascade, select_unseen
    from cascade.train.collaborative import (
        PRIOR_EASE_LAMBDAS,
        PRIOR_EASE_WEIGHTS,
        PRIOR_WEIGHTS,
        choose_collaborative,
        grid_choice,
    )

    cfg, run_dir, _ = run_a
    c = cfg.teacher
    m = A.read_manifest(run_dir / "teacher")["metrics"]["collaborative"]
    assert m["setting"] == "auto" and m["judge"].startswith("AUC on the validation split's random")
    grid = {(r["lambda"], r["weight"]): r["valid_random_auc"] for r in m["grid"] if "part" not in r}
    assert set(grid) == {(lam, w) for lam in c.collaborative_lambdas for w in (0.0, *c.collaborative_weights)}
    # the random-slice judge: the lambda of the best AUC, then the smallest weight within one SE of the best there
    lam = grid_choice(grid)[0]
    at_lam = [r for r in m["grid"] if r.get("lambda") == lam]
    assert all(r["gap_to_best"] == pytest.approx(max(grid.values()) - r["valid_random_auc"]) for r in at_lam)
    w = min(r["weight"] for r in at_lam if r["within_one_se"])
    # then the classic prior: alone by the best AUC at every (days, EASE lambda, EASE weight), and its weight beside
    # the teacher by the one-SE rule (0: none)
    alone = {(r["popular_days"], r["prior_lambda"], r["prior_ease_weight"]): r["valid_random_auc"]
             for r in m["grid"] if r.get("part") == "prior alone"}
    assert set(alone) == {(d, lam_, b) for d in c.collaborative_popular_days for lam_ in PRIOR_EASE_LAMBDAS
                          for b in PRIOR_EASE_WEIGHTS}
    days, plam, b = max(alone, key=lambda x: (alone[x], -x[2], -x[1], -x[0]))
    beside = [r for r in m["grid"] if r.get("part") == "beside the teacher"]
    assert [(r["prior_weight"], r["popular_days"], r["prior_lambda"], r["prior_ease_weight"]) for r in beside] == [
        (t_, days, plam, b) for t_ in (0.0, *PRIOR_WEIGHTS)]
    top = max(r["valid_random_auc"] for r in beside)
    assert all(r["gap_to_best"] == pytest.approx(top - r["valid_random_auc"]) for r in beside)
    t = min(r["prior_weight"] for r in beside if r["within_one_se"])
    sd = beside[0]["score_sd"]
    expected = (None if w == t == 0 else CollaborativeTerm(lam, w) if t == 0 else
                CollaborativeTerm(lam, w, t * sd, days, 3_600_000, plam, t * sd * b))
    assert (None if m["chosen"] is None else CollaborativeTerm(**m["chosen"])) == expected
    if t == 0:
        chosen = f"{w:g} x EASE (lambda {lam:g})" if w else "none: weight 0"
        assert f"Teacher: collaborative term added to its ranking score (chosen {chosen})" in (
            run_dir / "report" / "report.md").read_text()
    data = RunData(run_dir / "data")
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    assert teacher.collaborative == expected
    # the prior alone that was chosen is recorded, and the replay serves it as a baseline: each replayed request's
    # final list is the PopularEase top-K of the corpus, seen items left out where the run filters them
    assert m["prior_alone"] == {"window_days": days, "lam": plam, "ease_weight": b, "refresh_ms": 3_600_000}
    shown = f"popular + EASE ({days:g} days, lambda {plam:g}, b {b:g})"
    assert A.read_json(run_dir / "replay" / "summary.json")["baselines"][shown]["channel"] == "popular_ease"
    rows = pd.read_parquet(run_dir / "replay" / "baseline_popular_ease_requests.parquet")
    some = rows.iloc[:25]
    prior_list = PopularEase(data.popular_channel(days, 3_600_000), data.ease(plam), b, data.item_ids)
    replayed = Requests(some["user_id"].to_numpy(), some["time_ms"].to_numpy())  # the prior reads no context
    replay = A.read_json(run_dir / "config.json")["replay"]  # another test of this module replays at k = 5
    lists = select_unseen(prior_list, replayed, replay["n_retrieve"], data.seen_filter[0])[0][:, :replay["k"]]
    np.testing.assert_array_equal(np.stack(some["final_items"].to_list()), lists)
    # the grid's AUCs, recomputed: the teacher's own ranking score + weight x the standardised EASE scores
    teacher.collaborative = None
    valid = data.split_impressions("valid")
    shown = valid[valid["is_rand"] == 1]
    req = impression_requests(shown, data.context_names)
    cand = shown["item_id"].to_numpy(np.int64)[:, None]
    base = ranker_scorer(teacher, data)(req, cand)[:, 0]
    for lam_, w_ in [(c.collaborative_lambdas[0], 0.0), (c.collaborative_lambdas[-1], c.collaborative_weights[-1])]:
        ease = EaseChannel(data.history, lam_).fit(data.split_history("train"), data.item_ids)
        z = ease.standardised(req, cand)[:, 0]
        assert grid[(lam_, w_)] == pytest.approx(roc_auc_score(shown["click"], base + np.float32(w_) * z), abs=1e-9)
    # a cell of the prior alone and the prior beside the teacher, recomputed with scikit-learn over the same slice
    zpop = data.popular_channel(days, 3_600_000).standardised(req, cand, len(data.item_ids))[:, 0]
    zease = EaseChannel(data.history, plam).fit(data.split_history("train"), data.item_ids).standardised(req, cand)
    assert alone[(days, plam, b)] == pytest.approx(roc_auc_score(shown["click"], zpop + np.float32(b) * zease[:, 0]),
                                                   abs=1e-9)
    served = base + (np.float32(w) * EaseChannel(data.history, lam).fit(data.split_history("train"), data.item_ids)
                     .standardised(req, cand)[:, 0] if w else 0)
    assert sd == pytest.approx(float(np.std(served)), rel=1e-5)
    assert beside[-1]["valid_random_auc"] == pytest.approx(roc_auc_score(
        shown["click"], served + np.float32(PRIOR_WEIGHTS[-1] * sd) * (zpop + np.float32(b) * zease[:, 0])), abs=1e-6)
    # a scorer of a teacher with a term adds weight x the standardised scores to the ranking score
    term = CollaborativeTerm(c.collaborative_lambdas[0], 0.5)
    teacher.collaborative = term
    some = req.take(np.arange(min(40, len(req))))
    items = np.tile(data.item_ids[:7], (len(some), 1))
    ease = EaseChannel(data.history, term.lam).fit(data.split_history("train"), data.item_ids)
    teacher.collaborative = None
    own = ranker_scorer(teacher, data)(some, items)
    teacher.collaborative = term
    np.testing.assert_allclose(ranker_scorer(teacher, data)(some, items),
                               own + np.float32(0.5) * ease.standardised(some, items), rtol=1e-6, atol=1e-6)
    # the clicks judge: each pair's click-recall@k over the corpus is the benchmark's teacher + weight x EASE list's
    judge = validation_judge(data, 10**9, seed=0)
    chosen, rows = choose_collaborative(teacher, data, [term.lam], [0.5, 4.0], judge, k=5)
    best = grid_choice({(r["lambda"], r["weight"]): r["valid_click_recall@5"] for r in rows})  # the best score
    assert teacher.collaborative == chosen == (None if best[1] == 0 else CollaborativeTerm(*best))
    assert grid_choice({(200.0, 0.0): 0.3, (200.0, 0.5): 0.3, (50.0, 0.5): 0.3}) == (200.0, 0.0)  # ties: 0 first
    assert grid_choice({(200.0, 0.5): 0.3, (50.0, 0.5): 0.3, (50.0, 1.0): float("nan")}) == (50.0, 0.5)
    teacher.collaborative = None
    plain = ranker_scorer(teacher, data)
    for row in rows:
        bench = ph.TeacherEase(plain, ease, row["weight"])
        assert row["valid_click_recall@5"] == pytest.approx(np.nanmean(judge.recall(judge.lists(bench, 5), 5)),
                                                            abs=1e-9)
    # the classic prior's parts: a scorer adds popular_weight x the standardised log(1 + clicks) of its window and
    # popular_ease_weight x the standardised EASE scores at its own lambda
    both = CollaborativeTerm(term.lam, 0.5, 0.75, 7.0, 3_600_000, 50.0, 0.3)
    teacher.collaborative = both
    pop = data.popular_channel(7.0, 3_600_000).standardised(some, items, len(data.item_ids))
    ease50 = EaseChannel(data.history, 50.0).fit(data.split_history("train"), data.item_ids)
    assert np.abs(pop).max() > 0
    np.testing.assert_allclose(ranker_scorer(teacher, data)(some, items),
                               own + np.float32(0.5) * ease.standardised(some, items) + np.float32(0.75) * pop
                               + np.float32(0.3) * ease50.standardised(some, items), rtol=1e-5, atol=1e-5)
    # the clicks judge with popularity windows: the prior alone at every (days, EASE lambda, EASE weight), then the
    # best of them at every weight beside the teacher (in units of the SD of its score)
    teacher.collaborative = None
    chosen, rows = choose_collaborative(teacher, data, [term.lam], [0.5], judge, k=5, popular_days=[7.0, 30.0])
    what = "valid_click_recall@5"
    alone = {(r["popular_days"], r["prior_lambda"], r["prior_ease_weight"]): r[what]
             for r in rows if r.get("part") == "prior alone"}
    assert set(alone) == {(d, lam_, b) for d in (7.0, 30.0) for lam_ in PRIOR_EASE_LAMBDAS for b in PRIOR_EASE_WEIGHTS}
    days, plam, b = max(alone, key=lambda x: (alone[x], -x[2], -x[1], -x[0]))
    beside = [r for r in rows if r.get("part") == "beside the teacher"]
    assert [r["prior_weight"] for r in beside] == [0.0, *PRIOR_WEIGHTS]
    assert all((r["popular_days"], r["prior_lambda"], r["prior_ease_weight"]) == (days, plam, b) for r in beside)
    # the weight beside the teacher: the largest within one SE of the best (the one-SE rule leaning to the prior)
    top = max(r[what] for r in beside)
    assert all(r["gap_to_best"] == pytest.approx(top - r[what]) for r in beside)
    assert all(r["within_one_se"] == (r[what] == top or r["gap_to_best"] <= r["se_of_gap"]) for r in beside)
    t = max(r["prior_weight"] for r in beside if r["within_one_se"])
    lam, w = grid_choice({(r["lambda"], r["weight"]): r[what] for r in rows if "lambda" in r})
    if t == 0:
        assert chosen == (None if w == 0 else CollaborativeTerm(lam, w))
    else:
        sd = beside[0]["score_sd"]
        assert (chosen.lam, chosen.weight, chosen.popular_days, chosen.refresh_ms, chosen.popular_lam) == (
            lam, w, days, 3_600_000, plam)
        assert (chosen.popular_weight, chosen.popular_ease_weight) == pytest.approx((t * sd, t * sd * b))
    # a row of the prior alone, recomputed over the corpus with the judge's seen items left out
    full = np.ascontiguousarray(np.broadcast_to(data.item_ids, (len(judge.requests), len(data.item_ids))))
    prior = (data.popular_channel(30.0, 3_600_000).standardised(judge.requests, full, len(data.item_ids))
             + np.float32(0.5) * ease50.standardised(judge.requests, full))
    if judge.seen is not None:
        prior = np.where(judge.seen.seen(judge.requests.user_id, full, judge.requests.time_ms), -np.inf, prior)
    top = np.take_along_axis(full, np.argsort(-prior, axis=1, kind="stable")[:, :5], 1)
    assert alone[(30.0, 50.0, 0.5)] == pytest.approx(np.nanmean(judge.recall(top, 5)), abs=1e-9)
    # load_cascade: a listed term file that is missing, or a term file the manifest does not list, is refused
    fake = tmp_path / "run"
    shutil.copytree(run_dir, fake)
    saved = fake / "teacher" / "teacher" / "collaborative.json"
    if saved.exists():
        saved.unlink()
        with pytest.raises(A.ArtifactError, match="collaborative.json: listed .* but missing"):
            load_cascade(fake)
    else:
        term.save(saved.parent)
        with pytest.raises(A.ArtifactError, match="collaborative.json: not listed"):
            load_cascade(fake)


def test_a_collaborative_term_the_catalogue_cannot_hold_is_refused_before_training(tmp_path, monkeypatch):
    """teacher.collaborative = "on" for a catalogue above EASE's size stops the teacher step before it trains; "auto"
    runs without the term and the manifest says why; grids set beside "off" would do nothing and are refused."""
    import cascade.pipeline.teacher as T

    monkeypatch.setattr(T, "EASE_MAX_ITEMS", 5)
    base = [f"run.runs_dir={json.dumps(str(tmp_path))}", "run.threads=1", "teacher.lightgbm=false"]
    with pytest.raises(ValueError, match=r"teacher.collaborative = \"on\", but the catalogue has .* items and the "
                                         r"EASE fit takes at most 5"):
        run_pipeline(load_config(TINY, [*base, 'teacher.collaborative="on"']), progress=False, until="teacher")
    assert not (tmp_path / "tiny" / "teacher" / "teacher" / "model.pt").exists()
    run_pipeline(load_config(TINY, base), progress=False, until="teacher", update=True)
    m = A.read_manifest(tmp_path / "tiny" / "teacher", verify=True)["metrics"]["collaborative"]
    assert m["off"].startswith('teacher.collaborative = "auto": ') and m["off"].endswith("> 5 (EASE's dense fit)")
    assert not (tmp_path / "tiny" / "teacher" / "teacher" / "collaborative.json").exists()
    for bad in ('teacher.collaborative="maybe"', 'teacher.collaborative_weights=[0.0]',
                'teacher.collaborative_popular_days=[0.0]', 'teacher.collaborative_refresh_minutes=0'):
        with pytest.raises(ConfigError):
            load_config(TINY, [bad])
    for unused in ("teacher.collaborative_weights=[0.5]", "teacher.collaborative_popular_days=[3.0]"):
        with pytest.raises(ConfigError, match="is 'off', so collaborative_lambdas / collaborative_weights / "
                                              "collaborative_popular_days / collaborative_refresh_minutes would do"):
            load_config(TINY, ['teacher.collaborative="off"', unused])


def test_kd_temperature_searched_at_a_fixed_scale(tmp_path, caplog):
    """With the scales fixed at 1, the retrieval tower (listnet) and a Hinton-KD rank student are each trained at
    every temperature of kd_temperature_grid as well; the served variant is the one the one-SE rule keeps, and the
    pre-rank tower, whose terms have no temperature, says so."""
    from cascade.channels.prior import PRIOR_FILE

    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(tmp_path))}", "run.threads=1", "teacher.lightgbm=false",
                             "students.distill=1.0", "students.rank_distill_scale=1.0",
                             'students.rank_distill.kd="hinton"', "students.kd_temperature_grid=[0.5, 2.0]"])
    with caplog.at_level(logging.INFO, logger="cascade"):
        run_pipeline(cfg, progress=False, until="students")
    sel = A.read_json(tmp_path / "tiny" / "students" / "selection.json")
    for stage, key in (("retrieval", f"valid_click_recall@{sel['retrieval']['size']}"), ("rank_student", "valid_auc")):
        t = sel[stage]["temperature"]
        assert t["searched"] and t["configured"] == 1.0 and [r["temperature"] for r in t["grid"]] == [0.5, 1.0, 2.0]
        best = max(r[key] for r in t["grid"])
        within = [r["temperature"] for r in t["grid"] if r["within_one_se"]]
        assert t["chosen"] in within and min(within, key=lambda v: (abs(v - 1.0), v)) == t["chosen"]
        assert [r["gap_to_best"] for r in t["grid"]] == pytest.approx([best - r[key] for r in t["grid"]])
    t = sel["retrieval"]["temperature"]
    row = next(r for r in t["grid"] if r["temperature"] == t["chosen"])
    saved = A.read_json(tmp_path / "tiny" / "students" / "distilled" / "retrieval" / PRIOR_FILE)
    assert saved["weight"] == row["popularity_prior"]
    assert sel["prerank"]["temperature"] == {"configured": None, "searched": False,
                                             "why": "no distillation term with a temperature"}
    log = caplog.text
    for t_ in (0.5, 2):
        assert f"retrieval student, distillation scale 1, temperature {t_:g}" in log
        assert f"rank student, distillation scale 1, temperature {t_:g}" in log
