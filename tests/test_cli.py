"""The `cascade` command: every user mistake is one line `cascade: error: ...` (exit 2, no traceback unless -v),
per-command help with examples, -v anywhere, --version, and `index build --run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cascade import __version__
from cascade import artifacts as A
from cascade.cli import main
from cascade.pipeline import load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"


def fails(capsys, argv: list[str], needle: str) -> str:
    """Run ``cascade argv``; require exit 2 and one `cascade: error:` line holding ``needle``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cascade: error: " in err and needle in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    runs = tmp_path_factory.mktemp("cli_runs")
    run_pipeline(load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}"]), progress=False)
    return runs / "tiny"


def test_everyday_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    for cmd in ("replay", "report"):
        fails(capsys, [cmd, str(tmp_path / "no_such_run")], "is not a finished run (no ")
    fails(capsys, ["run", str(TINY), "--force", "teachr"],
          "--force 'teachr': no such step (steps: data, channels, teacher")
    fails(capsys, ["data", "movielens-100k"], "cascade data movielens-100k needs the dataset folder")
    fails(capsys, ["data", "custom"], "needs the mapping TOML")
    fails(capsys, ["data", "movielens-100k", str(tmp_path), "--n-days", "3"], "--n-days applies to `cascade data "
                                                                              "world` only")
    fails(capsys, ["data", "world", "somewhere"], "cascade data world takes no a PATH")
    fails(capsys, ["index", "build", "--out", "idx"], "cascade index build needs --embeddings FILE.npy")
    fails(capsys, ["index", "search", "--out", "top.npy"], "cascade index search needs --index FOLDER")
    fails(capsys, ["run", "--data", "custom"], "custom needs a path")
    fails(capsys, ["run", str(TINY), "--set", "teacher.train.lr=nan"], "teacher.train.lr = nan")
    fails(capsys, ["data", "custom", str(tmp_path / "missing.toml")], "mapping file not found")
    assert list(tmp_path.iterdir()) == []


def test_verbose_anywhere_shows_the_traceback(capsys):
    for argv in (["-v", "data", "custom"], ["data", "-v", "custom"], ["data", "custom", "--verbose"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().endswith(
            "cascade: error: cascade data custom needs the mapping TOML: cascade data custom PATH --check")


def test_version_and_per_command_help_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cascade {__version__}"
    for argv, needles in ((["data", "world", "--help"], ["usage: cascade data", "examples:", "--check",
                                                         "cascade data custom examples/own_logs/mapping.toml"]),
                          (["run", "--help"], ["--data SOURCE[:PATH]", "cascade run --data custom:"]),
                          (["replay", "--help"], ["cascade replay runs/default --set replay.k=20"]),
                          (["index", "--help"], ["cascade index build --run runs/default --out idx"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and all(n in out for n in needles), (argv, out)


def test_index_search_works_with_its_default_model_hash(tmp_path, capsys):
    rng = np.random.default_rng(0)
    xb, xq = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "items.npy", xb)
    np.save(tmp_path / "users.npy", xq)
    assert main(["index", "build", "--embeddings", str(tmp_path / "items.npy"), "--out", str(tmp_path / "idx")]) == 0
    assert main(["index", "search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "users.npy"),
                 "--k", "5", "--out", str(tmp_path / "top.npy")]) == 0
    top = np.load(tmp_path / "top.npy")
    assert top.tolist() == np.argsort(-(xq @ xb.T), axis=1)[:, :5].tolist()  # exact inner-product top-5
    capsys.readouterr()
    fails(capsys, ["index", "search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "users.npy"),
                   "--out", str(tmp_path / "t.npy"), "--model-hash", "abc"], "does not match the index's unknown")


def test_index_build_from_a_runs_tower_by_run_name(finished, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--run", str(finished), "--out", str(out)]) == 0
    m = json.loads(capsys.readouterr().out)
    tower = finished / "students" / "distilled" / "retrieval" / "model.pt"
    assert m["model_hash"] == A.sha256_file(tower) and m["extra"]["variant"] == "distilled"
    # the same index as the run's own index step built
    for f in ("index.faiss", "item_ids.npy"):
        assert A.sha256_file(out / f) == A.sha256_file(finished / "index" / "distilled" / f)
    assert main(["index", "build", "--run", str(finished), "--variant", "ground_truth", "--out",
                 str(tmp_path / "gt")]) == 0
    capsys.readouterr()
    fails(capsys, ["index", "build", "--run", str(finished), "--variant", "nope", "--out", str(tmp_path / "x")],
          "the run has no 'nope' retrieval tower (it has ['distilled', 'ground_truth'])")
    fails(capsys, ["index", "build", "--run", str(finished), "--embeddings", "x.npy", "--out", str(tmp_path / "y")],
          "--embeddings does not apply")
    # a tower altered after the run is refused, naming it
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / "students" / "distilled" / "retrieval" / "config.json").write_text("{}")
    fails(capsys, ["index", "build", "--run", str(broken), "--out", str(tmp_path / "z")],
          "retrieval/config.json: sha256")


def _copy_run(finished: Path, to: Path) -> Path:
    """A copy of the finished tiny run (tests that alter a run alter their own copy)."""
    shutil.copytree(finished, to)
    return to


def test_replay_and_report_never_rewrite_the_channels_step(finished, tmp_path, capsys):
    """The channels step of a copy is recorded as written by other code, which `cascade run` would redo ("code
    changed"); replay and report take it as it is: its manifest keeps every byte."""
    run = _copy_run(finished, tmp_path / "tiny")
    manifest = run / "channels" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["code_hash"] = "written by other code"
    manifest.write_text(json.dumps(m))
    before = manifest.read_bytes()
    for cmd in ("report", "replay"):
        assert main([cmd, str(run), "--no-progress"]) == 0, cmd
        err = capsys.readouterr().err
        assert "[channels] skipped (taken as it is)" in err and "[channels] running" not in err, (cmd, err)
        assert manifest.read_bytes() == before, cmd


def test_compare_shows_the_replay_latency_and_one_auc_row_per_model(finished, tmp_path, capsys):
    """On real runs: the p99 row holds the replay manifest's number; a second run whose teacher chose other settings
    on validation (simulated in its models.json) has its AUC on the same row, its settings on the next."""
    other = _copy_run(finished, tmp_path / "other")
    models = json.loads((other / "teacher" / "models.json").read_text())
    teacher = next(m for m in models if m["role"] == "teacher")
    teacher["name"], teacher["auc"] = "teacher (dcnv2, entire space: exposure weight 4)", 0.5
    (other / "teacher" / "models.json").write_text(json.dumps(models))
    assert main(["compare", str(finished), str(other), "--out", str(tmp_path / "cmp")]) == 0
    rows = {r["metric"]: r["values"] for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["metrics"]}
    latency = json.loads((finished / "replay" / "manifest.json").read_text())["metrics"]["latency"]
    p99 = latency["distilled"]["latency_batch1"]["end_to_end_ms"]["p99_ms"]
    assert p99 > 0 and rows["distilled: end-to-end p99 ms (batch 1)"] == [p99, p99]
    assert f"| distilled: end-to-end p99 ms (batch 1) | {p99:.2f} | {p99:.2f} |" in capsys.readouterr().out
    original = next(m for m in json.loads((finished / "teacher" / "models.json").read_text())
                    if m["role"] == "teacher")
    assert rows["test AUC: teacher"] == [original["auc"], 0.5]
    assert rows["teacher: settings"] == [original["name"][len("teacher ("):-1],
                                         "dcnv2, entire space: exposure weight 4"]
    assert not [k for k in rows if k.startswith("test AUC: teacher (")]


def _vectors(tmp_path: Path) -> dict[str, Path]:
    """50 items of dimension 16, queries of dimension 16 (3 x 16), 8 (3 x 8) and a 1-d one, as .npy files."""
    rng = np.random.default_rng(0)
    files = {"items": rng.standard_normal((50, 16)), "q16": rng.standard_normal((3, 16)),
             "q8": rng.standard_normal((3, 8)), "q1d": rng.standard_normal(16),
             "dup_ids": np.array([7] * 50, dtype=np.int64)}
    for name, x in files.items():
        np.save(tmp_path / f"{name}.npy", x.astype(np.float32) if x.dtype.kind == "f" else x)
    return {name: tmp_path / f"{name}.npy" for name in files}


def test_index_search_inputs_are_checked_naming_the_file_and_k(tmp_path, capsys):
    f = _vectors(tmp_path)
    idx = tmp_path / "idx"
    assert main(["index", "build", "--embeddings", str(f["items"]), "--out", str(idx)]) == 0
    search = ["index", "search", "--index", str(idx), "--out", str(tmp_path / "top.npy"), "--queries"]
    capsys.readouterr()
    fails(capsys, search + [str(f["q8"])], f"--queries {f['q8']}: vectors of dimension 8, but the index {idx} has "
                                           "dimension 16")
    fails(capsys, search + [str(f["q1d"])], f"--queries {f['q1d']}: must be a 2-d array [n, d], got shape (16,)")
    for k in ("-3", "0"):
        fails(capsys, search + [str(f["q16"]), "--k", k], f"--k {k}: must be an integer >= 1")
    fails(capsys, search + [str(f["q16"]), "--k", "51"], f"--k 51 is more than the 50 items of the index {idx}: use "
                                                         "--k 50 or less")
    fails(capsys, search + [str(f["q16"]), "--factory", "Flat"], "--factory applies to `cascade index build`")
    assert not (tmp_path / "top.npy").exists()
    # no --k: 100, cut to the 50 items there are (every item, ranked; no -1 ids)
    assert main(search + [str(f["q16"])]) == 0
    assert "k=50" in capsys.readouterr().out
    xb, xq = np.load(f["items"]), np.load(f["q16"])
    assert np.load(tmp_path / "top.npy").tolist() == np.argsort(-(xq @ xb.T), axis=1).tolist()


def test_index_build_inputs_are_checked_before_the_output_folder_is_made(tmp_path, capsys):
    f = _vectors(tmp_path)
    out = tmp_path / "new" / "idx"
    build = ["index", "build", "--embeddings", str(f["items"]), "--out", str(out)]
    fails(capsys, build + ["--factory", "IVF9999,Flat"], "--factory 'IVF9999,Flat': nlist 9999 exceeds the 50 items "
                                                         "to cluster")
    fails(capsys, build + ["--factory", "IVF4,PQ5"], "--factory 'IVF4,PQ5': PQ5 needs the dimension 16 to be a "
                                                     "multiple of 5")
    fails(capsys, build + ["--ids", str(f["dup_ids"])], f"--ids {f['dup_ids']}: item_ids must be unique: id 7 appears "
                                                        "50 times")
    fails(capsys, build + ["--k", "5"], "--k sets the recall sweep, which runs on --queries")
    fails(capsys, build + ["--queries", str(f["q8"]), "--factory", "IVF4,Flat"],
          f"--queries {f['q8']}: vectors of dimension 8, but --embeddings {f['items']} has dimension 16")
    fails(capsys, build + ["--queries", str(f["q16"]), "--factory", "IVF4,Flat", "--k", "0"],
          "--k 0: must be an integer >= 1")
    fails(capsys, build + ["--queries", str(f["q16"]), "--factory", "IVF4,Flat", "--recall-target", "0"],
          "--recall-target 0: must be in (0, 1]")
    fails(capsys, ["index", "build", "--embeddings", str(f["q1d"]), "--out", str(out)],
          f"--embeddings {f['q1d']}: must be a 2-d array [n, d], got shape (16,)")
    assert not (tmp_path / "new").exists()


def test_a_failed_index_build_removes_the_folders_it_made_only(tmp_path, capsys, monkeypatch):
    from cascade.index.faiss_index import ItemIndex

    def save_then_fail(self, directory, model_hash, extra=None):
        (Path(directory) / "index.faiss").write_bytes(b"half")
        raise A.ArtifactError("simulated: disk full")

    monkeypatch.setattr(ItemIndex, "save", save_then_fail)
    f = _vectors(tmp_path)
    fails(capsys, ["index", "build", "--embeddings", str(f["items"]), "--out", str(tmp_path / "new" / "idx")],
          "simulated: disk full")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    fails(capsys, ["index", "build", "--embeddings", str(f["items"]), "--out", str(kept)], "simulated: disk full")
    assert (kept / "notes.txt").read_text() == "mine"  # a folder that was there before stays


def test_index_build_from_a_run_checks_factory_k_and_steps_first(finished, tmp_path, capsys):
    n = len(np.load(finished / "index" / "distilled" / "item_ids.npy"))
    out = tmp_path / "new" / "idx"
    build = ["index", "build", "--run", str(finished), "--out", str(out)]
    fails(capsys, build + ["--factory", "IVF9999,Flat"], f"--factory 'IVF9999,Flat': nlist 9999 exceeds the {n:,} "
                                                         "items to cluster")
    fails(capsys, build + ["--k", "0"], "--k 0: must be an integer >= 1")
    fails(capsys, build + ["--k", str(n + 1)], f"--k {n + 1} is more than the {n:,} items of the run {finished}")
    fails(capsys, build + ["--metric", "l2"], "--metric does not apply")
    unfinished = _copy_run(finished, tmp_path / "unfinished")
    shutil.rmtree(unfinished / "students")
    fails(capsys, ["index", "build", "--run", str(unfinished), "--out", str(out)],
          "the run has not finished its students step")
    assert not (tmp_path / "new").exists()


def test_export_refuses_a_bad_tolerance_and_an_unfinished_run_before_any_work(finished, tmp_path, capsys):
    from cascade.serve.export import ExportError, export_run

    out = tmp_path / "new" / "export"
    for tol in ("-1", "0", "nan", "inf"):
        fails(capsys, ["export", str(finished), "--format", "torch-export", "--tolerance", tol, "--out", str(out)],
              f"--tolerance {float(tol):g}: must be a finite number > 0")
    with pytest.raises(ExportError, match="export tolerance -1.0 must be a finite number > 0"):
        export_run(finished, "torch-export", out, tolerance=-1.0)
    fails(capsys, ["export", str(finished), "--format", "torch-export", "--variant", "nope", "--out", str(out)],
          "variant(s) ['nope'] not in the run")
    unfinished = _copy_run(finished, tmp_path / "unfinished")
    shutil.rmtree(unfinished / "students")
    fails(capsys, ["export", str(unfinished), "--format", "torch-export"],
          f"the run {unfinished} has not finished the step(s) students whose models export needs (no "
          f"{unfinished / 'students' / 'manifest.json'}); finish it first: `cascade run`")
    assert not (tmp_path / "new").exists() and not (unfinished / "export").exists()
