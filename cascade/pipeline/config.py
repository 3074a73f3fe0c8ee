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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import artifacts as A
from ..config import ConfigError, apply_overrides, from_dict, load_toml
from ..data.schema import SIDES
from ..data.world import WorldConfig
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
    **{f"students.{s}.distill_scale": "students.distill (a scale, or \"auto\": chosen on validation)"
       for s in STUDENTS},
}


@dataclass(frozen=True)
class RunSection:
    """name: the run folder under runs_dir. seed: the one seed every step derives its randomness from.
    threads: torch threads while the run lasts (None: the process's setting); weights depend on it in the last
    float bits, so two runs compare bit for bit only under the same count."""

    name: str = "default"
    seed: int = 0
    runs_dir: str = "runs"
    threads: int | None = None

    def __post_init__(self) -> None:
        A.check_run_name(self.name)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"run.threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class DataSection:
    """source: where the logs come from; path: the directory (kuairand, movielens) or mapping TOML (custom)."""

    source: Literal["world", "kuairand", "movielens-100k", "movielens-1m", "custom"] = "world"
    path: str | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    valid_days: int = 1
    test_days: int = 1
    min_count: int = 2
    numeric: Literal["standardize", "log_standardize", "quantile"] = "log_standardize"
    cross_window_days: float = 7.0
    cross_tag_column: str = "tag"  # the item column whose user x value history the cross features count
    cross_author_column: str = "author_id"
    # the behaviour sequence (side "history"): the user's last history_length distinct clicked items in the cross
    # window before the request (item id, tag and author columns where categorical); 0: none
    history_length: int = 20
    # drop items a user was shown before from every list (cascade, baselines, validation); "auto": when the train
    # log shows little re-consumption (pipeline/judge.py)
    filter_seen: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.source != "world" and not self.path:
            raise ValueError(f"data.path is required for data.source = {self.source!r}")
        if self.path and not Path(self.path).exists():
            raise ValueError(f"data.path {self.path!r} does not exist")
        if self.valid_days < 1 or self.test_days < 1:
            raise ValueError("data.valid_days and data.test_days must be >= 1")
        if self.cross_window_days <= 0:
            raise ValueError(f"data.cross_window_days must be > 0, got {self.cross_window_days}")
        if self.history_length < 0:
            raise ValueError(f"data.history_length must be >= 0, got {self.history_length}")


CHANNEL_NAMES = ("popular", "recent", "itemcf", "content", "als")


@dataclass(frozen=True)
class ChannelsSection:
    """The classic retrieval channels (cascade/channels): each in ``build`` is fitted on the train split and its
    settings chosen from the grids below by validation click-recall@tune_k (pipeline/judge.py). They are the
    replay's reference baselines and candidate sources beside the two-tower.

    popular_window_days: trailing windows tried for most-popular; refresh_minutes: how often its list is recounted.
    history_length / history_decay: the recent clicks that drive itemcf and content. content_column: the item
    column whose values are the content categories. als_*: the ALS grid (implicit's settings)."""

    build: tuple[str, ...] = CHANNEL_NAMES
    popular_window_days: tuple[float, ...] = (1.0, 7.0, 30.0)
    refresh_minutes: float = 60.0
    itemcf_neighbours: int = 100
    history_length: int = 20
    history_decay: float = 0.9
    content_column: str = "tag"
    als_factors: tuple[int, ...] = (32, 128)
    als_regularization: tuple[float, ...] = (0.01, 0.1)
    als_alpha: tuple[float, ...] = (1.0, 10.0)
    als_iterations: int = 15
    tune_requests: int = 2000
    tune_k: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.build) - set(CHANNEL_NAMES))
        if unknown:
            raise ValueError(f"channels.build: unknown channel(s) {unknown}; known: {list(CHANNEL_NAMES)}")
        if len(set(self.build)) != len(self.build):
            raise ValueError(f"channels.build lists a channel twice: {list(self.build)}")
        for key in ("popular_window_days", "als_factors", "als_regularization", "als_alpha"):
            if not getattr(self, key):
                raise ValueError(f"channels.{key} needs at least one value")
        if any(not (np.isfinite(w) and w > 0) for w in self.popular_window_days):
            raise ValueError(f"channels.popular_window_days must be > 0, got {list(self.popular_window_days)}")
        for key in ("itemcf_neighbours", "history_length", "als_iterations", "tune_requests", "tune_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"channels.{key} must be >= 1, got {getattr(self, key)}")
        if not (self.refresh_minutes > 0 and 0 < self.history_decay <= 1):
            raise ValueError("channels.refresh_minutes must be > 0 and channels.history_decay in (0, 1]")


@dataclass(frozen=True)
class EntireSpaceSection:
    """Entire-space training of the teacher (cascade/train/entire_space.py): besides the impressions, per request
    ``unshown_per_shown`` x its impressions items not shown to it (a ``popularity_share`` of them drawn by train
    popularity, the rest uniformly; only items that exist at the request's time), and an exposure model next to
    the click model. The weight of exposure in the corpus-wide ranking is chosen from ``exposure_weights`` by the
    teacher's click-recall@``select_k`` over the whole corpus on up to ``select_requests`` validation requests
    (pipeline/judge.py); 0 in the grid lets validation switch it off. unshown_per_shown = 0 trains the plain
    P(click | shown) teacher."""

    unshown_per_shown: float = 1.0
    popularity_share: float = 0.5
    w_exposure: float = 1.0
    exposure_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    select_k: int = 10
    select_requests: int = 1000

    def __post_init__(self) -> None:
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

    @property
    def enabled(self) -> bool:
        return self.unshown_per_shown > 0


@dataclass(frozen=True)
class TeacherSection:
    # the teacher reads the behaviour sequence through target attention (data.history_length = 0: no sequence)
    model: RankerConfig = field(default_factory=lambda: RankerConfig(
        backbone="dcnv2", emb_dim=8, mlp=(128, 64), cross_layers=2, cross_rank=32,
        sides=("user", "item", "context", "cross", "history")))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=1, batch_size=4096))
    entire_space: EntireSpaceSection = field(default_factory=EntireSpaceSection)
    lightgbm: bool = True
    lightgbm_trees: int = 100
    lightgbm_max_rows: int | None = 300_000  # the most recent train rows (GBDT cost grows with rows x features)


@dataclass(frozen=True)
class RankLogSection:
    """max_requests: train requests scored (a seeded sample; None = all). n_candidates: list length per request
    (impressed items + corpus samples); uniform_frac: share of uniform (vs popularity-weighted) samples."""

    max_requests: int | None = 10000
    n_candidates: int = 200
    uniform_frac: float = 0.5
    requests_per_batch: int = 256

    def __post_init__(self) -> None:
        if self.n_candidates < 2 or not 0.0 <= self.uniform_frac <= 1.0:
            raise ValueError("ranklog.n_candidates must be >= 2 and ranklog.uniform_frac in [0, 1]")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("ranklog.max_requests must be >= 1")


def _prerank() -> StudentConfig:
    return StudentConfig(stage="prerank", loss_weights={"click_bce": 1.0, "pointwise": 1.0, "bpr": 1.0,
                                                        "lambda_ndcg": 1.0}, epochs=2)


def _retrieval() -> StudentConfig:
    return StudentConfig(stage="retrieval", loss_weights={"sampled_softmax": 1.0, "teacher_softmax": 1.0,
                                                          "pointwise": 1.0, "listnet": 1.0}, epochs=2)


def _scale_grid(values: tuple[float, ...], key: str) -> None:
    if not values or any(not (np.isfinite(v) and v >= 0) for v in values) or 0.0 not in values:
        raise ValueError(f"students.{key} must be values >= 0 that include 0 (the ground-truth-only student), "
                         f"got {list(values)}")


@dataclass(frozen=True)
class StudentsSection:
    """The students: two-tower pre-rank and retrieval students and the rank student, each learning from the clicks
    (its ground-truth terms) plus weighted distillation from the teacher.

    distill: the scale of the towers' distillation terms (cascade/train/students.py ``distill_scale``), or
    "auto": every scale of ``distill_grid`` is trained and the one whose tower keeps most validation clicks at
    its stage size (click-recall@N1 / @N2 over the corpus, on the validation judge) is served; scale 0 is the
    ground-truth-only student, saved as the ``ground_truth`` variant for comparison (compare_ground_truth).
    keep_fixed: also save the scale-1 students as the ``fixed`` variant (distillation at the configured
    weights, whatever validation says). rank_distill_scale / rank_distill_grid: the same for the rank student's
    distillation weights (rank_distill's KD, hint, CR, RCR or PFD lambda), chosen by validation AUC.
    confidence: distil each tower only from the rank-log requests whose teacher list ordered the request's
    impressed items at least as well as chance (per-request AUC >= 0.5; requests with one class kept).
    select_requests: validation requests of the judge."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    prerank: StudentConfig = field(default_factory=_prerank)
    retrieval: StudentConfig = field(default_factory=_retrieval)
    distill: float | Literal["auto"] = "auto"
    distill_grid: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0)
    compare_ground_truth: bool = True
    keep_fixed: bool = False
    confidence: bool = False
    select_requests: int = 500
    # The rank student is cheap to serve: a small MLP without the user x item cross features (no history lookups at
    # serving); distillation from the teacher, which has them, is how their knowledge reaches it.
    rank_student: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dnn", emb_dim=8, mlp=(64,),
                                                                            sides=("user", "item", "context")))
    rank_student_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=1, batch_size=4096))
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
        if self.rank_pfd_side not in SIDES:
            raise ValueError(f"rank_pfd_side {self.rank_pfd_side!r} is not one of {SIDES}")
        if self.rank_distill.pfd_lambda is not None and self.rank_pfd_side in self.rank_student.sides:
            raise ValueError(f"rank_pfd_side {self.rank_pfd_side!r} is read by the rank student itself "
                             f"(rank_student.sides {self.rank_student.sides}), so it is not privileged")
        _scale_grid(self.distill_grid, "distill_grid")
        _scale_grid(self.rank_distill_grid, "rank_distill_grid")
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
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"index.recall_target must be in (0, 1], got {self.recall_target}")


@dataclass(frozen=True)
class ReplaySection:
    n_retrieve: int = 500
    n_prerank: int = 100
    k: int = 10
    ranker: Literal["teacher", "student"] = "teacher"
    max_requests: int | None = 500
    latency_requests: int = 300
    batch_size: int = 256
    recall_ks: tuple[int, ...] = (1, 5, 10, 20, 50, 100, 200, 500)

    def __post_init__(self) -> None:
        if not (0 < self.k <= self.n_prerank <= self.n_retrieve):
            raise ValueError(f"replay: need 0 < k <= n_prerank <= n_retrieve, got k={self.k}, "
                             f"n_prerank={self.n_prerank}, n_retrieve={self.n_retrieve}")
        if self.batch_size < 1 or self.latency_requests < 1:
            raise ValueError("replay.batch_size and replay.latency_requests must be >= 1")


@dataclass(frozen=True)
class ReportSection:
    """ablation: an ablation JSON written by `cascade ablation` / benchmarks/ablation.py, shown in the report's
    distillation-ablation section (it comes from its own multi-seed runs, as its table says)."""

    ablation: str | None = None

    def __post_init__(self) -> None:
        if self.ablation is not None and not Path(self.ablation).is_file():
            raise ValueError(f"report.ablation {self.ablation!r} does not exist")


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


def check_settable(data: Mapping[str, Any]) -> None:
    """Raise ConfigError when the (partial) pipeline config ``data`` sets a key of :data:`SET_BY_THE_PIPELINE`."""
    for key, what in SET_BY_THE_PIPELINE.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, Mapping) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{key} cannot be set in a pipeline config: {what} sets it")


_ABSENT = object()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and check a pipeline config (TOML) with ``key.path=value`` overrides; raises ConfigError early."""
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    check_settable(data)
    if path is not None and isinstance(data.get("data"), dict) and data["data"].get("path"):
        p = Path(data["data"]["path"]).expanduser()
        data["data"]["path"] = str(p)
    return from_dict(PipelineConfig, data)
