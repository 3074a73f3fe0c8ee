"""Entire-space teacher: the unshown-item sampler, the training table and loss, the ranking score, the weight choice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cascade.arrays import PAD
from cascade.data.requests import request_start_ms
from cascade.models.entire_space import EntireSpaceRanker
from cascade.models.ranker import RankerConfig
from cascade.models.scoring import ranker_scorer, ranking_model, score_pairs
from cascade.run_data import load_ranker, ranker_config_json
from cascade.train.entire_space import choose_exposure_weight, entire_space_loss, entire_space_table, sample_unshown

CFG = RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(8,), cross_layers=1, cross_rank=2)


def test_sampler_never_draws_an_item_before_it_exists_nor_one_shown_in_the_request(tiny_data):
    data = tiny_data
    req, sampled, log_mq, log_mq_shown = sample_unshown(data, "train", 1.5, 0.5, np.random.default_rng(0))
    imp = data.impressions
    first = (imp.assign(start=request_start_ms(imp)).groupby("item_id").start.min())
    ok = sampled != PAD
    assert ok.any()
    t = np.broadcast_to(req.time_ms[:, None], sampled.shape)[ok]
    assert (first.loc[sampled[ok]].to_numpy() <= t).all()  # every sampled item was logged at or before t
    shown = data.split_impressions("train")
    pairs = set(zip(shown.request_id.to_numpy().tolist(), shown.item_id.to_numpy().tolist()))
    rid = np.broadcast_to(req.request_id[:, None], sampled.shape)[ok]
    assert not any((int(r), int(i)) in pairs for r, i in zip(rid, sampled[ok]))
    # no repeats within a request; round(1.5 x impressions) per request where the corpus allows it
    for row in sampled[:50]:
        vals = row[row != PAD]
        assert len(set(vals.tolist())) == len(vals)
    n_imp = shown.groupby("request_id").size().reindex(req.request_id).to_numpy()
    got = ok.sum(axis=1)
    assert np.mean(got == np.maximum(1, np.round(1.5 * n_imp))) > 0.99
    assert np.isfinite(log_mq[ok]).all() and len(log_mq_shown) == len(shown)


def test_uniform_sampler_log_mq_is_log_m_over_corpus(tiny_data):
    req, sampled, log_mq, log_mq_shown = sample_unshown(tiny_data, "train", 1.0, 0.0, np.random.default_rng(1))
    m = (sampled != PAD).sum(axis=1)
    n_items = len(tiny_data.item_ids)
    full = m == np.maximum(1, np.round(tiny_data.split_impressions("train").groupby("request_id").size()
                                       .reindex(req.request_id).to_numpy()))
    row = np.flatnonzero(full)[0]
    # q(i) = 1 / I for every item: log(m q) = log(m / I)
    np.testing.assert_allclose(log_mq[row, : m[row]], np.log(m[row] / n_items), rtol=1e-6)


def test_table_rows_and_loss(tiny_data):
    table = entire_space_table(tiny_data, "train", 1.0, 0.5, np.random.default_rng(2))
    base = tiny_data.encoded("train")
    n_unshown = len(table) - len(base)
    assert n_unshown > 0.9 * len(base)
    assert table.extra["shown"][: len(base)].min() == 1 and table.extra["shown"][len(base):].max() == 0
    assert table.label[len(base):].max() == 0
    # a sampled row's features are the serving path's features of that (request, item)
    model = EntireSpaceRanker(table.spec, CFG, seed=0)
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in
             {"cat": table.cat, "num": table.num, "label": table.label, **table.extra}.items()}
    terms, weights = entire_space_loss(2.0)(model, batch, 0)
    with torch.no_grad():
        c = model.click(batch["cat"], batch["num"])
        e = model.exposure(batch["cat"], batch["num"])
        shown = batch["shown"].bool()
        want_bce = F.binary_cross_entropy_with_logits(c[shown], batch["label"][shown].float())
        want_exp = F.binary_cross_entropy_with_logits(e - batch["log_mq"], batch["shown"])
    assert terms["bce"].item() == pytest.approx(want_bce.item(), rel=1e-5)
    assert terms["exposure"].item() == pytest.approx(want_exp.item(), rel=1e-5)
    assert weights == {"bce": 1.0, "exposure": 2.0}


def test_rank_score_save_load_and_list_scoring(tiny_data, tmp_path):
    from cascade import artifacts as A

    spec = tiny_data.spec
    model = EntireSpaceRanker(spec, CFG, seed=3).eval()
    with torch.no_grad():
        model.exposure_weight.fill_(0.5)
    req = tiny_data.split_impressions("test").head(40)
    cand = np.ascontiguousarray(np.broadcast_to(tiny_data.item_ids[:60], (3, 60)))
    from cascade.data.requests import requests_frame, to_requests

    r = to_requests(requests_frame(req, tiny_data.context_names).head(3), tiny_data.context_names)
    cat, num = tiny_data.pair_features(r, cand)
    with torch.no_grad():
        want = F.logsigmoid(model.click(torch.from_numpy(cat), torch.from_numpy(num))) + 0.5 * model.exposure(
            torch.from_numpy(cat), torch.from_numpy(num))
    got = ranker_scorer(model, tiny_data)(r, cand).reshape(-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    # forward_lists (many lists per pass) gives the same scores
    lists = score_pairs(ranking_model(model), np.tile(cat, (8, 1)), np.tile(num, (8, 1)), list_len=60)
    np.testing.assert_allclose(lists[: len(got)], got, rtol=1e-4, atol=1e-5)
    # forward is the click model (AUC, KD), and the model round-trips through the pipeline's files
    assert torch.equal(model(torch.from_numpy(cat), torch.from_numpy(num)),
                       model.click(torch.from_numpy(cat), torch.from_numpy(num)))
    A.save_torch(tmp_path / "model.pt", model.state_dict())
    A.write_json(tmp_path / "config.json", ranker_config_json(model, CFG))
    back = load_ranker(tmp_path, spec)
    assert isinstance(back, EntireSpaceRanker) and back.exposure_weight.item() == 0.5
    np.testing.assert_allclose(ranker_scorer(back, tiny_data)(r, cand).reshape(-1), got, rtol=1e-6)
    # weight 0: the click model's log sigmoid alone, without running the exposure model (which would fail here)
    with torch.no_grad():
        back.exposure_weight.fill_(0.0)
        click_only = F.logsigmoid(back.click(torch.from_numpy(cat), torch.from_numpy(num))).numpy()

    def no_exposure(*args):
        raise AssertionError("the exposure model ran at weight 0")

    back.exposure.forward = back.exposure.forward_lists = no_exposure
    np.testing.assert_allclose(ranker_scorer(back, tiny_data)(r, cand).reshape(-1), click_only, rtol=1e-5, atol=1e-6)
    lists = score_pairs(ranking_model(back), np.tile(cat, (8, 1)), np.tile(num, (8, 1)), list_len=60)
    np.testing.assert_allclose(lists[: len(got)], click_only, rtol=1e-4, atol=1e-5)


def test_choose_exposure_weight_picks_the_known_best(tiny_data):
    """A constructed case: the click model ranks every item alike, the exposure model knows the clicked items (one
    per request, the same 20 for all). Weight 0 leaves the order to ties (lowest ids first); any weight > 0 puts
    the clicked items on top."""
    data = tiny_data
    model = EntireSpaceRanker(data.spec, CFG, seed=0)
    from cascade.data.requests import requests_frame, to_requests

    valid = data.split_impressions("valid")
    frame = requests_frame(valid, data.context_names).head(20)
    req = to_requests(frame, data.context_names)
    item_col = data.spec.cat_names.index("item_id")
    all_items = np.ascontiguousarray(data.item_ids[None, :])
    all_codes = data.pair_features(req.take(np.arange(1)), all_items)[0][:, item_col]
    # 20 items with their own vocabulary code (rare ids share the OOV code 0), the last ones: last under ties
    own = np.flatnonzero(all_codes > 0)[-20:]
    clicked = data.item_ids[own][:, None].copy()

    class Const(torch.nn.Module):
        def forward(self, cat, num):
            return torch.zeros(len(cat))

    class Knows(torch.nn.Module):  # +5 for the 20 clicked items, keyed by the item id column
        def forward(self, cat, num):
            return 5.0 * torch.isin(cat[:, item_col], torch.from_numpy(codes)).float()

    codes = all_codes[own]

    model.click = Const()
    model.exposure = Knows()
    choice, table = choose_exposure_weight(model, data, req, clicked, [0.0, 0.5, 1.0, 2.0], k=20)
    assert choice == 1.0  # 0.5, 1 and 2 tie: the one-SE rule takes the product rule's weight among them
    recall = {row["exposure_weight"]: row["valid_click_recall@20"] for row in table}
    assert recall[0.0] == 0.0 and recall[0.5] == recall[1.0] == recall[2.0] == 1.0
    assert model.exposure_weight.item() == 1.0
    # blocks of requests scored two at a time give the same table (the blocks: 2 requests each here)
    _, table2 = choose_exposure_weight(model, data, req, clicked, [0.0, 0.5, 1.0, 2.0], k=20,
                                       pairs_per_batch=2 * len(data.item_ids), workers=2)
    assert [(r["exposure_weight"], r["valid_click_recall@20"]) for r in table2] == \
        [(r["exposure_weight"], r["valid_click_recall@20"]) for r in table]
    choice, _ = choose_exposure_weight(model, data, req, clicked, [0.0, 0.25, 0.5], k=20)
    assert choice == 0.5 and model.exposure_weight.item() == 0.5  # without 1 in the grid: the closest tie


def test_exposure_weight_by_random_auc_matches_sklearn_and_takes_the_best(tiny_data):
    """Each weight's AUC equals scikit-learn's on the validation random-exposure impressions scored by hand, and the
    choice is the best one (the model is untrained: only the arithmetic is under test)."""
    from sklearn.metrics import roc_auc_score

    from cascade.data.requests import impression_requests
    from cascade.train.entire_space import choose_exposure_weight_by_random_auc

    data = tiny_data
    model = EntireSpaceRanker(data.spec, CFG, seed=5).eval()
    grid = [0.0, 0.5, 2.0]
    choice, table = choose_exposure_weight_by_random_auc(model, data, grid)
    r = data.split_impressions("valid").query("is_rand == 1")
    cat, num = data.pair_features(impression_requests(r, data.context_names), r.item_id.to_numpy(np.int64)[:, None])
    with torch.no_grad():
        lc = F.logsigmoid(model.click(torch.from_numpy(cat), torch.from_numpy(num))).numpy()
        le = model.exposure(torch.from_numpy(cat), torch.from_numpy(num)).numpy()
    want = [roc_auc_score(r.click.to_numpy(), lc + b * le) for b in grid]
    assert [row["valid_random_auc"] for row in table] == pytest.approx(want, abs=1e-6)
    assert len(set(np.round(want, 6))) == 3  # the weights really rank differently
    # the one-SE rule: the smallest weight whose AUC is within one (bootstrapped) SE of the best
    best = max(want)
    assert choice == min(b for b, w, row in zip(grid, want, table) if best - w <= row["se_of_gap"] + 1e-12)
    assert all(row["se_of_gap"] > 0 for row, w in zip(table, want) if w != best)
    assert float(model.exposure_weight) == choice


def test_random_auc_judge_refuses_data_without_a_random_slice_and_a_bad_value(tiny_data):
    from cascade.pipeline.config import EntireSpaceSection
    from cascade.train.entire_space import random_slice

    logged = tiny_data.split_impressions("valid").query("is_rand == 0")
    with pytest.raises(ValueError, match=r"0 random-exposure impressions.*judge = \"clicks\""):
        random_slice(logged, 'teacher.entire_space.judge = "random_auc"')
    with pytest.raises(ValueError, match="judge must be 'auto', 'clicks' or 'random_auc', got 'auc'"):
        EntireSpaceSection(judge="auc")


def test_a_random_slice_needs_random_rows_with_both_labels_from_two_requests():
    """Two requests at least: the choices' SEs are bootstrapped over requests, and a slice of one request resampled
    to itself, an SE of 0 that made every gap "beyond one SE" (a custom log's 7 random impressions of one request)."""
    from cascade.train.entire_space import has_random_slice, random_slice

    frame = pd.DataFrame({"request_id": [0, 1, 2, 0], "is_rand": [0, 1, 1, 0], "click": [1, 0, 1, 0]})
    assert has_random_slice(frame)
    assert not has_random_slice(frame.assign(click=[1, 0, 0, 1]))  # the random rows hold one label only
    one = frame.assign(request_id=[0, 1, 1, 0])  # both labels, one request
    assert not has_random_slice(one)
    with pytest.raises(ValueError, match="the validation split has 2 random-exposure impressions from 1 request: no "
                                         "random-slice AUC to judge by"):
        random_slice(one, "x")
    assert not has_random_slice(frame.assign(is_rand=0)) and not has_random_slice(frame.drop(columns="is_rand"))
    from cascade.pipeline.teacher import exposure_judge

    assert exposure_judge("auto", frame) == "random_auc" and exposure_judge("auto", frame.assign(is_rand=0)) == "clicks"
    assert exposure_judge("clicks", frame) == "clicks" and exposure_judge("random_auc", frame) == "random_auc"
    with pytest.raises(ValueError, match="0 random-exposure impressions"):
        exposure_judge("random_auc", frame.assign(is_rand=0))


def test_random_auc_judge_takes_the_smallest_weight_among_those_it_cannot_tell_apart(tiny_data):
    """An exposure model that says nothing (every parameter 0: the same logit for every row) gives every weight the
    click model's AUC; the random-slice judge then keeps 0 (no exposure term), where leaning to the product rule
    would have taken 1."""
    from cascade.train.entire_space import choose_exposure_weight_by_random_auc

    model = EntireSpaceRanker(tiny_data.spec, CFG, seed=5).eval()
    with torch.no_grad():
        for p in model.exposure.parameters():
            p.zero_()
    choice, table = choose_exposure_weight_by_random_auc(model, tiny_data, [0.0, 0.5, 1.0, 2.0])
    assert len({row["valid_random_auc"] for row in table}) == 1 and all(row["within_one_se"] for row in table)
    assert choice == 0.0 and float(model.exposure_weight) == 0.0 and not model.uses_exposure


def test_teacher_step_with_the_random_auc_judge_records_its_grid(tmp_path):
    from pathlib import Path

    from cascade import artifacts as A
    from cascade.pipeline import load_config, run_pipeline

    tiny = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
    cfg = load_config(tiny, [f"run.runs_dir={str(tmp_path)!r}", 'teacher.entire_space.judge="random_auc"'])
    run_pipeline(cfg, until="teacher", progress=False)
    es = A.read_json(tmp_path / cfg.run.name / "teacher" / "manifest.json")["metrics"]["entire_space"]
    assert "random-exposure impressions" in es["judge"]
    aucs = {row["exposure_weight"]: row["valid_random_auc"] for row in es["grid"]}
    assert set(aucs) == set(cfg.teacher.entire_space.exposure_weights)
    best = max(aucs.values())  # the one-SE rule: the smallest weight within one SE of the best AUC
    within = [row["exposure_weight"] for row in es["grid"]
              if best - row["valid_random_auc"] <= row["se_of_gap"] + 1e-12]
    assert es["exposure_weight"] == min(within)
    assert all(0.0 < a < 1.0 for a in aucs.values())


def test_teacher_step_refuses_an_unknown_exposure_exclude_column_and_records_the_exposure_config(tmp_path):
    from pathlib import Path

    from cascade import artifacts as A
    from cascade.pipeline import load_config, run_pipeline

    tiny = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
    cfg = load_config(tiny, [f"run.runs_dir={str(tmp_path)!r}", 'teacher.entire_space.exposure_exclude=["no_such"]'])
    with pytest.raises(ValueError, match=r"teacher.entire_space.exposure_exclude names \['no_such'\]"):
        run_pipeline(cfg, until="teacher", progress=False)
    assert not (tmp_path / cfg.run.name / "teacher" / "teacher" / "model.pt").exists()
    cfg = load_config(tiny, [f"run.runs_dir={str(tmp_path)!r}"])  # the default: the exposure model without item_id
    run_pipeline(cfg, until="teacher", progress=False, update=True)
    saved = A.read_json(tmp_path / cfg.run.name / "teacher" / "teacher" / "config.json")
    assert saved["exposure"]["exclude"] == ["item_id"] and saved["ranker"]["exclude"] == []
