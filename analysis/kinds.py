"""The module kinds a drop set names, and how a ``joint`` set names its entries (``"attn:3"``, ``"mlp:5"``).

Both the pruning code (models) and the drop sets (study) read these, so they live below both.
"""

from __future__ import annotations

from typing import Iterable

from .errors import InputError


def joint_to_lists(entries: Iterable[str]) -> tuple[list[int], list[int]]:
    """``["attn:3", "mlp:5"]`` (a ``joint`` drop set) → attention indices, MLP indices."""
    attn, mlp = [], []
    for entry in entries:
        kind, _, index = str(entry).partition(":")
        if kind not in ("attn", "mlp") or not index.isdigit():
            raise InputError(f"joint drop-set entry {entry!r} is not of the form 'attn:i' or 'mlp:i'")
        (attn if kind == "attn" else mlp).append(int(index))
    return attn, mlp
