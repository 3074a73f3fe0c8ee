"""Runs side by side: `cascade runs` lists the runs of a folder with their headline metrics, `cascade compare A B`
prints and writes the config differences and the metrics table (md + html + json). The runs here are written by
hand (config.json, step manifests, replay summary, models tables), so every number below is known."""

from __future__ import annotations

import json

import pytest

from cascade import artifacts as A
from cascade.cli import main
from cascade.config import to_dict
from cascade.pipeline import PipelineConfig
from cascade.pipeline.runs import RunNotFound, compare_runs, find_run, list_runs


def _quality(recall: float, click: float) -> dict:
    return {"rank_teacher_recall": recall, "rank_click_recall": click, "oracle_ratio": 0.9,
            "retrieval_teacher_recall": 0.95, "retrieval_click_recall": 0.8, "prerank_teacher_recall": recall,
            "prerank_click_recall": 0.7}


def _run(runs, name: str, epochs: int, recall: float, click: float, teacher_auc: float, with_replay: bool = True,
         chosen: tuple[int, float] = (1, 1.0)):
    """A run as the steps write it; chosen: the exposure weight and the rank student's scale chosen on validation,
    which the models' display names carry (as teacher.py and students.py name them). The replay's measured
    latencies are in its manifest's metrics.latency (replay.py), not in summary.json."""
    d = runs / name
    cfg = to_dict(PipelineConfig())
    cfg["run"]["name"], cfg["run"]["runs_dir"] = name, str(runs)
    cfg["teacher"]["train"]["epochs"] = epochs
    A.write_json(d / "config.json", cfg)
    A.write_json(d / "data" / "manifest.json", {"written_at": "2026-01-02T03:04:05Z"})
    A.write_json(d / "teacher" / "manifest.json", {"written_at": "2026-01-02T03:10:00Z"})
    A.write_json(d / "teacher" / "models.json", [
        {"name": f"teacher (dcnv2, entire space: exposure weight {chosen[0]})", "role": "teacher", "auc": teacher_auc},
        {"name": "LightGBM (binary, 1,000 most recent train rows)", "role": "baseline", "auc": 0.61}])
    A.write_json(d / "students" / "models.json", [
        {"name": "rank student (no distillation)", "role": "student", "auc": 0.58},
        {"name": f"rank student (served: logit KD at scale {chosen[1]:g}, chosen on validation AUC)", "role": "student",
         "auc": teacher_auc - 0.01}])
    if with_replay:
        A.write_json(d / "replay" / "manifest.json", {"written_at": "2026-01-02T03:20:00Z", "metrics": {"latency": {
            v: {"latency_batch1": {"end_to_end_ms": {"p50_ms": 1.0, "p99_ms": 5.0 + i}}}
            for i, v in enumerate(("distilled", "ground_truth"))}}})
        A.write_json(d / "replay" / "summary.json", {"variants": {
            v: {"quality": _quality(recall - 0.3 * i, click), "sizes": {"retrieval": 500, "prerank": 100, "rank": 10}}
            for i, v in enumerate(("distilled", "ground_truth"))}})
    return d


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    _run(r, "base", 1, 0.6667, 0.5, 0.6355)
    _run(r, "longer", 3, 0.7012, 0.4801, 0.6401, chosen=(4, 0.5))
    _run(r, "half", 1, 0.0, 0.0, 0.62, with_replay=False)
    (r / "compare_old").mkdir()  # not a run: no config.json
    return r


def test_a_run_in_an_older_layout_is_named_not_a_traceback(runs, capsys):
    old = _run(runs, "old", 1, 0.5, 0.5, 0.6)
    A.write_json(old / "replay" / "summary.json", {"distilled": {"quality": {}}})  # before summary["variants"]
    rows = {r["name"]: r for r in list_runs(runs)}
    assert rows["old"]["teacher_recall"] is None and "older layout" in rows["old"]["problem"]
    assert rows["base"]["problem"] is None
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    assert "old: " in capsys.readouterr().out
    assert main(["compare", "base", "old", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cascade: error: ") and "older layout" in err and "cascade replay" in err


def test_runs_lists_every_run_with_its_headline_metrics(runs, capsys):
    rows = {r["name"]: r for r in list_runs(runs)}
    assert sorted(rows) == ["base", "half", "longer"]
    assert rows["base"]["created"] == "2026-01-02 03:04:05 UTC" and rows["base"]["data"] == "world"
    assert rows["base"]["steps"] == ["data", "teacher", "replay"]
    assert (rows["longer"]["teacher_auc"], rows["longer"]["teacher_recall"], rows["longer"]["k"]) == (0.6401, 0.7012,
                                                                                                      "10")
    assert rows["half"]["teacher_recall"] is None and rows["half"]["teacher_auc"] == 0.62
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("| run | created | data | steps | teacher AUC | teacher-recall@K | click-recall | "
                      "oracle ratio |")
    assert out[2] == "| base | 2026-01-02 03:04:05 UTC | world | 3/8 | 0.6355 | 0.667 (K=10) | 0.500 | 0.900 |"
    assert out[3] == "| half | 2026-01-02 03:04:05 UTC | world | 2/8 | 0.6200 | – | – | – |"


def test_compare_prints_and_writes_the_config_diff_and_the_metrics(runs, tmp_path, capsys):
    c = compare_runs([runs / "base", runs / "longer"])
    assert c["config_diff"] == [{"key": "teacher.train.epochs", "values": [1, 3]}]  # run.name / runs_dir left out
    metrics = {m["metric"]: m["values"] for m in c["metrics"]}
    assert metrics["distilled: final teacher-recall@10"] == [0.6667, 0.7012]
    assert metrics["ground_truth: final teacher-recall@10"] == pytest.approx([0.3667, 0.4012])
    assert metrics["test AUC: teacher"] == [0.6355, 0.6401]
    assert main(["compare", "base", "longer", "--runs-dir", str(runs), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| teacher.train.epochs | 1 | 3 |" in out
    # best of each row in bold: higher recall, lower latency
    assert "| distilled: final teacher-recall@10 | 0.667 | **0.701** |" in out
    assert "| distilled: final click-recall | **0.500** | 0.480 |" in out
    # the replay's manifest's latencies (metrics.latency.<variant>.latency_batch1); a tie: neither is better
    assert "| distilled: end-to-end p99 ms (batch 1) | 5.00 | 5.00 |" in out
    assert "| ground_truth: end-to-end p99 ms (batch 1) | 6.00 | 6.00 |" in out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "| teacher.train.epochs | 1 | 3 |" in md and "<b>0.701</b>" in page and "http" not in page
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["config_diff"] == c["config_diff"]
    # a run without a replay: its replay rows are "–"; the default output folder is beside the runs
    assert main(["compare", "base", str(runs / "half"), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| distilled: final teacher-recall@10 | 0.667 | – |" in out
    assert (runs / "compare_base_vs_half" / "compare.html").is_file()


def test_unknown_run_is_a_clean_error(runs, capsys):
    with pytest.raises(RunNotFound, match=r"no run 'nope'.*runs in .*: base, half, longer"):
        find_run("nope", runs)
    assert main(["compare", "base", "nope", "--runs-dir", str(runs)]) == 2
    assert capsys.readouterr().err.startswith("cascade: error: no run 'nope'")
    assert main(["compare", "base", "--runs-dir", str(runs)]) == 2
    assert "compare needs two runs or more" in capsys.readouterr().err


def test_compare_puts_each_model_on_one_row_whatever_its_run_chose(runs, capsys):
    """base chose exposure weight 1 and KD scale 1 on validation, longer 4 and 0.5: the display names differ, the
    models are the same, so each has one AUC row, and the settings each run chose sit on the row after it."""
    metrics = {m["metric"]: m["values"] for m in compare_runs([runs / "base", runs / "longer"])["metrics"]}
    auc_rows = [(k, v) for k, v in metrics.items() if k.startswith("test AUC: ")]
    assert auc_rows == [("test AUC: teacher", [0.6355, 0.6401]), ("test AUC: LightGBM", [0.61, 0.61]),
                        ("test AUC: rank student (no distillation)", [0.58, 0.58]),
                        ("test AUC: rank student (served)", pytest.approx([0.6255, 0.6301]))]
    assert metrics["teacher: settings"] == ["dcnv2, entire space: exposure weight 1",
                                            "dcnv2, entire space: exposure weight 4"]
    assert metrics["rank student (served): settings"] == ["served: logit KD at scale 1, chosen on validation AUC",
                                                          "served: logit KD at scale 0.5, chosen on validation AUC"]
    assert "rank student (no distillation): settings" not in metrics  # its name holds no setting
    assert main(["compare", "base", "longer", "--runs-dir", str(runs), "--out", str(runs / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| test AUC: teacher | 0.6355 | **0.6401** |" in out
    assert ("| teacher: settings | dcnv2, entire space: exposure weight 1 | dcnv2, entire space: exposure weight 4 |"
            in out)


def test_compare_reads_the_latency_of_a_run_written_when_the_summary_kept_it(runs, capsys):
    """Runs replayed before the latencies moved to the replay's manifest have them in summary.json."""
    old = _run(runs, "old", 1, 0.5, 0.5, 0.6)
    A.write_json(old / "replay" / "manifest.json", {"written_at": "2026-01-02T03:20:00Z"})
    summary = A.read_json(old / "replay" / "summary.json")
    summary["variants"]["distilled"]["latency_batch1"] = {"end_to_end_ms": {"p99_ms": 7.25}}
    A.write_json(old / "replay" / "summary.json", summary)
    metrics = {m["metric"]: m["values"] for m in compare_runs([runs / "base", old])["metrics"]}
    assert metrics["distilled: end-to-end p99 ms (batch 1)"] == [5.0, 7.25]
    assert metrics["ground_truth: end-to-end p99 ms (batch 1)"] == [6.0, None]  # in neither place: "–"
