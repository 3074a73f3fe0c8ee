"""The retrieval stage's item index: item-tower embeddings in a FAISS inner-product index, with an exact reference.

- :meth:`ItemIndex.build` turns ``xb [n, d]`` item embeddings plus their ``item_ids [n]`` into an index chosen by a
  faiss factory string ("Flat", "IVF{nlist},Flat", "HNSW{M}", "IVF{nlist},PQ{m}", "OPQ{m},IVF{nlist},PQ{m}") and an
  explicit metric ("ip" for this project; "l2" only when asked for: never a default).
- :meth:`ItemIndex.search` answers ``xq [nq, d] -> (scores [nq, k], item_ids [nq, k])`` in item ids, -1 padded.
- :meth:`ItemIndex.sweep` measures recall@k against exact search (:func:`cascade.index.exact.exact_topk`) and
  throughput over nprobe / efSearch values; :meth:`ItemIndex.set_operating_point` picks the cheapest one that
  reaches a recall target.
- IVF-PQ indexes re-rank a shortlist of ``k * k_factor`` PQ candidates from a second copy of the vectors,
  ``refine`` (:data:`REFINES`): "Flat" keeps the float32 vectors (exact inner products, 4 * d bytes per item on
  top of the PQ code), "SQfp16" half floats (2 * d bytes, scores exact to ~1e-3 relative), "SQ8" one byte per
  dimension (d bytes, 4x smaller than float32; the re-rank order is then approximate too). "SQ8" is the choice
  for corpora whose float32 vectors do not fit in memory (see benchmarks/bench_index_10m.py). With a non-"Flat"
  store the index holds no exact vectors, so recall is measured against ground truth the caller passes
  (``I_exact`` of :meth:`ItemIndex.measure_recall` / :meth:`ItemIndex.sweep`).
- :meth:`ItemIndex.save` / :meth:`ItemIndex.load` write and check the index file, the id map and a manifest
  (model hash, dim, metric, factory, backend, recall, operating points, file hashes). Loading refuses an index built
  for another model, dimension or metric (:class:`IndexMismatchError`) and a corrupted file (``ArtifactError``).

Backends (``device="auto"``): where faiss sees a GPU, the index lives on the GPU(s) ("faiss-gpu", sharded over
several GPUs); where torch has CUDA but faiss is a CPU build, exact search by torch matmul + topk on the GPU
("torch", :class:`cascade.index.exact.TorchExactIndex`), which on a GPU beats approximate search on the CPU for
corpora of a few million items; else faiss on the CPU ("faiss-cpu"). The choice is logged and kept in ``backend``.

Process-wide faiss settings (OpenMP threads, the BLAS threshold) and factory strings: :mod:`cascade.index.factory`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascade.artifacts import MANIFEST, ArtifactError, atomic_path, read_json, verify_outputs, write_manifest
from cascade.eval.metrics import mean_recall_at_k
from cascade.index.exact import TorchExactIndex, as_float32_matrix, check_metric, exact_topk
from cascade.index.factory import (
    DEFAULT_EF_SEARCHES,
    DEFAULT_NPROBES,
    GPU_MAX_K,
    blas_threshold_for,
    check_factory,
    check_omp_threads,
    check_refine,
    default_factory,
    faiss_metric,
    faiss_threads,
    import_faiss,
    parse_factory,
    select_backend,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.npy"


class IndexMismatchError(ArtifactError):
    """A saved index that does not fit the caller: another model hash, embedding dimension or metric."""


class UnreachableRecallError(ValueError):
    """No swept operating point reaches the recall target (the message names the best recall seen)."""


class ItemIndex:
    """Item embeddings in a faiss index (or the torch exact backend) with an item-id map and measured recall.

    Construct with :meth:`build` or :meth:`load`; the constructor only stores what they computed.

    Attributes: ``metric``, ``factory``, ``dim``, ``backend`` ("faiss-cpu" | "faiss-gpu" | "torch"),
    ``item_ids`` [n] int64, ``nprobe`` / ``ef_search`` / ``k_factor`` (search settings, None where not applicable),
    ``ef_construction`` (HNSW build setting), ``blas_threshold`` (see :func:`blas_threshold_for`),
    ``operating_points_`` (from :meth:`sweep`), ``recall_`` ({"recall_at_k", "k", "nq"} or None), ``seed``.
    """

    def __init__(
        self,
        cpu_index,
        item_ids: np.ndarray,
        *,
        metric: str,
        factory: str,
        backend: str,
        backend_reason: str = "",
        seed: int | None = None,
        k_factor: int | None = None,
        n_gpus: int | None = None,
        blas_threshold: int | None = 20,
        refine: str = "Flat",
        omp_threads: int | None = None,
    ):
        check_omp_threads(omp_threads)
        self.metric = check_metric(metric)
        self.factory = factory
        self.dim = int(cpu_index.d)
        self.item_ids = item_ids
        self._identity_ids: bool | None = None
        self.backend = backend
        self.backend_reason = backend_reason
        self.seed = seed
        self.k_factor = k_factor
        self.blas_threshold = blas_threshold
        self.omp_threads = omp_threads  # faiss's threads while it searches (faiss_threads)
        self.refine = check_refine(refine)
        self.spec = parse_factory(factory, self.dim)
        self.nprobe: int | None = None
        self.ef_search: int | None = None
        self.ef_construction: int | None = None
        self.operating_points_: list[dict] = []
        self.recall_: dict | None = None
        self._cpu_index = cpu_index  # kept for save/sweep on every backend; the live index may be a GPU clone
        self._live = cpu_index
        self._gpu_refs: list = []  # python references that keep GPU sub-indexes alive inside an IndexRefine
        self._torch: TorchExactIndex | None = None
        if backend == "faiss-gpu":
            self._live = self._to_gpu(cpu_index, n_gpus)
            if not isinstance(cpu_index, import_faiss().IndexRefine):
                # the GPU clone now holds the data; _host_index() copies it back when save/recall need it. (An
                # IndexRefine keeps its host copy: its exact vectors stay in host memory for re-ranking anyway.)
                self._cpu_index = None
        elif backend == "torch":
            if self.refine != "Flat":
                raise ValueError(f"the torch exact backend needs float32 vectors, but {factory!r} with "
                                 f"refine={refine!r} keeps none: use device='cpu' (or 'gpu' with faiss-gpu)")
            self._torch = TorchExactIndex(self._exact_vectors(), metric)
        log.info("item index: %s, metric=%s, %d items x %d, backend=%s (%s)", factory, metric, len(item_ids),
                 self.dim, backend, backend_reason)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        xb,
        item_ids,
        *,
        metric: str,
        factory: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        ef_construction: int | None = None,
        k_factor: int = 4,
        device: str = "auto",
        seed: int = 0,
        train_size: int | None = None,
        omp_threads: int | None = None,
        blas_threshold: int | None = 20,
        refine: str = "Flat",
    ) -> ItemIndex:
        """Build an index over item embeddings.

        xb: [n, d] float32 item vectors; item_ids: [n] int64 unique ids (any values >= 0, need not be contiguous).
        metric: "ip" (inner product: the project's metric) or "l2"; required, never defaulted.
        factory: see :func:`parse_factory`; None -> :func:`default_factory` (Flat below 200k items, else IVF).
        nprobe / ef_search: search-time settings for IVF / HNSW (None keeps faiss's defaults: nprobe 1, efSearch 16;
        use :meth:`sweep` + :meth:`set_operating_point` to choose them from measured recall).
        ef_construction: HNSW build-time beam (None keeps faiss's 40). Inner-product graphs over non-normalised
        vectors need more than L2 ones: on clustered 20k x 32 data HNSW32 reached recall@100 0.96 at efSearch 800 with
        40, and 0.98 at efSearch 400 with 200 (3x the build time).
        k_factor: PQ variants re-rank k * k_factor shortlisted items (k_factor 1: the PQ top-k, only reordered).
        refine: the re-rank store of PQ variants (:data:`REFINES`): "Flat" exact float32 inner products
        (IndexRefineFlat), "SQfp16" / "SQ8" a float16 / 8-bit copy (IndexRefine over an IndexScalarQuantizer,
        trained on the same rows as the PQ); see the module docs.
        device: "auto" | "cpu" | "gpu" | "torch" (see module docs). seed: k-means / PQ training seed and the seed of
        the training subsample. train_size: rows used to train IVF / PQ (default min(n, max(64 * nlist, 10000))).
        omp_threads: faiss's threads while it builds and searches (:func:`faiss_threads`); blas_threshold: batches
        of at least this many queries use one GEMM (:func:`blas_threshold_for`; None leaves faiss's setting alone).
        """
        import faiss

        xb = as_float32_matrix(xb, "xb")
        n, d = xb.shape
        item_ids = check_item_ids(item_ids, n)
        check_metric(metric)
        if n == 0:
            raise ValueError("xb has no rows: cannot build an index over an empty corpus")
        factory = factory or default_factory(n)
        spec = check_factory(factory, n, d)
        check_refine(refine)
        if refine != "Flat" and spec["kind"] != "ivfpq":
            raise ValueError(f"refine={refine!r} applies to IVF-PQ indexes, not {factory!r}")
        if k_factor < 1:
            raise ValueError(f"k_factor must be >= 1, got {k_factor}")
        backend, reason = select_backend(device)
        if backend == "faiss-gpu" and spec["kind"] == "hnsw":
            if device == "gpu":
                raise RuntimeError(f"factory {factory!r}: faiss has no GPU HNSW; use IVF on the GPU or device='cpu'")
            backend, reason = "faiss-cpu", "faiss has no GPU HNSW, so the HNSW index stays on the CPU"
            log.warning("item index: %s", reason)
        # k-means, graph construction and add on faiss's threads (checked first); k-means assignment and IVF add are
        # large batches
        with faiss_threads(omp_threads), blas_threshold_for(n, blas_threshold):
            t0 = time.perf_counter()
            index = faiss.index_factory(d, factory, faiss_metric(metric))
            if spec["kind"] in ("ivf", "ivfpq"):
                ivf = faiss.extract_index_ivf(index)
                ivf.cp.seed = seed
                if spec["kind"] == "ivfpq":
                    ivfpq = faiss.downcast_index(ivf)
                    ivfpq.pq.cp.seed = seed
                    # polysemous codes only serve Hamming pre-filtering, which we never use; training them took
                    # 25 of the 29 s to train IVF128,PQ8 on 10k x 32 here
                    ivfpq.do_polysemous_training = False
                if backend == "faiss-gpu":
                    # k-means on the GPU: training IVF4096 on 1M items takes minutes on a CPU, seconds on a GPU
                    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(d))
                n_train = train_size or min(n, max(64 * spec["nlist"], 10_000))
                n_train = min(n_train, n)
                rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train,
                                                                  replace=False)) if n_train < n else slice(None)
                index.train(xb[rows])
                if backend == "faiss-gpu":
                    ivf.clustering_index = None
            if ef_construction is not None:
                if spec["kind"] != "hnsw":
                    raise ValueError(f"ef_construction applies to HNSW indexes, not {factory!r}")
                index.hnsw.efConstruction = int(ef_construction)
            if spec["kind"] == "ivfpq":
                if refine == "Flat":
                    index = faiss.IndexRefineFlat(index)
                else:
                    qtype = {"SQfp16": faiss.ScalarQuantizer.QT_fp16, "SQ8": faiss.ScalarQuantizer.QT_8bit}[refine]
                    store = faiss.IndexScalarQuantizer(d, qtype, faiss_metric(metric))
                    store.train(xb[rows])  # per-dimension ranges (SQ8); a no-op for fp16
                    index = faiss.IndexRefine(index, store)
                index.k_factor = float(k_factor)
            index.add(xb)
            log.info("item index: built %s over %d x %d in %.2f s", factory, n, d, time.perf_counter() - t0)
        self = cls(index, item_ids, metric=metric, factory=factory, backend=backend, backend_reason=reason,
                   seed=seed, k_factor=k_factor if spec["kind"] == "ivfpq" else None, blas_threshold=blas_threshold,
                   refine=refine, omp_threads=omp_threads)
        self.ef_construction = ef_construction
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)
        return self

    # ------------------------------------------------------------------ search
    @property
    def is_exact(self) -> bool:
        """True when search returns the exact top-k (Flat index, or the torch exact backend)."""
        return self.spec["kind"] == "flat" or self.backend == "torch"

    @property
    def n_items(self) -> int:
        return int(len(self.item_ids))

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None,
                          k_factor: int | None = None) -> None:
        """Set IVF ``nprobe`` / HNSW ``ef_search`` / IVF-PQ ``k_factor`` (shortlist = k * k_factor; None leaves a
        setting as it is); raise where not applicable."""
        kind = self.spec["kind"]
        if k_factor is not None:
            if kind != "ivfpq":
                raise ValueError(f"k_factor applies to IVF-PQ indexes, not {self.factory!r}")
            if isinstance(k_factor, bool) or not isinstance(k_factor, (int, np.integer)) or k_factor < 1:
                raise ValueError(f"k_factor must be an integer >= 1, got {k_factor!r}")
            for index in {id(i): i for i in (self._live, self._cpu_index) if i is not None}.values():
                index.k_factor = float(k_factor)  # both are IndexRefine (the live one may hold a GPU base)
            self.k_factor = int(k_factor)
        if nprobe is not None:
            if kind not in ("ivf", "ivfpq"):
                raise ValueError(f"nprobe applies to IVF indexes, not {self.factory!r}")
            if not 1 <= nprobe <= self.spec["nlist"]:
                raise ValueError(f"nprobe {nprobe} must be in [1, nlist={self.spec['nlist']}]")
            self._set_param(self._live, "nprobe", nprobe)
            if self._cpu_index is not None and self._cpu_index is not self._live:
                self._set_param(self._cpu_index, "nprobe", nprobe)
            self.nprobe = int(nprobe)
        if ef_search is not None:
            if kind != "hnsw":
                raise ValueError(f"ef_search applies to HNSW indexes, not {self.factory!r}")
            if ef_search < 1:
                raise ValueError(f"ef_search must be >= 1, got {ef_search}")
            self._set_param(self._live, "efSearch", ef_search)
            self.ef_search = int(ef_search)

    def _set_param(self, index, name: str, value: int) -> None:
        import faiss

        gpu = self.backend == "faiss-gpu" and index is self._live
        ps = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
        ps.set_index_parameter(index, name, float(value))

    def search_positions(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, d] -> (D [nq, k] float32, I [nq, k] int64 row positions in the build order, -1 padded)."""
        xq = as_float32_matrix(xq, "xq", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self._torch is not None:
            return self._torch.search(xq, int(k))
        if self.backend == "faiss-gpu" and k * (self.k_factor or 1) > GPU_MAX_K:
            raise ValueError(f"k={k} (x k_factor {self.k_factor}) exceeds the faiss GPU limit of {GPU_MAX_K}")
        return self._faiss_search(self._live, xq, int(k))

    def _faiss_search(self, index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with faiss_threads(self.omp_threads), blas_threshold_for(len(xq), self.blas_threshold):
            D, I = index.search(xq, k)
        # faiss pads missing results with -1 and +-FLT_MAX; use +-inf so padding never looks like a score. Results
        # are sorted, so padding sits at the end of a row: one look at the last column tells whether there is any.
        if len(I) and (I[0, -1] < 0 if len(I) == 1 else I[:, -1].min() < 0):  # batch 1: a scalar look
            D[I < 0] = -np.inf if self.metric == "ip" else np.inf
        return D, I

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xq [nq, d] float32 user embeddings -> (scores [nq, k] float32, item_ids [nq, k] int64).

        Scores are inner products for "ip" (decreasing) or squared distances for "l2" (increasing). Where fewer
        than k items are found, item ids are -1 and scores -inf ("ip") / +inf ("l2").
        """
        D, I = self.search_positions(xq, k)
        return D, self._map_ids(I)

    def _map_ids(self, I: np.ndarray) -> np.ndarray:
        # ids 0..n-1 (every world run) need no lookup: at batch 1 the gather was 17-24% of a 0.15 ms search
        if self._identity_ids is None:
            ids = self.item_ids
            self._identity_ids = bool(len(ids) == 0 or (ids[0] == 0 and ids[-1] == len(ids) - 1
                                                        and np.array_equal(ids, np.arange(len(ids)))))
        if self._identity_ids:
            return I.astype(np.int64, copy=False)
        return np.where(I >= 0, self.item_ids[np.maximum(I, 0)], -1)

    # ------------------------------------------------------------------ recall
    def _exact_vectors(self) -> np.ndarray:
        """[n, d] float32 exact item vectors, read back from the index (every factory stores them, except IVF-PQ
        with a compressed re-rank store: that raises, since its reconstructions are not exact)."""
        import faiss

        if self.refine != "Flat":
            raise ValueError(f"item index {self.factory!r} with refine={self.refine!r} holds no exact vectors: pass "
                             "I_exact (exact top-k positions from exact_topk over the original vectors)")
        index = self._host_index()
        if isinstance(index, faiss.IndexRefine):
            return faiss.downcast_index(index.refine_index).reconstruct_n(0, index.ntotal)
        if self.spec["kind"] == "ivf":
            faiss.extract_index_ivf(index).make_direct_map()  # IVF lists are unordered: reconstruct needs the map
        return index.reconstruct_n(0, index.ntotal)

    def _host_index(self):
        """The CPU faiss index (a fresh CPU copy of the GPU index on the faiss-gpu backend)."""
        import faiss

        if self._cpu_index is not None:
            return self._cpu_index
        return faiss.index_gpu_to_cpu(self._live)

    def measure_recall(self, xq, k: int, I_exact: np.ndarray | None = None) -> float:
        """Recall@k of the current settings against exact search over the same vectors; stored in ``recall_``.

        xq: [nq, d] queries; I_exact: optional precomputed exact positions [nq, k] (from :func:`exact_topk`).
        """
        xq = as_float32_matrix(xq, "xq", self.dim)
        I_exact = self._exact_positions(xq, k, I_exact)
        _, I = self.search_positions(xq, k)
        r = mean_recall_at_k(I_exact, I)
        self.recall_ = {"recall_at_k": r, "k": int(k), "nq": int(len(xq)), "nprobe": self.nprobe,
                        "ef_search": self.ef_search}
        return r

    def _exact_positions(self, xq: np.ndarray, k: int, I_exact: np.ndarray | None) -> np.ndarray:
        """The exact top-k positions [nq, k] of ``xq``: computed when not given, shape-checked when given."""
        if I_exact is None:
            return exact_topk(xq, self._exact_vectors(), k, metric=self.metric)[1]
        if I_exact.shape != (len(xq), k):
            raise ValueError(f"I_exact must be [nq={len(xq)}, k={k}], got shape {I_exact.shape}")
        return I_exact

    def sweep(
        self,
        xq,
        k: int,
        nprobes: Sequence[int] | None = None,
        ef_searches: Sequence[int] | None = None,
        repeats: int = 1,
        I_exact: np.ndarray | None = None,
    ) -> list[dict]:
        """Measure operating points: recall@k vs exact search and batched queries per second.

        xq: [nq, d] held-out queries; k: results per query. IVF indexes sweep ``nprobes`` (default
        1..256, capped at nlist), HNSW sweeps ``ef_searches`` (default 16..512, values below k dropped since faiss
        searches with max(efSearch, k)), Flat gives one point. qps is the best of ``repeats`` timings.
        I_exact: optional exact top-k positions [nq, k] (required with a compressed re-rank store).
        On the torch backend the points describe the faiss CPU index that :meth:`save` writes.
        Returns and stores in ``operating_points_`` a list of {"param", "value", "recall_at_k", "qps", "k", "nq",
        "backend"}; the search settings in force before the sweep are restored.
        """
        xq = as_float32_matrix(xq, "xq", self.dim)
        I_exact = self._exact_positions(xq, k, I_exact)
        kind = self.spec["kind"]
        index = self._live if self._torch is None else self._cpu_index
        backend = self.backend if self._torch is None else "faiss-cpu"
        if kind in ("ivf", "ivfpq"):
            if ef_searches is not None:
                raise ValueError(f"ef_searches applies to HNSW, not {self.factory!r}")
            param, values = "nprobe", [v for v in (nprobes or DEFAULT_NPROBES) if 1 <= v <= self.spec["nlist"]]
        elif kind == "hnsw":
            if nprobes is not None:
                raise ValueError(f"nprobes applies to IVF, not {self.factory!r}")
            param, values = "efSearch", [v for v in (ef_searches or DEFAULT_EF_SEARCHES) if v >= k] or [k]
        else:
            param, values = None, [None]
        if not values:
            raise ValueError(f"no sweep value is valid for {self.factory!r} (nlist={self.spec.get('nlist')})")
        before = {"nprobe": self.nprobe, "efSearch": self.ef_search}
        points = []
        for v in sorted(values, key=lambda x: -1 if x is None else x):
            if param is not None:
                self._set_param(index, param, v)
            best = math.inf
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                _, I = self._faiss_search(index, xq, k)
                best = min(best, time.perf_counter() - t0)
            points.append({"param": param, "value": v, "recall_at_k": mean_recall_at_k(I_exact, I),
                           "qps": len(xq) / max(best, 1e-9), "k": int(k), "nq": int(len(xq)), "backend": backend})
            log.info("sweep %s=%s: recall@%d %.4f, %.0f q/s", param, v, k, points[-1]["recall_at_k"], points[-1]["qps"])
        if param is not None:
            # restore the settings in force before the sweep (faiss defaults where none were set)
            restore = before[param] if before[param] is not None else (1 if param == "nprobe" else 16)
            self._set_param(index, param, restore)
        self.operating_points_ = points
        return points

    def set_operating_point(self, recall_target: float) -> dict:
        """Apply the cheapest swept point (smallest nprobe / efSearch) whose recall@k >= ``recall_target``.

        Raises if :meth:`sweep` has not run, or :class:`UnreachableRecallError` if no point reaches the target (naming
        the best recall seen).
        Returns the chosen point; ``recall_`` records its recall.
        """
        if not self.operating_points_:
            raise RuntimeError("set_operating_point needs operating points: call sweep(xq, k) first")
        ok = [p for p in self.operating_points_ if p["recall_at_k"] >= recall_target]
        if not ok:
            best = max(self.operating_points_, key=lambda p: p["recall_at_k"])
            raise UnreachableRecallError(
                f"no operating point of {self.factory!r} reaches recall@{best['k']} >= {recall_target}: the best is "
                f"{best['recall_at_k']:.4f} at {best['param']}={best['value']}; sweep larger "
                "values or use another factory"
            )
        p = min(ok, key=lambda p: -1 if p["value"] is None else p["value"])
        if p["param"] == "nprobe":
            self.set_search_params(nprobe=p["value"])
        elif p["param"] == "efSearch":
            self.set_search_params(ef_search=p["value"])
        self.recall_ = {"recall_at_k": p["recall_at_k"], "k": p["k"], "nq": p["nq"], "nprobe": self.nprobe,
                        "ef_search": self.ef_search}
        log.info("item index: operating point %s=%s (recall@%d %.4f >= %.3f)", p["param"], p["value"], p["k"],
                 p["recall_at_k"], recall_target)
        return p

    def index_bytes(self) -> int:
        """Size of the serialised faiss index (the memory it needs, near enough), in bytes."""
        import faiss

        return int(faiss.serialize_index(self._host_index()).nbytes)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes an IVF-PQ index holds in memory, by part, from its sizes: "codes" (PQ codes, n x code_size), "ids"
        (n x 8, the IVF lists' ids), "coarse" (nlist x d_ivf x 4), "codebooks" (PQ centroids and the OPQ matrix),
        "refine" (the re-rank store, n x 4d / 2d / d bytes for Flat / SQfp16 / SQ8) and "total". Unlike
        :meth:`index_bytes` nothing is serialised (at 10M items that would copy the whole index once more).
        """
        import faiss

        if self.spec["kind"] != "ivfpq":
            raise ValueError(f"memory_bytes covers IVF-PQ indexes, not {self.factory!r}; use index_bytes()")
        host = self._host_index()
        base = faiss.downcast_index(host.base_index)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(base))
        n = int(ivf.ntotal)
        opq = 0
        if isinstance(base, faiss.IndexPreTransform):  # the OPQ matrix, d_in x d_out (OPQ{m}_{dout} may reduce d)
            vt = faiss.downcast_VectorTransform(base.chain.at(0))
            opq = int(vt.d_in) * int(vt.d_out) * 4
        out = {"codes": n * int(ivf.code_size), "ids": n * 8, "coarse": int(ivf.nlist) * int(ivf.d) * 4,
               "codebooks": int(ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub) * 4 + opq,
               "refine": n * int(faiss.downcast_index(host.refine_index).code_size)}
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, directory, model_hash: str, extra: Mapping[str, Any] | None = None) -> dict:
        """Write ``index.faiss`` (CPU version), ``item_ids.npy`` and, last, ``manifest.json`` into ``directory``.

        model_hash: hash of the user/item tower the embeddings came from (load checks it). extra: JSON-able
        metadata stored under the manifest's "extra" key. Returns the manifest.
        """
        import faiss

        if not isinstance(model_hash, str) or not model_hash:
            raise ValueError(f"model_hash must be a non-empty string, got {model_hash!r}")
        directory = Path(directory)
        host = self._host_index()
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(host, str(tmp))
        with atomic_path(directory / IDS_FILE) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.save on a path would append ".npy" to the temp name
                np.save(f, self.item_ids, allow_pickle=False)
        if self.recall_ is None and not self.is_exact:
            log.warning("item index: saving an approximate index with no measured recall (call sweep/measure_recall)")
        config = {"factory": self.factory, "metric": self.metric, "nprobe": self.nprobe, "ef_search": self.ef_search,
                  "ef_construction": self.ef_construction, "k_factor": self.k_factor, "refine": self.refine}
        # no times in the file (no timestamp, no queries / s): equal indexes give equal manifests, so a redone
        # index step leaves its hashes and the cache of later steps intact; sweep() returns the speeds
        return write_manifest(
            directory,
            kind="index",
            config=config,
            seed=self.seed,
            inputs={"model_hash": model_hash},
            outputs=[INDEX_FILE, IDS_FILE],
            metrics={"recall": self.recall_},
            stamp=False,
            extra={
                "model_hash": model_hash,
                "embedding_dim": self.dim,
                "metric": self.metric,
                "factory": self.factory,
                "n_items": self.n_items,
                "backend": self.backend,
                "backend_reason": self.backend_reason,
                "is_exact": self.is_exact,
                "recall": self.recall_,
                "operating_points": [{k: v for k, v in p.items() if k != "qps"} for p in self.operating_points_],
                "extra": dict(extra or {}),
            },
        )

    @classmethod
    def load(
        cls,
        directory,
        expect_model_hash: str | None = None,
        expect_dim: int | None = None,
        expect_metric: str | None = "ip",
        device: str = "auto",
        omp_threads: int | None = None,
        blas_threshold: int | None = 20,
    ) -> ItemIndex:
        """Load an index written by :meth:`save`, refusing one that does not fit or is damaged.

        expect_model_hash / expect_dim / expect_metric: raise :class:`IndexMismatchError` naming both values when
        the manifest says otherwise (None skips a check). Every file is re-hashed against the manifest and a
        corrupted one raises ``ArtifactError`` naming it. device: as in :meth:`build` (the saved backend is not
        reused: a GPU-built index loads on a CPU machine and vice versa).
        """
        import faiss

        directory = Path(directory)
        m = read_json(directory / MANIFEST)
        where = directory / MANIFEST
        if m.get("kind") != "index":
            raise ArtifactError(f"{where}: not an item-index manifest (kind={m.get('kind')!r})")
        if expect_model_hash is not None and m["model_hash"] != expect_model_hash:
            raise IndexMismatchError(
                f"{where}: user tower hash {expect_model_hash} does not match the index's {m['model_hash']}: "
                "the item embeddings came from another model; rebuild the index"
            )
        if expect_dim is not None and int(m["embedding_dim"]) != int(expect_dim):
            raise IndexMismatchError(
                f"{where}: user embedding dimension {expect_dim} does not match the index's {m['embedding_dim']}"
            )
        if expect_metric is not None and m["metric"] != expect_metric:
            raise IndexMismatchError(f"{where}: expected metric {expect_metric!r} does not match "
                                     f"the index's {m['metric']!r}")
        verify_outputs(directory, m)
        backend, reason = select_backend(device)
        spec = parse_factory(m["factory"], int(m["embedding_dim"]))
        if backend == "faiss-gpu" and spec["kind"] == "hnsw":
            if device == "gpu":
                raise RuntimeError(f"factory {m['factory']!r}: faiss has no GPU HNSW; load with device='cpu'")
            backend, reason = "faiss-cpu", "faiss has no GPU HNSW, so the HNSW index stays on the CPU"
        check_omp_threads(omp_threads)
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:
            raise ArtifactError(f"{directory / INDEX_FILE}: faiss cannot read it ({e})") from None
        item_ids = np.load(directory / IDS_FILE, allow_pickle=False)
        if index.d != int(m["embedding_dim"]) or index.ntotal != len(item_ids) or len(item_ids) != int(m["n_items"]):
            raise ArtifactError(
                f"{directory}: index has {index.ntotal} x {index.d}, id map {len(item_ids)} ids, manifest "
                f"{m['n_items']} x {m['embedding_dim']}: the files do not belong together"
            )
        cfg = m["config"]
        self = cls(index, item_ids.astype(np.int64), metric=m["metric"], factory=m["factory"], backend=backend,
                   backend_reason=reason, seed=m.get("seed"), k_factor=cfg.get("k_factor"),
                   blas_threshold=blas_threshold, refine=cfg.get("refine", "Flat"), omp_threads=omp_threads)
        self.ef_construction = cfg.get("ef_construction")
        self.set_search_params(nprobe=cfg.get("nprobe"), ef_search=cfg.get("ef_search"))
        self.operating_points_ = list(m.get("operating_points") or [])
        self.recall_ = m.get("recall")
        return self

    # ------------------------------------------------------------------ GPU
    def _to_gpu(self, cpu_index, n_gpus: int | None):
        """Clone a CPU index onto all visible GPUs (sharded when there are several).

        An IndexRefineFlat is split: its IVF-PQ base goes to the GPU(s), the exact vectors used for re-ranking stay
        in host memory (GPU clone of IndexRefine is not supported by faiss's cloner).
        """
        import faiss

        co = faiss.GpuMultipleClonerOptions()
        ngpu = n_gpus or faiss.get_num_gpus()
        co.shard = ngpu > 1  # shard the items over GPUs: capacity and throughput both scale
        co.useFloat16 = False  # keep float32 scores, so recall matches the CPU index's
        if isinstance(cpu_index, faiss.IndexRefine):
            base = faiss.index_cpu_to_all_gpus(faiss.downcast_index(cpu_index.base_index), co=co, ngpu=ngpu)
            refine = faiss.downcast_index(cpu_index.refine_index)
            live = faiss.IndexRefine(base, refine)
            live.k_factor = cpu_index.k_factor
            self._gpu_refs = [base, refine, cpu_index]
            return live
        return faiss.index_cpu_to_all_gpus(cpu_index, co=co, ngpu=ngpu)


def check_item_ids(item_ids, n: int) -> np.ndarray:
    """``item_ids`` as int64 [n]: one unique id >= 0 per row of xb; raise a ValueError saying what is wrong."""
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"item_ids must be a 1-d array of {n} ids (one per row of xb), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"item_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if n and ids.min() < 0:
        raise ValueError(f"item_ids must be >= 0 (-1 marks padding), got {ids.min()}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"item_ids must be unique: id {uniq[counts > 1][0]} appears {counts.max()} times")
    return ids
