"""Commands that write never lose or silently change a user's results (analysis/outputs.py): a folder or file holding
another output is refused in one line unless --force, the same run resumes, a checkpoint folder holding files
calibdrop did not write is refused; and the silent cases of issue 38 (a drop set named like the baseline, repeated
names, a bootstrap too small for an interval, Ctrl-C) end in one line or a correct result.

The property test runs Hypothesis-generated sequences of commands over one copy of a finished smoke run and checks by
the sha256 of every table that none changed."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, cli
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.errors import CalibdropWarning
from analysis.outputs import MARKER, claim_folder


def cli_in(folder: Path, *args) -> subprocess.CompletedProcess:
    """``calibdrop ARGS`` in this process with ``folder`` as the working directory (where ``results`` is)."""
    from analysis.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(["calibdrop", *map(str, args)], code, out.getvalue(), err.getvalue())


def refused(result, *words: str) -> None:
    """Exit 2 with one error line that holds ``words`` and says how to go on."""
    assert result.returncode == 2, (result.args, result.stdout[-1000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("calibdrop: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--force" in lines[0] and "--out" in lines[0] and all(w in lines[0] for w in words), lines[0]


def table_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every table (Parquet) under ``folder`` and of its provenance sidecar, by relative path: a table
    written again, even with equal contents, changes its sidecar's timestamp."""
    files = [p for p in folder.rglob("*.parquet")] + [p for p in folder.rglob("*.json") if p.with_suffix(".parquet").exists()]
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def workspace(smoke_run, tmp_path_factory):
    """A folder whose ``results`` is a copy of the finished smoke run, a drop set ``set.json`` from its scores and
    four texts ``texts.jsonl``."""
    folder = tmp_path_factory.mktemp("outputs")
    shutil.copytree(smoke_run, folder / "results", ignore=shutil.ignore_patterns("figures"))
    made = cli_in(folder, "consensus", "results", "--module", "attn", "--k", "2", "--out", "set.json")
    assert made.returncode == 0, made.stderr[-2000:]
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(4)))
    return folder


# ---------------------------------------------------------------- a finished run is never changed without --force

SET = "set.json"
COMMANDS = {  # commands over the run folder `results`, none with --force; each refuses, or writes none of its tables
    "run quick": ("run", "--preset", "quick", "--out", "results", "--no-figures"),
    "run default": ("run", "--out", "results", "--no-figures"),
    "score into the run": ("score", "--distributions", "code", "--preset", "smoke", "--out", "results/scores.parquet"),
    "score without --out": ("score", "--distributions", "math", "--preset", "smoke", "--samples", "2"),
    "score a new file in the run": ("score", "--distributions", "code", "--preset", "smoke", "--out",
                                    "results/mine.parquet"),
    "evaluate into the run": ("evaluate", "--drop-sets", SET, "--distributions", "code", "--samples", "2", "--seq-len",
                              "16", "--out", "results"),
    "route into the run": ("route", "results", "--out", "results"),
    "compare into the run": ("compare", "results", "--out", "results", "--n-boot", "40", "--n-perm", "4"),
    "consensus into the run": ("consensus", "results", "--k", "2", "--out", "results/drop_sets.json"),
    "export a checkpoint into the run": ("export", "--drop-set", SET, "--out", "results"),
    "export paper keys over the summary": ("export", "--drop-set", SET, "--format", "paper", "--out",
                                           "results/run_summary.json"),
    "prune into the run": ("prune", "--drop-set", SET, "--out", "results"),
    "check into the run": ("check", "--drop-set", SET, "--texts", "texts.jsonl", "--out", "results"),
    "summary into the run": ("summary", "results", "--out", "results"),
    "report": ("report", "results", "--no-figures"),
}


@pytest.mark.real_model
@settings(max_examples=10, deadline=None)
@given(sequence=st.lists(st.sampled_from(sorted(COMMANDS)), min_size=1, max_size=4))
def test_no_sequence_of_commands_changes_a_finished_runs_tables(workspace, sequence):
    before = table_hashes(workspace / "results")
    for name in sequence:
        result = cli_in(workspace, *COMMANDS[name])
        if name == "report":
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            refused(result)
    after = table_hashes(workspace / "results")
    assert after == before, sorted(k for k in before if after.get(k) != before[k])


@pytest.mark.real_model
def test_the_same_run_resumes_and_force_replaces(workspace, tmp_path):
    before = table_hashes(workspace / "results")
    resumed = cli_in(workspace, "run", "--preset", "smoke", "--out", "results", "--no-figures")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "computed: nothing (all reused)" in resumed.stdout
    assert table_hashes(workspace / "results") == before

    copy = tmp_path / "results"
    shutil.copytree(workspace / "results", copy)
    refused(cli_in(tmp_path, "consensus", "results", "--k", "2", "--out", "results/drop_sets.json"))
    forced = cli_in(tmp_path, "consensus", "results", "--k", "2", "--out", "results/drop_sets.json", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert {k for k, v in table_hashes(copy).items() if before.get(k) != v} == {"drop_sets.json"}
    claim_folder(copy, "compare", {}, force=True)  # forced into a run folder, a command leaves it a run folder
    assert not (copy / MARKER).exists()


@pytest.mark.real_model
def test_a_run_of_other_tables_is_refused_after_its_model_loads(workspace, tmp_path):
    """Without a run_summary.json (a run that stopped), the saved tables' stage keys tell another run's folder."""
    shutil.copytree(workspace / "results", tmp_path / "results", ignore=shutil.ignore_patterns("run_summary.json"))
    before = table_hashes(tmp_path / "results")
    result = cli_in(tmp_path, "run", "--preset", "quick", "--out", "results", "--no-figures")
    refused(result, "tables saved by another run or command", "scores.proxies")
    assert table_hashes(tmp_path / "results") == before


def test_score_rewrites_its_own_file_and_refuses_another(tmp_path, tiny_dir):
    base = ("score", "--model", tiny_dir, "--distributions", "code", "--samples", "2", "--seq-len", "16",
            "--metrics", "cosine", "--out", tmp_path / "s.parquet")
    assert cli(*base).returncode == 0
    assert cli(*base).returncode == 0  # the same scores again
    refused(cli(*base, "--seed", "1"), "`calibdrop score` for other inputs or settings (seed differ)")
    assert json.loads((tmp_path / "s.json").read_text())["output"]["identity"]["seed"] == 0
    assert cli(*base, "--seed", "1", "--force").returncode == 0
    assert json.loads((tmp_path / "s.json").read_text())["output"]["identity"]["seed"] == 1


def test_a_folder_of_one_command_takes_no_other(tmp_path, tiny_dir):
    (tmp_path / "set.json").write_text(json.dumps({"module": "attn", "indices": [0]}))
    evaluate = ("evaluate", "--model", tiny_dir, "--drop-sets", tmp_path / "set.json", "--distributions", "code",
                "--samples", "2", "--seq-len", "16", "--out", tmp_path / "out")
    assert cli(*evaluate).returncode == 0
    before = table_hashes(tmp_path / "out")
    refused(cli(*evaluate[:-4], "--samples", "3", "--seq-len", "16", "--out", tmp_path / "out"),
            "`calibdrop evaluate` for other inputs or settings (samples differ)")
    refused(cli("summary", tmp_path / "nowhere", "--out", tmp_path / "out"), "the output of `calibdrop evaluate`")
    (tmp_path / "out" / MARKER).unlink()  # tables without a record of what wrote them (an earlier version's)
    refused(cli(*evaluate), "calibdrop results without a record of what wrote them")
    assert table_hashes(tmp_path / "out") == before
    assert cli(*evaluate, "--force").returncode == 0


def test_a_checkpoint_folder_with_files_calibdrop_did_not_write_is_refused(tmp_path, tiny_dir):
    for indices in ([0], [1]):
        (tmp_path / f"set{indices[0]}.json").write_text(json.dumps({"module": "attn", "indices": indices}))
    prune = ("prune", "--model", tiny_dir, "--drop-set", tmp_path / "set0.json", "--out", tmp_path / "pruned")
    assert cli(*prune).returncode == 0
    assert cli(*prune).returncode == 0  # the same checkpoint again
    (tmp_path / "pruned" / "notes.txt").write_text("mine")
    refused(cli(*prune), "files calibdrop did not write (notes.txt)")
    refused(cli("export", "--model", tiny_dir, "--drop-set", tmp_path / "set0.json", "--out", tmp_path / "pruned"),
            "notes.txt")
    assert (tmp_path / "pruned" / "notes.txt").read_text() == "mine"
    (tmp_path / "pruned" / "notes.txt").unlink()
    refused(cli(*prune[:-3], tmp_path / "set1.json", "--out", tmp_path / "pruned"), "other inputs or settings")
    (tmp_path / "pruned" / MARKER).unlink()  # a checkpoint saved before calibdrop recorded its files
    refused(cli(*prune), "files calibdrop did not write (", "config.json")
    forced = cli(*prune[:-3], tmp_path / "set1.json", "--out", tmp_path / "pruned", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["calibdrop_pruning"]["attn"] == [1]


def test_paper_keys_are_rewritten_only_when_equal(tmp_path, tiny_dir):
    (tmp_path / "set.json").write_text(json.dumps({"module": "attn", "indices": [0]}))
    paper = ("export", "--model", tiny_dir, "--drop-set", tmp_path / "set.json", "--format", "paper", "--out",
             tmp_path / "keys.json")
    assert cli(*paper).returncode == 0 and cli(*paper).returncode == 0
    (tmp_path / "set.json").write_text(json.dumps({"module": "attn", "indices": [1]}))
    refused(cli(*paper), "keys.json holds calibdrop results without a record")
    assert json.loads((tmp_path / "keys.json").read_text())["drop_attn_list"] == [0]


def test_score_without_out_never_writes_into_a_run_folder(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run_summary.json").write_text("{}")
    result = cli_in(tmp_path, "score", "--distributions", "code")
    refused(result, "holds a finished `calibdrop run`", "would write scores.parquet among its tables")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run_summary.json"]


# ---------------------------------------------------------------- silent cases

def test_drop_set_names_never_take_the_baselines_or_each_others(tmp_path, tiny_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "none.json", tmp_path / "a" / "set.json", tmp_path / "b" / "set.json"):
        path.write_text(json.dumps({"module": "attn", "indices": [0]}))
    base = ("evaluate", "--model", tiny_dir, "--distributions", "code", "--samples", "2", "--seq-len", "16", "--out")
    result = cli(*base, tmp_path / "o1", "--drop-sets", tmp_path / "none.json")
    assert result.returncode == 2 and "would be named 'none', the name of the unpruned model" in result.stderr
    result = cli(*base, tmp_path / "o2", "--drop-sets", tmp_path / "a" / "set.json", tmp_path / "b" / "set.json")
    assert result.returncode == 2 and "would both be named 'set': rename one" in result.stderr
    with pytest.warns(CalibdropWarning, match="set.json given more than once: using each once"):
        twice = cli(*base, tmp_path / "o3", "--drop-sets", tmp_path / "a" / "set.json", tmp_path / "a" / "set.json")
    assert twice.returncode == 0
    transfer = pd.read_parquet(tmp_path / "o3" / "transfer.parquet")
    assert sorted(transfer.loc[transfer["distribution"] == "code", "drop_set"]) == ["none", "set"]


def test_a_distribution_given_twice_is_scored_once(tmp_path, tiny_dir):
    base = ("score", "--model", tiny_dir, "--samples", "2", "--seq-len", "16", "--metrics", "cosine")
    once = cli(*base, "--distributions", "code", "--out", tmp_path / "once.parquet")
    with pytest.warns(CalibdropWarning, match="distribution code given more than once: using each once"):
        twice = cli(*base, "--distributions", "code,code", "--out", tmp_path / "twice.parquet")
    assert once.returncode == twice.returncode == 0
    rows = {name: pd.read_parquet(tmp_path / f"{name}.per_sample.parquet") for name in ("once", "twice")}
    assert not rows["twice"].duplicated().any()
    pd.testing.assert_frame_equal(rows["twice"], rows["once"])


def test_ctrl_c_ends_in_one_line_and_exit_130(tmp_path, tiny_dir):
    """A real SIGINT while a run computes its first stage."""
    process = subprocess.Popen([sys.executable, "-m", "analysis", "run", "--model", str(tiny_dir), "--preset", "smoke",
                                "--out", str(tmp_path / "run"), "--no-figures"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the run logs each stage as it begins
        if line.startswith("stage 1 of"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "calibdrop: interrupted; rerun the same command to resume"
    assert "Traceback" not in stderr
