"""The leakage guard: a model feature that gives the click away on the train split is refused before training.

A feature whose values predict the label perfectly on train is, in logged data, almost always the label itself
under another name or a field written after the click (dwell time, a "clicked" flag): a model reading it learns
nothing it can use at serving time. Post-click fields belong on the ``privileged`` side (read only by a PFD
teacher), which is not checked; the label's own column is refused by the loaders.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import Dataset, DataValidationError, show

#: A categorical feature is a copy of the label only where its values repeat: at least this many train rows per
#: distinct value on average (an id-like column with one label per value is not a leak).
MIN_ROWS_PER_VALUE = 10
#: A numeric threshold separating the classes is only evidence with at least this many rows of each class.
MIN_ROWS_PER_CLASS = 10


def perfect_predictor(values: pd.Series, y: np.ndarray, kind: str) -> str | None:
    """How ``values`` [N] (one column on the train rows) predict the 0/1 labels ``y`` [N] perfectly, or None.

    categorical: every value (missing included) holds one label, and values repeat (N >= MIN_ROWS_PER_VALUE x
    distinct values). numeric: a threshold separates the classes (every value of one class below every value of
    the other; NaN-free), with at least MIN_ROWS_PER_CLASS rows of each class.
    """
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return None
    if kind == "categorical":
        codes, uniq = pd.factorize(values, use_na_sentinel=False)
        if len(uniq) * MIN_ROWS_PER_VALUE > len(y):
            return None
        by_value = pd.Series(y).groupby(codes)
        if (by_value.nunique() == 1).all():
            first = by_value.first()
            ones = [show(uniq[c]) for c in first.index[first.to_numpy() == 1][:3]]
            return f"the label is 1 exactly where it is {' or '.join(ones)}{' or ...' if len(ones) == 3 else ''}"
        return None
    v = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    if np.isnan(v).any() or min(pos, neg) < MIN_ROWS_PER_CLASS:
        return None
    v1, v0 = v[y == 1], v[y == 0]
    if v0.max() < v1.min():
        return f"every clicked row has it > {show(v0.max())}, every other row <= it"
    if v1.max() < v0.min():
        return f"every clicked row has it < {show(v0.min())}, every other row >= it"
    return None


def check_leakage(dataset: Dataset, train_mask: np.ndarray) -> None:
    """Raise DataValidationError naming the first non-privileged impression feature that predicts the click
    perfectly on the train rows (``train_mask`` bool [N]), see :func:`perfect_predictor`."""
    imp = dataset.impressions[np.asarray(train_mask)]
    y = imp["click"].to_numpy(np.int64)
    for f in dataset.schema.features:
        if f.table != "impressions" or f.side == "privileged" or f.kind == "sequence" or f.name not in imp.columns:
            continue
        how = perfect_predictor(imp[f.name], y, f.kind)
        if how is not None:
            raise DataValidationError(
                f"{dataset.source('impressions')}: feature {f.name!r} (side {f.side!r}) predicts the click "
                f"perfectly on the train split ({how}): it is the label or a field written after the click. "
                "Leave it out, or declare a post-click field on the 'privileged' side"
            )
