"""The report written: ``report.json`` (the data, strict JSON), ``report.md`` and ``report.html``, both rendered
from one list of sections."""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.artifacts import ArtifactError, read_json, to_jsonable, write_json, write_text

from .blocks import Section, table_html, table_md
from .sections import header, report_sections

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def load_report(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/report.json`` back into a dict (NaN were stored as None). Raises ArtifactError when the file
    is missing, not JSON, or not a JSON object."""
    path = Path(out_dir) / REPORT_JSON
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_report(report_data: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write report.json, report.md and report.html into ``out_dir`` (atomically, each file whole or not at all).

    Returns the file names written, relative to ``out_dir``. Raises ValueError naming the offending key when a
    section has the wrong type (e.g. ``report_data['cascades']`` is a list) or a curve's arrays disagree in length.
    """
    if not isinstance(report_data, Mapping):
        raise ValueError(f"report_data must be a dict, got {type(report_data).__name__}")
    data = to_jsonable(report_data, "report_data")
    # render both documents before writing anything, so bad input leaves no partial report behind
    md = render_markdown(data)
    page = render_html(data)
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, data, sort_keys=False)
    write_text(out_dir / REPORT_MD, md)
    write_text(out_dir / REPORT_HTML, page)
    log.info("report written to %s", out_dir)
    return [REPORT_JSON, REPORT_MD, REPORT_HTML]


def render_markdown(report_data: Mapping[str, Any]) -> str:
    """The report as Markdown text (tables; the plots are only in the HTML)."""
    data = to_jsonable(report_data, "report_data")
    name, facts = header(data)
    return document_markdown(f"cascade report: {name}", facts, report_sections(data))


def document_markdown(title: str, facts: list[tuple[str, str]], sections: list[Section]) -> str:
    """A document of sections (the report, a comparison of runs) as Markdown: the plots become a pointer to the
    HTML page."""
    out = [f"# {title}", "", " · ".join(f"{k}: {v}" for k, v in facts), ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            kind = b[0]
            if kind == "note":
                out += [f"_{b[1]}_", ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "h3":
                out += [f"### {b[1]}", ""]
            elif kind == "pre":
                out += ["```toml", b[1], "```", ""]
            elif kind == "table":
                out += [table_md(b[1]), ""]
            elif kind == "img":
                out += [f"_Plot in the HTML page: {b[2]}._", ""]
            elif kind == "cards":
                pass  # the headline table that follows carries the same numbers
    return "\n".join(out).rstrip() + "\n"


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --band: #f4f6fa; --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
       "DejaVu Sans", sans-serif; color: var(--fg); background: #fff; }
main { max-width: 1200px; margin: 0 auto; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header .meta { color: var(--muted); margin: 0 0 12px; }
nav { display: flex; flex-wrap: wrap; gap: 4px 14px; padding: 8px 0 12px; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); text-decoration: none; font-size: 13px; }
section { margin-top: 26px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--band); }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note { color: var(--muted); font-style: italic; margin: 4px 0; }
p.expl { color: var(--muted); font-size: 12.5px; max-width: 900px; }
.tw { overflow-x: auto; margin: 6px 0 10px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); font-size: 12px; padding: 2px 0 4px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
/* headers and label cells may wrap, numbers never: a wide table then shrinks to the page instead of overflowing */
th, td.lab { white-space: normal; }
td.lab { min-width: 7em; }
thead th { background: var(--band); font-weight: 600; border-bottom: 2px solid var(--line); }
table.wide th, table.wide td { padding: 4px 6px; }
th.grp { text-align: center; border-left: 1px solid var(--line); }
th.sub { font-weight: 500; color: var(--muted); font-size: 12px; }
td.num, th.num { text-align: right; }
td.lab, th.lab { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfd; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; margin: 4px 0 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 300px;
        background: var(--band); }
.card h4 { margin: 0 0 6px; font-size: 14px; color: var(--accent); }
.card dl { display: grid; grid-template-columns: auto auto; gap: 2px 18px; margin: 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; text-align: right; font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0 14px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; }
pre { background: var(--band); border: 1px solid var(--line); border-radius: 4px; padding: 10px 12px;
      font-size: 12px; line-height: 1.35; overflow-x: auto; max-height: 640px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def render_html(report_data: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data: URIs, no script)."""
    data = to_jsonable(report_data, "report_data")
    name, facts = header(data)
    return document_html(f"cascade report: {name}", facts, report_sections(data),
                         "Written by cascade.eval.report; the numbers are in report.json beside this file.")


def document_html(title: str, facts: list[tuple[str, str]], sections: list[Section], footer: str = "") -> str:
    """A document of sections as one self-contained HTML page (inline CSS, plots as data: URIs, no script)."""
    e = html.escape
    body = [f"<header><h1>{e(title)}</h1>",
            '<p class="meta">' + " &middot; ".join(f"{e(k)}: <b>{e(v)}</b>" for k, v in facts) + "</p></header>",
            "<nav>" + "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for sec in sections:
        body.append(f'<section id="{sec.anchor}"><h2>{e(sec.title)}</h2>')
        for b in sec.blocks:
            kind = b[0]
            if kind == "note":
                body.append(f'<p class="note">{e(b[1])}</p>')
            elif kind == "p":
                body.append(f'<p class="expl">{e(b[1])}</p>')
            elif kind == "h3":
                body.append(f"<h3>{e(b[1])}</h3>")
            elif kind == "pre":
                body.append(f"<pre>{e(b[1])}</pre>")
            elif kind == "table":
                body.append(table_html(b[1]))
            elif kind == "img":
                b64 = base64.b64encode(b[1]).decode("ascii")
                body.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{b64}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
            elif kind == "cards":
                body.append('<div class="cards">')
                for card_title, items in b[1]:
                    dl = "".join(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in items)
                    body.append(f'<div class="card"><h4>{e(card_title)}</h4><dl>{dl}</dl></div>')
                body.append("</div>")
        body.append("</section>")
    if footer:
        body.append(f"<footer>{e(footer)}</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")
