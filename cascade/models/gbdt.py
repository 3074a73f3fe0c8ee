"""LightGBM baseline of the rank stage, on the same encoded columns as the DNN rankers.

Categorical columns go in as LightGBM categorical features (their vocabulary codes, 0 = OOV), numeric columns as
they are. ``objective="binary"`` fits clicks pointwise; ``"lambdarank"`` fits the within-request order, so rows
are sorted by ``request_id`` (stable) and the group sizes of consecutive requests are passed to LightGBM.
Early stopping watches the validation table (AUC for binary, NDCG@10 for lambdarank).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightgbm as lgb
import numpy as np
from tqdm.auto import tqdm

from cascade.data.batches import EncodedTable, FeatureSpec

log = logging.getLogger(__name__)

GBDT_OBJECTIVES = ("binary", "lambdarank")


def _report_rounds(bar: tqdm, n_rounds: int, log_every: int):
    """A LightGBM callback: one bar step per boosting round with the validation metric as postfix, and (log_every
    > 0) a log line every ``log_every`` rounds, so a long fit is never silent."""

    def callback(env: lgb.callback.CallbackEnv) -> None:
        valid = {f"valid_{name}": round(float(value), 5) for _, name, value, *_ in env.evaluation_result_list or ()}
        bar.set_postfix(valid, refresh=False)
        bar.update(1)
        done = env.iteration + 1
        if log_every and (done % log_every == 0 or done == n_rounds):
            log.info("LightGBM: tree %d/%d %s", done, n_rounds, valid)

    return callback


class GBDTRanker:
    """Gradient-boosted trees over the columns of ``sides`` (scikit-learn estimator style).

    fit(train, valid=None) -> self; predict(cat [N, C], num [N, M]) -> scores float64 [N] (log-odds for binary,
    ranking scores for lambdarank). Learned attributes: ``booster_``, ``best_iteration_``, ``spec_``,
    ``feature_names_``, ``cat_index_``, ``num_index_``. progress: a tqdm bar over the boosting rounds (with the
    validation metric); without it, a log line every tenth of the rounds.
    """

    def __init__(self, objective: str = "binary", n_estimators: int = 300, learning_rate: float = 0.05,
                 num_leaves: int = 31, min_child_samples: int = 20, min_data_per_group: int = 20,
                 early_stopping_rounds: int | None = 30, sides: Sequence[str] = ("user", "item", "context", "cross"),
                 num_threads: int = 1, seed: int = 0, progress: bool = False) -> None:
        self.objective = objective
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.min_data_per_group = min_data_per_group
        self.early_stopping_rounds = early_stopping_rounds
        self.sides = sides
        self.num_threads = num_threads
        self.seed = seed
        self.progress = progress

    def _params(self) -> dict:
        if self.objective not in GBDT_OBJECTIVES:
            raise ValueError(f"GBDTRanker: objective {self.objective!r} is not one of {GBDT_OBJECTIVES}")
        return {
            "objective": self.objective,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
            "min_data_per_group": self.min_data_per_group,
            "metric": "auc" if self.objective == "binary" else "ndcg",
            "eval_at": [10],
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }

    def _matrix(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """[N, n_cat + n_num] float64: the chosen categorical codes, then the chosen numerics."""
        spec = self.spec_
        if cat.ndim != 2 or cat.shape[1] != len(spec.cat_names):
            raise ValueError(f"GBDTRanker: cat must be [N, {len(spec.cat_names)}], got {cat.shape}")
        if num.ndim != 2 or num.shape[1] != len(spec.num_names) or len(num) != len(cat):
            raise ValueError(f"GBDTRanker: num must be [{len(cat)}, {len(spec.num_names)}], got {num.shape}")
        return np.concatenate([cat[:, self.cat_index_].astype(np.float64),
                               num[:, self.num_index_].astype(np.float64)], axis=1)

    def _dataset(self, table: EncodedTable, reference: lgb.Dataset | None = None) -> lgb.Dataset:
        if self.objective == "lambdarank":
            # LightGBM wants each query's rows contiguous; a stable sort keeps the within-request order
            order = np.argsort(table.request_id, kind="stable")
            table = table.take(order)
            _, sizes = np.unique(table.request_id, return_counts=True)
            group = sizes
            label = table.label.astype(np.int32)
        else:
            group, label = None, table.label.astype(np.float64)
        return lgb.Dataset(self._matrix(table.cat, table.num), label=label, group=group,
                           feature_name=list(self.feature_names_),
                           categorical_feature=list(range(len(self.cat_index_))),
                           reference=reference, free_raw_data=True)

    def fit(self, train: EncodedTable, valid: EncodedTable | None = None) -> GBDTRanker:
        params = self._params()
        spec: FeatureSpec = train.spec
        self.spec_ = spec
        self.cat_index_ = spec.cat_index(*self.sides)
        self.num_index_ = spec.num_index(*self.sides)
        if not self.cat_index_ and not self.num_index_:
            raise ValueError(f"GBDTRanker: the spec has no column on sides {tuple(self.sides)}")
        self.feature_names_ = tuple(spec.cat_names[j] for j in self.cat_index_) + tuple(
            spec.num_names[j] for j in self.num_index_)
        bad = ~np.isin(train.label, (0, 1))
        if bad.any():
            raise ValueError(f"GBDTRanker: train label must be 0/1, found {train.label[bad][0]!r}")
        dtrain = self._dataset(train)
        valid_sets, callbacks = [], [lgb.log_evaluation(period=0)]
        if valid is not None:
            valid_sets = [self._dataset(valid, reference=dtrain)]
            if self.early_stopping_rounds:
                callbacks.append(lgb.early_stopping(self.early_stopping_rounds, first_metric_only=True, verbose=False))
        bar = tqdm(total=self.n_estimators, desc=f"LightGBM ({self.objective})", unit="tree", leave=False,
                   disable=not self.progress)
        callbacks.append(_report_rounds(bar, self.n_estimators, log_every=0 if self.progress else
                                        max(1, self.n_estimators // 10)))
        try:
            self.booster_ = lgb.train(params, dtrain, num_boost_round=self.n_estimators, valid_sets=valid_sets,
                                      valid_names=["valid"] * len(valid_sets), callbacks=callbacks)
        finally:
            bar.close()
        best = self.booster_.best_iteration
        self.best_iteration_ = int(best) if best and best > 0 else self.booster_.current_iteration()
        log.info("GBDTRanker(%s): %d trees kept", self.objective, self.best_iteration_)
        return self

    def predict(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        if not hasattr(self, "booster_"):
            raise RuntimeError("GBDTRanker: call fit before predict")
        return np.asarray(self.booster_.predict(self._matrix(cat, num), num_iteration=self.best_iteration_,
                                                raw_score=True), dtype=np.float64)
