"""Speed probes measured once per machine and kept, so that runs on one machine make the same choices.

``autocast = "auto"`` picks bfloat16 where a short probe finds it fast enough (:mod:`cascade.machine`). On a shared
machine one probe reads 1.33x in one run and 1.04x in the next; a probe that lands near its threshold would then
train the same students in bfloat16 once and in float32 the next time, and two runs of one config would differ.
:func:`kept_speedup` measures a probe the first time this machine (its CPU, flags and torch version) meets it on a
thread count, and reads the kept value ever after.

The values live in one JSON file, ``$CASCADE_PROBE_CACHE`` where that is set (``""``: keep nothing, every process
probes anew), else ``$XDG_CACHE_HOME/cascade/probes.json`` (``~/.cache/cascade/probes.json``). Delete the file
(or its entry) to probe again. Processes that probe at once agree: the first value written wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROBE_CACHE_ENV = "CASCADE_PROBE_CACHE"


def probe_cache_path() -> Path | None:
    """The file that keeps the probes (see the module's docstring); None: keep nothing."""
    env = os.environ.get(PROBE_CACHE_ENV)
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cascade" / "probes.json"


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: the kept speed probes are not JSON ({e}); delete the file to probe again "
                         f"(or set {PROBE_CACHE_ENV}=\"\" to keep none)") from None
    bad = [k for k, v in kept.items() if not (isinstance(v, dict) and isinstance(v.get("speedup"), (int, float))
                                              and isinstance(v.get("measured"), str))] \
        if isinstance(kept, dict) else ["(the file is not an object)"]
    if bad:
        raise ValueError(f"{path}: kept speed probes {bad[:3]} are not {{'speedup': number, 'measured': time}}; "
                         f"delete the file to probe again")
    return kept


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: two readings of a probe agree where they are within this factor of each other (:func:`confirmed`)
AGREE = 1.25
MAX_READINGS = 5


def confirmed(measure: Callable[[], float]) -> float:
    """A probe's value that one burst of load cannot make: ``measure()`` twice, and where the two readings differ
    by more than :data:`AGREE` x, again up to :data:`MAX_READINGS` readings in all until two in a row agree; the
    median of the readings. (A sub-millisecond forward timed once on a shared machine was kept at 56x bf16 speed-up
    where it measured 0.5-0.6x after; kept, it would have steered every later process.)"""
    readings = [float(measure()), float(measure())]
    while len(readings) < MAX_READINGS and max(readings[-2:]) > AGREE * min(readings[-2:]):
        readings.append(float(measure()))
    if max(readings[-2:]) > AGREE * min(readings[-2:]):
        log.warning("speed probe readings disagree: %s; keeping their median", [round(r, 3) for r in readings])
    return float(np.median(readings))


def kept_speedup(key: str, measure: Callable[[], float]) -> tuple[float, str | None]:
    """(speed-up, when it was measured) of the probe named ``key`` (which names the machine, the thread count and
    what is timed): the kept value where the file has one, else :func:`confirmed` readings of ``measure()``, kept.
    When it was measured is None where nothing is kept (:func:`probe_cache_path` None) and the value is this
    call's own."""
    path = probe_cache_path()
    if path is None:
        return confirmed(measure), None
    entry = _read(path).get(key)
    if entry is None:
        value = confirmed(measure)  # outside the lock: a probe takes a while
        try:
            with _locked(path):
                kept = _read(path)
                if key not in kept:  # another process may have kept its own meanwhile: the first one wins
                    kept[key] = {"speedup": value, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                    os.replace(tmp, path)
                    log.info("speed probe kept in %s: %s -> %.3f", path, key, value)
                entry = kept[key]
        except OSError as e:  # a read-only home (a container): the run goes on, probing afresh, and says so
            log.warning("speed probe not kept: %s (%s); this process probes afresh, so another run may choose "
                        "otherwise: set %s to a writable file, or \"\" to keep none", path, e, PROBE_CACHE_ENV)
            return value, None
    return float(entry["speedup"]), entry["measured"]
