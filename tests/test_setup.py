"""A fresh machine sets up whatever state apt's lists are in: stale lists, a vanished Debian pin (fake apt-get)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.data import fetching
from analysis.models import loading as models
from analysis.data.documents import fetch_distribution
from analysis.errors import FetchError
from analysis.io import sha256_file
from analysis.models.loading import ModelInfo
from analysis.importance.scoring import score_distributions
from analysis.stages import StageStore

from fakeapt import PACKAGE, debian_manifest, fake_apt, make_deb, write_manifest
from tiny import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PINNED, NEWER, OTHER_UPSTREAM = "1.0-1", "1.0-2", "2.0-1"


@pytest.fixture
def debs(tmp_path):
    folder = tmp_path / "debs"
    folder.mkdir()
    return {version: make_deb(folder, version) for version in (PINNED, NEWER, OTHER_UPSTREAM)}


def _environment(tmp_path, debs, *, before, after):
    apt = fake_apt(tmp_path, before=[debs[v] for v in before], after=[debs[v] for v in after])
    manifests = tmp_path / "manifests"
    write_manifest(manifests, debian_manifest("fakedocs", debs[PINNED], PINNED))
    return {
        **os.environ,
        "FAKE_APT": apt["FAKE_APT"],
        "PATH": apt["PATH_PREFIX"] + os.pathsep + os.environ["PATH"],
        "CALIBDROP_CACHE": str(tmp_path / "cache"),
        "CALIBDROP_MANIFESTS": str(manifests),
        "PYTHONPATH": str(ROOT),
    }


def calibdrop(env, *args):
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def _apt_log(env) -> list[str]:
    return Path(env["FAKE_APT"], "log").read_text().splitlines()


def test_stale_apt_lists_are_refreshed_once_then_the_pin_is_fetched(tmp_path, debs):
    env = _environment(tmp_path, debs, before=[], after=[PINNED])
    result = calibdrop(env, "data", "fetch", "fakedocs")
    assert result.returncode == 0, result.stderr
    assert "running `apt-get update` once" in result.stderr
    assert _apt_log(env).count("update -qq") == 1
    assert _apt_log(env)[-1] == f"download -- {PACKAGE}={PINNED}"


def test_vanished_pin_takes_the_newer_revision_loudly_and_records_it(tmp_path, debs, monkeypatch):
    env = _environment(tmp_path, debs, before=[NEWER], after=[NEWER])
    result = calibdrop(env, "data", "fetch", "fakedocs")
    assert result.returncode == 0, result.stderr
    assert f"Debian no longer has {PACKAGE} {PINNED}" in result.stderr and f"newer revision {NEWER}" in result.stderr
    newer_sha = sha256_file(debs[NEWER])
    listed = json.loads(calibdrop(env, "data", "list", "--json").stdout)
    [row] = [r for r in listed if r["name"] == "fakedocs"]
    assert row["fetched"] and row["sources"][0] | {} == {**row["sources"][0], "version": NEWER, "pinned_version": PINNED, "sha256": newer_sha}
    assert f"{PACKAGE}={NEWER} (pinned {PINNED}, sha256 {newer_sha})" in calibdrop(env, "data", "list", "--wide").stdout

    for name in ("CALIBDROP_CACHE", "CALIBDROP_MANIFESTS"):
        monkeypatch.setenv(name, env[name])
    model = tiny_model("llama")
    model.calibdrop_info = ModelInfo("tiny", "test", "llama", "llama", 3, "f" * 64, "float32", "-")
    score_distributions(model, byte_tokenizer(), ["fakedocs"], n_samples=2, seq_len=32, batch_size=2, store=StageStore(tmp_path / "scores"), progress=False)
    [sidecar] = (tmp_path / "scores").glob("*.json")
    [source] = json.loads(sidecar.read_text())["distribution"]["sources"]
    assert (source["version"], source["sha256"], source["pinned_version"]) == (NEWER, newer_sha, PINNED)


def test_a_different_upstream_version_is_refused(tmp_path, debs):
    env = _environment(tmp_path, debs, before=[OTHER_UPSTREAM], after=[OTHER_UPSTREAM])
    result = calibdrop(env, "data", "fetch", "fakedocs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"offers {OTHER_UPSTREAM}, which is not a newer revision of upstream 1.0: calibdrop refuses a different text" in result.stderr


def test_without_root_stale_lists_name_the_command_to_run(tmp_path, debs, monkeypatch):
    env = _environment(tmp_path, debs, before=[], after=[PINNED])
    for name in ("FAKE_APT", "PATH", "CALIBDROP_CACHE", "CALIBDROP_MANIFESTS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    fetching.refresh_apt_lists.cache_clear()
    with pytest.raises(FetchError, match=r"run `sudo apt-get update` once"):
        fetch_distribution("fakedocs")
    assert "update -qq" not in _apt_log(env)


def _local_manifest(name: str, jsonl: Path) -> dict:
    return {
        "name": name, "description": "local stand-in", "document": "one line", "rendering": "plain",
        "sources": [{"id": "local", "registry": "local", "license": "test", "recipe": "local_files", "options": {"data_files": str(jsonl)}}],
        "split": {"rule": "document sha256 order", "heldout_fraction": 0.25},
    }


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_setup_sh_succeeds_on_a_machine_with_stale_apt_lists(tmp_path, debs):
    """setup.sh with fake apt-get whose lists lack the pin until `apt-get update`; pip steps are shimmed, the
    model comes from the shared cache through read-only symlinks, the other distributions are local files."""
    if not models.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched; run `calibdrop models fetch`")
    env = _environment(tmp_path, debs, before=[], after=[PINNED])
    manifests = Path(env["CALIBDROP_MANIFESTS"])
    write_manifest(manifests, {**debian_manifest("code", debs[PINNED], PINNED)})
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(8)))
    for name in ("math", "multilingual", "chat", "general"):
        write_manifest(manifests, _local_manifest(name, jsonl))
    shared = models.model_dir("smollm2-135m")
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    (cached / "float32").mkdir(parents=True)
    (cached / shared.joinpath(models.builtin("smollm2-135m").gguf_name).name).symlink_to(shared / models.builtin("smollm2-135m").gguf_name)
    for file in (shared / "float32").iterdir():
        (cached / "float32" / file.name).symlink_to(file)
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", repo / "setup.sh")
    _shim(repo / ".venv" / "bin" / "python", f'[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    _shim(repo / ".venv" / "bin" / "calibdrop", f'exec {sys.executable} -m analysis "$@"\n')
    result = subprocess.run(["bash", str(repo / "setup.sh")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _apt_log(env).count("update -qq") == 1 and "code: 12 documents, checksums verified" in result.stdout
    assert all(not p.is_symlink() or p.resolve().parent == shared / "float32" for p in (cached / "float32").iterdir())
