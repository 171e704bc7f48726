"""The command line: `calibdrop run --preset quick` on the real default model, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.models import loading as models
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level

ROOT = Path(__file__).resolve().parents[1]


def calibdrop(*args):
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.real_model
def test_quick_run_writes_report_figures_and_drop_sets(tmp_path):
    if not models.is_fetched("smollm2-135m") or not all(is_fetched(load_manifest(name)) for name in top_level()):
        pytest.skip("the default model or the distributions are not fetched; run setup.sh")
    result = calibdrop("run", "--preset", "quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["figures"] > 40 and "report" in (tmp_path / "report.md").read_text()
    assert "## Pruned models on held-out text" in (tmp_path / "report.md").read_text()
    compare = calibdrop("compare", str(tmp_path), "--n-boot", "50", "--n-perm", "50", "--out", str(tmp_path / "cmp"))
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert (tmp_path / "cmp" / "permutation.parquet").exists() and (tmp_path / "cmp" / "figures" / "cosine" / "similarity_attn_spearman.svg").exists()
    assert set(pd.read_parquet(tmp_path / "cmp" / "agreement.parquet")["metric"]) == {"cosine", "angular", "relative_update", "ablation"}
    consensus = calibdrop("consensus", str(tmp_path / "scores.per_sample.parquet"), "--module", "attn", "--k", "4",
                          "--method", "minimax", "--out", str(tmp_path / "set.json"))
    assert consensus.returncode == 0, consensus.stderr[-2000:]
    record = json.loads((tmp_path / "set.json").read_text())
    assert record["module"] == "attn" and len(record["indices"]) == 4 and record["method"] == "minimax" and record["metric"] == "cosine"
    pruned = calibdrop("prune", "--drop-set", str(tmp_path / "set.json"), "--out", str(tmp_path / "pruned"))
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    reloaded, _ = models.load_model(str(tmp_path / "pruned"))
    assert reloaded.config.calibdrop_pruning["attn"] == sorted(record["indices"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["score"], "give either --texts FILE.jsonl or --distributions"),
        (["score", "--texts", "missing.jsonl"], "texts file missing.jsonl does not exist"),
        (["score", "--distributions", "poetry"], "unknown distribution 'poetry'"),
        (["compare", "nowhere"], "no per-sample scores at nowhere"),
        (["prune", "--drop-set", "missing.json", "--out", "x"], "drop-set file missing.json does not exist"),
        (["evaluate"], "nothing to evaluate"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = calibdrop(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_registered_metric_flows_through_compare_and_consensus(tmp_path, capsys):
    from analysis import score_texts, write_table
    from analysis.cli import main
    from analysis.importance.metrics import METRICS, register_metric

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import byte_tokenizer, tiny_model

    register_metric("update_norm_cli", lambda pair: pair.update_norm, replace=True)
    try:
        model, tokenizer = tiny_model("llama"), byte_tokenizer()
        texts = {"prose": ["The cat sat on the mat today.", "A long walk in the park.", "Rain again.", "Tea, then bed."],
                 "code": ["def f(x): return x", "for i in range(3): pass", "x = [1, 2, 3]", "import os; os.sep"],
                 "numbers": ["1 + 2 = 3", "3.14159 2.71828", "10 / 5 = 2", "2 ** 10 = 1024"]}
        rows = pd.concat([score_texts(model, tokenizer, t, metrics=("cosine", "update_norm_cli"), per_sample=True, progress=False).assign(distribution=d)
                          for d, t in texts.items()], ignore_index=True)
        write_table(rows, tmp_path / "mine.per_sample.parquet", {"kind": "scores-per-sample"})
        assert main(["compare", str(tmp_path / "mine.per_sample.parquet"), "--k", "1", "--n-boot", "20", "--n-perm", "20", "--out", str(tmp_path / "cmp")]) == 0
        assert set(pd.read_parquet(tmp_path / "cmp" / "agreement.parquet")["metric"]) == {"cosine", "update_norm_cli"}
        assert (tmp_path / "cmp" / "figures" / "update_norm_cli" / "similarity_attn_spearman.png").exists()
        assert main(["consensus", str(tmp_path / "mine.per_sample.parquet"), "--metric", "update_norm_cli", "--k", "1", "--out", str(tmp_path / "s.json")]) == 0
        record = json.loads((tmp_path / "s.json").read_text())
        assert record["metric"] == "update_norm_cli" and len(record["indices"]) == 1
    finally:
        METRICS.pop("update_norm_cli")
