"""MkDocs hook: Sphinx markup in the docstrings, rendered for MkDocs.

The docstrings write ``:func:`analysis.x.y``` (Sphinx style); mkdocstrings renders that as the text
``:func:`` before a code span. Here each becomes an optional autorefs reference: a link to the
object's API entry where the full dotted name is documented, else the plain code span.
"""

from __future__ import annotations

import re

LITERAL_MARKER = re.compile(r"\s*::</p>")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):<code>(~?)([^<]+)</code>")


def _reference(match: re.Match) -> str:
    """``~a.b.C`` shows ``C``, as in Sphinx; ``a.b.C`` shows the whole name."""
    short, identifier = match.groups()
    shown = identifier.rsplit(".", 1)[-1] if short else identifier
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def on_page_content(html, page, config, files):
    """Replace every rendered role with an optional cross-reference, and a paragraph's closing ``::``
    (Sphinx's mark of the literal block that follows) with a colon."""
    return LITERAL_MARKER.sub(":</p>", ROLE.sub(_reference, html))
