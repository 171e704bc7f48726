"""The report of ``calibdrop run``: ``report.md`` and a self-contained ``report.html``.

The report is a list of section functions (:data:`SECTIONS`); each takes the run's
:class:`Results` and returns Markdown lines (none when its tables are absent), and covers every
module kind and every method present in the tables.  Everything is computed from the saved
tables (no timestamps, no timings), so a rerun over the same saved results writes the same report.
The sections live in this package's modules by topic (:mod:`.verdict`, :mod:`.rankings`, :mod:`.heldout`,
:mod:`.accuracy`, :mod:`.routing`, shared pieces in :mod:`.common`); this module orders them and writes the files.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path


from ...artifacts import left_out_line
from ...io import atomic_write_bytes
from ..captions import CAPTIONS
from .accuracy import section_accuracy, section_check
from .common import Results, _numeric_order, markdown_to_html
from .heldout import section_comparisons, section_heldout, section_lodo, section_unseen
from .rankings import (section_agreement, section_data_or_metric, section_greedy, section_leave_one_out,
                       section_membership,
                       section_regret, section_sample_size)
from .routing import section_routing
from .verdict import section_header, section_recommendations, section_resolution, section_verdict


def section_left_out(results: Results) -> list[str]:
    """A note of the tables the run lists but that are missing or stale: the sections that read them are absent or
    shorter, never silently."""
    if not results.left_out:
        return []
    note = (f"{left_out_line(results.left_out)}. The sections that read them are absent or incomplete below; rerun "
            "`calibdrop run --out FOLDER` on this folder with the model and preset it was made with to recompute "
            "them.")
    return ["## Tables left out", "", note, ""]


def section_figures(results: Results) -> list[str]:
    lines = ["## Figures", ""]
    for path in sorted((p for p in results.figures if p.suffix == ".png"), key=figure_order):
        lines += [f"#### {path.stem}", "", f"![{path.stem}](figures/{path.name})", "", CAPTIONS.get(path.stem, ""), ""]
    return lines


FIGURE_ORDER = ("transfer_worst_case", "transfer_matrix", "metric_validity", "proxy_vs_ablation",
                "ranking_decomposition", "similarity",
                "importance", "profile", "membership", "regret", "convergence")


def figure_order(path: Path) -> tuple[int, str]:
    """Figures in the order of the report's sections (held-out loss first, convergence last), then by name."""
    rank = next((i for i, prefix in enumerate(FIGURE_ORDER) if path.stem.startswith(prefix)), len(FIGURE_ORDER))
    return rank, path.stem


SECTIONS = (section_header, section_left_out, section_verdict, section_recommendations, section_resolution,
            section_data_or_metric,
            section_agreement, section_membership, section_regret, section_leave_one_out, section_greedy,
            section_heldout,
            section_unseen, section_lodo, section_comparisons, section_accuracy,
            section_check, section_routing, section_sample_size, section_figures)


def report_markdown(results: Results) -> str:
    """The report's Markdown: every section of :data:`SECTIONS` in order."""
    return "\n".join(line for section in SECTIONS for line in section(results)) + "\n"


def embedded_html(text: str, folder: Path) -> str:
    """The report's HTML with every figure embedded (base64 PNG)."""
    body = markdown_to_html(text)

    def embed(match):
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}.toc{background:#f6f6f6;padding:.5em 1em}")
    head = f"<meta charset='utf-8'><title>calibdrop report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"


def write_report(out: Path, results: Results) -> list[Path]:
    """Write ``report.md`` and ``report.html`` (figures embedded, table of contents) into ``out``."""
    out = Path(out)
    text = report_markdown(results)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, text.encode())
    atomic_write_bytes(html_path, embedded_html(text, out).encode())
    return [md_path, html_path]


__all__ = ["CAPTIONS", "SECTIONS", "Results", "embedded_html", "figure_order", "markdown_to_html", "report_markdown",
           "write_report", *(section.__name__ for section in SECTIONS), "_numeric_order"]
