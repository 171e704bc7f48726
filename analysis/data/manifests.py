"""Calibration distributions as declared: ``data_manifests/<name>.yaml`` and ``$CALIBDROP_MANIFESTS``.

Each manifest describes one top-level distribution: its sources (registry, package, pinned
version, sha256 of the artifact, license), the named extraction recipe
(:data:`analysis.data.recipes.RECIPES`) that turns an extracted artifact into documents, the
document granularity and the split rule.  Sub-distributions are not manifests: ``code/go``,
``multilingual/ja`` are the documents of one value of a manifest's ``subsets_by`` column, so
every manifest is a top-level distribution.  Its optional ``order`` places it in listings and
in ``calibdrop run``'s default set (manifests without one follow, by name).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jsonschema
import yaml

from ..errors import InputError
from .recipes import RECIPES

_SOURCE_SCHEMA = {
    "type": "object",
    "required": ["id", "registry", "license", "recipe"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        "registry": {"enum": ["debian", "pypi", "npm", "local"]},
        "package": {"type": "string", "pattern": "^[^-]"},
        "version": {"type": "string", "pattern": "^[^-]"},
        "artifact": {"type": "string"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "license": {"type": "string"},
        "recipe": {"type": "string"},
        "language": {"type": "string"},
        "options": {"type": "object"},
    },
    "if": {"properties": {"registry": {"enum": ["debian", "pypi", "npm"]}}},
    "then": {"required": ["package", "version", "artifact", "sha256"]},
    "additionalProperties": False,
}

MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["name", "description", "sources", "document", "split", "rendering"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9_-]+$"},
        "order": {"type": "integer", "minimum": 0},
        "role": {"enum": ["calibration", "test"]},
        "description": {"type": "string"},
        "sources": {"type": "array", "minItems": 1, "items": _SOURCE_SCHEMA},
        "document": {"type": "string"},
        "subsets_by": {"const": "language"},
        "split": {
            "type": "object",
            "required": ["rule", "heldout_fraction"],
            "properties": {
                "rule": {"const": "document sha256 order"},
                "heldout_fraction": {"type": "number", "minimum": 0.2, "maximum": 0.8},
            },
        },
        "rendering": {"type": "string"},
        "hub_alternative": {
            "type": "object",
            "required": ["path", "split"],
            "properties": {
                "path": {"type": "string"},
                "name": {"type": "string"},
                "split": {"type": "string"},
                "data_files": {},
                "text_field": {"type": "string"},
                "text_fields": {"type": "array", "items": {"type": "string"}},
                "messages_field": {"type": "string"},
                "language_field": {"type": "string"},
                "max_documents": {"type": "integer", "minimum": 1},
            },
        },
    },
    "additionalProperties": False,
}


def manifest_dirs() -> list[Path]:
    """Folders searched for manifests: ``$CALIBDROP_MANIFESTS`` (os.pathsep-separated), then the project's."""
    extra = [Path(p) for p in os.environ.get("CALIBDROP_MANIFESTS", "").split(os.pathsep) if p]
    return [*extra, Path(__file__).resolve().parents[2] / "data_manifests"]


def manifest_paths() -> dict[str, Path]:
    """Every known distribution's manifest, by name (earlier folders win)."""
    found: dict[str, Path] = {}
    for folder in reversed(manifest_dirs()):
        for path in sorted(folder.glob("*.yaml")):
            found[path.stem] = path
    return found


def split_name(name: str) -> tuple[str, str | None]:
    """``"code/go"`` → ``("code", "go")``; ``"code"`` → ``("code", None)``."""
    top, _, subset = str(name).partition("/")
    return top, subset or None


def load_manifest(name: str | Path) -> dict:
    """The validated manifest of a distribution (a name, ``name/subset``, or a YAML path)."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else manifest_paths().get(split_name(name)[0])
    if path is None or not path.is_file():
        known = ", ".join(sorted(manifest_paths()))
        raise InputError(
            f"unknown distribution {name!r}; known: {known}. Add one by writing data_manifests/<name>.yaml")
    text = path.read_text(encoding="utf-8")
    manifest = yaml.safe_load(text)
    try:
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise InputError(f"manifest {path} is invalid at {where}: {error.message}") from None
    for source in manifest["sources"]:
        if source["recipe"] not in RECIPES:
            raise InputError(
                f"manifest {path}: source {source['id']!r} names unknown recipe {source['recipe']!r}; known: "
                f"{', '.join(RECIPES)}")
    manifest["_path"] = str(path)
    manifest["_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return manifest


def role(manifest: dict) -> str:
    """``"test"`` for a test-only distribution (never calibrated, selected or tuned on: held-out columns only),
    else ``"calibration"``."""
    return manifest.get("role", "calibration")


def by_role(wanted: str) -> tuple[str, ...]:
    """The distributions of one role, sorted by ``(order, name)`` with a missing ``order`` after every given one;
    an invalid manifest raises :class:`InputError`."""
    manifests = {name: load_manifest(name) for name in manifest_paths()}
    orders = {name: m.get("order") for name, m in manifests.items() if role(m) == wanted}
    return tuple(sorted(orders, key=lambda name: (orders[name] is None, orders[name] or 0, name)))


def top_level() -> tuple[str, ...]:
    """Every calibration distribution (one per valid manifest found whose role is not ``test``), in order."""
    return by_role("calibration")


def unseen_distributions() -> tuple[str, ...]:
    """Every test-only distribution: held-out text of kinds no calibration distribution contains."""
    return by_role("test")
