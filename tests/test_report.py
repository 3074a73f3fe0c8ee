"""The per-run report: files, JSON round trip, self-contained HTML with real PNGs, formatted Markdown tables,
missing sections, bad input, and (where Chromium is installed) a headless render that must not be blank."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade.artifacts import ArtifactError, to_jsonable
from cascade.eval.report import format_value, load_report, markdown_table, toml_dump, write_report
from cascade.eval.report.blocks import MISSING, NOT_COMPUTED
from cascade.eval.report.render import render_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img[^>]*\ssrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _stage(size, tr, cr, ndcg, auc, gauc, p50):
    return {"size": size, "click_recall": cr, "hit_rate": min(1.0, 2 * cr), "click_ndcg": cr / 2,
            "teacher_recall": tr, "teacher_ndcg": ndcg, "auc": auc, "gauc": gauc,
            "p50_ms": p50, "p95_ms": p50 * 1.8, "p99_ms": p50 * 2.5}


def _outcome(name, kind, cr, oracle, tr, distinct):
    return {"name": name, "kind": kind, "k": 10, "click_recall": cr, "hit_rate": min(1.0, 3 * cr),
            "click_ndcg": cr / 2, "teacher_recall": tr, "teacher_ndcg": None, "click_recall_rand": cr / 4,
            "expected_click_recall_rand": cr / 50, "hit_rate_rand": None, "retrieval_click_recall": 4 * cr,
            "prerank_click_recall": 2 * cr,
            "retrieval_size": 500, "prerank_size": 100, "oracle_clicks": oracle, "oracle_ratio": None,
            "final_distinct": distinct, "final_coverage": distinct / 5000, "final_top_share": 0.25,
            "n_requests_with_clicks": 1800, "n_rand_requests": 90}


def _variant(rng: np.random.Generator, shift: float) -> dict:
    k = [1, 2, 5, 10, 20, 50, 100, 200, 500]
    # recall curves rise with K towards 1 (the shape a real replay gives), slower for the weaker variant
    curve = lambda scale: [float(1 - np.exp(-x / (scale * (1 + 8 * shift)))) for x in k]  # noqa: E731
    return {
        "stages": {
            "retrieval": _stage(500, 0.8123 - shift, 0.4411, 0.5012, 0.7012, 0.6234, 1.234),
            "prerank": _stage(100, 0.7034 - shift, 0.3521, 0.6123, 0.7312 - shift, 0.6512, 0.456),
            "rank": _stage(10, 0.6421 - shift, 0.2011, 0.7234, 0.75312 - shift, float("nan"), 2.345),
        },
        "end_to_end": {"p50_ms": 4.1, "p95_ms": 6.2, "p99_ms": 8.7654 + shift, "requests_per_s_batch1": 231.4,
                       "requests_per_s_batched": 5812.3, "batch_size": 256},
        "oracle": {"oracle_clicks": 1.234, "oracle_best": 1.9, "oracle_ratio": 0.6497 - shift},
        "recall_curves": {"retrieval": {"k": k, "teacher_recall": curve(60.0)},
                          "prerank": {"k": k[:7], "teacher_recall": curve(30.0)[:7]},
                          "rank": {"k": k[:4], "teacher_recall": curve(8.0)[:4]}},
        "latency_samples_ms": {s: rng.lognormal(math.log(m), 0.3, size=200).tolist()
                               for s, m in (("retrieval", 1.2), ("prerank", 0.45), ("rank", 2.3), ("end_to_end", 4.1))},
    }


def make_report_data() -> dict:
    """A realistic fabricated report_data: two cascade variants with curves and latency samples, index, models,
    ablation, data and run details."""
    rng = np.random.default_rng(0)
    return {
        "run": {"name": "demo-run", "created": "2026-11-22T10:00:00Z", "machine": "2-core test box",
                "config": {"seed": 7, "data": {"source": "world", "n_users": 1000, "scale": 0.5},
                           "teacher": {"backbone": "deepfm", "hidden": [64, 32], "privileged": True,
                                       "optim": {"lr": 0.001, "fused": False}}},
                "versions": {"python": "3.11.9", "torch": "2.13.0", "faiss-cpu": "1.15.1"},
                "step_wall_s": {"data": 1.5, "teacher": 12.25, "replay": 3.0}},
        "data": {"summary": {"source": "world", "n_users": 1000, "n_items": 5000, "n_impressions": 123456,
                             "ctr": 0.04567},
                 "splits": {"test": {"rows": 20000, "requests": 2000, "ctr": 0.0401, "start": "2022-05-07",
                                     "end": "2022-05-08"},
                            "train": {"rows": 90000, "requests": 9000, "ctr": 0.0471, "start": "2022-04-08",
                                      "end": "2022-05-06"}}},
        "cascades": {"distilled": _variant(rng, 0.0), "ground_truth": _variant(rng, 0.05)},
        "choices": {
            "filter_seen": {"applied": False, "why": "auto: 7.7% of train clicks were re-clicks"},
            "channels": {"judge": "300 validation requests", "popular": {"chosen": {"window_days": 7.0},
                                                                         "grid": [{"valid_click_recall@10": 0.061}]},
                         "left_out": {"recent": "left out: it proposes only items the user was shown before, "
                                                "which the seen filter drops (data.filter_seen = true)"}},
            "collaborative": {"setting": "auto", "judge": "99 validation requests",
                              "chosen": {"lam": 200.0, "weight": 0.25, "popular_weight": 0.9081,
                                         "popular_days": 30.0, "refresh_ms": 3600000, "popular_lam": 50.0,
                                         "popular_ease_weight": 0.2270},
                              "grid": [{"lambda": 200.0, "weight": 0.0, "valid_click_recall@10": 0.1456},
                                       {"lambda": 200.0, "weight": 0.25, "valid_click_recall@10": 0.1485},
                                       {"part": "prior alone", "popular_days": 30.0, "prior_lambda": 50.0,
                                        "prior_ease_weight": 0.25, "valid_click_recall@10": 0.1488},
                                       {"part": "beside the teacher", "popular_days": 30.0, "prior_lambda": 50.0,
                                        "prior_ease_weight": 0.25, "prior_weight": 0.5, "score_sd": 1.8161,
                                        "valid_click_recall@10": 0.1615}]},
            "entire_space": {"exposure_weight": 0.25, "judge": "846 validation requests",
                             "grid": [{"exposure_weight": 0.0, "valid_click_recall@10": 0.498},
                                      {"exposure_weight": 0.25, "valid_click_recall@10": 0.519}]},
            "students": {"retrieval": {"size": 500, "chosen_scale": 0.25,
                                       "grid": [{"scale": 0.0, "valid_click_recall@500": 0.699,
                                                 "teacher_agreement": {"teacher_recall@10": 0.639}},
                                                {"scale": 0.25, "valid_click_recall@500": 0.747,
                                                 "teacher_agreement": {"teacher_recall@10": 0.731}}],
                                       "gate": {"teacher": 0.68, "ground_truth_student": 0.699, "gain": -0.019,
                                                "standard_error": 0.01, "teacher_better": False}},
                         "rank_student": {"chosen_scale": 0.0, "grid": [
                             {"scale": 0.0, "valid_auc": 0.6012, "gap_to_best": 0.0022, "se_of_gap": 0.0031,
                              "within_one_se": True},
                             {"scale": 0.5, "valid_auc": 0.6034, "gap_to_best": 0.0, "se_of_gap": 0.0,
                              "within_one_se": True}]}}},
        "outcomes": {"rows": [_outcome("distilled", "cascade", 0.0611, 1.234, 0.6421, 812),
                              _outcome("ground_truth", "cascade", 0.0702, 1.184, 0.5921, 1304),
                              _outcome("teacher_corpus", "reference", 0.0655, 1.301, 1.0, 640),
                              _outcome("popular (7 days)", "baseline", 0.0650, 1.001, 0.1, 10)],
                     "flags": ["The distilled cascade finds fewer of the test clicks than popular (7 days)."],
                     "gaps": [{"cascade": "distilled", "other": "popular (7 days)", "metric": "rank_click_recall",
                               "diff": -0.0039, "se": 0.0102, "n": 1800, "beyond_2se": False},
                              {"cascade": "distilled", "other": "ground_truth", "metric": "rank_click_recall",
                               "diff": -0.0091, "se": 0.0031, "n": 1800, "beyond_2se": True},
                              {"cascade": "distilled", "other": "popular (7 days)",
                               "metric": "expected_click_recall_rand", "diff": 0.000048, "se": 0.000012, "n": 90,
                               "beyond_2se": True}],
                     "filter_seen": {"applied": False, "why": "auto: 7.7% of train clicks were re-clicks"}},
        "index": {"factory": "IVF64,Flat", "backend": "faiss-cpu", "metric": "inner_product", "n_items": 5000,
                  "dim": 32, "recall_vs_exact": 0.9871,
                  "operating_points": [{"param": "nprobe", "value": v, "recall_at_k": r, "qps": q}
                                       for v, r, q in ((1, 0.612, 21000.0), (4, 0.874, 9100.0), (16, 0.9871, 2600.0))],
                  "operating_point": {"param": "nprobe", "value": 16}},
        "models": [
            {"name": "teacher-deepfm", "role": "teacher", "auc": 0.7712, "gauc": 0.6601, "logloss": 0.1811,
             "rand_auc": 0.7402, "rand_gauc": 0.6402, "latency_ms_per_100": 0.912, "n_params": 1234567,
             "size_mb": 4.71},
            {"name": "rank-student", "role": "student", "auc": 0.7653, "gauc": 0.6555, "logloss": 0.1825,
             "latency_ms_per_100": 0.2, "n_params": 123456, "size_mb": 0.47},
            {"name": "lightgbm", "role": "baseline", "auc": 0.7581, "gauc": float("nan"), "logloss": 0.1844,
             "latency_ms_per_100": 1.1},
        ],
        "training": {"teacher": {"epoch": [1, 2], "loss": [0.66359, 0.62014], "valid": [0.67715, 0.68451],
                                 "valid_metric": "valid AUC"},
                     "prerank student (distilled)": {"epoch": [1, 2], "loss": [4.4806, 2.37555],
                                                     "valid": [None, 0.8009],
                                                     "valid_metric": "teacher-recall@10 on a rank-log sample"}},
        "channels": {"union_click_recall": 0.6512, "union_teacher_recall": 0.9148, "prerank_quotas": True,
                     "per_channel": {"two_tower": {"quota": 0.5, "click_recall_alone": 0.6251,
                                                   "teacher_recall_alone": 0.8597, "union_without": 0.5803,
                                                   "marginal": 0.0709,
                                                   "end_to_end": {"rank_click_recall": 0.0791, "oracle_ratio": None,
                                                                  "union_minus_it": {"rank_click_recall": {
                                                                      "diff": -0.0112, "se": 0.0058, "n": 478}}}},
                                     "popular": {"quota": 0.5, "click_recall_alone": 0.6173,
                                                 "teacher_recall_alone": 0.3821, "union_without": 0.6455,
                                                 "marginal": 0.0057,
                                                 "end_to_end": {"rank_click_recall": 0.0702, "oracle_ratio": None,
                                                                "union_minus_it": {"rank_click_recall": {
                                                                    "diff": 0.0089, "se": 0.0031, "n": 478}}}}},
                     "final_origin_share": {"two_tower": 0.83, "popular": 0.17}},
        "ablation": {"metrics": ["teacher_recall", "auc"], "seeds": [0, 1, 2], "source": "ablation_world.json",
                     "dataset": "world", "date": "2026-12-06",
                     "config": {"ablation": {"n_test_requests": 1000, "n_corpus_requests": 100}}, "rows": [
            {"name": "ground truth only", "stage": "prerank",
             "values": {"teacher_recall": {"mean": 0.61, "std": 0.012, "n": 3},
                        "auc": {"mean": 0.7011, "std": 0.002, "n": 3}}},
            {"name": "listwise NDCG", "stage": "prerank",
             "values": {"teacher_recall": {"mean": 0.7034, "std": 0.0051, "n": 3},
                        "auc": {"mean": 0.6987, "std": 0.003, "n": 3}}},
            {"name": "ground truth only", "stage": "retrieval",
             "values": {"teacher_recall": {"mean": 0.7701, "std": 0.01, "n": 2},
                        "auc": {"mean": 0.6801, "std": 0.004, "n": 3}}},
            {"name": "mix", "stage": "retrieval",
             "values": {"teacher_recall": {"mean": 0.8123, "std": 0.0098, "n": 3},
                        "auc": {"mean": float("nan"), "std": None, "n": 0}}},
        ]},
    }


@pytest.fixture
def report_data() -> dict:
    return make_report_data()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The full report written once for the tests that only read it (plots take a second or two to draw)."""
    out = tmp_path_factory.mktemp("report")
    return out, write_report(make_report_data(), out)


def _md_row(md: str, first_cells: list[str]) -> list[str]:
    """Cells of the first Markdown table row whose leading cells equal first_cells."""
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if cells[: len(first_cells)] == first_cells:
                return cells
    raise AssertionError(f"no table row starting with {first_cells}")


def _md_section(md: str, heading: str) -> str:
    """The Markdown from the heading (### or ##) named ``heading`` to the next heading."""
    start = md.index(f"# {heading}\n")
    nxt = re.search(r"^#{2,3} ", md[start + 2:], flags=re.M)
    return md[start: start + 2 + nxt.start()] if nxt else md[start:]


def test_format_value_rules():
    assert format_value(0.753149, "auc") == "0.7531"          # AUC: 4 decimals
    assert format_value(0.81234, "teacher_recall") == "0.812"  # recall: 3
    assert format_value(8.7654, "p99_ms") == "8.77"           # ms: 2
    assert format_value(5812.34, "requests_per_s_batched") == "5,812.3"
    assert format_value(1234567, "n_params") == "1,234,567"
    assert format_value(526697.0, "n_params") == "526,697"  # a count that pandas made float (a gap in the column)
    assert format_value(500.0, "size") == "500" and format_value(2.5, "n_items") == "2.5"
    assert format_value(2024, "seed") == "2024"
    assert format_value(float("nan"), "auc") == MISSING == format_value(None, "auc") == "–"
    assert format_value("world") == "world"


def test_markdown_table_escapes_and_aligns():
    out = markdown_table(["a", "b"], [["x|y", "1"]], right=[False, True])
    assert out.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1 |"]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [["x"]])


def test_toml_dump_nested():
    text = toml_dump({"seed": 7, "teacher": {"lr": 0.001, "optim": {"fused": False}}, "name": "a b"})
    assert text.splitlines() == ["seed = 7", 'name = "a b"', "", "[teacher]", "lr = 0.001", "", "[teacher.optim]",
                                 "fused = false"]


def test_write_report_files_roundtrip_html_md(written, report_data):
    tmp_path, written = written
    assert written == ["report.json", "report.md", "report.html"]
    for name in written:
        assert (tmp_path / name).stat().st_size > 0

    # JSON round trip: the dict itself, NaN stored as null (strict JSON that any parser reads)
    loaded = load_report(tmp_path)
    assert loaded == to_jsonable(report_data)
    assert loaded["cascades"]["distilled"]["stages"]["rank"]["gauc"] is None
    samples = report_data["cascades"]["distilled"]["latency_samples_ms"]["rank"]
    assert loaded["cascades"]["distilled"]["latency_samples_ms"]["rank"] == samples
    json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))

    page = (tmp_path / "report.html").read_text()
    # self-contained: no external reference of any kind (not even inside the PNGs' text chunks)
    assert "http" not in page
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', page)
    assert "<script" not in page
    imgs = IMG_RE.findall(page)
    # four plots: recall curves, latency histograms, index operating points, training curves
    assert len(imgs) == 4
    for b64 in imgs:
        png = base64.b64decode(b64, validate=True)
        assert png[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", png[16:24])  # IHDR: width, height big-endian after the chunk header
        assert 500 <= width <= 1400 and 250 <= height <= 1400
    # sections in the required order
    order = ["Headline", "Per-stage metrics", "Retrieval channels", "Teacher-recall@K curves", "Latency at batch 1",
             "Index", "Models", "Training curves", "Choices made on validation", "Distillation ablation", "Data",
             "Run: configuration"]
    pos = [page.index(f"<h2>{t}") for t in order]
    assert pos == sorted(pos)
    assert "<b>0.812 ± 0.010</b>" in page  # best retrieval teacher-recall (0.8123 ± 0.0098 at 3 decimals), bold
    assert "[teacher.optim]" in page and "fused = false" in page

    md = (tmp_path / "report.md").read_text()
    # per-stage table, variants side by side: columns ordered metric-major, distilled then ground_truth.
    # rank row: size 10 (one column: both variants have K = 10); teacher-recall 0.6421 -> 0.642 and
    # 0.6421 - 0.05 = 0.5921 -> 0.592; ...
    # AUC 0.75312 -> 0.7531 and 0.70312 -> 0.7031; GAUC NaN -> "–"; p50 2.345 -> 2.35 (the double nearest
    # 2.345 is 2.34500000000000019984, just above the half)
    # one table per metric family (outcomes, agreement with the teacher, AUC, latency), each narrow enough to read
    outcomes, agreement, aucs, latency = (_md_section(md, t) for t in (
        "Outcomes: the held-out clicks", "Agreement with the teacher",
        "AUC of each stage's served score on the test impressions",
        "Latency per request (batch 1)"))
    for table in (outcomes, agreement, aucs, latency):
        header = next(line for line in table.splitlines() if line.startswith("| stage"))
        assert header.count("|") - 1 <= 8, header
    assert "| stage | size | click-recall distilled | click-recall ground_truth |" in outcomes
    assert _md_row(outcomes, ["rank"])[:4] == ["rank", "10", "0.201", "0.201"]
    assert _md_row(agreement, ["rank"]) == ["rank", "10", "0.642", "0.592", "0.7234", "0.7234"]
    assert _md_row(aucs, ["rank"]) == ["rank", "10", "0.7531", "0.7031", "–", "–"]
    assert _md_row(latency, ["rank"])[:3] == ["rank", "10", "2.35"]
    assert "end to end" not in outcomes and _md_row(latency, ["end to end"])[:3] == ["end to end", "–", "4.10"]
    # headline, outcomes first: click-recall 0.0611 -> 0.061, HitRate 0.1833 -> 0.183, click-NDCG 0.0306, random
    # slice 0.0153 and its expectation 0.001222 (more decimals: a top-K holds few random clicks), oracle clicks
    # 1.234, @N1 0.244, @N2 0.122, then agreement 0.642, 812 distinct items, coverage 812 / 5000 = 0.162, top-10
    # share 0.250 (the all-None teacher-NDCG and oracle-ratio columns are left out)
    assert _md_row(md, ["distilled", "cascade"]) == ["distilled", "cascade", "0.061", "0.183", "0.0306", "0.0153",
                                                     "0.001222", "1.234", "0.244", "0.122", "0.642", "812", "0.162",
                                                     "0.250"]
    assert _md_row(md, ["distilled", "popular (7 days)", "expected click-recall@10 (random slice)"])[3:] == [
        "+0.000048 ± 0.000012", "yes", "90"]
    assert _md_row(md, ["popular (7 days)", "baseline"])[2] == "0.065"
    assert "Warning: The distilled cascade finds fewer of the test clicks than popular (7 days)." in md
    # the paired gaps: within 2 SE (0.0039 < 2 x 0.0102) and beyond it (0.0091 > 2 x 0.0031)
    assert _md_row(md, ["distilled", "popular (7 days)", "click-recall@10"])[3:] == ["-0.0039 ± 0.0102", "no", "1,800"]
    assert _md_row(md, ["distilled", "ground_truth", "click-recall@10"])[3:] == ["-0.0091 ± 0.0031", "yes", "1,800"]
    assert "Seen items: auto: 7.7% of train clicks were re-clicks." in md
    assert ("Channel recent: left out: it proposes only items the user was shown before, which the seen filter "
            "drops (data.filter_seen = true).") in md
    with pytest.raises(AssertionError, match="no table row"):  # a note, not a row of the settings table
        _md_row(md, ["left_out"])
    # the choices made on validation: every grid point, the chosen one named, the gate's verdict in words
    assert _md_row(md, ["0.25", "0.519"]) and _md_row(md, ["0.25", "0.747", "0.731"])
    # the teacher's collaborative term: its EASE grid, then the popularity prior's rows in a table of their own
    # the chosen term in the grids' units: the prior's EASE weight 0.2270 / 0.9081 = 0.25 and its weight beside the
    # teacher 0.9081 / 1.8161 (the SD of the teacher's score) = 0.5, then the coefficients of the standardised scores
    assert ("Teacher: collaborative term added to its ranking score (chosen 0.25 x EASE (lambda 200) + the classic "
            "prior (popularity over 30 days + 0.25 x EASE (lambda 50)) at weight 0.5 beside the teacher (SDs of its "
            "score); on the standardised scores: 0.9081 x popularity + 0.227 x EASE)") in md
    assert _md_row(md, ["200", "0.25"]) == ["200", "0.25", "0.148"]  # 0.1485 is 0.14849... in binary
    assert _md_row(md, ["prior alone"]) == ["prior alone", "30", "50", "0.25", "–", "0.149"]
    assert _md_row(md, ["beside the teacher"]) == ["beside the teacher", "30", "50", "0.25", "0.5", "0.162"]
    assert "retrieval student (scale 0.25 chosen; 0 = ground truth only)" in md
    # the one-SE rule's columns where the grid has them: 0.5 wins by 0.0022 < its SE 0.0031, so 0 is chosen
    assert "Rank student (scale 0 chosen)" in md
    assert _md_row(md, ["0", "0.6012"]) == ["0", "0.6012", "0.0022", "0.0031", "yes"]
    assert ("the ground-truth-only tower 0.699 (gain -0.019, one standard error 0.010): the teacher is NOT better."
            in md)
    assert _md_row(md, ["0.5", "0.6034"]) == ["0.5", "0.6034", "0", "0", "yes"]
    # models: best AUC 0.7712 (teacher) and best logloss 0.1811 bold; the baseline's NaN GAUC shows as "–"
    assert _md_row(md, ["teacher-deepfm"])[2:5] == ["**0.7712**", "**0.6601**", "**0.1811**"]
    assert _md_row(md, ["lightgbm"])[2:5] == ["0.7581", "–", "0.1844"]
    # parameter counts are integers even in a column with a gap (the baseline has none)
    assert _md_row(md, ["teacher-deepfm"])[-2:] == ["1,234,567", "4.71"]
    assert _md_row(md, ["lightgbm"])[-2:] == ["–", "–"]
    # the index's operating point: its row in bold, named in the caption (and circled on the plot)
    assert _md_row(md, ["**nprobe**"]) == ["**nprobe**", "**16**", "**0.987**", "**2,600.0**"]
    assert _md_row(md, ["nprobe", "4"]) == ["nprobe", "4", "0.874", "9,100.0"]
    assert "operating point in bold: nprobe=16" in md
    assert ("From the ablation's own pipeline runs (`ablation_world.json`, dataset world, date 2026-12-06; 3 seeds), "
            "not this run's models. Per seed, list metrics over 1,000 test requests, corpus-wide ones over the first "
            "100 of them.") in md
    # ablation, best per stage: prerank teacher-recall 0.7034 (NDCG) but AUC 0.7011 (ground truth);
    # retrieval: recall 0.770 with n=2 of 3 seeds flagged; the mix's NaN AUC is "–", so GT's 0.6801 is best
    assert _md_row(md, ["prerank", "ground truth only"])[2:] == ["0.610 ± 0.012", "**0.7011 ± 0.0020**"]
    assert _md_row(md, ["prerank", "listwise NDCG"])[2:] == ["**0.703 ± 0.005**", "0.6987 ± 0.0030"]
    assert _md_row(md, ["retrieval", "ground truth only"])[2:] == ["0.770 ± 0.010 (n=2)", "**0.6801 ± 0.0040**"]
    assert _md_row(md, ["retrieval", "mix"])[2:] == ["**0.812 ± 0.010**", "–"]
    # data splits in time order train before test even though the dict listed test first
    assert md.index("| train |") < md.index("| test |")
    assert _md_row(md, ["test"]) == ["test", "20,000", "2,000", "0.0401", "2022-05-07", "2022-05-08"]
    # pipeline step wall times and their total 1.5 + 12.25 + 3.0 = 16.75
    assert _md_row(md, ["total"]) == ["total", "16.75"]
    # training curves: one row per model and epoch, the loss at 4 decimals, a missing validation as "–"
    assert _md_row(md, ["teacher", "2"]) == ["teacher", "2", "0.6201", "valid AUC", "0.6845"]
    assert _md_row(md, ["prerank student (distilled)", "1"]) == ["prerank student (distilled)", "1", "4.4806",
                                                                 "teacher-recall@10 on a rank-log sample", "–"]
    assert NOT_COMPUTED not in md


def test_channels_section_shows_each_channel_alone_in_the_union_and_in_the_final_lists(written):
    md = (written[0] / "report.md").read_text()
    section = _md_section(md, "Retrieval channels")
    # quota 0.5 -> 0.500; recall 0.6251 -> 0.625; the teacher's top-K in N1 0.8597 -> 0.860; union without 0.5803
    # -> 0.580;
    # marginal 0.0709 -> 0.071; share 0.83 -> 0.830; end to end alone 0.0791 -> 0.079, the union's cascade minus it
    # -0.0112 ± 0.0058 (within 2 SE) and +0.0089 ± 0.0031 (beyond: starred); no oracle columns off the world
    assert _md_row(section, ["two_tower"]) == ["two_tower", "0.500", "0.625", "0.860", "0.580", "0.071", "0.830",
                                               "0.079", "-0.0112 ± 0.0058"]
    assert _md_row(section, ["popular"]) == ["popular", "0.500", "0.617", "0.382", "0.645", "0.006", "0.170",
                                             "0.070", "+0.0089 ± 0.0031 *"]
    assert "oracle ratio" not in section
    assert "The union (the channels interleaved by quota) has click-recall@N1 0.651" in section
    assert "the pre-rank keeps every channel's quota" in section
    # of the teacher's top-K: the union's N1 0.9148 -> 0.915, the best single channel two_tower's 0.8597 -> 0.860
    assert "the union's N1 holds 0.915 and the best single channel's (two_tower) 0.860" in section


@pytest.mark.parametrize("minimal", [{}, {"run": None, "data": None, "cascades": None, "index": None,
                                          "models": None, "ablation": None},
                                     {"run": {"name": "bare"}, "cascades": {"v": {"stages": {"rank": {"size": 5}}}}},
                                     {"training": {"teacher": {"epoch": [], "loss": [], "valid": []}}}])
def test_missing_sections_still_write_valid_files(tmp_path, minimal):
    write_report(minimal, tmp_path)
    assert load_report(tmp_path) == minimal
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert md.count(NOT_COMPUTED) >= 5  # curves, latency, index, models, ablation at least
    assert page.count(NOT_COMPUTED) == md.count(NOT_COMPUTED)
    assert IMG_RE.findall(page) == []
    assert page.rstrip().endswith("</html>")


def test_one_variant_without_oracle(tmp_path, report_data):
    report_data["cascades"] = {"distilled": report_data["cascades"]["distilled"]}
    report_data["cascades"]["distilled"]["oracle"] = None
    report_data["outcomes"]["rows"] = report_data["outcomes"]["rows"][:1]
    report_data["outcomes"]["rows"][0]["oracle_clicks"] = None
    write_report(report_data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    # one variant: flat columns (no side by side); no oracle anywhere -> no oracle column in the headline
    assert "AUC distilled" not in md
    assert "oracle clicks@K" not in md
    assert _md_row(md, ["distilled", "cascade"])[2:5] == ["0.061", "0.183", "0.0306"]
    assert len(IMG_RE.findall((tmp_path / "report.html").read_text())) == 4


def test_the_classic_prior_judged_by_the_random_slice_shows_its_one_se_columns(report_data):
    """The random slice's judge records the one-SE rule's columns on the prior's rows beside the teacher: the table
    shows them (the rows of the prior alone, chosen by the best AUC, leave them empty)."""
    report_data["choices"]["collaborative"] = {
        "setting": "auto", "judge": "AUC on the validation split's random-exposure impressions", "chosen": None,
        "grid": [{"lambda": 200.0, "weight": 0.0, "valid_random_auc": 0.7050, "gap_to_best": 0.0, "se_of_gap": 0.0,
                  "within_one_se": True},
                 {"part": "prior alone", "popular_days": 7.0, "prior_lambda": 800.0, "prior_ease_weight": 0.5,
                  "valid_random_auc": 0.6808},
                 {"part": "beside the teacher", "popular_days": 7.0, "prior_lambda": 800.0, "prior_ease_weight": 0.5,
                  "prior_weight": 0.0, "score_sd": 0.63, "valid_random_auc": 0.7050, "gap_to_best": 0.0,
                  "se_of_gap": 0.0, "within_one_se": True},
                 {"part": "beside the teacher", "popular_days": 7.0, "prior_lambda": 800.0, "prior_ease_weight": 0.5,
                  "prior_weight": 0.25, "score_sd": 0.63, "valid_random_auc": 0.7027, "gap_to_best": 0.0023,
                  "se_of_gap": 0.0022, "within_one_se": False}]}
    md = render_markdown(report_data)
    assert "Teacher: collaborative term added to its ranking score (chosen none: weight 0)" in md
    # AUC at 4 decimals, as everywhere else in the report
    assert _md_row(md, ["prior alone"]) == ["prior alone", "7", "800", "0.5", "–", "0.6808", "–", "–", "–"]
    assert _md_row(md, ["beside the teacher", "7", "800", "0.5", "0.25"])[5:] == ["0.7027", "0.0023", "0.0022",
                                                                                   "no"]
    assert "| EASE lambda | weight | valid AUC (random slice) | gap to best | SE of the gap | within one SE |" in md


def test_the_headline_names_the_test_period_and_a_backtest(tmp_path, report_data):
    write_report(report_data, tmp_path)
    # a data step that recorded no utc_offset_hours: its dates are UTC dates, and the caption says so
    assert "test requests (2022-05-07 .. 2022-05-08 UTC); N1 = " in (tmp_path / "report.md").read_text()
    report_data["data"]["summary"]["split_days"] = {"valid_days": 1, "test_days": 1, "drop_last_days": 14}
    write_report(report_data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "test requests (2022-05-07 .. 2022-05-08 UTC; a backtest: the log's last 14 days left out); N1 = " in md
    # with the offset: the log's local dates, the offset named (2022-05-08 20:00 UTC is the 9th at UTC+8)
    report_data["data"]["summary"]["split_days"] = {"drop_last_days": 0, "utc_offset_hours": 8.0}
    report_data["data"]["splits"]["test"]["end"] = "2022-05-08T20:00:00"
    md = render_markdown(report_data)
    assert "test requests (2022-05-07 .. 2022-05-09, local dates at UTC+8); N1 = " in md
    # the splits table's times are UTC and say so
    assert "| split | rows | requests | ctr | start (UTC) | end (UTC) |" in md
    del report_data["data"]["splits"]
    write_report(report_data, tmp_path)
    assert "test requests; N1 = " in (tmp_path / "report.md").read_text()


def test_bad_input_names_the_key(tmp_path, report_data):
    with pytest.raises(ValueError, match=r"report_data\['cascades'\] must be a dict"):
        write_report({"cascades": [1, 2]}, tmp_path)
    bad = report_data
    bad["cascades"]["distilled"]["recall_curves"]["prerank"]["k"] = [1, 2]
    with pytest.raises(ValueError, match=r"\['distilled'\]\['recall_curves'\]\['prerank'\]: 'k' has 2 values"):
        write_report(bad, tmp_path)
    bad = make_report_data()
    bad["index"]["operating_point"]["value"] = 8
    with pytest.raises(ValueError, match="operating point nprobe=8 is not among the swept points"):
        write_report(bad, tmp_path)
    with pytest.raises(ValueError, match=r"report_data\['run'\]\['when'\]: a object cannot go"):
        write_report({"run": {"when": object()}}, tmp_path)
    assert not (tmp_path / "report.json").exists()  # nothing half-written
    with pytest.raises(ArtifactError, match="report.json: file not found"):
        load_report(tmp_path)


NO_BROWSER = not ((shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver"))
BROWSER_REASON = ("Chromium or chromedriver not installed (Debian: apt-get install chromium chromium-driver; .ci/run "
                  "installs both)")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "render_report.py"


@pytest.fixture
def browser():
    """Skip where there is no browser, except in CI (CI=true: .ci/run installs one), where that is a failure."""
    if NO_BROWSER:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {BROWSER_REASON}")
        pytest.skip(BROWSER_REASON)


def _render(page: Path, png: Path, size: str = "1280x2400") -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, str(TOOL), str(page), "--out", str(png), "--window-size", size],
                          capture_output=True, text=True, timeout=300)
    return done, json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else {}


def test_html_renders_in_headless_chromium(tmp_path, written, browser):
    """The page in a real browser at 1280 px: loaded without a browser error, all four plots decoded, no table
    clipped (the models table was cut off behind a scroll bar before its headers could wrap), not blank."""
    from matplotlib.image import imread

    out, _ = written
    done, stats = _render(out / "report.html", tmp_path / "shot.png")
    assert done.returncode == 0, done.stderr[-2000:]
    assert stats["problems"] == [] and stats["images"] == 4
    assert stats["page_height"] > 2400  # the whole report is longer than the window
    png = Path(stats["png"])
    assert png.stat().st_size > 50_000  # a page of tables and plots, not an empty canvas
    img = imread(png)
    assert img.shape[:2] == (2400, 1280)
    grey = img[..., :3].mean(axis=2)
    # not blank: a white page has variance 0; text, table bands and plots give clearly more
    assert grey.var() > 1e-3
    # content reaches down the page (the plots are below the tables), not only a header strip
    assert (grey[1200:] < 0.9).mean() > 0.01


def test_the_readme_shows_a_small_screenshot_of_a_report():
    """docs/report-screenshot.png (made by tools/render_report.py, as the README says) is a PNG of the report at
    1280 px, small enough to keep in the repository, and the README shows it."""
    root = TOOL.parents[1]
    png = root / "docs" / "report-screenshot.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and struct.unpack(">II", data[16:24]) == (1280, 1800)
    assert len(data) < 200_000
    assert "](docs/report-screenshot.png)" in (root / "README.md").read_text()


def test_browser_check_fails_on_a_broken_page(tmp_path, browser):
    """The checks can fail: an image that does not decode, a table wider than its box, a resource that is not there
    (a console error) each make the tool exit 1 and name the problem."""
    page = tmp_path / "report.html"
    wide = "<tr>" + "".join(f"<td>column {i} with long text</td>" for i in range(40)) + "</tr>"
    page.write_text('<!DOCTYPE html><html><body><p>text</p><img alt="broken plot" src="data:image/png;base64,AAAA">'
                    f'<img alt="missing file" src="nope.png"><section id="models"><div class="tw" '
                    f'style="overflow-x:auto"><table>{wide}</table></div></section></body></html>')
    done, stats = _render(page, tmp_path / "shot.png", "800x600")
    assert done.returncode == 1
    found = "\n".join(stats["problems"])
    assert "image 'broken plot' did not load" in found and "image 'missing file' did not load" in found
    assert "a table in section 'models' is clipped" in found
    assert "nope.png" in found and "browser SEVERE" in found  # the failed load, from the browser's log


def test_outcome_rows_flag_a_loss_to_most_popular_with_its_paired_gap_and_pick_the_gaps_to_show():
    from cascade.pipeline.report import outcome_rows

    def q(cr, oracle=None):
        return {"quality": {"rank_click_recall": cr, "oracle_ratio": oracle},
                "sizes": {"retrieval": 300, "prerank": 50, "rank": 10}}

    gap = {"diff": -0.012, "se": 0.019, "n": 116}
    summary = {"variants": {"distilled": q(0.111), "ground_truth": q(0.101), "distilled+channels": q(0.112)},
               "references": {"teacher_corpus": q(0.108)},
               "baselines": {"popular (7 days)": q(0.124), "itemcf": q(0.106), "als (32 factors)": q(0.077)},
               "paired": {"distilled": {"popular (7 days)": {"rank_click_recall": gap},
                                        "ground_truth": {"rank_click_recall": {"diff": 0.01, "se": 0.004, "n": 116}},
                                        "itemcf": {"rank_click_recall": gap}},
                          "ground_truth": {"popular (7 days)": {"rank_click_recall": gap}},
                          "distilled+channels": {"distilled": {"rank_click_recall": gap},
                                                 "popular (7 days)": {"rank_click_recall": gap}}}}
    out = outcome_rows(summary)
    assert out["flags"][0] == ("The distilled cascade finds fewer of the test clicks than popular (7 days) "
                               "(click-recall@10 0.1110 < 0.1240; paired over 116 requests -0.0120 ± 0.0190 (SE): "
                               "within 2 SE, not distinguishable on these requests).")
    # each cascade against ground truth and most-popular (here also the best baseline), the multi-channel one first
    # against its two-tower alone; no oracle on this data
    assert [(g["cascade"], g["other"], g["beyond_2se"]) for g in out["gaps"]] == [
        ("distilled", "ground_truth", True), ("distilled", "popular (7 days)", False),
        ("ground_truth", "popular (7 days)", False), ("distilled+channels", "distilled", False),
        ("distilled+channels", "popular (7 days)", False)]


def test_where_the_data_have_an_oracle_a_loss_to_a_popularity_baseline_is_flagged_on_oracle_clicks():
    """On the world the headline leads with oracle clicks and logged clicks follow the logging policy: a cascade
    above the classic prior on oracle clicks but below it on logged click-recall is not flagged; one below it on
    oracle clicks is, with the paired gap of the oracle's share."""
    from cascade.pipeline.report import outcome_rows

    def q(cr, oracle_clicks):
        return {"quality": {"rank_click_recall": cr, "oracle_clicks": oracle_clicks,
                            "oracle_ratio": oracle_clicks / 9.9},
                "sizes": {"retrieval": 500, "prerank": 100, "rank": 10}}

    gap = {"diff": -0.0031, "se": 0.0012, "n": 500}
    prior = "popular + EASE (7 days, lambda 800, b 1)"
    summary = {"variants": {"distilled": q(0.079, 9.574), "ground_truth": q(0.086, 9.2)},
               "baselines": {"popular (1 days)": q(0.084, 8.647), prior: q(0.102, 9.273)},
               "paired": {"ground_truth": {prior: {"oracle_ratio": gap, "rank_click_recall": gap}}}}
    flags = outcome_rows(summary)["flags"]
    assert flags == [f"The ground_truth cascade gets fewer oracle clicks than {prior} (oracle clicks@10 9.200 < "
                     "9.273; the oracle's share paired over 500 requests -0.0031 ± 0.0012 (SE): beyond 2 SE)."]
    # the same lists without an oracle: logged click-recall judges; both cascades trail the prior, distilled also
    # most-popular
    for s in (*summary["variants"].values(), *summary["baselines"].values()):
        s["quality"].pop("oracle_clicks"), s["quality"].pop("oracle_ratio")
    flags = outcome_rows(summary)["flags"]
    assert [f.split(" (click-recall")[0] for f in flags] == [
        "The distilled cascade finds fewer of the test clicks than popular (1 days)",
        f"The distilled cascade finds fewer of the test clicks than {prior}",
        f"The ground_truth cascade finds fewer of the test clicks than {prior}"]


def test_the_verdict_names_the_best_cascade_by_the_headline_outcome_with_its_paired_gaps():
    """Hand-worked: where the data have an oracle, the oracle's share judges (the best cascade, its gap to the best
    classic baseline and to the next cascade, and the list logged clicks would pick instead); without one, logged
    click-recall judges; a gap without an SE is "too few requests to tell"; no cascade, no verdict."""
    from cascade.pipeline.report import outcome_rows

    def q(cr, ratio=None):
        return {"quality": {"rank_click_recall": cr, **({} if ratio is None else {"oracle_ratio": ratio})},
                "sizes": {"retrieval": 500, "prerank": 100, "rank": 10}}

    prior = "popular + EASE (7 days, lambda 800, b 1)"
    summary = {"variants": {"distilled": q(0.079, 0.9636), "distilled+channels": q(0.066, 0.9670),
                            "ground_truth": q(0.086, 0.9541)},
               "references": {"teacher_corpus": q(0.066, 0.9690)},  # a reference is neither a cascade nor a baseline
               "baselines": {"content": q(0.094, 0.9479), prior: q(0.102, 0.9455)},
               "paired": {"distilled+channels": {
                   "content": {"oracle_ratio": {"diff": 0.0191, "se": 0.0051, "n": 500}},
                   "distilled": {"oracle_ratio": {"diff": 0.0034, "se": 0.0009, "n": 500}}}}}
    v = outcome_rows(summary)["verdict"]
    assert (v["judge"], v["best"], v["value"], v["logged_best"]) == ("oracle_ratio", "distilled+channels", 0.9670,
                                                                     prior)
    assert [(a["other"], a["role"]) for a in v["against"]] == [("content", "the best classic baseline"),
                                                                ("distilled", "the next cascade")]
    assert v["text"] == (
        "Verdict, by the oracle's share of the best possible clicks (oracle ratio@10: the true click model, which the "
        "logging policy does not bias): distilled+channels leads the cascades (0.9670). Against the best classic "
        "baseline, content (0.9479): +0.0191 ± 0.0051 paired over 500 requests, ahead (beyond 2 SE). Against the "
        "next cascade, distilled (0.9636): +0.0034 ± 0.0009 paired over 500 requests, ahead (beyond 2 SE). The "
        "teacher's own list over the whole corpus scores 0.9690; the cascade minus it: -0.0020. Logged "
        f"click-recall@10 would pick {prior} (0.1020; distilled+channels 0.0660): the logged clicks follow what the "
        "logging policy showed, which the oracle does not.")

    # no oracle: logged click-recall judges; a tie within 2 SE; a next cascade without a paired gap is left out
    summary = {"variants": {"distilled": q(0.1531), "ground_truth": q(0.1523)},
               "baselines": {prior: q(0.1523), "popular (7 days)": q(0.1308)},
               "paired": {"distilled": {prior: {"rank_click_recall": {"diff": 0.0007, "se": 0.0023, "n": 575}}}}}
    v = outcome_rows(summary)["verdict"]
    assert v["text"] == ("Verdict, by click-recall@10 of the held-out clicks: distilled leads the cascades (0.1531). "
                         f"Against the best classic baseline, {prior} (0.1523): +0.0007 ± 0.0023 paired over 575 "
                         "requests, a tie on these requests (within 2 SE).")
    assert v["logged_best"] is None and [a["other"] for a in v["against"]] == [prior]
    summary["paired"]["distilled"][prior]["rank_click_recall"] = {"diff": -0.02, "se": float("nan"), "n": 1}
    assert outcome_rows(summary)["verdict"]["text"].endswith(f"{prior} (0.1523): too few requests to tell.")
    summary["paired"]["distilled"][prior]["rank_click_recall"] = {"diff": -0.02, "se": 0.005, "n": 575}
    assert outcome_rows(summary)["verdict"]["text"].endswith("-0.0200 ± 0.0050 paired over 575 requests, behind "
                                                             "(beyond 2 SE).")
    assert outcome_rows({"baselines": summary["baselines"]})["verdict"] is None


def test_gap_rows_take_the_random_slice_expectation_against_ground_truth_popular_and_the_best_baseline():
    from cascade.pipeline.report import outcome_rows

    def q(expected):
        return {"quality": {"rank_click_recall": 0.1, "expected_click_recall_rand": expected},
                "sizes": {"retrieval": 300, "prerank": 50, "rank": 10}}

    def g(d):
        return {"expected_click_recall_rand": {"diff": d, "se": 0.00001, "n": 650}}

    summary = {"variants": {"distilled": q(0.00326), "ground_truth": q(0.00322)},
               "baselines": {"popular (1 days)": q(0.00281), "content": q(0.00323), "als (32 factors)": q(0.00309)},
               "paired": {"distilled": {"ground_truth": g(0.00004), "popular (1 days)": g(0.00045),
                                        "content": g(0.000013), "als (32 factors)": g(0.00017)}}}
    out = outcome_rows(summary)
    assert out["rows"][0]["expected_click_recall_rand"] == 0.00326
    rand = [(r["other"], r["beyond_2se"]) for r in out["gaps"] if r["metric"] == "expected_click_recall_rand"]
    assert rand == [("ground_truth", True), ("popular (1 days)", True), ("content", False)]  # content: the best


def test_tower_gate_flag_names_its_judge():
    from cascade.pipeline.report import gate_flags

    logged = {"teacher": 0.279, "ground_truth_student": 0.281, "gain": -0.002, "standard_error": 0.014,
              "teacher_better": False}
    assert gate_flags({"students": {"prerank": {"size": 100, "chosen_scale": 0.0, "gate": logged}}}) == [
        "The teacher is not better than the ground-truth-only prerank student on validation (click-recall@100 0.279 "
        "vs 0.281; gain -0.002, one standard error 0.014): validation does not show that distilling it helps. The "
        "distilled cascade serves the prerank student at distillation scale 0 (ground truth only, as the "
        "ground_truth cascade does)."]
    # a positive gain within one SE is "not distinguishable", not "not better"; and the scale served is named
    within = {**logged, "teacher": 0.290, "gain": 0.009, "standard_error": 0.043}
    assert gate_flags({"students": {"prerank": {"size": 100, "chosen_scale": 1.0, "gate": within}}}) == [
        "The teacher is not distinguishable from the ground-truth-only prerank student on validation "
        "(click-recall@100 0.290 vs 0.281; gain +0.009, within one standard error 0.043): validation does not show "
        "that distilling it helps. The distilled cascade still serves the prerank student at distillation scale 1."]
    by_auc = {"judged_by": "random_auc", "impressions": 3456, "teacher": 0.690, "ground_truth_student": 0.701,
              "gain": -0.011, "standard_error": 0.004, "teacher_better": False}
    assert gate_flags({"students": {"retrieval": {"size": 500, "gate": by_auc}}}) == [
        "The teacher is not better than the ground-truth-only retrieval student on validation (AUC on the 3,456 "
        "randomly shown validation impressions 0.690 vs 0.701; gain -0.011, one standard error 0.004): validation "
        "does not show that distilling it helps."]
    assert gate_flags({"students": {"retrieval": {"size": 500, "gate": {**by_auc, "teacher_better": True}}}}) == []
    # the report's choices section says the same in words
    from cascade.eval.report.sections import _section_choices

    sec = _section_choices({"choices": {"students": {"retrieval": {"size": 500, "chosen_scale": 0.5, "grid": [],
                                                                   "gate": by_auc}}}})
    assert ("p", "Teacher gate: on the 3,456 randomly shown validation impressions the teacher's ranking score has "
                 "AUC 0.6900, the ground-truth-only tower 0.7010 (gain -0.0110, one standard error 0.0040): the "
                 "teacher is NOT better.") in sec.blocks
    assert ("h3", "retrieval student (scale 0.5 chosen; 0 = ground truth only)") in sec.blocks  # recorded before
    sec = _section_choices({"choices": {"students": {
        "retrieval": {"size": 500, "chosen_scale": 1.0, "reference_scale": 1.0, "grid": [],
                      "gate": {**by_auc, "teacher_better": True}},
        "rank_student": {"chosen_scale": 0.0, "reference_scale": 0.0, "grid": []}}}})
    assert ("h3", "retrieval student (scale 1 chosen: within one SE of the best, the closest to 1, as the teacher "
                  "gate found the teacher better; 0 = ground truth only)") in sec.blocks
    assert ("h3", "Rank student (scale 0 chosen: within one SE of the best, the closest to 0, as the teacher gate did "
                  "not find the teacher better)") in sec.blocks
    # the KD temperature: a table where it was searched, the reason where it was not
    sec = _section_choices({"choices": {"students": {
        "retrieval": {"size": 500, "chosen_scale": 1.0, "grid": [], "temperature": {
            "configured": 1.0, "chosen": 2.0, "searched": True, "grid": [
                {"temperature": 1.0, "valid_click_recall@500": 0.58, "gap_to_best": 0.02, "se_of_gap": 0.01,
                 "within_one_se": False},
                {"temperature": 2.0, "valid_click_recall@500": 0.60, "gap_to_best": 0.0, "se_of_gap": 0.0,
                 "within_one_se": True}]}},
        "prerank": {"size": 100, "chosen_scale": 1.0, "grid": [], "temperature": {
            "configured": None, "searched": False, "why": "no distillation term with a temperature"}}}}})
    assert ("p", "KD temperature at the chosen scale: 2 (configured 1; the closest to it within one SE of the best "
                 "is served).") in sec.blocks
    assert ("p", "KD temperature: not searched (no distillation term with a temperature).") in sec.blocks
    tables = [b[1].frame for b in sec.blocks if b[0] == "table" and "KD temperature" in b[1].frame.columns]
    assert len(tables) == 1 and tables[0]["KD temperature"].tolist() == [1.0, 2.0]
    assert tables[0]["valid click-recall@500"].tolist() == [0.58, 0.60]
    assert tables[0]["within one SE"].tolist() == [False, True]
    # each tower's training length, where it was searched: the epochs served (configured / trained), and the
    # configured count for a tower trained without the search
    row = {"valid_click_recall@100": 0.3, "gap_to_best": 0.0, "se_of_gap": 0.0, "within_one_se": True}
    sec = _section_choices({"choices": {"students": {"prerank": {"size": 100, "chosen_scale": 0.0, "grid": [
        {"scale": 0.0, **row, "epochs": {"configured": 2, "trained": 5, "chosen": 3, "grid": []}},
        {"scale": 1.0, **row, "epochs": {"configured": 2, "trained": 2}}]}}}})
    tables = [b[1].frame for b in sec.blocks if b[0] == "table" and "distillation scale" in b[1].frame.columns]
    assert tables[0]["epochs served (configured / trained)"].tolist() == ["3 (2 / 5)", "2"]
    assert any(b[0] == "p" and b[1].startswith("Each tower's training length was chosen") for b in sec.blocks)
    sec = _section_choices({"choices": {"students": {"prerank": {"size": 100, "chosen_scale": 0.0, "grid": [
        {"scale": 0.0, **row, "epochs": {"configured": 2, "trained": 2}}]}}}})  # not searched (the default)
    tables = [b[1].frame for b in sec.blocks if b[0] == "table" and "distillation scale" in b[1].frame.columns]
    assert "epochs served (configured / trained)" not in tables[0].columns
    assert not any(b[0] == "p" and b[1].startswith("Each tower's training length") for b in sec.blocks)


def test_rank_student_gate_flag_states_its_margin():
    from cascade.pipeline.report import gate_flags

    gate = {"teacher_valid_auc": 0.7010, "plain_student_valid_auc": 0.6995, "gain": 0.0015, "standard_error": 0.0031,
            "teacher_better": False}
    assert gate_flags({"students": {"rank_student": {"gate": gate}}}) == [
        "The teacher's validation AUC (0.7010) is not above the plain rank student's (0.6995; gain +0.0015, one "
        "standard error 0.0031) by more than one standard error."]
    assert gate_flags({"students": {"rank_student": {"gate": {**gate, "teacher_better": True}}}}) == []
    # the replay's rank stage named: the teacher itself (the rank student is not served), or the student's scale
    assert gate_flags({"ranker": "teacher", "students": {"rank_student": {"chosen_scale": 0.0, "gate": gate}}})[0]\
        .endswith("by more than one standard error. The replay ranks with the teacher itself (replay.ranker = "
                  "teacher): the rank student is not served.")
    assert gate_flags({"ranker": "student", "students": {"rank_student": {"chosen_scale": 0.0, "gate": gate}}})[0]\
        .endswith("The replay's rank student is served at distillation scale 0 (ground truth only).")


def test_the_headline_states_how_many_requests_each_measure_is_over(report_data):
    """The caption names the logged traffic's sample (of the test split's requests, those with clicks) and the random
    slice's random-exposure requests (those with clicks): a random-slice 0.0000 over 6 requests reads as such."""
    for r in report_data["outcomes"]["rows"]:
        r["n_requests"] = 1900
    report_data["outcomes"]["n_rand_requests_with_clicks"] = 6
    md = render_markdown(report_data)
    assert ("test requests (2022-05-07 .. 2022-05-08 UTC); N1 = 500, N2 = 100, K = 10. Logged traffic: an even "
            "sample of 1,900 of the 2,000 test requests (1,800 with clicks: the click metrics are means over these); "
            "random slice: 90 random-exposure requests (6 with clicks).") in md
    for r in report_data["outcomes"]["rows"]:
        r["n_requests"], r["n_rand_requests"] = 2000, None
    assert ("K = 10. Logged traffic: all 2,000 test requests (1,800 with clicks: the click metrics are means over "
            "these).\n") in render_markdown(report_data)


def test_rand_requests_with_clicks_counts_the_random_slice_requests_a_click_metric_averages(tmp_path):
    import pandas as pd

    from cascade.pipeline.report import rand_requests_with_clicks

    (tmp_path / "replay").mkdir()
    (tmp_path / "data").mkdir()
    # requests 1-4 random-exposure (1, 2 and 4 with a click: click-recall not NaN), 5 and 6 logged
    pd.DataFrame({"request_id": [1, 2, 3, 4, 5, 6], "rank_click_recall": [0.0, 0.5, np.nan, 1.0, 0.2, np.nan]}) \
        .to_parquet(tmp_path / "replay" / "distilled_requests.parquet")
    pd.DataFrame({"request_id": [1, 1, 2, 3, 4, 5, 6, 7], "is_rand": [1, 1, 1, 1, 1, 0, 0, 1],
                  "click": [0, 1, 1, 0, 1, 1, 0, 1]}).to_parquet(tmp_path / "data" / "impressions.parquet")
    summary = {"variants": {"distilled": {}}}
    assert rand_requests_with_clicks(tmp_path, summary) == 3
    assert rand_requests_with_clicks(tmp_path, {"variants": {"other": {}}}) is None  # no per-request rows


def test_a_stage_that_keeps_the_whole_catalogue_is_flagged():
    from cascade.pipeline.report import whole_catalogue_flags

    summary = {"variants": {"distilled": {"sizes": {"retrieval": 500, "prerank": 100, "rank": 10}}}}
    assert whole_catalogue_flags(summary, 500) == [
        "The retrieval stage keeps N1 = 500 of the 500 items, the whole catalogue: its recall is trivially 1 (a "
        "smaller replay.n_retrieve makes the stage choose)."]
    assert whole_catalogue_flags(summary, 501) == [] and whole_catalogue_flags(summary, None) == []


def test_the_headline_note_explains_only_the_measures_the_data_have(report_data):
    """Off the world there is no oracle or expected click-recall, on MovieLens no random slice: their explanations
    go with them; teacher_corpus is the ceiling of teacher-recall, not of the click metrics."""
    md = render_markdown(report_data)
    note = next(line for line in md.splitlines() if line.startswith("click-recall@K: share"))
    assert "Random slice:" in note and "'expected'" in note and "Oracle clicks:" in note
    assert "synthetic world only" not in note
    assert ("Reference 'teacher_corpus': the teacher's own top list over the corpus, the ceiling of teacher-recall (1 "
            "by construction), not of the click metrics: a cascade can find more of the held-out clicks than it.") \
        in note
    for r in report_data["outcomes"]["rows"]:
        r.update(oracle_clicks=None, expected_click_recall_rand=None, click_recall_rand=None)
    note = next(line for line in render_markdown(report_data).splitlines() if line.startswith("click-recall@K: share"))
    assert "Random slice" not in note and "'expected'" not in note and "Oracle" not in note


def test_the_world_generator_settings_are_left_out_of_another_source_config(report_data):
    world = {"n_days": 21, "position_bias": 0.8}
    report_data["run"]["config"] = {"data": {"source": "kuairand", "test_days": None, "world": world}}
    md = render_markdown(report_data)
    assert "[data.world]\n" not in md and "position_bias" not in md
    assert "[data.world] left out: the synthetic world's generator settings do nothing for data.source = " \
           "'kuairand'." in md
    report_data["run"]["config"]["data"]["source"] = "world"
    assert "[data.world]\nn_days = 21\nposition_bias = 0.8" in render_markdown(report_data)


def test_aucs_throughput_and_the_random_slice_auc_are_labelled_and_shown(report_data):
    """The per-stage AUC is the served score's (the teacher's with its exposure weight and collaborative term), the
    Models table's the model's alone; the stages' random-slice AUC and the end-to-end throughput are shown."""
    report_data["cascades"]["distilled"]["stages"]["rank"]["rand_auc"] = 0.6362
    md = render_markdown(report_data)
    aucs = _md_section(md, "AUC of each stage's served score on the test impressions")
    assert _md_row(aucs, ["rank"])[-1] == "0.6362"  # AUC (random slice): only distilled's was measured
    assert "AUC (random slice) distilled |" in aucs and "AUC (random slice) ground_truth" not in aucs
    assert "not the Models table's AUC of the model alone" in md
    assert ("The teacher's row scores the model alone (its click probability); the cascade's rank stage ranks by its "
            "ranking score (with the exposure weight and collaborative term), whose AUC is the per-stage table's rank "
            "row.") in md
    throughput = _md_section(md, "Throughput end to end")
    assert "| variant | requests / s at batch 1 | batch | requests / s batched |" in throughput
    assert _md_row(throughput, ["distilled"]) == ["distilled", "231.4", "256", "5,812.3"]


def test_header_names_the_runs_machine_and_when_the_report_was_built(report_data):
    from cascade.pipeline.report import run_machine

    rec = {"cpu_model": "AMD EPYC", "logical_cores": 2, "threads": {"torch": 1}, "versions": {"torch": "2.13.0"}}
    assert run_machine({"data": {"machine": rec}, "replay": {"machine": rec}}) == \
        "AMD EPYC, 2 logical cores, 1 torch thread, torch 2.13.0"
    gpu = {**rec, "cpu_model": "Intel Xeon", "logical_cores": 16, "threads": {"torch": 16}}
    assert run_machine({"data": {"machine": rec}, "teacher": {"machine": gpu}, "replay": {"machine": rec}}) == (
        "data, replay: AMD EPYC, 2 logical cores, 1 torch thread, torch 2.13.0; teacher: Intel Xeon, 16 logical "
        "cores, 16 torch threads, torch 2.13.0")
    assert run_machine({"data": {}}) is None
    report_data["run"]["report_machine"] = "x86_64, 2 CPUs"
    md = render_markdown(report_data)
    assert md.splitlines()[2] == ("report built: 2026-11-22T10:00:00Z · run's machine: 2-core test box · report built "
                                  "on: x86_64, 2 CPUs")


def test_data_summary_shows_nested_values_in_full(report_data):
    report_data["data"]["summary"]["split_days"] = {"chosen_by": "quantile of the request days", "drop_last_days": 0,
                                                    "dropped_impressions": 0, "test_days": 1, "utc_offset_hours": 8.0,
                                                    "valid_days": 1}
    md = render_markdown(report_data)
    assert _md_row(md, ["split_days.utc_offset_hours"]) == ["split_days.utc_offset_hours", "8"]
    assert _md_row(md, ["split_days.test_days"]) == ["split_days.test_days", "1"]
    assert _md_row(md, ["split_days.chosen_by"]) == ["split_days.chosen_by", "quantile of the request days"]
    # MovieLens' clicks are ratings >= 4: its ctr is their share
    report_data["data"]["summary"]["source"] = "movielens-100k"
    md = render_markdown(report_data)
    assert _md_row(md, ["ctr (share of ratings >= 4)"]) == ["ctr (share of ratings >= 4)", "0.0457"]
    assert "| split | rows | requests | ctr (share of ratings >= 4) | start (UTC) | end (UTC) |" in md


def test_the_curve_note_names_the_requests_it_averages(written):
    md = (written[0] / "report.md").read_text()
    assert "mean over all replayed requests" not in md
    assert ("mean over the logged traffic's sample of test requests (the random-exposure requests replayed only for "
            "the random slice are left out)") in md


def test_choices_print_the_rank_gate_and_every_grid_rule():
    from cascade.eval.report.sections import _section_choices

    gate = {"teacher_valid_auc": 0.6993, "plain_student_valid_auc": 0.5391, "gain": 0.1602, "standard_error": 0.0081,
            "teacher_better": True}
    sec = _section_choices({"choices": {"students": {"rank_student": {"chosen_scale": 0.0, "grid": [],
                                                                      "gate": gate}}}})
    assert ("p", "Teacher gate: the teacher's validation AUC is 0.6993, the plain rank student's 0.5391 (gain "
                 "0.1602, one standard error 0.0081): the teacher is better by more than one standard error.") \
        in sec.blocks
    rules = sec.blocks[-1][1]
    assert "the classic prior's weight beside the teacher, where logged clicks judge it, the largest value" in rules
    assert "a student's KD temperature the value closest to the configured one" in rules


def test_the_collaborative_grid_shows_its_one_se_columns(report_data):
    report_data["choices"]["collaborative"]["grid"][:2] = [
        {"lambda": 200.0, "weight": 0.0, "valid_click_recall@10": 0.1456, "gap_to_best": 0.0029, "se_of_gap": 0.0011,
         "within_one_se": False},
        {"lambda": 200.0, "weight": 0.25, "valid_click_recall@10": 0.1485, "gap_to_best": 0.0, "se_of_gap": 0.0,
         "within_one_se": True}]
    md = render_markdown(report_data)
    assert _md_row(md, ["200", "0"]) == ["200", "0", "0.146", "0.0029", "0.0011", "no"]
    assert _md_row(md, ["200", "0.25"]) == ["200", "0.25", "0.148", "0", "0", "yes"]


def test_an_exact_index_says_there_is_nothing_to_sweep(report_data):
    report_data["index"] = {"variant": "distilled", "factory": "Flat", "backend": "faiss-cpu", "metric": "ip",
                            "is_exact": True, "n_items": 500, "dim": 16, "recall_vs_exact": 1.0, "recall_k": 50,
                            "recall_target": 0.95, "operating_points": [], "operating_point": None}
    section = _md_section(render_markdown(report_data), "Index")
    assert NOT_COMPUTED not in section
    assert ("The index is exact (a flat search of every item): it returns the true top-k, so there is no search "
            "parameter to sweep.") in section
    assert _md_row(section, ["recall@50 vs exact"]) == ["recall@50 vs exact", "1.000"]
    assert _md_row(section, ["recall target"]) == ["recall target", "0.950"]
    assert _md_row(section, ["variant shown"]) == ["variant shown", "distilled"]
