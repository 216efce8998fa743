"""One self-contained HTML report of the localization-vs-editing analysis (tables + plotly figures).

plotly.js is inlined exactly once (in ``<head>``) and every figure is embedded with ``include_plotlyjs=False``, so
the file works offline. Markdown tables (:func:`stats.tables.to_markdown`) and polars frames become HTML tables.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go
import polars as pl
from plotly.offline import get_plotlyjs

from locedit.stats.tables import to_markdown
from locedit.tracer.atomic import write_atomic

__all__ = ["markdown_to_html", "frame_to_html", "report_html", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
h1{font-size:1.6rem} h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table.stats{border-collapse:collapse;margin:0.5rem 0 1rem;font-size:0.9rem}
table.stats th,table.stats td{border:1px solid #ccc;padding:3px 8px}
table.stats th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:0.9rem}
dl.meta dt{font-weight:600}
"""

_SEP = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _inline(text: str) -> str:
    """Escape, then the two inline Markdown forms our tables use: **bold** and `code`."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _split_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells = re.split(r"(?<!\\)\|", s)
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(md: str) -> str:
    """Tiny Markdown → HTML: pipe tables (with alignment row), ``#`` headings, paragraphs, **bold**, `code`."""
    lines = md.splitlines()
    out: list[str] = []
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("|") and i + 1 < len(lines) and _SEP.match(lines[i + 1].strip()):
            flush()
            header = _split_row(line)
            aligns = ["right" if c.strip().endswith(":") else "left" for c in _split_row(lines[i + 1])]
            i += 2
            body = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append(_split_row(lines[i]))
                i += 1
            th = "".join(f"<th>{_inline(h)}</th>" for h in header)
            trs = []
            for row in body:
                tds = "".join(
                    f'<td class="num">{_inline(c)}</td>' if k < len(aligns) and aligns[k] == "right"
                    else f"<td>{_inline(c)}</td>" for k, c in enumerate(row))
                trs.append(f"<tr>{tds}</tr>")
            out.append(f'<table class="stats"><thead><tr>{th}</tr></thead><tbody>{"".join(trs)}</tbody></table>')
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            lvl = min(len(m.group(1)) + 2, 6)
            out.append(f"<h{lvl}>{_inline(m.group(2))}</h{lvl}>")
        elif line.strip():
            para.append(line.strip())
        else:
            flush()
        i += 1
    flush()
    return "\n".join(out)


def frame_to_html(df: pl.DataFrame, **markdown_kwargs) -> str:
    """A polars frame as an HTML table (formatted like :func:`stats.tables.to_markdown`)."""
    return markdown_to_html(to_markdown(df, **markdown_kwargs))


def report_html(
    tables: Mapping[str, str | pl.DataFrame],
    figures: Mapping[str, go.Figure],
    title: str = "Does localization inform editing?",
    meta: Mapping[str, object] | None = None,
) -> str:
    """A single self-contained HTML page: title, a metadata list, the tables (Markdown strings or polars frames)
    and the figures, with plotly.js inlined once."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>' if figures else "",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in meta.items())
        parts.append(f'<dl class="meta">{items}</dl>')
    if tables:
        parts.append("<h2>Tables</h2>")
        for name, tab in tables.items():
            body = frame_to_html(tab) if isinstance(tab, pl.DataFrame) else markdown_to_html(str(tab))
            parts.append(f'<section class="table"><h3>{html.escape(name)}</h3>{body}</section>')
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, fig in figures.items():
            div = fig.to_html(full_html=False, include_plotlyjs=False)
            parts.append(f'<section class="figure"><h3>{html.escape(name)}</h3>{div}</section>')
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(path: str | Path, *args, **kwargs) -> Path:
    """:func:`report_html` written to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, report_html(*args, **kwargs))
    return path
