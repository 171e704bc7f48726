"""Where a comparison of run folders writes its result: ``<out>.json`` (the command that made it first, then the result)
and ``<out>.md``, each atomically (:func:`analysis.io.atomic_write_bytes`), so an interrupted script leaves the
earlier files whole."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable

from analysis.io import atomic_write_bytes


def write_comparison(out: Path | str, result: dict, render: Callable[[dict], str], script: str,
                     argv: list[str]) -> dict:
    """Write ``result`` with ``command`` (``python <script> <argv>``) to ``<out>.json`` and ``render`` of it to
    ``<out>.md``; the result as written."""
    result = {"command": shlex.join(["python", script, *argv]), **result}
    data = json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n"
    atomic_write_bytes(Path(f"{out}.json"), data.encode())
    atomic_write_bytes(Path(f"{out}.md"), render(result).encode())
    return result
