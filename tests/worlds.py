"""Tiny worlds shared by the test modules: plain builders (so spawned DDP workers can call them too).

- :data:`SPEC` / :func:`make_table`: an encoded impression table with planted user-group x item-category effects
  (the rankers' tests, training, distributed training);
- :func:`rank_log_world`: requests, candidate lists and a planted scorer (rank logs);
- :func:`tower_world`: users, items, requests and a teacher with effects no tower sees (two-tower students);
- :func:`kuairand_dir`, :func:`write_ml1m`, :func:`write_ml100k`, :func:`write_custom_example`: tiny files in each
  loader's layout;
- :func:`event_history`, :func:`requests_at`: a hand-written event log and requests (channels, the towers' prior).

``conftest.py`` wraps the file builders as fixtures (``kuairand_logs``, ``ml1m_dir``, ``custom_example``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from cascade.data.batches import EncodedTable, FeatureSpec
from cascade.data.kuairand import LOG_COLUMNS
from cascade.distill.ranklog import sample_candidates
from cascade.models.two_tower import TowerInputs

REPO = Path(__file__).resolve().parents[1]
KUAIRAND_SIDE = REPO / "data"
# MovieLens-100K is not in the repository (research licence): CASCADE_ML100K names its folder; the tests that
# need it skip without it.
ML100K = Path(os.environ["CASCADE_ML100K"]) if os.environ.get("CASCADE_ML100K") else None

# ------------------------------------------------------------------------------------------------ ranker table

N_USERS, N_ITEMS, N_GROUPS, N_CATS = 300, 120, 6, 6

SPEC = FeatureSpec(
    cat_names=("user_id", "user_group", "item_id", "item_cat", "hour"),
    cat_sides=("user", "user", "item", "item", "context"),
    cat_cardinality=(N_USERS + 1, N_GROUPS + 1, N_ITEMS + 1, N_CATS + 1, 25),
    num_names=("item_pop", "cross_num", "priv"),
    num_sides=("item", "cross", "privileged"),
)


def make_table(n: int, seed: int, world_seed: int = 0) -> EncodedTable:
    """``n`` impressions in requests of 10 rows (one user per request); the world (W, groups, categories) is
    fixed by ``world_seed`` so tables drawn with different ``seed`` share it."""
    w = np.random.default_rng(world_seed)
    interaction = w.standard_normal((N_GROUPS, N_CATS))
    user_group = w.integers(0, N_GROUPS, N_USERS)
    item_cat = w.integers(0, N_CATS, N_ITEMS)
    item_pop = w.standard_normal(N_ITEMS).astype(np.float32)

    rng = np.random.default_rng(seed)
    n_req = n // 10
    req_user = rng.integers(0, N_USERS, n_req)
    user = np.repeat(req_user, 10)
    item = rng.integers(0, N_ITEMS, n)
    hour = np.repeat(rng.integers(0, 24, n_req), 10)
    cross_num = rng.standard_normal(n).astype(np.float32)
    z = 1.5 * interaction[user_group[user], item_cat[item]] + 1.0 * cross_num - 0.5
    label = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
    priv = (z + 0.3 * rng.standard_normal(n)).astype(np.float32)
    cat = np.stack([user + 1, user_group[user] + 1, item + 1, item_cat[item] + 1, hour + 1], axis=1).astype(np.int64)
    num = np.stack([item_pop[item], cross_num, priv], axis=1).astype(np.float32)
    return EncodedTable(
        SPEC, cat, num, label,
        request_id=np.repeat(np.arange(n_req), 10).astype(np.int64) + seed * 10**6,
        user_id=user.astype(np.int64), item_id=item.astype(np.int64),
        time_ms=np.arange(n, dtype=np.int64), is_rand=(rng.random(n) < 0.2).astype(np.int8),
        extra={"true_logit": z.astype(np.float32)},
    )


# ------------------------------------------------------------------------------------------------ rank log


def rank_log_world(r: int = 37, n_items: int = 60, L: int = 9, seed: int = 0):
    """``r`` requests of users 500..519 with candidate lists of ``L`` items (every fifth list two short), item ids
    10,000 + 7 * row, and a scorer of planted user / item vectors. Returns (requests frame, candidates [r, L],
    scorer(request_rows, item_rows) -> logits, item_ids, the expected logits [r, L], the scorer's batch sizes)."""
    rng = np.random.default_rng(seed)
    requests = pd.DataFrame({
        "request_id": 1000 + np.arange(r, dtype=np.int64) * 3,
        "user_id": rng.integers(500, 520, r).astype(np.int64),
        "time_ms": np.arange(r, dtype=np.int64) * 10,
    })
    requests["user_row"] = requests["user_id"] - 500
    imp = rng.integers(0, n_items, (r, 3))
    cand = sample_candidates(imp, n_items, L, rng=rng)
    cand[::5, -2:] = -1  # some short lists
    u = rng.normal(size=(20, 4)).astype(np.float32)
    v = rng.normal(size=(n_items, 4)).astype(np.float32)
    item_ids = 10_000 + np.arange(n_items, dtype=np.int64) * 7
    calls = []

    def scorer(rows, c):
        calls.append(len(rows))
        assert (c >= 0).all()  # padding arrives as row 0
        return np.einsum("bd,bld->bl", u[requests["user_row"].to_numpy()[rows]], v[c])

    expected = np.einsum("bd,bld->bl", u[requests["user_row"].to_numpy()], v[np.maximum(cand, 0)])
    return requests, cand, scorer, item_ids, expected, calls


# ------------------------------------------------------------------------------------------------ two-tower students


def tower_world(seed: int, n_users: int = 300, n_items: int = 500, train_per_user: int = 4, n_imp: int = 20):
    """Users and items with group / tag latents; a teacher = fixed random bilinear form of the latents plus
    nonlinear terms (tanh of a latent product, item quality, hour x tag table) that no tower sees directly.

    Requests: train_per_user per user for training, then one per user for validation, each with a random hour
    and n_imp uniformly impressed items. Returns (inputs, teacher(request_rows [B], item_rows [B, L]) -> [B, L],
    request frame, impressed [R, n_imp], n_train, rng)."""
    rng = np.random.default_rng(seed)
    n_groups, n_tags, n_hours, d = 6, 10, 4, 6
    group, tag = rng.integers(0, n_groups, n_users), rng.integers(0, n_tags, n_items)
    zu = rng.normal(size=(n_groups, d))[group] + 0.7 * rng.normal(size=(n_users, d))
    zi = rng.normal(size=(n_tags, d))[tag] + 0.7 * rng.normal(size=(n_items, d))
    activity, quality = rng.normal(size=n_users).astype(np.float32), rng.normal(size=n_items).astype(np.float32)
    bilinear, hour_tag = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(n_hours, n_tags))
    n_req = n_users * (train_per_user + 1)
    req_user = np.tile(np.arange(n_users), train_per_user + 1)
    hour = rng.integers(0, n_hours, n_req)

    def teacher(req_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        u, v = zu[req_user[req_rows]], zi[item_rows]  # [B, d], [B, L, d]
        return (np.einsum("bd,de,ble->bl", u, bilinear, v) + 1.5 * np.tanh(u[:, None, 0] * v[..., 1])
                + 0.5 * quality[item_rows] + 0.7 * hour_tag[hour[req_rows][:, None], tag[item_rows]]).astype(np.float32)

    inputs = TowerInputs(
        FeatureSpec(("user_id", "group"), ("user", "user"), (n_users + 1, n_groups + 1), ("activity",), ("user",)),
        np.stack([np.arange(1, n_users + 1), group + 1], 1).astype(np.int64), activity[:, None],
        FeatureSpec(("item_id", "tag"), ("item", "item"), (n_items + 1, n_tags + 1), ("quality",), ("item",)),
        np.stack([np.arange(1, n_items + 1), tag + 1], 1).astype(np.int64), quality[:, None],
        FeatureSpec(("hour",), ("context",), (n_hours + 1,), (), ()),
        (hour + 1)[:, None].astype(np.int64), np.zeros((n_req, 0), np.float32),
        np.arange(n_users, dtype=np.int64), np.arange(n_items, dtype=np.int64), np.arange(n_req, dtype=np.int64))
    requests = pd.DataFrame({"request_id": np.arange(n_req), "user_id": req_user, "user_row": req_user,
                             "time_ms": np.arange(n_req)})
    impressed = np.argsort(rng.random((n_req, n_items)), axis=1)[:, :n_imp]
    return inputs, teacher, requests, impressed, n_users * train_per_user, rng


# ------------------------------------------------------------------------------------------------ loader files


# 2022-04-08 16:00:00 in Beijing (UTC+8) = 2022-04-08 08:00:00 UTC
# = 1649376000 s (2022-04-08 00:00 UTC) + 8 * 3600 s = 1649404800 s -> ms. 2022-04-08 was a Friday.
T0 = 1_649_404_800_000


def log_row(user, video, time_ms, tab=1, is_rand=0, click=0, date=20220408, hourmin=None, play=1000):
    hourmin = 1600 if hourmin is None else hourmin
    return {"user_id": user, "video_id": video, "date": date, "hourmin": hourmin, "time_ms": time_ms,
            "is_click": click, "is_like": 0, "is_follow": 0, "is_comment": 0, "is_forward": 0, "is_hate": 0,
            "long_view": 0, "play_time_ms": play, "duration_ms": 30000, "profile_stay_time": 0,
            "comment_stay_time": 0, "is_profile_enter": 0, "is_rand": is_rand, "tab": tab}


def write_log(path: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows, columns=list(LOG_COLUMNS)).to_csv(path, index=False)


def kuairand_dir(tmp_path: Path) -> Path:
    """Real KuaiRand-Pure side tables (linked) + three tiny log files in the official layout."""
    d = tmp_path / "kuairand"
    d.mkdir()
    for name in ("user_features_pure.csv", "video_features_basic_pure.csv"):
        (d / name).symlink_to(KUAIRAND_SIDE / name)
    write_log(d / "log_standard_4_08_to_4_21_pure.csv", [
        log_row(0, 10, T0 + 5000, click=1),    # request A, second by time (tie with video 13: file order)
        log_row(0, 11, T0 + 1000),             # request A, first
        log_row(1, 12, T0 + 3000),             # request B (other user)
        log_row(0, 13, T0 + 5000),             # request A, third
        log_row(0, 14, T0 + 2000, tab=2),      # request C (other tab)
    ])
    write_log(d / "log_standard_4_22_to_5_08_pure.csv", [
        log_row(0, 15, T0 + 3_600_010, hourmin=1700, click=1),  # request D (next hour)
    ])
    write_log(d / "log_random_4_22_to_5_08_pure.csv", [
        log_row(0, 16, T0 + 1500, is_rand=1),  # request E (random traffic is its own request)
    ])
    return d


def write_ml1m(d: Path) -> None:
    d.mkdir()
    # Days (UTC): 978300000 // 86400 = 11322, 978300760 // 86400 = 11322, 978301000 // 86400 = 11322,
    # 978400000 // 86400 = 11324.
    (d / "ratings.dat").write_text(
        "1::10::5::978300760\n1::20::3::978300760\n1::30::4::978300000\n2::10::4::978301000\n1::40::2::978400000\n",
        encoding="latin-1")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", encoding="latin-1")
    (d / "movies.dat").write_text(
        "10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Angela (1995)::Drama\n"
        "30::Toy Story (1995)::Animation|Children's|Comedy\n40::Caf\xe9 Film::Comedy\n", encoding="latin-1")


def write_ml100k(d: Path, n_users: int = 80, n_items: int = 40, days: int = 60, seed: int = 0) -> None:
    """A MovieLens-100K folder (u.data, u.user, u.item in the official layout) of ``n_users`` users who each rate
    8-20 of ``n_items`` movies on 1-3 days of ``days``; a user likes the movies of one genre (rating 4-5), the rest
    get 1-3."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    genre = rng.integers(1, 7, n_items)  # each movie's one genre: GENRES[1..6]
    rows, t0 = [], 880_000_000
    for u in range(1, n_users + 1):
        liked = rng.integers(1, 7)
        rated = rng.choice(n_items, rng.integers(8, 21), replace=False)
        on = np.sort(rng.choice(days, rng.integers(1, 4), replace=False))
        for i in rated:
            t = t0 + int(rng.choice(on)) * 86_400 + int(rng.integers(0, 80_000))
            r = int(rng.integers(4, 6)) if genre[i] == liked else int(rng.integers(1, 4))
            rows.append(f"{u}\t{i + 1}\t{r}\t{t}")
    (d / "u.data").write_text("\n".join(rows) + "\n", encoding="latin-1")
    jobs = ("student", "engineer", "writer", "other")
    (d / "u.user").write_text("".join(f"{u}|{int(rng.integers(15, 70))}|{'MF'[u % 2]}|{jobs[u % 4]}|{10000 + u}\n"
                                      for u in range(1, n_users + 1)), encoding="latin-1")
    flags = np.zeros((n_items, 19), np.int64)
    flags[np.arange(n_items), genre] = 1
    (d / "u.item").write_text("".join(f"{i + 1}|Movie {i + 1} (1995)|01-Jan-1995||http://x/{i + 1}|"
                                      + "|".join(map(str, flags[i])) + "\n" for i in range(n_items)),
                              encoding="latin-1")


def write_custom_example(d: Path) -> Path:
    """The tiny dataset that pipelines/custom.example.toml describes."""
    d.mkdir(exist_ok=True)
    pd.DataFrame({"uid": [7, 8], "country": ["de", "fr"], "age": [31.0, 45.0]}).to_csv(d / "users.csv", index=False)
    pd.DataFrame({"sku": [100, 101, 102], "category": ["shoe", "hat", "shoe"],
                  "price_eur": [59.9, 15.0, 80.0]}).to_csv(d / "items.csv", index=False)
    # 1_700_000_000 s = 2023-11-14 22:13:20 UTC = 23:13:20 at UTC+1 (a Tuesday).
    pd.DataFrame({
        "uid": [7, 7, 8, 7],
        "sku": [101, 100, 100, 102],
        "ts": [1_700_000_060, 1_700_000_000, 1_700_000_030, 1_700_090_000],
        "clicked": [1, 0, 0, 1],
        "session": ["s1", "s1", "s2", "s3"],
        "dwell_s": [12.0, 0.0, 0.0, 40.0],
    }).to_csv(d / "impressions.csv", index=False)
    shutil.copy(REPO / "pipelines" / "custom.example.toml", d / "custom.example.toml")
    return d / "custom.example.toml"


def event_history(rows):
    """An EventHistory from (user_id, item_id, time_ms, click) tuples."""
    from cascade.data.history import EventHistory

    u, i, t, c = (np.array(x, np.int64) for x in zip(*rows))
    return EventHistory(u, i, t, c)


def requests_at(users, times):
    """Requests of these users at these times (no context)."""
    from cascade.data.requests import Requests

    return Requests(np.array(users, np.int64), np.array(times, np.int64))


def tiny_channels(*names: str) -> list[str]:
    """``--set`` strings for pipelines/tiny.toml that build only the channels ``names``: tiny's settings of the
    other channels put back to their defaults (set beside no channel that reads them, the config refuses them)."""
    import json
    import tomllib

    from cascade.pipeline.config import CHANNEL_SETTINGS, ChannelsSection

    tiny = tomllib.loads((REPO / "pipelines" / "tiny.toml").read_text())["channels"]
    default = ChannelsSection()
    back = [f"channels.{k}={json.dumps(list(getattr(default, k)))}" for k in tiny
            if k in CHANNEL_SETTINGS and not set(CHANNEL_SETTINGS[k]) & set(names)]
    return [f"channels.build={json.dumps(list(names))}", *back]
