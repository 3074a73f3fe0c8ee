"""The replay step: the test requests in time order through both cascades, outcomes and latency per stage.

Next to the cascades it measures, on the same requests and at the same stage sizes, the teacher's own top list over
the whole corpus (the cascade's ceiling), the classic channels' own lists, the classic prior most-popular + EASE
the teacher's collaborative term chose (:class:`~cascade.channels.PopularEase`, where it searched one), and with
``replay.channels`` each of those channels alone as the retrieval stage of the same cascade (what the
multi-channel cascade adds over it). Seen items are filtered when the data step decided so (``data.filter_seen``;
"auto": :func:`~cascade.pipeline.judge.decide_filter_seen`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..arrays import PAD, pad_by_row
from ..channels import MergedRetriever, PopularEase, load_channels, why_left_out
from ..data.requests import impression_requests, requests_frame, to_requests
from ..data.world import World
from ..eval.metrics import auc, gauc, paired_difference, paired_ratio_difference, recall_at_k
from ..index.faiss_index import ItemIndex
from ..models.scoring import autocast_record, ranker_scorer
from ..run_data import RunData, load_ranker, load_towers
from ..serve.cascade import (
    CHANNELS_VARIANT,
    build_cascade,
    cascade_from,
    channel_settings,
    select_unseen,
    select_unseen_origin,
    union_channels,
)
from ..serve.replay import (
    ReplayInputs,
    list_quality,
    ranking_quality,
    replay_latency,
    replay_quality,
    teacher_top_over_corpus,
)
from .config import ReplaySection
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
    c: ReplaySection = ctx.config
    data = RunData(ctx.inputs["data"])
    seen, filter_reason = data.seen_filter
    filter_seen = seen is not None
    test = data.split_impressions("test")
    frame = requests_frame(test, data.context_names)
    frame, in_sample = replayed_requests(frame, test, c.max_requests, c.max_rand_requests)
    requests = to_requests(frame, data.context_names)
    sample_rows = np.flatnonzero(in_sample)
    teacher = load_ranker(ctx.inputs["teacher"] / "teacher", data.spec)
    ranker = teacher if c.ranker == "teacher" else load_ranker(ctx.inputs["students"] / "rank_student", data.spec)
    # the teacher's top list over the corpus: the grades below use the first 50, the ceiling row every stage size,
    # the teacher-recall@K curves the top-K of every K up to the retrieval stage's size
    ref_len = max(50, c.n_retrieve)
    t_top, _ = teacher_top_over_corpus(teacher, data, requests, ref_len, progress=ctx.progress, exclude_seen=seen,
                                      workers=torch.get_num_threads())
    grades = np.select([np.arange(ref_len) < 5, np.arange(ref_len) < 10, np.arange(ref_len) < 20,
                        np.arange(ref_len) < 50],
                       [4.0, 3.0, 2.0, 1.0], 0.0)
    grades = np.broadcast_to(grades, t_top.shape).copy()
    # clicked items of each replayed request
    clicked_imp = test[(test.click == 1) & test.request_id.isin(frame.request_id)]
    row_of = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy())
    clicked = pad_by_row(row_of.loc[clicked_imp.request_id.to_numpy()].to_numpy(),
                         clicked_imp.item_id.to_numpy(np.int64), len(frame), fill=PAD)
    is_rand = (test.groupby("request_id").is_rand.max().reindex(frame.request_id).to_numpy() == 1)
    oracle_prob = oracle_best = oracle_mass = None
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
        if is_rand.any():
            oracle_mass = np.full(len(frame), np.nan)
            oracle_mass[is_rand] = world.corpus_click_mass(frame["user_id"].to_numpy()[is_rand], hour[is_rand],
                                                           tab[is_rand])
    inp = ReplayInputs(requests, clicked, t_top, grades, is_rand if is_rand.any() else None, len(data.item_ids),
                       oracle_prob, oracle_best, in_sample, oracle_mass)
    sampled = requests.take(sample_rows)  # the logged traffic's even spread: curves and latency
    sizes = {"retrieval": c.n_retrieve, "prerank": c.n_prerank, "rank": c.k}
    outputs, variants, timings = [], {}, {}
    y, g, rnd = test["click"].to_numpy(), test["user_id"].to_numpy(), test["is_rand"].to_numpy() == 1
    req_t = impression_requests(test, data.context_names)
    cand = test["item_id"].to_numpy(np.int64)[:, None]
    rank_scores = ranker_scorer(ranker, data)(req_t, cand)[:, 0]

    def stage_auc(retrieval_scores: np.ndarray | None, prerank_scores: np.ndarray) -> dict:
        """AUC / GAUC (and on the random slice) of each stage's scoring function on the test impressions."""
        out = {}
        for st, sc in (("retrieval", retrieval_scores), ("prerank", prerank_scores), ("rank", rank_scores)):
            if sc is None:
                continue
            out[st] = {"auc": auc(y, sc), "gauc": gauc(y, sc, g)}
            if rnd.any() and len(np.unique(y[rnd])) == 2:
                out[st]["rand_auc"] = auc(y[rnd], sc[rnd])
        return out

    per_request = {}  # list name (as in the summary) -> its per-request rows, for the paired comparisons

    def write_rows(name: str, rows: pd.DataFrame, file_stem: str | None = None) -> None:
        per_request[name] = rows
        A.write_parquet(ctx.out / f"{file_stem or name}_requests.parquet", rows)
        outputs.append(f"{file_stem or name}_requests.parquet")

    def measure(name: str, casc, auc_of: dict) -> dict:
        rows, summary = replay_quality(casc, inp, c.n_retrieve, c.n_prerank, c.k, c.batch_size, filter_seen,
                                       ctx.progress)
        curves = recall_curves(casc, sampled, t_top[sample_rows], c, filter_seen)
        lat1 = replay_latency(casc, sampled, c.n_retrieve, c.n_prerank, c.k, batch_size=1,
                              max_requests=c.latency_requests)
        latb = replay_latency(casc, sampled, c.n_retrieve, c.n_prerank, c.k, batch_size=c.batch_size)
        write_rows(name, rows)
        # summary.json holds what the models and data determine; measured latencies go to the manifest's metrics
        timings[name] = {"latency_batch1": lat1, "latency_batched": latb,
                         "latency_samples_ms": lat1.pop("samples_ms", None)}
        return {"quality": summary, "curves": curves, "stage_auc": auc_of, "sizes": sizes}

    towers = {}
    for variant_dir in sorted(p for p in ctx.inputs["students"].iterdir() if (p / "retrieval").is_dir()):
        v = variant_dir.name
        retr, pre = load_towers(variant_dir / "retrieval", data), load_towers(variant_dir / "prerank", data)
        index = ItemIndex.load(ctx.inputs["index"] / v,
                               expect_model_hash=A.sha256_file(variant_dir / "retrieval" / "model.pt"),
                               expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
        towers[v] = (retr, pre, index)
        casc = build_cascade(data, retr, pre, ranker, index, seen)
        variants[v] = measure(v, casc, stage_auc(retr.scorer(data)(req_t, cand)[:, 0],
                                                 pre.scorer(data)(req_t, cand)[:, 0]))
    rows, quality = ranking_quality(t_top, inp, sizes, c.k)
    write_rows("teacher_corpus", rows)
    references = {"teacher_corpus": {"quality": quality, "sizes": sizes}}
    channels = load_channels(ctx.inputs["channels"], data.history)
    baselines = {}
    for name, ch in channels.items():
        rows, quality = ranking_quality(select_unseen(ch, requests, c.n_retrieve, seen)[0], inp, sizes, c.k)
        shown = baseline_name(name, ch.params())
        write_rows(shown, rows, file_stem=f"baseline_{name}")
        baselines[shown] = {"quality": quality, "sizes": sizes, "channel": name, "params": ch.params()}
    # the classic prior most-popular + EASE alone, as the teacher's collaborative term chose it
    prior = (A.read_manifest(ctx.inputs["teacher"])["metrics"].get("collaborative") or {}).get("prior_alone")
    if prior:
        ch = PopularEase(data.popular_channel(prior["window_days"], prior["refresh_ms"]), data.ease(prior["lam"]),
                         prior["ease_weight"], data.item_ids)
        rows, quality = ranking_quality(select_unseen(ch, requests, c.n_retrieve, seen)[0], inp, sizes, c.k)
        shown = baseline_name(ch.name, ch.params())
        write_rows(shown, rows, file_stem=f"baseline_{ch.name}")
        baselines[shown] = {"quality": quality, "sizes": sizes, "channel": ch.name, "params": ch.params()}
    channel_report, channel_cascades = None, {}
    union = union_channels(c.channels, list(channels))
    if union:
        missing = sorted(set(union) - set(channels))
        if missing:
            raise ValueError(f"replay.channels names {missing}, which the channels step did not build "
                             f"(it built {sorted(channels)}{why_left_out(ctx.inputs['channels'], missing)})")
        retr, pre, index = towers["distilled"]
        # the cascade load_cascade(run, "distilled+channels") serves
        settings = channel_settings(union, c.two_tower_quota, c.prerank_quotas, c.channel_quotas, c.merge)
        casc = build_cascade(data, retr, pre, ranker, index, seen, channels={n: channels[n] for n in union},
                             two_tower_quota=settings.two_tower_quota, prerank_quotas=settings.prerank_quotas,
                             channel_quotas=settings.quotas, merge=settings.merge)
        merged = casc.retriever
        name = CHANNELS_VARIANT
        variants[name] = measure(name, casc, stage_auc(None, pre.scorer(data)(req_t, cand)[:, 0]))
        variants[name]["channels"] = {"merge": merged.merge, "quotas": None if merged.quotas is None else
                                      dict(zip(merged.names, merged.quotas.tolist()))}
        channel_report = channel_contributions(merged, requests, inp, c.n_retrieve, c.k, seen)
        channel_report["prerank_quotas"] = settings.prerank_quotas
        channel_report["merge"] = settings.merge
        finals = np.stack(per_request[name]["final_items"].to_list())
        channel_report["final_origin_share"] = final_origin_share(merged, sampled, c.n_retrieve, seen,
                                                                  finals[sample_rows])
        # each channel alone as the retrieval stage, the same pre-rank and ranker after it: its own end-to-end list
        alone = {"two_tower": per_request["distilled"]}
        for n in union:
            alone[n], quality = replay_quality(cascade_from(data, channels[n], pre, ranker, seen), inp,
                                               c.n_retrieve, c.n_prerank, c.k, c.batch_size, filter_seen, ctx.progress)
            A.write_parquet(ctx.out / f"channel_{n}_alone_requests.parquet", alone[n])
            outputs.append(f"channel_{n}_alone_requests.parquet")
            channel_cascades[n] = {"quality": quality, "sizes": sizes, "channel": n}
        gaps = paired_comparisons({name: per_request[name], **{f"{n} alone": r for n, r in alone.items()}}, [name],
                                  in_sample, is_rand, oracle_mass)[name]
        for n in alone:
            own = variants["distilled"]["quality"] if n == "two_tower" else channel_cascades[n]["quality"]
            channel_report["per_channel"][n]["end_to_end"] = {
                **{m: own.get(m) for m in ("rank_click_recall", "oracle_ratio", "expected_click_recall_rand")},
                "union_minus_it": gaps[f"{n} alone"]}
    summary = {"variants": variants, "references": references, "baselines": baselines,
               "channel_cascades": channel_cascades,
               "paired": paired_comparisons(per_request, list(variants), in_sample, is_rand, oracle_mass),
               "channels": channel_report,
               "filter_seen": {"applied": filter_seen, "why": filter_reason}}
    A.write_json(ctx.out / "summary.json", summary)
    outputs.append("summary.json")
    everything = {**variants, **references, **baselines}
    head = {v: round(s["quality"]["rank_click_recall"], 4) for v, s in everything.items()}
    # the bf16 choices of the rankers' scoring, per pass size (manifest only: the probes vary from run to run)
    scoring = {"teacher": autocast_record(teacher)}
    if ranker is not teacher:
        scoring["ranker"] = autocast_record(ranker)
    return StepResult(outputs, {**{v: s["quality"] for v, s in everything.items()}, "latency": timings,
                                "autocast": scoring},
                      f"end-to-end click-recall@{c.k}: {head}")


PAIRED_METRICS = ("rank_click_recall", "oracle_ratio")


def paired_comparisons(per_request: dict[str, pd.DataFrame], cascades: list[str], in_sample: np.ndarray,
                       is_rand: np.ndarray | None = None, oracle_mass: np.ndarray | None = None) -> dict:
    """Each cascade variant minus every other list on the same requests: {cascade: {other: {metric:
    {"diff", "se", "n"}}}} for end-to-end click-recall@K (logged requests with clicks) and, on the world, the oracle
    ratio and (given the corpus's expected clicks ``oracle_mass`` [R]) the random slice's expected click-recall
    (``expected_click_recall_rand``: pooled over the random-exposure requests ``is_rand`` [R]); the SE over
    requests says whether a gap is beyond the test requests' noise."""
    out: dict = {}
    rand = None if oracle_mass is None or is_rand is None or not is_rand.any() else is_rand
    for name in cascades:
        mine = per_request[name]
        mine_in = mine[in_sample]
        out[name] = {}
        for other, rows in per_request.items():
            if other == name:
                continue
            rows_in = rows[in_sample]
            gaps = {m: paired_difference(mine_in[m].to_numpy(), rows_in[m].to_numpy())
                    for m in PAIRED_METRICS if m in mine and m in rows}
            if rand is not None:
                gaps["expected_click_recall_rand"] = paired_ratio_difference(
                    mine["oracle_clicks"].to_numpy()[rand], rows["oracle_clicks"].to_numpy()[rand], oracle_mass[rand])
            out[name][other] = gaps
    return out


def replayed_requests(frame: pd.DataFrame, test: pd.DataFrame, max_requests: int | None,
                      max_rand: int | None) -> tuple[pd.DataFrame, np.ndarray]:
    """The test requests replayed, in time order, and in_sample bool [R]: an even spread of at most
    ``max_requests`` over the test period (the overall means), plus up to ``max_rand`` random-exposure requests
    (an even spread of them; ``in_sample`` False where they are not in the spread already), so that the random
    slice is measured on enough requests without weighing more in the logged means."""
    n = len(frame)
    spread = (np.arange(n) if max_requests is None or n <= max_requests
              else np.unique(np.linspace(0, n - 1, max_requests).round().astype(int)))
    rand = np.flatnonzero(test.groupby("request_id").is_rand.max().reindex(frame.request_id).to_numpy() == 1)
    if max_rand is not None and len(rand) > max_rand:
        rand = rand[np.unique(np.linspace(0, len(rand) - 1, max_rand).round().astype(int))]
    rows = np.union1d(spread, rand)
    return frame.iloc[rows].reset_index(drop=True), np.isin(rows, spread)


def channel_contributions(merged: MergedRetriever, requests, inp: ReplayInputs, n: int, k: int, seen) -> dict:
    """Per channel of the merged retrieval stage, on the (sampled) test requests: its own click-recall@n and
    teacher-recall@k within its top n, and what the union loses without it (click-recall@n of the union minus that
    of the union of the others, merged the same way, quotas renormalised); the union's own click-recall@n and
    teacher-recall@k."""
    rows = np.arange(len(requests)) if inp.in_sample is None else np.flatnonzero(inp.in_sample)
    requests = requests.take(rows)
    full = list_quality(select_unseen(merged, requests, n, seen)[0], inp, rows, k)
    full_recall = float(np.nanmean(full["click_recall"]))
    out = {"union_click_recall": full_recall, "union_teacher_recall": float(np.nanmean(full["teacher_recall"])),
           "per_channel": {}}
    shares = [None] * len(merged.names) if merged.quotas is None else merged.quotas.tolist()
    for name, ch, q in zip(merged.names, merged.channels, shares):
        alone = list_quality(select_unseen(ch, requests, n, seen)[0], inp, rows, k)
        others = {m: c for m, c in zip(merged.names, merged.channels) if m != name}
        quotas = None if q is None else {m: qq for m, qq in zip(merged.names, shares) if m != name}
        without = float(np.nanmean(list_quality(
            select_unseen(MergedRetriever(others, quotas, merged.merge), requests, n, seen)[0], inp, rows, k
        )["click_recall"])) if others else 0.0
        out["per_channel"][name] = {"quota": q, "click_recall_alone": float(np.nanmean(alone["click_recall"])),
                                    "teacher_recall_alone": float(np.nanmean(alone["teacher_recall"])),
                                    "union_without": without, "marginal": full_recall - without}
    return out


def final_origin_share(merged: MergedRetriever, requests, n: int, seen, finals: np.ndarray) -> dict:
    """Share of the final lists' items that each channel placed in the retrieval stage."""
    items, _, origin = select_unseen_origin(merged, requests, n, seen)
    key_final = finals[:, :, None] == items[:, None, :]  # [B, K, N1]
    placed = np.where(key_final.any(axis=2), np.take_along_axis(origin, key_final.argmax(axis=2), 1), -1)
    filled = placed[finals != PAD]
    return {name: float(np.mean(filled == i)) if filled.size else float("nan")
            for i, name in enumerate(merged.names)}


def _days(n: float) -> str:
    return f"{n:g} day" + ("" if n == 1 else "s")


def baseline_name(channel: str, params: dict) -> str:
    """A baseline's row name: the channel and the setting that was chosen for it ("popular (7 days)")."""
    if channel == "popular":
        return f"popular ({_days(params['window_days'])})"
    if channel == "als":
        return f"als ({params['factors']} factors)"
    if channel == "ease":
        return f"ease (lambda {params['lam']:g})"
    if channel == "popular_ease":
        return f"popular + EASE ({_days(params['window_days'])}, lambda {params['lam']:g}, b {params['ease_weight']:g})"
    return channel


def curve_ks(c: ReplaySection, n_items: int) -> list[int]:
    """The K of the teacher-recall@K curves: ``c.recall_ks`` up to the retrieval stage's length and the corpus."""
    return [k for k in c.recall_ks if k <= min(c.n_retrieve, n_items)]


def recall_curves(casc, requests, teacher_top: np.ndarray, c: ReplaySection, filter_seen: bool) -> dict:
    """Teacher-recall@K of each stage for every K of :func:`curve_ks` up to the stage's length, over ``requests``
    (the replay passes the logged traffic's sample, without the random-slice-only requests): |the teacher's top-K
    over the corpus ∩ the stage's first K| / K, mean over requests. teacher_top:
    int64 [B, L >= max K], best first. {stage: {"k": [K], "teacher_recall": [mean]}}; the rank stage at K = c.k
    is the quality summary's final teacher-recall."""
    ks = curve_ks(c, teacher_top.shape[1])
    per_request: dict[str, dict[int, list[np.ndarray]]] = {}
    for s in range(0, len(requests), c.batch_size):
        idx = np.arange(s, min(s + c.batch_size, len(requests)))
        res = casc.recommend(requests.take(idx), c.n_retrieve, c.n_prerank, c.k, return_stages=True,
                             filter_seen=filter_seen)
        for st, (items, _) in res.stages.items():
            for k in (k for k in ks if k <= items.shape[1]):
                per_request.setdefault(st, {}).setdefault(k, []).append(
                    recall_at_k(teacher_top[idx, :k], items[:, :k]))
    return {st: {"k": list(by_k), "teacher_recall": [float(np.nanmean(np.concatenate(v))) for v in by_k.values()]}
            for st, by_k in per_request.items()}
