"""Encoded arrays and batches.

Data is encoded once into two contiguous arrays per table: ``cat`` (int64 [N, C], vocabulary indices; 0 is the
OOV / padding index of every vocabulary) and ``num`` (float32 [N, M], normalised numerics). A
:class:`FeatureSpec` names the columns, their sides and their cardinalities, so a model picks its inputs by side
with an index list. A batch is a slice or one index gather of these arrays: there is no per-row Python anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .schema import SIDES

OOV = 0


@dataclass(frozen=True)
class FeatureSpec:
    """Column layout of encoded arrays.

    cat_names/cat_sides/cat_cardinality: one entry per column of ``cat``; cardinality counts the OOV index 0.
    num_names/num_sides: one entry per column of ``num``.
    cat_shares: per column of ``cat``, the name of the column whose embedding table it reads ("" = its own;
    empty tuple = every column its own). A history column ``hist_item_id_3`` holds codes of the ``item_id``
    vocabulary and reads ``item_id``'s table, so a clicked item and a candidate item share one vector.
    """

    cat_names: tuple[str, ...] = ()
    cat_sides: tuple[str, ...] = ()
    cat_cardinality: tuple[int, ...] = ()
    num_names: tuple[str, ...] = ()
    num_sides: tuple[str, ...] = ()
    cat_shares: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.cat_names) == len(self.cat_sides) == len(self.cat_cardinality)):
            raise ValueError("FeatureSpec: cat_names, cat_sides and cat_cardinality must have equal lengths")
        if len(self.num_names) != len(self.num_sides):
            raise ValueError("FeatureSpec: num_names and num_sides must have equal lengths")
        for s in self.cat_sides + self.num_sides:
            if s not in SIDES:
                raise ValueError(f"FeatureSpec: side {s!r} is not one of {SIDES}")
        if self.cat_shares and not any(self.cat_shares):
            object.__setattr__(self, "cat_shares", ())  # one spelling of "no column shares": equal specs compare equal
        if self.cat_shares and len(self.cat_shares) != len(self.cat_names):
            raise ValueError(f"FeatureSpec: cat_shares has {len(self.cat_shares)} entries for {len(self.cat_names)} "
                             "categorical columns")
        share = dict(zip(self.cat_names, self.cat_shares))
        for name, src in share.items():
            if src and (src == name or share.get(src)):
                raise ValueError(f"FeatureSpec: column {name!r} reads the table of {src!r}, which is itself or "
                                 "reads another's")

    def table_of(self, j: int) -> str:
        """The name of the embedding table categorical column j reads (its own name unless it shares)."""
        return (self.cat_shares[j] if self.cat_shares else "") or self.cat_names[j]

    def cat_index(self, *sides: str) -> list[int]:
        """Column indices of ``cat`` whose side is in ``sides``, in column order."""
        return [j for j, s in enumerate(self.cat_sides) if s in sides]

    def num_index(self, *sides: str) -> list[int]:
        return [j for j, s in enumerate(self.num_sides) if s in sides]

    def select(self, *sides: str) -> FeatureSpec:
        ci, ni = self.cat_index(*sides), self.num_index(*sides)
        return FeatureSpec(
            tuple(self.cat_names[j] for j in ci),
            tuple(self.cat_sides[j] for j in ci),
            tuple(self.cat_cardinality[j] for j in ci),
            tuple(self.num_names[j] for j in ni),
            tuple(self.num_sides[j] for j in ni),
            tuple(self.cat_shares[j] for j in ci) if self.cat_shares else (),
        )

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("cat_names", "cat_sides", "cat_cardinality", "num_names",
                                                    "num_sides", "cat_shares")}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass
class EncodedTable:
    """Encoded impressions (or any rows): feature arrays plus the row keys and labels.

    cat: int64 [N, C]; num: float32 [N, M]; label: float32 [N] (click); request_id, user_id, item_id, time_ms:
    int64 [N] (raw ids, for grouping and joins); is_rand: int8 [N]; extra: other per-row arrays (e.g. privileged
    targets), each of length N.
    """

    spec: FeatureSpec
    cat: np.ndarray
    num: np.ndarray
    label: np.ndarray
    request_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    time_ms: np.ndarray
    is_rand: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.label)
        assert self.cat.shape == (n, len(self.spec.cat_names)), (self.cat.shape, n, len(self.spec.cat_names))
        assert self.num.shape == (n, len(self.spec.num_names)), (self.num.shape, n, len(self.spec.num_names))
        for name in ("request_id", "user_id", "item_id", "time_ms", "is_rand"):
            assert len(getattr(self, name)) == n, name
        for k, v in self.extra.items():
            assert len(v) == n, k

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray | slice) -> EncodedTable:
        """Rows ``idx`` (an index array, a boolean mask or a slice) as a new table: one gather per array."""
        g = _gather(idx)
        return EncodedTable(
            self.spec, g(self.cat), g(self.num), g(self.label), g(self.request_id), g(self.user_id), g(self.item_id),
            g(self.time_ms), g(self.is_rand), {k: g(v) for k, v in self.extra.items()},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "cat": self.cat, "num": self.num, "label": self.label, "request_id": self.request_id,
            "user_id": self.user_id, "item_id": self.item_id, "time_ms": self.time_ms, "is_rand": self.is_rand,
        }
        out.update({f"extra__{k}": v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_arrays(cls, spec: FeatureSpec, arrays: dict[str, np.ndarray]) -> EncodedTable:
        extra = {k[len("extra__"):]: v for k, v in arrays.items() if k.startswith("extra__")}
        return cls(spec, arrays["cat"], arrays["num"], arrays["label"], arrays["request_id"], arrays["user_id"],
                   arrays["item_id"], arrays["time_ms"], arrays["is_rand"], extra)


def _gather(idx):
    """Row selection: a slice views, a boolean mask selects, an index array gathers with np.take (about 2x faster
    than fancy indexing for [4096]-row batches of wide arrays, measured in benchmarks/bench_data.py)."""
    if isinstance(idx, slice) or (isinstance(idx, np.ndarray) and idx.dtype == bool):
        return lambda a: a[idx]
    return lambda a: np.take(a, idx, axis=0)


def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None = None,
                  drop_last: bool = False) -> Iterator[np.ndarray | slice]:
    """Yield batches of row positions: contiguous slices in order, or slices of one seeded permutation."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    perm = rng.permutation(n) if rng is not None else None
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield perm[start:end] if perm is not None else slice(start, end)


def iter_batches(table: EncodedTable, batch_size: int, rng: np.random.Generator | None = None,
                 drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yield dicts of numpy arrays (cat, num, label, extra...) for each batch; one gather per array per batch."""
    for idx in batch_indices(len(table), batch_size, rng, drop_last):
        g = _gather(idx)
        b = {"cat": g(table.cat), "num": g(table.num), "label": g(table.label),
             "user_id": g(table.user_id), "item_id": g(table.item_id), "request_id": g(table.request_id)}
        for k, v in table.extra.items():
            b[k] = g(v)
        yield b
