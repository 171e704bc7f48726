"""Documents of a distribution and their split, read from its fetched sources through its recipes.

Split: within each (source, subset) group, documents are ordered by
``sha256("<distribution>:<source>:<doc_id>")`` and the first ``ceil(heldout_fraction * n)``
are held out; the split is by document, deterministic and disjoint.  Sub-distributions
(``code/go``, ``multilingual/ja``) are the documents of one value of the manifest's
``subsets_by`` column.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from ..errors import FetchError, InputError
from ..io import read_cached_table, sha256_file, write_table
from .fetching import data_cache, fetch_source, is_fetched, sources_used
from .manifests import load_manifest, manifest_paths, role, split_name
from .recipes import RECIPES, plain_turns

SPLITS = ("calibration", "heldout")


def heldout_mask(keys: list[str], fraction: float) -> np.ndarray:
    """True for the first ``ceil(fraction * n)`` keys in sha256 order: the held-out documents."""
    order = np.argsort([hashlib.sha256(key.encode()).hexdigest() for key in keys], kind="stable")
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[: math.ceil(fraction * len(keys))]] = True
    return mask


def assign_splits(frame: pd.DataFrame, name: str, fraction: float) -> pd.Series:
    """``calibration``/``heldout`` per document, decided within each (source, language) group."""
    split = pd.Series("calibration", index=frame.index)
    for _, group in frame.groupby(["source", "language"], dropna=False, sort=False):
        keys = [f"{name}:{s}:{d}" for s, d in zip(group["source"], group["doc_id"])]
        split.loc[group.index[heldout_mask(keys, fraction)]] = "heldout"
    return split


def _documents_from_sources(manifest: dict) -> pd.DataFrame:
    rows = []
    manifest_dir = Path(manifest["_path"]).parent
    for source in manifest["sources"]:
        root = fetch_source(source)
        if source["registry"] == "local" and not root.is_absolute():
            root = manifest_dir / root
        for document in RECIPES[source["recipe"]](root, source.get("options", {})):
            rows.append(
                {
                    "text": document["text"],
                    "doc_id": document["doc_id"],
                    "source": source["id"],
                    "language": document.get("language") or source.get("language"),
                    "messages": document.get("messages"),
                }
            )
    if not rows:
        raise InputError(f"distribution {manifest['name']!r} produced no documents from its sources")
    return pd.DataFrame(rows)


def _local_files_listing(manifest: dict) -> dict[str, str]:
    """``{path: sha256}`` of every data file a manifest's local sources read."""
    listing = {}
    for source in manifest["sources"]:
        files = source.get("options", {}).get("data_files")
        for pattern in [files] if isinstance(files, str) else files or []:
            for path in sorted(glob.glob(str(pattern), recursive=True)) or [pattern]:
                listing[path] = sha256_file(path) if Path(path).is_file() else "missing"
    return listing


def documents_key(manifest: dict) -> str:
    """sha256 of everything a distribution's documents depend on: the manifest, the sources in use, local data files."""
    keyed = {"manifest": manifest["_sha256"], "sources": sources_used(manifest),
             "local_files": _local_files_listing(manifest)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def documents(name: str) -> pd.DataFrame:
    """All documents of a top-level distribution with their split; cached under :func:`documents_key`."""
    manifest = load_manifest(name)
    key = documents_key(manifest)
    cache = data_cache() / "documents" / f"{manifest['name']}-{key[:16]}.parquet"
    frame = read_cached_table(cache, {"documents_key": key})
    if frame is not None:
        return frame
    frame = _documents_from_sources(manifest)
    frame["split"] = assign_splits(frame, manifest["name"], manifest["split"]["heldout_fraction"])
    write_table(frame, cache, {"kind": "documents", "distribution": manifest["name"], "documents_key": key,
                               "sources": sources_used(manifest)})
    return frame


def _hub_documents(manifest: dict) -> pd.DataFrame:
    hub = manifest.get("hub_alternative")
    if not hub:
        raise InputError(f"distribution {manifest['name']!r} has no hub_alternative in {manifest['_path']}")
    kwargs = {"split": hub["split"], "streaming": True}
    if hub.get("name"):
        kwargs["name"] = hub["name"]
    if hub.get("data_files"):
        kwargs["data_files"] = hub["data_files"]
    try:
        stream = datasets.load_dataset(hub["path"], **kwargs)
    except (OSError, ConnectionError, ValueError) as error:
        raise FetchError(
            f"cannot load {hub['path']} with datasets.load_dataset: {str(error).splitlines()[0]}") from None
    rows = []
    for index, row in enumerate(itertools.islice(stream, hub.get("max_documents", 20000))):
        if hub.get("messages_field"):
            messages = [{"role": m["role"], "content": m["content"]} for m in row[hub["messages_field"]]]
            text, messages_json = plain_turns(messages), json.dumps(messages, ensure_ascii=False)
        else:
            text = "\n".join(str(row[f]) for f in hub.get("text_fields", [hub.get("text_field", "text")]))
            messages_json = None
        language = row.get(hub["language_field"]) if hub.get("language_field") else None
        rows.append({"text": text, "doc_id": f"hub:{index}", "source": "hub", "language": language,
                     "messages": messages_json})
    frame = pd.DataFrame(rows)
    frame["split"] = assign_splits(frame, manifest["name"], manifest["split"]["heldout_fraction"])
    return frame


def load_distribution(name: str, split: str = "calibration", *, hub: bool = False) -> datasets.Dataset:
    """Documents of one split of a distribution (``code``, ``code/go`` ...) as a ``datasets.Dataset``.

    Columns ``text``, ``doc_id``, ``source``, ``language`` and, for conversations, ``messages``
    (JSON).  ``hub=True`` reads the manifest's Hugging Face Hub alternative with
    ``datasets.load_dataset`` instead of the packaged sources (needs network, or a local path).
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, not {split!r}")
    manifest = load_manifest(name)
    top, subset = split_name(name) if not str(name).endswith((".yaml", ".yml")) else (manifest["name"], None)
    frame = _hub_documents(manifest) if hub else documents(top if top in manifest_paths() else name)
    if subset is not None:
        known = sorted(frame["language"].dropna().unique())
        if subset not in known:
            raise InputError(f"distribution {top!r} has no subset {subset!r}; subsets: {', '.join(known)}")
        frame = frame[frame["language"] == subset]
    frame = frame[frame["split"] == split].drop(columns="split").reset_index(drop=True)
    table = datasets.Dataset.from_pandas(frame, preserve_index=False)
    table.info.description = f"{name} ({split}) from {manifest['_path']} sha256 {manifest['_sha256']}"
    return table


def subsets(name: str) -> list[str]:
    """The sub-distribution names of a top-level distribution (``code/go`` ...), empty if it has none."""
    manifest = load_manifest(name)
    if manifest.get("subsets_by") != "language":
        return []
    languages = sorted(documents(name)["language"].dropna().unique())
    return [f"{manifest['name']}/{language}" for language in languages]


def fetch_distribution(name: str) -> pd.DataFrame:
    """Download, verify and extract a distribution's sources; build and cache its document table."""
    return documents(split_name(name)[0])


def distribution_summary(names: list[str] | None = None) -> pd.DataFrame:
    """Per distribution and sub-distribution: description, license, the sources in use (:func:`sources_used`:
    version and sha256 actually fetched), documents and characters per split."""
    rows = []
    for name in names or sorted(manifest_paths()):
        manifest = load_manifest(name)
        license_of = {s["id"]: s["license"] for s in manifest["sources"]}
        fetched = is_fetched(manifest)
        base = {"description": " ".join(manifest["description"].split()), "role": role(manifest), "fetched": fetched,
                "sources": sources_used(manifest)}
        if not fetched:
            rows.append({"name": manifest["name"], **base, "license": "; ".join(sorted(set(license_of.values())))})
            continue
        frame = documents(name)
        groups = [(manifest["name"], frame)]
        if manifest.get("subsets_by") == "language":
            groups += [(f"{manifest['name']}/{lang}", part) for lang, part in frame.groupby("language", sort=True)]
        for label, part in groups:
            counts = {}
            for split in SPLITS:
                chosen = part[part["split"] == split]
                counts[f"{split}_documents"] = len(chosen)
                counts[f"{split}_characters"] = int(chosen["text"].str.len().sum())
            licenses = "; ".join(sorted({license_of[source] for source in part["source"].unique()}))
            rows.append({"name": label, **base, "license": licenses, **counts})
    return pd.DataFrame(rows)
