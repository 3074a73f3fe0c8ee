"""The replay step: the test requests in time order through both cascades, quality and latency per stage."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import artifacts as A
from ..arrays import PAD, pad_by_row
from ..data.requests import impression_requests, requests_frame, to_requests
from ..data.world import World
from ..eval.metrics import auc, gauc, recall_at_k
from ..index.faiss_index import ItemIndex
from ..models.scoring import ranker_scorer
from ..run_data import SPLIT_CODES, RunData, load_ranker, load_towers
from ..serve.cascade import SeenFilter, build_cascade
from ..serve.replay import ReplayInputs, replay_latency, replay_quality, teacher_top_over_corpus
from .config import ReplaySection
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
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
    # the reference list: the teacher's top-50 (NDCG's graded relevance), the top-k (teacher-recall@k) and the
    # top-K of every K of the recall curves (teacher-recall@K for each K)
    ref_len = max([50, c.k] + curve_ks(c, len(data.item_ids)))
    t_top, _ = teacher_top_over_corpus(teacher, data, requests, ref_len, progress=ctx.progress)
    grades = np.select([np.arange(ref_len) < 5, np.arange(ref_len) < 10, np.arange(ref_len) < 20,
                        np.arange(ref_len) < 50],
                       [4.0, 3.0, 2.0, 1.0], 0.0)
    grades = np.broadcast_to(grades, t_top.shape).copy()
    # clicked items of each replayed request
    clicked_imp = test[(test.click == 1) & test.request_id.isin(frame.request_id)]
    row_of = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy())
    clicked = pad_by_row(row_of.loc[clicked_imp.request_id.to_numpy()].to_numpy(),
                         clicked_imp.item_id.to_numpy(np.int64), len(frame), fill=PAD)
    oracle_prob = oracle_best = None
    world_dir = ctx.inputs["data"] / "world"
    if (world_dir / "world.json").exists():
        world = World.load(world_dir)
        hour, tab = frame["hour"].to_numpy(), frame["tab"].to_numpy()

        def true_prob(req, items):
            b, k = items.shape
            ok = items != PAD
            p = np.zeros(items.shape)
            p[ok] = world.true_click_prob(np.repeat(req.user_id, k)[ok.ravel()], items[ok],
                                          np.repeat(hour, k)[ok.ravel()],
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
        index = ItemIndex.load(ctx.inputs["index"] / v,
                               expect_model_hash=A.sha256_file(variant_dir / "retrieval" / "model.pt"),
                               expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
        casc = build_cascade(data, retr, pre, ranker, index, seen)
        inp = ReplayInputs(requests, clicked, t_top, grades, oracle_prob, oracle_best)
        rows, summary = replay_quality(casc, inp, c.n_retrieve, c.n_prerank, c.k, c.batch_size, c.filter_seen,
                                       ctx.progress)
        curves = recall_curves(casc, requests, t_top, c)
        lat1 = replay_latency(casc, requests, c.n_retrieve, c.n_prerank, c.k, batch_size=1,
                              max_requests=c.latency_requests)
        latb = replay_latency(casc, requests, c.n_retrieve, c.n_prerank, c.k, batch_size=c.batch_size)
        # AUC / GAUC of each stage's scoring function on the test impressions
        req_t = impression_requests(test, data.context_names)
        cand = test["item_id"].to_numpy(np.int64)[:, None]
        stage_scores = {"retrieval": retr.scorer(data)(req_t, cand)[:, 0],
                        "prerank": pre.scorer(data)(req_t, cand)[:, 0],
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
                       "stage_auc": stage_auc,
                       "sizes": {"retrieval": c.n_retrieve, "prerank": c.n_prerank, "rank": c.k},
                       "latency_samples_ms": lat1.pop("samples_ms", None)}
    A.write_json(ctx.out / "summary.json", variants)
    outputs.append("summary.json")
    head = {v: round(s["quality"]["rank_teacher_recall"], 4) for v, s in variants.items()}
    return StepResult(outputs, {v: s["quality"] for v, s in variants.items()}, f"final teacher-recall@{c.k}: {head}")


def curve_ks(c: ReplaySection, n_items: int) -> list[int]:
    """The K of the teacher-recall@K curves: ``c.recall_ks`` up to the retrieval stage's length and the corpus."""
    return [k for k in c.recall_ks if k <= min(c.n_retrieve, n_items)]


def recall_curves(casc, requests, teacher_top: np.ndarray, c: ReplaySection) -> dict:
    """Teacher-recall@K of each stage for every K of :func:`curve_ks` up to the stage's length, over all replayed
    requests: |the teacher's top-K over the corpus ∩ the stage's first K| / K, mean over requests. teacher_top:
    int64 [B, L >= max K], best first. {stage: {"k": [K], "teacher_recall": [mean]}}; the rank stage at K = c.k
    is the quality summary's final teacher-recall."""
    ks = curve_ks(c, teacher_top.shape[1])
    if ks and teacher_top.shape[1] < max(ks):
        raise ValueError(f"recall_curves: the teacher's top {teacher_top.shape[1]} is shorter than K = {max(ks)}")
    per_request: dict[str, dict[int, list[np.ndarray]]] = {}
    for s in range(0, len(requests), c.batch_size):
        idx = np.arange(s, min(s + c.batch_size, len(requests)))
        res = casc.recommend(requests.take(idx), c.n_retrieve, c.n_prerank, c.k, return_stages=True,
                             filter_seen=c.filter_seen)
        for st, (items, _) in res.stages.items():
            for k in (k for k in ks if k <= items.shape[1]):
                per_request.setdefault(st, {}).setdefault(k, []).append(
                    recall_at_k(teacher_top[idx, :k], items[:, :k]))
    return {st: {"k": list(by_k), "teacher_recall": [float(np.nanmean(np.concatenate(v))) for v in by_k.values()]}
            for st, by_k in per_request.items()}
