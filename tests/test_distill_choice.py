"""Distillation chosen on validation outcomes: the grid search finds the known-best scale, and the teacher gate
fires on a useless teacher. A constructed world (worlds.tower_world): a teacher that IS the users' preference, or
one that is noise; sparse noisy clicks; validation judged by click-recall over the whole corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade.arrays import topk_rows
from cascade.distill.ranklog import RankLog, build_rank_log, sample_candidates
from cascade.eval.metrics import click_recall
from cascade.models.two_tower import TowerConfig, build_two_tower, item_embeddings
from cascade.pipeline.students import auc_gate, choose_scale, teacher_gate, train_grid
from cascade.train.students import ClickLists, StudentConfig, train_student
from worlds import tower_world

SMALL = TowerConfig(emb_dim=8, hidden=(32,), out_dim=16)
N = 25  # the "stage size" at which validation click-recall is judged


def _setup(tmp_path, useless_teacher: bool, seed: int = 0):
    inputs, teacher, requests, imp, n_train, rng = tower_world(seed)
    log_teacher = teacher
    if useless_teacher:  # scores unrelated to the users: noise
        noise = np.random.default_rng(99)

        def log_teacher(rows, items):
            return noise.normal(size=items.shape).astype(np.float32)

    cand = sample_candidates(imp, inputs.n_items, 50, rng=rng)
    train = (np.arange(len(requests)) < n_train)[:, None]
    build_rank_log(requests, np.where(train, cand, -1), log_teacher, tmp_path / "log", progress=False)
    # sparse, noisy clicks on the training impressions (about 1 in 15), from the true preference
    t = teacher(np.arange(n_train), imp[:n_train])
    z = (t - t.mean()) / t.std()
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-(1.5 * z - 3.5)))).astype(np.float32)
    users = requests["user_row"].to_numpy()[:n_train]
    clicks = ClickLists(np.arange(n_train), users, imp[:n_train].astype(np.int64), y)
    # validation: each held-out request "clicks" the 3 items it prefers most among its 20 impressions
    valid = np.arange(n_train, len(requests))
    pref = teacher(valid, imp[valid])
    clicked = np.take_along_axis(imp[valid], np.argsort(-pref, axis=1)[:, :3], 1).astype(np.int64)
    # the (log) teacher's own top-N over the corpus for the validation requests
    full = log_teacher(valid, np.broadcast_to(np.arange(inputs.n_items), (len(valid), inputs.n_items)))
    t_lists, _ = topk_rows(full, np.broadcast_to(np.arange(inputs.n_items), full.shape), N)
    return inputs, RankLog(tmp_path / "log"), clicks, valid, clicked, t_lists


def _search(inputs, rank_log, clicks, valid, clicked, scales):
    users = valid % inputs.n_users

    def train(scale):
        tt = build_two_tower(inputs, SMALL, seed=0)
        cfg = StudentConfig(loss_weights={"click_bce": 1.0, "pointwise": 1.0, "bpr": 1.0, "lambda_ndcg": 1.0},
                            distill_scale=scale, epochs=5, batch_size=100, lr=1e-2, seed=0)
        train_student(tt, inputs, rank_log if scale else None, clicks, cfg)
        return tt

    def recall(tt):
        v = torch.from_numpy(item_embeddings(tt.item_tower, inputs.item_cat, inputs.item_num))
        with torch.no_grad():
            s = tt.score(tt.user_tower(*inputs.user_batch(users, valid)), v).numpy()
        top, _ = topk_rows(s, np.broadcast_to(np.arange(inputs.n_items), s.shape), N)
        return click_recall(clicked, top)

    per_request = {}  # id(tower) -> its per-request validation click-recall, computed once

    def statistic(tt, units):
        if id(tt) not in per_request:
            per_request[id(tt)] = recall(tt)
        return float(np.mean(per_request[id(tt)][units]))

    models = train_grid(scales, train, statistic, len(valid))
    best, table, _ = choose_scale(models, statistic, len(valid), 0, teacher_better=False)
    return (best, table, models), recall


def test_grid_search_picks_distillation_from_a_teacher_that_knows(tmp_path):
    inputs, rank_log, clicks, valid, clicked, t_lists = _setup(tmp_path, useless_teacher=False)
    (best, table, models), recall = _search(inputs, rank_log, clicks, valid, clicked, [0.0, 1.0])
    score = {row["scale"]: row["score"] for row in table}
    # the teacher is the preference itself and the clicks are sparse: distilling must win clearly (observed:
    # 0.271 vs 0.163 at N = 25 of 500 items; the teacher's own list 0.327)
    assert best == 1.0 and score[1.0] > score[0.0] + 0.05, score
    gate = teacher_gate(click_recall(clicked, t_lists), recall(models[0.0]))
    assert gate["teacher_better"] and gate["gain"] > 3 * gate["standard_error"], gate


def test_gate_fires_and_search_refuses_a_useless_teacher(tmp_path):
    inputs, rank_log, clicks, valid, clicked, t_lists = _setup(tmp_path, useless_teacher=True)
    (best, table, models), recall = _search(inputs, rank_log, clicks, valid, clicked, [0.0, 1.0])
    score = {row["scale"]: row["score"] for row in table}
    assert best == 0.0 and score[0.0] > score[1.0], score  # copying noise only loses clicks (0.163 vs 0.063)
    gate = teacher_gate(click_recall(clicked, t_lists), recall(models[0.0]))
    assert not gate["teacher_better"] and gate["gain"] < 0, gate


def test_grid_search_ties_go_to_the_reference_and_gate_hand_worked():
    # a constant score has no noise: 0 loses by 0.1 beyond its SE of 0, 0.5 and 1 tie the best: without the gate the
    # smaller scale is served, with it the configured scale 1
    def constant(s, units):
        return 0.5 if s > 0 else 0.4

    models = train_grid([1.0, 0.0, 0.5], lambda s: s, constant, 5)
    best, table, reference = choose_scale(models, constant, 5, 0, teacher_better=False)
    assert best == 0.5 and reference == 0.0 and [r["scale"] for r in table] == [0.0, 0.5, 1.0] and models[1.0] == 1.0
    assert [r["within_one_se"] for r in table] == [False, True, True] and table[0]["gap"] == pytest.approx(0.1)
    assert choose_scale(models, constant, 5, 0, teacher_better=True)[::2] == (1.0, 1.0)
    # the gate does not overrule the validation split: 0 within one SE of the best, 0.25 beyond it
    assert choose_scale({0.0: 0.0, 0.25: 0.25}, lambda s, u: 0.5 if s == 0 else 0.4, 5, 0, True)[0] == 0.0
    # a score that keeps rising with the scale: the grid is widened (a model trained) while its top scores best
    trained = []

    def rising(s, units):
        return min(s, 4.0) / 10

    models = train_grid([0.0, 1.0], lambda s: trained.append(s) or s, rising, 5, doublings=5)
    best, table, _ = choose_scale(models, rising, 5, 0, teacher_better=False)
    assert trained == [0.0, 1.0, 2.0, 4.0, 8.0] and [r["scale"] for r in table] == trained and best == 4.0
    # gains 0.1, 0.3, -0.1 (the nan request left out): mean 0.1, sd 0.2, se 0.2 / sqrt(3) = 0.1155 > 0.1
    g = teacher_gate(np.array([0.5, 0.6, 0.2, np.nan]), np.array([0.4, 0.3, 0.3, 0.1]))
    assert g["gain"] == pytest.approx(0.1) and g["standard_error"] == pytest.approx(0.2 / np.sqrt(3))
    assert not g["teacher_better"]
    assert teacher_gate(np.array([0.5, 0.6, 0.7]), np.array([0.4, 0.5, 0.55]))["teacher_better"]


def test_random_slice_gate_by_auc_matches_sklearn_and_fires_on_a_useless_teacher():
    """The gate where validation has a random-exposure slice: AUC of both models on the same impressions, paired
    over requests. Over 3 seeds: a teacher that sees the click signal beats a student that sees half of it beyond
    its bootstrap SE; a teacher of pure noise is not better (the gate fires)."""
    from sklearn.metrics import roc_auc_score

    for seed in range(3):
        rng = np.random.default_rng(seed)
        n, per = 4000, 10
        z = rng.standard_normal(n)
        y = (rng.random(n) < 1 / (1 + np.exp(-2 * z))).astype(np.float64)
        request = np.repeat(rng.permutation(n // per), per)  # requests interleaved in no order
        informed, half = z + 0.1 * rng.standard_normal(n), z + 2.0 * rng.standard_normal(n)
        g = auc_gate(y, informed, half, request, seed)
        assert g["teacher"] == pytest.approx(roc_auc_score(y, informed))
        assert g["ground_truth_student"] == pytest.approx(roc_auc_score(y, half))
        assert g["judged_by"] == "random_auc" and g["impressions"] == n
        assert g["teacher_better"] and g["gain"] > 3 * g["standard_error"], g
        useless = auc_gate(y, rng.standard_normal(n), half, request, seed)
        assert not useless["teacher_better"] and useless["gain"] < 0, useless


def test_trusted_requests_hand_worked(tmp_path):
    """Confidence-aware distillation trusts a request's list when the teacher ordered its impressed items at least
    as well as chance. Request 0: the clicked item scored highest (AUC 1); request 1: the clicked item scored lowest
    (AUC 0); request 2: no click (cannot be checked: trusted); request 3: a tie between the clicked and a non-clicked
    item and one below (AUC (0.5 + 1) / 2 = 0.75)."""
    import pandas as pd

    from cascade.pipeline.students import trusted_requests

    zeros = np.zeros(4, np.int64)
    frame = pd.DataFrame({"request_id": np.arange(4), "user_id": zeros, "user_row": zeros, "time_ms": np.arange(4)})
    cand = np.array([[0, 1, 2, 5], [0, 1, 2, 6], [0, 1, 2, 7], [0, 1, 2, 8]])
    logits = {0: [3.0, 1.0, 0.0, 9.0], 1: [0.0, 2.0, 1.0, 9.0], 2: [1.0, 0.0, 2.0, 9.0], 3: [1.0, 1.0, 0.0, 9.0]}

    def scorer(rows, c):
        return np.array([logits[int(r)] for r in rows], np.float32)

    build_rank_log(frame, cand, scorer, tmp_path / "log", progress=False)
    # impressions: items 0, 1, 2 of each request; item 0 clicked in requests 0, 1 and 3
    clicks = ClickLists(np.arange(4), np.zeros(4, np.int64), np.tile([0, 1, 2], (4, 1)),
                        np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]], np.float32))
    np.testing.assert_array_equal(trusted_requests(RankLog(tmp_path / "log"), clicks, 4), [True, False, True, True])


def test_kd_temperature_read_set_and_chosen_hand_worked():
    """The towers' KD temperature: read from the weighted listnet term (1 unless loss_params sets it; None without
    such a term), set by with_kd_temperature, and chosen at the chosen scale by the one-SE rule leaning to the
    configured temperature."""
    from cascade.pipeline.config import StudentsSection
    from cascade.pipeline.students import choose_temperature
    from cascade.train.students import kd_temperature, with_kd_temperature

    c = StudentsSection()
    assert kd_temperature(c.retrieval) == 1.0 and kd_temperature(c.prerank) is None
    hot = with_kd_temperature(c.retrieval, 2.0)
    assert kd_temperature(hot) == 2.0 and hot.loss_params["listnet"] == {"temperature": 2.0}
    assert kd_temperature(c.retrieval) == 1.0  # the original is left as it was
    assert with_kd_temperature(c.prerank, 2.0).loss_params == {}  # no term with a temperature: nothing set

    trained = []

    def train_at(t):
        trained.append(t)
        return t

    # constant scores have no noise: 0.5 ties 1 (the configured one is kept), 2 is beyond one SE below
    model, rec = choose_temperature(1.0, 1.0, 1.0, (0.5, 1.0, 2.0), train_at,
                                    lambda t, units: 0.3 if t == 2.0 else 0.4, 5, 0, "valid_auc")
    assert trained == [0.5, 2.0] and model == 1.0 and rec["chosen"] == 1.0 and rec["searched"]
    assert [(r["temperature"], r["within_one_se"]) for r in rec["grid"]] == [(0.5, True), (1.0, True), (2.0, False)]
    assert rec["grid"][2]["gap_to_best"] == pytest.approx(0.1)
    # a temperature better beyond one SE is served
    model, rec = choose_temperature(1.0, 1.0, 1.0, (0.5, 2.0), lambda t: t,
                                    lambda t, units: 0.5 if t == 2.0 else 0.4, 5, 0, "valid_auc")
    assert model == 2.0 and rec["chosen"] == 2.0
    # nothing searched: no temperature term, scale 0, or the configured temperature alone
    for args, why in (((None, (0.5, 2.0)), "no distillation term with a temperature"),
                      ((1.0, (1.0,)), "the grid holds the configured temperature alone")):
        model, rec = choose_temperature("m", 1.0, *args, lambda t: pytest.fail("trained"), None, 5, 0, "k")
        assert model == "m" and rec == {"configured": args[0], "searched": False, "why": why}
    assert choose_temperature("m", 0.0, 1.0, (0.5,), lambda t: pytest.fail("trained"), None, 5, 0, "k")[1]["why"] \
        == "scale 0 (no distillation)"
