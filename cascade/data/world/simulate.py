"""The world's simulation: requests drawn per user and hour, each hour step's candidates, logging policy, clicks
and history updates, and the post-click columns of the KuaiRand layout."""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from ...arrays import distinct
from ..sampling import CdfSampler
from .config import GAP_MS, HOUR_MS, HOUR_WEIGHTS, HistoryState, WorldConfig
from .model import History, World, sigmoid


def sample_distinct(rng: np.random.Generator, n_rows: int, k: int, n: int,
                    first: np.ndarray | None = None) -> np.ndarray:
    """[n_rows, k] item indices in 0..n-1, distinct within each row. ``first``: an initial draw whose
    duplicates are replaced by uniform draws (the popularity-weighted candidates). Rows come out sorted."""
    x = rng.integers(0, n, (n_rows, k)) if first is None else first
    if 2 * k > n:
        # dense case (tiny corpora): a random permutation prefix per row
        return np.sort(np.argsort(rng.random((n_rows, n)), axis=1)[:, :k], axis=1)
    while True:
        x = np.sort(x, axis=1)
        dup = np.zeros(x.shape, bool)
        dup[:, 1:] = x[:, 1:] == x[:, :-1]
        nd = int(dup.sum())
        if nd == 0:
            return x
        x[dup] = rng.integers(0, n, nd)


def draw_requests(cfg: WorldConfig, activity: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All requests, at most one per (user, day, hour, tab, is_rand), sorted by hour step."""
    U = len(activity)
    rate = cfg.mean_requests_per_user * activity / activity.mean()
    n_req = rng.poisson(rate)
    user = np.repeat(np.arange(U, dtype=np.int64), n_req)
    R = len(user)
    day = rng.integers(0, cfg.n_days, R)
    hour = rng.choice(24, size=R, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    tab_p = 0.5 ** np.arange(cfg.n_tabs)
    tab = rng.choice(cfg.n_tabs, size=R, p=tab_p / tab_p.sum())
    is_rand = (rng.random(R) < cfg.random_fraction).astype(np.int64)
    return unique_requests(day * 24 + hour, user, tab, is_rand, cfg, U, rng)


def unique_requests(step: np.ndarray, user: np.ndarray, tab: np.ndarray, is_rand: np.ndarray, cfg: WorldConfig,
                    n_users: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Requests from drawn (hour step, user, tab, is_rand) [R]: duplicates removed and sorted by time, then each
    request's gap between impressions and start offset in its hour drawn from ``rng``. Shared by the in-memory
    and the chunked world (same draws in the same order)."""
    # step-major key: np.unique both removes duplicate keys and sorts the requests by time
    key = distinct(((step * n_users + user) * cfg.n_tabs + tab) * 2 + is_rand)
    is_rand = key % 2
    key //= 2
    tab = key % cfg.n_tabs
    key //= cfg.n_tabs
    user = key % n_users
    step = key // n_users
    R = len(key)
    gap = rng.integers(GAP_MS[0], GAP_MS[1] + 1, R)
    offset = rng.integers(0, HOUR_MS - cfg.request_size * GAP_MS[1], R)
    return {"user": user, "step": step, "tab": tab, "is_rand": is_rand, "gap": gap, "offset": offset}


#: Per-impression arrays of a simulated hour step (see :func:`simulate_step`).
STEP_KEYS = ("req", "item", "pos", "click", "examined", "sat", "watch", "ctx", "hist", "logit")


def simulate_step(world: World, req: dict[str, np.ndarray], lo: int, hi: int, s: int, hist: History,
                  rng: np.random.Generator, pop: CdfSampler) -> dict[str, np.ndarray]:
    """Simulate the requests ``lo:hi`` of ``req`` (all in hour step ``s``) and add their events to ``hist``.

    Returns the per-impression arrays of :data:`STEP_KEYS`, each [n_requests * request_size]: ``req`` the row of
    the request in ``req``, ``item`` the internal item index, ``pos`` the position, then click, examined,
    satisfaction, watch fraction, and the context / history terms and the full appeal logit.
    """
    cfg, a = world.config, world._c
    I, S, C = world.n_items, cfg.request_size, cfg.candidates_per_request
    ridx = np.arange(lo, hi)
    hour = s % 24
    rand = req["is_rand"][ridx] == 1
    std_r, rnd_r = ridx[~rand], ridx[rand]
    shown, logit, aff, ctx, hterm = [], [], [], [], []
    if len(std_r):
        n = len(std_r)
        popular = pop.draw(rng.random((n, C)))
        uniform = rng.integers(0, I, (n, C))
        cand = np.where(rng.random((n, C)) < cfg.popular_candidate_fraction, popular, uniform)
        cand = sample_distinct(rng, n, C, I, first=cand)
        u = req["user"][std_r][:, None]
        tb = req["tab"][std_r][:, None]
        lg, af, cx, ht = world._logit_parts(u, cand, hour // 4, tb, hist, t=float(s))
        policy = lg + cfg.policy_noise * rng.standard_normal(lg.shape) \
            + cfg.policy_popularity_weight * a["item_pop"][cand]
        top = np.argpartition(-policy, S - 1, axis=1)[:, :S] if S < C else np.broadcast_to(np.arange(C), (n, C))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(policy, top, 1), axis=1), 1)
        for lst, arr in ((shown, cand), (logit, lg), (aff, af), (ctx, cx), (hterm, ht)):
            lst.append(np.take_along_axis(arr, top, 1))
    if len(rnd_r):
        n = len(rnd_r)
        items = rng.permuted(sample_distinct(rng, n, S, I), axis=1)
        u = req["user"][rnd_r][:, None]
        tb = req["tab"][rnd_r][:, None]
        lg, af, cx, ht = world._logit_parts(u, items, hour // 4, tb, hist, t=float(s))
        for lst, arr in ((shown, items), (logit, lg), (aff, af), (ctx, cx), (hterm, ht)):
            lst.append(arr)
    rows = np.concatenate([std_r, rnd_r])
    items = np.concatenate(shown)
    lg = np.concatenate(logit)
    n = len(rows)
    users = np.broadcast_to(req["user"][rows][:, None], (n, S))
    examined = rng.random((n, S)) < world.exam[None, :]
    click = examined & (rng.random((n, S)) < sigmoid(lg))
    sat = (cfg.satisfaction_affinity_weight * np.concatenate(aff) + a["item_quality"][items]
           + a["user_sat_bias"][users] + cfg.satisfaction_noise * rng.standard_normal((n, S)))
    watch = sigmoid(sat + 0.5 * rng.standard_normal((n, S)))
    click_w = np.where(click, 0.5 + sigmoid(sat), 0.0)
    # only examined exposures can tire the user: weight skips by the examination probability
    skip_w = np.where(click, 0.0, world.exam[None, :])
    hist.add(float(s), users.reshape(-1), a["item_tag"][items].reshape(-1), a["item_bucket"][items].reshape(-1),
             click_w.reshape(-1), skip_w.reshape(-1))
    out = {"req": np.repeat(rows, S), "pos": np.tile(np.arange(S), n)}
    for k, v in (("item", items), ("click", click), ("examined", examined), ("sat", sat), ("watch", watch),
                 ("logit", lg), ("ctx", np.concatenate(ctx)), ("hist", np.concatenate(hterm))):
        out[k] = v.reshape(-1)
    return out


def new_history(world: World) -> History:
    cfg = world.config
    return History(world.n_users, int(world._c["item_tag"].max()) + 1, cfg.author_buckets,
                   cfg.history_half_life_hours / math.log(2.0))


def popular_sampler(world: World) -> CdfSampler:
    pop_cdf = np.cumsum(np.exp(world._c["item_pop"]))
    pop_cdf /= pop_cdf[-1]
    return CdfSampler(pop_cdf)


def simulate(world: World, req: dict[str, np.ndarray], rng: np.random.Generator, progress: bool
              ) -> tuple[dict[str, np.ndarray], HistoryState]:
    """Run the hour steps. Returns per-impression arrays (internal indices) and the final history state."""
    n_steps = world.config.n_days * 24
    hist = new_history(world)
    pop = popular_sampler(world)
    bounds = np.searchsorted(req["step"], np.arange(n_steps + 1))
    out: dict[str, list[np.ndarray]] = {k: [] for k in STEP_KEYS}
    for s in tqdm(range(n_steps), disable=not progress, desc="world: hours", unit="h"):
        lo, hi = bounds[s], bounds[s + 1]
        if lo == hi:
            continue
        for k, v in simulate_step(world, req, lo, hi, s, hist, rng, pop).items():
            out[k].append(v)
    if not out["req"]:
        raise ValueError("the world has no requests: raise mean_requests_per_user, n_users or n_days")
    imp = {k: np.concatenate(v) for k, v in out.items()}
    return imp, hist.snapshot(float(n_steps))


def post_click(cfg: WorldConfig, imp: dict[str, np.ndarray], duration_ms: np.ndarray, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """The post-click columns of the KuaiRand layout, from satisfaction.

    Clicked videos are watched for a fraction ``watch`` of their duration. Examined but unclicked videos still
    autoplay in the feed for a while (a preview whose length grows with the appeal): their play time overlaps
    with that of short clicked views, so play time is informative about the click (a privileged signal) without
    determining it. Unexamined videos are scrolled past in well under two seconds. Likes, follows, comments,
    forwards and hates need a click.
    """
    N = len(duration_ms)
    click = imp["click"]
    sat = imp["sat"]
    r = rng.random((6, N))

    def draw(row: int, logit: np.ndarray) -> np.ndarray:
        return (click & (r[row] < sigmoid(logit))).astype(np.int64)

    preview = 0.6 * sigmoid(imp["logit"] + rng.standard_normal(N))
    scroll_ms = rng.uniform(200.0, 1500.0, N)
    play = np.where(click, np.round(duration_ms * imp["watch"]),
                    np.where(imp["examined"], np.round(duration_ms * preview),
                             np.round(np.minimum(scroll_ms, duration_ms))))
    play = play.astype(np.int64)
    enter = draw(5, sat - 3.5)
    comment = draw(2, sat - 5.0)
    return {
        "is_click": click.astype(np.int64),
        "is_like": draw(0, 2.0 * sat - 3.5),
        "is_follow": draw(1, 2.0 * sat - 6.0),
        "is_comment": comment,
        "is_forward": draw(3, sat - 5.5),
        "is_hate": draw(4, -2.0 * sat - 6.0),
        "long_view": (play >= 0.5 * duration_ms).astype(np.int64),
        "play_time_ms": play,
        "duration_ms": duration_ms.astype(np.int64),
        "profile_stay_time": enter * np.ceil(rng.exponential(10.0, N)).astype(np.int64),
        "comment_stay_time": comment * np.ceil(rng.exponential(20.0, N)).astype(np.int64),
        "is_profile_enter": enter,
    }
