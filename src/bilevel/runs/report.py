"""A run report: one self-contained HTML page (styles and images inlined, no scripts).

A :class:`Report` collects headings, paragraphs, tables, key-value lists and figures (PNG
files, PNG bytes or matplotlib figures, inlined as base64 data URIs), then writes one file
that any browser opens offline, e.g. ``report.html`` in a run directory::

    report = Report("bilevel denoise", subtitle="runs/denoise-1")
    report.table(["method", "PSNR (dB)"], [["TV", 26.9], ["learned", 27.4]])
    report.figure(fig, "test PSNR against cost")
    report.write(run_dir / "report.html")
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel.problem import BilevelError
from bilevel.runs.rundir import write_text

__all__ = ["Report", "format_value"]

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } .subtitle { color: #666; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; color: #555; font-size: 0.9em; padding-top: 0.3em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; max-width: 36em; }
.note { color: #555; font-size: 0.92em; }
"""


def format_value(value: Any) -> str:
    """A table cell: floats with 4 significant digits, None as an en dash, rest as str."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    cls = ' class="num"' if number else ""
    return f"<td{cls}>{html.escape(format_value(value))}</td>"


class Report:
    """An HTML page built block by block; :meth:`write` saves it (see the module docstring)."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.blocks: list[str] = []

    def heading(self, text: str) -> None:
        """A section heading."""
        self.blocks.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, note: bool = False) -> None:
        """A paragraph of plain text (escaped); ``note`` sets it in smaller grey type."""
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(
        self,
        header: Sequence[str],
        rows: Iterable[Sequence[Any]],
        caption: str | None = None,
    ) -> None:
        """A table; cells are formatted by :func:`format_value`."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def key_values(self, values: Mapping[str, Any], caption: str | None = None) -> None:
        """A two-column table of names and values (e.g. the configuration)."""
        self.table(["option", "value"], [[k, v] for k, v in values.items()], caption)

    def figure(self, image: Any, caption: str = "", width: int | None = None) -> None:
        """An inlined PNG: a path to a PNG file, PNG bytes, or a matplotlib figure."""
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise BilevelError(f"report figure {path} does not exist")
            data = path.read_bytes()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        elif hasattr(image, "savefig"):
            from bilevel.runs.plots import figure_png

            data = figure_png(image)
        else:
            raise BilevelError(
                f"a report figure is a PNG path, PNG bytes or a matplotlib figure, got "
                f"{type(image).__name__}"
            )
        if not data.startswith(b"\x89PNG"):
            raise BilevelError("report figures must be PNG images")
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        style = f' style="width:{int(width)}px"' if width else ""
        alt = html.escape(caption or "figure")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.blocks.append(f'<figure><img src="{src}" alt="{alt}"{style}>{cap}</figure>')

    def html(self) -> str:
        """The whole page as a string."""
        sub = f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<link rel="icon" href="data:,">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{sub}\n"
            + "\n".join(self.blocks)
            + "\n</body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.html())
        return path
