"""Id -> row lookup: one index over an id column, used by every table that is addressed by raw ids.

``IdIndex(ids)`` takes the ids of a table's rows (int64 [N], any order, unique) and answers the row of any id:
:meth:`IdIndex.find` gives (rows, found) without raising (the caller decides what an unknown id means, e.g. the
OOV row at serving), :meth:`IdIndex.rows` raises :class:`~cascade.data.schema.DataValidationError` naming the
first unknown id. Compact id ranges (the usual 0..N-1 ids, or ids spread over at most 4 N + 65,536 values) use a
direct lookup table (one gather, several times faster than a binary search per id); sparse ranges use
``searchsorted`` on the sorted ids. Negative ids are never data (every source's ids are >= 0): where a table
holds an OOV row's sentinel id (a large negative number), the sentinels are searched apart and do not stretch the
table's range.
"""

from __future__ import annotations

import numpy as np

from .schema import DataValidationError

TABLE_SLACK = 65536  # a lookup table may hold this many empty slots beyond 4 per id (512 KiB of int64)


class IdIndex:
    """Row of each id among ``ids`` (int64 [N], unique). what: the id's name in messages ("user_id");
    source: the table or function that asks (the message's prefix)."""

    def __init__(self, ids: np.ndarray, what: str = "id", source: str = "") -> None:
        ids = _as_ids(ids, what, source)
        if ids.ndim != 1:
            raise ValueError(f"IdIndex: ids must be 1-d, got shape {ids.shape}")
        self.what, self.source = what, source
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        dup = np.flatnonzero(self.sorted_ids[1:] == self.sorted_ids[:-1])
        if len(dup):
            raise DataValidationError(f"{source + ': ' if source else ''}duplicate {what} "
                                      f"{int(self.sorted_ids[dup[0]])}")
        self.identity = bool(np.array_equal(self.order, np.arange(len(ids))))  # sorted ids: row = position
        self.table = None
        self.n_negative = int(np.searchsorted(self.sorted_ids, 0))  # sentinel ids, searched apart from the table
        bulk = self.sorted_ids[self.n_negative:]
        if len(bulk) and int(bulk[-1]) - int(bulk[0]) < 4 * len(bulk) + TABLE_SLACK:
            self.lo = int(bulk[0])
            self.table = np.full(int(bulk[-1]) - self.lo + 1, -1, np.int64)
            self.table[bulk - self.lo] = self.order[self.n_negative:]

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row int64 [...] (0 where not found), found bool [...]) of ``ids`` of any shape."""
        ids = _as_ids(ids, self.what, self.source)
        if len(self.sorted_ids) == 0:
            return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
        if self.table is not None:
            flat = ids.reshape(-1)
            off = flat - self.lo
            inside = (off >= 0) & (off < len(self.table))
            rows = self.table[np.where(inside, off, 0)]
            found = inside & (rows >= 0)
            if self.n_negative and not found.all():  # sentinel ids: found among the few below the table
                miss = np.flatnonzero(~found)
                neg = miss[flat[miss] < 0]
                if len(neg):
                    sentinels = self.sorted_ids[: self.n_negative]
                    pos = np.minimum(np.searchsorted(sentinels, flat[neg]), self.n_negative - 1)
                    hit = sentinels[pos] == flat[neg]
                    rows[neg[hit]], found[neg[hit]] = self.order[pos[hit]], True
            return np.where(found, rows, 0).reshape(ids.shape), found.reshape(ids.shape)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        found = self.sorted_ids[pos] == ids
        rows = pos if self.identity else self.order[pos]
        return np.where(found, rows, 0), found

    def rows(self, ids: np.ndarray, source: str | None = None) -> np.ndarray:
        """Rows int64 [...] of ``ids`` that must all be present; the first unknown id raises DataValidationError
        (its message starts with ``source``, default the index's own)."""
        rows, found = self.find(ids)
        if not found.all():
            bad = int(np.asarray(ids).reshape(-1)[np.flatnonzero(~found.reshape(-1))[0]])
            where = "is empty" if len(self.sorted_ids) == 0 else f"has {len(self.sorted_ids):,} ids"
            src = self.source if source is None else source
            raise DataValidationError(f"{src + ': ' if src else ''}unknown {self.what} {bad} (not in the "
                                      f"{self.what} table, which {where})")
        return rows


def _as_ids(ids, what: str, source: str) -> np.ndarray:
    """``ids`` as int64; non-integer ids raise (a float id would otherwise be truncated silently)."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu" and a.size:
        raise DataValidationError(f"{source + ': ' if source else ''}{what}s must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)
