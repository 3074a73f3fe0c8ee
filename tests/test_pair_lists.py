"""Candidate lists encoded once per request (PairEncoder.encode_lists, RunData.pair_features) equal the per-pair rows:
cross features against a brute-force count over the logged events, the other columns against encode_pairs on the
repeated request columns (the path before), scores and a whole rank log against that path's."""

import numpy as np
import pandas as pd
import torch

from cascade.data.requests import requests_frame, to_requests
from cascade.data.split import DAY_MS
from cascade.distill.ranklog import RankLog, build_rank_log
from cascade.models.ranker import Ranker, RankerConfig
from cascade.models.scoring import ranker_scorer, score_pairs
from cascade.run_data import OOV_ID
from cascade.serve.replay import teacher_top_over_corpus


def _lists(data, n_req: int = 12, n_cand: int = 40, seed: int = 0):
    """n_req train requests and candidate item ids [n_req, n_cand]: corpus items, one unknown id and padding."""
    rng = np.random.default_rng(seed)
    frame = requests_frame(data.split_impressions("train"), data.context_names)
    frame = frame.iloc[np.sort(rng.choice(len(frame), n_req, replace=False))].reset_index(drop=True)
    frame.loc[0, "user_id"] = 10**12  # a user the data never saw
    cand = rng.choice(data.item_ids, size=(n_req, n_cand))
    cand[1, 3], cand[2, 5] = -1, 10**12  # padding and an unknown item
    return frame, cand


def _reference_rows(data, requests, cand):
    """The previous RunData.pair_features: every request column repeated per candidate, then encode_pairs."""
    n = cand.shape[1]
    ctx = {c: np.repeat(np.asarray(requests.context[c]), n) for c in data.context_names}
    return data.pairs.encode_pairs(np.repeat(data.map_users(requests.user_id), n), data.map_items(cand.reshape(-1)),
                                   np.repeat(requests.time_ms, n), ctx)


def _brute_force_cross(data, users, items, t):
    """Each cross feature of pairs (users[p], items[p], t[p]) counted from its definition over the logged events."""
    store, imp = data.cross, data.impressions
    eu, ei = imp["user_id"].to_numpy(np.int64), imp["item_id"].to_numpy(np.int64)
    et, ec = imp["time_ms"].to_numpy(np.int64), imp["click"].to_numpy(np.int64)
    w = int(round(store.window_days * DAY_MS))
    attr = {}
    for fam, col in (("tag", store.tag_column), ("author", store.author_column)):
        s = data.items.set_index("item_id")[col]
        attr[fam] = (s.to_dict(), pd.Series(ei).map(s).to_numpy())
    a, b = store.prior_ctr * store.prior_strength, store.prior_strength
    out = {name: np.zeros(len(users)) for name in store.feature_names}
    for p, (u, i, tp) in enumerate(zip(users, items, t)):
        win = (et >= tp - w) & (et < tp)
        recent = (et >= tp - w // store.RECENT_SHARE) & (et < tp)
        sets = {"user": win & (eu == u), "item": win & (ei == i), "user_item": win & (eu == u) & (ei == i),
                "item_recent": recent & (ei == i)}
        for fam, (of_item, of_event) in attr.items():
            v = of_item.get(i)
            sets[f"user_{fam}"] = win & (eu == u) & (of_event == v) if v is not None and not pd.isna(v) else win & False
        for key, m in sets.items():
            out[f"{key}_clicks"][p], out[f"{key}_exposures"][p] = ec[m].sum(), m.sum()
        for key in ("item", "user"):
            out[f"{key}_ctr"][p] = (out[f"{key}_clicks"][p] + a) / (out[f"{key}_exposures"][p] + b)
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_query_requests_equals_counting_the_events(tiny_data):
    data = tiny_data
    frame, cand = _lists(data, n_req=6, n_cand=15)
    users = data.map_users(frame["user_id"].to_numpy())
    items = data.map_items(cand)
    t = frame["time_ms"].to_numpy(np.int64)
    request = np.repeat(np.arange(len(frame)), cand.shape[1])
    got = data.cross.query_requests(users, t, items.reshape(-1), request)
    want = _brute_force_cross(data, users[request], items.reshape(-1), t[request])
    assert set(got) == set(want)
    assert want["user_exposures"][request > 0].max() > 0 and want["user_tag_clicks"].max() > 0  # not all zeros
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the per-pair query answers the same
    rows = data.cross.query(users[request], items.reshape(-1), t[request])
    for name in want:
        np.testing.assert_array_equal(rows[name], want[name], err_msg=name)


def test_pair_features_of_lists_equal_the_per_pair_rows(tiny_data):
    data = tiny_data
    frame, cand = _lists(data)
    requests = to_requests(frame, data.context_names)
    cat, num = data.pair_features(requests, cand)
    ref_cat, ref_num = _reference_rows(data, requests, cand)
    assert cat.dtype == np.int64 and num.dtype == np.float32 and cat.shape == (cand.size, len(data.spec.cat_names))
    np.testing.assert_array_equal(cat, ref_cat)
    np.testing.assert_array_equal(num, ref_num)
    # row b * L + j is (request b, candidate j): the user columns of a request repeat, the item columns follow cand
    user_col = data.spec.cat_names.index("user_id")
    assert (cat.reshape(*cand.shape, -1)[:, :, user_col] == cat[::cand.shape[1], user_col][:, None]).all()
    assert data.map_items(np.array([10**12]))[0] == OOV_ID
    # one request with a scalar context (serving's batch of one) gives the same rows as its slice of the batch
    one = to_requests(frame.iloc[3:4], data.context_names)
    c1, n1 = data.pair_features(one, cand[3:4])
    np.testing.assert_array_equal(c1, cat.reshape(*cand.shape, -1)[3])
    np.testing.assert_array_equal(n1, num.reshape(*cand.shape, -1)[3])


def _scored_lists(data, n_req: int, seed: int, model_seed: int):
    """A tiny DCN-V2 ranker and n_req train requests' candidate lists in the rank log's inputs: (frame with
    user_row, candidate ids [n_req, 30], item rows (-1 pad), requests, model, scorer(request_rows, item rows))."""
    frame, cand = _lists(data, n_req=n_req, n_cand=30, seed=seed)
    cand[cand == 10**12] = data.item_ids[0]
    requests = to_requests(frame, data.context_names)
    model = Ranker(data.spec, RankerConfig(backbone="dcnv2", emb_dim=4, mlp=(16,), cross_layers=2, cross_rank=8),
                   seed=model_seed).eval()
    frame["user_row"] = np.arange(len(frame))
    rows = np.searchsorted(data.item_ids, np.where(cand >= 0, cand, data.item_ids[0]))
    rows[cand < 0] = -1
    score = ranker_scorer(model, data)

    def scorer(request_rows, c):
        return score(requests.take(request_rows), data.item_ids[c])

    return frame, cand, rows, requests, model, scorer


def test_scores_and_rank_log_equal_the_per_pair_path(tiny_data, tmp_path):
    data = tiny_data
    frame, cand, rows, requests, model, fast = _scored_lists(data, n_req=20, seed=1, model_seed=3)
    item_ids = data.item_ids
    ref_cat, ref_num = _reference_rows(data, requests, cand)
    with torch.inference_mode():
        want = model(torch.from_numpy(ref_cat), torch.from_numpy(ref_num)).numpy().reshape(cand.shape)
    got = ranker_scorer(model, data)(requests, cand)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def reference(request_rows, c):
        rc, rn = _reference_rows(data, requests.take(request_rows), item_ids[c])
        return score_pairs(model, rc, rn, list_len=c.shape[1]).reshape(c.shape)

    build_rank_log(frame, rows, fast, tmp_path / "fast", requests_per_batch=8, progress=False, item_ids=item_ids)
    build_rank_log(frame, rows, reference, tmp_path / "ref", requests_per_batch=8, progress=False, item_ids=item_ids)
    a, b = RankLog(tmp_path / "fast"), RankLog(tmp_path / "ref")
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_batches_scored_side_by_side_equal_one_at_a_time(tiny_data, tmp_path):
    """The rank log and the teacher's corpus lists with workers = 2 (two blocks at once, torch at one thread each)
    give what one block at a time gives: the real scorer is safe to call from two threads."""
    data = tiny_data
    frame, _, rows, requests, model, scorer = _scored_lists(data, n_req=24, seed=2, model_seed=5)
    item_ids = data.item_ids
    for workers in (1, 2):
        build_rank_log(frame, rows, scorer, tmp_path / f"w{workers}", requests_per_batch=4, progress=False,
                       item_ids=item_ids, workers=workers)
    a, b = RankLog(tmp_path / "w1"), RankLog(tmp_path / "w2")
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)  # one thread vs the process's: rounding

    per_block = 3 * len(item_ids)  # blocks of 3 requests over the whole corpus: 8 blocks
    top1, s1 = teacher_top_over_corpus(model, data, requests, 7, pairs_per_batch=per_block)
    top2, s2 = teacher_top_over_corpus(model, data, requests, 7, pairs_per_batch=per_block, workers=2)
    np.testing.assert_array_equal(top1, top2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    # and it is the top 7 of scoring the corpus in one pass
    whole = ranker_scorer(model, data)(requests, np.broadcast_to(item_ids, (len(frame), len(item_ids))).copy())
    np.testing.assert_allclose(np.sort(whole, 1)[:, ::-1][:, :7], s2, rtol=1e-5, atol=1e-6)
    # a model in training mode is put in eval mode once, when its scorer is made (no thread switches it later)
    model.train()
    ranker_scorer(model, data)
    assert not model.training
