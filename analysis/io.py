"""Files on disk: calibdrop's cache folder, sha256 checksums, atomic writes, and tidy tables
(Parquet plus a JSON provenance sidecar, both written atomically).

Every checksum is a hex sha256; a listing of files (a checkpoint, an extracted archive) has one
checksum, ``sha256("".join(f"{name}:{digest}\\n" for name, digest in sorted(listing.items())))``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from .errors import CalibdropError, CalibdropWarning, ChecksumError, InputError

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


@functools.cache
def source_revision() -> str:
    """The git commit calibdrop's own source folder is checked out at, asked of git quietly (nothing git prints
    reaches the user): the commit's hash, with ``+modified`` when tracked files differ from it; ``not a git
    checkout`` for an installed package or a copy; ``unknown: ...`` when git is missing or fails otherwise."""
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            said = (head.stderr.strip().splitlines() or ["git failed"])[0]
            return "not a git checkout" if "not a git repository" in said else f"unknown: {said}"
        changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown: git did not run ({type(error).__name__})"
    return head.stdout.strip() + ("+modified" if changed else "")


def provenance(**fields) -> dict:
    """A provenance record: the given fields, package versions, the source revision (:func:`source_revision`) and a
    UTC timestamp."""
    return {**fields, "versions": package_versions(), "source": source_revision(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cache_dir() -> Path:
    """calibdrop's cache: ``$CALIBDROP_CACHE``, else ``$XDG_CACHE_HOME/calibdrop``, else ``~/.cache/calibdrop``."""
    if os.environ.get("CALIBDROP_CACHE"):
        return Path(os.environ["CALIBDROP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "calibdrop"


def sha256_stream(handle, bar=None) -> str:
    """Hex sha256 of a binary stream, read in 4 MiB blocks (``bar``: an optional tqdm to advance)."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 22), b""):
        digest.update(block)
        if bar is not None:
            bar.update(len(block))
    return digest.hexdigest()


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """Hex sha256 of a file: the one checksum of calibdrop's models, artifacts and cached tables."""
    with open(path, "rb") as handle, tqdm(
        total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}", disable=not progress
    ) as bar:
        return sha256_stream(handle, bar)


def sha256_of_listing(listing: dict[str, str]) -> str:
    """One sha256 for a ``{name: sha256}`` listing of files (a checkpoint, an extracted tree), in name order."""
    return hashlib.sha256("".join(f"{name}:{digest}\n" for name,
                                  digest in sorted(listing.items())).encode()).hexdigest()


def verify_checksum(path: Path, expected: str, *, what: str, remedy: str) -> None:
    """Raise :class:`ChecksumError` (naming ``what`` and saying ``remedy``) unless ``path`` has sha256 ``expected``.

    The one check of a pinned file, for built-in models and data artifacts alike; files over 256 MiB show progress.
    """
    actual = sha256_file(path, progress=os.path.getsize(path) > 1 << 28)
    if actual != expected:
        raise ChecksumError(
            f"{what}: {Path(path).name} has sha256 {actual}, expected {expected}: the file is damaged or was replaced. "
            f"Delete {path} and {remedy}."
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(folder: Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, made readable as the user's umask allows (mkstemp makes it 0600)."""
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.chmod(path, 0o666 & ~_umask())
    return handle, path


def temp_dir(folder: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``folder``, made readable as the user's umask allows (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    os.chmod(path, 0o777 & ~_umask())
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temp_file(path.parent, f".{path.name}.")
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
    """Save ``frame`` as Parquet and ``record`` as its JSON sidecar, with the Parquet's ``content_sha256``; the sidecar
    is written last."""
    path = Path(path)
    data = frame.to_parquet(index=False)
    atomic_write_bytes(path, data)
    atomic_write_json(sidecar_path(path), {**record, "content_sha256": hashlib.sha256(data).hexdigest()})
    return path


def read_table(path: Path, remedy: str | None = None) -> pd.DataFrame:
    """A table written by :func:`write_table`, with its provenance in ``frame.attrs["provenance"]``.

    Checks that the Parquet has the sidecar's ``content_sha256`` (tables written before calibdrop
    recorded it are read unchecked) and that it parses: otherwise :class:`ChecksumError`, whose message ends with
    ``remedy`` (by default: delete the table and compute it again).
    """
    path = Path(path)
    if not path.exists() or not sidecar_path(path).exists():
        raise InputError(
            f"{path} is not a calibdrop result: it or its provenance sidecar {sidecar_path(path).name} is missing")
    remedy = remedy or f"delete {path} and its sidecar, and compute it again"
    try:
        record = parse_json(sidecar_path(path).read_bytes(), f"the provenance sidecar {sidecar_path(path)}", remedy)
    except InputError as error:
        raise ChecksumError(str(error)) from None
    if not isinstance(record, dict):
        raise ChecksumError(f"the provenance sidecar {sidecar_path(path)} is not a JSON object: {remedy}")
    data = path.read_bytes()
    expected = record.get("content_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ChecksumError(f"{path} does not have the sha256 its sidecar records: it was damaged or replaced; "
                            f"{remedy}")
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ChecksumError(f"{path} is not a readable Parquet table ({first}); {remedy}") from None
    frame.attrs["provenance"] = record
    return frame


def read_cached_table(path: Path, expect: dict, problem=None) -> pd.DataFrame | None:
    """A cache entry, or ``None`` when there is none or it does not prove itself.

    An entry proves itself when its sidecar records a ``content_sha256`` that the Parquet has and
    every ``expect`` field (the cache key, the distribution) with the expected value, and ``problem(frame)`` (when
    given: what is wrong with the table's contents) is ``None``.  A damaged or mismatched entry is reported with a
    :class:`CalibdropWarning` and deleted, so the caller recomputes it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        frame = read_table(path)
        record = frame.attrs["provenance"]
        wrong = [k for k,
                 v in expect.items() if record.get(k) != v] + ([] if "content_sha256" in record else ["content_sha256"])
        if wrong:
            raise ChecksumError(
                f"{path} was saved for other settings or without a checksum (its {', '.join(wrong)} differ)")
        wrong = problem(frame) if problem else None
        if wrong:
            raise ChecksumError(f"{path} {wrong}")
    except CalibdropError as error:
        warnings.warn(f"discarding cache entry {path.name}: {error}; computing it again", CalibdropWarning)
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)
        return None
    return frame


MAX_JSON_DEPTH = 64


def parse_json(data: bytes | str, where: str, remedy: str):
    """The JSON value in ``data`` (UTF-8 bytes or text); anything else is an :class:`InputError` that names ``where``,
    says what is wrong and ends with ``remedy`` (when given): not UTF-8, not JSON (an integer of more than 4300
    digits included), nested deeper than :data:`MAX_JSON_DEPTH` arrays and objects, or holding a string that is
    not Unicode text (a lone surrogate escape such as ``"\\ud800"``, which no tokenizer, Parquet file or terminal
    accepts)."""
    tail = f": {remedy}" if remedy else ""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{where} is not UTF-8 text (byte {error.start + 1}){tail}") from None
    try:
        value = json.loads(data)
    except RecursionError:
        raise InputError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels{tail}") from None
    except json.JSONDecodeError as error:
        raise InputError(
            f"{where} is not valid JSON ({error.msg}; line {error.lineno} column {error.colno}){tail}") from None
    except ValueError as error:
        raise InputError(f"{where} is not usable JSON ({error}){tail}") from None
    problem = json_problem(value)
    if problem:
        raise InputError(f"{where} {problem}{tail}")
    return value


def json_problem(value) -> str | None:
    """What makes a parsed JSON value unusable, or ``None``: arrays and objects nested deeper than
    :data:`MAX_JSON_DEPTH`, or a string (key or value) that cannot be written as UTF-8.  Walks the value without
    recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                return f"nests JSON deeper than {MAX_JSON_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack += [(child, depth + 1) for child in children]
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                half = ascii(item[error.start:error.end])
                return f"holds a string that is not Unicode text ({half} is half of a UTF-16 surrogate pair)"
    return None


def read_json_file(path: Path, what: str, remedy: str):
    """The JSON value of the file ``path`` (a ``what``: "drop-set file", "config"); a missing or unusable file is an
    :class:`InputError` naming it (:func:`parse_json`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist: {remedy}")
    return parse_json(path.read_bytes(), f"{what} {path}", remedy)


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file (each line read by :func:`parse_json`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file {path} does not exist")
    texts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = decode_line(path, number, raw)
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}", "write one JSON object {\"text\": \"...\"} per line")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(
                f"{path}:{number} has no string field 'text'; each line must look like {{\"text\": \"...\"}}")
        texts.append(record["text"])
    if not texts:
        raise InputError(f"texts file {path} holds no texts: write one JSON object {{\"text\": \"...\"}} per line")
    return texts


def decode_line(path: Path, number: int, raw: bytes) -> str:
    """Line ``number`` of ``path`` as text; not UTF-8 is an :class:`InputError` naming the file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}:{number} is not UTF-8 text (byte {error.start + 1} of the line): save the file as UTF-8") from None
