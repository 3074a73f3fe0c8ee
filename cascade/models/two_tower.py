"""Two-tower students: a user tower (user + context features, and optionally the user's recent clicks) and an
item tower (item features).

score(u, v) = <u, v> / temperature. With ``l2_normalize`` the embeddings lie on the unit sphere, so the inner
product is a cosine in [-1, 1] and the temperature sets how peaked a softmax over items is (0.05 turns a cosine
gap of 0.1 into a logit gap of 2). The towers are plain modules that return embeddings and hold no loss, so they
export unchanged for serving: the user tower answers queries, the item tower fills the FAISS inner-product
index. Dividing by a positive temperature does not change any top-k, so the index only needs the embeddings.

:class:`TowerInputs` carries the encoded side tables the students read (users, items, per-request context),
addressed by dense row index, with the id <-> row maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cascade.arrays import PAD
from cascade.config import at_least, finite, positive, require
from cascade.data.batches import FeatureSpec
from cascade.data.ids import IdIndex
from cascade.models.layers import MLP, FeatureEmbedding


@dataclass(frozen=True)
class TowerConfig:
    """Tower sizes and the score scale.

    emb_dim: width of every categorical embedding. hidden: MLP hidden sizes. out_dim: embedding size d.
    l2_normalize: unit-norm outputs. temperature: score divisor (> 0); with l2_normalize=False use 1.0 unless you
    mean to rescale raw inner products. learn_temperature: learn log(1/temperature) (initialised from
    ``temperature``, clamped so 1/temperature stays in [1, 100]). dropout: MLP dropout. history_length: the user
    tower also reads the user's last ``history_length`` distinct clicked items before the request, as the mean of
    their embeddings (its own table over the item-id vocabulary; YouTube DNN's "watch vector"); 0 = none.
    """

    emb_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 32
    l2_normalize: bool = True
    temperature: float = 0.05
    learn_temperature: bool = False
    dropout: float = 0.0
    history_length: int = 0

    def __post_init__(self) -> None:
        require(self, "emb_dim", at_least(self.emb_dim, 1), "must be an integer >= 1")
        require(self, "history_length", at_least(self.history_length, 0), "must be an integer >= 0")
        require(self, "out_dim", at_least(self.out_dim, 1), "must be an integer >= 1")
        require(self, "temperature", positive(self.temperature), "must be a finite number > 0")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        require(self, "hidden", all(h >= 1 for h in self.hidden), "every hidden size must be >= 1")
        require(self, "dropout", finite(self.dropout) and 0.0 <= self.dropout < 1.0, "must be in [0, 1)")


class _SideEncoder(nn.Module):
    """Embeds one encoded side table: (cat [B, C], num [B, M]) -> [B, C * emb_dim + M]; None when the spec is empty."""

    def __init__(self, spec: FeatureSpec, side: str, emb_dim: int) -> None:
        super().__init__()
        self.n_cat = len(spec.cat_index(side))
        self.n_num = len(spec.num_index(side))
        if len(spec.cat_names) != self.n_cat or len(spec.num_names) != self.n_num:
            raise ValueError(
                f"two-tower: the {side!r} spec has columns of other sides "
                f"({sorted(set(spec.cat_sides + spec.num_sides) - {side})}); pass spec.select({side!r})"
            )
        self.emb = FeatureEmbedding(spec, (side,), emb_dim, numeric="raw") if self.n_cat + self.n_num else None
        self.out_dim = self.n_cat * emb_dim + self.n_num

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        if self.emb is None:
            return num.new_zeros(num.shape[0], 0)
        fields, dense = self.emb(cat, num)  # [B, C, e], [B, M]
        return torch.cat([fields.flatten(1), dense], dim=1)


def _head(in_dim: int, cfg: TowerConfig) -> nn.Sequential:
    if in_dim == 0:
        raise ValueError("two-tower: a tower has no input columns")
    mlp = MLP(in_dim, cfg.hidden, dropout=cfg.dropout)
    return nn.Sequential(mlp, nn.Linear(mlp.out_dim, cfg.out_dim))


class UserTower(nn.Module):
    """User + context features (+ the user's recent clicks) -> user embedding.

    forward(user_cat [B, Cu] int64, user_num [B, Mu] f32, ctx_cat [B, Cc] int64, ctx_num [B, Mc] f32[, history
    [B, H] int64]) -> [B, d]. user_spec has side "user" only, ctx_spec side "context" only (either may be empty of
    columns, not both). history: codes of the item-id vocabulary (0 = no item), given exactly when
    cfg.history_length > 0; n_item_codes: that vocabulary's size (OOV 0 included).
    """

    def __init__(self, user_spec: FeatureSpec, ctx_spec: FeatureSpec, cfg: TowerConfig,
                 n_item_codes: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = _SideEncoder(user_spec, "user", cfg.emb_dim)
        self.ctx = _SideEncoder(ctx_spec, "context", cfg.emb_dim)
        self.history = None
        if cfg.history_length:
            if n_item_codes < 2:
                raise ValueError(f"UserTower: history_length = {cfg.history_length} needs the item-id vocabulary "
                                 f"(n_item_codes >= 2), got {n_item_codes}")
            # mean over the real items of the row; code 0 (no item / OOV) is left out, an empty row gives zeros
            self.history = nn.EmbeddingBag(n_item_codes, cfg.emb_dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.history.weight, std=0.01)
            with torch.no_grad():
                self.history.weight[0].zero_()
        self.head = _head(self.user.out_dim + self.ctx.out_dim + (cfg.emb_dim if self.history is not None else 0), cfg)

    def forward(self, user_cat: torch.Tensor, user_num: torch.Tensor, ctx_cat: torch.Tensor,
                ctx_num: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        b = user_cat.shape[0]
        if not (user_num.shape[0] == ctx_cat.shape[0] == ctx_num.shape[0] == b):
            raise ValueError(f"UserTower: batch sizes differ: {user_cat.shape}, {user_num.shape}, "
                             f"{ctx_cat.shape}, {ctx_num.shape}")
        parts = [self.user(user_cat, user_num), self.ctx(ctx_cat, ctx_num)]
        if (history is None) != (self.history is None):
            raise ValueError(f"UserTower: history_length is {self.cfg.history_length} but history is "
                             f"{'missing' if history is None else 'given'}")
        if self.history is not None:
            if history.shape != (b, self.cfg.history_length):
                raise ValueError(f"UserTower: history must be [{b}, {self.cfg.history_length}], got "
                                 f"{tuple(history.shape)}")
            parts.append(self.history(history))
        out = self.head(torch.cat(parts, dim=1))
        return F.normalize(out, dim=-1) if self.cfg.l2_normalize else out


class ItemTower(nn.Module):
    """Item features -> item embedding. forward(item_cat [N, Ci] int64, item_num [N, Mi] f32) -> [N, d]."""

    def __init__(self, item_spec: FeatureSpec, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = _SideEncoder(item_spec, "item", cfg.emb_dim)
        self.head = _head(self.item.out_dim, cfg)

    def forward(self, item_cat: torch.Tensor, item_num: torch.Tensor) -> torch.Tensor:
        out = self.head(self.item(item_cat, item_num))
        return F.normalize(out, dim=-1) if self.cfg.l2_normalize else out


class TwoTower(nn.Module):
    """The pair of towers plus the score scale. Holds no loss.

    score(u [B, d], v [B, L, d]) -> [B, L] (each request's own list) or score(u [B, d], v [N, d]) -> [B, N]
    (every request against the same N items): <u, v> / temperature.
    """

    def __init__(self, user_tower: UserTower, item_tower: ItemTower, cfg: TowerConfig) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.cfg = cfg
        inv_t = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.log_inv_temperature = nn.Parameter(inv_t)
        else:
            self.register_buffer("log_inv_temperature", inv_t)

    @property
    def inv_temperature(self) -> torch.Tensor:
        # clamp: a learned temperature that runs to 0 makes the softmax a hard max and the gradients explode.
        return self.log_inv_temperature.clamp(0.0, math.log(100.0)).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.inv_temperature.detach())

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if u.dim() != 2:
            raise ValueError(f"TwoTower.score: u must be [B, d], got {tuple(u.shape)}")
        if v.dim() == 3:
            if v.shape[0] != u.shape[0] or v.shape[2] != u.shape[1]:
                raise ValueError(f"TwoTower.score: v {tuple(v.shape)} does not match u {tuple(u.shape)}")
            s = torch.einsum("bd,bld->bl", u, v)
        elif v.dim() == 2:
            if v.shape[1] != u.shape[1]:
                raise ValueError(f"TwoTower.score: v {tuple(v.shape)} does not match u {tuple(u.shape)}")
            s = u @ v.T
        else:
            raise ValueError(f"TwoTower.score: v must be [B, L, d] or [N, d], got {tuple(v.shape)}")
        return s * self.inv_temperature


@torch.inference_mode()
def item_embeddings(item_tower: ItemTower, item_cat: np.ndarray | torch.Tensor, item_num: np.ndarray | torch.Tensor,
                    batch_size: int = 65536) -> np.ndarray:
    """Embed the whole corpus in chunks: item_cat [I, Ci], item_num [I, Mi] -> float32 [I, d] (row i = item row i).

    Runs in eval mode (no dropout) and restores the tower's training flag afterwards.
    """
    if batch_size <= 0:
        raise ValueError(f"item_embeddings: batch_size must be > 0, got {batch_size}")
    n = item_cat.shape[0]
    if item_num.shape[0] != n:
        raise ValueError(f"item_embeddings: item_cat has {n} rows but item_num has {item_num.shape[0]}")
    was_training = item_tower.training
    item_tower.eval()
    try:
        out = np.empty((n, item_tower.cfg.out_dim), dtype=np.float32)
        for s in range(0, n, batch_size):
            c = torch.as_tensor(item_cat[s:s + batch_size])
            x = torch.as_tensor(item_num[s:s + batch_size])
            out[s:s + batch_size] = item_tower(c, x).float().numpy()
    finally:
        item_tower.train(was_training)
    return out


@dataclass
class TowerInputs:
    """Encoded side tables for the towers, addressed by dense row index.

    user_cat int64 [U, Cu], user_num float32 [U, Mu] with user_spec (side "user"); item_cat [I, Ci], item_num
    [I, Mi] with item_spec (side "item"); ctx_cat [R, Cc], ctx_num [R, Mc] with ctx_spec (side "context"), one
    row per request. user_ids [U], item_ids [I], request_ids [R] (int64): row -> raw id; the reverse maps are
    :meth:`user_rows` / :meth:`item_rows` / :meth:`request_rows`. The request rows are the rows of the requests
    frame given to :func:`cascade.distill.ranklog.build_rank_log`, so rank-log request rows index ctx_cat.
    history int64 [R, H] or None: each request's recent clicked items as codes of the item-id vocabulary (0 = no
    item; :meth:`history_codes`), for a user tower with ``history_length`` H.
    """

    user_spec: FeatureSpec
    user_cat: np.ndarray
    user_num: np.ndarray
    item_spec: FeatureSpec
    item_cat: np.ndarray
    item_num: np.ndarray
    ctx_spec: FeatureSpec
    ctx_cat: np.ndarray
    ctx_num: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    request_ids: np.ndarray
    history: np.ndarray | None = None
    _index: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, cat, num, spec, ids in (
            ("user", self.user_cat, self.user_num, self.user_spec, self.user_ids),
            ("item", self.item_cat, self.item_num, self.item_spec, self.item_ids),
            ("context", self.ctx_cat, self.ctx_num, self.ctx_spec, self.request_ids),
        ):
            n = len(ids)
            if cat.shape != (n, len(spec.cat_names)) or num.shape != (n, len(spec.num_names)):
                raise ValueError(
                    f"TowerInputs: {name} arrays cat {cat.shape} / num {num.shape} do not match {n} ids and the "
                    f"spec's {len(spec.cat_names)} cat / {len(spec.num_names)} num columns"
                )
            if cat.dtype != np.int64 or num.dtype != np.float32:
                raise ValueError(f"TowerInputs: {name} cat must be int64 and num float32, got {cat.dtype}, {num.dtype}")
            self._index[name] = IdIndex(ids, "request_id" if name == "context" else f"{name}_id", "TowerInputs")
        if self.history is not None and (self.history.dtype != np.int64 or self.history.ndim != 2
                                         or len(self.history) != len(self.request_ids)):
            raise ValueError(f"TowerInputs: history must be int64 [{len(self.request_ids)}, H], got "
                             f"{self.history.dtype} {self.history.shape}")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Raw user ids [...] -> rows [...]; an unknown id raises DataValidationError."""
        return self._index["user"].rows(user_ids)

    def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        return self._index["item"].rows(item_ids)

    def request_rows(self, request_ids: np.ndarray) -> np.ndarray:
        return self._index["context"].rows(request_ids)

    @property
    def n_item_codes(self) -> int:
        """Size of the item-id vocabulary (OOV 0 included): what a user tower's history table needs."""
        return self.item_spec.cat_cardinality[self._item_id_column()]

    def _item_id_column(self) -> int:
        if "item_id" not in self.item_spec.cat_names:
            raise ValueError("TowerInputs: the item table has no categorical item_id column, so the user tower "
                             "cannot read a history of items (set tower.history_length = 0)")
        return self.item_spec.cat_names.index("item_id")

    def history_codes(self, item_ids: np.ndarray) -> np.ndarray:
        """Raw item ids int64 [R, H] (PAD where none) -> codes of the item-id vocabulary int64 [R, H] (0 for PAD
        and for items this table does not hold)."""
        pos, found = self._index["item"].find(item_ids)
        return np.where(found & (item_ids != PAD), self.item_cat[pos, self._item_id_column()], 0).astype(np.int64)

    def user_batch(self, user_rows: np.ndarray, request_rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Tensors for UserTower.forward: (user_cat [B, Cu], user_num [B, Mu], ctx_cat [B, Cc], ctx_num [B, Mc]),
        then history [B, H] when the inputs hold one."""
        out = (torch.from_numpy(self.user_cat[user_rows]), torch.from_numpy(self.user_num[user_rows]),
               torch.from_numpy(self.ctx_cat[request_rows]), torch.from_numpy(self.ctx_num[request_rows]))
        return out if self.history is None else (*out, torch.from_numpy(self.history[request_rows]))

    def item_batch(self, item_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors for ItemTower.forward: (item_cat [N, Ci], item_num [N, Mi])."""
        return torch.from_numpy(self.item_cat[item_rows]), torch.from_numpy(self.item_num[item_rows])


def build_two_tower(inputs: TowerInputs, cfg: TowerConfig, seed: int = 0) -> TwoTower:
    """A fresh TwoTower for ``inputs``' specs, initialised under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.history_length and (inputs.history is None or inputs.history.shape[1] != cfg.history_length):
            raise ValueError(f"build_two_tower: tower.history_length = {cfg.history_length} but the inputs hold "
                             f"{'no history' if inputs.history is None else f'{inputs.history.shape[1]} items'}")
        user = UserTower(inputs.user_spec, inputs.ctx_spec, cfg,
                         inputs.n_item_codes if cfg.history_length else 0)
        item = ItemTower(inputs.item_spec, cfg)
    return TwoTower(user, item, cfg)
