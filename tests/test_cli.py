"""The command line: `calibdrop run --preset quick` on the real default model, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import data, models

ROOT = Path(__file__).resolve().parents[1]


def calibdrop(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.real_model
def test_quick_run_writes_report_figures_and_drop_sets(tmp_path):
    if not models.is_fetched("smollm2-135m") or not all(
        data.extracted_path(s).is_dir() for name in data.TOP_LEVEL for s in data.load_manifest(name)["sources"]
    ):
        pytest.skip("the default model or the distributions are not fetched; run setup.sh")
    result = calibdrop("run", "--preset", "quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["figures"] > 40 and "report" in (tmp_path / "report.md").read_text()
    assert "## Pruned models on held-out text" in (tmp_path / "report.md").read_text()
    compare = calibdrop("compare", str(tmp_path), "--n-boot", "50", "--n-perm", "50", "--out", str(tmp_path / "cmp"))
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert (tmp_path / "cmp" / "permutation.parquet").exists() and (tmp_path / "cmp" / "figures" / "similarity_attn_spearman.svg").exists()
    consensus = calibdrop("consensus", str(tmp_path / "scores.per_sample.parquet"), "--module", "attn", "--k", "4",
                          "--method", "minimax", "--out", str(tmp_path / "set.json"))
    assert consensus.returncode == 0, consensus.stderr[-2000:]
    record = json.loads((tmp_path / "set.json").read_text())
    assert record["module"] == "attn" and len(record["indices"]) == 4 and record["method"] == "minimax"
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
    result = calibdrop(*args, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
