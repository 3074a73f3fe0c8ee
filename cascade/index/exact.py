"""Exact top-k search: the ground truth every approximate index is measured against.

Free functions over arrays in the faiss ``contrib`` style: ``xq`` queries ``[nq, d]``, ``xb`` database ``[nb, d]``,
results ``D`` (scores or distances) ``[nq, k]`` and ``I`` (row positions in ``xb``) ``[nq, k]``.

Metrics:
- ``"ip"`` (inner product, this project's metric): ``D`` holds ``<q, x>``, sorted in decreasing order.
- ``"l2"`` (squared Euclidean distance, only when asked for): ``D`` holds ``||q - x||^2``, sorted increasing.

Ties are broken by the lower row id, so the result is a deterministic function of the inputs. Where fewer than
``k`` rows exist, ``I`` is padded with -1 and ``D`` with -inf (``"ip"``) or +inf (``"l2"``).

Both the numpy function :func:`exact_topk` and the torch backend :class:`TorchExactIndex` work block by block over
queries AND database rows, so a large query batch never builds the full ``nq x nb`` score matrix.
"""

from __future__ import annotations

import logging

import numpy as np

from cascade.arrays import top_columns, topk_rows

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`; else raise naming the value."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not supported: use 'ip' (inner product) or 'l2' (asked for explicitly)")
    return metric


def as_float32_matrix(x, name: str, d: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 array ``[n, d]``; raise a ValueError naming ``name`` on a bad shape or value."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
            and (d is None or x.shape[1] == d)):  # the serving path's common case needs no conversion
        if hasattr(x, "detach"):  # a torch tensor, possibly on the GPU
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{name} must be a 2-d array [n, d], got shape {x.shape}")
        if d is not None and x.shape[1] != d:
            raise ValueError(f"{name} has dimension {x.shape[1]}, expected {d}")
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
    # one reduction (a batch-1 query costs ~60 us in all): a finite sum means every value is finite (nan and inf
    # propagate); a non-finite sum (also from float32 overflow of large finite values) falls through to the exact check
    if np.isfinite(x.sum()):
        return x
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{name} has a non-finite value {x[row, col]} at row {row}, column {col}")
    return x


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def exact_topk(
    xq,
    xb,
    k: int,
    metric: str = "ip",
    chunk_rows: int = 65536,
    query_rows: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``xb`` for each query (numpy, float32 scores).

    xq: [nq, d] queries; xb: [nb, d] database; k: results per query (k > nb pads with -1).
    metric: "ip" (largest inner product first) or "l2" (smallest squared distance first).
    chunk_rows: database rows per block; query_rows: queries per block. Peak extra memory is about
    ``query_rows * chunk_rows * 4`` bytes, whatever nq and nb are.
    Returns D [nq, k] float32 (scores for "ip", squared distances for "l2") and I [nq, k] int64 row positions,
    ties broken by the lower row id.
    """
    check_metric(metric)
    k = _check_k(k)
    xq = as_float32_matrix(xq, "xq")
    nq, d = xq.shape
    xb = as_float32_matrix(xb, "xb", d)
    nb = xb.shape[0]
    if chunk_rows < 1 or query_rows < 1:
        raise ValueError(f"chunk_rows and query_rows must be >= 1, got {chunk_rows}, {query_rows}")

    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    kk = min(k, nb)
    if kk == 0 or nq == 0:
        return (D if metric == "ip" else -D), I
    # "l2" ranks by -(||x||^2 - 2<q,x>): ||q||^2 is constant per query and added back at the end.
    xb_sq = (xb.astype(np.float64) ** 2).sum(1).astype(np.float32) if metric == "l2" else None
    for q0 in range(0, nq, query_rows):
        q = xq[q0:q0 + query_rows]
        best_v = np.zeros((len(q), 0), dtype=np.float32)
        best_i = np.zeros((len(q), 0), dtype=np.int64)
        for b0 in range(0, nb, chunk_rows):
            s = q @ xb[b0:b0 + chunk_rows].T
            if metric == "l2":
                s = 2.0 * s - xb_sq[None, b0:b0 + chunk_rows]
            # the block's best, in row order: the earlier best (lower rows) come first, so among equal scores
            # topk_rows' lower column is the lower row
            pos = np.sort(top_columns(s, min(kk, s.shape[1])), axis=1)
            v = np.take_along_axis(s, pos, axis=1)
            best_i, best_v = topk_rows(np.concatenate([best_v, v], 1), np.concatenate([best_i, pos + b0], 1), kk)
        if metric == "l2":
            q_sq = (q.astype(np.float64) ** 2).sum(1).astype(np.float32)
            best_v = np.maximum(q_sq[:, None] - best_v, 0.0)
        D[q0:q0 + len(q), :kk] = best_v
        I[q0:q0 + len(q), :kk] = best_i
    if metric == "l2":
        D[:, kk:] = np.inf
    return D, I


class TorchExactIndex:
    """Exact top-k with torch (``matmul`` + ``topk``), on CUDA when torch has it; chunked over queries and items.

    The backend used where torch sees a GPU but faiss has no GPU build. Ties are broken by the lower row id,
    as in :func:`exact_topk`.

    xb: [nb, d] database vectors (copied to ``device``); metric: "ip" or "l2"; device: a torch device string or
    None for "cuda" when available else "cpu"; chunk_rows / query_rows: block sizes.
    """

    def __init__(self, xb, metric: str, device: str | None = None, chunk_rows: int = 262144, query_rows: int = 1024):
        import torch

        self.metric = check_metric(metric)
        xb = as_float32_matrix(xb, "xb")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.xb = torch.from_numpy(xb).to(self.device)
        self.xb_sq = (self.xb.double() ** 2).sum(1).float() if metric == "l2" else None
        self.chunk_rows = int(chunk_rows)
        self.query_rows = int(query_rows)

    @property
    def ntotal(self) -> int:
        return int(self.xb.shape[0])

    @property
    def d(self) -> int:
        return int(self.xb.shape[1])

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xq: [nq, d] -> D [nq, k] float32, I [nq, k] int64 row positions (same conventions as exact_topk)."""
        import torch

        k = _check_k(k)
        xq = as_float32_matrix(xq, "xq", self.d)
        nq, nb = xq.shape[0], self.ntotal
        D = np.full((nq, k), -np.inf if self.metric == "ip" else np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, nb)
        if kk == 0 or nq == 0:
            return D, I
        with torch.no_grad():
            for q0 in range(0, nq, self.query_rows):
                q = torch.from_numpy(xq[q0:q0 + self.query_rows]).to(self.device)
                best_v = torch.full((len(q), kk), float("-inf"), device=self.device)
                best_i = torch.full((len(q), kk), nb, dtype=torch.int64, device=self.device)
                for b0 in range(0, nb, self.chunk_rows):
                    s = q @ self.xb[b0:b0 + self.chunk_rows].T
                    if self.metric == "l2":
                        s = 2.0 * s - self.xb_sq[None, b0:b0 + self.chunk_rows]
                    v, pos = _torch_block_topk(s, kk)
                    best_v, best_i = _torch_merge(torch.cat([best_v, v], 1), torch.cat([best_i, pos + b0], 1), kk)
                if self.metric == "l2":
                    q_sq = (q.double() ** 2).sum(1).float()
                    best_v = torch.clamp(q_sq[:, None] - best_v, min=0.0)
                D[q0:q0 + len(q), :kk] = best_v.cpu().numpy()
                I[q0:q0 + len(q), :kk] = best_i.cpu().numpy()
        return D, I


def _torch_block_topk(s, k: int):
    """Torch twin of :func:`cascade.arrays.top_columns`: values and columns of each row's k largest, ties to the
    lower column."""
    import torch

    k = min(k, s.shape[1])
    v, pos = torch.topk(s, k, dim=1)
    thr = v[:, -1:]
    n_ge = (s >= thr).sum(1)
    tied = torch.nonzero(n_ge > k).flatten()
    if tied.numel():
        st, tt = s[tied], thr[tied]
        gt, eq = st > tt, st == tt
        need = k - gt.sum(1, keepdim=True)
        keep = gt | (eq & (torch.cumsum(eq.int(), 1) <= need))
        p = torch.nonzero(keep)[:, 1].reshape(len(tied), k)
        pos[tied] = p
        v[tied] = torch.gather(st, 1, p)
    return v, pos


def _torch_merge(vals, ids, k: int):
    """Keep the k best per row, ordered by decreasing value then increasing id (two stable sorts)."""
    import torch

    o1 = torch.argsort(ids, dim=1, stable=True)
    vals, ids = torch.gather(vals, 1, o1), torch.gather(ids, 1, o1)
    o2 = torch.argsort(-vals, dim=1, stable=True)[:, :k]
    return torch.gather(vals, 1, o2), torch.gather(ids, 1, o2)


def clustered_vectors(
    n: int,
    d: int,
    n_clusters: int,
    rng: np.random.Generator,
    n_queries: int = 0,
    spread: float = 1.0,
    norm_range: tuple[float, float] = (0.5, 2.0),
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded embeddings with planted structure for index tests and benchmarks.

    Random gaussian vectors make ANN recall meaningless (every point is about equally far from every other), so
    points are drawn around ``n_clusters`` random unit-norm centres with gaussian noise of std ``spread / sqrt(d)``.
    Items are scaled by a norm drawn uniformly from ``norm_range``: non-normalised on purpose, so inner-product and
    L2 neighbours differ, as they do for trained item towers. Queries come from the same centres, unit norm.
    Returns xb [n, d] float32 items and xq [n_queries, d] float32 queries. chunk_rows: draw the items this many at
    a time (float64 only per chunk, for corpora of millions); the values are the same for any chunk size.
    """
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, n_clusters, size=m)] + rng.standard_normal((m, d)) * (spread / np.sqrt(d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    xb = np.empty((n, d), dtype=np.float32)
    chunk = max(1, chunk_rows or n)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        xb[s:s + m] = draw(m) * rng.uniform(norm_range[0], norm_range[1], size=(m, 1))
    return xb, draw(n_queries).astype(np.float32)
