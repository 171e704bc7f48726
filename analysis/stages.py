"""The stage store: every computed table saved atomically under a folder with the key it was computed for.

A stage's key is the sha256 of the JSON of everything its result depends on (the model's checksum
and dtype, the settings it reads, the manifests' checksums, the keys of the stages it reads).
:meth:`StageStore.table` returns the saved table while its key matches and computes, saves and
returns it otherwise, so a run killed at any point and started again recomputes nothing saved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import pandas as pd

from .artifacts import column_problem
from .io import provenance, read_cached_table, write_table


def stage_key(*parts) -> str:
    """sha256 of the JSON of everything a stage's result depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class StageStore:
    """Saved stage results under ``folder``, each reused while its key matches."""

    def __init__(self, folder: Path, model_record: dict | None = None, log: Callable[[str], None] = print, *,
                 writable: bool = True):
        self.folder = Path(folder)
        self.model_record = model_record or {}
        self.log = log
        self.writable = writable
        self.reused: list[str] = []
        self.computed: list[str] = []

    def path(self, name: str) -> Path:
        """Where table ``name`` is saved (``a/b`` names a sub-folder)."""
        return self.folder / f"{name}.parquet"

    def cached(self, name: str, key: str) -> pd.DataFrame | None:
        """Table ``name`` if it is saved intact with ``key`` and has the columns its stage writes
        (:func:`~analysis.artifacts.column_problem`), counted as reused; else ``None`` (a damaged or mismatched entry is
        discarded with a warning, see :func:`read_cached_table`)."""
        saved = read_cached_table(self.path(name), {"stage_key": key}, lambda frame: column_problem(frame, name))
        if saved is not None:
            self.reused.append(name)
        return saved

    def table(self, name: str, key: str, compute: Callable[[], pd.DataFrame], **record) -> pd.DataFrame:
        """The table ``name``: read if saved intact with ``key``, else computed and (when writable) saved."""
        saved = self.cached(name, key)
        if saved is not None:
            return saved
        self.log(f"computing {name}")
        frame = compute()
        if self.writable:
            write_table(frame, self.path(name), provenance(kind=name, stage_key=key, model=self.model_record, **record))
        self.computed.append(name)
        return frame
