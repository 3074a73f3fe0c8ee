"""The world's click model: latent arrays drawn from the side tables, the running history state, and
:class:`World`, which answers the ground truth (true click probabilities, the oracle top-k) and saves / loads it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...arrays import PAD, pad_by_row, topk_rows
from ...artifacts import ArtifactError, read_json, read_npz, write_json, write_npz
from ..ids import IdIndex
from ..schema import DataValidationError
from .config import (
    ACTIVITY_LEVEL,
    HOUR_BUCKETS,
    ITEM_CAT_COLUMNS,
    ITEM_CAT_WEIGHTS,
    TAG_GROUPS,
    USER_CAT_COLUMNS,
    VIDEO_FEATURES_FILE,
    WORLD_FORMAT_VERSION,
    WORLD_JSON,
    WORLD_STATE,
    HistoryState,
    WorldConfig,
)
from .tables import first_tag, resize_items, resize_users, value_codes


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def std_normal_embed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """[n, d] rows with unit expected squared norm."""
    return rng.standard_normal((n, d)) / math.sqrt(d)


def standardise(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


def mix(features: np.ndarray, noise: np.ndarray, noise_share: float) -> np.ndarray:
    """sqrt(1-a) * features/rms + sqrt(a) * noise/rms: ``a`` of the variance from noise."""
    def unit(x: np.ndarray) -> np.ndarray:
        rms = math.sqrt(float(np.mean(np.sum(x * x, axis=1))))
        return x / (rms if rms > 0 else 1.0)

    return math.sqrt(1.0 - noise_share) * unit(features) + math.sqrt(noise_share) * unit(noise)


class History:
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

    def _resolve_history(self, history: str | HistoryState | None) -> HistoryState | None:
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
                     hist: HistoryState | History | None, t: float | None = None,
                     affinity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(logit, affinity, context term, history term) of the appeal, each broadcast over u, i, hour, tab.

        u, i: integer row indices of broadcastable shapes (e.g. [R, 1] and [R, C]). affinity: <U_u, V_i>
        precomputed in the broadcast shape (the oracle passes a matmul). ``hist`` a HistoryState (values used as
        they are) or the running History (decayed to time t).
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
            f = hist.factor(t) if isinstance(hist, History) else 1.0
            tg, bk = a["item_tag"][i], a["item_bucket"][i]
            tc = hist.tag_click[u, tg].astype(np.float64) * f
            ts = hist.tag_skip[u, tg].astype(np.float64) * f
            ac = hist.author_click[u, bk].astype(np.float64) * f
            ask = hist.author_skip[u, bk].astype(np.float64) * f
            h = (c.tag_click_weight * np.log1p(tc) + c.author_click_weight * np.log1p(ac)
                 - c.fatigue_weight * (np.log1p(ts) + np.log1p(ask)))
        return static + ctx + h, affinity, ctx, h

    def true_click_prob(self, user_ids: np.ndarray, item_ids: np.ndarray, hour: np.ndarray | int,
                        tab: np.ndarray | int, history: str | HistoryState | None = "end") -> np.ndarray:
        """Ground-truth probability of a click if examined at the top position: float64 [N].

        user_ids, item_ids: [N] ids (or broadcastable shapes); hour: hour of day 0..23 and tab: 0..n_tabs-1,
        scalars or [N]. history: "end" uses the history state at the end of the simulation, None ignores history
        (static + context terms only), or a HistoryState.
        """
        u = self.user_index(np.asarray(user_ids))
        i = self.item_index(np.asarray(item_ids))
        hb, tb = self._context(hour, tab)
        logit, *_ = self._logit_parts(u, i, hb, tb, self._resolve_history(history))
        return sigmoid(logit)

    def oracle_topk(self, user_ids: np.ndarray, hour: np.ndarray | int, tab: np.ndarray | int, k: int,
                    candidate_items: np.ndarray | None = None, history: str | HistoryState | None = "end",
                    chunk_pairs: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """The k items with the highest true click probability per user: (item_ids [B, k] int64, probs [B, k]).

        user_ids: [B]; hour, tab: scalars or [B]. candidate_items: None (the whole corpus, scanned in chunks of
        about ``chunk_pairs / B`` items so 1M items never build a users x items matrix), [C] ids shared by all
        users, or [B, C] ids per user. Rows are sorted by probability, descending. The probabilities equal
        :meth:`true_click_prob` up to float64 rounding (a matrix product sums in another order).
        """
        B = len(np.asarray(user_ids))
        best_l = np.full((B, 0), -np.inf)
        best_i = np.zeros((B, 0), np.int64)
        for items, logit in self._logit_chunks(user_ids, hour, tab, candidate_items, history, chunk_pairs, k):
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
        return self.item_ids[best_i], sigmoid(best_l)

    def corpus_click_mass(self, user_ids: np.ndarray, hour: np.ndarray | int, tab: np.ndarray | int,
                          history: str | HistoryState | None = "end", chunk_pairs: int = 1 << 20) -> np.ndarray:
        """Sum over the whole corpus of the true click probability per user: float64 [B] (user_ids [B]; hour, tab
        scalars or [B]; scanned in chunks as :meth:`oracle_topk`). A list's expected clicks divided by this is the
        share of the user's clicks it would hold if every item were shown to the user at random."""
        mass = np.zeros(len(np.asarray(user_ids)))
        for _, logit in self._logit_chunks(user_ids, hour, tab, None, history, chunk_pairs, 1):
            mass += sigmoid(logit).sum(axis=1)
        return mass

    def _logit_chunks(self, user_ids, hour, tab, candidate_items, history, chunk_pairs: int, k: int):
        """Yield (item indexes [1 or B, c], true logits [B, c]) chunk by chunk over the corpus (or the candidates:
        [C] shared or [B, C] per user), about ``chunk_pairs`` pairs per chunk and at least k items (k: 1..n)."""
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
            yield items, logit

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
    def load(cls, out_dir: str | Path) -> World:
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
def build_arrays(cfg: WorldConfig, users: pd.DataFrame, items: pd.DataFrame, rng: np.random.Generator
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """Resize the tables and draw the latent model. Returns (users out, items out, arrays, user activity [U])."""
    d = cfg.latent_dim
    users_out = resize_users(users, cfg.n_users, rng)
    items_out = resize_items(items, cfg.n_items, rng)
    U, I = len(users_out), len(items_out)
    # one embedding per feature value of the output tables; a factor is the sum over the row's values
    user_feat = np.zeros((U, d))
    for col in USER_CAT_COLUMNS:
        codes = value_codes(users_out[col])
        user_feat += std_normal_embed(rng, codes.max() + 1, d)[codes]
    first_tag_out = first_tag(items_out["tag"], VIDEO_FEATURES_FILE)
    item_feat = np.zeros((I, d))
    item_codes = {}
    for col in ITEM_CAT_COLUMNS:
        codes = value_codes(pd.Series(first_tag_out) if col == "tag" else items_out[col])
        item_codes[col] = codes
        item_feat += ITEM_CAT_WEIGHTS[col] * std_normal_embed(rng, codes.max() + 1, d)[codes]

    user_vec = mix(user_feat, rng.standard_normal((U, d)), cfg.user_noise)
    item_vec = mix(item_feat, rng.standard_normal((I, d)), cfg.item_noise)
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
    pop = cfg.popularity_sigma * (0.6 * standardise(feat_pop) + 0.8 * rng.standard_normal(I))
    quality = 0.5 * standardise(pop) + math.sqrt(0.75) * rng.standard_normal(I)

    tag_codes = item_codes["tag"]
    n_tags = int(tag_codes.max()) + 1
    group_of_tag = rng.integers(0, TAG_GROUPS, n_tags)
    n_vtypes = int(item_codes["video_type"].max()) + 1
    n_authors = int(item_codes["author_id"].max()) + 1
    bucket_of_author = rng.integers(0, cfg.author_buckets, n_authors)

    degree = users_out["user_active_degree"].map(ACTIVITY_LEVEL).to_numpy(np.float64)
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
        "ctx_hour_group": cfg.context_scale * rng.standard_normal((HOUR_BUCKETS, TAG_GROUPS)),
        "ctx_tab_group": cfg.context_scale * rng.standard_normal((cfg.n_tabs, TAG_GROUPS)),
        "ctx_hour_vtype": 0.5 * cfg.context_scale * rng.standard_normal((HOUR_BUCKETS, n_vtypes)),
    }
    return users_out, items_out, arrays, activity
