"""A fake ``apt-get`` on PATH and tiny Debian packages, to simulate apt's states without a network or root."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

PACKAGE = "calibdrop-fake-docs"

FAKE_APT_GET = r"""#!/usr/bin/env bash
# Fake apt-get: `update` switches from $FAKE_APT/before to $FAKE_APT/after; `download [--] pkg[=version]`
# copies pkg_version_all.deb from the current repository into the working directory.
echo "$*" >> "$FAKE_APT/log"
repo="$FAKE_APT/before"; [ -e "$FAKE_APT/updated" ] && repo="$FAKE_APT/after"
case "$1" in
  update) touch "$FAKE_APT/updated"; exit 0 ;;
  download) shift; [ "$1" = "--" ] && shift ;;
  *) echo "E: fake apt-get does not do $1" >&2; exit 100 ;;
esac
package="${1%%=*}"; version="${1#*=}"
candidates=$(ls "$repo" 2>/dev/null | grep "^${package}_" | sort -V)
if [ -z "$candidates" ]; then echo "E: Unable to locate package $package" >&2; exit 100; fi
if [ "$version" = "$1" ]; then cp "$repo/$(echo "$candidates" | tail -1)" .; exit 0; fi
if [ ! -e "$repo/${package}_${version}_all.deb" ]; then echo "E: Version '$version' for '$package' was not found" >&2; exit 100; fi
cp "$repo/${package}_${version}_all.deb" .
"""


def make_deb(folder: Path, version: str, n_documents: int = 12) -> Path:
    """A real .deb of ``PACKAGE`` at ``version`` holding ``n_documents`` text files."""
    root = folder / f"build-{version}"
    docs = root / "usr" / "share" / "doc" / PACKAGE
    docs.mkdir(parents=True)
    for i in range(n_documents):
        (docs / f"doc{i:02d}.txt").write_text(f"Document {i} of version {version}. " * 40)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    deb = folder / f"{PACKAGE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def debian_manifest(name: str, deb: Path, version: str) -> dict:
    """A manifest whose one source pins ``PACKAGE`` at ``version`` with ``deb``'s sha256."""
    return {
        "name": name,
        "description": "fake Debian documents",
        "sources": [{
            "id": "fake", "registry": "debian", "package": PACKAGE, "version": version, "artifact": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(), "license": "MIT", "recipe": "source_files",
            "options": {"root": f"usr/share/doc/{PACKAGE}", "include": ["*.txt"]},
        }],
        "document": "one file",
        "split": {"rule": "document sha256 order", "heldout_fraction": 0.25},
        "rendering": "plain",
    }


def fake_apt(tmp_path: Path, *, before: list[Path], after: list[Path]) -> dict:
    """Install the fake apt-get in ``tmp_path/bin`` with repositories ``before`` and ``after`` an update;
    returns the environment variables that put it first on PATH."""
    state = tmp_path / "apt"
    for stage, debs in (("before", before), ("after", after)):
        (state / stage).mkdir(parents=True)
        for deb in debs:
            (state / stage / deb.name).write_bytes(deb.read_bytes())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    return {"FAKE_APT": str(state), "PATH_PREFIX": str(bin_dir)}


def write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{manifest['name']}.yaml").write_text(yaml.safe_dump(manifest))
