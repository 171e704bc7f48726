"""MkDocs hook: one findings page per committed reference study.

Every folder ``reference/<model>/`` at the repository root that holds a ``report.md`` becomes the page
``findings/<model>.md`` (the report's text; its committed figures are copied beside it, and a link to a
file that is not committed becomes plain text). The page holding ``<!-- calibdrop-findings -->`` gets
the list of those pages, or, when there are none, the sentence saying how they are produced.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

MARKER = "<!-- calibdrop-findings -->"
SECTION = "Findings"
ASSETS = {".png", ".svg", ".jpg", ".jpeg", ".csv", ".json", ".parquet"}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
NONE_YET = ("No reference study is committed yet. Each one is a folder `reference/<model>/` holding the "
            "result tables of a study and its `report.md`; `calibdrop report reference/<model>` re-renders the "
            "report from the committed tables, and this site then shows it here.")


def reference_reports(root: Path) -> dict[str, Path]:
    """``{model: report.md}`` for every ``reference/<model>/report.md`` under ``root``, by model name."""
    return {path.parent.name: path for path in sorted((root / "reference").glob("*/report.md"))}


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_config(config):
    """Add a nav entry per reference study under the Findings section."""
    models = reference_reports(_root(config))
    for entry in config.nav or []:
        if isinstance(entry, dict) and SECTION in entry:
            section = entry[SECTION]
            pages = section if isinstance(section, list) else [{"Overview": section}]
            pages += [{model: f"findings/{model}/index.md"} for model in models]
            entry[SECTION] = pages
    return config


def committed_links_only(markdown: str, folder: Path) -> str:
    """The report's text with links to files missing from ``folder`` turned into plain text."""
    def keep_or_flatten(match):
        bang, text, target = match.groups()
        if "://" in target or target.startswith("#") or (folder / target.split("#")[0]).exists():
            return match.group(0)
        return f"{text} (`{target}`, not committed)"
    return LINK.sub(keep_or_flatten, markdown)


def on_files(files, config):
    """Generate the findings pages and copy their committed figures and tables."""
    for model, report in reference_reports(_root(config)).items():
        text = committed_links_only(report.read_text(encoding="utf-8"), report.parent)
        note = (f"\n\n---\n\nGenerated at build time from the committed `reference/{model}/report.md`; "
                f"`calibdrop report reference/{model}` re-renders it from the committed tables.\n")
        files.append(File.generated(config, f"findings/{model}/index.md", content=text + note))
        for asset in sorted(report.parent.rglob("*")):
            if asset.is_file() and asset.suffix.lower() in ASSETS:
                relative = asset.relative_to(report.parent).as_posix()
                files.append(File.generated(config, f"findings/{model}/{relative}", abs_src_path=str(asset)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Replace the marker with the list of findings pages, or with how to produce them."""
    if MARKER not in markdown:
        return markdown
    models = reference_reports(_root(config))
    listing = "\n".join(f"* [{model}]({model}/index.md): `reference/{model}/`" for model in models) or NONE_YET
    return markdown.replace(MARKER, listing)
