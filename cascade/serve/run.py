"""Load a finished run's artifacts and turn them into servable stages.

:class:`RunData` reads the data stage (canonical tables, the saved feature encoder, the cross-feature store
refitted from the logged history) and builds feature rows for any (request, item) pair. Unknown users, items
and feature values map to the OOV index 0 of every vocabulary: the side tables get one extra all-missing row
(user id / item id ``OOV_ID``) that every unknown id is routed to, so serving never fails on a new id.

:func:`teacher_scorer`, :func:`tower_user_embed` and :func:`build_cascade` assemble the callables that
:mod:`cascade.serve.cascade` wraps into stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import artifacts as A
from ..data.batches import EncodedTable, FeatureSpec
from ..data.features import CrossFeatureStore, FeatureEncoder, PairEncoder
from ..data.schema import Schema
from ..models.ranker import Ranker, RankerConfig
from ..models.two_tower import TowerConfig, TowerInputs, TwoTower, build_two_tower, item_embeddings
from .cascade import PAD, Cascade, PairScorer, Requests, Retriever, SeenFilter, topk_rows

log = logging.getLogger(__name__)

OOV_ID = -(2**31)  # the id of the all-missing user / item row; never a real id in any supported source
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def _with_oov_row(df: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """Append one row whose id is OOV_ID and whose features are missing (NaN / empty), encoding to OOV."""
    row = {}
    for c in df.columns:
        if c == id_col:
            row[c] = OOV_ID
        elif pd.api.types.is_numeric_dtype(df[c]):
            row[c] = np.nan
        else:
            row[c] = None
    oov = pd.DataFrame([row]).astype({c: ("float64" if pd.api.types.is_numeric_dtype(df[c]) and c != id_col else df[c].dtype)
                                      for c in df.columns})
    return pd.concat([df, oov], ignore_index=True)


class RunData:
    """The data stage of a run, ready for scoring. data_dir: runs/<run>/data."""

    def __init__(self, data_dir: str | Path, verify: bool = True):
        self.dir = Path(data_dir)
        self.manifest = A.read_manifest(self.dir, verify=verify)
        self.schema = Schema.from_dict(A.read_json(self.dir / "schema.json"))
        self.users = pd.read_parquet(self.dir / "users.parquet")
        self.items = pd.read_parquet(self.dir / "items.parquet")
        self.impressions = pd.read_parquet(self.dir / "impressions.parquet")
        self.encoder = FeatureEncoder.load(self.dir / "encoder")
        cfg = self.manifest["config"]
        # Refitted from the logged history (deterministic); queries only ever see events before their time.
        self.cross = CrossFeatureStore(window_days=cfg["cross_window_days"],
                                       tag_column=cfg.get("cross_tag_column", "tag"),
                                       author_column=cfg.get("cross_author_column", "author_id")
                                       ).fit(self.impressions, _with_oov_row(self.items, "item_id"))
        self.pairs = PairEncoder(self.encoder, self.cross, _with_oov_row(self.users, "user_id"),
                                 _with_oov_row(self.items, "item_id"))
        self.spec = self.pairs.spec
        self.item_ids = np.sort(self.items["item_id"].to_numpy(np.int64))
        self.user_ids = np.sort(self.users["user_id"].to_numpy(np.int64))
        self.context_names = [f.name for f in self.schema.by_side("context")]

    def encoded(self, split: str) -> EncodedTable:
        spec = FeatureSpec.from_dict(A.read_json(self.dir / "spec.json"))
        return EncodedTable.from_arrays(spec, A.read_npz(self.dir / f"encoded_{split}.npz"))

    def split_impressions(self, split: str) -> pd.DataFrame:
        return self.impressions[self.impressions["split"] == SPLIT_CODES[split]]

    def known(self, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(table, ids), len(table) - 1)
        return table[pos] == ids

    def map_users(self, user_ids: np.ndarray) -> np.ndarray:
        u = np.asarray(user_ids, np.int64)
        return np.where(self.known(u, self.user_ids), u, OOV_ID)

    def map_items(self, item_ids: np.ndarray) -> np.ndarray:
        i = np.asarray(item_ids, np.int64)
        return np.where(self.known(i, self.item_ids) & (i != PAD), i, OOV_ID)

    def pair_features(self, requests: Requests, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cat, num) [B*N, ...] for every (request, candidate) pair; candidates int64 [B, N] item ids (-1 pad)."""
        b, n = candidates.shape
        users = np.repeat(self.map_users(requests.user_id), n)
        items = self.map_items(candidates.reshape(-1))
        t = np.repeat(requests.time_ms, n)
        ctx = {}
        for c in self.context_names:
            if c not in requests.context:
                raise ValueError(f"requests have no context column {c!r} (needs {self.context_names})")
            ctx[c] = np.repeat(np.asarray(requests.context[c]), n)
        return self.pairs.encode_pairs(users, items, t, ctx)

    def tower_inputs(self, requests: pd.DataFrame) -> TowerInputs:
        """TowerInputs over all users and items (plus the OOV rows) and one context row per request of ``requests``."""
        users = _with_oov_row(self.users, "user_id")
        items = _with_oov_row(self.items, "item_id")
        ucat, unum = self.encoder.encode_users(users)
        icat, inum = self.encoder.encode_items(items)
        ccat, cnum = self.encoder.encode_context(requests)
        return TowerInputs(self.encoder.user_spec(), ucat, unum, self.encoder.item_spec(), icat, inum,
                           self.encoder.context_spec(), ccat, cnum, users["user_id"].to_numpy(np.int64),
                           items["item_id"].to_numpy(np.int64), requests["request_id"].to_numpy(np.int64))


def requests_frame(impressions: pd.DataFrame, context_names: list[str]) -> pd.DataFrame:
    """One row per request (in time order): request_id, user_id, time_ms (the request's start) and context."""
    g = impressions.groupby("request_id", sort=False)
    first = g.head(1).set_index("request_id")
    out = pd.DataFrame({"request_id": first.index.to_numpy(np.int64), "user_id": first["user_id"].to_numpy(np.int64),
                        "time_ms": g["time_ms"].min().loc[first.index].to_numpy(np.int64)})
    for c in context_names:
        out[c] = first[c].to_numpy()
    return out.sort_values(["time_ms", "request_id"], kind="stable").reset_index(drop=True)


def to_requests(frame: pd.DataFrame, context_names: list[str]) -> Requests:
    return Requests(frame["user_id"].to_numpy(np.int64), frame["time_ms"].to_numpy(np.int64),
                    {c: frame[c].to_numpy() for c in context_names}, frame["request_id"].to_numpy(np.int64))


def load_ranker(model_dir: str | Path, spec: FeatureSpec) -> Ranker:
    """A Ranker saved by the pipeline: config.json + model.pt (weights_only)."""
    model_dir = Path(model_dir)
    cfg = RankerConfig.from_dict(A.read_json(model_dir / "config.json"))
    model = Ranker(spec, cfg)
    state = A.load_torch(model_dir / "model.pt")
    model.load_state_dict(state["model"] if "model" in state else state)
    model.eval()
    return model


LISTS_MIN = 8  # score_pairs uses forward_lists from this many candidate lists per forward pass on


@torch.inference_mode()
def score_pairs(model: torch.nn.Module, cat: np.ndarray, num: np.ndarray, batch_size: int = 4096,
                list_len: int | None = None) -> np.ndarray:
    """Logits float32 [N] of ``model(cat [N, C], num [N, M])`` (eval mode, inference_mode), in forward passes of
    about ``batch_size`` rows. Small passes are faster on the CPU: with 4,096 rows every activation of the default
    teacher stays in the cache, and scoring ran 2.7x faster than with passes of 65,536 rows (BENCHMARKS.md).

    list_len: the rows are candidate lists of this length (consecutive rows share one request); a Ranker then
    scores them with :meth:`~cascade.models.ranker.Ranker.forward_lists`, which does the user / context work once
    per request, when a pass holds at least ``LISTS_MIN`` lists. Passes hold whole lists. (Side by side on the
    default and the tiny DCN-V2 teachers (low-rank cross): forward_lists takes 0.88-1.05x the time of forward
    from 4 to 40 lists per pass, but 1.08-1.33x at one list, where its fixed cost is not paid back; batch-1
    serving scores one list.)
    """
    out = np.empty(len(cat), np.float32)
    was_training = model.training
    if was_training:  # served models are already in eval mode: a mode switch walks the module tree per call
        model.eval()
    lists = (list_len is not None and hasattr(model, "forward_lists")
             and min(len(cat), batch_size) >= LISTS_MIN * list_len)
    step = max(1, batch_size // list_len) * list_len if lists else batch_size
    try:
        for s in range(0, len(cat), step):
            c, x = torch.from_numpy(cat[s:s + step]), torch.from_numpy(num[s:s + step])
            out[s:s + step] = (model.forward_lists(c, x, list_len) if lists else model(c, x)).float().numpy()
    finally:
        if was_training:
            model.train()
    return out


def ranker_scorer(model: torch.nn.Module, data: RunData):
    """score(requests, candidates [B, N]) -> logits [B, N] with the pair features built on the fly."""

    def score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
        cat, num = data.pair_features(requests, candidates)
        return score_pairs(model, cat, num, list_len=candidates.shape[1]).reshape(candidates.shape)

    return score


@dataclass
class Towers:
    """A trained two-tower student with everything needed to serve it."""

    model: TwoTower
    inputs: TowerInputs  # item rows = data items + OOV row
    item_emb: np.ndarray  # float32 [I, d], rows as inputs.item_ids

    def user_embed(self, data: RunData, requests: Requests) -> np.ndarray:
        u_rows = self.inputs.user_rows(data.map_users(requests.user_id))
        ccat, cnum = data.encoder.encode_context({c: np.asarray(requests.context[c]) for c in data.context_names})
        with torch.inference_mode():
            self.model.eval()
            u = self.model.user_tower(torch.from_numpy(self.inputs.user_cat[u_rows]), torch.from_numpy(self.inputs.user_num[u_rows]),
                                      torch.from_numpy(ccat), torch.from_numpy(cnum))
        return u.float().numpy()

    def scorer(self, data: RunData):
        def score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
            u = self.user_embed(data, requests)
            rows = self.inputs.item_rows(data.map_items(candidates.reshape(-1))).reshape(candidates.shape)
            return np.einsum("bd,bnd->bn", u, self.item_emb[rows]) * float(1.0 / self.model.temperature)
        return score


def load_towers(model_dir: str | Path, data: RunData, requests: pd.DataFrame | None = None) -> Towers:
    model_dir = Path(model_dir)
    cfg = TowerConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in A.read_json(model_dir / "config.json").items()})
    frame = requests if requests is not None else pd.DataFrame(
        {"request_id": np.array([0], np.int64), **{c: np.zeros(1, np.int64) for c in data.context_names}})
    inputs = data.tower_inputs(frame)
    model = build_two_tower(inputs, cfg)
    model.load_state_dict(A.load_torch(model_dir / "model.pt"))
    model.eval()
    emb = item_embeddings(model.item_tower, inputs.item_cat, inputs.item_num)
    return Towers(model, inputs, emb)


def build_cascade(data: RunData, retrieval: Towers, prerank: Towers, ranker: torch.nn.Module, index,
                  seen: SeenFilter | None = None) -> Cascade:
    """retrieval tower + index -> pre-rank tower -> ranker (teacher or distilled student)."""
    return Cascade(Retriever(lambda r: retrieval.user_embed(data, r), index), PairScorer(prerank.scorer(data)),
                   PairScorer(ranker_scorer(ranker, data)), seen)


def teacher_top_over_corpus(model: torch.nn.Module, data: RunData, requests: Requests, k: int,
                            pairs_per_batch: int = 262144, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ranker's top-k over the whole corpus for each request: (item ids [B, k], logits [B, k]).

    Scores B x I pairs in blocks of about ``pairs_per_batch`` (requests x item chunk), keeping a running top-k,
    so memory stays bounded for any corpus size. This is the reference list of teacher-recall.
    """
    from tqdm.auto import tqdm

    b, n_items = len(requests), len(data.item_ids)
    item_chunk = min(n_items, pairs_per_batch)
    req_chunk = max(1, pairs_per_batch // item_chunk)
    score = ranker_scorer(model, data)
    out_i = np.full((b, k), PAD, np.int64)
    out_s = np.full((b, k), -np.inf, np.float32)
    for r0 in tqdm(range(0, b, req_chunk), desc="teacher over corpus", disable=not progress, leave=False):
        sub = requests.take(np.arange(r0, min(r0 + req_chunk, b)))
        best_i = np.full((len(sub), 0), PAD, np.int64)
        best_s = np.zeros((len(sub), 0), np.float32)
        for s in range(0, n_items, item_chunk):
            chunk = np.ascontiguousarray(np.broadcast_to(data.item_ids[s:s + item_chunk], (len(sub), min(item_chunk, n_items - s))))
            sc = score(sub, chunk)
            best_i, best_s = topk_rows(np.concatenate([best_s, sc], 1), np.concatenate([best_i, chunk], 1), k)
        out_i[r0:r0 + len(sub)], out_s[r0:r0 + len(sub)] = best_i, best_s
    return out_i, out_s


def load_cascade(run_dir: str | Path, variant: str = "distilled", ranker: str = "teacher",
                 data: RunData | None = None) -> tuple[RunData, Cascade]:
    """The servable cascade of a finished run: (RunData, Cascade). variant: a students/ sub-folder
    ("distilled" or "ground_truth"); ranker: "teacher" or "student" (the distilled rank student)."""
    from ..index.faiss_index import ItemIndex

    run_dir = Path(run_dir)
    data = data or RunData(run_dir / "data")
    sdir = run_dir / "students" / variant
    if not (sdir / "retrieval").is_dir():
        raise FileNotFoundError(f"{sdir}: no such student variant (have "
                                f"{sorted(p.name for p in (run_dir / 'students').iterdir() if p.is_dir())})")
    retr, pre = load_towers(sdir / "retrieval", data), load_towers(sdir / "prerank", data)
    model = load_ranker(run_dir / "teacher" / "teacher" if ranker == "teacher" else run_dir / "students" / "rank_student", data.spec)
    index = ItemIndex.load(run_dir / "index" / variant, expect_model_hash=A.sha256_file(sdir / "retrieval" / "model.pt"),
                           expect_dim=retr.item_emb.shape[1], expect_metric="ip", omp_threads=1)
    return data, build_cascade(data, retr, pre, model, index)


def trace_requests(data: RunData, cascade: Cascade, requests: Requests, n_retrieve: int, n_prerank: int, k: int,
                   show: int = 10) -> list[pd.DataFrame]:
    """For each request, a table of its final items with the rank each got at every stage (a funnel trace)."""
    res = cascade.recommend(requests, n_retrieve, n_prerank, k, return_stages=True)
    tables = []
    for b in range(len(requests)):
        final = res.items[b][:show]
        t = pd.DataFrame({"item_id": final, "final_score": res.scores[b][:show]})
        for st, (items, scores) in res.stages.items():
            pos = {int(x): j + 1 for j, x in enumerate(items[b]) if x != PAD}
            t[f"{st}_rank"] = [pos.get(int(x)) for x in final]
        tables.append(t.merge(data.items, on="item_id", how="left")[
            ["item_id", "retrieval_rank", "prerank_rank", "rank_rank", "final_score"]
            + [c for c in ("tag", "author_id", "video_type") if c in data.items.columns]])
    return tables
