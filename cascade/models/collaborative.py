"""The teacher's collaborative term: what the user's whole click history says of each item, added to its ranking.

A ranker scores one (request, item) pair from its features; on rated logs its corpus-wide order is nearly the same
for everyone (the most liked items). EASE (Steck 2019; :class:`~cascade.channels.EaseChannel`) reads the user's
every click before the request through item-item weights fitted in closed form on the train period's clicks. The
teacher's ranking score becomes

    ranking score + weight * the request's EASE score of the item, standardised over the corpus
                  + popular_weight * log(1 + the item's clicks in the trailing popular_days), standardised over the
                    corpus for the request's refresh period
                  + popular_ease_weight * its EASE score at ridge popular_lam, standardised over the corpus

wherever it orders candidates (:func:`cascade.models.scoring.ranker_scorer`: the rank log, the rank stage, the
teacher's list over the corpus), so the students learn the blended order from the rank log. The popularity part
comes from the classic prior "most-popular + EASE" that a ranker of rated logs can trail (on ML-100K it kept more of
the test clicks than the teacher's own list: BENCHMARKS.md). Every weight is chosen on validation outcomes
(:mod:`cascade.train.collaborative`); the forward and its click logits (AUC, calibration, the rank student's KD) are
unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import artifacts as A

FILE = "collaborative.json"  # beside a saved ranker's model.pt and config.json


@dataclass(frozen=True)
class CollaborativeTerm:
    """weight x the request's EASE scores (ridge ``lam``) standardised over the corpus, plus the classic prior's
    parts: popular_weight x the standardised log(1 + clicks in the trailing ``popular_days``, recounted every
    ``refresh_ms``) and popular_ease_weight x the standardised EASE scores at ridge ``popular_lam``; added to a
    ranking score. A weight of 0 turns its part off; a term has one part on at least."""

    lam: float
    weight: float
    popular_weight: float = 0.0
    popular_days: float | None = None
    refresh_ms: int = 3_600_000
    popular_lam: float | None = None
    popular_ease_weight: float = 0.0

    def __post_init__(self) -> None:
        weights = (self.weight, self.popular_weight, self.popular_ease_weight)
        if not (all(np.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
                and np.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"a collaborative term needs lam > 0, weights >= 0 and one of them > 0, got "
                             f"lam={self.lam}, weight={self.weight}, popular_weight={self.popular_weight}, "
                             f"popular_ease_weight={self.popular_ease_weight}")
        if self.popular_weight > 0 and not (self.popular_days is not None and self.popular_days > 0
                                            and self.refresh_ms >= 1):
            raise ValueError(f"a collaborative term with popular_weight > 0 needs popular_days > 0 and refresh_ms "
                             f">= 1, got popular_days={self.popular_days}, refresh_ms={self.refresh_ms}")
        if self.popular_ease_weight > 0 and not (self.popular_lam is not None and self.popular_lam > 0):
            raise ValueError(f"a collaborative term with popular_ease_weight > 0 needs popular_lam > 0, got "
                             f"popular_lam={self.popular_lam}")

    def save(self, model_dir: Path) -> str:
        A.write_json(Path(model_dir) / FILE, asdict(self))
        return FILE


def load_term(model_dir: Path) -> CollaborativeTerm | None:
    """The term saved beside a ranker (``collaborative.json``), None where it has none."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    meta = A.read_json(path)
    try:
        days, lam = meta.get("popular_days"), meta.get("popular_lam")
        return CollaborativeTerm(float(meta["lam"]), float(meta["weight"]), float(meta.get("popular_weight", 0.0)),
                                 None if days is None else float(days), int(meta.get("refresh_ms", 3_600_000)),
                                 None if lam is None else float(lam), float(meta.get("popular_ease_weight", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a collaborative term ({e})") from None


def term_of(model) -> CollaborativeTerm | None:
    """The collaborative term a ranker carries (set by the teacher step or :func:`load_term`), None: none."""
    return getattr(model, "collaborative", None)
