"""The distillation ablation: config, metrics on hand-worked lists, aggregation against numpy, and one tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cascade.config import ConfigError
from cascade.pipeline import ablation as AB

ROOT = Path(__file__).resolve().parents[1]


def test_variant_configs_add_one_loss_to_ground_truth():
    cfg, _ = AB.load_ablation_config(ROOT / "pipelines" / "ablation.toml", [])
    gt = AB.variant_config(cfg.students, "prerank", AB.GROUND_TRUTH)
    assert dict(gt.loss_weights) == {"click_bce": 1.0}
    bpr = AB.variant_config(cfg.students, "prerank", "+ bpr", distill_weight=0.5)
    assert dict(bpr.loss_weights) == {"click_bce": 1.0, "bpr": 0.5}
    r = AB.variant_config(cfg.students, "retrieval", "+ listnet")
    assert dict(r.loss_weights) == {"sampled_softmax": 1.0, "listnet": 1.0} and r.softmax_positives == "clicks"
    assert dict(AB.variant_config(cfg.students, "retrieval", AB.GROUND_TRUTH).loss_weights) == {"sampled_softmax": 1.0}
    assert AB.variant_config(cfg.students, "retrieval", AB.MIX) == cfg.students.retrieval
    with pytest.raises(ValueError, match="unknown ablation variant"):
        AB.variant_config(cfg.students, "prerank", "+ hinton")


def test_settings_are_strict():
    with pytest.raises(ConfigError, match="ablation.n_pik"):
        AB.load_ablation_config(ROOT / "pipelines" / "ablation.toml", ["ablation.n_pik=5"])
    with pytest.raises(ConfigError, match="must include"):
        AB.load_ablation_config(ROOT / "pipelines" / "ablation.toml", ['ablation.variants=["+ bpr"]'])
    with pytest.raises(ConfigError, match="k <= n_pick"):
        AB.load_ablation_config(None, ["ablation.k=10", "ablation.n_pick=5"])


def test_list_metrics_hand_worked():
    # one list of 4 items [10, 11, 12, 13] (item rows), teacher ranks [2, 1, 4, 3]; second row has padding.
    items = np.array([[10, 11, 12, 13], [20, 21, -1, -1]])
    ranks = np.array([[2, 1, 4, 3], [1, 2, 0, 0]])
    scores = np.array([[0.1, 0.3, 0.9, 0.2], [0.5, 0.4, 99.0, 99.0]])
    # k = 2, n_pick = 2. Row 0: teacher top-2 = {11, 10}; student top-2 = [12, 11] -> recall 1/2.
    # Row 1: teacher top-2 = {20, 21}; student top-2 (padding is never picked) = [20, 21] -> recall 1. Mean 0.75.
    # NDCG@2: every real rank is <= 5, so every item has grade 4 and the same gain: NDCG = 1 in both rows.
    m = AB.list_metrics(scores, items, ranks, k=2, n_pick=2)
    assert m["list_teacher_recall@2"] == pytest.approx(0.75)
    assert m["ndcg@2"] == pytest.approx(1.0)


def test_list_ndcg_uses_teacher_grades():
    # 12 items, teacher ranks 1..12 in slot order; grades: ranks 1-5 -> 4 (gain 15), 6-10 -> 3 (gain 7),
    # 11-12 -> 2 (gain 3). The student puts slot 11 (rank 12, gain 3) first, then slot 0 (rank 1, gain 15).
    # DCG@2 = 3 + 15/log2(3) = 12.464; IDCG@2 = 15 + 15/log2(3) = 24.464; NDCG = 0.5095.
    items = np.arange(12)[None, :]
    ranks = np.arange(1, 13)[None, :]
    scores = np.zeros((1, 12))
    scores[0, 11], scores[0, 0] = 2.0, 1.0
    m = AB.list_metrics(scores, items, ranks, k=2, n_pick=2)
    assert m["ndcg@2"] == pytest.approx((3 + 15 / math.log2(3)) / (15 + 15 / math.log2(3)))
    # teacher top-2 = {0, 1}; student top-2 = {11, 0} -> 1/2
    assert m["list_teacher_recall@2"] == pytest.approx(0.5)


def test_corpus_topk_matches_exact_search():
    rng = np.random.default_rng(0)
    xq, xb = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(300, 5)).astype(np.float32)
    ids = rng.permutation(10_000)[:300]
    got = AB.corpus_topk(xq, xb, ids, 20)
    ref = ids[np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1)[:, :20]]
    np.testing.assert_array_equal(got, ref)


def test_summarize_equals_numpy_and_checks():
    metrics = ["list_teacher_recall@10", "auc"]
    vals = {0: (0.30, 0.40, 0.70), 1: (0.32, 0.37, 0.71), 2: (0.34, 0.45, 0.69)}  # (gt recall, mix recall, auc)
    per_seed = {s: {"prerank": {AB.GROUND_TRUTH: {"list_teacher_recall@10": g, "auc": a},
                                AB.MIX: {"list_teacher_recall@10": x, "auc": a - 0.01}}}
                for s, (g, x, a) in vals.items()}
    rows = AB.summarize(per_seed, metrics, ("prerank",), (AB.GROUND_TRUTH, AB.MIX))
    mix = rows[1]["values"]["list_teacher_recall@10"]
    assert mix["mean"] == pytest.approx(np.mean([0.40, 0.37, 0.45]))
    assert mix["std"] == pytest.approx(np.std([0.40, 0.37, 0.45], ddof=1))
    assert mix["n"] == 3 and rows[1]["per_seed"]["list_teacher_recall@10"] == [0.40, 0.37, 0.45]
    checks = AB.check_gains(rows, ["list_teacher_recall@10"], 0.10)
    # gt mean 0.32, mix mean 0.40667: relative gain 0.2708 >= 0.10
    (c,) = checks
    assert c["rel_gain"] == pytest.approx(0.40666666 / 0.32 - 1, rel=1e-6) and c["holds"]
    checks = AB.check_gains(rows, ["list_teacher_recall@10"], 0.30)
    assert checks[0]["beats"] and not checks[0]["holds"]
    # one seed: std is undefined (NaN), never a fake 0
    one = AB.mean_std([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and one["n"] == 1


def test_tiny_ablation_end_to_end(tmp_path):
    overrides = [f'run.runs_dir="{tmp_path / "runs"}"',
                 # tiny world and models (pipelines/tiny.toml sizes)
                 "data.world.n_users=500", "data.world.n_items=400", "data.world.n_days=4",
                 "data.world.mean_requests_per_user=6.0", "data.cross_window_days=3.0",
                 "teacher.lightgbm=false", "teacher.model.emb_dim=8", "teacher.model.mlp=[32, 16]",
                 "teacher.train.epochs=1", "teacher.train.batch_size=1024",
                 "ranklog.max_requests=600", "ranklog.n_candidates=50",
                 "students.tower.emb_dim=8", "students.tower.hidden=[16]", "students.tower.out_dim=8",
                 "students.prerank.epochs=1", "students.retrieval.epochs=1",
                 "students.retrieval.n_uniform_negatives=32",
                 "ablation.seeds=[0]", 'ablation.variants=["ground truth only", "+ bpr", "+ mix"]',
                 "ablation.n_test_requests=120", "ablation.n_corpus_requests=60", "ablation.n_pick=20"]
    cfg, settings = AB.load_ablation_config(ROOT / "pipelines" / "ablation.toml", overrides)
    result = AB.run_ablation(cfg, settings, "world")
    j, m = AB.write_ablation(result, tmp_path / "out", "ablation_world")
    data = json.loads(j.read_text())
    assert data["metrics"] == ["list_teacher_recall@10", "corpus_teacher_recall@10", "ndcg@10", "auc",
                               "oracle_clicks@10"]
    assert data["seeds"] == [0]
    assert [(r["stage"], r["name"]) for r in data["rows"]] == [
        (s, v) for s in ("prerank", "retrieval") for v in ("ground truth only", "+ bpr", "+ mix")]
    for r in data["rows"]:
        for metric, st in r["values"].items():
            assert set(st) == {"mean", "std", "n"} and st["n"] == 1 and st["std"] is None
            assert st["mean"] == pytest.approx(np.mean(r["per_seed"][metric]))
        v = {k: s["mean"] for k, s in r["values"].items()}
        assert 0 <= v["list_teacher_recall@10"] <= 1 and 0 <= v["corpus_teacher_recall@10"] <= 1
        assert 0 <= v["ndcg@10"] <= 1 and 0 < v["auc"] < 1
        # expected clicks of 10 items lie in (0, 10) and never exceed the oracle's best 10
        assert 0 < v["oracle_clicks@10"] <= data["reference"]["0"]["oracle_best_clicks@10"] + 1e-9
    ref = data["reference"]["0"]
    assert ref["n_test_requests"] == 120 and ref["n_corpus_requests"] == 60 and ref["n_candidates"] == 50
    # the checks compare every distilled variant with ground truth on both teacher-recall metrics
    assert len(data["checks"]) == 2 * 2 * 2
    md = m.read_text()
    assert "## prerank" in md and "## retrieval" in md and "+ bpr" in md
    # a second run reuses the cached test set and students and reproduces the values exactly
    again = AB.run_ablation(cfg, settings, "world")
    assert again["rows"][0]["per_seed"] == result["rows"][0]["per_seed"]
    assert again["wall_s"]["per_seed"]["0"]["students"]["prerank/+ bpr"] < 5.0
