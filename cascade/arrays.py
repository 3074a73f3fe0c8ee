"""Array conventions and helpers shared by every layer (numpy only).

PAD (-1) marks an empty slot in an id matrix: a candidate list shorter than its row, a result list with fewer
than k items. Item, user and request ids of every supported source are never negative.
"""

from __future__ import annotations

import numpy as np

PAD = -1


def topk_rows(scores: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (item, score) by score; pads (item -1) sort last. scores, items: [B, N]."""
    b, n = scores.shape
    scores = np.where(items == PAD, -np.inf, scores).astype(np.float32)
    k_eff = min(k, n)
    if k_eff < n:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.broadcast_to(np.arange(n), (b, n))
    s = np.take_along_axis(scores, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    out_s = np.take_along_axis(scores, idx, 1)
    out_i = np.take_along_axis(items, idx, 1)
    out_i = np.where(np.isfinite(out_s), out_i, PAD)
    if k_eff < k:
        out_s = np.pad(out_s, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
        out_i = np.pad(out_i, ((0, 0), (0, k - k_eff)), constant_values=PAD)
    return out_i.astype(np.int64), out_s
