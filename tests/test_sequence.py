"""The behaviour sequence: history columns (hand-worked, leak-free), their embedding, target attention (hand-worked,
masked padding), the ranker that reads them (every backbone, list scoring, PFD, standalone export)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from cascade.arrays import PAD
from cascade.data.batches import FeatureSpec
from cascade.data.features import CrossFeatureStore, FeatureEncoder, PairEncoder, build_encoded
from cascade.data.requests import request_start_ms
from cascade.data.schema import Dataset, Feature, Schema
from cascade.data.split import DAY_MS
from cascade.models.entire_space import EntireSpaceRanker, exposure_config
from cascade.models.layers import FeatureEmbedding
from cascade.models.ranker import Ranker, RankerConfig
from cascade.models.scoring import ranking_model
from cascade.models.sequence import TargetAttention
from cascade.pipeline.common import save_ranker
from cascade.run_data import load_ranker
from cascade.train.joint import JointRanker, pfd_configs

HIST_SIDES = ("user", "item", "context", "cross", "history")


def _schema() -> Schema:
    return Schema((Feature("user_id", "users", "categorical", "user"),
                   Feature("item_id", "items", "categorical", "item"),
                   Feature("tag", "items", "categorical", "item"),
                   Feature("author_id", "items", "categorical", "item"),
                   Feature("duration", "items", "numeric", "item")))


def _dataset(ev: pd.DataFrame, items: pd.DataFrame) -> Dataset:
    """Events (user_id, item_id, time_ms, click, optional request_id) as impressions; one request per event
    unless given."""
    imp = ev.copy()
    if "request_id" not in imp:
        imp["request_id"] = np.arange(len(imp), dtype=np.int64)
    imp["position"] = imp.groupby("request_id").cumcount().astype(np.int64)
    imp["is_rand"] = 0
    users = pd.DataFrame({"user_id": np.unique(imp["user_id"].to_numpy(np.int64))})
    return Dataset(users, items, imp, _schema(), name="seq").validate()


# ------------------------------------------------------------------------------------------- history columns

ITEMS = pd.DataFrame({"item_id": [10, 11, 12, 13], "tag": [1, 1, 2, 3], "author_id": [100, 101, 100, 102],
                      "duration": [1.0, 2.0, 3.0, 4.0]})
EVENTS = pd.DataFrame({  # e1..e7
    "user_id": [1, 1, 1, 1, 1, 2, 1],
    "item_id": [13, 11, 12, 10, 11, 11, 12],
    "time_ms": [1000, 2000, 3000, 4000, DAY_MS + 3500, 3000, 4500],
    "click": [1, 0, 1, 1, 1, 1, 1],
})


def test_history_hand_worked_order_distinct_window_clicks_only_and_codes():
    store = CrossFeatureStore(window_days=1).fit(EVENTS, ITEMS)
    users = np.array([1, 1, 1, 1, 1, 2, 9, 2])
    t = np.array([4000, 5000, DAY_MS + 1000, DAY_MS + 1001, DAY_MS + 3500, 3000, 5000, 3001])
    got = store.history(users, t, 3)
    P = PAD
    want = np.array([
        [12, 13, P],   # t=4000: clicks before it: e3 (12), e1 (13); e2 is no click, e4 is AT t (not before)
        [12, 10, 13],  # t=5000: e7 (12), e4 (10), e3 (12 again: kept once, at its latest), e1 (13)
        [12, 10, 13],  # t=DAY+1000: the window [1000, DAY+1000) still holds e1 at exactly t - W
        [12, 10, P],   # t=DAY+1001: e1 has left the window
        [12, 10, P],   # t=DAY+3500: window [3500, DAY+3500): e4, e7; e5 is at t
        [P, P, P],     # user 2 at 3000: e6 is at t
        [P, P, P],     # a user without events
        [11, P, P],    # user 2 just after e6
    ])
    np.testing.assert_array_equal(got, want)
    # clicks at 5000 (13) and at DAY+3500 (11): nothing changes for the queries at or before their times; the
    # later ones see 13 first
    later = pd.concat([EVENTS, pd.DataFrame({"user_id": [1, 1], "item_id": [13, 11], "time_ms": [5000, DAY_MS + 3500],
                                             "click": [1, 1]})], ignore_index=True)
    got2 = CrossFeatureStore(window_days=1).fit(later, ITEMS).history(users, t, 3)
    np.testing.assert_array_equal(got2[[0, 1, 5, 6, 7]], want[[0, 1, 5, 6, 7]])
    np.testing.assert_array_equal(got2[[2, 3, 4]], [[13, 12, 10]] * 3)

    # codes: the encoder is fitted on every event but e1, so item 13 (and its tag 3, author 102) is unknown to the
    # vocabularies: item_id 10, 11, 12 -> 1, 2, 3; tag 1, 2 -> 1, 2; author 100, 101 -> 1, 2; unknown / PAD -> 0
    ds = _dataset(EVENTS, ITEMS)
    enc = FeatureEncoder(ds.schema, history_length=3).fit(ds, np.arange(len(EVENTS)) != 0, store)
    assert enc.history_attrs_ == ["item_id", "tag", "author_id"]
    pe = PairEncoder(enc, store, ds.users, ITEMS)
    cat, _ = pe.encode_pairs(users[:2], np.array([10, 10]), t[:2], {})
    hist = cat[:, pe.spec.cat_index("history")]
    assert pe.spec.cat_names[pe.spec.cat_index("history")[0]] == "hist_item_id_0"
    np.testing.assert_array_equal(hist, [[3, 0, 0, 2, 0, 0, 1, 0, 0],    # [12, 13, PAD]
                                         [3, 1, 0, 2, 1, 0, 1, 1, 0]])   # [12, 10, 13]
    # the history columns read the attribute's own table, with its cardinality
    j = pe.spec.cat_index("history")
    assert [pe.spec.table_of(k) for k in j] == ["item_id"] * 3 + ["tag"] * 3 + ["author_id"] * 3
    card = dict(zip(pe.spec.cat_names, pe.spec.cat_cardinality))
    assert [pe.spec.cat_cardinality[k] for k in j] == [card[a] for a in ("item_id", "tag", "author_id") for _ in "abc"]


def test_history_attributes_skip_duplicates_and_non_categorical_columns():
    store = CrossFeatureStore(window_days=1, tag_column="tag", author_column="tag").fit(EVENTS, ITEMS)
    ds = _dataset(EVENTS, ITEMS)
    enc = FeatureEncoder(ds.schema, history_length=2).fit(ds, np.ones(len(EVENTS), bool), store)
    assert enc.history_attrs_ == ["item_id", "tag"]  # MovieLens sets both to "genre": one attribute
    store = CrossFeatureStore(window_days=1, tag_column="duration", author_column="author_id").fit(EVENTS, ITEMS)
    enc = FeatureEncoder(ds.schema, history_length=2).fit(ds, np.ones(len(EVENTS), bool), store)
    assert enc.history_attrs_ == ["item_id", "author_id"]  # a numeric column is no attribute
    assert FeatureEncoder(ds.schema).fit(ds, np.ones(len(EVENTS), bool), store).spec().cat_index("history") == []
    with pytest.raises(ValueError, match="needs the cross-feature store"):
        FeatureEncoder(ds.schema, history_length=2).fit(ds, np.ones(len(EVENTS), bool))
    with pytest.raises(ValueError, match="history_length must be >= 0"):
        FeatureEncoder(ds.schema, history_length=-1).fit(ds, np.ones(len(EVENTS), bool), store)


def _random_events(seed: int, n_requests: int = 300, n_users: int = 8, n_items: int = 25) -> tuple[pd.DataFrame,
                                                                                                     pd.DataFrame]:
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": np.arange(n_items, dtype=np.int64) + 50, "tag": rng.integers(0, 4, n_items),
                          "author_id": rng.integers(0, 6, n_items), "duration": rng.random(n_items)})
    sizes = rng.integers(1, 5, n_requests)
    starts = np.sort(rng.integers(0, 6 * DAY_MS, n_requests))
    req = np.repeat(np.arange(n_requests), sizes)
    pos = np.concatenate([np.arange(s) for s in sizes])
    ev = pd.DataFrame({"request_id": req.astype(np.int64), "user_id": rng.integers(0, n_users, n_requests)[req],
                       "item_id": rng.choice(items.item_id, len(req)), "time_ms": starts[req] + 10 * pos,
                       "click": (rng.random(len(req)) < 0.5).astype(np.int64)})
    return ev, items


def test_no_later_event_changes_an_earlier_rows_history_columns():
    ev, items = _random_events(3)
    ds = _dataset(ev, items)
    store = CrossFeatureStore(window_days=2).fit(ds.impressions, items)
    enc = FeatureEncoder(ds.schema, history_length=5).fit(ds, np.ones(len(ev), bool), store)
    start = request_start_ms(ds.impressions)
    multi = ev.groupby("request_id")["time_ms"].transform("size").to_numpy() >= 3
    t_cut = int(start[multi][len(start[multi]) // 2]) + 5  # inside a request: its first row before, the rest after
    before = start < t_cut
    assert (before & (ev["time_ms"].to_numpy() >= t_cut)).any()

    def history_columns(events: pd.DataFrame) -> np.ndarray:
        d = _dataset(events, items)
        s = CrossFeatureStore(window_days=2).fit(d.impressions, items)
        t = build_encoded(d, {"all": np.ones(len(events), bool)}, enc, s)["all"]
        return t.cat[:, t.spec.cat_index("history")]

    ref = history_columns(ev)
    assert (ref[:, 0] > 0).mean() > 0.5  # most rows have a history: the check below can fail
    changed = ev.copy()
    late = changed["time_ms"].to_numpy() >= t_cut
    rng = np.random.default_rng(0)
    changed.loc[late, "click"] = 1 - changed.loc[late, "click"]
    changed.loc[late, "item_id"] = rng.choice(items.item_id, late.sum())
    # and new events: a click by every user at the cut itself and after it
    extra = pd.DataFrame({"request_id": 10_000 + np.arange(16), "user_id": np.tile(np.arange(8), 2),
                          "item_id": np.full(16, 50), "time_ms": np.repeat([t_cut, t_cut + DAY_MS], 8),
                          "click": np.ones(16, np.int64)})
    got = history_columns(pd.concat([changed, extra], ignore_index=True))[:len(ev)]
    np.testing.assert_array_equal(got[before], ref[before])
    assert (got[~before] != ref[~before]).any()  # the later rows do see the change
    # all rows of a request share its history
    per_req = pd.DataFrame(ref).groupby(ev["request_id"].to_numpy()).nunique()
    assert (per_req.to_numpy() == 1).all()


# ------------------------------------------------------------------------------------------- target attention


def test_target_attention_hand_worked():
    # D = 2, one hidden unit that reads only the q * k block with weights [1, 1] (so h = relu(<q, k>)), score 2 h.
    # q = [1, 0]; k0 = [1, 0] -> h 1, s 2; k1 = [0, 1] -> h 0, s 0; k2 = [5, 5] is padding (masked).
    # weights: softmax([2, 0]) = [e^2, 1] / (e^2 + 1) = [0.880797, 0.119203]; pooled = 0.880797 k0 + 0.119203 k1.
    att = TargetAttention(2, hidden=(1,))
    with torch.no_grad():
        att.first.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]))
        att.first.bias.zero_()
        att.score.weight.fill_(2.0)
        att.score.bias.zero_()
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    got = att(q, k, torch.tensor([[True, True, False]]))
    e2 = np.exp(2.0)
    np.testing.assert_allclose(got.detach().numpy(), [[[e2 / (e2 + 1), 1 / (e2 + 1)]]], rtol=1e-6)


def test_target_attention_equals_the_din_formula_on_random_weights():
    """The block-wise first layer equals the MLP over the concatenation [q, k, q - k, q * k] (numpy reference)."""
    torch.manual_seed(0)
    att = TargetAttention(3, hidden=(4, 2))
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.7)
    q, k = torch.randn(2, 3, 3), torch.randn(2, 5, 3)  # 2 sequences, 3 candidates each, 5 positions
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    got = att(q, k, mask).detach().numpy()
    W = {n: p.detach().numpy().astype(np.float64) for n, p in att.named_parameters()}
    qn, kn = q.numpy().astype(np.float64), k.numpy().astype(np.float64)
    for r in range(2):
        for c in range(3):
            s = []
            for j in range(5):
                z = np.concatenate([qn[r, c], kn[r, j], qn[r, c] - kn[r, j], qn[r, c] * kn[r, j]])
                h = np.maximum(W["first.weight"] @ z + W["first.bias"], 0)
                h = np.maximum(W["rest.0.weight"] @ h + W["rest.0.bias"], 0)
                s.append((W["score.weight"] @ h + W["score.bias"]).item())
            s = np.array(s)[mask[r].numpy()]
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[r, c], w @ kn[r][mask[r].numpy()], rtol=1e-5, atol=1e-6)


def test_target_attention_masks_padding_exactly():
    torch.manual_seed(1)
    att = TargetAttention(4, hidden=(8,))
    q, k = torch.randn(3, 2, 4), torch.randn(3, 6, 4)
    mask = torch.tensor([[True, True, True, False, False, False], [False] * 6, [True, False, True, False, True, True]])
    out = att(q, k, mask)
    k2 = torch.where(mask[:, :, None], k, 100 * torch.randn(3, 6, 4))  # anything in the padded slots
    assert torch.equal(att(q, k2, mask), out)
    assert torch.equal(out[1], torch.zeros(2, 4))  # no history: the zero vector
    every = torch.ones(3, 6, dtype=torch.bool)
    assert not torch.equal(att(q, k2, every), att(q, k, every))  # unmasked, the same slots do count


# ------------------------------------------------------------------------------------------- the ranker

N_HIST = 4
SPEC = FeatureSpec(
    cat_names=("user_id", "item_id", "tag", "hour", *(f"hist_item_id_{j}" for j in range(N_HIST)),
               *(f"hist_tag_{j}" for j in range(N_HIST))),
    cat_sides=("user", "item", "item", "context") + ("history",) * 2 * N_HIST,
    cat_cardinality=(9, 21, 6, 24) + (21,) * N_HIST + (6,) * N_HIST,
    num_names=("item_pop", "cross_num", "priv"),
    num_sides=("item", "cross", "privileged"),
    cat_shares=("", "", "", "") + ("item_id",) * N_HIST + ("tag",) * N_HIST,
)


def _lists(n_lists: int, list_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate lists: user, hour and history shared within a list (a request), histories of 0..N_HIST items
    (padding: code 0 in every attribute), item columns per row."""
    rng = np.random.default_rng(seed)
    r = n_lists
    length = rng.integers(0, N_HIST + 1, r)
    length[0] = 0  # one request without any history
    valid = np.arange(N_HIST)[None, :] < length[:, None]
    hist_item = np.where(valid, rng.integers(1, 21, (r, N_HIST)), 0)
    hist_tag = np.where(valid, rng.integers(1, 6, (r, N_HIST)), 0)
    req = np.concatenate([rng.integers(0, 9, (r, 1)), rng.integers(0, 24, (r, 1)), hist_item, hist_tag], axis=1)
    req = np.repeat(req, list_len, axis=0)
    n = r * list_len
    cat = np.concatenate([req[:, :1], rng.integers(0, 21, (n, 1)), rng.integers(0, 6, (n, 1)), req[:, 1:]], axis=1)
    num = rng.standard_normal((n, 3)).astype(np.float32)
    return torch.as_tensor(cat, dtype=torch.long), torch.as_tensor(num)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_feature_embedding_reads_the_shared_tables():
    emb = FeatureEmbedding(SPEC, ("history",), emb_dim=3)
    # only history columns: the item_id and tag tables are still there (21 + 6 rows), nothing else
    assert emb.table_names == ("item_id", "tag") and emb.table.weight.shape == (27, 3)
    full = FeatureEmbedding(SPEC, HIST_SIDES, emb_dim=3)
    assert full.table.weight.shape == (9 + 21 + 6 + 24, 3)
    cat, num = _lists(3, 2, seed=0)
    fields, _ = full(cat, num)
    names = full.field_names
    # hist_item_id_j = item code c reads the same vector as a candidate item_id = c
    cat2 = cat.clone()
    cat2[:, 1] = cat[:, names.index("hist_item_id_1")]
    cat2[:, 2] = cat[:, names.index("hist_tag_1")]
    f2, _ = full(cat2, num)
    torch.testing.assert_close(fields[:, names.index("hist_item_id_1")], f2[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(fields[:, names.index("hist_tag_1")], f2[:, 2], rtol=0, atol=0)
    # a spec round trip keeps the shares
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC
    assert SPEC.select("history").cat_shares == ("item_id",) * N_HIST + ("tag",) * N_HIST
    assert SPEC.select("user", "item").cat_shares == ()
    with pytest.raises(ValueError, match="reads the table"):
        FeatureSpec(("a", "b"), ("item", "history"), (3, 3), cat_shares=("b", "a"))


@pytest.mark.parametrize("cfg", [
    RankerConfig(backbone="dnn", emb_dim=4, mlp=(16, 8), sides=HIST_SIDES),
    RankerConfig(backbone="deepfm", emb_dim=4, mlp=(16,), sides=HIST_SIDES),
    RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16,), cross_rank=3, sides=HIST_SIDES),
    RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16,), cross_structure="parallel", sides=HIST_SIDES,
                 attention_mlp=(8, 4)),
])
def test_every_backbone_reads_the_sequence_and_ignores_padding(cfg):
    model = _perturbed(Ranker(SPEC, cfg, seed=1))
    assert model.attention is not None and model.attention.dim == 2 * 4
    # x: user_id, item_id, tag, hour, item_pop, cross_num + the pooled history (2 attributes) = 8 fields
    assert model.in_dim == 8 * 4
    cat, num = _lists(12, 5, seed=2)
    with torch.inference_mode():
        want = model(cat, num)
        # padded slots (item code 0) carry anything in their other attributes: no logit moves
        pad = cat[:, 4:4 + N_HIST] == 0
        cat2 = cat.clone()
        cat2[:, 4 + N_HIST:] = torch.where(pad, torch.randint(1, 6, pad.shape), cat[:, 4 + N_HIST:])
        assert torch.equal(model(cat2, num), want)
        # a real history item moves the logits of its request
        cat3 = cat.clone()
        has = ~pad[:, 0]
        cat3[:, 4] = torch.where(has, (cat[:, 4] % 20) + 1, cat[:, 4])
        moved = model(cat3, num) != want
        assert moved[has].all() and not moved[~has].any()
        # list scoring factors the sequence out per request and computes the same logits
        assert model.supports_lists() == (cfg.backbone != "deepfm")
        torch.testing.assert_close(model.forward_lists(cat, num, 5), want, rtol=1e-5, atol=1e-5)


def test_a_model_without_the_history_side_and_one_without_items_fail_or_ignore():
    plain = Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,)))
    assert plain.attention is None and "hist_item_id_0" not in plain.field_names
    with pytest.raises(ValueError, match="needs the candidate's own column"):
        Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,), sides=("user", "history")))
    with pytest.raises(ValueError, match="read by the history columns"):
        Ranker(SPEC, RankerConfig(emb_dim=4, mlp=(8,), sides=HIST_SIDES), private_columns=("item_id",))
    cfg = RankerConfig(emb_dim=4, mlp=(8,), sides=HIST_SIDES, attention_mlp=(6,))
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="attention_mlp"):
        RankerConfig(attention_mlp=())


def test_pfd_and_standalone_export_with_a_history_reading_teacher_and_student():
    cat, num = _lists(6, 4, seed=5)
    # the teacher reads the sequence (and the privileged side), the student too: the student is exported alone
    student_cfg = RankerConfig(backbone="dnn", emb_dim=4, mlp=(8,), sides=("user", "item", "context", "history"))
    joint = _perturbed(JointRanker(SPEC, *pfd_configs(student_cfg, "pfd"), private_student_columns=("user_id",)))
    assert joint.teacher.attention is not None and joint.student.attention is not None
    with torch.inference_mode():
        t_logit, _, s_logit, _ = joint.forward_both(cat, num)
        exported = joint.export_student()
        torch.testing.assert_close(exported(cat, num), s_logit, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(joint.teacher.standalone()(cat, num), t_logit, rtol=1e-6, atol=1e-6)
    # a student without the sequence beside a teacher with it
    joint = _perturbed(JointRanker(SPEC, RankerConfig(emb_dim=4, mlp=(8,), sides=HIST_SIDES + ("privileged",)),
                                   RankerConfig(emb_dim=4, mlp=(8,))))
    assert joint.student.attention is None
    with torch.inference_mode():
        torch.testing.assert_close(joint.export_student()(cat, num), joint(cat, num), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["ranker", "entire_space"])
def test_save_load_of_a_sequence_reading_teacher_keeps_its_scores(kind, tmp_path):
    cfg = RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16,), cross_rank=3, sides=HIST_SIDES, attention_mlp=(6, 3))
    model = _perturbed(Ranker(SPEC, cfg, seed=2) if kind == "ranker" else EntireSpaceRanker(SPEC, cfg, seed=2))
    save_ranker(model, cfg, tmp_path / "teacher")
    loaded = load_ranker(tmp_path / "teacher", SPEC)
    fresh = _perturbed(Ranker(SPEC, cfg, seed=2), seed=7)  # other weights: the comparison below can fail
    cat, num = _lists(8, 6, seed=3)
    with torch.inference_mode():
        want = model(cat, num)
        assert torch.equal(loaded(cat, num), want)
        assert not torch.allclose(fresh(cat, num), want)
        # the list scoring that orders candidates (the rank log, the rank stage) reads the same sequence per request
        score, score_loaded = (ranking_model(m) for m in (model, loaded))
        torch.testing.assert_close(score_loaded.forward_lists(cat, num, 6), score(cat, num), rtol=1e-5, atol=1e-5)


def test_a_history_side_without_history_columns_is_an_error():
    plain = FeatureSpec(SPEC.cat_names[:4], SPEC.cat_sides[:4], SPEC.cat_cardinality[:4], SPEC.num_names,
                        SPEC.num_sides)
    with pytest.raises(ValueError, match="has no history column"):
        Ranker(plain, RankerConfig(emb_dim=4, mlp=(8,), sides=HIST_SIDES))


@pytest.mark.parametrize("backbone", ["dnn", "deepfm", "dcnv2"])
def test_an_excluded_column_is_not_read_and_list_scoring_agrees(backbone):
    cfg = RankerConfig(backbone=backbone, emb_dim=4, mlp=(8,), cross_rank=2, exclude=("item_id", "item_pop"))
    full = _perturbed(Ranker(SPEC, dataclasses.replace(cfg, exclude=()), seed=1))
    model = _perturbed(Ranker(SPEC, cfg, seed=1))
    assert "item_id" not in model.field_names and "item_pop" not in model.field_names
    assert "tag" in model.field_names and len(model.field_names) == len(full.field_names) - 2
    cat, num = _lists(6, 5, seed=4)
    other_cat, other_num = cat.clone(), num.clone()
    other_cat[:, 1] = (other_cat[:, 1] + 7) % 21  # another item id, another item_pop
    other_num[:, 0] += 2.0
    with torch.inference_mode():
        torch.testing.assert_close(model(other_cat, other_num), model(cat, num), rtol=0, atol=0)
        assert not torch.allclose(full(other_cat, other_num), full(cat, num))  # the same change moves a full model
        if model.supports_lists():
            torch.testing.assert_close(model.forward_lists(cat, num, 5), model(cat, num), rtol=1e-5, atol=1e-5)


def test_exclude_names_an_unknown_column_and_the_exposure_config_drops_the_sequence_with_the_item_id():
    with pytest.raises(ValueError, match=r"exclude names column\(s\) \['no_such'\]"):
        Ranker(SPEC, RankerConfig(exclude=("no_such",)))
    with pytest.raises(ValueError, match="exclude"):
        RankerConfig(exclude=("tag", "tag"))
    teacher = RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(8,), sides=HIST_SIDES, exclude=("hour",))
    expo = exposure_config(teacher, ("item_id",), SPEC)
    # the sequence's query is the candidate's item id: without it the sequence goes too; other sides stay
    assert expo.sides == ("user", "item", "context", "cross") and expo.exclude == ("hour", "item_id")
    model = Ranker(SPEC, expo)
    assert model.attention is None and not any(n.startswith("hist_") for n in model.field_names)
    # a column that is not a sequence attribute keeps the sequence
    kept = exposure_config(teacher, ("item_pop",), SPEC)
    assert kept.sides == HIST_SIDES and Ranker(SPEC, kept).attention is not None
    assert exposure_config(teacher, (), SPEC) is teacher


def test_an_entire_space_ranker_saves_and_loads_its_own_exposure_config(tmp_path):
    cfg = RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(8,), cross_rank=2)
    model = _perturbed(EntireSpaceRanker(SPEC, cfg, seed=2, exposure_cfg=exposure_config(cfg, ("item_id",), SPEC)))
    with torch.no_grad():
        model.exposure_weight.fill_(0.5)
    save_ranker(model, cfg, tmp_path / "teacher")
    loaded = load_ranker(tmp_path / "teacher", SPEC)
    assert loaded.exposure_cfg.exclude == ("item_id",) and loaded.cfg.exclude == ()
    cat, num = _lists(4, 6, seed=5)
    with torch.inference_mode():
        want = ranking_model(model)(cat, num)
        torch.testing.assert_close(ranking_model(loaded)(cat, num), want, rtol=0, atol=0)
        # list scoring (the rank log, the rank stage) runs each model's own layout
        torch.testing.assert_close(ranking_model(loaded).forward_lists(cat, num, 6), want, rtol=1e-5, atol=1e-5)
        assert "item_id" in loaded.click.field_names and "item_id" not in loaded.exposure.field_names
