"""Threads for CPU work: torch's intra-op thread count for a block of code, and an ordered map over batches.

Scoring many small batches (the rank log's candidate lists) uses the CPU better as several batches at once, each
on one thread, than as one batch at a time with torch's intra-op threads: the pair features are numpy on one core
whatever torch's setting, and the teacher's GEMMs ([4,096 x 472] by [472 x 32] and the like) gain little from a
second thread (1.6x on two). numpy and torch release the GIL in their kernels, so Python threads run them in
parallel (BENCHMARKS.md, "Batches side by side").
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (None: left as it is), restored after."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"torch_threads: n must be >= 1 or None, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 1) -> Iterator[R]:
    """``fn(item)`` for each item, in the items' order, on ``workers`` threads (1: in the calling thread).

    workers > 1: torch runs at one intra-op thread (:func:`torch_threads`) until the map is read to its end or
    closed, so that the workers' calls do not oversubscribe the cores. At most 2 x workers calls are submitted ahead
    of the result being read, so a slow reader holds a bounded number of results. An exception raised by ``fn`` is
    raised here, at that item's turn; later calls are cancelled. ``fn`` must be safe to call from several threads at
    once where workers > 1.
    """
    if workers < 1:
        raise ValueError(f"ordered_map: workers must be >= 1, got {workers}")
    if workers == 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
