"""Column helpers of the encoder: reading a column, its categorical keys or numeric values, the scale rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..batches import OOV, FeatureSpec
from ..schema import DataValidationError, Feature

NUMERIC_MODES = ("standardize", "log_standardize", "quantile")
PARTS = ("user", "item", "context", "privileged")  # which input table / row set a column is read from


def part_of(f: Feature) -> str | None:
    """Which rows a feature's column is read from: "user", "item", "context", "privileged"; None for a
    cross-table feature (computed by CrossFeatureStore)."""
    if f.table == "users":
        return "user"
    if f.table == "items":
        return "item"
    if f.table == "impressions":
        return "privileged" if f.side == "privileged" else "context"
    return None  # table "cross": computed by CrossFeatureStore, not read from a table


NUMPY_KINDS = "iubf"  # numpy dtype kinds a column is read as without pandas: int, uint, bool, float


def column(frame: Any, name: str, source: str) -> pd.Series | np.ndarray:
    """Column ``name`` of a DataFrame (a Series) or of a mapping of arrays (a numeric array as it is, so that a
    serving request's few values are read without pandas; anything else as a Series); a clear error when it is
    missing. :func:`cat_keys` and :func:`float_values` read either."""
    try:
        col = frame[name]
    except KeyError:
        have = list(frame.columns) if hasattr(frame, "columns") else list(frame)
        raise DataValidationError(f"{source}: missing feature column {name!r} (has {have})") from None
    if isinstance(col, pd.Series):
        return col
    arr = np.asarray(col)
    return arr if arr.dtype.kind in NUMPY_KINDS and arr.ndim == 1 else pd.Series(arr)


def cat_keys(s: pd.Series | np.ndarray, source: str, name: str,
             kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Sortable keys of a categorical column: (keys [N] int64 or str, valid bool [N], key kind "int" | "str").

    Integer columns give int64 keys; float columns must hold whole numbers (pandas stores an int column with
    NaN as float) and give int64 keys; anything else gives str keys. Missing values are invalid (-> OOV).
    ``kind`` forces the key kind fitted earlier, so ``"39"`` and ``39`` meet in the same vocabulary. ``s``: a
    Series, or a numeric numpy array (read without pandas).
    """
    if isinstance(s, np.ndarray) and s.dtype.kind not in NUMPY_KINDS:
        s = pd.Series(s)
    if isinstance(s, np.ndarray):
        is_int, is_float = s.dtype.kind in "iub", s.dtype.kind == "f"
        valid = ~np.isnan(s) if is_float else np.ones(len(s), bool)
    else:
        is_int = pd.api.types.is_bool_dtype(s) or pd.api.types.is_integer_dtype(s)
        is_float = pd.api.types.is_float_dtype(s)
        valid = ~s.isna().to_numpy()
    if is_int:
        keys, got = _values(s, np.int64, 0), "int"
    elif is_float:
        v = _values(s, np.float64, np.nan)
        bad = valid & ((v != np.round(v)) | ~np.isfinite(v))
        if bad.any():
            raise DataValidationError(
                f"{source}: categorical column {name!r} holds a non-integer float {float(v[bad][0])!r}; "
                "declare it numeric or cast it to int/str"
            )
        keys, got = np.where(valid, v, 0).astype(np.int64), "int"
    else:
        obj = s.to_numpy(dtype=object, copy=True)
        obj[~valid] = ""
        keys, got = obj.astype(str), "str"  # (Series.to_numpy(dtype=str) truncates to 1 char in pandas 3)
    if kind is not None and kind != got:
        if kind == "str":
            keys = keys.astype(str)  # int -> decimal text, so 39 meets "39"
        else:
            num = pd.to_numeric(pd.Series(keys[valid]), errors="coerce")
            if num.isna().any():
                raise DataValidationError(
                    f"{source}: categorical column {name!r} was fitted on integer values but holds "
                    f"{keys[valid][num.isna().to_numpy()][0]!r}"
                )
            ints = np.zeros(len(keys), dtype=np.int64)
            ints[valid] = num.to_numpy(dtype=np.int64)
            keys = ints
    return keys, valid, kind or got


def scale(std, mean, n: int):
    """The standardisation divisor for ``std`` (a float or an array, with the column's ``mean`` over its ``n`` train
    values): 1.0 where a column is constant up to float rounding, else ``std``. Constant: the variance within
    scikit-learn's StandardScaler bound for a column's rounding (n eps var + (n |mean| eps)^2: a constant 0.0953 over
    10,000 rows has a std of about 6e-15, which would make any other value 1e13), or a std below 10 machine
    epsilons (values 0 and 4e-110 leave 2e-110, which turns any other value into inf in float32)."""
    eps = np.finfo(np.float64).eps
    std, mean = np.asarray(std, np.float64), np.asarray(mean, np.float64)
    var = std ** 2
    constant = (std < 10 * eps) | (var <= n * eps * var + (n * np.abs(mean) * eps) ** 2)
    out = np.where(constant, 1.0, std)
    return float(out) if out.ndim == 0 else out


def vocab_lookup(vocab: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Index of each key in the sorted ``vocab`` plus 1; 0 (OOV) for unseen or invalid keys. int64 [N]."""
    if len(vocab) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    pos = np.searchsorted(vocab, keys)
    pos_c = np.minimum(pos, len(vocab) - 1)
    hit = valid & (vocab[pos_c] == keys)
    return np.where(hit, pos_c + 1, OOV).astype(np.int64)


def _values(s: pd.Series | np.ndarray, dtype, na) -> np.ndarray:
    """A Series' or a numeric array's values as ``dtype`` (missing values -> ``na``)."""
    return s.to_numpy(dtype=dtype, na_value=na) if isinstance(s, pd.Series) else s.astype(dtype)


def float_values(s: pd.Series | np.ndarray, source: str, name: str) -> np.ndarray:
    """float64 [N] of a numeric column (a Series or a numeric numpy array; NaN kept); inf or non-numbers raise."""
    numeric = (s.dtype.kind in NUMPY_KINDS if isinstance(s, np.ndarray)
               else pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))
    if not numeric:
        example = s[0] if isinstance(s, np.ndarray) else s.iloc[0]
        raise DataValidationError(f"{source}: numeric column {name!r} has dtype {s.dtype} (example {example!r})")
    v = _values(s, np.float64, np.nan)
    inf = np.isinf(v)
    if inf.any():
        raise DataValidationError(f"{source}: numeric column {name!r} has an infinite value at row "
                                  f"{int(np.flatnonzero(inf)[0])}")
    return v


def concat_specs(*specs: FeatureSpec) -> FeatureSpec:
    shares = sum((s.cat_shares or ("",) * len(s.cat_names) for s in specs), ())
    return FeatureSpec(*(sum((getattr(s, k) for s in specs), ()) for k in
                         ("cat_names", "cat_sides", "cat_cardinality", "num_names", "num_sides")), shares)
