"""Factory strings, backends and the process-wide faiss settings of :class:`cascade.index.faiss_index.ItemIndex`.

Process-wide faiss settings that decide CPU speed (measured by benchmarks/bench_index.py):
- ``faiss.cvar.distance_compute_blas_threshold``: with the shipped 128000 a batch of queries scans the corpus once
  per query instead of one GEMM. Measured here (100k x 64 Flat, k=100, 1 thread): 128000 -> 1269 q/s for a batch
  of 500, 20 -> 4715 q/s; but for a single query 20 is 4x slower (256 vs 1082 q/s). So each search sets it:
  ``blas_threshold`` (20) for batches of at least that many queries, faiss's default for smaller ones. It is a
  process-wide variable, and the two paths' scores differ in the last digits, so searches from several Python
  threads that need different values take turns (:func:`blas_threshold_for`); those that need the same one run
  side by side.
- ``faiss.omp_set_num_threads`` (``omp_threads``): single queries are fastest on 1 thread; on this 2-core machine
  shared with other jobs, 2 OpenMP threads made batched Flat search 15x slower (spinning threads fight for the core).
  faiss and torch share one OpenMP runtime in a process, so this count is torch's intra-op thread count too: it is
  set only while faiss works (:func:`faiss_threads`) and given back after.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator
from typing import Any

BACKENDS = ("faiss-cpu", "faiss-gpu", "torch")
DEVICES = ("auto", "cpu", "gpu", "torch")
FLAT_MAX_ITEMS = 200_000
# up to 256: the index step picks the cheapest point that reaches its recall target, and a 1 M-item corpus of a
# weakly trained tower needed more than 64 of 4,096 lists for recall@100 >= 0.95
DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_EF_SEARCHES = (16, 32, 64, 128, 256, 512)
GPU_MAX_K = 2048  # faiss GPU k-selection limit
FAISS_BLAS_THRESHOLD_DEFAULT = 128_000  # faiss's shipped distance_compute_blas_threshold
REFINES = ("Flat", "SQfp16", "SQ8")  # re-rank stores of IVF-PQ indexes: float32, float16, 8-bit per dimension

FACTORIES = {
    "flat": re.compile(r"^Flat$"),
    "ivf": re.compile(r"^IVF(?P<nlist>\d+),Flat$"),
    "hnsw": re.compile(r"^HNSW(?P<M>\d+)(,Flat)?$"),
    "ivfpq": re.compile(r"^(OPQ(?P<opq>\d+)(_\d+)?,)?IVF(?P<nlist>\d+),PQ(?P<m>\d+)(x(?P<nbits>\d+))?$"),
}



def parse_factory(factory: str, d: int, name: str = "factory") -> dict[str, Any]:
    """Classify a factory string: {"kind": "flat"|"ivf"|"hnsw"|"ivfpq", "nlist", "M", "m", ...}; raise on others.
    name: what the messages call the string (e.g. the command-line option it came from)."""
    for kind, pat in FACTORIES.items():
        m = pat.match(factory)
        if m:
            out = {"kind": kind, **{k: int(v) for k, v in m.groupdict().items() if v is not None}}
            zero = [k for k, v in out.items() if k != "kind" and v < 1]
            if zero:
                raise ValueError(f"{name} {factory!r}: {zero[0]} must be >= 1")
            if kind == "ivfpq" and d % out["m"] != 0:
                raise ValueError(f"{name} {factory!r}: PQ{out['m']} needs the dimension {d} to "
                                 f"be a multiple of {out['m']}")
            if kind == "ivfpq" and "opq" in out and out["opq"] != out["m"]:
                raise ValueError(f"{name} {factory!r}: OPQ{out['opq']} must match PQ{out['m']}")
            return out
    raise ValueError(
        f"{name} {factory!r} is not supported: use 'Flat', 'IVF{{nlist}},Flat', 'HNSW{{M}}', 'IVF{{nlist}},PQ{{m}}' "
        "or 'OPQ{m},IVF{nlist},PQ{m}'"
    )


def check_factory(factory: str, n: int, d: int, name: str = "factory") -> dict[str, Any]:
    """:func:`parse_factory`, and its sizes against a corpus of ``n`` items of dimension ``d``: an IVF with more
    lists than items raises (k-means cannot make them)."""
    spec = parse_factory(factory, d, name)
    if "nlist" in spec and spec["nlist"] > n:
        raise ValueError(f"{name} {factory!r}: nlist {spec['nlist']} exceeds the {n:,} items to cluster")
    return spec


def default_factory(n_items: int) -> str:
    """The factory used when none is given.

    Below :data:`FLAT_MAX_ITEMS` (200k) items exact "Flat" search is cheap enough (about 1 ms per query at 100k x 64
    on one core, and one GEMM for a batch) that approximation buys little and costs recall. Above it, "IVF{nlist},Flat"
    with nlist ~ 4 * sqrt(n) rounded to a power of two: each list then holds ~sqrt(n)/4 items, which balances the
    coarse-quantizer cost (nlist dot products) against the list scan (nprobe * n / nlist), and IVF builds 10-30x
    faster than HNSW here at equal recall on clustered embeddings (benchmarks/bench_index.py, BENCHMARKS.md).
    """
    if n_items < FLAT_MAX_ITEMS:
        return "Flat"
    return ivf_factory(n_items)


def ivf_factory(n_items: int) -> str:
    """"IVF{nlist},Flat" for ``n_items`` items: nlist ~ 4 * sqrt(n) rounded to a power of two (see
    :func:`default_factory`)."""
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(n_items))))
    return f"IVF{nlist},Flat"


def select_backend(device: str) -> tuple[str, str]:
    """Map a device request to (backend, reason). Raises where an explicit request cannot be met."""
    import faiss

    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not supported: use one of {DEVICES}")
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if device == "cpu":
        return "faiss-cpu", "requested"
    if device == "gpu":
        if faiss_gpus == 0:
            raise RuntimeError("device='gpu' asked for a faiss GPU index, but this faiss build sees no GPU "
                               "(install faiss-gpu on a CUDA machine, or use device='auto'/'torch'/'cpu')")
        return "faiss-gpu", f"requested; {faiss_gpus} GPU(s)"
    if device == "torch":
        return "torch", "requested"
    if faiss_gpus > 0:
        return "faiss-gpu", f"faiss sees {faiss_gpus} GPU(s)"
    try:
        import torch

        if torch.cuda.is_available():
            return "torch", "torch has CUDA but faiss is a CPU build: exact torch matmul + topk on the GPU"
    except ImportError:  # torch is a dependency; this only guards odd installs
        pass
    return "faiss-cpu", "no GPU visible to faiss or torch"


def check_omp_threads(omp_threads: int | None) -> None:
    """A ValueError unless ``omp_threads`` is None or an integer >= 1."""
    if omp_threads is not None and (isinstance(omp_threads, bool) or not isinstance(omp_threads, int)
                                    or omp_threads < 1):
        raise ValueError(f"omp_threads must be an integer >= 1 (or None), got {omp_threads!r}")


@contextlib.contextmanager
def faiss_threads(omp_threads: int | None) -> Iterator[None]:
    """faiss's OpenMP thread count is ``omp_threads`` inside the block (None: left as it is) and what it was after.
    It is the process's OpenMP count, torch's intra-op threads included: a count left set after an index was built
    made every later torch step of a pipeline run on it, whatever ``run.threads`` said."""
    check_omp_threads(omp_threads)
    if omp_threads is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(omp_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class _BlasSetting:
    """faiss's process-wide BLAS threshold, held at one value by every search that runs. A search needing another
    value waits until those running finish, and while one waits no new search joins the running ones (it would
    never get its turn); searches needing the same value, with none waiting for another, run side by side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: dict[int, int] = {}  # value -> searches waiting for it

    def _may_run(self, value: int) -> bool:
        import faiss

        if self._running == 0:
            return True
        others = sum(n for v, n in self._waiting.items() if v != value)
        return faiss.cvar.distance_compute_blas_threshold == value and others == 0

    @contextlib.contextmanager
    def held(self, value: int) -> Iterator[None]:
        import faiss

        with self._cond:
            self._waiting[value] = self._waiting.get(value, 0) + 1
            try:
                self._cond.wait_for(lambda: self._may_run(value))
            finally:
                self._waiting[value] -= 1
            faiss.cvar.distance_compute_blas_threshold = value
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


_BLAS = _BlasSetting()


@contextlib.contextmanager
def blas_threshold_for(nq: int, blas_threshold: int | None) -> Iterator[None]:
    """The block runs a faiss search (or build) of nq queries: BLAS (one GEMM) for batches of >= blas_threshold
    queries, faiss's default (a scan per query, faster for one or a few queries) below, held for the block against
    other threads' searches. None leaves the setting alone."""
    if blas_threshold is None:
        yield
        return
    with _BLAS.held(int(blas_threshold) if nq >= blas_threshold else FAISS_BLAS_THRESHOLD_DEFAULT):
        yield


def import_faiss():
    import faiss

    return faiss


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def check_refine(refine: str) -> str:
    if refine not in REFINES:
        raise ValueError(f"refine {refine!r} is not supported: use one of {REFINES}")
    return refine
