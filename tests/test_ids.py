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


def test_an_oov_sentinel_id_keeps_the_table_and_is_found_apart():
    """A table with an OOV row's sentinel id (a large negative number) still looks the real ids up in a table, and
    finds the sentinel (and only it) among the negative ids: the same answers as a binary search over all ids."""
    sentinel = -(2**31)
    ids = np.array([4, sentinel, 0, 2, 9, 3])  # the OOV row in second place
    index = IdIndex(ids, "item_id")
    assert index.table is not None and index.n_negative == 1 and len(index.table) == 10
    queries = np.array([[9, sentinel, -1], [0, 5, 2**40]])
    rows, found = index.find(queries)
    np.testing.assert_array_equal(rows, [[4, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(found, [[True, True, False], [True, False, False]])
    assert index.find(np.int64(sentinel))[0] == 1 and index.find(np.int64(sentinel))[1]  # a 0-d id
    rng = np.random.default_rng(0)
    many = np.r_[rng.choice(60000, 3000, replace=False), sentinel]  # sparse users: 3,000 over 60,000 ids
    index = IdIndex(many, "user_id")
    assert index.table is not None  # within 4 N + TABLE_SLACK slots
    q = np.r_[rng.integers(-5, 60005, 5000), sentinel]
    pos = np.minimum(np.searchsorted(np.sort(many), q), len(many) - 1)
    expect_found = np.sort(many)[pos] == q
    rows, found = index.find(q)
    np.testing.assert_array_equal(found, expect_found)
    np.testing.assert_array_equal(many[rows[found]], q[found])
    assert IdIndex(np.r_[0, 10**7], "item_id").table is None  # sparse: binary search
