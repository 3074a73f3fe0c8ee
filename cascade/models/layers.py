"""Building blocks of the ranking models: feature embeddings, MLP, factorization machine, DCN-V2 cross network.

All layers are loss-free and return tensors; shapes are given in the docstrings (B = batch, F = fields, d =
embedding dim).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cascade.data.batches import FeatureSpec

NUMERIC_MODES = ("linear", "raw")


class FeatureEmbedding(nn.Module):
    """Embeds the columns of ``spec`` whose side is in ``sides``.

    The model always receives the FULL ``cat`` [B, C] / ``num`` [B, M] batch and this layer picks its columns with
    index buffers, so one encoded table serves the teacher, the PFD teacher and the student.

    Categorical columns share ONE concatenated table with per-column offsets (one gather for all fields is
    faster than C small embedding calls). Index 0 of every column is OOV / padding; each column keeps its own
    OOV row (offset + 0), so an unseen user and an unseen item do not share a vector. A column that reads another
    column's table (``spec.cat_shares``: the behaviour sequence's ``hist_item_id_j`` read ``item_id``) gets that
    column's offset, not rows of its own; the shared table is there even when its column is not on ``sides``.

    numeric: "linear" turns numeric column j into a field vector x_j * v_j + b_j (the DeepFM way, so FM / cross
    layers see numerics as fields); "raw" passes the numerics through untouched as ``dense``. ``exclude``: columns on
    ``sides`` left out (no table rows, no field).
    sparse=True gives sparse gradients (use with Adagrad; AdamW does not accept them).

    forward(cat, num) -> (fields [B, F, d], dense [B, M_raw]); F = n_cat + (n_num if numeric == "linear").
    """

    def __init__(self, spec: FeatureSpec, sides: Sequence[str], emb_dim: int, numeric: str = "linear",
                 sparse: bool = False, init_std: float = 0.01, exclude: Sequence[str] = ()) -> None:
        super().__init__()
        if numeric not in NUMERIC_MODES:
            raise ValueError(f"FeatureEmbedding: numeric={numeric!r} is not one of {NUMERIC_MODES}")
        if emb_dim <= 0:
            raise ValueError(f"FeatureEmbedding: emb_dim must be > 0, got {emb_dim}")
        self.spec = spec
        self.sides = tuple(sides)
        self.emb_dim = emb_dim
        self.numeric = numeric
        self.exclude = tuple(exclude)
        cat_idx = [j for j in spec.cat_index(*self.sides) if spec.cat_names[j] not in self.exclude]
        num_idx = [j for j in spec.num_index(*self.sides) if spec.num_names[j] not in self.exclude]
        if not cat_idx and not num_idx:
            raise ValueError(f"FeatureEmbedding: the spec has no column on sides {self.sides}"
                             + (f" outside {list(self.exclude)}" if self.exclude else ""))
        self.cat_names = tuple(spec.cat_names[j] for j in cat_idx)
        self.num_names = tuple(spec.num_names[j] for j in num_idx)
        cards = [spec.cat_cardinality[j] for j in cat_idx]
        for name, c in zip(self.cat_names, cards):
            if c < 1:
                raise ValueError(f"FeatureEmbedding: column {name!r} has cardinality {c} (needs >= 1, OOV included)")
        # one block of rows per table, in order of first use: a column's own, or the one it shares
        self.table_names = tuple(dict.fromkeys(spec.table_of(j) for j in cat_idx))
        table_card = {}
        for j, c in zip(cat_idx, cards):
            t = spec.table_of(j)
            if table_card.setdefault(t, c) != c:
                raise ValueError(f"FeatureEmbedding: column {spec.cat_names[j]!r} reads table {t!r} of cardinality "
                                 f"{table_card[t]} but has cardinality {c}")
        start, block = 0, {}
        for t in self.table_names:
            block[t] = start
            start += table_card[t]
        offsets = [block[spec.table_of(j)] for j in cat_idx]
        self.register_buffer("cat_idx", torch.tensor(cat_idx, dtype=torch.long), persistent=False)
        self.register_buffer("num_idx", torch.tensor(num_idx, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("cards", torch.tensor(cards, dtype=torch.long), persistent=False)
        self._all_cat = list(cat_idx) == list(range(len(spec.cat_names)))  # every column: no gather needed
        self.table = nn.Embedding(max(start, 1), emb_dim, sparse=sparse) if cat_idx else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=init_std)
        n_num = len(num_idx)
        if numeric == "linear" and n_num:
            self.num_weight = nn.Parameter(torch.randn(n_num, emb_dim) * init_std)
            self.num_bias = nn.Parameter(torch.zeros(n_num, emb_dim))
        else:
            self.num_weight = None
            self.num_bias = None

    @property
    def n_fields(self) -> int:
        return len(self.cat_names) + (len(self.num_names) if self.numeric == "linear" else 0)

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.cat_names + (self.num_names if self.numeric == "linear" else ())

    @property
    def dense_dim(self) -> int:
        return len(self.num_names) if self.numeric == "raw" else 0

    def cat_codes(self, cat: torch.Tensor) -> torch.Tensor:
        """Rows of the concatenated table for this layer's columns: int64 [B, n_cat].

        A code outside [0, cardinality) is mapped to the column's OOV row 0 instead of reading a neighbouring
        column's rows.
        """
        x = cat if self._all_cat else cat.index_select(1, self.cat_idx)
        x = torch.where((x >= 0) & (x < self.cards), x + self.offsets, self.offsets)
        return x

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = cat.shape[0]
        parts = []
        if self.table is not None:
            parts.append(self.table(self.cat_codes(cat)))  # [B, n_cat, d]
        x_num = num.index_select(1, self.num_idx)  # [B, n_num]
        if self.num_weight is not None:
            parts.append(torch.addcmul(self.num_bias, x_num.unsqueeze(-1), self.num_weight))  # [B, n_num, d]: b + x*v
        fields = torch.cat(parts, dim=1) if parts else num.new_zeros(b, 0, self.emb_dim)
        dense = x_num if self.numeric == "raw" else num.new_zeros(b, 0)
        return fields, dense

    def embed_columns(self, cat: torch.Tensor, num: torch.Tensor, cat_pos: torch.Tensor,
                      num_pos: torch.Tensor) -> torch.Tensor:
        """Fields of a subset of this layer's columns: [B, len(cat_pos) + len(num_pos), d], categorical first.

        cat_pos / num_pos: int64 positions among this layer's own categorical / numeric columns (``cat_names`` /
        ``num_names``), in the order wanted. Same values as the matching fields of ``forward`` (numeric "linear").
        """
        parts = []
        if len(cat_pos):
            x = cat.index_select(1, self.cat_idx.index_select(0, cat_pos))
            off = self.offsets.index_select(0, cat_pos)
            x = torch.where((x >= 0) & (x < self.cards.index_select(0, cat_pos)), x + off, off)
            parts.append(self.table(x))
        if len(num_pos):
            if self.num_weight is None:
                raise ValueError("FeatureEmbedding.embed_columns: numeric fields need numeric='linear'")
            x_num = num.index_select(1, self.num_idx.index_select(0, num_pos))
            parts.append(torch.addcmul(self.num_bias.index_select(0, num_pos), x_num.unsqueeze(-1),
                                       self.num_weight.index_select(0, num_pos)))
        if not parts:
            return num.new_zeros(cat.shape[0], 0, self.emb_dim)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class MLP(nn.Module):
    """Linear -> (BatchNorm) -> ReLU -> (Dropout) per hidden layer. x [B, in_dim] -> [B, out_dim].

    out_dim is hidden[-1], or in_dim when ``hidden`` is empty (identity).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            if h <= 0:
                raise ValueError(f"MLP: hidden sizes must be > 0, got {tuple(hidden)}")
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FactorizationMachine(nn.Module):
    """Second-order FM interaction: fields [B, F, d] -> [B].

    sum_{i<j} <v_i, v_j> = 0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2), computed in O(F d).
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        s = fields.sum(dim=1)
        return 0.5 * (s.pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype of its device when autocast is on there, else ``x``.

    The cross layers' update x0 * y + x multiplies x0 with the low-precision y that autocast makes: a float32 x0
    made every update convert [B, in_dim] on the fly (those copies were 29% of a bf16 scoring forward of the
    default teacher) and kept x, and its gradient, in float32 between bf16 GEMMs. x0 cast once removes them:
    ~1.3x the scoring forward, ~1.2x a training step."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


class CrossNetV2(nn.Module):
    """DCN-V2 cross layers: x_{l+1} = x0 * (W_l x_l + b_l) + x_l.  x0 [B, in_dim] -> [B, in_dim].

    rank=None: full-rank W_l (in_dim^2 weights per layer). rank=r: the paper's low-rank form W_l = U_l V_l^T
    (2 * in_dim * r weights), much cheaper when many fields make in_dim large.
    """

    def __init__(self, in_dim: int, n_layers: int, rank: int | None = None) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"CrossNetV2: n_layers must be >= 1, got {n_layers}")
        if rank is not None and rank < 1:
            raise ValueError(f"CrossNetV2: rank must be >= 1 or None, got {rank}")
        if rank is None:
            self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(n_layers))
        else:
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, in_dim))
                                        for _ in range(n_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.bias if rank is None else layer[1].bias)
        self.in_dim, self.rank = in_dim, rank

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0 = in_autocast_dtype(x0)
        grad = torch.is_grad_enabled()
        for layer in self.layers:
            y = layer(x)
            # x + x0 * y; without autograd it is computed inside y (a fresh buffer): no copy, no allocation
            x = torch.addcmul(x, x0, y) if grad else y.mul_(x0).add_(x)
        return x
