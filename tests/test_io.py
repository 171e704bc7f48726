"""analysis.io: the cache folder, sha256 checksums against hashlib, atomic writes, tables with sidecars."""

import hashlib
import io
import json
import os

import pandas as pd
import pytest

from analysis import io as store
from analysis.errors import ChecksumError, InputError


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CALIBDROP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_dir() == tmp_path / "xdg" / "calibdrop"
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "mine"))
    assert store.cache_dir() == tmp_path / "mine"


def test_checksums_equal_hashlib(tmp_path):
    data = os.urandom(5 << 20)  # more than one 4 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert store.sha256_file(path) == want == store.sha256_stream(io.BytesIO(data))
    listing = {"b.txt": "22", "a.txt": "11"}
    assert store.sha256_of_listing(listing) == hashlib.sha256(b"a.txt:11\nb.txt:22\n").hexdigest()


def test_checksum_mismatch_raises_the_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not the pinned bytes")
    pinned = hashlib.sha256(b"the pinned bytes").hexdigest()
    store.verify_checksum(path, hashlib.sha256(b"not the pinned bytes").hexdigest(), what="x", remedy="y")
    with pytest.raises(ChecksumError) as caught:
        store.verify_checksum(path, pinned, what="built-in model 'm'", remedy="run `calibdrop models fetch` again")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"built-in model 'm': model.gguf has sha256 {hashlib.sha256(b'not the pinned bytes').hexdigest()}, expected {pinned}")
    assert message.endswith(f"Delete {path} and run `calibdrop models fetch` again.")


class Interrupted(BaseException):
    pass


def test_interrupted_atomic_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    store.atomic_write_json(path, {"old": True})

    def replace(*args):
        raise Interrupted  # killed after the data reached the temporary file, before the rename

    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(Interrupted):
        store.atomic_write_bytes(path, b'{"new": true}' * 1000)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_atomic_write_is_readable_as_the_umask_allows(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    mask = os.umask(0o022)
    try:
        store.atomic_write_bytes(path, b"abc")
    finally:
        os.umask(mask)
    assert path.read_bytes() == b"abc" and path.stat().st_mode & 0o777 == 0o644


def test_table_round_trip_with_sidecar(tmp_path):
    frame = pd.DataFrame({"layer": [0, 1, 2], "module": ["attn", "mlp", "block"], "importance": [0.1, 0.25, 1e-9]})
    path = store.write_table(frame, tmp_path / "scores.parquet", store.provenance(kind="scores", model="tiny"))
    record = json.loads(store.sidecar_path(path).read_text())
    assert record["kind"] == "scores" and record["content_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    back = store.read_table(path)
    pd.testing.assert_frame_equal(back, frame)
    assert back.attrs["provenance"] == record


def test_damaged_or_unlabelled_tables_are_refused(tmp_path):
    path = store.write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet", {"kind": "t"})
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match="does not have the sha256 its sidecar records"):
        store.read_table(path)
    store.sidecar_path(path).unlink()
    with pytest.raises(InputError, match="provenance sidecar t.json is missing"):
        store.read_table(path)


def test_cached_table_must_match_its_key(tmp_path):
    path = store.write_table(pd.DataFrame({"a": [1]}), tmp_path / "c.parquet", {"cache_key": "k1"})
    assert store.read_cached_table(path, {"cache_key": "k1"})["a"].tolist() == [1]
    with pytest.warns(UserWarning, match="cache_key differ"):
        assert store.read_cached_table(path, {"cache_key": "k2"}) is None
    assert not path.exists() and not store.sidecar_path(path).exists()
