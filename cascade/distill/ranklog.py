"""The rank log: teacher-scored candidate lists, the knowledge the two-tower students learn from.

For each training request the teacher scores a candidate set (the impressed items first, then items sampled from
the corpus) and the log keeps one row per (request, candidate) in long format:

    request_id, user_id, time_ms, item_id, teacher_logit, rank        (rank 1 = the teacher's best in the request)

plus the dense rows the students index with (``request_row``, ``user_row``, ``item_row``) and ``slot``, the
candidate's position in its list, so the reader restores the lists exactly. A log built with ``sources`` also has
an int8 ``source`` column indexing the manifest's ``source_names`` (e.g. impressed / a channel / sample) and the
manifest's ``source_share`` (each source's share of the rows). Rows are written as parquet shards
through :mod:`cascade.artifacts` (atomic) with a manifest listing each shard's sha256, row count and requests.

Scale-out: ``build_rank_log(..., n_shards=S, shard_index=k)`` scores and writes only the k-th contiguous block of
requests into ``out_dir/shard-k-of-S/`` with its own manifest, so S processes (or torchrun ranks) can write in
parallel; :func:`merge_manifests` then lists every shard in one ``out_dir/manifest.json``. The merged log reads
back identical to a one-pass log.

The reader (:class:`RankLog`) verifies the hashes and builds padded arrays with one sort (``np.unique``) and a
vectorised scatter: no per-request Python.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from cascade import artifacts
from cascade.arrays import distinct, first_occurrences
from cascade.data.sampling import CdfSampler
from cascade.data.schema import DataValidationError, check_columns
from cascade.threads import ordered_map

log = logging.getLogger(__name__)

KIND = "rank_log"  # the manifest kind of a rank log
#: Columns of a rank-log shard, in file order.
COLUMNS = ("request_id", "user_id", "time_ms", "item_id", "teacher_logit", "rank",
           "request_row", "user_row", "item_row", "slot")
SOURCE = "source"  # the optional column: where a candidate came from (an index into the manifest's source_names)
REQUEST_COLUMNS = {"request_id": "int", "user_id": "int", "user_row": "int", "time_ms": "int"}

Scorer = Callable[[np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]


# ----------------------------------------------------------------------------------------------------------------
# candidate sampling
# ----------------------------------------------------------------------------------------------------------------

def _draw(n_rows: int, n_draw: int, n_items: int, pop: CdfSampler | None, uniform_frac: float,
          rng: np.random.Generator) -> np.ndarray:
    """[n_rows, n_draw] item rows: each draw uniform with probability uniform_frac, else popularity-weighted."""
    out = rng.integers(0, n_items, size=(n_rows, n_draw))
    if pop is None or uniform_frac >= 1.0:
        return out
    is_pop = rng.random((n_rows, n_draw)) >= uniform_frac
    out[is_pop] = pop.draw(rng.random(int(is_pop.sum())))
    return out


def sample_candidates(impressed: np.ndarray, n_items: int, n_candidates: int = 200,
                      pop_weights: np.ndarray | None = None, uniform_frac: float = 0.5,
                      rng: np.random.Generator | None = None, max_rounds: int = 4) -> np.ndarray:
    """Candidate lists for the teacher: the impressed items first, then corpus samples, no repeats in a row.

    impressed: int [R, Lmax] item rows padded with -1 (a repeat is kept once; more than n_candidates impressed
    items are cut to the first n_candidates). Samples come one draw at a time from the mixture
    ``uniform_frac * uniform + (1 - uniform_frac) * pop_weights / sum(pop_weights)``, keeping first occurrences
    (sampling without replacement by successive draws). Drawing is vectorised: each round oversamples every short
    row and deduplicates with one sort; after ``max_rounds`` the rows still short (a corpus barely larger than
    the list) are completed with uniformly permuted unused items. A row is padded with -1 only where the corpus
    has fewer than n_candidates items.

    Returns int64 [R, n_candidates] item rows.
    """
    if rng is None:
        raise ValueError("sample_candidates: pass rng=np.random.default_rng(seed); randomness is never implicit")
    impressed = np.asarray(impressed)
    if impressed.ndim != 2:
        raise ValueError(f"sample_candidates: impressed must be [R, Lmax], got shape {impressed.shape}")
    if not np.issubdtype(impressed.dtype, np.integer):
        raise ValueError(f"sample_candidates: impressed must hold integer item rows, got {impressed.dtype}")
    if n_items <= 0 or n_candidates <= 0:
        raise ValueError(f"sample_candidates: n_items and n_candidates must be > 0, got {n_items}, {n_candidates}")
    if not 0.0 <= uniform_frac <= 1.0:
        raise ValueError(f"sample_candidates: uniform_frac must be in [0, 1], got {uniform_frac}")
    bad = (impressed < -1) | (impressed >= n_items)
    if bad.any():
        raise ValueError(f"sample_candidates: impressed item row {impressed[bad][0]} is outside [-1, {n_items})")
    pop = None
    if pop_weights is not None:
        w = np.asarray(pop_weights, dtype=np.float64)
        if w.shape != (n_items,):
            raise ValueError(f"sample_candidates: pop_weights must have shape ({n_items},), got {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("sample_candidates: pop_weights must be finite, >= 0 and not all 0")
        pop = CdfSampler.from_weights(w)
    elif uniform_frac < 1.0:
        log.debug("sample_candidates: no pop_weights, all samples are uniform")

    target = min(n_candidates, n_items)
    out, n_valid = first_occurrences(impressed.astype(np.int64, copy=False), n_candidates)
    for _ in range(max_rounds):
        short = np.flatnonzero(n_valid < target)
        if short.size == 0:
            break
        need = int((target - n_valid[short]).max())
        # oversample: popular items repeat, so draw twice the gap plus a margin
        draws = _draw(short.size, 2 * need + 16, n_items, pop, uniform_frac, rng)
        merged, nv = first_occurrences(np.concatenate([out[short], draws], axis=1), n_candidates)
        out[short], n_valid[short] = merged, nv
    short = np.flatnonzero(n_valid < target)
    if short.size:
        # exact completion: a random permutation of all items per short row, chunked to bound memory
        chunk = max(1, 20_000_000 // n_items)
        for s in range(0, short.size, chunk):
            rows = short[s:s + chunk]
            perm = np.argsort(rng.random((rows.size, n_items)), axis=1)
            merged, nv = first_occurrences(np.concatenate([out[rows], perm], axis=1), n_candidates)
            out[rows], n_valid[rows] = merged, nv
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------

def _ranks(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rank 1..n_valid per row (1 = highest logit; ties broken by slot order), 0 at invalid slots. [B, L] -> [B, L]."""
    s = np.where(valid, -logits.astype(np.float64), np.inf)
    order = np.argsort(s, axis=1, kind="stable")
    ranks = np.empty(s.shape, dtype=np.int32)
    np.put_along_axis(ranks, order, np.arange(1, s.shape[1] + 1, dtype=np.int32)[None, :], axis=1)
    ranks[~valid] = 0
    return ranks


def _shard_dir(out_dir: Path, n_shards: int | None, shard_index: int | None) -> Path:
    return out_dir if n_shards is None else out_dir / f"shard-{shard_index:05d}-of-{n_shards:05d}"


def build_rank_log(requests: pd.DataFrame, candidates: np.ndarray, scorer: Scorer, out_dir: str | Path,
                   requests_per_batch: int = 256, shard_rows: int = 1_000_000, n_shards: int | None = None,
                   shard_index: int | None = None, progress: bool = True, item_ids: np.ndarray | None = None,
                   seed: int | None = None, sources: np.ndarray | None = None,
                   source_names: list[str] | None = None, workers: int = 1) -> dict:
    """Score every request's candidate list with the teacher and write the long-format log. Returns the manifest.

    requests: one row per request with int columns ``request_id, user_id, user_row, time_ms`` (row r of the frame
    is request row r: it indexes the per-request context arrays). candidates: int [R, L] item rows, -1 = none.
    scorer(request_rows int64 [R_b], candidates int64 [R_b, L]) -> logits [R_b, L] (numpy or torch): one call
    per batch of ``requests_per_batch`` requests; padded slots are passed as item row 0 and their scores
    ignored. item_ids: int [I] item row -> raw item id (default: the row is the id). sources: int [R, L], each
    slot's source (an index into ``source_names``; -1 at padding), written as the ``source`` column.

    Files: ``part-00000.parquet``, ... (a new part once ``shard_rows`` rows are buffered; a part ends on a batch
    boundary, so it may exceed shard_rows by one batch) and ``manifest.json``. With ``n_shards``/``shard_index``
    only the shard_index-th contiguous block of requests is scored, written under ``out_dir/shard-k-of-S/``;
    combine the shards with :func:`merge_manifests`.

    workers > 1: that many threads score whole batches at once, torch at one intra-op thread each meanwhile
    (:mod:`cascade.threads`; the scorer must be thread-safe, as :func:`cascade.models.scoring.ranker_scorer` is); the
    log keeps the batches' order.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_columns(requests, REQUEST_COLUMNS, "build_rank_log: requests")
    candidates = np.asarray(candidates)
    n_req = len(requests)
    if candidates.ndim != 2 or candidates.shape[0] != n_req:
        raise ValueError(f"build_rank_log: candidates must be [R={n_req}, L], got shape {candidates.shape}")
    if not np.issubdtype(candidates.dtype, np.integer):
        raise ValueError(f"build_rank_log: candidates must hold integer item rows, got {candidates.dtype}")
    if requests_per_batch <= 0 or shard_rows <= 0 or workers <= 0:
        raise ValueError("build_rank_log: requests_per_batch, shard_rows and workers must be > 0")
    if (n_shards is None) != (shard_index is None):
        raise ValueError("build_rank_log: give both n_shards and shard_index, or neither")
    if n_shards is not None and not (n_shards >= 1 and 0 <= shard_index < n_shards):
        raise ValueError(f"build_rank_log: shard_index {shard_index} is not in [0, n_shards={n_shards})")
    rid = requests["request_id"].to_numpy(np.int64)
    if len(distinct(rid)) != n_req:
        raise DataValidationError("build_rank_log: requests: column 'request_id' has duplicate values")
    if (sources is None) != (source_names is None):
        raise ValueError("build_rank_log: give both sources and source_names, or neither")
    if sources is not None:
        sources = np.asarray(sources)
        if sources.shape != candidates.shape:
            raise ValueError(f"build_rank_log: sources must have the candidates' shape {candidates.shape}, "
                             f"got {sources.shape}")
        bad = (candidates >= 0) & ((sources < 0) | (sources >= len(source_names)))
        if bad.any():
            raise ValueError(f"build_rank_log: a candidate's source {sources[bad][0]} is not an index into "
                             f"source_names {list(source_names)}")
        sources = sources.astype(np.int8)
    columns = COLUMNS if sources is None else (*COLUMNS, SOURCE)
    if item_ids is not None:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        n_items = len(item_ids)
    else:
        n_items = None
    hi = candidates.max(initial=-1)
    if candidates.min(initial=0) < -1 or (n_items is not None and hi >= n_items):
        raise ValueError(f"build_rank_log: candidates hold item rows outside [-1, {n_items}) "
                         f"(min {candidates.min()}, max {hi})")

    lo_r, hi_r = 0, n_req
    if n_shards is not None:
        bounds = np.linspace(0, n_req, n_shards + 1).round().astype(np.int64)
        lo_r, hi_r = int(bounds[shard_index]), int(bounds[shard_index + 1])
    shard_dir = _shard_dir(out_dir, n_shards, shard_index)
    shard_dir.mkdir(parents=True, exist_ok=True)

    uid = requests["user_id"].to_numpy(np.int64)
    urow = requests["user_row"].to_numpy(np.int64)
    tms = requests["time_ms"].to_numpy(np.int64)
    L = candidates.shape[1]
    slot_row = np.arange(L, dtype=np.int16 if L < 2**15 else np.int32)

    parts: list[dict] = []
    buf: list[dict[str, np.ndarray]] = []
    buffered = 0
    score_s = 0.0

    def flush() -> None:
        nonlocal buf, buffered
        if not buf:
            return
        cols = {c: np.concatenate([b[c] for b in buf]) for c in columns}
        name = f"part-{len(parts):05d}.parquet"
        with artifacts.atomic_path(shard_dir / name) as tmp:
            pq.write_table(pa.table(cols), tmp)
        rows_here = cols["request_row"]
        parts.append({"path": name, "rows": int(len(rows_here)),
                      "n_requests": int(len(distinct(rows_here)))})
        buf, buffered = [], 0

    def score_batch(s: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """(start, candidates [R_b, L], valid, logits, ranks, scoring seconds) of the batch of requests from row
        s."""
        e = min(s + requests_per_batch, hi_r)
        cand = candidates[s:e].astype(np.int64, copy=False)
        valid = cand >= 0
        ts = time.perf_counter()
        logits = scorer(np.arange(s, e, dtype=np.int64), np.where(valid, cand, 0))
        took = time.perf_counter() - ts
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != cand.shape:
            raise ValueError(f"build_rank_log: scorer returned shape {logits.shape}, expected {cand.shape}")
        if not np.isfinite(logits[valid]).all():
            r_bad = s + int(np.argwhere(~np.isfinite(np.where(valid, logits, 0.0)))[0, 0])
            raise ValueError(f"build_rank_log: scorer returned a non-finite logit for request_id {rid[r_bad]}")
        return s, cand, valid, logits, _ranks(logits, valid), took

    starts = range(lo_r, hi_r, requests_per_batch)
    batches = ordered_map(score_batch, starts, workers)
    for s, cand, valid, logits, ranks, took in tqdm(batches, total=len(starts), disable=not progress,
                                                    desc="rank log", unit="batch"):
        score_s += took
        rows = np.arange(s, s + len(cand), dtype=np.int64)
        rr = np.broadcast_to(rows[:, None], cand.shape)[valid]
        item_row = cand[valid]
        buf.append({
            "request_id": rid[rr], "user_id": uid[rr], "time_ms": tms[rr],
            "item_id": item_ids[item_row] if item_ids is not None else item_row,
            "teacher_logit": logits[valid], "rank": ranks[valid].astype(np.int16 if L < 2**15 else np.int32),
            "request_row": rr, "user_row": urow[rr].astype(np.int32), "item_row": item_row.astype(np.int32),
            "slot": np.broadcast_to(slot_row, cand.shape)[valid],
            **({SOURCE: sources[s:s + len(cand)][valid]} if sources is not None else {}),
        })
        buffered += len(rr)
        if buffered >= shard_rows:
            flush()
    flush()

    wall = time.perf_counter() - t0
    n_rows = sum(p["rows"] for p in parts)
    config = {"requests_per_batch": requests_per_batch, "shard_rows": shard_rows, "n_candidates": int(L),
              "n_shards": n_shards, "shard_index": shard_index}
    # the manifest holds what the inputs determine (no times), so an unchanged redo writes the same bytes
    man = artifacts.write_manifest(
        shard_dir, kind=KIND, config=config, seed=seed, inputs={}, outputs=[p["path"] for p in parts],
        metrics={"n_rows": n_rows}, stamp=False,
        extra={"shards": _with_hashes(parts, shard_dir), "n_requests": hi_r - lo_r, "n_rows": n_rows,
               "request_row_range": [lo_r, hi_r], "n_requests_total": n_req, "n_items": n_items,
               "columns": list(columns), **_source_fields(sources, source_names, lo_r, hi_r)},
    )
    log.info("rank log: %d requests, %d pairs in %.2fs (%.0f pairs/s, scorer %.2f thread-seconds on %d worker%s) "
             "-> %s", hi_r - lo_r, n_rows, wall, n_rows / max(wall, 1e-9), score_s, workers,
             "s" if workers > 1 else "", shard_dir)
    # the timings go back to the caller only
    return {**man, "wall_s": wall, "metrics": {**man["metrics"], "score_s": score_s,
                                               "pairs_per_s": n_rows / wall if wall > 0 else None}}


def _source_fields(sources: np.ndarray | None, names: list[str] | None, lo: int, hi: int) -> dict:
    """The manifest's source_names and source_counts (rows per source over request rows [lo, hi)), if any."""
    if sources is None:
        return {}
    block = sources[lo:hi]
    counts = np.bincount(block[block >= 0].astype(np.int64), minlength=len(names))
    return {"source_names": list(names), "source_counts": {n: int(c) for n, c in zip(names, counts)},
            "source_share": _shares(counts, names)}


def _shares(counts, names: list[str]) -> dict[str, float]:
    total = max(int(np.sum(counts)), 1)
    return {n: float(c) / total for n, c in zip(names, counts)}


def _with_hashes(parts: list[dict], base: Path, prefix: str = "") -> list[dict]:
    return [{**p, "path": prefix + p["path"], "sha256": artifacts.sha256_file(base / p["path"])} for p in parts]


def merge_manifests(out_dir: str | Path, n_shards: int) -> dict:
    """Combine the per-shard logs ``out_dir/shard-k-of-S/`` (k = 0..S-1) into one ``out_dir/manifest.json``.

    Verifies every shard's files against its own manifest and that the shards' request blocks tile [0, R).
    """
    out_dir = Path(out_dir)
    shards, outputs, n_rows, n_req, cfg0 = [], [], 0, 0, None
    names0, columns0, counts = None, None, None
    expected_lo = 0
    total = None
    for k in range(n_shards):
        d = _shard_dir(out_dir, n_shards, k)
        m = artifacts.read_manifest(d, verify=True)
        if m.get("kind") != KIND or m["config"].get("n_shards") != n_shards or m["config"].get("shard_index") != k:
            raise artifacts.ArtifactError(f"{d / artifacts.MANIFEST}: not shard {k} of {n_shards} of a rank log")
        lo, hi = m["request_row_range"]
        if lo != expected_lo:
            raise artifacts.ArtifactError(f"{d}: covers request rows [{lo}, {hi}) but "
                                          f"[{expected_lo}, ...) was expected")
        expected_lo = hi
        total = m["n_requests_total"] if total is None else total
        cfg = {k2: v for k2, v in m["config"].items() if k2 != "shard_index"}
        if cfg0 is None:
            cfg0 = cfg
        elif cfg != cfg0:
            raise artifacts.ArtifactError(f"{d}: shard config {cfg} differs from shard 0's {cfg0}")
        if k == 0:
            names0, columns0 = m.get("source_names"), m.get("columns", list(COLUMNS))
            counts = dict.fromkeys(names0 or (), 0)
        elif m.get("source_names") != names0 or m.get("columns", list(COLUMNS)) != columns0:
            raise artifacts.ArtifactError(f"{d}: shard columns / source names differ from shard 0's")
        for name, c in (m.get("source_counts") or {}).items():
            counts[name] += c
        prefix = d.name + "/"
        for s in m["shards"]:
            shards.append({**s, "path": prefix + s["path"]})
            outputs.append(prefix + s["path"])
        n_rows += m["n_rows"]
        n_req += m["n_requests"]
    if expected_lo != total:
        raise artifacts.ArtifactError(f"{out_dir}: the shards cover request rows [0, {expected_lo}) of {total}")
    return artifacts.write_manifest(
        out_dir, kind=KIND, config={**cfg0, "shard_index": None}, seed=None, inputs={}, outputs=outputs,
        metrics={"n_rows": n_rows}, stamp=False,
        extra={"shards": shards, "n_requests": n_req, "n_rows": n_rows, "request_row_range": [0, total],
               "n_requests_total": total, "n_items": m.get("n_items"), "columns": columns0,
               **({"source_names": names0, "source_counts": counts,
                   "source_share": _shares(list(counts.values()), names0)} if names0 else {})},
    )


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------

class RankLog:
    """A rank log read back as padded arrays (R = requests in the log, ordered by request row; L = list width).

    items int64 [R, L] item rows (-1 = padding); ranks int64 [R, L] (1 = best, 0 = padding); logits float32
    [R, L] (0 at padding); mask bool [R, L]; request_rows, request_ids, user_rows, user_ids, time_ms int64 [R].
    sources int8 [R, L] (an index into source_names, -1 at padding) and source_names, where the log records
    where each candidate came from (else None).
    Slot j of request r is the j-th candidate passed to build_rank_log, so a round trip restores the input.
    verify=True re-hashes every shard against the manifest first.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = artifacts.read_manifest(self.path, verify=verify)
        if self.manifest.get("kind") != KIND:
            raise artifacts.ArtifactError(f"{self.path / artifacts.MANIFEST}: kind "
                                          f"{self.manifest.get('kind')!r} is not a {KIND}")
        tables = [pq.read_table(self.path / s["path"]) for s in self.manifest["shards"]]
        if tables:
            missing = [c for c in COLUMNS if c not in tables[0].column_names]
            if missing:
                raise artifacts.ArtifactError(f"{self.path / self.manifest['shards'][0]['path']}: "
                                              f"missing columns {missing}")
        self.source_names = self.manifest.get("source_names")
        names = (*COLUMNS, SOURCE) if self.source_names is not None else COLUMNS
        if tables and self.source_names is not None and SOURCE not in tables[0].column_names:
            raise artifacts.ArtifactError(f"{self.path}: the manifest names sources but the shards have no "
                                          f"{SOURCE!r} column")
        col = {c: (np.concatenate([t.column(c).to_numpy() for t in tables]) if tables else np.zeros(0, np.int64))
               for c in names}
        self._build(col)

    def _build(self, col: dict[str, np.ndarray]) -> None:
        n = len(col["request_row"])
        # one sort: the distinct request rows, where each first appears, and each log row's request index
        self.request_rows, first, inv = np.unique(col["request_row"], return_index=True, return_inverse=True)
        r = len(self.request_rows)
        width = int(col["slot"].max()) + 1 if n else 0
        slot = col["slot"].astype(np.int64)
        self.items = np.full((r, width), -1, dtype=np.int64)
        self.ranks = np.zeros((r, width), dtype=np.int64)
        self.logits = np.zeros((r, width), dtype=np.float32)
        self.mask = np.zeros((r, width), dtype=bool)
        self.items[inv, slot] = col["item_row"]
        self.ranks[inv, slot] = col["rank"]
        self.logits[inv, slot] = col["teacher_logit"]
        self.mask[inv, slot] = True
        self.sources = None
        if SOURCE in col:
            self.sources = np.full((r, width), -1, dtype=np.int8)
            self.sources[inv, slot] = col[SOURCE]
        if int(self.mask.sum()) != n:
            raise artifacts.ArtifactError(f"{self.path}: some (request, slot) pairs appear more than once")
        self.request_ids = col["request_id"][first].astype(np.int64)
        self.user_ids = col["user_id"][first].astype(np.int64)
        self.user_rows = col["user_row"][first].astype(np.int64)
        self.time_ms = col["time_ms"][first].astype(np.int64)
        self.item_ids_flat = col["item_id"]
        self._item_row_flat = col["item_row"]

    def __len__(self) -> int:
        return len(self.request_rows)

    @property
    def width(self) -> int:
        return self.items.shape[1]

    def check_inputs(self, item_ids: np.ndarray, user_ids: np.ndarray | None = None,
                     request_ids: np.ndarray | None = None) -> None:
        """Check that the log's rows agree with the given row -> id maps (the encoder's), raising on a mismatch."""
        for what, rows, ids, ref in (("item", self._item_row_flat, self.item_ids_flat, item_ids),
                                     ("user", self.user_rows, self.user_ids, user_ids),
                                     ("request", self.request_rows, self.request_ids, request_ids)):
            if ref is None:
                continue
            ref = np.asarray(ref)
            if len(rows) and rows.max() >= len(ref):
                raise artifacts.ArtifactError(f"{self.path}: {what} row {rows.max()} is beyond "
                                              f"the {len(ref)} known rows")
            bad = ref[rows] != ids
            if bad.any():
                j = int(np.argmax(bad))
                raise artifacts.ArtifactError(f"{self.path}: {what} row {rows[j]} holds id {ids[j]} in the log but "
                                              f"{ref[rows[j]]} in the given map: the log belongs to another encoding")

    def subset(self, idx: np.ndarray) -> RankLog:
        """The requests ``idx`` (positions, int [n]) as a RankLog of their own (arrays copied; same path and
        manifest), e.g. a fixed sample to follow a student's fit of the teacher's lists epoch by epoch."""
        idx = np.asarray(idx, dtype=np.int64)
        out = copy.copy(self)
        for name in ("items", "ranks", "logits", "mask", "request_rows", "request_ids", "user_ids", "user_rows",
                     "time_ms", "sources"):
            if getattr(self, name) is not None:
                setattr(out, name, getattr(self, name)[idx])
        id_of_row = np.zeros(int(self._item_row_flat.max(initial=-1)) + 1, dtype=np.int64)
        id_of_row[self._item_row_flat] = self.item_ids_flat
        out._item_row_flat = out.items[out.mask]
        out.item_ids_flat = id_of_row[out._item_row_flat]
        return out

    def tensors(self, idx: np.ndarray | slice = slice(None)) -> dict[str, torch.Tensor]:
        """The requests ``idx`` as torch tensors: items/ranks [B, L] int64, logits [B, L] f32, mask [B, L] bool,
        request_rows/user_rows [B] int64."""
        return {
            "items": torch.from_numpy(self.items[idx]), "ranks": torch.from_numpy(self.ranks[idx]),
            "logits": torch.from_numpy(self.logits[idx]), "mask": torch.from_numpy(self.mask[idx]),
            "request_rows": torch.from_numpy(self.request_rows[idx]),
            "user_rows": torch.from_numpy(self.user_rows[idx]),
        }

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` requests (the last one smaller): in order, or one seeded permutation."""
        if batch_size <= 0:
            raise ValueError(f"RankLog.batches: batch_size must be > 0, got {batch_size}")
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for s in range(0, len(self), batch_size):
            yield self.tensors(order[s:s + batch_size])
