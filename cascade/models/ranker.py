"""The fine-ranking model: DNN, DeepFM and DCN-V2 backbones over user + item + context + cross features, and the
user's behaviour sequence through target attention.

One class serves the teacher, the PFD teacher (``sides`` adds "privileged") and the cheap rank student
(``RankerConfig(backbone="dnn", mlp=(64,), emb_dim=8)``). A model receives the FULL ``cat`` [B, C] / ``num``
[B, M] batch of an :class:`~cascade.data.batches.EncodedTable` and picks its columns by side.

Parts (TorchRec style): an embedding part (:class:`FeatureEmbedding`, optionally shared with another model), an
interaction part (FM or cross network), a dense part (MLP) and a one-unit output layer. ``forward_hidden``
also returns the representation that feeds the output layer, for the hint loss.

A model whose ``sides`` include "history" reads the behaviour sequence (the encoder's ``hist_<attr>_<j>`` columns)
through a DIN block (:mod:`cascade.models.sequence`): the history fields do not enter the input x themselves; the
candidate's own embeddings of the same attributes attend over them, and the pooled vector joins x as one more field
per attribute, so the FM, the cross network and the MLP all read it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from cascade.config import at_least, finite, require
from cascade.data.batches import FeatureSpec
from cascade.data.schema import SIDES
from cascade.models.layers import (
    MLP,
    NUMERIC_MODES,
    CrossNetV2,
    FactorizationMachine,
    FeatureEmbedding,
    in_autocast_dtype,
)
from cascade.models.sequence import TargetAttention
from cascade.threads import torch_threads

BACKBONES = ("dnn", "deepfm", "dcnv2")
CROSS_STRUCTURES = ("stacked", "parallel")


@dataclass(frozen=True)
class RankerConfig:
    """Hyper-parameters of a :class:`Ranker`.

    backbone: "dnn" (embeddings -> MLP), "deepfm" (first-order + FM + MLP logits summed), "dcnv2" (DCN-V2 cross
    network stacked before the MLP,
    or in parallel with it; cross_rank=r uses low-rank cross weights). sides: which feature sides the model reads.
    numeric: "linear" (numerics become fields x_j * v_j + b_j) or "raw" (numerics concatenated to the MLP input).
    sparse: sparse embedding gradients (pair with the "adagrad" optimizer). attention_mlp: hidden sizes of the
    target-attention score MLP (used when ``sides`` has "history" and the spec has history columns). exclude:
    columns on ``sides`` the model does not read (a name the spec lacks is an error when the model is built).
    """

    backbone: str = "dnn"
    emb_dim: int = 16
    mlp: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    batch_norm: bool = False
    cross_layers: int = 3
    cross_structure: str = "stacked"
    cross_rank: int | None = None
    sides: tuple[str, ...] = ("user", "item", "context", "cross")
    numeric: str = "linear"
    sparse: bool = False
    attention_mlp: tuple[int, ...] = (32,)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # tuples, not lists, so the config stays hashable and equal after a JSON round trip
        object.__setattr__(self, "mlp", tuple(int(h) for h in self.mlp))
        object.__setattr__(self, "sides", tuple(self.sides))
        object.__setattr__(self, "attention_mlp", tuple(int(h) for h in self.attention_mlp))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        require(self, "exclude", all(isinstance(n, str) and n for n in self.exclude)
                and len(set(self.exclude)) == len(self.exclude), "must be distinct column names")
        if not self.attention_mlp or min(self.attention_mlp) < 1:
            raise ValueError(f"RankerConfig: attention_mlp {self.attention_mlp} must be sizes >= 1, at least one")
        if self.backbone not in BACKBONES:
            raise ValueError(f"RankerConfig: backbone {self.backbone!r} is not one of {BACKBONES}")
        if self.cross_structure not in CROSS_STRUCTURES:
            raise ValueError(f"RankerConfig: cross_structure {self.cross_structure!r} is not one of {CROSS_STRUCTURES}")
        if self.numeric not in NUMERIC_MODES:
            raise ValueError(f"RankerConfig: numeric {self.numeric!r} is not one of {NUMERIC_MODES}")
        bad = [s for s in self.sides if s not in SIDES]
        if bad or not self.sides:
            raise ValueError(f"RankerConfig: sides {self.sides} must be a non-empty subset of {SIDES}")
        require(self, "cross_rank", self.cross_rank is None or at_least(self.cross_rank, 1),
                "must be an integer >= 1 or None")
        require(self, "emb_dim", at_least(self.emb_dim, 1), "must be an integer >= 1")
        require(self, "cross_layers", at_least(self.cross_layers, 1), "must be an integer >= 1")
        require(self, "mlp", all(h >= 1 for h in self.mlp), "every hidden size must be >= 1")
        require(self, "dropout", finite(self.dropout) and 0.0 <= self.dropout < 1.0, "must be in [0, 1)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp"], d["sides"], d["attention_mlp"] = list(self.mlp), list(self.sides), list(self.attention_mlp)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RankerConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class Ranker(nn.Module):
    """Click model over the columns of ``spec`` on ``cfg.sides``.

    embedding: an existing FeatureEmbedding to share (it must cover every column on cfg.sides and have
    cfg.emb_dim); None builds a private one. private_columns: categorical columns that get their own table in
    this model even when the embedding is shared (PFD's private student user-id table). seed: initialisation
    seed (the global torch RNG is left as it was).

    forward(cat [B, C] int64, num [B, M] float32) -> logits [B];
    forward_hidden(cat, num) -> (logits [B], hidden [B, hidden_dim]).

    With "history" in cfg.sides and history columns in the spec, ``attention`` is a :class:`TargetAttention` over
    D = A * emb_dim (A attributes); it needs the "item" side (the candidate's attributes are the query). A history
    position is padding where its first attribute (the item id) has code 0.
    """

    def __init__(self, spec: FeatureSpec, cfg: RankerConfig, embedding: FeatureEmbedding | None = None,
                 private_columns: Sequence[str] = (), seed: int = 0) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._build(spec, cfg, embedding, tuple(private_columns))

    def _build(self, spec: FeatureSpec, cfg: RankerConfig, embedding: FeatureEmbedding | None,
               private_columns: tuple[str, ...]) -> None:
        unknown = [n for n in cfg.exclude if n not in spec.cat_names + spec.num_names]
        if unknown:
            raise ValueError(f"Ranker: exclude names column(s) {unknown} that the data does not have; its columns: "
                             f"{list(spec.cat_names + spec.num_names)}")
        if embedding is None:
            embedding = FeatureEmbedding(spec, cfg.sides, cfg.emb_dim, numeric=cfg.numeric, sparse=cfg.sparse,
                                         exclude=cfg.exclude)
        elif embedding.emb_dim != cfg.emb_dim:
            raise ValueError(f"Ranker: shared embedding has dim {embedding.emb_dim} but cfg.emb_dim is {cfg.emb_dim}")
        self.embedding = embedding
        # positions of this model's fields / dense columns inside the (possibly larger, shared) embedding output
        side_of = dict(zip(spec.cat_names, spec.cat_sides)) | dict(zip(spec.num_names, spec.num_sides))

        def reads(n: str) -> bool:
            return side_of[n] in cfg.sides and n not in cfg.exclude

        wanted = [n for n in spec.cat_names + spec.num_names if reads(n)]
        have = set(embedding.cat_names + embedding.num_names)
        missing = [n for n in wanted if n not in have]
        if missing:
            raise ValueError(f"Ranker: the shared embedding lacks column(s) {missing} on sides {cfg.sides}")
        field_pos = [i for i, n in enumerate(embedding.field_names) if reads(n)]
        dense_names = embedding.num_names if embedding.numeric == "raw" else ()
        dense_pos = [i for i, n in enumerate(dense_names) if reads(n)]
        self.register_buffer("field_pos", torch.tensor(field_pos, dtype=torch.long), persistent=False)
        self.register_buffer("dense_pos", torch.tensor(dense_pos, dtype=torch.long), persistent=False)
        # a model that uses every field of the embedding (the teacher) skips the gather: it would only copy
        self._all_fields = field_pos == list(range(len(embedding.field_names)))
        self._all_dense = dense_pos == list(range(len(dense_names)))
        self.field_names = tuple(embedding.field_names[i] for i in field_pos)

        self.private_columns = private_columns
        self.private = nn.ModuleDict()
        private_slot = []
        for name in private_columns:
            if name not in spec.cat_names:
                raise ValueError(f"Ranker: private column {name!r} is not a categorical column of the spec")
            if name not in self.field_names:
                raise ValueError(f"Ranker: private column {name!r} is not on this model's sides {cfg.sides}")
            j = spec.cat_names.index(name)
            emb = nn.Embedding(spec.cat_cardinality[j], cfg.emb_dim, sparse=cfg.sparse)
            nn.init.normal_(emb.weight, std=0.01)
            self.private[name] = emb
            private_slot.append((self.field_names.index(name), j))
        self._private_slot = tuple(private_slot)
        self.attention = None
        self._build_history(spec, cfg)

        n_fields, d = len(self._flat_slots) + self.n_history_attrs, cfg.emb_dim
        in_dim = n_fields * d + len(dense_pos)
        if in_dim == 0:
            raise ValueError(f"Ranker: no input column on sides {cfg.sides}")
        self.in_dim = in_dim
        self.fm = None
        self.first_order = None
        self.cross = None
        if cfg.backbone == "deepfm":
            self.fm = FactorizationMachine()
            # first-order term: a 1-d embedding per feature value (+ numeric weights); its own table, never shared
            # (the behaviour sequence enters through attention only: a first-order weight per clicked item would
            # count the padding)
            self.first_order = FeatureEmbedding(spec, [s for s in cfg.sides if s != "history"], 1, numeric="linear",
                                                sparse=cfg.sparse, exclude=cfg.exclude)
        if cfg.backbone == "dcnv2":
            self.cross = CrossNetV2(in_dim, cfg.cross_layers, cfg.cross_rank)
        mlp_in = in_dim
        self.mlp = MLP(mlp_in, cfg.mlp, cfg.dropout, cfg.batch_norm)
        parallel_cross = cfg.backbone == "dcnv2" and cfg.cross_structure == "parallel"
        self.hidden_dim = self.mlp.out_dim + (in_dim if parallel_cross else 0)
        self.out = nn.Linear(self.hidden_dim, 1)

    def _build_history(self, spec: FeatureSpec, cfg: RankerConfig) -> None:
        """Slots of the behaviour sequence among this model's fields, and the attention block (none without it).

        ``_flat_slots``: the fields that enter x directly; ``_hist_slots`` [N * A]: the history fields in (position,
        attribute) order, so that a view [B, N, A * d] holds one key per position; ``_query_slots`` [A]: the
        candidate's fields of the same attributes; ``_mask_cols`` [N]: the spec columns of the first attribute."""
        hist = [i for i, n in enumerate(self.field_names)
                if n in spec.cat_names and spec.cat_sides[spec.cat_names.index(n)] == "history"]
        self.n_history_attrs = 0
        flat = [i for i in range(len(self.field_names)) if i not in set(hist)]
        self.register_buffer("_flat_slots", torch.tensor(flat, dtype=torch.long), persistent=False)
        self._all_flat = not hist
        if "history" in cfg.sides and not hist:
            raise ValueError("Ranker: sides name \"history\" but the spec has no history column (an encoder fitted "
                             "with history_length = 0): the sequence option would do nothing")
        if not hist:
            return
        cols = [spec.cat_names.index(self.field_names[i]) for i in hist]
        attrs = list(dict.fromkeys(spec.table_of(j) for j in cols))
        per_attr = {a: [i for i, j in zip(hist, cols) if spec.table_of(j) == a] for a in attrs}
        n = len(per_attr[attrs[0]])
        if any(len(v) != n for v in per_attr.values()):
            raise ValueError(f"Ranker: history attributes {attrs} have different lengths "
                             f"{[len(v) for v in per_attr.values()]}")
        missing = [a for a in attrs if a not in self.field_names]
        if missing:
            raise ValueError(f"Ranker: the history side needs the candidate's own column(s) {missing} (the attention "
                             f"query) among its fields; sides {cfg.sides}")
        shared = sorted(set(attrs) & set(self.private_columns))
        if shared:
            raise ValueError(f"Ranker: private column(s) {shared} are read by the history columns too")
        slots = [per_attr[a][j] for j in range(n) for a in attrs]  # (position, attribute) order
        self.register_buffer("_hist_slots", torch.tensor(slots, dtype=torch.long), persistent=False)
        self.register_buffer("_query_slots", torch.tensor([self.field_names.index(a) for a in attrs],
                                                          dtype=torch.long), persistent=False)
        mask_cols = [spec.cat_names.index(self.field_names[i]) for i in per_attr[attrs[0]]]
        self.register_buffer("_mask_cols", torch.tensor(mask_cols, dtype=torch.long), persistent=False)
        self.n_history_attrs, self.history_length = len(attrs), n
        self.attention = TargetAttention(len(attrs) * cfg.emb_dim, cfg.attention_mlp)

    def attend(self, cat: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """This model's fields [B, F, d] -> the fields x is made of [B, F_flat + A, d]: the flat fields, then the
        attention-pooled history, one field per attribute."""
        if self.attention is None:
            return fields
        b, d = fields.shape[0], fields.shape[2]
        keys = fields.index_select(1, self._hist_slots).reshape(b, self.history_length, -1)  # [B, N, A * d]
        query = fields.index_select(1, self._query_slots).reshape(b, 1, -1)  # [B, 1, A * d]
        mask = cat.index_select(1, self._mask_cols) != 0  # [B, N]
        pooled = self.attention(query, keys, mask).view(b, self.n_history_attrs, d)
        return torch.cat([fields.index_select(1, self._flat_slots), pooled], dim=1)

    def embed(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This model's inputs: (fields [B, F, d], dense [B, M_raw]) from the shared / own embedding."""
        return self.select(*self.embedding(cat, num))

    def select(self, fields_all: torch.Tensor, dense_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This model's fields / dense columns of the (possibly shared, wider) embedding's output; a model that
        reads all of them (the teacher) skips the gather, which would only copy."""
        fields = fields_all if self._all_fields else fields_all.index_select(1, self.field_pos)
        dense = dense_all if self._all_dense else dense_all.index_select(1, self.dense_pos)
        return fields, dense

    def head(self, cat: torch.Tensor, num: torch.Tensor, fields: torch.Tensor,
             dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interaction + dense parts on given embeddings -> (logits [B], hidden [B, hidden_dim]).

        ``cat`` is still needed for the private tables and DeepFM's first-order term.
        """
        if self._private_slot:
            fields = fields.clone()
            for (slot, col), emb in zip(self._private_slot, self.private.values()):
                codes = cat[:, col]
                codes = torch.where((codes >= 0) & (codes < emb.num_embeddings), codes, torch.zeros_like(codes))
                fields[:, slot] = emb(codes)
        fields = self.attend(cat, fields)
        x = torch.cat([fields.flatten(1), dense], dim=1) if dense.shape[1] else fields.flatten(1)
        cfg = self.cfg
        if cfg.backbone == "dnn":
            hidden = self.mlp(x)
            logit = self.out(hidden).squeeze(-1)
        elif cfg.backbone == "deepfm":
            hidden = self.mlp(x)
            first, _ = self.first_order(cat, num)
            logit = self.out(hidden).squeeze(-1) + self.fm(fields) + first.sum(dim=(1, 2))
        else:  # dcnv2
            if cfg.cross_structure == "stacked":
                hidden = self.mlp(self.cross(x))
            else:
                hidden = torch.cat([self.cross(x), self.mlp(x)], dim=1)
            logit = self.out(hidden).squeeze(-1)
        # float32 logits even under bfloat16 autocast (TrainConfig.autocast), so every loss on them runs in float32
        return logit.float(), hidden

    def forward_hidden(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fields, dense = self.embed(cat, num)
        return self.head(cat, num, fields, dense)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden(cat, num)[0]

    def standalone(self) -> Ranker:
        """This model with its own embedding holding exactly the rows it reads from a shared (possibly wider) one,
        a private column's table taking the place of that column's rows: the layout ``Ranker(spec, cfg)`` has, so
        it saves and loads like any Ranker, with the same logits. What joint / PFD training saves and serves."""
        out = Ranker(self.spec, self.cfg)
        src, dst = self.embedding, out.embedding
        with torch.no_grad():
            if dst.table is not None:
                src_off = dict(zip(src.cat_names, src.offsets.tolist()))
                for name, off, card in zip(dst.cat_names, dst.offsets.tolist(), dst.cards.tolist()):
                    rows = (self.private[name].weight if name in self.private
                            else src.table.weight[src_off[name]:src_off[name] + card])
                    dst.table.weight[off:off + card] = rows
            if dst.num_weight is not None:
                idx = torch.tensor([src.num_names.index(n) for n in dst.num_names], dtype=torch.long)
                dst.num_weight.copy_(src.num_weight.index_select(0, idx))
                dst.num_bias.copy_(src.num_bias.index_select(0, idx))
        head = {k: v for k, v in self.state_dict().items() if not k.startswith(("embedding.", "private."))}
        result = out.load_state_dict(head, strict=False)
        if result.unexpected_keys or any(not k.startswith("embedding.") for k in result.missing_keys):
            raise RuntimeError(f"Ranker.standalone: state mismatch {result}")
        return out.train(self.training)

    REQUEST_SIDES = ("user", "context")

    def supports_lists(self) -> bool:
        """Whether :meth:`forward_lists` factors the request-level work out (DNN and DCN-V2 without private tables
        or raw numerics); otherwise it computes ``forward`` on the rows as they are."""
        return (self.cfg.backbone in ("dnn", "dcnv2") and len(self.cfg.mlp) > 0 and not self._private_slot
                and len(self.dense_pos) == 0 and not self.training)

    def _list_layout(self):
        """(cat_pos, num_pos) of the request-level and of the pair-level fields in the embedding, ``perm``: the
        columns of ``x`` reordered as [request-level fields, pair-level fields (the pooled history last)], the width
        of the request-level part, and the embedding's cat positions of the history keys and of the attention query.
        Cached: it depends on the spec only."""
        layout = getattr(self, "_layout", None)
        if layout is None or layout[0].device != self.field_pos.device:
            side_of = dict(zip(self.spec.cat_names, self.spec.cat_sides)) | dict(zip(self.spec.num_names,
                                                                                     self.spec.num_sides))
            emb, d = self.embedding, self.cfg.emb_dim
            n_cat = len(emb.cat_names)
            field_pos = self.field_pos.tolist()
            flat = self._flat_slots.tolist()
            # is request-level -> (cat_pos, num_pos, x fields of cat columns, x fields of numeric columns)
            groups = {True: ([], [], [], []), False: ([], [], [], [])}
            for xi, slot in enumerate(flat):
                pos = field_pos[slot]
                g = groups[side_of[self.field_names[slot]] in self.REQUEST_SIDES]
                if pos < n_cat:
                    g[0].append(pos)
                    g[2].append(xi)
                else:
                    g[1].append(pos - n_cat)
                    g[3].append(xi)
            # embed_columns returns categorical fields first: order each group's x columns the same way; the pooled
            # history fields (x fields after the flat ones) are pair-level, appended after the embedded ones
            pooled = list(range(len(flat), len(flat) + self.n_history_attrs))
            ordered = groups[True][2] + groups[True][3] + groups[False][2] + groups[False][3] + pooled
            cols = [f * d + k for f in ordered for k in range(d)]
            hist = [field_pos[i] for i in self._hist_slots.tolist()] if self.attention is not None else []
            query = [field_pos[i] for i in self._query_slots.tolist()] if self.attention is not None else []
            with torch.inference_mode(False):  # normal tensors: the cache outlives the first call's mode
                def t(v):
                    return torch.tensor(v, dtype=torch.long, device=self.field_pos.device)

                self._layout = (t(groups[True][0]), t(groups[True][1]), t(groups[False][0]), t(groups[False][1]),
                                t(cols), (len(groups[True][2]) + len(groups[True][3])) * d, t(hist), t(query))
        return self._layout

    def forward_lists(self, cat: torch.Tensor, num: torch.Tensor, list_len: int) -> torch.Tensor:
        """Logits [N] of rows grouped in consecutive blocks of ``list_len`` that share one request (the same user
        and context columns: a candidate list). Equal to ``forward(cat, num)`` up to float rounding.

        Candidate scoring spends most of its time on columns that are the same for every candidate of a request:
        62% of the default teacher's input fields are user or context fields. Here they are embedded once per
        request, and their share of the first linear maps (the first cross layer's projection; the MLP's first
        layer where it reads the embeddings: DNN, parallel DCN-V2) is computed once per request and broadcast
        over the list; only item, cross and privileged
        fields are embedded and multiplied per (request, candidate) pair. The behaviour sequence (request-level)
        is embedded once per request and its keys' share of the attention MLP computed once per position; only the
        candidate's query and the pooled vector are per pair. Needs eval mode; a model that
        :meth:`supports_lists` does not cover is scored by ``forward``.
        """
        n = cat.shape[0]
        if list_len < 1 or n % list_len:
            raise ValueError(f"forward_lists: {n} rows are not whole lists of {list_len}")
        if not self.supports_lists():
            return self.forward(cat, num)
        r = n // list_len
        rc, rn, pc, pn, perm, dr, hc, qc = self._list_layout()
        cache = self.__dict__.setdefault("_perm_cache", {})
        grad = torch.is_grad_enabled()

        def permuted(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            """Parameter ``t`` with the x-columns of ``dims`` in the permuted order; cached between calls while the
            parameter is unchanged (its version counter) and no gradient is needed: scoring calls this method
            once per 4,096 rows, and re-gathering the weights cost ~5% of it."""
            key = (id(t), dims)
            hit = cache.get(key)
            if not grad and hit is not None and hit[0] is t and hit[1] == t._version:
                return hit[2]
            out = t
            for dim in dims:
                out = out.index_select(dim, perm)
            if not grad:
                cache[key] = (t, t._version, out)
            return out
        x_req = self.embedding.embed_columns(cat[::list_len], num[::list_len], rc, rn).flatten(1)  # [R, Dr]
        x_pair = self.embedding.embed_columns(cat, num, pc, pn).flatten(1)  # [N, Dp]
        if self.attention is not None:
            none = hc[:0]
            req_cat = cat[::list_len]
            keys = self.embedding.embed_columns(req_cat, num[::list_len], hc, none).reshape(r, self.history_length, -1)
            query = self.embedding.embed_columns(cat, num, qc, none).reshape(r, list_len, -1)
            pooled = self.attention(query, keys, req_cat.index_select(1, self._mask_cols) != 0)  # [R, L, A * d]
            x_pair = torch.cat([x_pair, pooled.reshape(n, -1)], dim=1)
        # under autocast both parts are cast once here: the first linear maps and x0 below read them
        x_req, x_pair = in_autocast_dtype(x_req), in_autocast_dtype(x_pair)

        def first_linear(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            """w [H, in_dim] (columns already permuted) applied to [x_req, x_pair] -> [N, H] without building x."""
            h_req = x_req @ w[:, :dr].T
            if b is not None:
                h_req = h_req + b
            h = (x_pair @ w[:, dr:].T).view(r, list_len, -1)
            h += h_req[:, None, :]
            return h.view(n, -1)

        cfg = self.cfg
        if cfg.backbone == "dnn":
            lin = self.mlp.net[0]
            return self.out(self.mlp.net[1:](first_linear(permuted(lin.weight, (1,)), lin.bias))).squeeze(-1)
        # DCN-V2 in the permuted column order: the cross layers are elementwise in x0, so permuting their weights
        # computes the same function on the permuted input
        x0 = torch.cat([x_req[:, None, :].expand(r, list_len, dr), x_pair.view(r, list_len, -1)], dim=2).view(n, -1)
        x = x0
        for i, layer in enumerate(self.cross.layers):
            if self.cross.rank is None:
                w, b = permuted(layer.weight, (0, 1)), permuted(layer.bias, (0,))
                y = first_linear(w, b) if i == 0 else torch.addmm(b, x, w.T)
            else:
                u, v = permuted(layer[0].weight, (1,)), layer[1]
                z = first_linear(u, None) if i == 0 else x @ u.T
                y = torch.addmm(permuted(v.bias, (0,)), z, permuted(v.weight, (0,)).T)
            # without autograd, x + x0 * y is computed inside y, the fresh [N, in_dim] output of addmm: an
            # out-of-place addcmul first copies x into a new buffer (19% of the scoring time in a profile)
            x = y.mul_(x0).add_(x) if not torch.is_grad_enabled() else torch.addcmul(x, x0, y)
        w_out = self.out.weight  # [1, hidden_dim]
        if cfg.cross_structure == "stacked":
            lin = self.mlp.net[0]
            h = torch.addmm(lin.bias, x, permuted(lin.weight, (1,)).T)
            return self.out(self.mlp.net[1:](h)).squeeze(-1)
        lin = self.mlp.net[0]
        hidden_mlp = self.mlp.net[1:](first_linear(permuted(lin.weight, (1,)), lin.bias))
        d_in = self.in_dim
        logit = x @ w_out[:, :d_in].index_select(1, perm).T + hidden_mlp @ w_out[:, d_in:].T + self.out.bias
        return logit.squeeze(-1)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (a shared module counted once)."""
    return sum(p.numel() for p in model.parameters())


def serving_latency(model: nn.Module, spec: FeatureSpec | None = None, n_candidates: int = 100,
                    repeats: int = 50, warmup: int = 5, seed: int = 0) -> float:
    """Median wall time in ms to score ``n_candidates`` rows in one forward pass (torch.inference_mode, 1 thread).

    spec: the column layout of the random inputs; defaults to ``model.spec``. Inputs are drawn uniformly from
    each column's vocabulary (seeded), numerics standard normal.
    """
    spec = spec if spec is not None else getattr(model, "spec", None)
    if spec is None:
        raise ValueError("serving_latency: pass spec= for a model without a .spec attribute")
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, max(c, 1), n_candidates) for c in spec.cat_cardinality], axis=1) \
        if spec.cat_names else np.zeros((n_candidates, 0), np.int64)
    num = rng.standard_normal((n_candidates, len(spec.num_names))).astype(np.float32)
    device = next(model.parameters()).device
    cat_t = torch.as_tensor(cat, dtype=torch.long, device=device)
    num_t = torch.as_tensor(num, device=device)
    was_training = model.training
    model.eval()
    try:
        times = []
        with torch.inference_mode(), torch_threads(1):
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(cat_t, num_t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return float(np.median(times) * 1e3)
