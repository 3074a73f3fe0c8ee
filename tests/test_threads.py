"""cascade.threads: torch's thread count for a block, and the ordered map over batches on several threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cascade.threads import ordered_map, torch_threads


def test_torch_threads_sets_and_restores_even_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be >= 1"), torch_threads(0):
        pass


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_the_order_and_uses_the_threads(workers):
    seen_threads = set()

    def slow_square(x):
        seen_threads.add(threading.get_ident())
        time.sleep(0.002 * (7 - x % 7))  # later items finish first within a window
        return x * x

    assert list(ordered_map(slow_square, range(23), workers)) == [x * x for x in range(23)]
    if workers == 1:
        assert seen_threads == {threading.get_ident()}  # in the calling thread
    else:
        assert threading.get_ident() not in seen_threads and 1 < len(seen_threads) <= workers


def test_ordered_map_holds_a_bounded_window_and_raises_at_the_failing_item():
    started = []

    def record(x):
        started.append(x)
        return x

    it = ordered_map(record, range(100), workers=2)
    assert next(it) == 0
    time.sleep(0.05)
    assert len(started) <= 2 * 2 + 1  # 2 x workers submitted ahead of the first read, then one more
    it.close()

    def fail_at_5(x):
        if x == 5:
            raise KeyError("item 5")
        return x

    got = []
    with pytest.raises(KeyError, match="item 5"):
        for y in ordered_map(fail_at_5, range(20), workers=3):
            got.append(y)
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(ordered_map(abs, [1], workers=0))
