"""The teacher's collaborative term: what the user's whole click history says of each item, added to its ranking.

A ranker scores one (request, item) pair from its features; on rated logs its corpus-wide order is nearly the same
for everyone (the most liked items). EASE (Steck 2019; :class:`~cascade.channels.EaseChannel`) reads the user's
every click before the request through item-item weights fitted in closed form on the train period's clicks. The
teacher's ranking score becomes

    ranking score + weight * the request's EASE score of the item, standardised over the corpus

wherever it orders candidates (:func:`cascade.models.scoring.ranker_scorer`: the rank log, the rank stage, the
teacher's list over the corpus), so the students learn the blended order from the rank log. ``lam`` and ``weight``
are chosen on validation outcomes (:mod:`cascade.train.collaborative`); the forward and its click logits (AUC,
calibration, the rank student's KD) are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import artifacts as A

FILE = "collaborative.json"  # beside a saved ranker's model.pt and config.json


@dataclass(frozen=True)
class CollaborativeTerm:
    """weight x the request's EASE scores (ridge ``lam``) standardised over the corpus, added to a ranking score."""

    lam: float
    weight: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lam) and self.lam > 0 and np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"a collaborative term needs lam > 0 and weight > 0, got lam={self.lam}, "
                             f"weight={self.weight}")

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
        return CollaborativeTerm(float(meta["lam"]), float(meta["weight"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a collaborative term ({e})") from None


def term_of(model) -> CollaborativeTerm | None:
    """The collaborative term a ranker carries (set by the teacher step or :func:`load_term`), None: none."""
    return getattr(model, "collaborative", None)
