"""The main job on a tiny model: it finishes, and a run killed half-way resumes to the same report.

The zero-shot accuracy stage is left out here (lm-eval's start-up dominates a tiny run); tests/test_cli.py runs every
stage, accuracy included, on the real model (the smoke preset)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.pipeline import RunSettings, render_report, run

from conftest import PIPELINE_DISTRIBUTIONS

SETTINGS = dict(
    distributions=PIPELINE_DISTRIBUTIONS, subsets=True, samples=8, seq_len=64, subset_samples=4, subset_seq_len=32,
    ablation_samples=4, ablation_seq_len=32, greedy_shortlist=2,
    n_boot=50, n_perm=50, budgets={"attn": (1, 2), "mlp": (1,), "block": (1,), "joint": (2,)}, transfer_k=(2,),
    transfer_samples=4, transfer_seq_len=64, random_seeds=(0,), tasks=(), accuracy_sets=(), unseen=("legal",),
)
RUN = """
import json, sys
from pathlib import Path
from analysis.pipeline import RunSettings, run
settings = json.loads(sys.argv[3])
settings["budgets"] = {k: tuple(v) for k, v in settings["budgets"].items()}
run(sys.argv[1], Path(sys.argv[2]), preset=RunSettings(**settings), progress=False, log=lambda m: print(m, flush=True),
    figures=False)
"""


@pytest.fixture(scope="module")
def whole(tiny_run):
    """The session's uninterrupted run of the tiny model (conftest ``tiny_run``): ``(folder, summary)``."""
    return tiny_run[:2]


def test_killed_run_resumes_to_the_same_report(tiny_dir, whole, tmp_path):
    """A run killed after its drop sets (a process of its own) resumes from the saved stages and writes the report of
    the uninterrupted run, both without figures (drawing them from the same tables is tested below)."""
    folder, summary = whole
    assert not summary["stages_reused"] and (folder / "report.html").stat().st_size > 10_000

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", RUN, str(tiny_dir), str(killed), json.dumps(SETTINGS)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    while not (killed / "drop_sets.json").exists() and process.poll() is None:  # a table's sidecar is written last
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_before = {p.stem for p in killed.glob("*.parquet") if p.with_suffix(".json").exists()}
    assert {"scores.proxies", "scores.ablation", "agreement", "drop_sets"} <= saved_before
    assert not (killed / "report.md").exists()

    resumed = run(str(tiny_dir), killed, preset=RunSettings(**SETTINGS), progress=False, log=lambda m: None,
                  figures=False)
    assert saved_before <= set(resumed["stages_reused"])
    assert not saved_before & set(resumed["stages_computed"])
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(folder, uninterrupted, ignore=shutil.ignore_patterns("figures"))
    render_report(uninterrupted, figures=False)
    assert (killed / "report.md").read_text() == (uninterrupted / "report.md").read_text()


def test_every_figure_has_png_and_svg(whole):
    folder, _ = whole
    pngs = {p.stem for p in (folder / "figures").glob("*.png")}
    assert pngs == {p.stem for p in (folder / "figures").glob("*.svg")}
    assert {"similarity_attn_spearman", "profile_attn", "membership_attn", "convergence_attn", "transfer_matrix", "regret_attn",
            "transfer_worst_case", "metric_validity", "proxy_vs_ablation", "ranking_decomposition"} <= pngs


def test_report_from_the_saved_tables_alone_equals_the_runs(whole, tmp_path):
    """`calibdrop report` on a copy holding only the compact tables (no held-out windows, no parts, no scores.proxies
    or scores.ablation) and run_summary.json writes the run's own report.md and the same figures."""
    from analysis.cli import main
    from analysis.pipeline import NOT_REPORTED

    source = whole[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    kept = [p for p in source.glob("*.parquet") if p.stem not in NOT_REPORTED or p.stem == "scores.per_sample"]
    for path in [*kept, *(p.with_suffix(".json") for p in kept), source / "run_summary.json"]:
        shutil.copy(path, copy / path.name)
    assert not (copy / "heldout_windows.parquet").exists()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (source / "report.md").read_text()
    assert {p.name for p in (copy / "figures").iterdir()} == {p.name for p in (source / "figures").iterdir()}
    assert main(["report", str(tmp_path / "nothing")]) == 2
