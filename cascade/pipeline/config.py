"""The pipeline's config: one typed, strict :class:`PipelineConfig` with one section per step.

Each section nests the dataclasses of the modules that do the work (WorldConfig, RankerConfig, TrainConfig,
DistillConfig, TowerConfig, StudentConfig), so every hyper-parameter has one definition and one default: the
dataclasses here and the tables they nest are the defaults, and a file under ``pipelines/`` sets only the values
that differ from them (tests/test_config.py checks that no file restates a default). A table merges over its
section's default (:func:`cascade.config.from_dict`).

A few keys of the nested configs are set by the pipeline itself (the run's seed, the progress bars):
:data:`SET_BY_THE_PIPELINE` lists them, and a config that sets one is refused, naming the key and what sets it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import artifacts as A
from ..channels.merge import Merge, unused_quota_settings
from ..config import (
    ConfigError,
    FieldError,
    apply_overrides,
    at_least,
    finite,
    from_dict,
    load_toml,
    positive,
    require,
)
from ..data.schema import SIDES
from ..data.world import WorldConfig
from ..index.factory import parse_factory
from ..machine import AUTOCAST
from ..models.ranker import RankerConfig
from ..models.two_tower import TowerConfig
from ..train.joint import DistillConfig
from ..train.loop import TrainConfig
from ..train.students import StudentConfig, is_ground_truth

SOURCES = ("world", "kuairand", "movielens-100k", "movielens-1m", "custom")
STUDENTS = ("prerank", "retrieval")

#: Keys of the nested configs that a step sets itself -> what sets them. A pipeline config may not set them.
SET_BY_THE_PIPELINE: dict[str, str] = {
    **{f"{t}.seed": "run.seed (every step trains under the run's seed)"
       for t in ("teacher.train", "students.rank_student_train", *(f"students.{s}" for s in STUDENTS))},
    **{f"{t}.progress": "the command line (progress bars unless --no-progress; run_pipeline(progress=...))"
       for t in ("teacher.train", "students.rank_student_train", *(f"students.{s}" for s in STUDENTS))},
    **{f"students.{s}.eval_k": "the students step (teacher-recall@10 and NDCG@10 on the whole rank log)"
       for s in STUDENTS},
    **{f"{t}.device": "run.device (--device: every training step follows the run's one device switch)"
       for t in ("teacher.train", "students.rank_student_train", *(f"students.{s}" for s in STUDENTS))},
    **{f"students.{s}.distill_scale": "students.distill (a scale, or \"auto\": chosen on validation)"
       for s in STUDENTS},
}


#: Keys (or whole sections) that say where a run lives or what watches it, not what it computes: a run folder's
#: config.json may differ from a new config in these without the run counting as another one
#: (cascade.pipeline.run.run_config_diff).
NOT_COMPARED: tuple[str, ...] = ("run.name", "run.runs_dir", "tracking")


@dataclass(frozen=True)
class RunSection:
    """name: the run folder under runs_dir. seed: the one seed every step derives its randomness from.
    device: where every training step trains (the teacher, the rank students, the two-tower students;
    :func:`with_run_device`); "cuda" on a machine without one is refused before any work.
    threads: torch's intra-op threads while the run lasts, whatever the process or OMP_NUM_THREADS say: weights
    depend on it in the last float bits, so it is pinned (and recorded in every step manifest) for two processes
    to train the same weights (a step that leaves another count behind is named in a warning and the count set
    back). 2 keeps the default pipeline fast on a 2-core machine."""

    name: str = "default"
    seed: int = 0
    runs_dir: str = "runs"
    threads: int = 2
    device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        try:
            A.check_run_name(self.name)
        except ValueError as e:
            raise FieldError(type(self).__name__, "name", self.name, str(e)) from None
        require(self, "seed", at_least(self.seed, 0), "must be an integer >= 0")
        require(self, "threads", at_least(self.threads, 1), "must be an integer >= 1")


@dataclass(frozen=True)
class DataSection:
    """source: where the logs come from; path: the directory (kuairand, movielens) or mapping TOML (custom).
    valid_days / test_days: the last days of the logs held out (unset: about the last 10% / 10% of the requests,
    chosen from the data and recorded in data/summary.json). drop_last_days: the log's last N calendar days are
    left out before the split (their requests, and the users and items only they had), so the test period ends N
    days before the log does: a backtest of an earlier period (benchmarks/real_data.py --origins)."""

    source: Literal["world", "kuairand", "movielens-100k", "movielens-1m", "custom"] = "world"
    path: str | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    valid_days: int | None = None  # None: chosen from the data (cascade.data.split.quantile_split_days), logged
    test_days: int | None = None
    drop_last_days: int = 0
    min_count: int = 2
    numeric: Literal["standardize", "log_standardize", "quantile"] = "log_standardize"
    cross_window_days: float = 7.0
    # the item columns whose user x value histories the cross features count ("": leave that family out; unset:
    # the source's own, cascade.pipeline.data.SOURCE_ITEM_COLUMNS: "tag" and "author_id", MovieLens's "genre");
    # cross_features = false: no cross features at all (the teacher then reads user, item and context only)
    cross_tag_column: str | None = None
    cross_author_column: str | None = None
    cross_features: bool = True
    # drop items a user was shown before from every list (cascade, baselines, validation); "auto": when the train
    # log shows little re-consumption (pipeline/judge.py)
    filter_seen: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        require(self, "path", self.source == "world" or bool(self.path),
                f"is required for data.source = {self.source!r} (e.g. --data {self.source}:PATH)")
        require(self, "path", self.source != "world" or self.path is None,
                "must be unset for data.source = 'world' (the world is generated)")
        require(self, "path", not self.path or Path(self.path).exists(), "does not exist")
        changed = {f.name: getattr(self.world, f.name) for f in dataclasses.fields(WorldConfig)
                   if getattr(self.world, f.name) != getattr(WorldConfig(), f.name)}
        if self.source != "world" and changed:
            raise FieldError(type(self).__name__, "world", changed, f"is set but data.source = {self.source!r}: the "
                             "world's settings shape the generated world only, so they would do nothing")
        require(self, "path", self.source != "custom" or not self.path or Path(self.path).is_file(),
                "must be a mapping TOML file for data.source = 'custom'")
        require(self, "path", self.source in ("world", "custom") or not self.path or Path(self.path).is_dir(),
                f"must be the dataset's folder for data.source = {self.source!r}")
        for name in ("valid_days", "test_days"):
            require(self, name, getattr(self, name) is None or at_least(getattr(self, name), 1),
                    "must be an integer >= 1, or unset (the last 10% of the days, see data.split)")
        require(self, "drop_last_days", at_least(self.drop_last_days, 0),
                "must be an integer >= 0 (0: the whole log)")
        require(self, "min_count", at_least(self.min_count, 1), "must be an integer >= 1")
        require(self, "cross_window_days", positive(self.cross_window_days), "must be a finite number > 0")


CHANNEL_NAMES = ("popular", "recent", "itemcf", "content", "als", "ease")
#: what channels.build holds unless set: every channel but "ease" (dense item-item weights: catalogues of at most
#: 10,000 items, cascade.channels.classic.EASE_MAX_ITEMS), less those the data leaves empty (the channels step:
#: "recent" where seen items are filtered)
DEFAULT_CHANNELS = CHANNEL_NAMES[:-1]
#: the channels that return nothing where seen items are filtered: every item "recent" proposes was shown before
EMPTIED_BY_SEEN_FILTER = ("recent",)
EASE_LAMBDAS = (50.0, 200.0, 800.0)  # channels.ease_lambdas unless set
#: the channels.* settings that shape only these channels: set beside a build without any of them, they do nothing
CHANNEL_SETTINGS = {
    "popular_window_days": ("popular",), "refresh_minutes": ("popular",), "itemcf_neighbours": ("itemcf",),
    "history_length": ("itemcf", "content"), "history_decay": ("itemcf", "content"), "content_column": ("content",),
    "als_factors": ("als",), "als_regularization": ("als",), "als_alpha": ("als",), "als_iterations": ("als",),
    "als_index": ("als",), "als_index_recall": ("als",), "ease_lambdas": ("ease",),
}
#: teacher.collaborative_lambdas unless set: one fit (about 30 s at 7,583 items on 2 cores); on ML-100K's 12
#: backtest runs 200 alone did as well as the grid above chosen on validation (BENCHMARKS.md)
COLLABORATIVE_LAMBDAS = (200.0,)
COLLABORATIVE_WEIGHTS = (0.1, 0.25, 0.5, 1.0)  # teacher.collaborative_weights unless set (0 is always tried)
COLLABORATIVE_POPULAR_DAYS = (7.0, 30.0)  # teacher.collaborative_popular_days unless set


@dataclass(frozen=True)
class ChannelsSection:
    """The classic retrieval channels (cascade/channels): each in ``build`` is fitted on the train split and its
    settings chosen from the grids below by validation click-recall@tune_k (pipeline/judge.py). They are the
    replay's reference baselines and candidate sources beside the two-tower.

    popular_window_days: trailing windows tried for most-popular; refresh_minutes: how often its list is recounted.
    history_length / history_decay: the recent clicks that drive itemcf and content. content_column: the item
    column whose values are the content categories (unset: the data step's tag column, data.cross_tag_column or
    the source's own). ease_lambdas: the EASE channel's L2 grid (only with "ease" in
    ``build``). als_*: the ALS grid (implicit's settings). als_index: the FAISS
    factory of the chosen ALS model's item-factor index, which serves its lists (None: exact Flat while items x
    factors <= 200K x 32, IVF above: cascade.channels.classic.als_factory); als_index_recall: the recall@100
    against exact search an approximate one is tuned to.

    build unset (None): :data:`DEFAULT_CHANNELS`, less "recent" where the data step filters seen items (it would
    return nothing; the step records why). A ``build`` that names a channel the seen filter empties is an error."""

    build: tuple[str, ...] | None = None
    popular_window_days: tuple[float, ...] = (1.0, 7.0, 30.0)
    refresh_minutes: float = 60.0
    itemcf_neighbours: int = 100
    history_length: int = 20
    history_decay: float = 0.9
    content_column: str | None = None
    als_factors: tuple[int, ...] = (32, 128)
    als_regularization: tuple[float, ...] = (0.01, 0.1)
    als_alpha: tuple[float, ...] = (1.0, 10.0)
    als_iterations: int = 15
    als_index: str | None = None
    als_index_recall: float = 0.95
    ease_lambdas: tuple[float, ...] = EASE_LAMBDAS
    tune_requests: int = 2000
    tune_k: int = 10

    @property
    def names(self) -> tuple[str, ...]:
        """The channels ``build`` asks for (unset: :data:`DEFAULT_CHANNELS`); the step may leave out those the seen
        filter empties where ``build`` is unset."""
        return DEFAULT_CHANNELS if self.build is None else self.build

    def __post_init__(self) -> None:
        unknown = sorted(set(self.names) - set(CHANNEL_NAMES))
        if unknown:
            raise ValueError(f"channels.build: unknown channel(s) {unknown}; known: {list(CHANNEL_NAMES)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"channels.build lists a channel twice: {list(self.names)}")
        for key in ("popular_window_days", "als_factors", "als_regularization", "als_alpha", "ease_lambdas"):
            if not getattr(self, key):
                raise ValueError(f"channels.{key} needs at least one value")
        if any(not (np.isfinite(w) and w > 0) for w in self.popular_window_days):
            raise ValueError(f"channels.popular_window_days must be > 0, got {list(self.popular_window_days)}")
        for key in ("itemcf_neighbours", "history_length", "als_iterations", "tune_requests", "tune_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"channels.{key} must be >= 1, got {getattr(self, key)}")
        if not (self.refresh_minutes > 0 and 0 < self.history_decay <= 1):
            raise ValueError("channels.refresh_minutes must be > 0 and channels.history_decay in (0, 1]")
        require(self, "als_index_recall", finite(self.als_index_recall) and 0.0 < self.als_index_recall <= 1.0,
                "must be in (0, 1]")
        require(self, "ease_lambdas", all(positive(v) for v in self.ease_lambdas), "must be finite numbers > 0")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, users in CHANNEL_SETTINGS.items():
            needs = " or ".join(f'"{n}"' for n in users)
            require(self, key, getattr(self, key) == defaults[key] or any(n in self.names for n in users),
                    f"is set but channels.build has no {needs}: it would do nothing")
        if self.als_index is not None:
            try:
                parse_factory(self.als_index, d=0)
            except ValueError as e:
                raise FieldError(type(self).__name__, "als_index", self.als_index, str(e)) from None


@dataclass(frozen=True)
class EntireSpaceSection:
    """Entire-space training of the teacher (cascade/train/entire_space.py): besides the impressions, per request
    ``unshown_per_shown`` x its impressions items not shown to it (a ``popularity_share`` of them drawn by train
    popularity, the rest uniformly; only items that exist at the request's time), and an exposure model next to
    the click model. The weight of exposure in the corpus-wide ranking is chosen from ``exposure_weights`` by the
    teacher's click-recall@``select_k`` over the whole corpus on up to ``select_requests`` validation requests
    (pipeline/judge.py; judge = "clicks"), or by the AUC of the ranking score on the validation split's
    random-exposure impressions (judge = "random_auc"; data with such a slice only: logged clicks favour what the
    logging policy showed, the random slice does not; benchmarks/exposure_judge.py). judge = "auto" (the default)
    takes "random_auc" where the validation split has random-exposure impressions with clicks and non-clicks and
    "clicks" elsewhere; the teacher's manifest records which. Among the weights within one SE of the best, the
    clicks judge takes the one closest to 1 (the product rule), the random-slice judge the smallest
    (train/entire_space.py: PRODUCT_RULE). 0 in the grid lets validation switch the exposure term off.
    unshown_per_shown = 0 trains the plain P(click | shown) teacher. ``exposure_exclude``: columns the
    exposure model does not read (default the item id: its embedding memorises the train period's exposure volume,
    which drifts; the item's windowed counts say what is shown now; models/entire_space.py)."""

    unshown_per_shown: float = 1.0
    popularity_share: float = 0.5
    w_exposure: float = 1.0
    exposure_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    exposure_exclude: tuple[str, ...] = ("item_id",)
    select_k: int = 10
    select_requests: int = 1000
    judge: str = "auto"

    def __post_init__(self) -> None:
        if self.judge not in ("auto", "clicks", "random_auc"):
            raise ValueError(f"teacher.entire_space.judge must be 'auto', 'clicks' or 'random_auc', got "
                             f"{self.judge!r}")
        if not (np.isfinite(self.unshown_per_shown) and self.unshown_per_shown >= 0):
            raise ValueError(f"teacher.entire_space.unshown_per_shown must be >= 0, got {self.unshown_per_shown}")
        if not 0.0 <= self.popularity_share <= 1.0:
            raise ValueError(f"teacher.entire_space.popularity_share must be in [0, 1], got {self.popularity_share}")
        if not (np.isfinite(self.w_exposure) and self.w_exposure > 0):
            raise ValueError(f"teacher.entire_space.w_exposure must be > 0, got {self.w_exposure}")
        if not self.exposure_weights or any(not (np.isfinite(b) and b >= 0) for b in self.exposure_weights):
            raise ValueError(f"teacher.entire_space.exposure_weights must be values >= 0, got "
                             f"{list(self.exposure_weights)}")
        if self.select_k < 1 or self.select_requests < 1:
            raise ValueError("teacher.entire_space.select_k and select_requests must be >= 1")
        defaults = EntireSpaceSection.__dataclass_fields__
        unused = [k for k in ("popularity_share", "w_exposure", "exposure_weights", "exposure_exclude", "judge")
                  if getattr(self, k) != defaults[k].default]
        if self.unshown_per_shown == 0 and unused:
            raise ValueError(f"teacher.entire_space.{unused[0]} is set, but unshown_per_shown = 0 trains the plain "
                             "P(click | shown) teacher, with no exposure model: it would do nothing")
        logged = [k for k in ("select_k", "select_requests") if getattr(self, k) != defaults[k].default]
        if self.judge == "random_auc" and logged:
            raise ValueError(f"teacher.entire_space.{logged[0]} is set, but judge = \"random_auc\" judges the exposure "
                             "weight and the collaborative term by the random slice's AUC, not by logged clicks: it "
                             "would do nothing")

    @property
    def enabled(self) -> bool:
        return self.unshown_per_shown > 0


@dataclass(frozen=True)
class TeacherSection:
    """sequence_length: N > 0 gives the teacher the user's behaviour sequence: the last N distinct items the user
    clicked in the cross-feature window strictly before the request (item id, and the cross tag / author columns
    where they are categorical item features), read through DIN target attention (cascade/models/sequence.py;
    model.attention_mlp: its score MLP). 0: no sequence. The data step builds the sequences' columns; the teacher's
    model reads side "history" exactly when N > 0 (:attr:`ranker`; an entire-space teacher's exposure model that
    leaves the item id out goes without it, the item id being the attention's query).

    collaborative: the teacher's ranking score plus weight x the request's EASE scores standardised over the corpus
    (cascade/models/collaborative.py), (lambda, weight) chosen from ``collaborative_lambdas`` x (0, and
    ``collaborative_weights``) on validation outcomes by the exposure weight's judge (train/collaborative.py: on
    logged clicks the best score, on the random slice the one-SE rule leaning to 0): "on",
    "off", or "auto" (the default): on for catalogues of at most 10,000 items (the EASE fit inverts a dense items x
    items matrix: cascade.channels.classic.EASE_MAX_ITEMS), off above; "on" above that size is refused. The
    teacher's manifest records the choice and every score of the grid.

    collaborative_popular_days: the term may also take the classic prior most-popular + EASE (the click counts of
    these trailing windows, recounted every ``collaborative_refresh_minutes``), its windows, EASE weight and weight
    beside the teacher chosen on validation by the same judge (train/collaborative.py: the one-SE rule, leaning to
    the prior's largest weight on logged clicks and to no prior on the random slice); () searches no prior."""

    model: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dcnv2", emb_dim=8, mlp=(128, 64),
                                                                     cross_layers=2, cross_rank=32))
    sequence_length: int = 0
    # min_steps_per_epoch: on a small log the batch shrinks so that an epoch is 16 steps at least (BENCHMARKS.md,
    # "Small logs: batches that leave an epoch a few steps"); the world and ML-100K take 180-720 steps an epoch
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=1, batch_size=4096,
                                                                   min_steps_per_epoch=16))
    entire_space: EntireSpaceSection = field(default_factory=EntireSpaceSection)
    lightgbm: bool = True
    lightgbm_trees: int = 100
    lightgbm_max_rows: int | None = 300_000  # the most recent train rows (GBDT cost grows with rows x features)
    collaborative: str = "auto"
    collaborative_lambdas: tuple[float, ...] = COLLABORATIVE_LAMBDAS
    collaborative_weights: tuple[float, ...] = COLLABORATIVE_WEIGHTS
    collaborative_popular_days: tuple[float, ...] = COLLABORATIVE_POPULAR_DAYS
    collaborative_refresh_minutes: float = 60.0

    def __post_init__(self) -> None:
        require(self, "sequence_length", self.sequence_length == 0 or at_least(self.sequence_length, 1),
                "must be an integer >= 0 (0: no behaviour sequence)")
        require(self, "collaborative", self.collaborative in ("auto", "on", "off"), "must be 'auto', 'on' or 'off'")
        for key in ("collaborative_lambdas", "collaborative_weights"):
            grid = getattr(self, key)
            require(self, key, len(grid) > 0 and all(positive(v) for v in grid), "must be finite numbers > 0")
        require(self, "collaborative_popular_days", all(positive(v) for v in self.collaborative_popular_days),
                "must be finite numbers > 0 (or empty: no popularity prior)")
        require(self, "collaborative_refresh_minutes", positive(self.collaborative_refresh_minutes),
                "must be a finite number > 0")
        popular_unset = (self.collaborative_popular_days, self.collaborative_refresh_minutes) == (
            COLLABORATIVE_POPULAR_DAYS, 60.0)
        grids_unset = (self.collaborative_lambdas, self.collaborative_weights) == (COLLABORATIVE_LAMBDAS,
                                                                                 COLLABORATIVE_WEIGHTS)
        require(self, "collaborative", self.collaborative != "off" or (grids_unset and popular_unset),
                "is 'off', so collaborative_lambdas / collaborative_weights / collaborative_popular_days / "
                "collaborative_refresh_minutes would do nothing: leave them unset")
        require(self, "model", "history" not in self.model.sides,
                "sides must not name \"history\": set teacher.sequence_length = N instead (the teacher then reads "
                "the sequence)")
        require(self, "lightgbm_trees", at_least(self.lightgbm_trees, 1), "must be an integer >= 1")
        require(self, "collaborative_refresh_minutes",
                bool(self.collaborative_popular_days) or self.collaborative_refresh_minutes == 60.0,
                "is set, but collaborative_popular_days = [] searches no popularity prior to recount: it would do "
                "nothing")
        require(self, "lightgbm_max_rows", self.lightgbm_max_rows is None or at_least(self.lightgbm_max_rows, 1),
                "must be an integer >= 1 or None (all train rows)")

    @property
    def ranker(self) -> RankerConfig:
        """The teacher's model config: ``model``, reading side "history" when sequence_length > 0."""
        if not self.sequence_length:
            return self.model
        return dataclasses.replace(self.model, sides=(*self.model.sides, "history"))


@dataclass(frozen=True)
class DataStepConfig(DataSection):
    """The data step's config when the teacher reads a behaviour sequence: ``data`` and the sequence length the
    step builds columns for (:func:`data_step_config`)."""

    sequence_length: int = 0


def data_step_config(cfg: PipelineConfig) -> DataSection:
    """The data step's config slice: ``data``, plus teacher.sequence_length when it is > 0 (a run without a sequence
    keeps the slice, and so the data step, it had before sequences existed)."""
    n = cfg.teacher.sequence_length
    if not n:
        return cfg.data
    return DataStepConfig(**{f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(cfg.data)},
                          sequence_length=n)


@dataclass(frozen=True)
class RankLogSection:
    """max_requests: train requests scored (a seeded sample; None = all). n_candidates: list length per request:
    its impressed items, then channel items, then corpus samples. channels: the classic channels (built by the
    channels step) whose merged list (equal quotas, de-duplicated) fills ``channel_share`` of each request's
    non-impressed slots, so the students learn on candidates like those serving retrieves (None: every channel of
    channels.build; the two-tower is not one: it is trained on this log). The rest are corpus samples;
    uniform_frac: their share of uniform (vs popularity-weighted) draws. autocast: the teacher's scoring in
    bfloat16 ("auto" | "bf16" | "off"; cascade.models.scoring.scoring_autocast; what it resolved to is in the step's
    manifest)."""

    max_requests: int | None = 10000
    n_candidates: int = 200
    uniform_frac: float = 0.5
    requests_per_batch: int = 256
    autocast: Literal["auto", "bf16", "off"] = "auto"
    channels: tuple[str, ...] | None = None
    channel_share: float = 0.5

    def __post_init__(self) -> None:
        require(self, "n_candidates", at_least(self.n_candidates, 2), "must be an integer >= 2")
        require(self, "uniform_frac", finite(self.uniform_frac) and 0.0 <= self.uniform_frac <= 1.0,
                "must be in [0, 1]")
        require(self, "max_requests", self.max_requests is None or at_least(self.max_requests, 1),
                "must be an integer >= 1 or None (every train request)")
        require(self, "requests_per_batch", at_least(self.requests_per_batch, 1), "must be an integer >= 1")
        require(self, "autocast", self.autocast in AUTOCAST, f"must be one of {AUTOCAST}")
        require(self, "channel_share", finite(self.channel_share) and 0.0 <= self.channel_share <= 1.0,
                "must be in [0, 1]")
        if self.channels is not None:
            unknown = sorted(set(self.channels) - set(CHANNEL_NAMES))
            require(self, "channels", not unknown and len(set(self.channels)) == len(self.channels),
                    f"must name distinct channels of {list(CHANNEL_NAMES)} (the two-tower is trained on the rank "
                    f"log, so it cannot feed it)")
            require(self, "channels", not (self.channels and self.channel_share == 0.0),
                    "names channels but ranklog.channel_share = 0 takes nothing from them: set a share > 0, or "
                    "leave ranklog.channels out")

    def channels_of(self, built: tuple[str, ...]) -> tuple[str, ...]:
        """The channels the rank log draws from, given those the channels step builds (none at share 0)."""
        if self.channel_share == 0.0:
            return ()
        return tuple(built) if self.channels is None else tuple(self.channels)


def _prerank() -> StudentConfig:
    return StudentConfig(stage="prerank", loss_weights={"click_bce": 1.0, "pointwise": 1.0, "bpr": 1.0,
                                                        "lambda_ndcg": 1.0}, epochs=2)


def _retrieval() -> StudentConfig:
    return StudentConfig(stage="retrieval", loss_weights={"sampled_softmax": 1.0, "teacher_softmax": 1.0,
                                                          "pointwise": 1.0, "listnet": 1.0}, epochs=2)


def _scale_grid(values: tuple[float, ...], key: str, zero: str = "the ground-truth-only student") -> None:
    if not values or any(not (np.isfinite(v) and v >= 0) for v in values) or 0.0 not in values:
        raise ValueError(f"students.{key} must be values >= 0 that include 0 ({zero}), got {list(values)}")


@dataclass(frozen=True)
class StudentsSection:
    """The students: two-tower pre-rank and retrieval students and the rank student, each learning from the clicks
    (its ground-truth terms) plus weighted distillation from the teacher.

    distill: the scale of the towers' distillation terms (cascade/train/students.py ``distill_scale``), or
    "auto": every scale of ``distill_grid`` is trained and judged by the validation clicks its tower keeps at its
    stage size (click-recall@N1 / @N2 over the corpus, on the validation judge); among the scales within one SE
    of the best, the one closest to 0 is served, or to 1 where the teacher-quality gate found the teacher better
    (cascade/pipeline/students.py). Scale 0 is the ground-truth-only student, saved as the ``ground_truth``
    variant for comparison (compare_ground_truth).
    keep_fixed: also save the scale-1 students as the ``fixed`` variant (distillation at the configured
    weights, whatever validation says). rank_distill_scale / rank_distill_grid: the same for the rank student's
    distillation weights (rank_distill's KD, hint, CR, RCR or PFD lambda), chosen by validation AUC.
    confidence: distil each tower only from the rank-log requests whose teacher list ordered the request's
    impressed items at least as well as chance (per-request AUC >= 0.5; requests with one class kept).
    select_requests: validation requests of the judge.
    popularity_prior_grid: the weights tried for each tower's recent-popularity prior (cascade/channels/prior.py:
    the popular channel's trailing-window click counts added to the tower's scores, which fixed item embeddings
    cannot hold); each trained tower keeps the smallest weight within one SE of its best validation click-recall at
    its stage size, and the distillation scale is then chosen on those. (0,): no prior. A weight above 0 needs
    "popular" in channels.build. grid_doublings: every grid above ("auto" scales, prior weights) is widened
    while its largest value scores best on validation: twice that value is tried too (a tower or rank student
    trained, a prior weight judged), at most this many times (a best value on the grid's edge says the grid stops
    short; 0: the grids as given).
    kd_temperature_grid: the softmax temperatures tried for a student whose distillation terms have one (a
    tower's listnet, the rank student's Hinton KD), at its served scale (chosen by "auto" or fixed) when that is
    above 0: among those within one SE of the best validation score, the one closest to the configured
    temperature (loss_params' / rank_distill's, else 1) is served. (): not searched.
    max_epochs_factor: each tower (every scale, prior and temperature tried) trains for up to this many times its
    configured epochs (prerank.epochs / retrieval.epochs); its validation click-recall at its stage size (on the
    judge, without a prior) is measured after every epoch, it stops once epoch_patience epochs in a row bring no
    better mean (None: 2), and among the epochs within one SE of the best the one closest to the configured count
    is served (cascade/pipeline/tower_epochs.py). 1: the configured epochs, not searched."""

    # the user tower reads the user's last 20 clicked items (as many as the channels' history): without them a tower
    # cannot hold what the teacher knows from the user's history (BENCHMARKS.md, "Outcomes": with and without)
    tower: TowerConfig = field(default_factory=lambda: TowerConfig(history_length=20))
    prerank: StudentConfig = field(default_factory=_prerank)
    retrieval: StudentConfig = field(default_factory=_retrieval)
    distill: float | Literal["auto"] = "auto"
    distill_grid: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0)
    compare_ground_truth: bool = True
    keep_fixed: bool = False
    confidence: bool = False
    select_requests: int = 500
    # BENCHMARKS.md, "Outcomes": without the prior the towers lost to most-popular at their own stage sizes
    popularity_prior_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    grid_doublings: int = 3
    kd_temperature_grid: tuple[float, ...] = (0.5, 1.0, 2.0)
    # 1 (not searched) by default: with 3, measured on the world and ML-100K (BENCHMARKS.md, "The towers' training
    # length chosen on validation"), nothing moved end to end, ML-100K's stages kept fewer clicks and the step took
    # 2-2.5x as long
    max_epochs_factor: int = 1
    epoch_patience: int | None = None
    # The rank student is cheap to serve: a small MLP without the user x item cross features (no history lookups at
    # serving); distillation from the teacher, which has them, is how their knowledge reaches it.
    rank_student: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dnn", emb_dim=8, mlp=(64,),
                                                                            sides=("user", "item", "context")))
    rank_student_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=1, batch_size=4096,
                                                                                min_steps_per_epoch=16))
    # Logit KD: the best single distillation term for the rank student in benchmarks/results/rank_table_world.md
    # (+0.008 AUC over plain BCE on the world; CR and RCR gave +0.002 / +0.003). Setting pfd_lambda (e.g. 0.5, with
    # warmup_steps = 20) trains the rank student with PFD instead: a teacher that also reads rank_pfd_side
    # ("privileged": the post-click fields) learns together with it (+0.002 AUC in the rank table, +0.001 in the
    # default pipeline: less than logit KD from the cross-feature teacher on the world).
    rank_distill: DistillConfig = field(default_factory=lambda: DistillConfig(w_bce=1.0, w_kd=1.0))
    rank_distill_scale: float | Literal["auto"] = "auto"
    rank_distill_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    rank_student_max_rows: int | None = None  # both rank students train on the most recent rows only
    # PFD instead of teacher-first distillation when rank_distill.pfd_lambda is set: a teacher that also reads this
    # side trains together with the student (sharing embeddings; the student keeps private tables for these
    # columns); the student alone is saved and served
    rank_pfd_side: str = "privileged"
    rank_pfd_private_columns: tuple[str, ...] = ("user_id",)

    def __post_init__(self) -> None:
        require(self, "rank_pfd_side", self.rank_pfd_side in SIDES, f"is not one of {SIDES}")
        require(self, "rank_student_max_rows",
                self.rank_student_max_rows is None or at_least(self.rank_student_max_rows, 1),
                "must be an integer >= 1 or None (all train rows)")
        if self.rank_distill.pfd_lambda is not None and self.rank_pfd_side in self.rank_student.sides:
            raise ValueError(f"rank_pfd_side {self.rank_pfd_side!r} is read by the rank student itself "
                             f"(rank_student.sides {self.rank_student.sides}), so it is not privileged")
        _scale_grid(self.distill_grid, "distill_grid")
        _scale_grid(self.rank_distill_grid, "rank_distill_grid")
        _scale_grid(self.popularity_prior_grid, "popularity_prior_grid", "the tower without a prior")
        require(self, "grid_doublings", at_least(self.grid_doublings, 0),
                "must be an integer >= 0 (0: the grids as given)")
        require(self, "max_epochs_factor", at_least(self.max_epochs_factor, 1),
                "must be an integer >= 1 (1: the configured epochs, not searched)")
        require(self, "epoch_patience", self.epoch_patience is None or at_least(self.epoch_patience, 1),
                "must be an integer >= 1 or None (2)")
        require(self, "epoch_patience", self.epoch_patience is None or self.max_epochs_factor > 1,
                "is set, but students.max_epochs_factor = 1 trains the configured epochs without judging them: "
                "it would do nothing")
        if any(not (np.isfinite(t) and t > 0) for t in self.kd_temperature_grid):
            raise ValueError(f"students.kd_temperature_grid must be temperatures > 0, got "
                             f"{list(self.kd_temperature_grid)}")
        for key in ("distill", "rank_distill_scale"):
            v = getattr(self, key)
            if v != "auto" and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"students.{key} must be \"auto\" or a number >= 0, got {v!r}")
        for name, scfg in (("prerank", self.prerank), ("retrieval", self.retrieval)):
            if scfg.stage != name:
                raise ValueError(f"students.{name}.stage must be {name!r}, got {scfg.stage!r}")
            if not any(is_ground_truth(scfg, t) and w for t, w in scfg.loss_weights.items()):
                raise ValueError(f"students.{name} has no ground-truth term (click_bce, or sampled_softmax on "
                                 f"clicks): a student always keeps one, so that distillation cannot take over")
        if self.select_requests < 1:
            raise ValueError(f"students.select_requests must be >= 1, got {self.select_requests}")

    def patience(self) -> int:
        """Epochs without a better validation click-recall before a tower stops (epoch_patience; None: 2)."""
        return 2 if self.epoch_patience is None else self.epoch_patience

    def scales(self) -> tuple[float, ...]:
        """The distillation scales the towers are trained at."""
        if self.distill == "auto":
            return tuple(sorted(set(self.distill_grid)))
        return tuple(sorted({float(self.distill)} | ({0.0} if self.compare_ground_truth else set())
                            | ({1.0} if self.keep_fixed else set())))

    def rank_scales(self) -> tuple[float, ...]:
        if self.rank_distill_scale == "auto":
            return tuple(sorted(set(self.rank_distill_grid)))
        return tuple(sorted({float(self.rank_distill_scale), 0.0}))


@dataclass(frozen=True)
class IndexSection:
    """factory: None chooses from the corpus size. recall_target: the operating point picked from the sweep."""

    factory: str | None = None
    recall_target: float = 0.95
    sweep_queries: int = 1000
    k: int = 100
    omp_threads: int = 1  # 2 OpenMP threads were up to 15x slower on the 2-core machine (benchmarks/bench_index.py)

    def __post_init__(self) -> None:
        require(self, "recall_target", finite(self.recall_target) and 0.0 < self.recall_target <= 1.0,
                "must be in (0, 1]")
        for name in ("sweep_queries", "k", "omp_threads"):
            require(self, name, at_least(getattr(self, name), 1), "must be an integer >= 1")
        if self.factory is not None:
            try:
                spec = parse_factory(self.factory, d=0)
            except ValueError as e:
                raise FieldError(type(self).__name__, "factory", self.factory, str(e)) from None
            sizes = {k: v for k, v in spec.items() if k in ("nlist", "M", "m", "nbits", "opq")}
            require(self, "factory", all(v >= 1 for v in sizes.values()), f"sizes {sizes} must be >= 1")
            require(self, "recall_target", spec["kind"] != "flat" or self.recall_target == 0.95,
                    "is set, but index.factory = \"Flat\" searches exactly, with no operating point to pick: it "
                    "would do nothing")


#: the K of the teacher-recall@K curves where replay.recall_ks is not set (cut to the retrieval stage's length)
RECALL_KS = (1, 5, 10, 20, 50, 100, 200, 500)


@dataclass(frozen=True)
class ReplaySection:
    n_retrieve: int = 500
    n_prerank: int = 100
    k: int = 10
    ranker: Literal["teacher", "student"] = "teacher"
    max_requests: int | None = 500
    # random-exposure test requests replayed besides the even spread of max_requests (an even spread of them; they
    # count only in the random slice's means, so that the unbiased slice is measured on enough requests)
    max_rand_requests: int | None = 1000
    latency_requests: int = 300
    batch_size: int = 256
    recall_ks: tuple[int, ...] = RECALL_KS  # the teacher-recall@K curves' K (the default: up to n_retrieve)
    # the multi-channel cascade ("distilled+channels"): the distilled two-tower plus these channels (built by the
    # channels step; unset: every channel it built, cascade.serve.cascade.union_channels) in one retrieval stage, the
    # two-tower taking two_tower_quota of the N1 slots (unset: 0.5) and the channels sharing the rest in proportion
    # to channel_quotas (channel -> weight > 0; a channel it leaves out weighs 1; unset: evenly); () replays no
    # multi-channel cascade. prerank_quotas: its pre-rank keeps
    # those quotas (unset: true; each channel's candidates in pre-rank score order, interleaved by quota) instead of
    # cutting the union by the pre-rank score alone, which keeps almost only the two-tower's own candidates
    # (cascade/serve/cascade.py: channel_settings). merge: how the union is taken, "quotas" (unset: the above) or
    # "scores": each channel's scores standardised over its own list of the request, the union by the best of them
    # (cascade.channels.MergedRetriever); there two_tower_quota and channel_quotas would do nothing and are an
    # error, and prerank_quotas keeps each channel's share of the request's union. Any of the four set beside no
    # channels is an error: it would do nothing; so is a channel_quotas key that names no channel of the union.
    channels: tuple[str, ...] | None = None
    two_tower_quota: float | None = None
    channel_quotas: dict[str, float] | None = None
    prerank_quotas: bool | None = None
    merge: Merge | None = None

    def __post_init__(self) -> None:
        for name in ("k", "n_prerank", "n_retrieve", "batch_size", "latency_requests"):
            require(self, name, at_least(getattr(self, name), 1), "must be an integer >= 1")
        if not (self.k <= self.n_prerank <= self.n_retrieve):
            raise ValueError(f"need 0 < k <= n_prerank <= n_retrieve, got replay.k={self.k}, "
                             f"replay.n_prerank={self.n_prerank}, replay.n_retrieve={self.n_retrieve}")
        require(self, "max_requests", self.max_requests is None or at_least(self.max_requests, 1),
                "must be an integer >= 1 or None (every test request)")
        require(self, "max_rand_requests", self.max_rand_requests is None or at_least(self.max_rand_requests, 0),
                "must be an integer >= 0 or None (every random-exposure test request)")
        require(self, "recall_ks", bool(self.recall_ks) and all(at_least(k, 1) for k in self.recall_ks),
                "must be a non-empty list of integers >= 1")
        # the default ladder is cut to the retrieval stage's length; a list that is set must fit it
        above = [k for k in self.recall_ks if k > self.n_retrieve]
        require(self, "recall_ks", self.recall_ks == RECALL_KS or not above,
                f"holds {above}, above replay.n_retrieve = {self.n_retrieve}: the retrieval stage keeps "
                f"{self.n_retrieve} items, so teacher-recall@K cannot be measured there")
        listed = self.channels or ()
        if sorted(set(listed) - set(CHANNEL_NAMES)) or len(set(listed)) != len(listed):
            raise ValueError(f"replay.channels must name distinct channels of {list(CHANNEL_NAMES)}, got "
                             f"{list(listed)}")
        if self.channel_quotas is not None:
            if "two_tower" in self.channel_quotas:
                raise ValueError("replay.channel_quotas weighs the classic channels among themselves; the two-tower's "
                                 "share of the slots is replay.two_tower_quota")
            unknown = sorted(set(self.channel_quotas) - set(CHANNEL_NAMES))
            if unknown:
                raise ValueError(f"replay.channel_quotas names unknown channel(s) {unknown}; known: "
                                 f"{list(CHANNEL_NAMES)}")
            bad = {k: v for k, v in self.channel_quotas.items() if not positive(v)}
            if bad:
                raise ValueError(f"replay.channel_quotas: every weight must be a finite number > 0, got {bad}")
        unused_quota_settings(self.merge, {"two_tower_quota": self.two_tower_quota,
                                           "channel_quotas": self.channel_quotas})
        if self.channels == ():
            for name in ("two_tower_quota", "channel_quotas", "prerank_quotas", "merge"):
                if getattr(self, name) is not None:
                    raise ValueError(f"replay.{name} = {getattr(self, name)} is set but replay.channels is empty: "
                                     "it shapes the multi-channel cascade, which is not replayed, so it would do "
                                     "nothing (name channels, or leave it unset)")
        elif self.two_tower_quota is not None and not 0.0 < self.two_tower_quota < 1.0:
            raise ValueError(f"replay.two_tower_quota must be in (0, 1), got {self.two_tower_quota}")


@dataclass(frozen=True)
class ReportSection:
    """ablation: an ablation JSON written by `cascade ablation` / benchmarks/ablation.py, shown in the report's
    distillation-ablation section (it comes from its own multi-seed runs, as its table says)."""

    ablation: str | None = None

    def __post_init__(self) -> None:
        if self.ablation is not None:
            require(self, "ablation", Path(self.ablation).is_file(), "does not exist (or is not a file)")
            problem = ablation_file_problem(Path(self.ablation))
            require(self, "ablation", problem is None, f"is not an ablation JSON written by `cascade ablation` "
                                                       f"({problem})")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@dataclass(frozen=True)
class TrackingSection:
    """Experiment tracking of a run (what it logs: every model's train loss and validation metric per epoch, the
    step metrics, the resolved config; :mod:`cascade.pipeline.tracking`). Off by default; a tracker asked for
    whose package is not installed is an error, not silently skipped (``pip install 'cascade-distill[tracking]'``).

    tensorboard: event files under ``runs/<run>/tensorboard/`` (``tensorboard --logdir runs``), written anew by
    every ``cascade run``. mlflow: one MLflow run per ``cascade run``, named after the run; mlflow_tracking_uri
    (default: MLflow's own, e.g. the MLFLOW_TRACKING_URI variable) and mlflow_experiment (default "cascade") only
    with mlflow = true."""

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None

    def __post_init__(self) -> None:
        if self.tensorboard and not (_installed("tensorboard") and _installed("torch.utils.tensorboard")):
            raise ValueError("tracking.tensorboard = true needs the tensorboard package, which is not installed: "
                             "pip install 'cascade-distill[tracking]' (or tensorboard)")
        if self.mlflow and not _installed("mlflow"):
            raise ValueError("tracking.mlflow = true needs the mlflow package, which is not installed: "
                             "pip install 'cascade-distill[tracking]' (or mlflow)")
        if not self.mlflow:
            unused = [k for k in ("mlflow_tracking_uri", "mlflow_experiment") if getattr(self, k) is not None]
            if unused:
                raise ValueError(f"tracking.{unused[0]} is set but tracking.mlflow is false: it would do nothing")


@dataclass(frozen=True)
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    channels: ChannelsSection = field(default_factory=ChannelsSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    ranklog: RankLogSection = field(default_factory=RankLogSection)
    students: StudentsSection = field(default_factory=StudentsSection)
    index: IndexSection = field(default_factory=IndexSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    report: ReportSection = field(default_factory=ReportSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


    def __post_init__(self) -> None:
        """Checks across sections (each section checked its own values)."""
        built = self.channels.names
        if any(self.students.popularity_prior_grid) and "popular" not in built:
            raise ConfigError(f"students.popularity_prior_grid = {list(self.students.popularity_prior_grid)} tries a "
                              f"recent-popularity prior, which reads the popular channel, but channels.build = "
                              f"{list(built)} does not build it: add \"popular\", or set the grid to [0]")
        drawn = self.ranklog.channels_of(built)
        missing = [n for n in drawn if n not in built]
        if missing:
            raise ConfigError(f"ranklog.channels names {missing}, which the channels step does not build "
                              f"(channels.build = {list(built)})")
        if self.ranklog.channel_share > 0 and not drawn:
            raise ConfigError(f"ranklog.channel_share = {self.ranklog.channel_share} but no channel to draw from "
                              f"(ranklog.channels = {_listed(self.ranklog.channels)}, channels.build = "
                              f"{list(built)}): name channels, or set ranklog.channel_share = 0")
        shaping = [k for k in ("two_tower_quota", "channel_quotas", "prerank_quotas", "merge")
                   if getattr(self.replay, k) is not None]
        if self.replay.channels is None and not built and shaping:
            raise ConfigError(f"replay.{shaping[0]} = {getattr(self.replay, shaping[0])} is set but channels.build "
                              "builds no channel, so no multi-channel cascade is replayed: it would do nothing")
        unbuilt = [n for n in self.replay.channels or () if n not in built]
        if unbuilt:
            raise ConfigError(f"replay.channels names {unbuilt}, which the channels step does not build "
                              f"(channels.build = {list(built)})")
        union = built if self.replay.channels is None else self.replay.channels
        outside = sorted(set(self.replay.channel_quotas or ()) - set(union))
        if outside:
            where = (f"replay.channels = {list(self.replay.channels)}" if self.replay.channels is not None
                     else f"every channel of channels.build = {list(built)}")
            raise ConfigError(f"replay.channel_quotas weighs {outside}, which the multi-channel cascade does not "
                              f"hold ({where}): the weight would do nothing")
        if self.data.filter_seen is True:
            for key, named in (("channels.build", self.channels.build), ("ranklog.channels", self.ranklog.channels),
                               ("replay.channels", self.replay.channels),
                               ("replay.channel_quotas", self.replay.channel_quotas)):
                emptied = [n for n in named or () if n in EMPTIED_BY_SEEN_FILTER]
                if emptied:
                    raise ConfigError(f"{key} names {emptied}, but data.filter_seen = true drops every item the user "
                                      f"was shown before, which is every item {emptied} proposes: it would return "
                                      f"nothing; leave it out, or set data.filter_seen = false")
        if self.teacher.sequence_length and not self.data.cross_features:
            raise ConfigError(f"teacher.sequence_length = {self.teacher.sequence_length} needs data.cross_features = "
                              "true (the cross-feature store answers the behaviour sequences, in its window)")
        if "history" in self.students.rank_student.sides and not self.teacher.sequence_length:
            raise ConfigError("students.rank_student.sides names \"history\" but teacher.sequence_length = 0: no "
                              "behaviour sequence is built; set teacher.sequence_length = N")
        if self.index.factory is not None:
            try:
                parse_factory(self.index.factory, self.students.tower.out_dim)
            except ValueError as e:
                raise ConfigError(f"index.factory = {self.index.factory!r}: {e} (students.tower.out_dim)") from None
        if self.report.ablation is not None:
            shown = _ablation_dataset(Path(self.report.ablation))
            if shown is not None and shown != self.data.source.replace("-", "_"):
                raise ConfigError(f"report.ablation = {self.report.ablation!r} is the ablation of dataset {shown!r}, "
                                  f"but data.source is {self.data.source!r}: use --data {self.data.source}:PATH "
                                  "(it leaves out an ablation of another dataset) or a config without it")


def _listed(names: tuple[str, ...] | None) -> object:
    return None if names is None else list(names)


def with_run_device(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every training config (teacher.train, students.rank_student_train, the two-tower students)
    on ``run.device``: the one device switch of a run."""
    d, r = cfg.run.device, dataclasses.replace
    st = cfg.students
    students = r(st, rank_student_train=r(st.rank_student_train, device=d),
                 **{s: r(getattr(st, s), device=d) for s in STUDENTS})
    return r(cfg, teacher=r(cfg.teacher, train=r(cfg.teacher.train, device=d)), students=students)


def ablation_file_problem(path: Path) -> str | None:
    """Why the file ``path`` is not an ablation result (a JSON object with "metrics", "seeds" and "rows" lists, as
    `cascade ablation` writes it); None when it is one. Never echoes the file's contents."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a UTF-8 JSON file"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if not isinstance(data, dict):
        return "its JSON is not an object"
    missing = [k for k in ("metrics", "seeds", "rows") if not isinstance(data.get(k), list)]
    return f"no list {missing[0]!r}" if missing else None


def check_settable(data: Mapping[str, Any]) -> None:
    """Raise ConfigError when the (partial) pipeline config ``data`` sets a key of :data:`SET_BY_THE_PIPELINE`."""
    for key, what in SET_BY_THE_PIPELINE.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, Mapping) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{key} cannot be set in a pipeline config: {what} sets it")


_ABSENT = object()


#: Keys whose values are paths: in a pipeline file relative to the file's folder, in a --set value to the
#: current folder (so a run started from any folder reads the same files).
PATH_KEYS = (("data", "path"), ("report", "ablation"))
#: The keys of [data] a --data option replaces: the rest of the table describes the config's own dataset.
DATA_SPEC_HELP = ("SOURCE[:PATH]: world, custom:MAPPING.toml, kuairand:DIR, movielens-100k:DIR or "
                  "movielens-1m:DIR")


def _resolve_paths(data: dict, base: Path) -> None:
    for section, key in PATH_KEYS:
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            p = Path(node[key]).expanduser()
            node[key] = os.path.normpath(p if p.is_absolute() else (base / p))


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``--data SOURCE[:PATH]`` -> (source, path); raises ConfigError naming what is wrong."""
    source, sep, path = spec.partition(":")
    if source not in SOURCES:
        raise ConfigError(f"--data {spec!r}: unknown source {source!r}; use {DATA_SPEC_HELP}")
    if source == "world" and sep:
        raise ConfigError(f"--data {spec!r}: the world is generated and takes no path; use --data world")
    if source != "world" and not path:
        raise ConfigError(f"--data {spec!r}: {source} needs a path, e.g. --data {source}:"
                          f"{'path/to/mapping.toml' if source == 'custom' else 'path/to/folder'}")
    return source, (os.path.normpath(Path.cwd() / Path(path).expanduser()) if path else None)


def _dataset_run_name(source: str, path: str | None) -> str:
    """The run name a --data option gives when the config names no run: the mapping's ``name`` (custom) or the
    source, made a valid run name."""
    import re
    import tomllib

    name = source
    if source == "custom" and path and Path(path).is_file():
        try:
            name = str(tomllib.loads(Path(path).read_text(encoding="utf-8")).get("name") or Path(path).stem)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            name = Path(path).stem  # the data step reports what is wrong with the mapping
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_") or source
    return name[:128]


def config_data(path: str | Path | None = None, overrides: list[str] | None = None,
                data_spec: str | None = None, ablation: bool = False) -> dict[str, Any]:
    """The plain config data of a pipeline file with ``key.path=value`` overrides, paths resolved (see
    :data:`PATH_KEYS`) and, with ``data_spec`` (``--data SOURCE[:PATH]``), the dataset replaced: the file's
    [data] table is dropped for source and path (every other data key at its default unless a --set gives it),
    the run is named after the dataset (the mapping's ``name``, or the source) unless a --set names it, and a
    report.ablation of another dataset is dropped (each logged). ablation: the file may hold an [ablation] table
    (`cascade ablation`); elsewhere one is refused, and so is a data mapping given as the pipeline."""
    import logging

    data = load_toml(path) if path is not None else {}
    if "ablation" in data and not ablation:
        raise ConfigError(f"{path} is an ablation file, not a pipeline: run it with `cascade ablation {path}`")
    if {"files", "columns"} & set(data):
        raise ConfigError(f"{path} is a data mapping of your own logs, not a pipeline: give it as the data of a "
                          f"pipeline, `cascade run --data custom:{path}`")
    if path is not None:
        _resolve_paths(data, Path(path).resolve().parent)
    given = apply_overrides({}, list(overrides or []))
    check_settable(given)
    _resolve_paths(given, Path.cwd())
    if data_spec is not None:
        source, data_path = parse_data_spec(data_spec)
        if "data" in given and {"source", "path"} & set(given["data"]):
            raise ConfigError("--data and --set data.source / data.path both name the dataset; use one")
        table = data.pop("data", {}) or {}
        log = logging.getLogger(__name__)
        settings = {k: v for k, v in sorted(table.items()) if k not in ("source", "path")}
        if settings:
            log.warning("--data %s replaces the config's [data] table: its %s are back at their defaults (give them "
                        "with --set data.KEY=VALUE)", data_spec,
                        ", ".join(f"{k} = {v!r}" for k, v in settings.items()))
        data["data"] = {"source": source, **({"path": data_path} if data_path else {})}
        if "name" not in given.get("run", {}):
            name = _dataset_run_name(source, data_path)
            if data.get("run", {}).get("name", name) != name:
                log.info("--data %s: the run is named %r (not the config's %r; --set run.name=... names it)",
                         data_spec, name, data["run"]["name"])
            data.setdefault("run", {})["name"] = name
        ablation = (data.get("report") or {}).get("ablation")
        if ablation and "ablation" not in given.get("report", {}):
            shown = _ablation_dataset(Path(ablation))
            if shown is not None and shown != source.replace("-", "_"):
                log.info("--data %s: report.ablation (the ablation of %r) is not shown", data_spec, shown)
                del data["report"]["ablation"]
    data = _merge(data, given)
    check_settable(data)
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _ablation_dataset(path: Path) -> str | None:
    import json

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # ReportSection names the problem
    return d.get("dataset") if isinstance(d, dict) else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data_spec: str | None = None) -> PipelineConfig:
    """Load and check a pipeline config (TOML) with ``key.path=value`` overrides and an optional ``--data``
    dataset (:func:`config_data`); raises ConfigError naming the key before any work starts."""
    return with_run_device(from_dict(PipelineConfig, config_data(path, overrides, data_spec)))
