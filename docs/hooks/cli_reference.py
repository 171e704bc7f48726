"""MkDocs hook: the command-line reference, rendered from ``analysis.cli.parser.build_parser`` at build time.

A page holding the marker ``<!-- calibdrop-cli -->`` gets, in its place, one section per command and
subcommand with its ``--help`` text, so the options and defaults are written once, in the parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- calibdrop-cli -->"
HELP_WIDTH = "96"


def on_config(config):
    """Put the repository root on ``sys.path`` so the parser of this checkout is the one rendered."""
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (``calibdrop ...`` name, parser) pair below ``parser``, depth first, in the parser's order."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += subcommands(child, f"{prefix} {name}")
    return found


def help_text(parser: argparse.ArgumentParser) -> str:
    """The parser's ``--help`` at a fixed width, so the page does not depend on the terminal that builds it."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def reference_markdown() -> str:
    """One ``##`` section per command with its help in a text block."""
    from analysis.cli.parser import build_parser

    sections = []
    for name, parser in subcommands(build_parser(), "calibdrop"):
        sections += [f"## `{name}`", "", "```text", help_text(parser).rstrip(), "```", ""]
    return "\n".join(sections)


def on_page_markdown(markdown, page, config, files):
    """Replace the marker with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, reference_markdown())
    return markdown
