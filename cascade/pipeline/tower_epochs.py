"""How long a two-tower student trains, chosen on validation outcomes.

A tower trains for up to ``max_epochs``; after every epoch its validation click-recall at its stage size is
measured (per request, on the students step's validation judge) and its weights are kept. Training stops once
``patience`` epochs in a row have not raised the best mean, and the one-standard-error rule of
:mod:`cascade.eval.selection` serves the epoch closest to the configured count among those within one SE of the
best: more epochs are served only where they keep more validation clicks by more than the validation requests'
noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from ..eval.metrics import row_mean
from ..eval.selection import one_se_choice, one_se_columns
from ..models.two_tower import TwoTower


class EpochChoice:
    """The ``after_epoch`` hook of :func:`cascade.train.students.train_student` that judges every epoch, and the
    choice among them.

    recall(towers) -> float [R]: the towers' per-request validation click-recall (nan: a request without clicks),
    the same R requests every call. configured: the epochs the config asks for (the one-SE rule's reference);
    patience: epochs without a better mean before stopping; key: the name of the score in the history dicts.
    """

    def __init__(self, recall: Callable[[TwoTower], np.ndarray], configured: int, patience: int, key: str) -> None:
        if configured < 1 or patience < 1:
            raise ValueError(f"EpochChoice: configured and patience must be >= 1, got {configured}, {patience}")
        self.recall, self.configured, self.patience, self.key = recall, configured, patience, key
        self.scores: list[np.ndarray] = []  # per epoch: float [R]
        self.states: list[dict[str, torch.Tensor]] = []  # per epoch: the towers' weights after it

    def __call__(self, epoch: int, towers: TwoTower) -> tuple[dict, bool]:
        was = towers.training
        with torch.no_grad():
            self.scores.append(np.asarray(self.recall(towers), dtype=np.float64))
        towers.train(was)
        self.states.append(copy.deepcopy({k: v.detach().cpu() for k, v in towers.state_dict().items()}))
        means = [row_mean(s) for s in self.scores]
        best = int(np.argmax(means))
        return {self.key: means[-1]}, len(means) - 1 - best >= self.patience

    def choose(self, towers: TwoTower, seed: int) -> dict:
        """Load the chosen epoch's weights into ``towers``. Returns {"configured", "trained", "chosen" (epochs),
        "grid": one row per epoch trained}."""
        if not self.scores:
            raise ValueError("EpochChoice.choose: no epoch was judged")
        chosen, rows = one_se_choice(range(1, len(self.scores) + 1),
                                     lambda e, units: row_mean(self.scores[int(e) - 1][units]),
                                     len(self.scores[0]), seed=seed, prefer=float(self.configured))
        towers.load_state_dict(self.states[int(chosen) - 1])
        return {"configured": self.configured, "trained": len(self.scores), "chosen": int(chosen),
                "grid": [{"epochs": int(r["value"]), self.key: r["score"], **one_se_columns(r)} for r in rows]}
