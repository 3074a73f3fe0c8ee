from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cascade.data.schema import Dataset, DataValidationError, Feature, Schema


def _ds(**changes):
    users = pd.DataFrame({"user_id": np.array([1, 2, 3]), "age": [20.0, 30.0, 40.0]})
    items = pd.DataFrame({"item_id": np.array([10, 11]), "tag": ["a", "b"]})
    imp = pd.DataFrame({
        "request_id": np.array([0, 0, 1]), "user_id": np.array([1, 1, 3]), "item_id": np.array([10, 11, 10]),
        "time_ms": np.array([1000, 1001, 2000]), "position": np.array([0, 1, 0]), "click": np.array([1, 0, 0]),
        "is_rand": np.array([0, 0, 1]), "hour": np.array([3, 3, 4]),
    })
    tables = {"users": users, "items": items, "impressions": imp}
    for k, fn in changes.items():
        tables[k] = fn(tables[k].copy())
    schema = Schema((Feature("age", "users", "numeric", "user"), Feature("tag", "items", "categorical", "item"),
                     Feature("hour", "impressions", "categorical", "context")))
    return Dataset(tables["users"], tables["items"], tables["impressions"], schema, name="t",
                   sources={"users": "u.csv", "items": "i.csv", "impressions": "imp.csv"})


def test_valid_dataset_passes_and_schema_selects_by_side():
    ds = _ds().validate()
    assert [f.name for f in ds.schema.by_side("user", "context")] == ["age", "hour"]
    assert Schema.from_dict(ds.schema.to_dict()) == ds.schema


@pytest.mark.parametrize(
    "table, fn, needles",
    [
        ("impressions", lambda d: d.drop(columns=["click"]), ["imp.csv", "'click'"]),
        ("impressions", lambda d: d.assign(time_ms=d.time_ms.astype(str)), ["imp.csv", "'time_ms'", "'1000'"]),
        ("users", lambda d: d.assign(user_id=[1.0, np.nan, 3.0]), ["u.csv", "'user_id'", "NaN"]),
        ("items", lambda d: d.assign(item_id=[10, 10]), ["i.csv", "'item_id'", "duplicate id 10"]),
        ("impressions", lambda d: d.assign(user_id=[1, 1, 99]), ["imp.csv", "'user_id'", "unknown user 99", "u.csv"]),
        ("impressions", lambda d: d.assign(item_id=[10, 77, 10]), ["'item_id'", "unknown item 77"]),
        ("impressions", lambda d: d.assign(click=[1, 2, 0]), ["'click'", "0/1", "2"]),
        ("impressions", lambda d: d.assign(time_ms=[1000, -5, 2000]), ["'time_ms'", "negative", "-5"]),
        ("impressions", lambda d: d.iloc[:0], ["imp.csv", "no impressions"]),
        ("users", lambda d: d.drop(columns=["age"]), ["u.csv", "'age'"]),
    ],
)
def test_bad_tables_name_file_column_value(table, fn, needles):
    with pytest.raises(DataValidationError) as e:
        _ds(**{table: fn}).validate()
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_schema_rejects_bad_side_and_duplicates():
    with pytest.raises(ValueError, match="side"):
        Feature("x", "users", "numeric", "userz")
    with pytest.raises(ValueError, match="duplicate"):
        Schema((Feature("x", "users", "numeric", "user"), Feature("x", "items", "numeric", "item")))
