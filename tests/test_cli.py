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
