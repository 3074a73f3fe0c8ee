"""Tests of the synthetic world (cascade.data.world) on small, seeded worlds built on the embedded tables."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cascade.artifacts import read_npz
from cascade.data import world as W
from cascade.data.world import KUAIRAND_LOG_COLUMNS, HistoryState, World, WorldConfig, generate_world
from cascade.data.world.generate import auc as world_auc

SMALL = WorldConfig(seed=0, n_users=1500, n_items=1200, n_days=5)
HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
          "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab")
LOG_FILES = ("log_standard_4_08_to_4_10_pure.csv", "log_standard_4_11_to_4_12_pure.csv",
             "log_random_4_08_to_4_12_pure.csv")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[World, Path]:
    out = tmp_path_factory.mktemp("world_small")
    return generate_world(out, SMALL), out


@pytest.fixture(scope="module")
def logs(small) -> pd.DataFrame:
    """All log rows, with the position of each impression in its request (rank of time_ms within the key)."""
    _, out = small
    df = pd.concat([pd.read_csv(out / f) for f in LOG_FILES], ignore_index=True)
    key = ["user_id", "date", "hourmin", "tab", "is_rand"]
    df = df.sort_values(key + ["time_ms"], kind="stable").reset_index(drop=True)
    df["position"] = df.groupby(key).cumcount()
    return df


def test_files_and_exact_headers(small):
    world, out = small
    # 5 days from 2022-04-08: the standard log splits at round(5 * 2/3) = 3 days (4/08-4/10, 4/11-4/12)
    assert world.summary()["files"] == list(LOG_FILES)
    for name in LOG_FILES:
        with open(out / name) as f:
            assert f.readline().rstrip("\n") == HEADER
    assert ",".join(KUAIRAND_LOG_COLUMNS) == HEADER
    real_users = pd.read_csv(W.embedded_data_dir() / W.USER_FEATURES_FILE, nrows=2)
    real_items = pd.read_csv(W.embedded_data_dir() / W.VIDEO_FEATURES_FILE, nrows=2)
    users = pd.read_csv(out / W.USER_FEATURES_FILE)
    items = pd.read_csv(out / W.VIDEO_FEATURES_FILE)
    assert list(users.columns) == list(real_users.columns) and len(users) == 1500 and users.user_id.is_unique
    assert list(items.columns) == list(real_items.columns) and len(items) == 1200 and items.video_id.is_unique
    # a subsample keeps real ids
    assert users.user_id.max() < 27285 and items.video_id.max() < 7583
    np.testing.assert_array_equal(np.sort(users.user_id.to_numpy()), world.user_ids)


def test_summary_matches_files(small, logs):
    world, _ = small
    s = world.summary()
    assert s["rows"] == len(logs) and s["rows_random"] == int(logs.is_rand.sum())
    assert s["requests"] * SMALL.request_size == len(logs)
    assert s["ctr"] == pytest.approx(logs.is_click.mean(), abs=1e-12)
    assert s["ctr_random"] == pytest.approx(logs.is_click[logs.is_rand == 1].mean(), abs=1e-12)
    by_pos = logs[logs.is_rand == 0].groupby("position").is_click.mean().to_numpy()
    np.testing.assert_allclose(s["ctr_by_position_standard"], by_pos, atol=1e-12)
    # the oracle AUCs: the full truth beats the truth without its history terms, which the two-tower cannot see
    for part in ("standard", "random"):
        auc = s["oracle_auc"][part]
        assert auc["full"] > auc["no_history"] + 0.01 and auc["full"] > auc["no_context"] + 0.005
    timing = ("seconds", "wall_s")  # measured, not part of the saved world
    assert World.load(small[1]).summary() == {k: v for k, v in s.items() if k not in timing}


def test_request_invariants(logs):
    key = ["user_id", "date", "hourmin", "tab", "is_rand"]
    sizes = logs.groupby(key).size()
    # one request per key, each showing exactly request_size items: a second request on a key would double it
    assert (sizes == SMALL.request_size).all()
    # time_ms strictly increasing in position order within a request (ties would make the order ambiguous)
    same_req = (logs[key].to_numpy()[1:] == logs[key].to_numpy()[:-1]).all(axis=1)
    assert (np.diff(logs.time_ms.to_numpy())[same_req] > 0).all()
    # no item twice in one request
    assert not logs.duplicated(key + ["video_id"]).any()
    # date / hourmin are the Beijing (UTC+8) wall clock of time_ms; hand check: 2022-04-08 00:00 +08:00 is
    # 2022-04-07 16:00 UTC = 1649347200 s since the epoch
    assert int(dt.datetime(2022, 4, 8, tzinfo=dt.timezone(dt.timedelta(hours=8))).timestamp()) == 1649347200
    local = pd.to_datetime(logs.time_ms, unit="ms", utc=True).dt.tz_convert("Asia/Shanghai")
    np.testing.assert_array_equal(local.dt.strftime("%Y%m%d").astype(int).to_numpy(), logs.date.to_numpy())
    np.testing.assert_array_equal((local.dt.hour * 100).to_numpy(), logs.hourmin.to_numpy())
    assert logs.date.min() == 20220408 and logs.date.max() == 20220412
    assert set(logs.tab.unique()) <= set(range(SMALL.n_tabs))
    # likes, follows and comments need a click; unclicked videos only autoplay a preview (<= 60% of the duration,
    # or a scroll-past of at most 1.5 s), so play time is informative about the click without determining it
    nc, cl = logs[logs.is_click == 0], logs[logs.is_click == 1]
    assert (nc[["is_like", "is_follow", "is_comment"]].to_numpy() == 0).all()
    assert (nc.play_time_ms <= np.maximum(0.6 * nc.duration_ms, 1500) + 1).all()
    frac_nc, frac_cl = nc.play_time_ms / nc.duration_ms, cl.play_time_ms / cl.duration_ms
    assert frac_cl.mean() > frac_nc.mean() + 0.1
    from cascade.eval.metrics import auc

    a = auc(logs.is_click.to_numpy(), (logs.play_time_ms / logs.duration_ms).to_numpy())
    assert 0.7 < a < 0.99, a  # informative, but not the label in disguise
    assert (logs.play_time_ms <= logs.duration_ms).all() and (logs.duration_ms > 0).all()


def test_position_bias_in_both_logs(logs):
    for is_rand in (0, 1):
        ctr = logs[logs.is_rand == is_rand].groupby("position").is_click.mean().to_numpy()
        # examination (1+p)^-0.8: the last of 6 positions is examined 6^-0.8 = 0.24 times as often as the first;
        # on the random log the items are exchangeable, so CTR(last) / CTR(first) should be near 0.24
        assert ctr[0] > 2.0 * ctr[-1], (is_rand, ctr)
    rnd = logs[logs.is_rand == 1].groupby("position").is_click.mean().to_numpy()
    assert 0.12 < rnd[-1] / rnd[0] < 0.4


def test_random_slice_is_uniform_over_items(small, logs):
    world, _ = small

    def counts(is_rand: int) -> np.ndarray:
        # impressions per item of the corpus, zeros included: [n_items]
        return logs.video_id[logs.is_rand == is_rand].value_counts().reindex(world.item_ids, fill_value=0).to_numpy()

    def dispersion(c: np.ndarray) -> float:
        # variance / mean of per-item counts: 1 - 1/n_items for uniform multinomial draws, >> 1 when a
        # popularity-biased policy concentrates exposure
        return float(c.var() / c.mean())

    def top_decile_share(c: np.ndarray) -> float:
        return float(np.sort(c)[::-1][: len(c) // 10].sum() / c.sum())

    rnd, std = counts(1), counts(0)
    assert 0.7 < dispersion(rnd) < 1.4
    assert dispersion(std) > 10.0
    # the top 10% of items get about 10% of the uniform slice (a little more from sampling noise)
    assert top_decile_share(rnd) < 0.2 < 0.3 < top_decile_share(std)


def test_history_effect_has_the_right_direction(small, logs):
    world, out = small
    items = pd.read_csv(out / W.VIDEO_FEATURES_FILE, dtype={"tag": "string"})
    first_tag = items.tag.str.split(",").str[0].fillna("none")
    tag_of = dict(zip(items.video_id, first_tag))
    df = logs.assign(tag=logs.video_id.map(tag_of))
    per = df.groupby(["user_id", "tag"]).agg(clicks=("is_click", "sum"), shown=("is_click", "size")).reset_index()

    def logit_shift(pairs: pd.DataFrame) -> np.ndarray:
        # one item of the tag per pair (the first in the table), context fixed
        item_of_tag = items.groupby(first_tag).video_id.first()
        it = item_of_tag[pairs.tag].to_numpy()
        u = pairs.user_id.to_numpy()
        p_end = world.true_click_prob(u, it, 20, 0, history="end")
        p_none = world.true_click_prob(u, it, 20, 0, history=None)
        return np.log(p_end / (1 - p_end)) - np.log(p_none / (1 - p_none))

    liked = per[per.clicks >= 3]
    ignored = per[(per.clicks == 0) & (per.shown >= 4)]
    assert len(liked) > 50 and len(ignored) > 50
    up, down = logit_shift(liked), logit_shift(ignored)
    # clicks on a tag raise the appeal of its items (+2 log1p(clicks) minus a little fatigue); repeated
    # exposures without a click lower it (-0.6 log1p(skips))
    assert np.median(up) > 0.5 and (up > 0).mean() > 0.9
    # (not all: an author bucket shared with a clicked author can outweigh the tag's fatigue)
    assert np.median(down) < -0.1 and (down < 0).mean() > 0.8
    # a user who never made a request has no history: both answers agree exactly
    idle = np.setdiff1d(world.user_ids, logs.user_id.unique())
    assert len(idle) > 0
    it = world.item_ids[:50]
    u = np.full(50, idle[0])
    np.testing.assert_array_equal(world.true_click_prob(u, it, 3, 1, "end"), world.true_click_prob(u, it, 3, 1, None))


def test_load_round_trips_ground_truth(small):
    world, out = small
    back = World.load(out)
    assert back.config == world.config
    rng = np.random.default_rng(5)
    u = rng.choice(world.user_ids, 300)
    i = rng.choice(world.item_ids, 300)
    hour, tab = rng.integers(0, 24, 300), rng.integers(0, SMALL.n_tabs, 300)
    for hist in ("end", None):
        np.testing.assert_array_equal(back.true_click_prob(u, i, hour, tab, hist),
                                      world.true_click_prob(u, i, hour, tab, hist))
    a_ids, a_p = world.oracle_topk(u[:5], hour[:5], tab[:5], 7)
    b_ids, b_p = back.oracle_topk(u[:5], hour[:5], tab[:5], 7)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_p, b_p)


def test_oracle_topk_equals_exhaustive_search(small):
    world, _ = small
    users = world.user_ids[[3, 100, 900]]
    hour, tab, k = np.array([0, 12, 21]), np.array([0, 1, 4]), 10
    # chunk_pairs=300 forces 100-item chunks over 1200 items, exercising the running top-k merge
    ids, p = world.oracle_topk(users, hour, tab, k, chunk_pairs=300)
    for b in range(3):
        full = world.true_click_prob(np.full(world.n_items, users[b]), world.item_ids, hour[b], tab[b])
        best = np.argsort(-full, kind="stable")[:k]
        np.testing.assert_array_equal(ids[b], world.item_ids[best])
        np.testing.assert_allclose(p[b], full[best], rtol=1e-12)
    # candidate lists: shared [C] and per-user [B, C]
    cand = world.item_ids[::7]
    ids_c, p_c = world.oracle_topk(users, hour, tab, 3, candidate_items=cand, history=None)
    full = world.true_click_prob(np.full(len(cand), users[1]), cand, hour[1], tab[1], history=None)
    np.testing.assert_array_equal(ids_c[1], cand[np.argsort(-full, kind="stable")[:3]])
    per_user = np.stack([world.item_ids[b::11][:20] for b in range(3)])
    ids_p, _ = world.oracle_topk(users, hour, tab, 2, candidate_items=per_user, chunk_pairs=15)
    for b in range(3):
        full = world.true_click_prob(np.full(20, users[b]), per_user[b], hour[b], tab[b])
        np.testing.assert_array_equal(ids_p[b], per_user[b][np.argsort(-full, kind="stable")[:2]])
    with pytest.raises(ValueError, match="k must be"):
        world.oracle_topk(users, 0, 0, world.n_items + 1)


def test_corpus_click_mass_is_the_sum_over_the_corpus_and_what_random_exposure_converges_to(small):
    world, _ = small
    users = world.user_ids[[3, 100, 900]]
    hour, tab = np.array([0, 12, 21]), np.array([0, 1, 4])
    mass = world.corpus_click_mass(users, hour, tab, chunk_pairs=300)  # 100-item chunks
    static = world.corpus_click_mass(users, hour, tab, history=None)
    for b in range(3):
        full = world.true_click_prob(np.full(world.n_items, users[b]), world.item_ids, hour[b], tab[b])
        assert mass[b] == pytest.approx(full.sum(), rel=1e-12)
        full = world.true_click_prob(np.full(world.n_items, users[b]), world.item_ids, hour[b], tab[b], None)
        assert static[b] == pytest.approx(full.sum(), rel=1e-12)
    # Random exposure (items uniform over the corpus at every position, clicked with exam(position) * p): the
    # pooled share of the clicks that land on a fixed list -> sum_list p / sum_corpus p. Only each position's
    # uniform marginal matters to that ratio, so items are drawn with replacement here (the world draws distinct
    # items: the same marginals).
    rng = np.random.default_rng(0)
    r = 60
    u, h, t = world.user_ids[rng.integers(0, world.n_users, r)], rng.integers(0, 24, r), rng.integers(0, 5, r)
    lists, _ = world.oracle_topk(u, h, t, 10)
    lists[::2] = world.item_ids[rng.integers(0, world.n_items, (r // 2, 10))]  # half the requests: random lists
    p_all = np.stack([world.true_click_prob(np.full(world.n_items, u[b]), world.item_ids, h[b], t[b])
                      for b in range(r)])  # [r, I]
    in_list = np.stack([np.isin(world.item_ids, lists[b]) for b in range(r)])
    expected = (p_all * in_list).sum() / p_all.sum()
    size, draws = world.config.request_size, 20_000
    exam = (1.0 + np.arange(size)) ** -world.config.position_bias
    hits = clicks = 0
    for b in range(r):
        shown = rng.integers(0, world.n_items, (draws, size))
        click = rng.random((draws, size)) < exam * p_all[b][shown]
        clicks += click.sum()
        hits += (click & in_list[b][shown]).sum()
    # about 17,000 hits: a relative SE near 0.8%; 4% is 5 SE
    assert hits > 10_000 and hits / clicks == pytest.approx(expected, rel=0.04)


def test_deterministic_under_seed_and_different_under_another(small, tmp_path):
    world, out = small
    generate_world(tmp_path / "again", SMALL)
    for name in LOG_FILES + (W.USER_FEATURES_FILE, W.VIDEO_FEATURES_FILE):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    a, b = read_npz(out / W.WORLD_STATE), read_npz(tmp_path / "again" / W.WORLD_STATE)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = generate_world(tmp_path / "other", WorldConfig(**{**SMALL.to_dict(), "seed": 1}))
    assert (out / LOG_FILES[0]).read_bytes() != (tmp_path / "other" / LOG_FILES[0]).read_bytes()
    assert not np.array_equal(world._a["user_vec"], other._a["user_vec"])


def test_more_items_and_users_than_the_real_tables(tmp_path):
    cfg = WorldConfig(seed=2, n_users=27_400, n_items=9_000, n_days=2, mean_requests_per_user=0.3)
    world = generate_world(tmp_path, cfg)
    items = pd.read_csv(tmp_path / W.VIDEO_FEATURES_FILE, dtype={"tag": "string"})
    users = pd.read_csv(tmp_path / W.USER_FEATURES_FILE)
    assert len(items) == 9000 and items.video_id.is_unique and len(users) == 27_400 and users.user_id.is_unique
    # new ids follow the real ones: videos 7583.., users 27285..
    np.testing.assert_array_equal(items.video_id.to_numpy()[7583:], np.arange(7583, 9000))
    np.testing.assert_array_equal(users.user_id.to_numpy()[27285:], np.arange(27285, 27400))
    new = items.iloc[7583:]
    assert new.author_id.isin(items.author_id.iloc[:7583]).all()
    assert new.tag.dropna().isin(items.tag.iloc[:7583].dropna()).all()
    assert (new.video_duration.dropna() > 0).all() and set(new.video_type) <= set(items.video_type.iloc[:7583])
    logs = pd.concat([pd.read_csv(tmp_path / f) for f in world.summary()["files"]])
    assert logs.video_id.isin(items.video_id).all() and (logs.video_id >= 7583).any()
    assert logs.user_id.isin(users.user_id).all() and (logs.user_id >= 27285).any()
    p = world.true_click_prob(np.array([27_399]), np.array([8_999]), 5, 0)
    assert p.shape == (1,) and 0.0 < p[0] < 1.0


@pytest.mark.parametrize(
    "field, value",
    [("n_days", 0), ("request_size", 0), ("candidates_per_request", 3), ("random_fraction", 1.5),
     ("user_noise", -0.1), ("start_date", "April 8"), ("n_users", 0), ("n_items", 10), ("position_bias", -1.0),
     ("policy_noise", float("nan")), ("latent_dim", 2.5), ("history_half_life_hours", 0.0)],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"WorldConfig.{field}"):
        WorldConfig(**{field: value})


def test_bad_inputs_raise_clear_errors(small, tmp_path):
    world, _ = small
    with pytest.raises(FileNotFoundError, match="user_features_pure.csv"):
        generate_world(tmp_path / "w", SMALL, data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown user_id 999999"):
        world.true_click_prob(np.array([999_999]), world.item_ids[:1], 0, 0)
    with pytest.raises(ValueError, match="hour must be in 0..23, got 24"):
        world.true_click_prob(world.user_ids[:1], world.item_ids[:1], 24, 0)
    with pytest.raises(ValueError, match="tab must be in 0..4, got 5"):
        world.true_click_prob(world.user_ids[:1], world.item_ids[:1], 0, 5)
    with pytest.raises(ValueError, match="history must be"):
        world.true_click_prob(world.user_ids[:1], world.item_ids[:1], 0, 0, history="start")
    bad_state = HistoryState(*(np.zeros((2, 2), np.float32) for _ in range(4)), hour=0.0)
    with pytest.raises(ValueError, match="HistoryState.tag_click"):
        world.true_click_prob(world.user_ids[:1], world.item_ids[:1], 0, 0, history=bad_state)
    with pytest.raises(ValueError, match="unknown field"):
        WorldConfig.from_dict({"seed": 0, "n_user": 5})
    # logs of another world in the folder would be mixed in by a loader: refused before anything is written
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "log_standard_5_01_to_5_02_pure.csv").write_text(HEADER + "\n")
    with pytest.raises(FileExistsError, match="log_standard_5_01_to_5_02_pure.csv"):
        generate_world(tmp_path / "busy", SMALL)


def test_auc_helper_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.standard_normal(500) + y, 1)  # rounded: many ties, which both must average
    assert world_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
