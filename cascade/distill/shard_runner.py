"""Rank-log scoring split over the ranks of a torch.distributed job (torchrun ranks or spawned processes).

Every rank passes the SAME ``requests`` and ``candidates`` (build them from the same seed) and its own scorer
(its own copy of the teacher, on its own GPU under NCCL). Rank r of W scores only the r-th contiguous block of
requests and writes it as ``out_dir/shard-r-of-W/`` (parquet parts + manifest) through
:func:`cascade.distill.ranklog.build_rank_log`; after a barrier rank 0 lists every shard in one
``out_dir/manifest.json`` (:func:`cascade.distill.ranklog.merge_manifests`, which re-hashes each shard), and after
a second barrier every rank returns that merged manifest, so ``RankLog(out_dir)`` reads one log identical to a
one-process log. ``out_dir`` must be on a filesystem every rank sees (across nodes: a shared mount). Without a
process group this is plain ``build_rank_log`` (no shard folders).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cascade import artifacts
from cascade import distributed as D
from cascade.distill.ranklog import Scorer, build_rank_log, merge_manifests

log = logging.getLogger(__name__)


def build_rank_log_distributed(requests: pd.DataFrame, candidates: np.ndarray, scorer: Scorer, out_dir: str | Path,
                               requests_per_batch: int = 256, shard_rows: int = 1_000_000, progress: bool = True,
                               item_ids: np.ndarray | None = None, seed: int | None = None,
                               sources: np.ndarray | None = None, source_names: list[str] | None = None,
                               workers: int = 1) -> dict:
    """Score this rank's block of ``requests`` (see the module docstring) and return the merged manifest.

    requests: one row per request (request_id, user_id, user_row, time_ms); candidates: int [R, L] item rows,
    -1 = none; scorer(request_rows [R_b], candidates [R_b, L]) -> logits [R_b, L]. The other arguments go to
    build_rank_log unchanged. A rank that fails raises on that rank; the others then wait in the barrier until
    the group's timeout, as any collective would.
    """
    env = D.current_env()
    kwargs = dict(requests_per_batch=requests_per_batch, shard_rows=shard_rows, progress=progress and env.is_main,
                  item_ids=item_ids, seed=seed, sources=sources, source_names=source_names, workers=workers)
    if not D.is_distributed():
        return build_rank_log(requests, candidates, scorer, out_dir, **kwargs)
    out_dir = Path(out_dir)
    build_rank_log(requests, candidates, scorer, out_dir, n_shards=env.world_size, shard_index=env.rank, **kwargs)
    D.barrier()  # every shard's manifest is on disk
    if env.is_main:
        merge_manifests(out_dir, env.world_size)
        log.info("rank log: merged %d shards into %s", env.world_size, out_dir)
    D.barrier()  # the merged manifest is on disk
    return artifacts.read_manifest(out_dir, verify=False)
