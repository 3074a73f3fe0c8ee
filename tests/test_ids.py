"""The one id -> row index (cascade.data.ids.IdIndex): direct table and binary search agree, errors name the id."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.data.ids import IdIndex
from cascade.data.schema import DataValidationError


@pytest.mark.parametrize("ids", [np.array([7, 3, 5, 4]),                    # compact range: direct lookup table
                                 np.array([7, 3, 5, 4]) * 10**12])          # sparse range: searchsorted
def test_rows_and_find_in_any_order_and_shape(ids):
    index = IdIndex(ids, "item_id", "items.csv")
    assert (index.table is not None) == (ids.max() < 1000)
    np.testing.assert_array_equal(index.rows(ids[[3, 0, 0]]), [3, 0, 0])  # row = position in the given ids
    np.testing.assert_array_equal(index.rows(ids[[[1, 2], [3, 0]]]), [[1, 2], [3, 0]])
    rows, found = index.find(np.r_[ids[2], -1, ids.max() + 1, ids[1]])
    np.testing.assert_array_equal(found, [True, False, False, True])
    np.testing.assert_array_equal(rows, [2, 0, 0, 1])  # 0 where not found
    bad = int(ids.max() + 1)
    with pytest.raises(DataValidationError, match=rf"items.csv: unknown item_id {bad} \(not in the item_id table"):
        index.rows(np.r_[ids[0], bad])
    with pytest.raises(DataValidationError, match=rf"encode: unknown item_id {bad}"):
        index.rows([bad], source="encode")


def test_duplicates_non_integers_and_empty_tables_are_refused_or_handled():
    with pytest.raises(DataValidationError, match="users: duplicate user_id 5"):
        IdIndex(np.array([5, 1, 5]), "user_id", "users")
    with pytest.raises(DataValidationError, match="user_ids must be integers, got dtype float64"):
        IdIndex(np.array([1, 2]), "user_id").rows(np.array([1.0]))
    empty = IdIndex(np.zeros(0, np.int64), "user_id")
    assert empty.find(np.array([1, 2]))[1].tolist() == [False, False]
    with pytest.raises(DataValidationError, match="which is empty"):
        empty.rows(np.array([1]))
