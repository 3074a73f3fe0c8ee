"""Encoded tables of a dataset's splits and feature rows of arbitrary (user, item, time, context) pairs, in one
column layout: user, item, context, cross, history, privileged."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ...arrays import PAD
from ..batches import OOV, EncodedTable
from ..history import query_runs
from ..ids import IdIndex
from ..requests import request_start_ms
from ..schema import Dataset, DataValidationError
from .cross import CrossFeatureStore
from .encoder import FeatureEncoder

log = logging.getLogger(__name__)


class PairEncoder:
    """Feature rows for arbitrary (user, item, time, context) pairs, in the impressions' column layout minus
    the privileged columns. Encodes the user and item tables once; each call is a few gathers.

    users / items: the side tables (every user / item a query may name must be in them). The behaviour sequence
    (encoder.history_length > 0) comes from ``cross_store.history`` at the row's time and is coded by gathering
    the encoded item rows of the clicked items: training rows, rank-log pairs and served requests all take this one
    path.
    """

    def __init__(self, encoder: FeatureEncoder, cross_store: CrossFeatureStore | None,
                 users: pd.DataFrame, items: pd.DataFrame):
        encoder._fitted()
        if bool(encoder.cross_names_) != (cross_store is not None):
            raise ValueError("PairEncoder: the encoder was fitted "
                             + ("with" if encoder.cross_names_ else "without")
                             + " cross features but cross_store is " + ("None" if cross_store is None else "given"))
        if encoder.history_length and cross_store is None:
            raise ValueError("PairEncoder: the encoder has behaviour sequences (history_length > 0) but no "
                             "cross-feature store answers them")
        self.encoder, self.cross_store = encoder, cross_store
        uid = users["user_id"].to_numpy(np.int64)
        iid = items["item_id"].to_numpy(np.int64)
        uo, io = np.argsort(uid, kind="stable"), np.argsort(iid, kind="stable")
        self.user_ids_, self.item_ids_ = uid[uo], iid[io]
        self._user_index = IdIndex(self.user_ids_, "user_id", "encode_pairs")
        self._item_index = IdIndex(self.item_ids_, "item_id", "encode_pairs")
        ucat, unum = encoder.encode_users(users)
        icat, inum = encoder.encode_items(items)
        self.user_cat_, self.user_num_ = ucat[uo], unum[uo]
        self.item_cat_, self.item_num_ = icat[io], inum[io]
        self.spec = encoder.spec(privileged=False)
        item_cat_names = encoder.item_spec().cat_names
        self.history_length = encoder.history_length
        # the item table's codes of each history attribute, one column per attribute: int64 [I, A]
        self.history_codes_ = self.item_cat_[:, [item_cat_names.index(a) for a in encoder.history_attrs_]]

    def history_codes(self, items: np.ndarray) -> np.ndarray:
        """Codes of history item ids int64 [R, N] (PAD where empty) -> int64 [R, A * N], attribute-major as the
        history columns; PAD and items unknown to the item table give OOV 0 in every attribute."""
        r, n = items.shape
        pos, found = self._item_index.find(items)
        found &= items != PAD
        codes = np.where(found[:, :, None], self.history_codes_[pos], OOV)  # [R, N, A]
        return np.ascontiguousarray(codes.transpose(0, 2, 1)).reshape(r, -1)

    def encode_pairs(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray | int,
                     context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(cat int64 [N, C], num float32 [N, M]) laid out as ``self.spec``, every row its own request.

        user_ids, item_ids: int64 [N]; t_ms: [N] or a scalar (cross features use events strictly before it);
        context: context column name -> [N] array or a scalar (e.g. ``{"hour": 20, "tab": 1}``).
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        n = len(user_ids)
        return self._encode(user_ids, np.broadcast_to(np.asarray(t_ms, np.int64), (n,)),
                            self._context(context, n), item_ids, None)

    def encode_lists(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray | int,
                     context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(cat int64 [B*L, C], num float32 [B*L, M]) of B candidate lists, row b*L + j being (user_ids[b],
        item_ids[b, j]) at t_ms[b] in context b: the rows :meth:`encode_pairs` gives for the flattened pairs.

        user_ids: int64 [B]; item_ids: int64 [B, L]; t_ms: [B] or a scalar; context: name -> [B] array or a scalar.
        The user, context and per-user cross features are encoded once per request and gathered.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        b = len(user_ids)
        if item_ids.ndim != 2 or item_ids.shape[0] != b:
            raise ValueError(f"encode_lists: item_ids must be [B={b}, L], got shape {item_ids.shape}")
        request = np.repeat(np.arange(b), item_ids.shape[1])
        return self._encode(user_ids, np.broadcast_to(np.asarray(t_ms, np.int64), (b,)),
                            self._context(context, b), item_ids.reshape(-1), request)

    def _context(self, context: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """The encoder's context columns of ``context`` as arrays [n] (a scalar or one value is repeated)."""
        ctx = {}
        for c in self.encoder.columns_:
            if c["part"] == "context":
                if c["name"] not in context:
                    raise DataValidationError("encode_pairs: context has no column "
                                              f"{c['name']!r} (has {list(context)})")
                v = context[c["name"]]
                v = v.to_numpy() if isinstance(v, pd.Series) else np.asarray(v)
                if v.ndim == 0 or len(v) == 1:  # one value for every pair (e.g. one request at serving)
                    v = np.repeat(v.reshape(-1)[:1], n)
                if v.shape != (n,):
                    raise ValueError(f"encode_pairs: context {c['name']!r} has shape {v.shape}, expected ({n},)")
                ctx[c["name"]] = v
        return ctx

    def _encode(self, user_ids: np.ndarray, t_ms: np.ndarray, context: dict[str, np.ndarray], item_ids: np.ndarray,
                request: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of N pairs (user_ids[request[p]], item_ids[p]) at t_ms[request[p]] in context request[p]: user_ids,
        t_ms, context arrays [R] per request, item_ids and request int64 [N] (None: R = N, row p is request p).
        Request-level columns are encoded for the R requests and gathered into the rows."""
        r, n = len(user_ids), len(item_ids)
        upos = self._user_index.rows(user_ids)
        ipos = self._item_index.rows(item_ids)
        ccat, cnum = self.encoder.encode_context(context, n_rows=r)
        hcat = np.zeros((r, 0), np.int64)
        xnum = np.zeros((n, 0), np.float32)
        store, hl = self.cross_store, self.history_length
        if store is not None:
            if request is None and hl:  # rows are their own requests: what the stream's windowed store answers
                cross, hist = store.query_with_history(user_ids, item_ids, t_ms, hl)
            elif request is None:
                cross = store.query(user_ids, item_ids, t_ms)
            else:
                cross = store.query_requests(user_ids, t_ms, item_ids, request)
                hist = store.history(user_ids, t_ms, hl) if hl else None
            if hl:
                first, run = query_runs(user_ids, t_ms)  # code each request's sequence once
                hcat = self.history_codes(hist[first])[run]
            xnum = self.encoder.encode_cross(cross)
        u_rows = upos if request is None else upos[request]
        cat_parts = [(self.user_cat_, u_rows), (self.item_cat_, ipos), (ccat, request), (hcat, request)]
        num_parts = [(self.user_num_, u_rows), (self.item_num_, ipos), (cnum, request), (xnum, None)]
        return _gather_columns(cat_parts, n, np.int64), _gather_columns(num_parts, n, np.float32)


def _gather_columns(parts: list[tuple[np.ndarray, np.ndarray | None]], n: int, dtype) -> np.ndarray:
    """[n, sum of widths]: ``table[rows]`` of each (table, rows) side by side (rows None: the table as it is),
    gathered straight into the output (no per-part temporary and no concatenate copy)."""
    out = np.empty((n, sum(t.shape[1] for t, _ in parts)), dtype)
    at = 0
    for table, rows in parts:
        w = table.shape[1]
        if w:
            if rows is None:
                out[:, at:at + w] = table
            else:
                out[:, at:at + w] = table[rows]
        at += w
    return out


def build_encoded(dataset: Dataset, masks: Mapping[str, np.ndarray], encoder: FeatureEncoder,
                  cross_store: CrossFeatureStore | None, privileged: bool = True) -> dict[str, EncodedTable]:
    """One :class:`EncodedTable` per split of ``masks`` (bool [N] over ``dataset.impressions``).

    Columns: user, item, context, cross and history (at each row's request start time), then privileged columns if
    ``privileged``. label = click (float32). extra: ``position`` (int64) and the raw privileged columns
    (float32, NaN kept) when ``privileged``.
    """
    pairs = PairEncoder(encoder, cross_store, dataset.users, dataset.items)
    spec = encoder.spec(privileged=privileged)
    imp = dataset.impressions
    starts = request_start_ms(imp)
    priv_names = [c["name"] for c in encoder.columns_ if c["part"] == "privileged"]
    out = {}
    for part, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != (len(imp),):
            raise ValueError(f"build_encoded: mask {part!r} has shape {mask.shape}, expected ({len(imp)},)")
        sub = imp[mask]
        cat, num = pairs.encode_pairs(sub["user_id"].to_numpy(), sub["item_id"].to_numpy(), starts[mask], sub)
        extra: dict[str, np.ndarray] = {}
        if "position" in sub.columns:
            extra["position"] = sub["position"].to_numpy(np.int64)
        if privileged:
            pcat, pnum = encoder.encode_privileged(sub)
            cat = np.concatenate([cat, pcat], axis=1)
            num = np.concatenate([num, pnum], axis=1)
            for name in priv_names:
                extra[name] = sub[name].to_numpy(np.float32, na_value=np.nan)
        out[part] = EncodedTable(
            spec, np.ascontiguousarray(cat), np.ascontiguousarray(num),
            sub["click"].to_numpy(np.float32), sub["request_id"].to_numpy(np.int64),
            sub["user_id"].to_numpy(np.int64), sub["item_id"].to_numpy(np.int64),
            sub["time_ms"].to_numpy(np.int64), sub["is_rand"].to_numpy(np.int8), extra,
        )
        log.info("build_encoded: %s %d rows, cat %s, num %s", part, len(sub), cat.shape, num.shape)
    return out
