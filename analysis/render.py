"""Render a report, given as a list of :class:`Block`, to Markdown and to self-contained HTML.

Tables go through pandas (``DataFrame.to_markdown``, which uses ``tabulate``, and
``DataFrame.to_html``) after their cells are formatted alike for both (:func:`fmt`); images are
linked from the Markdown and embedded as base64 in the HTML.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class Block:
    """One element of a report, rendered to Markdown and HTML alike."""

    kind: str  # h1 | h2 | h3 | p | code | table | img | list
    text: str = ""
    table: pd.DataFrame | None = None
    index: bool = False
    items: Sequence[str] = ()
    path: Path | None = None


def fmt(v: Any) -> str:
    """A table cell as text: floats to 4 significant digits (scientific when tiny or huge), NaN
    and missing values as ``NaN``, None as empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    try:
        if pd.isna(v):
            return "NaN"
    except (TypeError, ValueError):  # lists and other containers
        pass
    return str(v)


def _cells(df: pd.DataFrame, index: bool) -> pd.DataFrame:
    d = df.reset_index() if index else df
    return d.apply(lambda col: col.map(fmt)) if len(d.columns) else d


def md_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (cells as :func:`fmt` writes them)."""
    d = _cells(df, index)
    if not len(d.columns):
        return ""
    # tabulate neither escapes pipes nor keeps line breaks inside a cell.
    d = d.apply(lambda col: col.str.replace("|", "\\|", regex=False).str.replace("\n", " ", regex=False))
    d.columns = [str(c).replace("|", "\\|") for c in d.columns]
    return d.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def _inline_html(text: str) -> str:
    """Escape, then render `code` spans and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """The report as Markdown; images are linked relative to ``base`` (the report's folder)."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```bash\n" + b.text + "\n```")
        elif b.kind == "table" and b.table is not None:
            if b.text:
                out.append(f"*{b.text}*")
            out.append(md_table(b.table, b.index) if len(b.table) else "(empty)")
        elif b.kind == "img" and b.path is not None:
            out.append(f"![{b.text}]({b.path.relative_to(base).as_posix()})")
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; border-radius: 4px; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.caption { color: #555; font-style: italic; margin-bottom: 0; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """The report as one HTML page with its images embedded (base64)."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_html(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table" and b.table is not None:
            if b.text:
                body.append(f"<p class='caption'>{_inline_html(b.text)}</p>")
            if len(b.table):
                shown = b.table.apply(lambda col: col.map(fmt)) if len(b.table.columns) else b.table
                body.append(shown.to_html(index=b.index, border=0, escape=True))
            else:
                body.append("<p>(empty)</p>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                        f"<figcaption class='caption'>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
