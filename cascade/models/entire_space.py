"""An entire-space ranker: how likely a user clicks an item among ALL items, not only among those shown.

A click model trained on impressions learns P(click | shown); asked to order the whole corpus it extrapolates to
items it never saw shown and, on rated logs, ranks the same universally liked items first for everyone. Here a
second model learns exposure: how strongly the logs show an item to a request (impressions against sampled unshown
items, :mod:`cascade.train.entire_space`), and the corpus-wide ranking score combines both, in the spirit of
ESMM's P(click, shown) = P(shown) P(click | shown):

    rank_score = log sigmoid(click logit) + exposure_weight * exposure log-propensity

The exposure model has its own :class:`RankerConfig` (by default the click model's): the pipeline's leaves the item
id out (``teacher.entire_space.exposure_exclude``). What the logs show drifts with time; an item-id embedding
memorises how much each item was shown over the whole train period and carries that into a later period, while the
item's windowed counts (the cross features) say what is shown now. On ML-100K's last 28 days the exposure model
alone keeps 0.107 of the test clicks in its top 10 with the item id and 0.137 without (most-popular of the last 30
days: 0.131).

``exposure_weight`` (a buffer saved with the weights) is chosen on validation outcomes; 0 ranks by P(click | shown)
alone (and skips the exposure model's forward). ``forward`` stays the click logit (AUC, calibration and the rank
student's KD read it); everything that orders candidates (the rank log, the rank stage, the teacher's top list over
the corpus) reads :attr:`ranking`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import FeatureSpec
from .ranker import Ranker, RankerConfig


class EntireSpaceRanker(nn.Module):
    """click: P(click | shown) model (``cfg``); exposure: log exposure-propensity model (``exposure_cfg``, None: the
    same as ``cfg``); both :class:`Ranker` over ``spec``.

    forward(cat [B, C], num [B, M]) -> click logits [B]; forward_hidden -> (click logits, click hidden);
    exposure_logit(cat, num) -> [B]; rank_score(cat, num) -> [B] (module docstring).
    """

    def __init__(self, spec: FeatureSpec, cfg: RankerConfig, seed: int = 0,
                 exposure_cfg: RankerConfig | None = None) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.exposure_cfg = exposure_cfg or cfg
        self.click = Ranker(spec, cfg, seed=seed)
        self.exposure = Ranker(spec, self.exposure_cfg, seed=seed + 1)
        self.register_buffer("exposure_weight", torch.tensor(1.0))

    @property
    def ranking(self) -> RankScore:
        """The corpus-wide ranking score in a ranker's calling shape."""
        return RankScore(self)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.click(cat, num)

    def forward_hidden(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.click.forward_hidden(cat, num)

    def exposure_logit(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.exposure(cat, num)

    def combine(self, click_logit: torch.Tensor, exposure_logit: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(click_logit) + self.exposure_weight * exposure_logit

    @property
    def uses_exposure(self) -> bool:
        """False at exposure weight 0: the ranking score is the click model's alone, and the exposure model's
        forward (half the cost of a ranking) is skipped."""
        return bool(self.exposure_weight != 0)

    def rank_score(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        if not self.uses_exposure:
            return F.logsigmoid(self.click(cat, num))
        return self.combine(self.click(cat, num), self.exposure(cat, num))


def exposure_config(cfg: RankerConfig, exclude: tuple[str, ...], spec: FeatureSpec) -> RankerConfig:
    """The exposure model's config: the click model's ``cfg`` without the columns of ``exclude`` (added to what
    ``cfg`` already leaves out). The behaviour sequence is dropped with them when an excluded column is one of its
    attributes (the candidate's own column is the attention's query)."""
    if not exclude:
        return cfg
    attrs = {spec.table_of(j) for j, side in enumerate(spec.cat_sides) if side == "history"}
    sides = tuple(s for s in cfg.sides if s != "history" or not attrs & set(exclude))
    return replace(cfg, sides=sides, exclude=tuple(dict.fromkeys(cfg.exclude + tuple(exclude))))


class RankScore:
    """The ranking score of an :class:`EntireSpaceRanker` in a ranker's calling shape (``__call__``,
    ``forward_lists``, ``training`` / ``eval`` / ``train``), so batched scoring
    (:func:`cascade.models.scoring.score_pairs`) treats it like any ranker. Not a module: it holds no parameter,
    and its mode is the parent's."""

    def __init__(self, parent: EntireSpaceRanker) -> None:
        self.parent = parent

    def __call__(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.parent.rank_score(cat, num)

    def forward_lists(self, cat: torch.Tensor, num: torch.Tensor, list_len: int) -> torch.Tensor:
        p = self.parent
        click = p.click.forward_lists(cat, num, list_len)
        if not p.uses_exposure:
            return F.logsigmoid(click)
        return p.combine(click, p.exposure.forward_lists(cat, num, list_len))

    @property
    def training(self) -> bool:
        return self.parent.training

    def eval(self) -> RankScore:
        self.parent.eval()
        return self

    def train(self, mode: bool = True) -> RankScore:
        self.parent.train(mode)
        return self
