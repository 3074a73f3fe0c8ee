"""A finished run read back: its data, encoder and models, for the later pipeline steps, training and serving.

:class:`RunData` reads the data step's folder (canonical tables, the saved feature encoder, the cross-feature
store refitted from the logged history, once per process for the same files) and builds feature rows for any
(request, item) pair. Unknown users, items and feature values map to the OOV index 0 of every vocabulary: the side
tables get one extra all-missing row (user id / item id ``OOV_ID``) that every unknown id is routed to, so serving
never fails on a new id.
:func:`load_ranker` and :func:`load_towers` read the saved models; :class:`Towers` is a two-tower student with
its item embeddings, ready to embed requests and score candidates. :mod:`cascade.serve.cascade` assembles them
into a cascade (``load_cascade``).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import artifacts as A
from .arrays import PAD
from .channels.classic import EaseChannel, PopularChannel
from .channels.prior import PRIOR_FILE, PopularityPrior
from .data.batches import EncodedTable, FeatureSpec
from .data.features import CrossFeatureStore, FeatureEncoder, PairEncoder
from .data.history import EventHistory
from .data.ids import IdIndex
from .data.requests import Requests, request_start_ms
from .data.schema import Schema
from .models.collaborative import load_term
from .models.entire_space import EntireSpaceRanker
from .models.ranker import Ranker, RankerConfig
from .models.two_tower import TowerConfig, TowerInputs, TwoTower, build_two_tower, item_embeddings

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
    oov = pd.DataFrame([row]).astype({c: ("float64" if pd.api.types.is_numeric_dtype(df[c]) and c != id_col
                                          else df[c].dtype)
                                      for c in df.columns})
    return pd.concat([df, oov], ignore_index=True)


def _events(imp: pd.DataFrame) -> EventHistory:
    """Impression rows as events at their request's start, clicks flagged."""
    return EventHistory(imp["user_id"].to_numpy(np.int64), imp["item_id"].to_numpy(np.int64), request_start_ms(imp),
                        imp["click"].to_numpy())


#: the last fitted cross-feature store: (impressions' sha256, items' sha256, the store's settings) -> store. Every
#: step of a run reads the same data folder; the fit (about 2 s on the default world) is then made once per process
_LAST_CROSS: dict[tuple, CrossFeatureStore] = {}
_LAST_CROSS_LOCK = threading.Lock()


def item_columns(manifest: dict) -> dict:
    """{"tag", "author"}: the item columns of a tag and an author the data step chose ("": none), from its
    ``manifest`` (a run from before the step recorded them: its config's, which were never unset then)."""
    chosen = ((manifest.get("metrics") or {}).get("summary") or {}).get("item_columns")
    if chosen is not None:
        return {"tag": chosen["tag"], "author": chosen["author"]}
    cfg = manifest["config"]
    return {"tag": cfg.get("cross_tag_column", "tag"), "author": cfg.get("cross_author_column", "author_id")}


def _cross_store(manifest: dict, verified: bool, impressions: pd.DataFrame,
                 items: pd.DataFrame) -> CrossFeatureStore | None:
    """The data step's cross-feature store, refitted from the logged history (deterministic; queries only ever see
    events before their time), None where the run has none. A store fitted on the same files (their sha256 in the
    manifest, checked: ``verified``) with the same settings is taken as it is; it is never modified after its fit."""
    cfg = manifest["config"]
    if not cfg.get("cross_features", True):
        return None
    columns = item_columns(manifest)
    settings = dict(window_days=cfg["cross_window_days"], tag_column=columns["tag"], author_column=columns["author"])
    out = manifest["outputs"]
    files = (out.get("impressions.parquet"), out.get("items.parquet"))
    key = (*files, tuple(sorted(settings.items()))) if verified and None not in files else None
    with _LAST_CROSS_LOCK:
        if key in _LAST_CROSS:
            return _LAST_CROSS[key]
    store = CrossFeatureStore(**settings).fit(impressions, _with_oov_row(items, "item_id"))
    if key is not None:
        with _LAST_CROSS_LOCK:
            _LAST_CROSS.clear()
            _LAST_CROSS[key] = store
    return store


#: the EASE fits of the last files (:meth:`RunData.ease`): (impressions' sha256, items' sha256) -> lambda -> the
#: fitted channel (the teacher step fits its grid's lambdas once; the later steps of the process read the chosen one)
_LAST_EASE: dict[tuple, dict[float, EaseChannel]] = {}
_LAST_EASE_LOCK = threading.Lock()


def drop_ease_fits(keep: tuple[float, ...] = ()) -> None:
    """Forget the process's EASE fits (:meth:`RunData.ease`) but those of the lambdas ``keep``: each holds two
    items x items float32 arrays (its weights and, once standardised scores were asked, B B')."""
    with _LAST_EASE_LOCK:
        for fits in _LAST_EASE.values():
            for lam in [lam for lam in fits if lam not in keep]:
                del fits[lam]


class RunData:
    """The data step of a run, ready for scoring. data_dir: runs/<run>/data."""

    def __init__(self, data_dir: str | Path, verify: bool = True):
        self.dir = Path(data_dir)
        self.manifest = A.read_manifest(self.dir, verify=verify)
        self.verified = verify
        self.schema = Schema.from_dict(A.read_json(self.dir / "schema.json"))
        self.users = pd.read_parquet(self.dir / "users.parquet")
        self.items = pd.read_parquet(self.dir / "items.parquet")
        self.impressions = pd.read_parquet(self.dir / "impressions.parquet")
        self.encoder = FeatureEncoder.load(self.dir / "encoder")
        self.cross = _cross_store(self.manifest, verify, self.impressions, self.items)
        self.pairs = PairEncoder(self.encoder, self.cross, _with_oov_row(self.users, "user_id"),
                                 _with_oov_row(self.items, "item_id"))
        self.spec = self.pairs.spec
        self.item_ids = np.sort(self.items["item_id"].to_numpy(np.int64))
        self.user_ids = np.sort(self.users["user_id"].to_numpy(np.int64))
        self._item_index = IdIndex(self.item_ids, "item_id", str(self.dir))
        self._user_index = IdIndex(self.user_ids, "user_id", str(self.dir))
        self.context_names = [f.name for f in self.schema.by_side("context")]
        kinds = {c["name"]: ("float" if c["kind"] == "numeric" else c.get("key_kind", "str"))
                 for c in self.encoder.columns_ if c["part"] == "context"}
        self.context_kinds = {c: kinds.get(c, "str") for c in self.context_names}  # what a request must hold
        self._last_recent: tuple | None = None  # (query, answer) of the last recent_clicks call
        self._popular: dict[tuple, PopularChannel] = {}  # popular_channel's

    @functools.cached_property
    def history(self) -> EventHistory:
        """Every logged impression as an event at its request's start, clicks flagged: what serving knows of the
        past (queries only ever see events strictly before their time)."""
        return _events(self.impressions)

    @property
    def seen_filter(self) -> tuple[EventHistory | None, str]:
        """(the shown-items history where the data step decided to filter seen items, else None; why), as its
        summary records (``data.filter_seen``)."""
        decision = self.manifest["metrics"]["summary"]["filter_seen"]
        return (self.history if decision["applied"] else None), decision["why"]

    def split_history(self, split: str) -> EventHistory:
        """The events of one split only (e.g. "train": what a model built at the end of train may know)."""
        return _events(self.split_impressions(split))

    def encoded(self, split: str) -> EncodedTable:
        spec = FeatureSpec.from_dict(A.read_json(self.dir / "spec.json"))
        return EncodedTable.from_arrays(spec, A.read_npz(self.dir / f"encoded_{split}.npz"))

    def split_impressions(self, split: str) -> pd.DataFrame:
        return self.impressions[self.impressions["split"] == SPLIT_CODES[split]]

    def map_users(self, user_ids: np.ndarray) -> np.ndarray:
        """user ids [...] with every id the data step never saw replaced by OOV_ID (its all-missing row)."""
        u = np.asarray(user_ids, np.int64)
        return np.where(self._user_index.find(u)[1], u, OOV_ID)

    def map_items(self, item_ids: np.ndarray) -> np.ndarray:
        """item ids [...] with unknown ids and padding (PAD) replaced by OOV_ID."""
        i = np.asarray(item_ids, np.int64)
        return np.where(self._item_index.find(i)[1] & (i != PAD), i, OOV_ID)

    def pair_features(self, requests: Requests, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cat, num) [B*N, ...] for every (request, candidate) pair; candidates int64 [B, N] item ids (-1 pad).
        Request-level features (user, context, the user's cross counts) are encoded once per request."""
        for c in self.context_names:
            if c not in requests.context:
                raise ValueError(f"requests have no context column {c!r} (needs {self.context_names})")
        ctx = {c: np.asarray(requests.context[c]) for c in self.context_names}
        return self.pairs.encode_lists(self.map_users(requests.user_id), self.map_items(candidates),
                                       requests.time_ms, ctx)

    def tower_inputs(self, requests: pd.DataFrame, history_length: int = 0) -> TowerInputs:
        """TowerInputs over all users and items (plus the OOV rows) and one context row per request of ``requests``;
        history_length > 0: also each request's last that many clicked items (:meth:`recent_clicks`; the frame
        needs user_id and time_ms)."""
        users = _with_oov_row(self.users, "user_id")
        items = _with_oov_row(self.items, "item_id")
        ucat, unum = self.encoder.encode_users(users)
        icat, inum = self.encoder.encode_items(items)
        ccat, cnum = self.encoder.encode_context(requests)
        inputs = TowerInputs(self.encoder.user_spec(), ucat, unum, self.encoder.item_spec(), icat, inum,
                             self.encoder.context_spec(), ccat, cnum, users["user_id"].to_numpy(np.int64),
                             items["item_id"].to_numpy(np.int64), requests["request_id"].to_numpy(np.int64))
        if history_length:
            inputs.history = self.history_codes(inputs, requests["user_id"].to_numpy(), requests["time_ms"].to_numpy(),
                                                history_length)
        return inputs

    def history_codes(self, inputs: TowerInputs, user_ids: np.ndarray, t_ms: np.ndarray, n: int) -> np.ndarray:
        """What a user tower with ``history_length`` n reads for these requests: their :meth:`recent_clicks` as
        codes of ``inputs``' item-id vocabulary, int64 [B, n] (0 = none). Training inputs and serving both take
        this path."""
        return inputs.history_codes(self.recent_clicks(user_ids, t_ms, n))

    def recent_clicks(self, user_ids: np.ndarray, t_ms: np.ndarray, n: int) -> np.ndarray:
        """Each (user, time)'s last ``n`` distinct clicked item ids strictly before the time, most recent first:
        int64 [B, n], PAD where fewer (the logged history, as serving knows it). Read-only: the last answer is
        kept, so the pre-rank tower reuses the lookup the retrieval tower made for the same requests."""
        user_ids, t_ms = np.asarray(user_ids, np.int64), np.asarray(t_ms, np.int64)
        key = (int(n), user_ids.tobytes(), t_ms.tobytes())
        last = self._last_recent
        if last is not None and last[0] == key:
            return last[1]
        out = self.click_history.recent(user_ids, t_ms, n, clicks_only=False)[0]
        out.setflags(write=False)
        self._last_recent = (key, out)
        return out

    def popular_channel(self, window_days: float | None, refresh_ms: int) -> PopularChannel:
        """The most-popular lists of this history with these settings, one per process for every user of them
        (the pre-rank and retrieval towers' priors share their per-period counts)."""
        key = (window_days, int(refresh_ms))
        if key not in self._popular:
            self._popular[key] = PopularChannel(self.history, window_days, refresh_ms)
        return self._popular[key]

    def ease(self, lam: float) -> EaseChannel:
        """EASE item-item weights (:class:`~cascade.channels.EaseChannel`) fitted on the train split's clicks with
        ``lam``, reading :attr:`history`: the teacher's collaborative term
        (:class:`~cascade.models.collaborative.CollaborativeTerm`). One fit per process for the same verified files
        and ``lam`` (a dense inverse of items x items: about 30 s at 7,583 items on 2 cores)."""
        out = self.manifest["outputs"]
        files = (out.get("impressions.parquet"), out.get("items.parquet"))
        shared = self.verified and None not in files
        with _LAST_EASE_LOCK:
            kept = _LAST_EASE.get(files, {}).get(float(lam)) if shared else None
        if kept is not None:  # the same weights, read over this instance's history
            return kept if kept.history is self.history else kept.with_history(self.history)
        fitted = EaseChannel(self.history, lam).fit(self.split_history("train"), self.item_ids)
        if shared:
            with _LAST_EASE_LOCK:
                if files not in _LAST_EASE:
                    _LAST_EASE.clear()
                _LAST_EASE.setdefault(files, {})[float(lam)] = fitted
        return fitted

    @functools.cached_property
    def click_history(self) -> EventHistory:
        """The logged clicks alone, as events at their request's start (:attr:`history` less the unclicked
        impressions): "the last n clicked items" reach back over n clicks, however many impressions lie between."""
        return _events(self.impressions[self.impressions["click"].to_numpy() > 0])


def ranker_config_json(model: torch.nn.Module, cfg: RankerConfig) -> dict:
    """What config.json holds for a saved ranker: the RankerConfig, wrapped with its kind for an entire-space one."""
    if isinstance(model, EntireSpaceRanker):
        return {"kind": "entire_space", "ranker": cfg.to_dict(), "exposure": model.exposure_cfg.to_dict()}
    return cfg.to_dict()


def load_ranker(model_dir: str | Path, spec: FeatureSpec) -> Ranker | EntireSpaceRanker:
    """A ranker saved by the pipeline: config.json (:func:`ranker_config_json`) + model.pt (weights_only), and its
    collaborative term where it has one (``collaborative.json``: :mod:`cascade.models.collaborative`)."""
    model_dir = Path(model_dir)
    meta = A.read_json(model_dir / "config.json")
    if meta.get("kind") == "entire_space":
        exposure = meta.get("exposure")  # absent in runs saved before the exposure model had its own config
        model = EntireSpaceRanker(spec, RankerConfig.from_dict(meta["ranker"]),
                                  exposure_cfg=None if exposure is None else RankerConfig.from_dict(exposure))
    else:
        model = Ranker(spec, RankerConfig.from_dict(meta))
    state = A.load_torch(model_dir / "model.pt")
    model.load_state_dict(state["model"] if "model" in state else state)
    model.eval()
    model.collaborative = load_term(model_dir)
    return model


@dataclass
class Towers:
    """A trained two-tower student with everything needed to serve it. Its item rows: the data's items, then the
    OOV row (``n_real`` of them real); unknown ids and PAD score as the OOV row."""

    model: TwoTower
    inputs: TowerInputs  # item rows = data items + OOV row
    item_emb: np.ndarray  # float32 [I, d], rows as inputs.item_ids
    prior: PopularityPrior | None = None  # the recent-popularity term added to its scores (None: none)

    def __post_init__(self) -> None:
        self.n_real = len(self.inputs.item_ids) - 1
        self.item_index = IdIndex(self.inputs.item_ids[: self.n_real], "item_id", "Towers")  # real items' rows

    def user_embed(self, data: RunData, requests: Requests) -> np.ndarray:
        u_rows = self.inputs.user_rows(data.map_users(requests.user_id))
        ccat, cnum = data.encoder.encode_context({c: np.asarray(requests.context[c]) for c in data.context_names},
                                                 n_rows=len(requests))
        if self.model.training:  # loaded in eval mode; a mode switch walks the module tree on every call
            self.model.eval()
        x = [torch.from_numpy(self.inputs.user_cat[u_rows]), torch.from_numpy(self.inputs.user_num[u_rows]),
             torch.from_numpy(ccat), torch.from_numpy(cnum)]
        if self.model.cfg.history_length:
            x.append(torch.from_numpy(data.history_codes(self.inputs, requests.user_id, requests.time_ms,
                                                         self.model.cfg.history_length)))
        with torch.inference_mode():
            u = self.model.user_tower(*x)
        return u.float().numpy()

    def refresh(self, t_ms: np.ndarray) -> int:
        """The prior's periods for the times ``t_ms`` [B] (:meth:`PopularityPrior.refresh`); 0 without a prior."""
        return 0 if self.prior is None else self.prior.refresh(t_ms)

    def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Item rows int64 [...] of ids [...]: unknown ids and PAD -> the OOV row (``n_real``)."""
        rows, found = self.item_index.find(item_ids)
        return np.where(found, rows, self.n_real)

    def row_scores(self, requests: Requests, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 [B, N]: <u, v> / T plus the prior's term for item rows [B, N] (the OOV row scores too)."""
        s = np.matmul(self.item_emb[rows], u[:, :, None])[:, :, 0] * np.float32(1.0 / self.model.temperature)
        if self.prior is not None:
            s += self.prior.boost(requests, u, rows)
        return s

    def scores(self, data: RunData, requests: Requests, candidates: np.ndarray,
               u: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, N]: the tower's score of each request's candidate ids [B, N] (PAD: -inf), <u, v> / T plus
        the prior's term; u [B, d]: the requests' user embeddings when already computed."""
        u = self.user_embed(data, requests) if u is None else u
        s = self.row_scores(requests, u, self.item_rows(candidates))
        return np.where(candidates == PAD, np.float32(-np.inf), s)

    def scorer(self, data: RunData):
        def score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
            return self.scores(data, requests, candidates)
        return score


def load_towers(model_dir: str | Path, data: RunData, requests: pd.DataFrame | None = None) -> Towers:
    model_dir = Path(model_dir)
    cfg = TowerConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k,
                         v in A.read_json(model_dir / "config.json").items()})
    frame = requests if requests is not None else pd.DataFrame(
        {"request_id": np.array([0], np.int64), "user_id": data.user_ids[:1], "time_ms": np.zeros(1, np.int64),
         **{c: np.zeros(1, np.int64) for c in data.context_names}})
    inputs = data.tower_inputs(frame, cfg.history_length)
    model = build_two_tower(inputs, cfg)
    model.load_state_dict(A.load_torch(model_dir / "model.pt"))
    model.eval()
    towers = Towers(model, inputs, item_embeddings(model.item_tower, inputs.item_cat, inputs.item_num))
    if (model_dir / PRIOR_FILE).is_file():
        p = A.read_json(model_dir / PRIOR_FILE)
        if p["weight"] > 0:
            popular = data.popular_channel(p["window_days"], p["refresh_ms"])
            towers.prior = PopularityPrior(popular, p["weight"], towers.item_emb[: towers.n_real], towers.item_index,
                                           model.temperature)
    return towers
