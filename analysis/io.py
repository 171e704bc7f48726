"""Tidy tables on disk: Parquet plus a JSON provenance sidecar, both written atomically."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from .errors import InputError

_PACKAGES = ("calibdrop", "torch", "transformers", "accelerate", "datasets", "gguf", "numpy", "pandas", "scipy")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on, and Python's."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(**fields) -> dict:
    """A provenance record: the given fields, package versions and a UTC timestamp."""
    return {**fields, "versions": package_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, record) -> None:
    atomic_write_bytes(path, json.dumps(record, indent=2, default=str).encode())


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def write_table(frame: pd.DataFrame, path: Path, record: dict) -> Path:
    """Save ``frame`` as Parquet and ``record`` as its JSON sidecar; the sidecar is written last."""
    path = Path(path)
    atomic_write_bytes(path, frame.to_parquet(index=False))
    atomic_write_json(sidecar_path(path), record)
    return path


def read_table(path: Path) -> pd.DataFrame:
    """A table written by :func:`write_table`, with its provenance in ``frame.attrs["provenance"]``."""
    path = Path(path)
    if not path.exists() or not sidecar_path(path).exists():
        raise InputError(f"{path} is not a calibdrop result: it or its provenance sidecar {sidecar_path(path).name} is missing")
    frame = pd.read_parquet(path)
    frame.attrs["provenance"] = json.loads(sidecar_path(path).read_text())
    return frame
