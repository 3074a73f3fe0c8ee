"""The synthetic world: the embedded default data of cascade, with a known ground truth.

The world is built on the real KuaiRand-Pure side tables shipped in the project's ``data/`` folder
(``user_features_pure.csv``, ``video_features_basic_pure.csv``) and simulates ``n_days`` of a short-video feed
hour by hour. It writes its logs in the official KuaiRand layout, so one loader reads the world and a real
KuaiRand download, and it keeps every parameter of its click model, so :meth:`World.true_click_prob` and
:meth:`World.oracle_topk` give the ground truth that no logged data set can give.

Click model (all terms on the logit scale; ``u`` a user, ``i`` an item, ``h`` the hour of day, ``t`` the tab)::

    appeal(u, i, h, t) = base + <U_u, V_i> + w_pop * pop_i + w_q * quality_i + bias_u          (static)
                       + C_hour_group[h // 4, group_i] + C_tab_group[t, group_i]
                         + C_hour_vtype[h // 4, vtype_i]                                         (context x item)
                       + b_tag * log1p(tag_click[u, tag_i]) + b_author * log1p(author_click[u, bucket_i])
                         - f * (log1p(tag_skip[u, tag_i]) + log1p(author_skip[u, bucket_i]))    (history x item)
    P(click at position p) = exam(p) * sigmoid(appeal),   exam(p) = (1 + p) ** -position_bias

- ``U_u`` is a sum of embeddings of the user's real features (``user_active_degree``, ``register_days_range``,
  ``is_live_streamer``, ``is_video_author``, ``onehot_feat0..17``) plus noise; ``V_i`` a sum of embeddings of the
  item's first ``tag``, ``author_id``, ``music_type``, ``video_type`` and ``upload_type`` plus noise. Each is scaled
  so that ``<U_u, V_i>`` over random pairs has standard deviation ``affinity_scale``.
- ``pop_i`` is a heavy-tailed popularity (``exp(pop_i)`` is log-normal), correlated with tag, author and upload
  type; the logging policy samples candidates in proportion to ``exp(pop_i)``. ``quality_i`` is a hidden item
  quality that drives satisfaction more than appeal.
- The history terms are what an inner product of a user tower and an item tower cannot represent: decayed
  (half-life ``history_half_life_hours``), satisfaction-weighted clicks of the user on the item's tag and author
  raise the appeal with saturation (``log1p``); exposures without a click lower it (fatigue). Tags are held in a
  dense ``[n_users, n_tags]`` array (about 45 tags); authors in a hashed ``[n_users, author_buckets]`` table
  (each author maps to one bucket; colliding authors share state, and the ground truth is defined on the
  buckets, so it stays exactly consistent with the simulation).
- Post-click: a satisfaction logit ``sat = w_sat * <U_u, V_i> + quality_i + sat_bias_u + noise`` (correlated with
  but not equal to the appeal) drives ``play_time_ms`` (a fraction ``sigmoid(sat + noise)`` of the duration),
  ``long_view`` (fraction >= 0.5), likes, follows, comments, forwards, hates and profile visits. A click adds
  ``0.5 + sigmoid(sat)`` to the history state, so watch time is informative about the user's later clicks: it
  is a privileged signal in the sense of PFD.

Logging policy: each request draws ``candidates_per_request`` candidates (a ``popular_candidate_fraction`` share
in proportion to ``exp(pop_i)``, the rest uniform over the corpus: no users x items matrix is ever built), scores
them with the true appeal plus ``policy_noise`` Gaussian noise plus ``policy_popularity_weight * pop_i`` (a noisy,
popularity-biased production ranker), and shows the top ``request_size`` in score order. A ``random_fraction`` of
requests is random exposure (``is_rand = 1``): ``request_size`` distinct items drawn uniformly over the corpus and
shown in random order.

Time runs in hour steps; within a step all requests are simulated at once and read the history state from before
the step; the state is updated after the step. A request is keyed by ``(user, date, hour, tab, is_rand)`` and there
is at most one per key; its impressions get strictly increasing ``time_ms`` (2-15 s apart) in position order,
within the hour, and share ``date``, ``hourmin`` (``hour * 100``), ``tab`` and ``is_rand``. Times are epoch
milliseconds with ``date``/``hourmin`` in Beijing time (UTC+8), as in KuaiRand.

Output (``generate_world``): ``user_features_pure.csv``, ``video_features_basic_pure.csv`` (the real columns),
``log_standard_<m>_<dd>_to_<m>_<dd>_pure.csv`` split in two at about 2/3 of the period,
``log_random_<m>_<dd>_to_<m>_<dd>_pure.csv``, ``world.json`` (config + summary) and ``world_state.npz`` (every
array the ground truth needs; plain arrays, no pickle). :meth:`World.load` restores the ground truth from them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

import cascade
from cascade.arrays import PAD, pad_by_row, topk_rows
from cascade.artifacts import ArtifactError, atomic_path, read_json, read_npz, to_jsonable, write_json, write_npz
from cascade.data.ids import IdIndex
from cascade.data.sampling import CdfSampler
from cascade.data.schema import DataValidationError, check_columns, check_id_column

logger = logging.getLogger(__name__)

USER_FEATURES_FILE = "user_features_pure.csv"
VIDEO_FEATURES_FILE = "video_features_basic_pure.csv"
WORLD_JSON = "world.json"
WORLD_STATE = "world_state.npz"
WORLD_FORMAT_VERSION = 1

#: The exact header of the official KuaiRand log files.
KUAIRAND_LOG_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)

#: KuaiRand stores local time in Beijing (UTC+8).
BEIJING = dt.timezone(dt.timedelta(hours=8))
HOUR_MS = 3_600_000
#: Impressions of one request are shown this many ms apart (drawn per request, uniform in the range).
_GAP_MS = (2_000, 15_000)
#: Hours are grouped in 4-hour buckets for the context x item effect.
_HOUR_BUCKETS = 6
#: Items are grouped by tag into this many groups for the context x item effect.
_TAG_GROUPS = 8
#: Relative request intensity by hour of day (Beijing time): quiet nights, lunch and evening peaks.
_HOUR_WEIGHTS = np.array(
    [0.5, 0.3, 0.2, 0.15, 0.15, 0.2, 0.4, 0.7, 0.9, 1.0, 1.0, 1.1,
     1.3, 1.3, 1.1, 1.0, 1.0, 1.1, 1.3, 1.5, 1.7, 1.8, 1.6, 1.0]
)
#: Request rate multiplier by KuaiRand's ``user_active_degree``.
_ACTIVITY_LEVEL = {
    "full_active": 1.6, "high_active": 1.0, "middle_active": 0.6, "low_active": 0.3, "single_low_active": 0.15,
    "2_14_day_new": 0.5, "30day_retention": 0.3, "day_new": 0.3, "UNKNOWN": 0.5,
}
_USER_CAT_COLUMNS = (
    "user_active_degree", "register_days_range", "is_live_streamer", "is_video_author",
    *(f"onehot_feat{k}" for k in range(18)),
)
_ITEM_CAT_COLUMNS = ("tag", "author_id", "music_type", "video_type", "upload_type")
#: Weight of each item feature's embedding in the item factor (tags and authors carry the taste).
_ITEM_CAT_WEIGHTS = {"tag": 1.0, "author_id": 0.7, "music_type": 0.3, "video_type": 0.3, "upload_type": 0.3}


def embedded_data_dir() -> Path:
    """The folder of the KuaiRand-Pure side tables shipped with the project (``<project>/data``)."""
    return Path(cascade.__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the synthetic world. Frozen; validated on construction (ValueError naming the field).

    Sizes: ``n_users`` / ``n_items`` None keep the real tables (27,285 users, 7,583 videos); fewer is a seeded
    subsample, more adds perturbed copies of real rows with new ids.
    Traffic: each user makes on average ``mean_requests_per_user`` requests over the period (scaled by the user's
    real ``user_active_degree`` and a log-normal activity level), each showing ``request_size`` items.
    Logging policy: ``candidates_per_request`` candidates, a ``popular_candidate_fraction`` of them drawn in
    proportion to exp(popularity); shown by true appeal + ``policy_noise`` * N(0, 1) + ``policy_popularity_weight``
    * popularity; ``random_fraction`` of requests show uniform random items instead (is_rand = 1).
    Click model (see the module doc): ``latent_dim``, ``user_noise`` / ``item_noise`` (shares of factor variance
    from noise), ``affinity_scale``, ``base_logit``, ``user_bias_scale``, ``popularity_sigma`` (log-normal sigma),
    ``popularity_weight``, ``quality_weight``, ``context_scale``, ``tag_click_weight``, ``author_click_weight``,
    ``fatigue_weight``, ``history_half_life_hours``, ``author_buckets`` (hashed per-user author table: memory is
    n_users x author_buckets x 8 bytes), ``position_bias`` (examination (1 + position) ** -position_bias).
    Post-click: ``satisfaction_affinity_weight``, ``satisfaction_noise``.
    """

    seed: int = 0
    n_users: int | None = None
    n_items: int | None = None
    n_days: int = 21
    start_date: str = "2022-04-08"
    mean_requests_per_user: float = 10.0
    request_size: int = 6
    candidates_per_request: int = 50
    popular_candidate_fraction: float = 0.7
    random_fraction: float = 0.05
    n_tabs: int = 5
    latent_dim: int = 16
    #: share of the variance of the user / item factors not explained by the real features
    user_noise: float = 0.4
    item_noise: float = 0.3
    #: standard deviation of <U_u, V_i> over random pairs
    affinity_scale: float = 1.0
    base_logit: float = -1.4
    user_bias_scale: float = 0.5
    popularity_sigma: float = 1.2
    popularity_weight: float = 0.3
    quality_weight: float = 0.3
    #: standard deviation of the context x item tables
    context_scale: float = 0.6
    #: history weights: strong enough that the history terms are worth about 5 AUC points to an oracle
    tag_click_weight: float = 2.0
    author_click_weight: float = 2.0
    fatigue_weight: float = 0.6
    history_half_life_hours: float = 168.0
    author_buckets: int = 256
    position_bias: float = 0.8
    policy_noise: float = 2.0
    policy_popularity_weight: float = 0.3
    satisfaction_affinity_weight: float = 0.8
    satisfaction_noise: float = 0.8

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"WorldConfig.{name} = {getattr(self, name)!r}: {what}")

        ints = ("seed", "n_days", "request_size", "candidates_per_request", "n_tabs", "latent_dim", "author_buckets")
        for name in ints + ("n_users", "n_items"):
            v = getattr(self, name)
            if v is None and name in ("n_users", "n_items"):
                continue
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), name, "must be an integer")
        floats = [f.name for f in dataclasses.fields(self) if f.type in ("float", float)]
        for name in floats:
            v = getattr(self, name)
            need(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                 and math.isfinite(float(v)), name, "must be a finite number")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.n_users is None or self.n_users >= 1, "n_users", "must be >= 1 or None (the real users)")
        need(self.n_items is None or self.n_items >= 1, "n_items", "must be >= 1 or None (the real videos)")
        need(1 <= self.n_days <= 3660, "n_days", "must be in 1..3660")
        try:
            dt.date.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            raise ValueError(
                f"WorldConfig.start_date = {self.start_date!r}: must be an ISO date like '2022-04-08'"
            ) from None
        need(self.mean_requests_per_user > 0, "mean_requests_per_user", "must be > 0")
        need(1 <= self.request_size <= 100, "request_size", "must be in 1..100")
        need(self.candidates_per_request >= self.request_size, "candidates_per_request",
             f"must be >= request_size ({self.request_size})")
        need(self.n_items is None or self.n_items >= self.candidates_per_request, "n_items",
             f"must be >= candidates_per_request ({self.candidates_per_request})")
        need(0.0 <= self.popular_candidate_fraction <= 1.0, "popular_candidate_fraction", "must be in [0, 1]")
        need(0.0 <= self.random_fraction <= 1.0, "random_fraction", "must be in [0, 1]")
        need(1 <= self.n_tabs <= 100, "n_tabs", "must be in 1..100")
        need(1 <= self.latent_dim <= 1024, "latent_dim", "must be in 1..1024")
        need(1 <= self.author_buckets <= 1 << 20, "author_buckets", "must be in 1..2**20")
        for name in ("user_noise", "item_noise"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1] (a share of variance)")
        for name in ("affinity_scale", "user_bias_scale", "popularity_sigma", "context_scale", "policy_noise",
                     "satisfaction_noise", "position_bias", "fatigue_weight", "tag_click_weight",
                     "author_click_weight", "quality_weight", "popularity_weight", "policy_popularity_weight",
                     "satisfaction_affinity_weight"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.history_half_life_hours > 0, "history_half_life_hours", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"WorldConfig: unknown field(s) {unknown}")
        return cls(**d)


@dataclass
class HistoryState:
    """Per-user history at one time, already decayed to that time (values = decayed sums).

    tag_click / tag_skip: [n_users, n_tags] float32, satisfaction-weighted clicks / examined exposures without
    a click on each tag. author_click / author_skip: [n_users, author_buckets] float32, the same per author bucket.
    hour: hours since the start of the simulation the values refer to.
    """

    tag_click: np.ndarray
    tag_skip: np.ndarray
    author_click: np.ndarray
    author_skip: np.ndarray
    hour: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log_file_tag(day: dt.date) -> str:
    return f"{day.month}_{day.day:02d}"


def _std_normal_embed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """[n, d] rows with unit expected squared norm."""
    return rng.standard_normal((n, d)) / math.sqrt(d)


def _standardise(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


def _codes(values: pd.Series) -> np.ndarray:
    """Dense integer codes of a column; NaN gets its own code (0..n_unique)."""
    codes, _ = pd.factorize(values, sort=True, use_na_sentinel=False)
    return codes.astype(np.int64)


def _first_tag(tag: pd.Series, source: str) -> np.ndarray:
    """KuaiRand's ``tag`` is a string, sometimes a comma list ("2,11"), sometimes NaN: the first tag, -1 for NaN."""
    first = tag.astype("string").str.split(",").str[0].str.strip()
    num = pd.to_numeric(first, errors="coerce")
    bad = first.notna() & num.isna()
    if bad.any():
        raise DataValidationError(f"{source}: column 'tag' has a non-numeric tag {first[bad].iloc[0]!r}")
    return num.fillna(-1).astype(np.int64).to_numpy()


def _read_tables(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [data_dir / USER_FEATURES_FILE, data_dir / VIDEO_FEATURES_FILE]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"KuaiRand-Pure side table not found: {p}")
    users = pd.read_csv(paths[0])
    items = pd.read_csv(paths[1], dtype={"tag": "string", "video_type": "string", "upload_type": "string"})
    check_columns(users, {"user_id": "int", **{c: "any" for c in _USER_CAT_COLUMNS}}, str(paths[0]))
    check_id_column(users, "user_id", str(paths[0]), unique=True)
    check_columns(items, {"video_id": "int", "author_id": "int", "video_duration": "number", "music_type": "number",
                          "tag": "any", "video_type": "any", "upload_type": "any"}, str(paths[1]))
    check_id_column(items, "video_id", str(paths[1]), unique=True)
    unknown = ~users["user_active_degree"].isin(list(_ACTIVITY_LEVEL))
    if unknown.any():
        value = users["user_active_degree"][unknown].iloc[0]
        raise DataValidationError(
            f"{paths[0]}: column 'user_active_degree' has an unknown value {value!r} (known: {sorted(_ACTIVITY_LEVEL)})"
        )
    if len(users) == 0 or len(items) == 0:
        raise DataValidationError(f"{data_dir}: empty side table(s)")
    return users.sort_values("user_id", kind="stable").reset_index(drop=True), \
        items.sort_values("video_id", kind="stable").reset_index(drop=True)


def _resize_users(users: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """The output user table: [n] rows.

    Fewer than the real users: a seeded subsample (ids kept). More: all real users plus copies of random real
    users with new ids after the largest real id; in each copy every onehot_feat column is, with probability 0.2,
    replaced by that column of another random real user (keeps each column's marginal, makes copies distinct).
    """
    n_real = len(users)
    if n is None or n == n_real:
        return users.copy()
    if n < n_real:
        src = np.sort(rng.choice(n_real, size=n, replace=False))
        return users.iloc[src].reset_index(drop=True)
    extra = n - n_real
    src_extra = rng.integers(0, n_real, size=extra)
    new = users.iloc[src_extra].reset_index(drop=True)
    for col in (c for c in users.columns if c.startswith("onehot_feat")):
        swap = rng.random(extra) < 0.2
        donor = rng.integers(0, n_real, size=extra)
        vals = new[col].to_numpy(copy=True)
        vals[swap] = users[col].to_numpy()[donor[swap]]
        new[col] = vals
    new["user_id"] = int(users["user_id"].max()) + 1 + np.arange(extra, dtype=np.int64)
    return pd.concat([users, new], ignore_index=True)


def _resize_items(items: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """The output video table: [n] rows.

    More than the real videos: new videos perturb random real ones (new ids after the largest real id): the
    author is kept with probability 0.7, else drawn from the real author column; the tag is kept with probability
    0.8, else drawn from the real tag column (both keep the real distributions); the duration is jittered by a
    log-normal factor (sigma 0.3). Vectorised: works for millions of rows.
    """
    n_real = len(items)
    if n is None or n == n_real:
        return items.copy()
    if n < n_real:
        src = np.sort(rng.choice(n_real, size=n, replace=False))
        return items.iloc[src].reset_index(drop=True)
    extra = n - n_real
    src_extra = rng.integers(0, n_real, size=extra)
    cols = {c: items[c].to_numpy()[src_extra] for c in items.columns}
    swap = rng.random(extra) < 0.3
    donor = items["author_id"].to_numpy()[rng.integers(0, n_real, size=extra)]
    cols["author_id"] = np.where(swap, donor, cols["author_id"])
    swap = rng.random(extra) < 0.2
    cols["tag"] = np.where(swap, items["tag"].to_numpy()[rng.integers(0, n_real, size=extra)], cols["tag"])
    dur = cols["video_duration"].astype(np.float64) * np.exp(0.3 * rng.standard_normal(extra))
    cols["video_duration"] = np.round(np.clip(dur, 1000.0, None))
    cols["video_id"] = int(items["video_id"].max()) + 1 + np.arange(extra, dtype=np.int64)
    new = pd.DataFrame(cols).astype(items.dtypes.to_dict())
    return pd.concat([items, new], ignore_index=True)


def _mix(features: np.ndarray, noise: np.ndarray, noise_share: float) -> np.ndarray:
    """sqrt(1-a) * features/rms + sqrt(a) * noise/rms: ``a`` of the variance from noise."""
    def unit(x: np.ndarray) -> np.ndarray:
        rms = math.sqrt(float(np.mean(np.sum(x * x, axis=1))))
        return x / (rms if rms > 0 else 1.0)

    return math.sqrt(1.0 - noise_share) * unit(features) + math.sqrt(noise_share) * unit(noise)


class _History:
    """The simulation's running history state.

    Stores sums of ``weight * exp((t_event - t_ref) / tau)``; the decayed value at time t is the stored sum times
    ``exp(-(t - t_ref) / tau)``. This avoids decaying the whole users x tags / users x buckets arrays every hour;
    ``t_ref`` moves forward (one rescale) before the factors could overflow float32.
    """

    def __init__(self, n_users: int, n_tags: int, n_buckets: int, tau_h: float) -> None:
        self.tau = tau_h
        self.t_ref = 0.0
        self.tag_click = np.zeros((n_users, n_tags), np.float32)
        self.tag_skip = np.zeros((n_users, n_tags), np.float32)
        self.author_click = np.zeros((n_users, n_buckets), np.float32)
        self.author_skip = np.zeros((n_users, n_buckets), np.float32)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.tag_click, self.tag_skip, self.author_click, self.author_skip

    def factor(self, t: float) -> float:
        """Multiplier turning stored sums into values decayed to time t."""
        return math.exp(-(t - self.t_ref) / self.tau)

    def add(self, t: float, user: np.ndarray, tag: np.ndarray, bucket: np.ndarray, click_w: np.ndarray,
            skip_w: np.ndarray) -> None:
        """Record events at time t. All arrays [N]."""
        if (t - self.t_ref) / self.tau > 30.0:
            f = np.float32(self.factor(t))
            for a in self._arrays():
                a *= f
            self.t_ref = t
        g = math.exp((t - self.t_ref) / self.tau)
        nt, nb = self.tag_click.shape[1], self.author_click.shape[1]
        ti, bi = user * nt + tag, user * nb + bucket
        np.add.at(self.tag_click.reshape(-1), ti, (click_w * g).astype(np.float32))
        np.add.at(self.tag_skip.reshape(-1), ti, (skip_w * g).astype(np.float32))
        np.add.at(self.author_click.reshape(-1), bi, (click_w * g).astype(np.float32))
        np.add.at(self.author_skip.reshape(-1), bi, (skip_w * g).astype(np.float32))

    def snapshot(self, t: float) -> HistoryState:
        f = np.float32(self.factor(t))
        return HistoryState(*(a * f for a in self._arrays()), hour=float(t))


class World:
    """A generated synthetic world: its config, the ground-truth click model and a summary of its logs.

    Public attributes: ``config`` (WorldConfig), ``user_ids`` [n_users] int64 and ``item_ids`` [n_items] int64
    (sorted ids as written in the side tables), ``history_end`` (HistoryState at the end of the simulation),
    ``out_dir`` (the folder it was written to or loaded from).
    """

    #: npz keys of the arrays the ground truth needs (besides the history state).
    _ARRAY_KEYS = (
        "user_ids", "item_ids", "user_vec", "user_bias", "user_sat_bias", "item_vec", "item_pop", "item_quality",
        "item_tag", "item_group", "item_vtype", "item_bucket", "item_duration_ms", "ctx_hour_group",
        "ctx_tab_group", "ctx_hour_vtype",
    )

    def __init__(self, config: WorldConfig, arrays: dict[str, np.ndarray], history_end: HistoryState,
                 summary: dict[str, Any] | None = None, out_dir: Path | None = None) -> None:
        missing = [k for k in self._ARRAY_KEYS if k not in arrays]
        if missing:
            raise ArtifactError(f"world state lacks array(s) {missing}")
        self.config = config
        self._a = {k: arrays[k] for k in self._ARRAY_KEYS}
        # arrays are stored as float32; the click model computes in float64 (one cast here, identical after load)
        self._c = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in self._a.items()}
        self.user_ids: np.ndarray = self._a["user_ids"]
        self.item_ids: np.ndarray = self._a["item_ids"]
        self._user_index: IdIndex | None = None  # built on the first lookup
        self._item_index: IdIndex | None = None
        self.history_end = history_end
        self._summary = dict(summary or {})
        self.out_dir = out_dir
        self.exam = (1.0 + np.arange(config.request_size, dtype=np.float64)) ** (-config.position_bias)

    # ---------------------------------------------------------------- ground truth
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, user_ids: np.ndarray) -> np.ndarray:
        """Row indices of user ids (any shape); DataValidationError naming the first unknown id."""
        if self._user_index is None:
            self._user_index = IdIndex(self.user_ids, "user_id", "world")
        return self._user_index.rows(user_ids)

    def item_index(self, item_ids: np.ndarray) -> np.ndarray:
        """Row indices of item (video) ids (any shape); DataValidationError naming the first unknown id."""
        if self._item_index is None:
            self._item_index = IdIndex(self.item_ids, "video_id", "world")
        return self._item_index.rows(item_ids)

    def _resolve_history(self, history: "str | HistoryState | None") -> HistoryState | None:
        if history is None:
            return None
        if isinstance(history, str):
            if history != "end":
                raise ValueError(f"history must be 'end', None or a HistoryState, got {history!r}")
            return self.history_end
        if isinstance(history, HistoryState):
            want = {"tag_click": self.history_end.tag_click.shape, "tag_skip": self.history_end.tag_click.shape,
                    "author_click": self.history_end.author_click.shape,
                    "author_skip": self.history_end.author_click.shape}
            for name, shape in want.items():
                if getattr(history, name).shape != shape:
                    raise ValueError(f"HistoryState.{name} has shape {getattr(history, name).shape}, "
                                     f"this world needs {shape}")
            return history
        raise ValueError(f"history must be 'end', None or a HistoryState, got {type(history).__name__}")

    def _context(self, hour: np.ndarray, tab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hour, tab = np.asarray(hour), np.asarray(tab)
        if hour.dtype.kind not in "iu" or tab.dtype.kind not in "iu":
            raise ValueError(f"hour and tab must be integers, got dtypes {hour.dtype} and {tab.dtype}")
        if hour.size and (hour.min() < 0 or hour.max() > 23):
            raise ValueError(f"hour must be in 0..23, got {hour[(hour < 0) | (hour > 23)].flat[0]}")
        bad = (tab < 0) | (tab >= self.config.n_tabs)
        if bad.any():
            raise ValueError(f"tab must be in 0..{self.config.n_tabs - 1}, got {tab[bad].flat[0]}")
        return hour // 4, tab

    def _logit_parts(self, u: np.ndarray, i: np.ndarray, hour_bucket: np.ndarray, tab: np.ndarray,
                     hist: HistoryState | _History | None, t: float | None = None,
                     affinity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(logit, affinity, context term, history term) of the appeal, each broadcast over u, i, hour, tab.

        u, i: integer row indices of broadcastable shapes (e.g. [R, 1] and [R, C]). affinity: <U_u, V_i>
        precomputed in the broadcast shape (the oracle passes a matmul). ``hist`` a HistoryState (values used as
        they are) or the running _History (decayed to time t).
        """
        a, c = self._c, self.config
        if affinity is None:
            affinity = np.einsum("...d,...d->...", self._c["user_vec"][u], self._c["item_vec"][i])
        static = (c.base_logit + affinity + c.popularity_weight * a["item_pop"][i]
                  + c.quality_weight * a["item_quality"][i] + a["user_bias"][u])
        g = a["item_group"][i]
        ctx = (a["ctx_hour_group"][hour_bucket, g] + a["ctx_tab_group"][tab, g]
               + a["ctx_hour_vtype"][hour_bucket, a["item_vtype"][i]])
        if hist is None:
            h = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(i)), np.float64)
        else:
            f = hist.factor(t) if isinstance(hist, _History) else 1.0
            tg, bk = a["item_tag"][i], a["item_bucket"][i]
            tc = hist.tag_click[u, tg].astype(np.float64) * f
            ts = hist.tag_skip[u, tg].astype(np.float64) * f
            ac = hist.author_click[u, bk].astype(np.float64) * f
            ask = hist.author_skip[u, bk].astype(np.float64) * f
            h = (c.tag_click_weight * np.log1p(tc) + c.author_click_weight * np.log1p(ac)
                 - c.fatigue_weight * (np.log1p(ts) + np.log1p(ask)))
        return static + ctx + h, affinity, ctx, h

    def true_click_prob(self, user_ids: np.ndarray, item_ids: np.ndarray, hour: np.ndarray | int,
                        tab: np.ndarray | int, history: "str | HistoryState | None" = "end") -> np.ndarray:
        """Ground-truth probability of a click if examined at the top position: float64 [N].

        user_ids, item_ids: [N] ids (or broadcastable shapes); hour: hour of day 0..23 and tab: 0..n_tabs-1,
        scalars or [N]. history: "end" uses the history state at the end of the simulation, None ignores history
        (static + context terms only), or a HistoryState.
        """
        u = self.user_index(np.asarray(user_ids))
        i = self.item_index(np.asarray(item_ids))
        hb, tb = self._context(hour, tab)
        logit, *_ = self._logit_parts(u, i, hb, tb, self._resolve_history(history))
        return _sigmoid(logit)

    def oracle_topk(self, user_ids: np.ndarray, hour: np.ndarray | int, tab: np.ndarray | int, k: int,
                    candidate_items: np.ndarray | None = None, history: "str | HistoryState | None" = "end",
                    chunk_pairs: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """The k items with the highest true click probability per user: (item_ids [B, k] int64, probs [B, k]).

        user_ids: [B]; hour, tab: scalars or [B]. candidate_items: None (the whole corpus, scanned in chunks of
        about ``chunk_pairs / B`` items so 1M items never build a users x items matrix), [C] ids shared by all
        users, or [B, C] ids per user. Rows are sorted by probability, descending. The probabilities equal
        :meth:`true_click_prob` up to float64 rounding (a matrix product sums in another order).
        """
        uid = np.asarray(user_ids)
        if uid.ndim != 1:
            raise ValueError(f"user_ids must be 1-D [B], got shape {uid.shape}")
        B = len(uid)
        u = self.user_index(uid)
        hb, tb = self._context(np.broadcast_to(hour, (B,)), np.broadcast_to(tab, (B,)))
        hist = self._resolve_history(history)
        if candidate_items is None:
            n = self.n_items
            cand = None
        else:
            cand = self.item_index(np.asarray(candidate_items))
            if cand.ndim == 1:
                cand = cand[None, :]
            if cand.ndim != 2 or cand.shape[0] not in (1, B):
                raise ValueError(f"candidate_items must be [C] or [B={B}, C], got shape {np.shape(candidate_items)}")
            n = cand.shape[1]
        if not 1 <= k <= n:
            raise ValueError(f"k must be in 1..{n} (the number of candidates), got {k}")
        # The logit decomposes into per-user tables gathered per item, so a chunk costs one matrix product, two
        # gathers and a few adds: const_u + <U_u, V_i> + item_i + T_u[tag_i, vtype_i] + A_u[bucket_i].
        a, c = self._c, self.config
        n_tags, n_vt = self.history_end.tag_click.shape[1], a["ctx_hour_vtype"].shape[1]
        group_of_tag = np.zeros(n_tags, np.int64)
        group_of_tag[a["item_tag"]] = a["item_group"]
        tag_vt = (a["item_tag"].astype(np.int64) * n_vt + a["item_vtype"]).astype(np.int64)
        item_const = c.popularity_weight * a["item_pop"] + c.quality_weight * a["item_quality"]
        user_const = c.base_logit + a["user_bias"][u]
        t_tab = (a["ctx_hour_group"][hb][:, group_of_tag] + a["ctx_tab_group"][tb][:, group_of_tag])  # [B, T]
        a_tab = np.zeros((B, c.author_buckets))
        if hist is not None:
            t_tab = t_tab + c.tag_click_weight * np.log1p(hist.tag_click[u].astype(np.float64)) \
                - c.fatigue_weight * np.log1p(hist.tag_skip[u].astype(np.float64))
            a_tab = c.author_click_weight * np.log1p(hist.author_click[u].astype(np.float64)) \
                - c.fatigue_weight * np.log1p(hist.author_skip[u].astype(np.float64))
        tv_tab = (t_tab[:, :, None] + a["ctx_hour_vtype"][hb][:, None, :]).reshape(B, n_tags * n_vt)
        tv_flat, a_flat = tv_tab.reshape(-1), a_tab.reshape(-1)
        tv_off = (np.arange(B) * (n_tags * n_vt))[:, None]
        a_off = (np.arange(B) * c.author_buckets)[:, None]

        best_l = np.full((B, 0), -np.inf)
        best_i = np.zeros((B, 0), np.int64)
        step = max(k, chunk_pairs // max(B, 1))
        uv = self._c["user_vec"][u]
        iv = self._c["item_vec"]
        for lo in range(0, n, step):
            if cand is None:
                hi = min(n, lo + step)
                items = np.arange(lo, hi)[None, :]
                aff = uv @ iv[lo:hi].T  # a slice: no copy of the item factors
            else:
                items = cand[:, lo:lo + step]
                aff = uv @ iv[items[0]].T if items.shape[0] == 1 else np.einsum("bd,bcd->bc", uv, iv[items])
            logit = aff + user_const[:, None]
            logit += item_const[items]
            logit += tv_flat[tv_off + tag_vt[items]]
            if hist is not None:
                logit += a_flat[a_off + a["item_bucket"][items]]
            items = np.broadcast_to(items, logit.shape)
            if best_l.shape[1] == k:
                # only entries above a row's current k-th best can enter its top k: keep those (few, after the
                # first chunks), packed left into a [B, max_count] block, so the selection below stays small
                rows, cols = np.nonzero(logit > best_l.min(axis=1, keepdims=True))
                logit = pad_by_row(rows, logit[rows, cols], B, fill=-np.inf)
                items = pad_by_row(rows, items[rows, cols], B, fill=PAD)
            kk = min(k, best_l.shape[1] + logit.shape[1])
            best_i, best_l = topk_rows(np.concatenate([best_l, logit], axis=1), np.concatenate([best_i, items], axis=1),
                                       kk)
        return self.item_ids[best_i], _sigmoid(best_l)

    def summary(self) -> dict[str, Any]:
        """Rows, users, items, requests, CTR, random-slice CTR, CTR by position, oracle AUCs, wall time."""
        return dict(self._summary)

    # ---------------------------------------------------------------- persistence
    def _state_arrays(self) -> dict[str, np.ndarray]:
        out = dict(self._a)
        h = self.history_end
        for name in ("tag_click", "tag_skip", "author_click", "author_skip"):
            arr = getattr(h, name)
            flat = arr.reshape(-1)
            nz = np.flatnonzero(flat)
            # the history arrays are mostly zeros: store them sparse (flat index, value) to keep the file small
            out[f"hist_{name}_index"] = nz.astype(np.int64)
            out[f"hist_{name}_value"] = flat[nz]
            out[f"hist_{name}_shape"] = np.asarray(arr.shape, np.int64)
        out["hist_hour"] = np.asarray([h.hour], np.float64)
        return out

    def save(self, out_dir: str | Path) -> None:
        """Write world_state.npz then world.json (config, summary) into out_dir, atomically."""
        out_dir = Path(out_dir)
        write_npz(out_dir / WORLD_STATE, **self._state_arrays())
        write_json(out_dir / WORLD_JSON, {"format_version": WORLD_FORMAT_VERSION, "config": self.config.to_dict(),
                                          "summary": self._summary})

    @classmethod
    def load(cls, out_dir: str | Path) -> "World":
        """Restore a world written by :func:`generate_world` (reads world.json and world_state.npz)."""
        out_dir = Path(out_dir)
        meta = read_json(out_dir / WORLD_JSON)
        if meta.get("format_version") != WORLD_FORMAT_VERSION:
            raise ArtifactError(f"{out_dir / WORLD_JSON}: format_version {meta.get('format_version')!r}, "
                                f"expected {WORLD_FORMAT_VERSION}")
        config = WorldConfig.from_dict(meta["config"])
        state_path = out_dir / WORLD_STATE
        if not state_path.is_file():
            raise ArtifactError(f"{state_path}: file not found")
        arrays = read_npz(state_path)
        hist = {}
        for name in ("tag_click", "tag_skip", "author_click", "author_skip"):
            try:
                shape = tuple(int(s) for s in arrays[f"hist_{name}_shape"])
                dense = np.zeros(int(np.prod(shape)), np.float32)
                dense[arrays[f"hist_{name}_index"]] = arrays[f"hist_{name}_value"]
            except KeyError as e:
                raise ArtifactError(f"{state_path}: missing array {e.args[0]!r}") from None
            hist[name] = dense.reshape(shape)
        history = HistoryState(**hist, hour=float(arrays["hist_hour"][0]))
        return cls(config, arrays, history, meta.get("summary"), out_dir)


# -------------------------------------------------------------------- building the world
def _build_arrays(cfg: WorldConfig, users: pd.DataFrame, items: pd.DataFrame, rng: np.random.Generator
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """Resize the tables and draw the latent model. Returns (users out, items out, arrays, user activity [U])."""
    d = cfg.latent_dim
    users_out = _resize_users(users, cfg.n_users, rng)
    items_out = _resize_items(items, cfg.n_items, rng)
    U, I = len(users_out), len(items_out)
    # one embedding per feature value of the output tables; a factor is the sum over the row's values
    user_feat = np.zeros((U, d))
    for col in _USER_CAT_COLUMNS:
        codes = _codes(users_out[col])
        user_feat += _std_normal_embed(rng, codes.max() + 1, d)[codes]
    first_tag_out = _first_tag(items_out["tag"], VIDEO_FEATURES_FILE)
    item_feat = np.zeros((I, d))
    item_codes = {}
    for col in _ITEM_CAT_COLUMNS:
        codes = _codes(pd.Series(first_tag_out) if col == "tag" else items_out[col])
        item_codes[col] = codes
        item_feat += _ITEM_CAT_WEIGHTS[col] * _std_normal_embed(rng, codes.max() + 1, d)[codes]

    user_vec = _mix(user_feat, rng.standard_normal((U, d)), cfg.user_noise)
    item_vec = _mix(item_feat, rng.standard_normal((I, d)), cfg.item_noise)
    # scale both so <U_u, V_i> over random pairs has std affinity_scale
    pu, pi = rng.integers(0, U, 20000), rng.integers(0, I, 20000)
    s = float(np.std(np.sum(user_vec[pu] * item_vec[pi], axis=1)))
    f = math.sqrt(cfg.affinity_scale / s) if s > 0 else 0.0
    user_vec, item_vec = (user_vec * f).astype(np.float32), (item_vec * f).astype(np.float32)

    # popularity: log-normal, half explained by tag / author / upload type
    feat_pop = np.zeros(I)
    for col, w in (("tag", 1.0), ("author_id", 1.0), ("upload_type", 0.5)):
        codes = item_codes[col]
        feat_pop += w * rng.standard_normal(codes.max() + 1)[codes]
    pop = cfg.popularity_sigma * (0.6 * _standardise(feat_pop) + 0.8 * rng.standard_normal(I))
    quality = 0.5 * _standardise(pop) + math.sqrt(0.75) * rng.standard_normal(I)

    tag_codes = item_codes["tag"]
    n_tags = int(tag_codes.max()) + 1
    group_of_tag = rng.integers(0, _TAG_GROUPS, n_tags)
    n_vtypes = int(item_codes["video_type"].max()) + 1
    n_authors = int(item_codes["author_id"].max()) + 1
    bucket_of_author = rng.integers(0, cfg.author_buckets, n_authors)

    degree = users_out["user_active_degree"].map(_ACTIVITY_LEVEL).to_numpy(np.float64)
    activity = degree * np.exp(0.5 * rng.standard_normal(U))
    user_bias = cfg.user_bias_scale * rng.standard_normal(U)

    dur = items_out["video_duration"].to_numpy(np.float64, copy=True)
    real_dur = dur[np.isfinite(dur)]
    if len(real_dur) == 0:
        raise DataValidationError(f"{VIDEO_FEATURES_FILE}: column 'video_duration' has no finite value")
    # missing durations: draw from the observed ones (the logs need a duration for every shown video)
    miss = ~np.isfinite(dur)
    dur[miss] = rng.choice(real_dur, size=int(miss.sum()))

    arrays = {
        "user_ids": users_out["user_id"].to_numpy(np.int64),
        "item_ids": items_out["video_id"].to_numpy(np.int64),
        "user_vec": user_vec,
        "user_bias": user_bias.astype(np.float32),
        "user_sat_bias": (0.5 * rng.standard_normal(U)).astype(np.float32),
        "item_vec": item_vec,
        "item_pop": pop.astype(np.float32),
        "item_quality": quality.astype(np.float32),
        "item_tag": tag_codes.astype(np.int32),
        "item_group": group_of_tag[tag_codes].astype(np.int32),
        "item_vtype": item_codes["video_type"].astype(np.int32),
        "item_bucket": bucket_of_author[item_codes["author_id"]].astype(np.int32),
        "item_duration_ms": np.round(dur).astype(np.int64),
        "ctx_hour_group": cfg.context_scale * rng.standard_normal((_HOUR_BUCKETS, _TAG_GROUPS)),
        "ctx_tab_group": cfg.context_scale * rng.standard_normal((cfg.n_tabs, _TAG_GROUPS)),
        "ctx_hour_vtype": 0.5 * cfg.context_scale * rng.standard_normal((_HOUR_BUCKETS, n_vtypes)),
    }
    return users_out, items_out, arrays, activity


def _sample_distinct(rng: np.random.Generator, n_rows: int, k: int, n: int,
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


def _draw_requests(cfg: WorldConfig, activity: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All requests, at most one per (user, day, hour, tab, is_rand), sorted by hour step."""
    U = len(activity)
    rate = cfg.mean_requests_per_user * activity / activity.mean()
    n_req = rng.poisson(rate)
    user = np.repeat(np.arange(U, dtype=np.int64), n_req)
    R = len(user)
    day = rng.integers(0, cfg.n_days, R)
    hour = rng.choice(24, size=R, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    tab_p = 0.5 ** np.arange(cfg.n_tabs)
    tab = rng.choice(cfg.n_tabs, size=R, p=tab_p / tab_p.sum())
    is_rand = (rng.random(R) < cfg.random_fraction).astype(np.int64)
    return _unique_requests(day * 24 + hour, user, tab, is_rand, cfg, U, rng)


def _unique_requests(step: np.ndarray, user: np.ndarray, tab: np.ndarray, is_rand: np.ndarray, cfg: "WorldConfig",
                     n_users: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Requests from drawn (hour step, user, tab, is_rand) [R]: duplicates removed and sorted by time, then each
    request's gap between impressions and start offset in its hour drawn from ``rng``. Shared by the in-memory
    and the chunked world (same draws in the same order)."""
    # step-major key: np.unique both removes duplicate keys and sorts the requests by time
    key = np.unique(((step * n_users + user) * cfg.n_tabs + tab) * 2 + is_rand)
    is_rand = key % 2
    key //= 2
    tab = key % cfg.n_tabs
    key //= cfg.n_tabs
    user = key % n_users
    step = key // n_users
    R = len(key)
    gap = rng.integers(_GAP_MS[0], _GAP_MS[1] + 1, R)
    offset = rng.integers(0, HOUR_MS - cfg.request_size * _GAP_MS[1], R)
    return {"user": user, "step": step, "tab": tab, "is_rand": is_rand, "gap": gap, "offset": offset}


#: Per-impression arrays of a simulated hour step (see :func:`_simulate_step`).
_STEP_KEYS = ("req", "item", "pos", "click", "examined", "sat", "watch", "ctx", "hist", "logit")


def _simulate_step(world: World, req: dict[str, np.ndarray], lo: int, hi: int, s: int, hist: _History,
                   rng: np.random.Generator, pop: CdfSampler) -> dict[str, np.ndarray]:
    """Simulate the requests ``lo:hi`` of ``req`` (all in hour step ``s``) and add their events to ``hist``.

    Returns the per-impression arrays of :data:`_STEP_KEYS`, each [n_requests * request_size]: ``req`` the row of
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
        cand = _sample_distinct(rng, n, C, I, first=cand)
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
        items = rng.permuted(_sample_distinct(rng, n, S, I), axis=1)
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
    click = examined & (rng.random((n, S)) < _sigmoid(lg))
    sat = (cfg.satisfaction_affinity_weight * np.concatenate(aff) + a["item_quality"][items]
           + a["user_sat_bias"][users] + cfg.satisfaction_noise * rng.standard_normal((n, S)))
    watch = _sigmoid(sat + 0.5 * rng.standard_normal((n, S)))
    click_w = np.where(click, 0.5 + _sigmoid(sat), 0.0)
    # only examined exposures can tire the user: weight skips by the examination probability
    skip_w = np.where(click, 0.0, world.exam[None, :])
    hist.add(float(s), users.reshape(-1), a["item_tag"][items].reshape(-1), a["item_bucket"][items].reshape(-1),
             click_w.reshape(-1), skip_w.reshape(-1))
    out = {"req": np.repeat(rows, S), "pos": np.tile(np.arange(S), n)}
    for k, v in (("item", items), ("click", click), ("examined", examined), ("sat", sat), ("watch", watch),
                 ("logit", lg), ("ctx", np.concatenate(ctx)), ("hist", np.concatenate(hterm))):
        out[k] = v.reshape(-1)
    return out


def _new_history(world: World) -> _History:
    cfg = world.config
    return _History(world.n_users, int(world._c["item_tag"].max()) + 1, cfg.author_buckets,
                    cfg.history_half_life_hours / math.log(2.0))


def _popular_sampler(world: World) -> CdfSampler:
    pop_cdf = np.cumsum(np.exp(world._c["item_pop"]))
    pop_cdf /= pop_cdf[-1]
    return CdfSampler(pop_cdf)


def _simulate(world: World, req: dict[str, np.ndarray], rng: np.random.Generator, progress: bool
              ) -> tuple[dict[str, np.ndarray], HistoryState]:
    """Run the hour steps. Returns per-impression arrays (internal indices) and the final history state."""
    n_steps = world.config.n_days * 24
    hist = _new_history(world)
    pop = _popular_sampler(world)
    bounds = np.searchsorted(req["step"], np.arange(n_steps + 1))
    out: dict[str, list[np.ndarray]] = {k: [] for k in _STEP_KEYS}
    for s in tqdm(range(n_steps), disable=not progress, desc="world: hours", unit="h"):
        lo, hi = bounds[s], bounds[s + 1]
        if lo == hi:
            continue
        for k, v in _simulate_step(world, req, lo, hi, s, hist, rng, pop).items():
            out[k].append(v)
    if not out["req"]:
        raise ValueError("the world has no requests: raise mean_requests_per_user, n_users or n_days")
    imp = {k: np.concatenate(v) for k, v in out.items()}
    return imp, hist.snapshot(float(n_steps))


def _post_click(cfg: WorldConfig, imp: dict[str, np.ndarray], duration_ms: np.ndarray, rng: np.random.Generator
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
        return (click & (r[row] < _sigmoid(logit))).astype(np.int64)

    preview = 0.6 * _sigmoid(imp["logit"] + rng.standard_normal(N))
    scroll_ms = rng.uniform(200.0, 1500.0, N)
    play = np.where(click, np.round(duration_ms * imp["watch"]),
                    np.where(imp["examined"], np.round(duration_ms * preview), np.round(np.minimum(scroll_ms, duration_ms))))
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


def _write_log(path: Path, cols: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Write the rows ``rows`` of ``cols`` as a KuaiRand log CSV with the exact official header, atomically."""
    table = pa.table({c: cols[c][rows] for c in KUAIRAND_LOG_COLUMNS})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            # pyarrow quotes header names; the official files do not, so the header is written by hand
            f.write((",".join(KUAIRAND_LOG_COLUMNS) + "\n").encode())
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))


def _write_side_table(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties averaged) of scores against binary labels, by ranks."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def generate_world(out_dir: str | Path, config: WorldConfig = WorldConfig(), data_dir: str | Path | None = None,
                   progress: bool = False) -> World:
    """Generate the world, write its files into ``out_dir`` (see the module doc) and return it.

    data_dir: folder of the KuaiRand-Pure side tables (default :func:`embedded_data_dir`). progress: show a tqdm
    bar over the hour steps.
    """
    t0 = time.perf_counter()
    cfg = config
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else embedded_data_dir()
    rng = np.random.default_rng(cfg.seed)
    users_real, items_real = _read_tables(data_dir)
    if cfg.n_items is None and len(items_real) < cfg.candidates_per_request:
        raise ValueError(f"WorldConfig.candidates_per_request = {cfg.candidates_per_request}: more than the "
                         f"{len(items_real)} videos in {data_dir / VIDEO_FEATURES_FILE}")
    start = dt.date.fromisoformat(cfg.start_date)
    days = [start + dt.timedelta(days=k) for k in range(cfg.n_days)]
    split_day = min(cfg.n_days, max(1, round(cfg.n_days * 2 / 3)))
    periods = [(0, split_day), (split_day, cfg.n_days)] if split_day < cfg.n_days else [(0, cfg.n_days)]
    log_names = [f"log_standard_{_log_file_tag(days[lo])}_to_{_log_file_tag(days[hi - 1])}_pure.csv"
                 for lo, hi in periods]
    log_names.append(f"log_random_{_log_file_tag(days[0])}_to_{_log_file_tag(days[-1])}_pure.csv")
    # a loader reads every log file of a folder: logs of another world left beside ours would be mixed in
    stale = sorted(p.name for p in out_dir.glob("log_*_pure.csv") if p.name not in log_names)
    if stale:
        raise FileExistsError(f"{out_dir}: holds log file(s) {stale} that this world would not overwrite; "
                              f"use an empty folder")
    users_out, items_out, arrays, activity = _build_arrays(cfg, users_real, items_real, rng)
    empty = HistoryState(*(np.zeros((0, 0), np.float32) for _ in range(4)), hour=0.0)
    world = World(cfg, arrays, empty, out_dir=out_dir)
    req = _draw_requests(cfg, activity, rng)
    t_build = time.perf_counter()
    imp, world.history_end = _simulate(world, req, rng, progress)
    t_sim = time.perf_counter()

    # ---- assemble the KuaiRand columns
    r = imp["req"]
    step = req["step"][r]
    day = step // 24
    hour = step % 24
    day_int = np.array([d.year * 10000 + d.month * 100 + d.day for d in days], np.int64)
    day_ms = np.array([int(dt.datetime(d.year, d.month, d.day, tzinfo=BEIJING).timestamp()) * 1000 for d in days],
                      np.int64)
    duration = arrays["item_duration_ms"][imp["item"]]
    cols = {
        "user_id": arrays["user_ids"][req["user"][r]],
        "video_id": arrays["item_ids"][imp["item"]],
        "date": day_int[day],
        "hourmin": hour * 100,
        "time_ms": day_ms[day] + hour * HOUR_MS + req["offset"][r] + imp["pos"] * req["gap"][r],
        "is_rand": req["is_rand"][r],
        "tab": req["tab"][r],
        **_post_click(cfg, imp, duration, rng),
    }
    # the official logs are sorted by user, then time
    order = np.lexsort((cols["time_ms"], cols["user_id"]))
    is_rand = cols["is_rand"][order] == 1
    d_sorted = day[order]
    out_dir.mkdir(parents=True, exist_ok=True)
    for (lo, hi), name in zip(periods, log_names[:-1]):
        _write_log(out_dir / name, cols, order[~is_rand & (d_sorted >= lo) & (d_sorted < hi)])
    _write_log(out_dir / log_names[-1], cols, order[is_rand])
    _write_side_table(out_dir / USER_FEATURES_FILE, users_out)
    _write_side_table(out_dir / VIDEO_FEATURES_FILE, items_out)
    t_write = time.perf_counter()

    # ---- summary, including how much each effect is worth to an oracle (AUC on the standard log)
    click = imp["click"]
    rnd = req["is_rand"][r] == 1
    lg = imp["logit"]
    std = ~rnd
    S = cfg.request_size
    world._summary = {
        "rows": int(len(click)),
        "rows_standard": int(std.sum()),
        "rows_random": int(rnd.sum()),
        "requests": int(len(req["user"])),
        "users": world.n_users,
        "items": world.n_items,
        "active_users": int(len(np.unique(req["user"]))),
        "shown_items": int(len(np.unique(imp["item"]))),
        "ctr": float(click.mean()),
        "ctr_standard": float(click[std].mean()) if std.any() else float("nan"),
        "ctr_random": float(click[rnd].mean()) if rnd.any() else float("nan"),
        "ctr_by_position_standard": [float(click[std & (imp["pos"] == p)].mean()) if (std & (imp["pos"] == p)).any()
                                     else float("nan") for p in range(S)],
        "ctr_by_position_random": [float(click[rnd & (imp["pos"] == p)].mean()) if (rnd & (imp["pos"] == p)).any()
                                   else float("nan") for p in range(S)],
        "long_view_rate_of_clicks": float(cols["long_view"][click].mean()) if click.any() else float("nan"),
        # position-free: each AUC scores the logged clicks by the true appeal logit with some terms removed
        "oracle_auc": {
            name: {
                "full": _auc(click[m], lg[m]),
                "no_history": _auc(click[m], lg[m] - imp["hist"][m]),
                "no_context": _auc(click[m], lg[m] - imp["ctx"][m]),
                "static_only": _auc(click[m], lg[m] - imp["hist"][m] - imp["ctx"][m]),
            }
            for name, m in (("standard", std), ("random", rnd))
        },
        "files": log_names,
    }
    world._summary = to_jsonable(world._summary)  # strict JSON: NaN (no random slice) -> None
    # world.json holds only what the seed determines (no wall times), so the same config gives identical files
    world.save(out_dir)
    world._summary["seconds"] = {"build": round(t_build - t0, 3), "simulate": round(t_sim - t_build, 3),
                                 "write_csv": round(t_write - t_sim, 3)}
    world._summary["wall_s"] = round(time.perf_counter() - t0, 3)
    logger.info("world: %d rows (%d random), %d requests, CTR %.3f, wall %.1f s -> %s", world._summary["rows"],
                world._summary["rows_random"], world._summary["requests"], world._summary["ctr"],
                world._summary["wall_s"], out_dir)
    return world
