"""Target attention over a behaviour sequence (DIN, Zhou et al. KDD 2018): the candidate item asks which of the
user's recently clicked items speak for it.

A ranker that reads the "history" side gets, per row, the embeddings of the user's last N clicked items (each the
concatenation of its attributes' embeddings: item id, tag, author; looked up in the candidate's own tables) and the
candidate's embeddings of the same attributes. :class:`TargetAttention` scores each history position with a small
MLP over ``[q, k, q - k, q * k]`` (DIN's activation unit, with the outer product replaced by the elementwise one as
in the released code) and pools the keys with those weights.

Weights: a softmax over the unmasked positions (the padding of a short history, and clicked items unknown to the
vocabulary, are masked), so they sum to 1 and a masked position weighs exactly 0; a row with no unmasked position
pools to the zero vector. (DIN leaves the weights unnormalised to keep the intensity of an interest; here the pooled
vector's scale stays that of one item embedding whatever the history length, which keeps the cross network and
MLP that read it well conditioned; how much history there is stays visible to the ranker through the cross
features' user click counts.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TargetAttention(nn.Module):
    """DIN attention pooling. dim: D, the width of a query / key (attributes x embedding dim); hidden: the score
    MLP's hidden sizes (ReLU), at least one.

    forward(query [R, L, D], keys [R, N, D], mask bool [R, N]) -> pooled [R, L, D]: L candidates per sequence
    (L = 1: one row per sequence; a candidate list shares its request's sequence without copying it).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (32,)) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"TargetAttention: dim ({dim}) and hidden sizes {hidden} must be >= 1, hidden non-empty")
        self.dim = dim
        self.first = nn.Linear(4 * dim, hidden[0])  # over [q, k, q - k, q * k]
        rest: list[nn.Module] = []
        for a, b in zip(hidden[:-1], hidden[1:]):
            rest += [nn.Linear(a, b), nn.ReLU()]
        self.rest = nn.Sequential(*rest)
        self.score = nn.Linear(hidden[-1], 1)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Unmasked attention scores [R, L, N]. The first layer is applied to its four input blocks separately
        (W [q, k, q - k, q * k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k)), so the query part is computed
        once per candidate and the key part once per sequence position, never per (candidate, position)."""
        d = self.dim
        w = self.first.weight  # [H, 4D]
        w_q, w_k, w_d, w_p = w[:, :d], w[:, d:2 * d], w[:, 2 * d:3 * d], w[:, 3 * d:]
        h_q = torch.addmm(self.first.bias, query.reshape(-1, d), (w_q + w_d).T).view(*query.shape[:2], 1, -1)
        h_k = (keys.reshape(-1, d) @ (w_k - w_d).T).view(keys.shape[0], 1, keys.shape[1], -1)
        h_p = (query[:, :, None, :] * keys[:, None, :, :]) @ w_p.T  # [R, L, N, H]
        h = self.rest(torch.relu(h_p + h_q + h_k))
        return self.score(h).squeeze(-1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r, n, d = keys.shape
        if query.dim() != 3 or query.shape[0] != r or query.shape[2] != d or mask.shape != (r, n):
            raise ValueError(f"TargetAttention: query {tuple(query.shape)}, keys {tuple(keys.shape)} and mask "
                             f"{tuple(mask.shape)} do not fit [R, L, D], [R, N, D], [R, N]")
        s = self.scores(query, keys).float()
        m = mask[:, None, :]
        # a masked score is the lowest float: exp() makes it exactly 0 beside any unmasked one; a row with none left
        # gets uniform weights that the mask then zeroes
        w = torch.softmax(s.masked_fill(~m, torch.finfo(s.dtype).min), dim=-1) * m
        return torch.bmm(w.to(keys.dtype), keys)
