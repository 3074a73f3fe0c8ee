"""The world's constants, its config (every knob, validated) and the history state at one time."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cascade
from cascade.config import require

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
GAP_MS = (2_000, 15_000)
#: Hours are grouped in 4-hour buckets for the context x item effect.
HOUR_BUCKETS = 6
#: Items are grouped by tag into this many groups for the context x item effect.
TAG_GROUPS = 8
#: Relative request intensity by hour of day (Beijing time): quiet nights, lunch and evening peaks.
HOUR_WEIGHTS = np.array(
    [0.5, 0.3, 0.2, 0.15, 0.15, 0.2, 0.4, 0.7, 0.9, 1.0, 1.0, 1.1,
     1.3, 1.3, 1.1, 1.0, 1.0, 1.1, 1.3, 1.5, 1.7, 1.8, 1.6, 1.0]
)
#: Request rate multiplier by KuaiRand's ``user_active_degree``.
ACTIVITY_LEVEL = {
    "full_active": 1.6, "high_active": 1.0, "middle_active": 0.6, "low_active": 0.3, "single_low_active": 0.15,
    "2_14_day_new": 0.5, "30day_retention": 0.3, "day_new": 0.3, "UNKNOWN": 0.5,
}
USER_CAT_COLUMNS = (
    "user_active_degree", "register_days_range", "is_live_streamer", "is_video_author",
    *(f"onehot_feat{k}" for k in range(18)),
)
ITEM_CAT_COLUMNS = ("tag", "author_id", "music_type", "video_type", "upload_type")
#: Weight of each item feature's embedding in the item factor (tags and authors carry the taste).
ITEM_CAT_WEIGHTS = {"tag": 1.0, "author_id": 0.7, "music_type": 0.3, "video_type": 0.3, "upload_type": 0.3}


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
            require(self, name, ok, what)

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
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
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
