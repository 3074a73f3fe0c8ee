"""The distillation ablation of the two-tower students (pre-rank and retrieval), over seeds.

For each seed the pipeline runs up to the rank log (data, teacher, rank log; cached by the runner), then
every variant of each student is trained on that seed's rank log and click labels and evaluated on the test
split:

- ``ground truth only``: pre-rank ``click_bce``; retrieval ``sampled_softmax`` with click positives (the
  ground-truth terms of the pipeline's ``students.prerank`` / ``students.retrieval``);
- ``+ <loss>`` for each distillation loss of :data:`cascade.train.students.LIST_LOSSES`: the ground-truth
  config plus that one loss on the teacher's logged lists (weight ``AblationSettings.distill_weight``);
- ``+ mix``: the pipeline's distilled config (``students.prerank`` / ``students.retrieval``).

The test set of a seed (built once, cached under ``runs/<run>/ablation/test``): a time-even sample of
``n_test_requests`` test requests whose candidate lists (impressed items first, then popularity / uniform corpus
samples: the pipeline's ranklog step without its channel items) the teacher scores into a test rank log, and, for
the first ``n_corpus_requests`` of them, the teacher's top-k over the whole corpus. Metrics per student:

- ``list_teacher_recall@k``: |teacher's top-k of the list ∩ student's top-``n_pick`` of the list| / k;
- ``corpus_teacher_recall@k``: |teacher's top-k over the corpus ∩ student's top-``n_pick`` over the corpus
  (exact inner product over every item embedding)| / k;
- ``ndcg@k``: NDCG of the student's top-k of each list against the teacher's rank-bucket grades;
- ``auc``: AUC of the student's score on every test impression (click labels);
- ``oracle_clicks@k`` (world only): expected clicks (sum of ``World.true_click_prob``) of the student's top-k
  over the corpus, mean over requests.

Aggregation over seeds: mean and sample standard deviation (``ddof=1``; NaN with one seed). The result is a
plain dict in the report's ``ablation`` schema (``metrics``, ``seeds``, ``rows``) plus per-seed raw values,
references (the teacher's own oracle clicks, the oracle's best), the relative-gain checks and the config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..arrays import topk_rows
from ..config import from_dict, to_dict
from ..data.requests import impression_requests, requests_frame, to_requests
from ..data.world import World
from ..distill.losses import graded_relevance
from ..distill.ranklog import RankLog, build_rank_log
from ..eval.metrics import auc, mean_recall_at_k, ndcg_at_k
from ..index.exact import exact_topk
from ..models.scoring import ranker_scorer
from ..models.two_tower import build_two_tower, item_embeddings
from ..run_data import RunData, Towers, load_ranker
from ..serve.replay import teacher_top_over_corpus
from ..train.students import is_ground_truth, student_list_scores, train_student
from .config import PipelineConfig, config_data, with_run_device
from .ranklog import candidate_lists
from .run import run_pipeline
from .students import click_lists

log = logging.getLogger(__name__)

GROUND_TRUTH = "ground truth only"
MIX = "+ mix"
DISTILL_LOSSES = ("pointwise", "bpr", "lambda_ndcg", "approx_ndcg", "listnet", "logit_mse")
#: variant name -> folder name of its cached students
VARIANT_SLUGS = {GROUND_TRUTH: "ground_truth", **{f"+ {n}": n for n in DISTILL_LOSSES}, MIX: "mix"}
VARIANTS = tuple(VARIANT_SLUGS)
STAGES = ("prerank", "retrieval")


@dataclass(frozen=True)
class AblationSettings:
    """The ablation's own knobs (the ``[ablation]`` table of its TOML).

    seeds: one pipeline run per seed. variants / stages: subsets of VARIANTS / STAGES, in that order.
    n_test_requests: test requests (an even spread over the test period) whose lists the teacher scores;
    n_corpus_requests: the first of those (again evenly spread) that get corpus-wide metrics (the teacher
    scores every item for each). n_candidates: list length (None = ranklog.n_candidates). k: teacher reference
    size and NDCG cut-off; n_pick: how many items the student picks. distill_weight: weight of the single
    distillation term of a ``+ <loss>`` variant (the ground-truth term keeps its weight). min_rel_gain: the
    relative teacher-recall gain over ground truth that the mix is checked against.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    stages: tuple[str, ...] = STAGES
    n_test_requests: int = 1000
    n_corpus_requests: int = 500
    n_candidates: int | None = None
    k: int = 10
    n_pick: int = 100
    distill_weight: float = 1.0
    min_rel_gain: float = 0.10

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"ablation.variants: unknown variant(s) {bad}; known: {list(VARIANTS)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"ablation.stages: unknown stage(s) {bad}; known: {list(STAGES)}")
        if GROUND_TRUTH not in self.variants:
            raise ValueError(f"ablation.variants must include {GROUND_TRUTH!r}: every check compares against it")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ablation.seeds must be distinct and non-empty, got {list(self.seeds)}")
        if not 1 <= self.n_corpus_requests <= self.n_test_requests:
            raise ValueError(f"ablation: need 1 <= n_corpus_requests <= n_test_requests, got "
                             f"{self.n_corpus_requests}, {self.n_test_requests}")
        if not 1 <= self.k <= self.n_pick:
            raise ValueError(f"ablation: need 1 <= k <= n_pick, got k={self.k}, n_pick={self.n_pick}")
        if self.n_candidates is not None and self.n_candidates < 2:
            raise ValueError(f"ablation.n_candidates must be >= 2, got {self.n_candidates}")
        if not self.distill_weight > 0:
            raise ValueError(f"ablation.distill_weight must be > 0, got {self.distill_weight}")

    def metric_names(self, with_oracle: bool) -> list[str]:
        k = self.k
        names = [f"list_teacher_recall@{k}", f"corpus_teacher_recall@{k}", f"ndcg@{k}", "auc"]
        return names + [f"oracle_clicks@{k}"] if with_oracle else names


def load_ablation_config(path: str | Path | None, overrides: list[str] | None = None):
    """(PipelineConfig, AblationSettings) from a pipeline TOML with an optional ``[ablation]`` table.

    Overrides ``a.b=v`` apply to both (``ablation.seeds=[0]``, ``data.source=...``); unknown keys raise
    ConfigError naming the key, as for :func:`cascade.pipeline.load_config`.
    """
    data = config_data(path, overrides, ablation=True)
    ab = data.pop("ablation", {})
    return with_run_device(from_dict(PipelineConfig, data)), from_dict(AblationSettings, ab, prefix="ablation")


def variant_config(students, stage: str, variant: str, distill_weight: float = 1.0):
    """The StudentConfig of one variant: students is the pipeline's StudentsSection; stage "prerank" or
    "retrieval". ``+ <loss>`` adds one distillation term to the ground-truth config."""
    mix = students.prerank if stage == "prerank" else students.retrieval
    gt = dataclasses.replace(mix, loss_weights={k: v for k, v in mix.loss_weights.items() if is_ground_truth(mix, k)})
    if variant == GROUND_TRUTH:
        return gt
    if variant == MIX:
        return mix
    loss = VARIANT_SLUGS.get(variant)
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown ablation variant {variant!r}; known: {list(VARIANTS)}")
    return dataclasses.replace(gt, loss_weights={**gt.loss_weights, loss: float(distill_weight)})


# ------------------------------------------------------------------------------------------------ the test set


def even_spread(n: int, m: int) -> np.ndarray:
    """m indices spread evenly over range(n), in order (all of them when m >= n): int64 [min(n, m)]."""
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


@dataclass
class TestSet:
    """One seed's evaluation data.

    frame: the test requests (request_id, user_id, time_ms, context), rows = request rows of ``log``;
    inputs: TowerInputs with those requests' context rows; log: the teacher-scored test lists (RankLog, item rows
    of ``inputs``); corpus_rows int64 [Bc]: rows of frame that get corpus metrics; teacher_top int64 [Bc, k]:
    the teacher's top-k item ids over the corpus; teacher_logit float32 [Bc, k].
    """

    frame: pd.DataFrame
    inputs: Any
    log: Any
    corpus_rows: np.ndarray
    teacher_top: np.ndarray
    teacher_logit: np.ndarray


def build_test_set(run_dir: Path, data, teacher: torch.nn.Module, settings: AblationSettings, n_candidates: int,
                   uniform_frac: float, seed: int, progress: bool = False, history_length: int = 0) -> TestSet:
    """Build (or load from ``run_dir/ablation/test``) the seed's test set; see :class:`TestSet`. history_length:
    the recent clicks the towers' inputs hold (the students' ``tower.history_length``).

    The cache is keyed on the teacher's weights and the settings that shape the set; a mismatch rebuilds it.
    """
    out = run_dir / "ablation" / "test"
    key = {"teacher": A.sha256_file(run_dir / "teacher" / "teacher" / "model.pt"), "seed": seed,
           "n_test_requests": settings.n_test_requests, "n_corpus_requests": settings.n_corpus_requests,
           "n_candidates": n_candidates, "uniform_frac": uniform_frac, "k": settings.k}
    test_imp = data.split_impressions("test")
    if len(test_imp) == 0:
        raise ValueError(f"{run_dir / 'data'}: the test split is empty; nothing to evaluate the ablation on")
    cached = (out / "key.json").exists() and A.read_json(out / "key.json") == key
    if cached:
        frame = pd.read_parquet(out / "requests.parquet")
        top = A.read_npz(out / "teacher_top.npz")
        inputs = data.tower_inputs(frame, history_length)
        return TestSet(frame, inputs, RankLog(out / "log"), top["corpus_rows"], top["item_ids"], top["logits"])
    if out.exists():
        shutil.rmtree(out)
    frame = requests_frame(test_imp, data.context_names)
    frame = frame.iloc[even_spread(len(frame), settings.n_test_requests)].reset_index(drop=True)
    inputs = data.tower_inputs(frame, history_length)
    frame["user_row"] = inputs.user_rows(data.map_users(frame["user_id"].to_numpy()))
    rng = np.random.default_rng([seed, 7])  # its own stream: independent of the training rank log's
    cands = candidate_lists(data, frame, test_imp, inputs, n_candidates, uniform_frac, rng)
    requests = to_requests(frame, data.context_names)
    score = ranker_scorer(teacher, data)
    item_ids = inputs.item_ids

    def scorer(request_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return score(requests.take(request_rows), item_ids[candidates])

    build_rank_log(frame, cands, scorer, out / "log", progress=progress, item_ids=item_ids, seed=seed)
    corpus_rows = even_spread(len(frame), settings.n_corpus_requests)
    t_top, t_logit = teacher_top_over_corpus(teacher, data, requests.take(corpus_rows), settings.k, progress=progress,
                                             workers=torch.get_num_threads())
    A.write_parquet(out / "requests.parquet", frame)
    A.write_npz(out / "teacher_top.npz", corpus_rows=corpus_rows, item_ids=t_top, logits=t_logit)
    A.write_json(out / "key.json", key)
    return TestSet(frame, inputs, RankLog(out / "log"), corpus_rows, t_top, t_logit)


# ------------------------------------------------------------------------------------------------ metrics


def list_metrics(student_scores: np.ndarray, items: np.ndarray, ranks: np.ndarray, k: int, n_pick: int) -> dict[str,
                                                                                                                float]:
    """Teacher-recall@k of the student's top-n_pick and NDCG@k of its top-k, within logged lists.

    student_scores float [R, L] (any value at padding), items int [R, L] (-1 = padding), ranks int [R, L]
    (the teacher's rank in the list, 1 = best, 0 = padding). Requests with fewer than k candidates are left out.
    """
    valid = items >= 0
    keep = valid.sum(1) >= k
    if not keep.any():
        raise ValueError(f"list_metrics: no list has >= {k} candidates")
    items, ranks, valid = items[keep], ranks[keep], valid[keep]
    picked, _ = topk_rows(np.asarray(student_scores, np.float64)[keep], items, n_pick)  # padding never wins
    t_order = np.argsort(np.where(valid, ranks, np.iinfo(np.int64).max), axis=1, kind="stable")[:, :k]
    reference = np.take_along_axis(items, t_order, 1)
    rel = graded_relevance(teacher_rank=torch.from_numpy(ranks.astype(np.int64)), mask=torch.from_numpy(valid)).numpy()
    return {f"list_teacher_recall@{k}": mean_recall_at_k(reference, picked),
            f"ndcg@{k}": float(np.nanmean(ndcg_at_k(picked[:, :k], items, rel, k)))}


def corpus_topk(user_emb: np.ndarray, item_emb: np.ndarray, item_ids: np.ndarray, n: int) -> np.ndarray:
    """Exact inner-product top-n over the corpus: user_emb [B, d], item_emb [I, d], item_ids [I] -> ids [B, n]
    in descending score order (:func:`cascade.index.exact.exact_topk`, blocks bound the memory)."""
    if len(item_ids) != len(item_emb):
        raise ValueError(f"corpus_topk: item_emb {item_emb.shape} and item_ids {item_ids.shape} disagree")
    _, rows = exact_topk(user_emb, item_emb, min(n, len(item_ids)), metric="ip")
    return item_ids[rows]


def evaluate_student(towers, data, test: TestSet, test_imp: pd.DataFrame, settings: AblationSettings,
                     world=None) -> dict[str, float]:
    """Every ablation metric of one trained student (a :class:`cascade.run_data.Towers`)."""
    k = settings.k
    lst = test.log
    scores = student_list_scores(towers.model, test.inputs, lst)
    out = list_metrics(scores, lst.items, lst.ranks, k, settings.n_pick)
    # corpus: exact inner product over every real item (the OOV row is last and left out)
    n_real = len(data.item_ids)
    sub = test.frame.iloc[test.corpus_rows]
    req = to_requests(sub, data.context_names)
    picked = corpus_topk(towers.user_embed(data, req), towers.item_emb[:n_real], towers.inputs.item_ids[:n_real],
                         settings.n_pick)
    out[f"corpus_teacher_recall@{k}"] = mean_recall_at_k(test.teacher_top, picked)
    # AUC of the student's score on every test impression; the towers read user and context features only
    req_t = impression_requests(test_imp, data.context_names)
    s = towers.scorer(data)(req_t, test_imp["item_id"].to_numpy(np.int64)[:, None])[:, 0]
    out["auc"] = auc(test_imp["click"].to_numpy(), s)
    if world is not None:
        out[f"oracle_clicks@{k}"] = float(oracle_clicks(world, sub, picked[:, :k]).mean())
    return out


def oracle_clicks(world, frame: pd.DataFrame, items: np.ndarray) -> np.ndarray:
    """Expected clicks of each request's list under the world's true click model: float64 [B].

    frame: B requests with user_id, hour, tab; items: int [B, k] item ids (no padding)."""
    b, k = items.shape
    p = world.true_click_prob(np.repeat(frame["user_id"].to_numpy(), k), items.reshape(-1),
                              np.repeat(frame["hour"].to_numpy(), k), np.repeat(frame["tab"].to_numpy(), k))
    return p.reshape(b, k).sum(1)


# ------------------------------------------------------------------------------------------------ one seed


def _student_path(run_dir: Path, variant: str, stage: str) -> Path:
    return run_dir / "ablation" / "students" / VARIANT_SLUGS[variant] / stage


def train_or_load_student(run_dir: Path, data, inputs, rank_log, clicks, tower_cfg, scfg, seed: int, key: dict):
    """A trained Towers for (variant, stage): loaded from its folder when its key (configs + rank log) matches,
    else trained with :func:`cascade.train.students.train_student` and saved there."""
    d = Path(key["dir"])
    towers = build_two_tower(inputs, tower_cfg, seed=seed)
    meta = {k: v for k, v in key.items() if k != "dir"}
    if (d / "key.json").exists() and A.read_json(d / "key.json") == meta and (d / "model.pt").exists():
        towers.load_state_dict(A.load_torch(d / "model.pt"))
        history = A.read_json(d / "history.json")
    else:
        history = train_student(towers, inputs, rank_log, clicks, scfg)
        A.save_torch(d / "model.pt", towers.state_dict())
        A.write_json(d / "history.json", history)
        A.write_json(d / "key.json", meta)
    towers.eval()
    return Towers(towers, inputs, item_embeddings(towers.item_tower, inputs.item_cat, inputs.item_num)), history


def run_seed(cfg, settings: AblationSettings, seed: int, progress: bool = False) -> dict[str, Any]:
    """Run the pipeline to the rank log for ``cfg`` (its run.name / run.seed already set for this seed), build
    the test set and train + evaluate every (stage, variant). Returns {"values": {stage: {variant: {metric:
    value}}}, "reference": {...}, "wall_s": {...}}."""
    t0 = time.perf_counter()
    run_pipeline(cfg, until="ranklog", progress=progress, update=True)  # its own runs: a cache of the seed's steps
    t_pipe = time.perf_counter() - t0
    run_dir = A.safe_join(cfg.run.runs_dir, cfg.run.name)
    data = RunData(run_dir / "data")
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    world = None
    if (run_dir / "data" / "world" / "world.json").exists():
        world = World.load(run_dir / "data" / "world")
    n_cand = settings.n_candidates or cfg.ranklog.n_candidates
    t1 = time.perf_counter()
    test = build_test_set(run_dir, data, teacher, settings, n_cand, cfg.ranklog.uniform_frac, seed, progress,
                          cfg.students.tower.history_length)
    t_test = time.perf_counter() - t1
    test_imp = data.split_impressions("test")

    frame = pd.read_parquet(run_dir / "ranklog" / "requests.parquet")
    inputs = data.tower_inputs(frame, cfg.students.tower.history_length)
    rank_log = RankLog(run_dir / "ranklog" / "log")
    clicks = click_lists(data, inputs, frame)
    log_hash = A.sha256_file(run_dir / "ranklog" / "manifest.json")

    values: dict[str, dict[str, dict[str, float]]] = {}
    train_s: dict[str, float] = {}
    for stage in settings.stages:
        values[stage] = {}
        for variant in settings.variants:
            scfg = dataclasses.replace(variant_config(cfg.students, stage, variant, settings.distill_weight),
                                       seed=seed, progress=progress)
            key = {"dir": str(_student_path(run_dir, variant, stage)), "student": to_dict(scfg),
                   "tower": to_dict(cfg.students.tower), "rank_log": log_hash, "seed": seed}
            ts = time.perf_counter()
            towers, _ = train_or_load_student(run_dir, data, inputs, rank_log, clicks, cfg.students.tower, scfg, seed,
                                              key)
            train_s[f"{stage}/{variant}"] = time.perf_counter() - ts
            values[stage][variant] = evaluate_student(towers, data, test, test_imp, settings, world)
            log.info("ablation seed %d %s %s: %s", seed, stage, variant, values[stage][variant])
    reference: dict[str, float] = {"n_test_requests": int(len(test.frame)),
                                   "n_corpus_requests": int(len(test.corpus_rows)),
                                   "n_test_impressions": int(len(test_imp)), "n_candidates": int(test.log.width),
                                   "n_items": int(len(data.item_ids))}
    if world is not None:
        sub = test.frame.iloc[test.corpus_rows]
        reference[f"teacher_oracle_clicks@{settings.k}"] = float(oracle_clicks(world, sub, test.teacher_top).mean())
        _, best = world.oracle_topk(sub["user_id"].to_numpy(), sub["hour"].to_numpy(), sub["tab"].to_numpy(),
                                    settings.k)
        reference[f"oracle_best_clicks@{settings.k}"] = float(best.sum(1).mean())
    return {"values": values, "reference": reference,
            "wall_s": {"pipeline": t_pipe, "test_set": t_test, "students": train_s, "total": time.perf_counter() - t0}}


# ------------------------------------------------------------------------------------------------ aggregation


def mean_std(values) -> dict[str, Any]:
    """{"mean", "std" (sample std, ddof=1; NaN for one value), "n"} of the finite values of ``values``."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}


def summarize(per_seed: Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]], metrics: list[str],
              stages: tuple[str, ...], variants: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of the report's ablation schema from per_seed[seed][stage][variant][metric] = value:
    [{"name", "stage", "values": {metric: {"mean", "std", "n"}}, "per_seed": {metric: [value per seed]}}]."""
    rows = []
    seeds = list(per_seed)
    for stage in stages:
        for variant in variants:
            raw = {m: [per_seed[s][stage][variant].get(m, math.nan) for s in seeds] for m in metrics}
            rows.append({"name": variant, "stage": stage, "values": {m: mean_std(raw[m]) for m in metrics},
                         "per_seed": raw})
    return rows


def check_gains(rows: list[dict[str, Any]], metrics: list[str], min_rel_gain: float) -> list[dict[str, Any]]:
    """For each stage, metric and distillation variant: does its mean beat ground truth only, and (the mix) by
    at least ``min_rel_gain`` relative? [{stage, variant, metric, ground_truth, value, rel_gain, beats,
    required_rel_gain, holds}]."""
    out = []
    by = {(r["stage"], r["name"]): r for r in rows}
    for (stage, name), r in by.items():
        if name == GROUND_TRUTH or (stage, GROUND_TRUTH) not in by:
            continue
        for m in metrics:
            gt = by[(stage, GROUND_TRUTH)]["values"][m]["mean"]
            v = r["values"][m]["mean"]
            rel = (v - gt) / abs(gt) if gt not in (0.0,) and math.isfinite(gt) and math.isfinite(v) else math.nan
            need = min_rel_gain if name == MIX else 0.0
            beats = bool(math.isfinite(rel) and v > gt)
            holds = bool(beats and rel >= need)
            out.append({"stage": stage, "variant": name, "metric": m, "ground_truth": gt, "value": v,
                        "rel_gain": rel, "beats": beats, "required_rel_gain": need, "holds": holds})
    return out


def run_ablation(cfg, settings: AblationSettings, dataset: str, progress: bool = False,
                 on_seed=None) -> dict[str, Any]:
    """The whole ablation: for each seed, a pipeline run named ``ablation-<dataset>-seed<seed>`` (under
    cfg.run.runs_dir) with run.seed = seed, then :func:`run_seed`. Returns the JSON-able result (see the module
    doc). on_seed(seed, seed_result) is called after each seed (e.g. to print progress)."""
    A.check_run_name(f"ablation-{dataset}-seed0")
    per_seed, refs, walls = {}, {}, {}
    with_oracle = cfg.data.source == "world"
    metrics = settings.metric_names(with_oracle)
    t0 = time.perf_counter()
    for seed in settings.seeds:
        scfg = dataclasses.replace(cfg,
                                   run=dataclasses.replace(cfg.run, name=f"ablation-{dataset}-seed{seed}", seed=seed))
        res = run_seed(scfg, settings, seed, progress)
        per_seed[seed], refs[seed], walls[seed] = res["values"], res["reference"], res["wall_s"]
        if on_seed is not None:
            on_seed(seed, res)
    rows = summarize(per_seed, metrics, settings.stages, settings.variants)
    recall = [m for m in metrics if "teacher_recall" in m]
    return {
        "dataset": dataset, "metrics": metrics, "seeds": list(settings.seeds), "rows": rows,
        "std": "sample standard deviation over seeds (ddof=1)",
        "checks": check_gains(rows, recall, settings.min_rel_gain),
        "reference": {str(s): r for s, r in refs.items()},
        "wall_s": {"total": time.perf_counter() - t0, "per_seed": {str(s): w for s, w in walls.items()}},
        "config": {"pipeline": to_dict(cfg), "ablation": to_dict(settings)},
        "versions": A.package_versions(),
    }


# ------------------------------------------------------------------------------------------------ output


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def ablation_markdown(result: Mapping[str, Any]) -> str:
    """The result as Markdown: one table per stage (mean ± std per metric) and the checks."""
    metrics, seeds = result["metrics"], result["seeds"]
    lines = [f"# Distillation ablation: {result['dataset']}", "",
             f"Mean ± std ({result.get('std', 'std')}) over seeds {seeds}. "
             f"Metrics: {', '.join(metrics)}.", ""]
    for stage in dict.fromkeys(r["stage"] for r in result["rows"]):
        lines += [f"## {stage}", "", "| variant | " + " | ".join(metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for r in (r for r in result["rows"] if r["stage"] == stage):
            cells = []
            for m in metrics:
                v = r["values"][m]
                n_note = "" if v["n"] == len(seeds) else f" (n={v['n']})"
                cells.append(f"{_fmt(v['mean'])} ± {_fmt(v['std'])}{n_note}")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("checks"):
        lines += ["## Checks (teacher-recall means vs ground truth only)", "",
                  "| stage | variant | metric | ground truth | variant | relative gain | required | holds |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in result["checks"]:
            req = "> 0" if c["required_rel_gain"] == 0 else f">= {c['required_rel_gain']:+.0%}"
            gain = "–" if not math.isfinite(c["rel_gain"]) else f"{c['rel_gain']:+.1%}"
            lines.append(f"| {c['stage']} | {c['variant']} | {c['metric']} | {_fmt(c['ground_truth'])} | "
                         f"{_fmt(c['value'])} | {gain} | {req} | {'yes' if c['holds'] else '**no**'} |")
        failed = [c for c in result["checks"] if not c["holds"]]
        lines += ["", f"{len(result['checks']) - len(failed)} of {len(result['checks'])} checks hold."
                  + ("" if not failed else " Failing: " + "; ".join(f"{c['stage']} {c['variant']} {c['metric']}"
                                                                    for c in failed) + "."), ""]
    ref = result.get("reference") or {}
    if ref:
        keys = list(dict.fromkeys(k for r in ref.values() for k in r))
        lines += ["## Per-seed reference", "", "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for s, r in ref.items():
            lines.append(f"| {s} | " + " | ".join(_fmt(r[k], 3) if isinstance(r.get(k), float) else str(r.get(k, "–"))
                                                  for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def write_ablation(result: Mapping[str, Any], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (strict JSON: NaN -> null) and ``<stem>.md`` under out_dir; returns both paths."""
    out_dir = Path(out_dir)
    j = A.write_json(out_dir / f"{stem}.json", result)
    m = A.write_text(out_dir / f"{stem}.md", ablation_markdown(result))
    return j, m
