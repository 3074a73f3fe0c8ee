"""The per-run report: ``report.json`` (the data), ``report.md`` (tables) and ``report.html`` (one self-contained
page: inline CSS, plots as base64 PNG ``<img>``; no script, no external URL).

The pipeline assembles one plain dict ``report_data`` and calls :func:`write_report`. Its schema (every section is
optional; a missing or ``None`` section is rendered as a one-line "not computed in this run" note)::

    run:       {name, created (when the report was built), machine (the run's, from its manifests),
                report_machine (where the report was built), config: dict, versions: dict, step_wall_s: {step: s}}
    data:      {summary: {fact: scalar}, splits: {train|valid|test: {rows, requests, ctr, start, end}}}
    cascades:  {variant: {stages: {retrieval|prerank|rank: {size, teacher_recall, click_recall, ndcg, auc, gauc,
                                                            rand_auc?, p50_ms, p95_ms, p99_ms}},
                          end_to_end: {p50_ms, p95_ms, p99_ms, requests_per_s_batch1, requests_per_s_batched,
                                       batch_size},
                          oracle: {oracle_clicks, oracle_best, oracle_ratio} | None,
                          recall_curves: {stage: {k: [int], teacher_recall: [float]}},
                          latency_samples_ms: {stage | end_to_end: [float]}}}
    index:     {variant, factory, backend, metric, is_exact, n_items, dim, recall_vs_exact, recall_k, recall_target,
                operating_points: [{param, value, recall_at_k, qps}], operating_point: {param, value} | None}
    models:    [{name, role, auc, gauc, logloss, rand_auc?, rand_gauc?, latency_ms_per_100, n_params, size_mb}]
    training:  {model: {epoch: [int], loss: [float], valid: [float | None], valid_metric: str | None}} | None
    ablation:  {metrics: [str], seeds: [int], rows: [{name, stage, values: {metric: {mean, std, n}}}]} | None

JSON has no NaN: ``report.json`` stores NaN / inf as ``null`` (strict JSON that any parser reads), so
:func:`load_report` gives ``None`` where the pipeline had NaN; the renderers show both as "–".
:func:`cascade.artifacts.to_jsonable` is exactly the transformation ``load_report(write_report(d))`` applies.

Both documents are built from one list of sections (title + blocks: tables, plots, notes, preformatted text), so
the Markdown and the HTML cannot drift apart; the Markdown leaves the plots to the HTML. Plots use matplotlib's
object API with an explicit Agg canvas: no pyplot global state, no backend switch in the caller's process.

Modules: ``blocks`` (formatting, the document model, data access), ``plots``, ``sections``, ``render`` (writing
and reading the three files). ``tools/render_report.py`` checks a page in headless Chromium.
"""

from .blocks import format_value, markdown_table
from .render import REPORT_HTML, REPORT_JSON, REPORT_MD, load_report, render_html, render_markdown, write_report
from .sections import toml_dump

__all__ = ["REPORT_HTML", "REPORT_JSON", "REPORT_MD", "format_value", "load_report", "markdown_table", "render_html",
           "render_markdown", "toml_dump", "write_report"]
