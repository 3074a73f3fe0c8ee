"""The index step: item towers -> FAISS inner-product index, with the recall / speed sweep and its operating point."""

from __future__ import annotations

from pathlib import Path

from .. import artifacts as A
from ..config import from_dict
from ..data.requests import requests_frame, to_requests
from ..index.faiss_index import ItemIndex
from ..run_data import RunData, load_towers
from .config import IndexSection
from .runner import StepContext, StepResult


def tower_index(data: RunData, retrieval_dir: Path, c: IndexSection, seed: int) -> ItemIndex:
    """The FAISS inner-product index of a retrieval tower's item embeddings (``retrieval_dir``: a students/<variant>/
    retrieval folder), with its nprobe / efSearch sweep on the valid requests (approximate factories), the operating
    point of ``c.recall_target`` and the recall measured against exact search."""
    valid = requests_frame(data.split_impressions("valid"), data.context_names).iloc[: c.sweep_queries]
    towers = load_towers(retrieval_dir, data)
    n_real = len(data.item_ids)
    xb, ids = towers.item_emb[:n_real], towers.inputs.item_ids[:n_real]
    index = ItemIndex.build(xb, ids, metric="ip", factory=c.factory, seed=seed, omp_threads=c.omp_threads)
    xq = towers.user_embed(data, to_requests(valid, data.context_names))
    k = min(c.k, n_real)  # checks.check_against_data warns when index.k is above the corpus
    if not index.is_exact:
        index.sweep(xq, k)
        index.set_operating_point(c.recall_target)
    index.measure_recall(xq, k)
    return index


def build_run_index(run_dir: str | Path, out: str | Path, variant: str = "distilled",
                    c: IndexSection | None = None) -> dict:
    """`cascade index build --run RUN`: the index of a finished run's ``variant`` retrieval tower, written to
    ``out`` (index.faiss, item_ids.npy, manifest.json with the tower's hash); the tower and the data are checked
    against their step manifests first. c: the index settings (default: the run's own, from its config.json).
    Returns the index manifest."""
    run_dir = Path(run_dir)
    cfg = A.read_json(run_dir / "config.json")
    c = c or from_dict(IndexSection, cfg.get("index", {}), prefix="index")
    retrieval = run_dir / "students" / variant / "retrieval"
    if not retrieval.is_dir():
        have = sorted(p.name for p in (run_dir / "students").iterdir() if (p / "retrieval").is_dir()) \
            if (run_dir / "students").is_dir() else []
        raise FileNotFoundError(f"{retrieval}: the run has no {variant!r} retrieval tower (it has {have})")
    A.verify_listed(run_dir / "students", [f"{variant}/retrieval/model.pt", f"{variant}/retrieval/config.json"])
    data = RunData(run_dir / "data")
    index = tower_index(data, retrieval, c, int(cfg.get("run", {}).get("seed", 0)))
    return index.save(out, model_hash=A.sha256_file(retrieval / "model.pt"),
                      extra={"run": str(run_dir), "variant": variant})


def run(ctx: StepContext) -> StepResult:
    c: IndexSection = ctx.config
    data = RunData(ctx.inputs["data"])
    outputs, metrics = [], {}
    for variant_dir in sorted(p for p in (ctx.inputs["students"]).iterdir() if (p / "retrieval").is_dir()):
        index = tower_index(data, variant_dir / "retrieval", c, ctx.seed)
        model_hash = A.sha256_file(variant_dir / "retrieval" / "model.pt")
        index.save(ctx.out / variant_dir.name, model_hash=model_hash)
        metrics[variant_dir.name] = {"factory": index.factory, "backend": index.backend, "recall": index.recall_,
                                     "operating_points": index.operating_points_}
    outputs = sorted(str(p.relative_to(ctx.out)) for p in ctx.out.rglob("*") if p.is_file())
    return StepResult(outputs, metrics,
                      ", ".join(f"{k}: {v['factory']} on {v['backend']}" for k, v in metrics.items()))
