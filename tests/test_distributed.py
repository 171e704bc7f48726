"""Data-parallel scoring over torch.distributed (gloo on CPU) gives the one-process table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import read_table
from analysis.data.documents import documents
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest

from tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not is_fetched(load_manifest("general")):
        pytest.skip("distribution general is not fetched; run `calibdrop data fetch general`")
    folder = tmp_path_factory.mktemp("dp")
    tiny_model("qwen3").save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    texts = documents("general")["text"].head(21).str.slice(0, 400)
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


def _score(inputs, out: Path, processes: int) -> pd.DataFrame:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(29500 + processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "analysis", "score", "--model", str(inputs / "model"),
               "--texts", str(inputs / "texts.jsonl"), "--per-sample", "--batch-size", "4", "--seq-len", "128", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_table(out)


def test_two_processes_give_the_one_process_table(inputs, tmp_path):
    one = _score(inputs, tmp_path / "one.parquet", 1)
    two = _score(inputs, tmp_path / "two.parquet", 2)
    assert len(two) == len(one) == 21 * 3 * 3 * 3  # samples x layers x modules x the three default proxies
    pd.testing.assert_frame_equal(two, one, check_exact=False, atol=1e-9, rtol=0)
