"""The index step: item towers -> FAISS inner-product index, with the recall / speed sweep and its operating point."""

from __future__ import annotations

from .. import artifacts as A
from ..data.requests import requests_frame, to_requests
from ..index.faiss_index import ItemIndex
from ..run_data import RunData, load_towers
from .config import IndexSection
from .runner import StepContext, StepResult


def run(ctx: StepContext) -> StepResult:
    c: IndexSection = ctx.config
    data = RunData(ctx.inputs["data"])
    outputs, metrics = [], {}
    valid = requests_frame(data.split_impressions("valid"), data.context_names)
    valid = valid.iloc[: c.sweep_queries]
    for variant_dir in sorted(p for p in (ctx.inputs["students"]).iterdir() if (p / "retrieval").is_dir()):
        towers = load_towers(variant_dir / "retrieval", data)
        n_real = len(data.item_ids)
        xb, ids = towers.item_emb[:n_real], towers.inputs.item_ids[:n_real]
        index = ItemIndex.build(xb, ids, metric="ip", factory=c.factory, seed=ctx.seed, omp_threads=c.omp_threads)
        xq = towers.user_embed(data, to_requests(valid, data.context_names))
        k = min(c.k, n_real)
        if not index.is_exact:
            index.sweep(xq, k)
            index.set_operating_point(c.recall_target)
        index.measure_recall(xq, k)
        model_hash = A.sha256_file(variant_dir / "retrieval" / "model.pt")
        index.save(ctx.out / variant_dir.name, model_hash=model_hash)
        metrics[variant_dir.name] = {"factory": index.factory, "backend": index.backend, "recall": index.recall_,
                                     "operating_points": index.operating_points_}
    outputs = sorted(str(p.relative_to(ctx.out)) for p in ctx.out.rglob("*") if p.is_file())
    return StepResult(outputs, metrics,
                      ", ".join(f"{k}: {v['factory']} on {v['backend']}" for k, v in metrics.items()))
