"""The offline pipeline: data -> teacher -> ranklog -> students -> index -> replay -> report.

Each stage is a function of a :class:`cascade.stages.StageContext` that writes into its own folder
``runs/<run>/<stage>/`` and returns its outputs and headline metrics; :func:`cascade.stages.run_stages` skips a
stage whose config slice and inputs are unchanged. The config is one typed, strict :class:`PipelineConfig`
whose sections nest the dataclasses of the modules that do the work (WorldConfig, RankerConfig, TrainConfig,
DistillConfig, TowerConfig, StudentConfig), so every default lives in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from . import artifacts as A
from .config import apply_overrides, from_dict, load_toml, to_dict
from .data.world import WorldConfig
from .models.ranker import RankerConfig
from .models.two_tower import TowerConfig
from .stages import Stage, StageContext, StageResult, run_stages
from .train.joint import DistillConfig
from .train.loop import TrainConfig
from .train.students import StudentConfig

log = logging.getLogger(__name__)

SOURCES = ("world", "kuairand", "movielens-100k", "movielens-1m", "custom")


@dataclass(frozen=True)
class RunSection:
    """name: the run folder under runs_dir. seed: the one seed every stage derives its randomness from.
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

    def __post_init__(self) -> None:
        if self.source != "world" and not self.path:
            raise ValueError(f"data.path is required for data.source = {self.source!r}")
        if self.path and not Path(self.path).exists():
            raise ValueError(f"data.path {self.path!r} does not exist")
        if self.valid_days < 1 or self.test_days < 1:
            raise ValueError("data.valid_days and data.test_days must be >= 1")
        if self.cross_window_days <= 0:
            raise ValueError(f"data.cross_window_days must be > 0, got {self.cross_window_days}")


@dataclass(frozen=True)
class TeacherSection:
    model: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dcnv2", emb_dim=8, mlp=(128, 64),
                                                                     cross_layers=2, cross_rank=32))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=2, batch_size=4096))
    lightgbm: bool = True
    lightgbm_trees: int = 200
    lightgbm_max_rows: int | None = 300_000  # the most recent train rows (GBDT cost grows with rows x features)


@dataclass(frozen=True)
class RankLogSection:
    """max_requests: train requests scored (a seeded sample; None = all). n_candidates: list length per request
    (impressed items + corpus samples); uniform_frac: share of uniform (vs popularity-weighted) samples."""

    max_requests: int | None = 20000
    n_candidates: int = 200
    uniform_frac: float = 0.5
    requests_per_batch: int = 256

    def __post_init__(self) -> None:
        if self.n_candidates < 2 or not 0.0 <= self.uniform_frac <= 1.0:
            raise ValueError("ranklog.n_candidates must be >= 2 and ranklog.uniform_frac in [0, 1]")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("ranklog.max_requests must be >= 1")


def _distilled_prerank() -> StudentConfig:
    return StudentConfig(stage="prerank", loss_weights={"pointwise": 1.0, "bpr": 1.0, "lambda_ndcg": 1.0, "click_bce": 0.5},
                         epochs=3)


def _gt_prerank() -> StudentConfig:
    return StudentConfig(stage="prerank", loss_weights={"click_bce": 1.0}, epochs=3)


def _distilled_retrieval() -> StudentConfig:
    return StudentConfig(stage="retrieval", loss_weights={"sampled_softmax": 1.0, "pointwise": 1.0, "listnet": 1.0},
                         softmax_positives="teacher_topk", epochs=3)


def _gt_retrieval() -> StudentConfig:
    return StudentConfig(stage="retrieval", loss_weights={"sampled_softmax": 1.0}, softmax_positives="clicks", epochs=3)


@dataclass(frozen=True)
class StudentsSection:
    """The distilled students and, for comparison, the same students trained on ground truth only."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    prerank: StudentConfig = field(default_factory=_distilled_prerank)
    retrieval: StudentConfig = field(default_factory=_distilled_retrieval)
    prerank_gt: StudentConfig = field(default_factory=_gt_prerank)
    retrieval_gt: StudentConfig = field(default_factory=_gt_retrieval)
    compare_ground_truth: bool = True
    rank_student: RankerConfig = field(default_factory=lambda: RankerConfig(backbone="dnn", emb_dim=8, mlp=(64,),
                                                                            sides=("user", "item", "context")))
    rank_student_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=2, batch_size=4096))
    rank_distill: DistillConfig = field(default_factory=lambda: DistillConfig(w_bce=1.0, w_kd=1.0))
    rank_student_max_rows: int | None = None  # train both rank students on the most recent rows only
    # PFD instead of two-stage distillation when rank_distill.pfd_lambda is set: a teacher that also reads this
    # side trains together with the student (sharing embeddings; the student keeps private tables for these
    # columns); the student alone is saved and served
    rank_pfd_side: str = "privileged"
    rank_pfd_private_columns: tuple[str, ...] = ("user_id",)

    def __post_init__(self) -> None:
        from .data.schema import SIDES

        if self.rank_pfd_side not in SIDES:
            raise ValueError(f"rank_pfd_side {self.rank_pfd_side!r} is not one of {SIDES}")
        if self.rank_distill.pfd_lambda is not None and self.rank_pfd_side in self.rank_student.sides:
            raise ValueError(f"rank_pfd_side {self.rank_pfd_side!r} is read by the rank student itself "
                             f"(rank_student.sides {self.rank_student.sides}), so it is not privileged")


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
    max_requests: int | None = 1000
    latency_requests: int = 300
    batch_size: int = 256
    filter_seen: bool = False
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
    teacher: TeacherSection = field(default_factory=TeacherSection)
    ranklog: RankLogSection = field(default_factory=RankLogSection)
    students: StudentsSection = field(default_factory=StudentsSection)
    index: IndexSection = field(default_factory=IndexSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    report: ReportSection = field(default_factory=ReportSection)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and check a pipeline config (TOML) with ``key.path=value`` overrides; raises ConfigError early."""
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    if path is not None and isinstance(data.get("data"), dict) and data["data"].get("path"):
        p = Path(data["data"]["path"]).expanduser()
        data["data"]["path"] = str(p)
    return from_dict(PipelineConfig, data)


# ------------------------------------------------------------------------------------------------ helpers


def _seeded(seed: int) -> None:
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    """The stage's training config under the run's seed (one seed drives every stage)."""
    return dataclasses.replace(cfg, seed=seed)


def _save_ranker(model: torch.nn.Module, cfg: RankerConfig, out: Path) -> list[str]:
    A.save_torch(out / "model.pt", model.state_dict())
    A.write_json(out / "config.json", cfg.to_dict())
    return [str(Path(out.name) / "model.pt"), str(Path(out.name) / "config.json")]


def _model_row(name: str, role: str, model: torch.nn.Module | None, metrics: dict, spec=None) -> dict:
    from .models.ranker import n_parameters, serving_latency

    row = {"name": name, "role": role, **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    if model is not None:
        row["n_params"] = int(n_parameters(model))
        row["size_mb"] = float(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
        row["latency_ms_per_100"] = float(serving_latency(model, spec, n_candidates=100))
    return row


# ------------------------------------------------------------------------------------------------ stages


def _load_source(c: DataSection, out: Path, seed: int, progress: bool):
    from .data import custom, kuairand, movielens
    from .data.world import generate_world

    if c.source == "world":
        world_cfg = dataclasses.replace(c.world, seed=c.world.seed + seed)
        world = generate_world(out / "world", world_cfg, progress=progress)
        return kuairand.load_kuairand(out / "world"), world
    if c.source == "kuairand":
        return kuairand.load_kuairand(c.path), None
    if c.source == "movielens-100k":
        return movielens.load_movielens_100k(c.path), None
    if c.source == "movielens-1m":
        return movielens.load_movielens_1m(c.path), None
    return custom.load_custom(c.path), None


def kuairand_offset() -> float:
    from .data.kuairand import BEIJING_UTC_OFFSET_HOURS

    return float(BEIJING_UTC_OFFSET_HOURS)


def stage_data(ctx: StageContext) -> StageResult:
    from .data.features import CrossFeatureStore, FeatureEncoder, build_encoded
    from .data.split import time_split
    from .run_data import SPLIT_CODES

    c: DataSection = ctx.config
    ds, world = _load_source(c, ctx.out, ctx.seed, ctx.progress)
    # KuaiRand (and the world, which writes its layout) keep Beijing time: split on Beijing calendar days.
    utc_offset = kuairand_offset() if c.source in ("world", "kuairand") else 0.0
    masks = time_split(ds, valid_days=c.valid_days, test_days=c.test_days, utc_offset_hours=utc_offset)
    cross = CrossFeatureStore(window_days=c.cross_window_days, tag_column=c.cross_tag_column,
                              author_column=c.cross_author_column).fit(ds.impressions, ds.items)
    enc = FeatureEncoder(ds.schema, min_count=c.min_count, numeric=c.numeric).fit(ds, masks["train"], cross)
    enc.save(ctx.out / "encoder")
    tables = build_encoded(ds, masks, enc, cross, privileged=True)
    outputs = []
    for split, t in tables.items():
        A.write_npz(ctx.out / f"encoded_{split}.npz", **t.arrays())
        outputs.append(f"encoded_{split}.npz")
    spec = next(iter(tables.values())).spec
    A.write_json(ctx.out / "spec.json", spec.to_dict())
    A.write_json(ctx.out / "schema.json", ds.schema.to_dict())
    imp = ds.impressions.copy()
    split_col = np.full(len(imp), -1, np.int8)
    for name, m in masks.items():
        split_col[np.asarray(m)] = SPLIT_CODES[name]
    imp["split"] = split_col
    A.write_parquet(ctx.out / "users.parquet", ds.users)
    A.write_parquet(ctx.out / "items.parquet", ds.items)
    A.write_parquet(ctx.out / "impressions.parquet", imp)
    outputs += ["spec.json", "schema.json", "users.parquet", "items.parquet", "impressions.parquet"]
    outputs += [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "encoder").rglob("*")) if p.is_file()]
    if world is not None:
        outputs += [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "world").iterdir())
                    if p.is_file() and p.suffix in (".json", ".npz")]
    splits = {}
    for name, m in masks.items():
        sub = imp[np.asarray(m)]
        splits[name] = {"rows": int(len(sub)), "requests": int(sub.request_id.nunique()), "ctr": float(sub.click.mean()),
                        "start": pd.to_datetime(sub.time_ms.min(), unit="ms").isoformat(),
                        "end": pd.to_datetime(sub.time_ms.max(), unit="ms").isoformat()}
    summary = {"source": c.source, "n_users": int(len(ds.users)), "n_items": int(len(ds.items)),
               "n_impressions": int(len(imp)), "n_requests": int(imp.request_id.nunique()), "ctr": float(imp.click.mean()),
               "random_share": float(imp.is_rand.mean()), "n_cat_columns": len(spec.cat_names),
               "n_num_columns": len(spec.num_names),
               "sides": {s: len(spec.cat_index(s)) + len(spec.num_index(s)) for s in ("user", "item", "context", "cross", "privileged")}}
    A.write_json(ctx.out / "summary.json", {"summary": summary, "splits": splits})
    outputs.append("summary.json")
    metrics = {"summary": summary, "splits": splits}
    if world is not None:  # wall times go to the manifest only, so that summary.json is reproducible
        metrics["world_seconds"] = world.summary().get("seconds")
    return StageResult(outputs, metrics,
                       f"{len(imp):,} impressions, {len(ds.users):,} users, {len(ds.items):,} items")


def stage_teacher(ctx: StageContext) -> StageResult:
    from .models.gbdt import GBDTRanker
    from .models.ranker import Ranker
    from .run_data import RunData
    from .train.loop import evaluate, fit

    c: TeacherSection = ctx.config
    data = RunData(ctx.inputs["data"])
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    _seeded(ctx.seed)
    model = Ranker(train.spec, c.model)
    res = fit(model, train, valid, _with_seed(dataclasses.replace(c.train, progress=ctx.progress), ctx.seed))
    model.eval()
    outputs = _save_ranker(model, c.model, ctx.out / "teacher")
    rows = [_model_row(f"teacher ({c.model.backbone})", "teacher", model, evaluate(model, test), train.spec)]
    if c.lightgbm:
        gb_train = train if c.lightgbm_max_rows is None else train.take(slice(max(0, len(train) - c.lightgbm_max_rows), None))
        gb = GBDTRanker(objective="binary", n_estimators=c.lightgbm_trees, seed=ctx.seed, num_threads=2).fit(gb_train, valid)
        from .train.loop import score_metrics

        m = score_metrics(test.label, gb.predict(test.cat, test.num), test.user_id, test.is_rand)
        rows.append({"name": f"LightGBM (binary, {len(gb_train):,} most recent train rows)", "role": "baseline", **m})
        A.write_text(ctx.out / "lightgbm.txt", gb.booster_.model_to_string())
        outputs.append("lightgbm.txt")
    A.write_json(ctx.out / "models.json", rows)
    outputs.append("models.json")
    return StageResult(outputs, {"models": rows, "best_valid_auc": res.best_valid_auc},
                       f"teacher test AUC {rows[0].get('auc', float('nan')):.4f}")


def _popularity(data, item_ids: np.ndarray) -> np.ndarray:
    tr = data.split_impressions("train")
    counts = tr.groupby("item_id").size()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.float64) + 1.0


def _pad_by_row(rows: np.ndarray, values: np.ndarray, n_rows: int, fill: int = -1) -> np.ndarray:
    """Scatter values [N] into a padded int64 [n_rows, max count] by their row [N], keeping the given order within
    a row (one stable sort, no per-row Python)."""
    order = np.argsort(rows, kind="stable")
    rr = rows[order]
    counts = np.bincount(rr, minlength=n_rows)
    slot = np.arange(len(rr)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full((n_rows, max(int(counts.max()) if len(counts) else 0, 1)), fill, np.int64)
    out[rr, slot] = np.asarray(values, np.int64)[order]
    return out


def rank_log_inputs(data, cfg: RankLogSection, seed: int):
    """The sampled train requests (with ``user_row``), their candidate item rows [R, L] (impressed items first, then
    popularity-weighted and uniform corpus samples) and the item row -> id map. Deterministic in ``seed``, so every
    torchrun rank builds the same ones and scores its own shard of them."""
    from .distill.ranklog import sample_candidates
    from .data.requests import requests_frame

    tr = data.split_impressions("train")
    frame = requests_frame(tr, data.context_names)
    rng = np.random.default_rng(seed)
    if cfg.max_requests is not None and len(frame) > cfg.max_requests:
        frame = frame.iloc[np.sort(rng.choice(len(frame), cfg.max_requests, replace=False))].reset_index(drop=True)
    inputs = data.tower_inputs(frame)
    frame["user_row"] = inputs.user_rows(data.map_users(frame["user_id"].to_numpy()))
    # impressed items per request as item rows, padded with -1 (one sort, no per-row Python)
    imp = tr[tr.request_id.isin(frame.request_id)]
    imp = imp.sort_values("position", kind="stable")
    impressed = _pad_by_row(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                            inputs.item_rows(imp["item_id"].to_numpy(np.int64)), len(frame))
    n_real = len(data.item_ids)  # the OOV row (last) is never sampled
    pop = _popularity(data, inputs.item_ids[:n_real])
    cands = sample_candidates(impressed, n_real, cfg.n_candidates, pop_weights=pop, uniform_frac=cfg.uniform_frac, rng=rng)
    return frame, cands, inputs.item_ids


def stage_ranklog(ctx: StageContext) -> StageResult:
    from .distill.shard_runner import build_rank_log_distributed
    from .data.requests import to_requests
    from .models.scoring import ranker_scorer
    from .run_data import RunData, load_ranker

    c: RankLogSection = ctx.config
    data = RunData(ctx.inputs["data"])
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    frame, cands, item_ids = rank_log_inputs(data, c, ctx.seed)
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data)

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    t0 = time.perf_counter()
    # one process: a plain log; under torchrun: one shard per rank, merged by rank 0 into one log
    build_rank_log_distributed(frame, cands, scorer, ctx.out / "log", requests_per_batch=c.requests_per_batch,
                               progress=ctx.progress, item_ids=item_ids, seed=ctx.seed)
    wall = time.perf_counter() - t0
    A.write_parquet(ctx.out / "requests.parquet", frame)
    outputs = ["requests.parquet"] + [str(p.relative_to(ctx.out)) for p in sorted((ctx.out / "log").rglob("*")) if p.is_file()]
    pairs = int(np.sum(cands >= 0))
    metrics = {"n_requests": len(frame), "n_pairs": pairs, "pairs_per_s": pairs / max(wall, 1e-9)}
    return StageResult(outputs, metrics, f"{pairs:,} pairs at {metrics['pairs_per_s']:,.0f} pairs/s")


def click_lists(data, inputs, frame: pd.DataFrame):
    from .train.students import ClickLists

    tr = data.split_impressions("train")
    imp = tr[tr.request_id.isin(frame.request_id)]
    return ClickLists.from_long(inputs.request_rows(imp["request_id"].to_numpy(np.int64)),
                                inputs.user_rows(data.map_users(imp["user_id"].to_numpy())),
                                inputs.item_rows(imp["item_id"].to_numpy(np.int64)), imp["click"].to_numpy(np.float32))


def stage_students(ctx: StageContext) -> StageResult:
    from .distill.ranklog import RankLog
    from .models.ranker import Ranker
    from .models.two_tower import build_two_tower
    from .run_data import RunData, load_ranker
    from .train.joint import DistilledStudent, JointRanker, joint_loss, pfd_configs, two_stage_loss
    from .train.loop import evaluate, fit
    from .train.students import evaluate_on_log, train_student

    c: StudentsSection = ctx.config
    data = RunData(ctx.inputs["data"])
    frame = pd.read_parquet(ctx.inputs["ranklog"] / "requests.parquet")
    inputs = data.tower_inputs(frame)
    log_ = RankLog(ctx.inputs["ranklog"] / "log")
    clicks = click_lists(data, inputs, frame)
    outputs, metrics, rows = [], {}, []
    variants = {"distilled": (c.prerank, c.retrieval)}
    if c.compare_ground_truth:
        variants["ground_truth"] = (c.prerank_gt, c.retrieval_gt)
    for variant, (pre_cfg, ret_cfg) in variants.items():
        for stage, scfg in (("prerank", pre_cfg), ("retrieval", ret_cfg)):
            towers = build_two_tower(inputs, c.tower, seed=ctx.seed)
            scfg = dataclasses.replace(scfg, seed=ctx.seed, progress=ctx.progress)
            hist = train_student(towers, inputs, log_, clicks, scfg)
            d = ctx.out / variant / stage
            A.save_torch(d / "model.pt", towers.state_dict())
            A.write_json(d / "config.json", to_dict(c.tower))
            A.write_json(d / "history.json", hist)
            outputs += [f"{variant}/{stage}/{f}" for f in ("model.pt", "config.json", "history.json")]
            ev = evaluate_on_log(towers, inputs, log_, k=10)
            metrics[f"{variant}_{stage}"] = ev
            log.info("students: %s %s on the logged lists: %s", variant, stage, ev)
    # rank students: without distillation and distilled from the teacher (two-stage)
    train, valid, test = data.encoded("train"), data.encoded("valid"), data.encoded("test")
    if c.rank_student_max_rows is not None and len(train) > c.rank_student_max_rows:
        train = train.take(slice(len(train) - c.rank_student_max_rows, None))
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    tcfg = _with_seed(dataclasses.replace(c.rank_student_train, progress=ctx.progress), ctx.seed)
    _seeded(ctx.seed)
    plain = Ranker(train.spec, c.rank_student)
    fit(plain, train, valid, tcfg)
    rows.append(_model_row("rank student (no distillation)", "student", plain, evaluate(plain, test), train.spec))
    _seeded(ctx.seed)
    pfd_rows = []  # PFD's own teacher, reported after the student it taught
    if c.rank_distill.pfd_lambda is None:  # two-stage: from the frozen teacher of the teacher stage
        distilled = DistilledStudent(Ranker(train.spec, c.rank_student), teacher_hidden_dim=None, seed=ctx.seed)
        fit(distilled, train, valid, tcfg, loss_fn=two_stage_loss(teacher, c.rank_distill))
        served, name = distilled.student.eval(), "rank student (distilled)"
    else:  # PFD: its own privileged teacher, trained synchronously with the student
        side = c.rank_pfd_side
        if not (train.spec.cat_index(side) or train.spec.num_index(side)):
            raise ValueError(f"students.rank_distill.pfd_lambda is set (PFD), but the data have no column on the "
                             f"{side!r} side (students.rank_pfd_side); sides with columns: "
                             f"{sorted(set(train.spec.cat_sides + train.spec.num_sides))}")
        joint = JointRanker(train.spec, *pfd_configs(c.rank_student, "pfd", pfd_side=side),
                            private_student_columns=c.rank_pfd_private_columns, seed=ctx.seed)
        fit(joint, train, valid, tcfg, loss_fn=joint_loss(c.rank_distill))
        served = joint.export_student().eval()
        name = f"rank student (distilled, PFD on the {side} side)"
        pfd_rows.append(_model_row(f"its PFD teacher (also reads the {side} side; not served)", "pfd_teacher",
                                   joint.teacher, evaluate(joint.teacher, test), train.spec))
    rows += [_model_row(name, "student", served, evaluate(served, test), train.spec)] + pfd_rows
    outputs += _save_ranker(served, c.rank_student, ctx.out / "rank_student")
    A.write_json(ctx.out / "models.json", rows)
    outputs.append("models.json")
    metrics["models"] = rows
    return StageResult(outputs, metrics, "students trained: " + ", ".join(f"{k} {v['teacher_recall@10']:.3f}"
                                                                        for k, v in metrics.items() if k != "models"))


def stage_index(ctx: StageContext) -> StageResult:
    from .index.faiss_index import ItemIndex
    from .data.requests import requests_frame, to_requests
    from .run_data import RunData, load_towers

    c: IndexSection = ctx.config
    data = RunData(ctx.inputs["data"])
    outputs, metrics = [], {}
    valid = requests_frame(data.split_impressions("valid"), data.context_names)
    valid = valid.iloc[: c.sweep_queries]
    for variant_dir in sorted(p for p in (ctx.inputs["students"]).iterdir() if (p / "retrieval").is_dir()):
        towers = load_towers(variant_dir / "retrieval", data)
        n_real = len(data.item_ids)
        xb, ids = towers.item_emb[:n_real], towers.inputs.item_ids[:n_real]
        index = ItemIndex.build(xb, ids, metric="ip", factory=c.factory, seed=ctx.seed, omp_threads=c.omp_threads)
        xq = towers.user_embed(data, to_requests(valid, data.context_names))
        k = min(c.k, n_real)
        if not index.is_exact:
            index.sweep(xq, k)
            index.set_operating_point(c.recall_target)
        index.measure_recall(xq, k)
        model_hash = A.sha256_file(variant_dir / "retrieval" / "model.pt")
        index.save(ctx.out / variant_dir.name, model_hash=model_hash)
        metrics[variant_dir.name] = {"factory": index.factory, "backend": index.backend, "recall": index.recall_,
                                     "operating_points": index.operating_points_}
    outputs = sorted(str(p.relative_to(ctx.out)) for p in ctx.out.rglob("*") if p.is_file())
    return StageResult(outputs, metrics, ", ".join(f"{k}: {v['factory']} on {v['backend']}" for k, v in metrics.items()))


def stage_replay(ctx: StageContext) -> StageResult:
    from .eval.metrics import auc, gauc
    from .index.faiss_index import ItemIndex
    from .arrays import PAD
    from .data.requests import requests_frame, to_requests
    from .models.scoring import ranker_scorer
    from .run_data import SPLIT_CODES, RunData, load_ranker, load_towers
    from .serve.cascade import SeenFilter, build_cascade
    from .serve.replay import ReplayInputs, replay_latency, replay_quality, teacher_top_over_corpus

    c: ReplaySection = ctx.config
    data = RunData(ctx.inputs["data"])
    test = data.split_impressions("test")
    frame = requests_frame(test, data.context_names)
    if c.max_requests is not None and len(frame) > c.max_requests:
        # an even spread over the test period, kept in time order
        frame = frame.iloc[np.linspace(0, len(frame) - 1, c.max_requests).round().astype(int)].reset_index(drop=True)
    requests = to_requests(frame, data.context_names)
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    ranker = teacher if c.ranker == "teacher" else load_ranker(ctx.inputs["students"] / "rank_student", data.spec)
    ref_len = max(50, c.k)
    t_top, _ = teacher_top_over_corpus(teacher, data, requests, ref_len, progress=ctx.progress)
    grades = np.select([np.arange(ref_len) < 5, np.arange(ref_len) < 10, np.arange(ref_len) < 20, np.arange(ref_len) < 50],
                       [4.0, 3.0, 2.0, 1.0], 0.0)
    grades = np.broadcast_to(grades, t_top.shape).copy()
    # clicked items of each replayed request
    clicked_imp = test[(test.click == 1) & test.request_id.isin(frame.request_id)]
    row_of = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy())
    clicked = _pad_by_row(row_of.loc[clicked_imp.request_id.to_numpy()].to_numpy(),
                          clicked_imp.item_id.to_numpy(np.int64), len(frame), fill=PAD)
    oracle_prob = oracle_best = None
    world_dir = ctx.inputs["data"] / "world"
    if (world_dir / "world.json").exists():
        from .data.world import World

        world = World.load(world_dir)
        hour, tab = frame["hour"].to_numpy(), frame["tab"].to_numpy()

        def true_prob(req, items):
            b, k = items.shape
            ok = items != PAD
            p = np.zeros(items.shape)
            p[ok] = world.true_click_prob(np.repeat(req.user_id, k)[ok.ravel()], items[ok], np.repeat(hour, k)[ok.ravel()],
                                          np.repeat(tab, k)[ok.ravel()])
            return p

        oracle_prob = true_prob
        _, best_p = world.oracle_topk(frame["user_id"].to_numpy(), hour, tab, c.k)
        oracle_best = best_p.sum(axis=1)
    seen = None
    if c.filter_seen:
        hist = data.impressions[data.impressions.split != SPLIT_CODES["test"]]
        seen = SeenFilter(hist.user_id.to_numpy(), hist.item_id.to_numpy())
    outputs, variants = [], {}
    for variant_dir in sorted(p for p in ctx.inputs["students"].iterdir() if (p / "retrieval").is_dir()):
        v = variant_dir.name
        retr, pre = load_towers(variant_dir / "retrieval", data), load_towers(variant_dir / "prerank", data)
        index = ItemIndex.load(ctx.inputs["index"] / v, expect_model_hash=A.sha256_file(variant_dir / "retrieval" / "model.pt"),
                               expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
        casc = build_cascade(data, retr, pre, ranker, index, seen)
        inp = ReplayInputs(requests, clicked, t_top, grades, oracle_prob, oracle_best)
        rows, summary = replay_quality(casc, inp, c.n_retrieve, c.n_prerank, c.k, c.batch_size, c.filter_seen, ctx.progress)
        # recall@K curves: teacher top-k inside the first K of each stage's output
        curves = _recall_curves(casc, requests, t_top[:, :c.k], c)
        lat1 = replay_latency(casc, requests, c.n_retrieve, c.n_prerank, c.k, batch_size=1, max_requests=c.latency_requests)
        latb = replay_latency(casc, requests, c.n_retrieve, c.n_prerank, c.k, batch_size=c.batch_size)
        # AUC / GAUC of each stage's scoring function on the test impressions
        req_t = _impression_requests(test, data.context_names)
        cand = test["item_id"].to_numpy(np.int64)[:, None]
        stage_scores = {"retrieval": retr.scorer(data)(req_t, cand)[:, 0], "prerank": pre.scorer(data)(req_t, cand)[:, 0],
                        "rank": ranker_scorer(ranker, data)(req_t, cand)[:, 0]}
        y, g, rnd = test["click"].to_numpy(), test["user_id"].to_numpy(), test["is_rand"].to_numpy() == 1
        stage_auc = {}
        for st, s in stage_scores.items():
            stage_auc[st] = {"auc": auc(y, s), "gauc": gauc(y, s, g)}
            if rnd.any() and len(np.unique(y[rnd])) == 2:
                stage_auc[st]["rand_auc"] = auc(y[rnd], s[rnd])
        A.write_parquet(ctx.out / f"{v}_requests.parquet", rows)
        outputs.append(f"{v}_requests.parquet")
        variants[v] = {"quality": summary, "curves": curves, "latency_batch1": lat1, "latency_batched": latb,
                       "stage_auc": stage_auc, "sizes": {"retrieval": c.n_retrieve, "prerank": c.n_prerank, "rank": c.k},
                       "latency_samples_ms": lat1.pop("samples_ms", None)}
    A.write_json(ctx.out / "summary.json", variants)
    outputs.append("summary.json")
    head = {v: round(s["quality"]["rank_teacher_recall"], 4) for v, s in variants.items()}
    return StageResult(outputs, {v: s["quality"] for v, s in variants.items()}, f"final teacher-recall@{c.k}: {head}")


def _impression_requests(imp: pd.DataFrame, context_names: list[str]):
    from .data.requests import Requests
    from .data.split import request_start_ms

    return Requests(imp["user_id"].to_numpy(np.int64), request_start_ms(imp),
                    {c: imp[c].to_numpy() for c in context_names}, imp["request_id"].to_numpy(np.int64))


def _recall_curves(casc, requests, ref: np.ndarray, c: ReplaySection) -> dict:
    from .eval.metrics import recall_at_k

    sub = requests.take(np.arange(min(len(requests), 200)))
    res = casc.recommend(sub, c.n_retrieve, c.n_prerank, c.k, return_stages=True)
    out = {}
    for st, (items, _) in res.stages.items():
        ks = [k for k in c.recall_ks if k <= items.shape[1]]
        out[st] = {"k": ks, "teacher_recall": [float(np.nanmean(recall_at_k(ref[: len(sub)], items[:, :k]))) for k in ks]}
    return out


def stage_report(ctx: StageContext) -> StageResult:
    from .eval.report import write_report

    run_dir = ctx.inputs["data"].parent
    data = build_report_data(run_dir, ctx.config)
    files = write_report(data, ctx.out)
    return StageResult(list(files), {}, "report.html, report.md, report.json written")


def build_report_data(run_dir: Path, report_cfg: ReportSection | None = None) -> dict:
    """Assemble the report's input from a run folder's stage manifests and artifacts."""
    run_dir = Path(run_dir)
    m = {s: A.read_manifest(run_dir / s, verify=False) for s in ("data", "teacher", "ranklog", "students", "index", "replay")
         if (run_dir / s / A.MANIFEST).exists()}
    out: dict[str, Any] = {"run": {"name": run_dir.name, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "machine": f"{platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} CPUs, "
                                              f"torch {torch.__version__}, cuda {'yes' if torch.cuda.is_available() else 'no'}",
                                   "config": {s: mm["config"] for s, mm in m.items()},
                                   "versions": next(iter(m.values()))["versions"] if m else {},
                                   "stage_wall_s": {s: mm.get("wall_s") for s, mm in m.items()}}}
    if "data" in m:
        out["data"] = A.read_json(run_dir / "data" / "summary.json")
    models = []
    for s in ("teacher", "students"):
        p = run_dir / s / "models.json"
        if p.exists():
            models += A.read_json(p)
    out["models"] = models
    if "index" in m:
        first = next(iter(m["index"]["metrics"].values()), None)
        if first:
            im = A.read_json(next((run_dir / "index").glob("*/manifest.json")))
            out["index"] = {"factory": first["factory"], "backend": first["backend"], "metric": im.get("metric", "ip"),
                            "n_items": im.get("n_items"), "dim": im.get("embedding_dim"),
                            "recall_vs_exact": (first.get("recall") or {}).get("recall_at_k"),
                            "operating_points": first.get("operating_points", [])}
    if "replay" in m:
        summ = A.read_json(run_dir / "replay" / "summary.json")
        casc = {}
        for v, s in summ.items():
            q = s["quality"]
            stages = {}
            for st in ("retrieval", "prerank", "rank"):
                lat = s["latency_batch1"][f"{st}_ms"]
                stages[st] = {"size": s["sizes"][st], "teacher_recall": q[f"{st}_teacher_recall"],
                              "click_recall": q[f"{st}_click_recall"], "ndcg": q[f"{st}_ndcg"],
                              "auc": s["stage_auc"][st]["auc"], "gauc": s["stage_auc"][st]["gauc"],
                              "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"]}
            e2e = s["latency_batch1"]["end_to_end_ms"]
            casc[v] = {"stages": stages,
                       "end_to_end": {**{k: e2e[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                                      "requests_per_s_batch1": s["latency_batch1"]["requests_per_s"],
                                      "requests_per_s_batched": s["latency_batched"]["requests_per_s"],
                                      "batch_size": s["latency_batched"]["batch_size"]},
                       "oracle": ({k: q[k] for k in ("oracle_clicks", "oracle_best", "oracle_ratio")} if "oracle_ratio" in q else None),
                       "recall_curves": s["curves"], "latency_samples_ms": s.get("latency_samples_ms")}
        out["cascades"] = casc
    if report_cfg is not None and report_cfg.ablation:
        out["ablation"] = A.read_json(report_cfg.ablation)
    return out


STAGES = [
    Stage("data", (), lambda c: c.data, stage_data),
    Stage("teacher", ("data",), lambda c: c.teacher, stage_teacher),
    Stage("ranklog", ("data", "teacher"), lambda c: c.ranklog, stage_ranklog),
    Stage("students", ("data", "teacher", "ranklog"), lambda c: c.students, stage_students),
    Stage("index", ("data", "students"), lambda c: c.index, stage_index),
    Stage("replay", ("data", "teacher", "students", "index"), lambda c: c.replay, stage_replay),
    Stage("report", ("data", "teacher", "ranklog", "students", "index", "replay"), lambda c: c.report, stage_report),
]


def code_hash() -> str:
    """sha256 over the package's source files: a stage written by different code is not reused."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                 progress: bool = True, on_stage=None, until: str | None = None,
                 reuse: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run (or resume) the pipeline of ``cfg`` under ``cfg.run.runs_dir / cfg.run.name``.

    until: stop after this stage (e.g. "ranklog" to get data, teacher and rank logs only)."""
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"until={until!r}: no such stage (stages: {names})")
    stages = STAGES if until is None else STAGES[: names.index(until) + 1]
    run_dir = A.safe_join(cfg.run.runs_dir, A.check_run_name(cfg.run.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    A.write_json(run_dir / "config.json", to_dict(cfg))
    threads = torch.get_num_threads()
    if cfg.run.threads:  # for the run only: the caller's process keeps its own setting
        torch.set_num_threads(cfg.run.threads)
    try:
        return run_stages(stages, cfg, run_dir, cfg.run.seed, force=force, only=only, progress=progress,
                          to_plain=to_dict, on_stage=on_stage, code_hash=code_hash(), reuse=reuse)
    finally:
        torch.set_num_threads(threads)
