"""`--model org/name`: the Hub loading path a networked user runs, tested offline against a Hub-layout cache.

The test writes a tiny model into ``$HF_HOME/hub/models--org--tiny-llama/`` as huggingface_hub
lays a download out (content-addressed ``blobs/``, ``refs/main`` naming a commit, and
``snapshots/<commit>/`` of links to the blobs) and runs the command line with ``HF_HUB_OFFLINE=1``
and that ``HF_HOME``.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import load_model, score_texts

from tiny import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
REPO = "calibdrop-test/tiny-llama"
COMMIT = hashlib.sha1(b"calibdrop offline hub test").hexdigest()
TEXTS = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat, and then it slept.", "2 + 2 = 4; 3 * 3 = 9"]


def hub_cache(hf_home: Path, files: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """Put the files of folder ``files`` in ``hf_home`` as the Hub cache holds a download of ``repo`` at ``commit``."""
    model_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (model_dir / "blobs").mkdir(parents=True)
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text(commit)
    snapshot = model_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        blob = model_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    files = root / "download"
    tiny_model("llama").save_pretrained(files)
    byte_tokenizer().save_pretrained(files)
    hub_cache(root / "home", files)
    return root / "home"


def calibdrop_offline(hf_home: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CALIBDROP_CACHE=str(cwd / "calibdrop-cache"))
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def scored(hf_home, tmp_path_factory):
    """The folder where `calibdrop score --model org/name --texts ...` wrote, offline."""
    folder = tmp_path_factory.mktemp("scored")
    texts = folder / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    result = calibdrop_offline(hf_home, "score", "--model", REPO, "--texts", str(texts), "--seq-len", "64",
                               "--batch-size", "2", "--metrics", "cosine", "--out", str(folder / "scores.parquet"),
                               cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_score_with_a_hub_id_reads_the_offline_cache(hf_home, scored):
    provenance = json.loads((scored / "scores.json").read_text())
    assert provenance["model"]["source"] == "hub" and provenance["model"]["spec"] == REPO
    model, tokenizer = load_model(str(hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT))
    want = score_texts(model, tokenizer, TEXTS, max_length=64, batch_size=2, metrics="cosine", progress=False)
    got = pd.read_parquet(scored / "scores.parquet")
    merged = got.merge(want, on=["metric", "module", "layer"], suffixes=("", "_want"), validate="one_to_one")
    assert len(merged) == len(want) == 9
    torch.testing.assert_close(torch.tensor(merged["importance"].to_numpy()),
                               torch.tensor(merged["importance_want"].to_numpy()))


def test_hub_provenance_names_the_cached_commit(scored):
    assert json.loads((scored / "scores.json").read_text())["model"]["weights_sha256"] == f"hub-revision:{COMMIT}"


def test_export_paper_reads_the_hub_config_offline(hf_home, tmp_path):
    drop_set = tmp_path / "set.json"
    drop_set.write_text(json.dumps({"module": "block", "indices": [2]}))
    result = calibdrop_offline(hf_home, "export", "--format", "paper", "--model", REPO, "--drop-set", str(drop_set),
                               cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"drop_attn_list": [2], "drop_mlp_list": [2]}


def test_a_hub_id_missing_from_the_offline_cache_is_one_clear_line(hf_home, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    result = calibdrop_offline(hf_home, "score", "--model", "calibdrop-test/absent", "--texts",
                               str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "s.parquet"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "not in the local Hugging Face cache, and the Hub is not reachable" in result.stderr
