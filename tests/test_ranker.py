"""Rank-stage models: layers, Ranker backbones, LightGBM baseline.

The synthetic table plants a signal that needs both an interaction and the cross side: the true click logit is
    z = 1.5 * W[user_group, item_cat] + 1.0 * cross_num - 0.5,  W ~ N(0, 1) (a 6 x 6 table),
so a model must learn a user-side x item-side interaction (not separable per side) and read the "cross"
numeric. The "privileged" numeric is priv = z + N(0, 0.3^2): it carries the click probability (like post-click
watch time carries satisfaction), so a teacher that reads it is close to the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cascade.data.batches import FeatureSpec
from cascade.models.layers import MLP, CrossNetV2, FactorizationMachine, FeatureEmbedding, in_autocast_dtype
from cascade.models.ranker import Ranker, RankerConfig, n_parameters, serving_latency
from worlds import N_ITEMS, SPEC, make_table

# ------------------------------------------------------------------------------------------------ layers


def test_factorization_machine_hand_value():
    # fields v1 = [1, 2], v2 = [3, 0], v3 = [0, 1]: sum_{i<j} <v_i, v_j> = (3 + 0) + (0 + 2) + (0 + 0) = 5
    f = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]]])
    assert FactorizationMachine()(f).item() == pytest.approx(5.0)


def test_crossnet_v2_matches_formula():
    torch.manual_seed(0)
    net = CrossNetV2(4, 2)
    x0 = torch.randn(3, 4)
    x1 = x0 * (x0 @ net.layers[0].weight.T + net.layers[0].bias) + x0
    x2 = x0 * (x1 @ net.layers[1].weight.T + net.layers[1].bias) + x1
    torch.testing.assert_close(net(x0), x2)


def test_crossnet_v2_low_rank_matches_formula():
    torch.manual_seed(0)
    net = CrossNetV2(6, 2, rank=2)
    x0 = torch.randn(3, 6)
    x = x0
    for layer in net.layers:
        u, v = layer[1].weight, layer[0].weight  # W = U V^T with U [6, 2], V^T [2, 6]
        x = x0 * (x @ (u @ v).T + layer[1].bias) + x
    torch.testing.assert_close(net(x0), x)
    # 2 layers x (6*2 + 2*6 + 6 bias) = 60 weights instead of 2 x (36 + 6) = 84
    assert sum(p.numel() for p in net.parameters()) == 60


def test_cross_layers_run_in_the_autocast_dtype():
    x = torch.randn(3, 4)
    assert in_autocast_dtype(x) is x  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert in_autocast_dtype(x).dtype == torch.bfloat16
    # the cross layers under bf16 autocast: the formula's values at bf16 precision, in bf16, in inference and in
    # training (the gradient reaches x0 in float32)
    torch.manual_seed(0)
    net = CrossNetV2(6, 2, rank=2)
    x0 = torch.randn(64, 6, requires_grad=True)
    ref = net(x0)
    ref.sum().backward()
    g_ref, x0.grad = x0.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x0)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    low.float().sum().backward()
    assert x0.grad.dtype == torch.float32
    torch.testing.assert_close(x0.grad, g_ref, rtol=0.05, atol=0.05)


def test_feature_embedding_selects_sides_and_maps_bad_codes_to_oov():
    emb = FeatureEmbedding(SPEC, ("item", "cross"), emb_dim=4, numeric="linear")
    # item side: item_id, item_cat (cat) + item_pop (num); cross: cross_num -> 4 fields
    assert emb.field_names == ("item_id", "item_cat", "item_pop", "cross_num")
    cat = torch.tensor([[1, 1, 5, 2, 3], [1, 1, 10**6, -3, 3]])
    num = torch.tensor([[0.5, 2.0, 9.0], [0.0, 0.0, 9.0]])
    fields, dense = emb(cat, num)
    assert fields.shape == (2, 4, 4) and dense.shape == (2, 0)
    table = emb.table.weight
    # item_id rows start at offset 0, item_cat rows at offset N_ITEMS + 1
    torch.testing.assert_close(fields[0, 0], table[5])
    torch.testing.assert_close(fields[0, 1], table[N_ITEMS + 1 + 2])
    # out-of-range codes fall back to each column's own OOV row (offset + 0), never a neighbour's rows
    torch.testing.assert_close(fields[1, 0], table[0])
    torch.testing.assert_close(fields[1, 1], table[N_ITEMS + 1])
    # numeric field j = x_j * v_j + b_j: the cross field of row 0 is 2.0 * v + b
    torch.testing.assert_close(fields[0, 3], 2.0 * emb.num_weight[1] + emb.num_bias[1])
    raw = FeatureEmbedding(SPEC, ("item", "cross"), emb_dim=4, numeric="raw")
    f2, d2 = raw(cat, num)
    assert f2.shape == (2, 2, 4)
    torch.testing.assert_close(d2, num[:, :2])


def test_mlp_shapes():
    assert MLP(10, (8, 4), dropout=0.1, batch_norm=True)(torch.randn(5, 10)).shape == (5, 4)
    assert MLP(10, ())(torch.randn(5, 10)).shape == (5, 10)


# ------------------------------------------------------------------------------------------------ ranker


@pytest.mark.parametrize("cfg", [
    RankerConfig(backbone="dnn", emb_dim=4, mlp=(16, 8)),
    RankerConfig(backbone="deepfm", emb_dim=4, mlp=(16, 8), batch_norm=True, dropout=0.1),
    RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_structure="stacked"),
    RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_structure="parallel", numeric="raw"),
    RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_rank=3),
])
def test_ranker_forward_shapes(cfg):
    t = make_table(40, seed=1)
    model = Ranker(SPEC, cfg)
    logits, hidden = model.forward_hidden(torch.as_tensor(t.cat), torch.as_tensor(t.num))
    assert logits.shape == (40,)
    assert hidden.shape == (40, model.hidden_dim)
    # default sides read 4 cat + 2 num columns (not the privileged one)
    n_fields = 5 + (2 if cfg.numeric == "linear" else 0)
    assert model.in_dim == n_fields * 4 + (2 if cfg.numeric == "raw" else 0)
    if cfg.cross_structure == "parallel" and cfg.backbone == "dcnv2":
        assert model.hidden_dim == 8 + model.in_dim


@pytest.mark.parametrize("cfg, factored", [
    (RankerConfig(backbone="dnn", emb_dim=4, mlp=(16, 8)), True),
    (RankerConfig(backbone="dnn", emb_dim=4, mlp=(16, 8), batch_norm=True), True),
    (RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_structure="stacked"), True),
    (RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_structure="parallel", cross_layers=2), True),
    (RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_structure="parallel", cross_rank=3), True),
    (RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16,), cross_rank=3,
                  sides=("user", "item", "context", "cross", "privileged")), True),
    (RankerConfig(backbone="deepfm", emb_dim=4, mlp=(16, 8)), False),
    (RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), numeric="raw"), False),
])
def test_forward_lists_equals_forward(cfg, factored):
    """Candidate lists (blocks of 10 rows sharing user and hour): the factored forward computes the same logits.
    Every parameter is perturbed first (biases start at 0, and a wrong column permutation must show)."""
    t = make_table(60, seed=3)
    model = Ranker(SPEC, cfg, seed=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    model.eval()
    cat, num = torch.as_tensor(t.cat), torch.as_tensor(t.num)
    assert model.supports_lists() == factored
    with torch.inference_mode():
        want = model(cat, num)
        got = model.forward_lists(cat, num, 10)
    assert want.std() > 0.1  # the perturbed model's logits really vary
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if factored:
        # the request-level columns are read from each list's first row only: that is the factoring
        cat2 = cat.clone()
        cat2[1::10, 0] = 7  # user_id of the 2nd row of every list
        torch.testing.assert_close(model.forward_lists(cat2, num, 10), want, rtol=1e-5, atol=1e-5)
    # the permuted weights are cached between calls: an in-place update (an optimizer step) must invalidate them
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_lists(cat, num, 10), model(cat, num), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(cat, num), want)
    with pytest.raises(ValueError, match="whole lists"):
        model.forward_lists(cat, num, 7)


def test_ranker_ignores_privileged_unless_asked():
    t = make_table(40, seed=1)
    cat, num = torch.as_tensor(t.cat), torch.as_tensor(t.num)
    num2 = num.clone()
    num2[:, 2] += 100.0
    plain = Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,)))
    torch.testing.assert_close(plain(cat, num), plain(cat, num2))
    pfd = Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,), sides=("user", "item", "context", "cross", "privileged")))
    assert not torch.allclose(pfd(cat, num), pfd(cat, num2))


def test_ranker_seed_reproduces_init_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,)), seed=5)
    after = torch.rand(1)
    b = Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,)), seed=5)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_n_parameters_hand_count():
    spec = FeatureSpec(("u", "i"), ("user", "item"), (3, 4), ("c",), ("cross",))
    m = Ranker(spec, RankerConfig(emb_dim=2, mlp=(3,)))
    # embedding table (3 + 4) * 2 = 14; numeric weight + bias 2 + 2 = 4; MLP in = 3 fields * 2 = 6:
    # 6 * 3 + 3 = 21; output 3 + 1 = 4 -> 43
    assert n_parameters(m) == 43
    ms = serving_latency(m, n_candidates=100, repeats=3, warmup=1)
    assert 0 < ms < 1000


def test_ranker_config_strict():
    with pytest.raises(ValueError, match="unknown key"):
        RankerConfig.from_dict({"backbone": "dnn", "mlpp": [8]})
    with pytest.raises(ValueError, match="backbone"):
        RankerConfig(backbone="wide")
    cfg = RankerConfig(backbone="dcnv2", mlp=(8, 4))
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------- training effects


@pytest.fixture(scope="module")
def data():
    return make_table(6000, seed=11), make_table(3000, seed=12)


def _fit_auc(cfg, data, epochs=3, seed=0):
    from cascade.train.loop import TrainConfig, evaluate, fit

    train, valid = data
    model = Ranker(SPEC, cfg, seed=seed)
    fit(model, train, valid, TrainConfig(lr=0.01, batch_size=256, epochs=epochs, patience=2, seed=seed))
    return evaluate(model, valid)["auc"]


def test_backbones_learn_the_planted_signal(data):
    # oracle AUC (true logit) on this valid table is ~0.80; a constant scores 0.5
    train, valid = data
    oracle = roc_auc_score(valid.label, valid.extra["true_logit"])
    assert 0.76 < oracle < 0.84
    for backbone in ("dnn", "deepfm", "dcnv2"):
        a = _fit_auc(RankerConfig(backbone=backbone, emb_dim=8, mlp=(32, 16)), data)
        assert a > 0.72, (backbone, a)


def test_cross_side_beats_no_cross_by_margin(data):
    # the cross numeric carries 1.0 * cross_num of the logit; without it the best possible AUC drops by ~0.06
    with_cross = _fit_auc(RankerConfig(emb_dim=8, mlp=(32, 16)), data)
    no_cross = _fit_auc(RankerConfig(emb_dim=8, mlp=(32, 16), sides=("user", "item", "context")), data)
    assert with_cross - no_cross > 0.03, (with_cross, no_cross)


# ----------------------------------------------------------------------------------------------- LightGBM


@pytest.mark.parametrize("objective", ["binary", "lambdarank"])
def test_gbdt_fits_and_beats_chance(data, objective):
    from cascade.models.gbdt import GBDTRanker
    from cascade.train.loop import score_metrics

    train, valid = data
    m = GBDTRanker(objective=objective, n_estimators=150, learning_rate=0.1, num_leaves=15, seed=0).fit(train, valid)
    assert 1 <= m.best_iteration_ <= 150
    assert m.feature_names_ == ("user_id", "user_group", "item_id", "item_cat", "hour", "item_pop", "cross_num")
    s = m.predict(valid.cat, valid.num)
    assert s.shape == (len(valid),) and np.isfinite(s).all()
    metrics = score_metrics(valid.label, s, valid.user_id, valid.is_rand, probabilities=objective == "binary")
    assert metrics["auc"] == pytest.approx(roc_auc_score(valid.label, s))
    # measured: binary 0.711, lambdarank 0.687 (raw user / item ids as categoricals overfit a little); oracle 0.81
    assert metrics["auc"] > 0.65, metrics
    # same seed -> same trees
    s2 = GBDTRanker(objective=objective, n_estimators=150, learning_rate=0.1, num_leaves=15, seed=0) \
        .fit(train, valid).predict(valid.cat, valid.num)
    np.testing.assert_array_equal(s, s2)


def test_gbdt_rejects_bad_input(data):
    from cascade.models.gbdt import GBDTRanker

    train, valid = data
    with pytest.raises(ValueError, match="objective"):
        GBDTRanker(objective="poisson").fit(train)
    m = GBDTRanker(n_estimators=5).fit(train)
    with pytest.raises(ValueError, match="cat must be"):
        m.predict(valid.cat[:, :2], valid.num)


def test_score_pairs_uses_forward_lists_only_for_passes_of_many_lists(monkeypatch):
    """score_pairs gives forward's logits whatever the path; it takes forward_lists from LISTS_MIN lists per pass on
    (one list at batch 1 is faster through forward)."""
    from cascade.models.scoring import LISTS_MIN, score_pairs

    t = make_table(LISTS_MIN * 10, seed=3)
    model = Ranker(SPEC, RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16, 8), cross_rank=3), seed=1).eval()
    calls = []
    real = model.forward_lists
    monkeypatch.setattr(model, "forward_lists", lambda c, x, n: calls.append(len(c)) or real(c, x, n))
    with torch.inference_mode():
        want = model(torch.as_tensor(t.cat), torch.as_tensor(t.num)).numpy()
    one = score_pairs(model, t.cat[:10], t.num[:10], list_len=10)  # one list: forward
    assert calls == []
    np.testing.assert_allclose(one, want[:10], rtol=1e-5, atol=1e-5)
    many = score_pairs(model, t.cat, t.num, list_len=10)  # LISTS_MIN lists in one pass: forward_lists
    assert calls == [LISTS_MIN * 10]
    np.testing.assert_allclose(many, want, rtol=1e-5, atol=1e-5)
    # passes of 40 rows hold 4 lists each: below LISTS_MIN, so forward again
    np.testing.assert_allclose(score_pairs(model, t.cat, t.num, batch_size=40, list_len=10), want, rtol=1e-5, atol=1e-5)
    assert calls == [LISTS_MIN * 10]
