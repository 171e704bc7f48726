"""Damaged run folders, odd options and short texts end in one line (exit 2) or a correct result, never a traceback:
the cases of an adversarial round rebuilt on a copy of the smoke run, the readers' checks (analysis/artifacts.py)
against every table the smoke and tiny runs write, and tables a run lists but lacks."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, cli

from analysis import artifacts
from analysis.errors import CalibdropWarning, InputError
from analysis.io import write_table
from analysis.pipeline import STAGES
from analysis.presets import RunSettings
from analysis.stages import StageStore


def copy_run(folder: Path, tmp_path: Path) -> Path:
    """A copy of a run folder (its tables, sidecars and record; no figures or parts) to damage."""
    target = tmp_path / "run"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("figures", "parts", "report.*"))
    return target


def rewrite_table(folder: Path, name: str, change) -> None:
    """Table ``name`` changed by ``change`` and saved with a sidecar whose checksum matches (as a rerun would)."""
    path = folder / f"{name}.parquet"
    data = change(pd.read_parquet(path)).to_parquet(index=False)
    path.write_bytes(data)
    edit_json(path.with_suffix(".json"), lambda record: record.update(content_sha256=hashlib.sha256(data).hexdigest()))


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    result = change(record)
    path.write_text(json.dumps(record if result is None else result))


def settings(record: dict) -> dict:
    return record["provenance"]["settings"]


# The 13 run-folder cases of the adversarial round: (file damaged, how).
DAMAGED = {
    "run_summary.json garbage bytes": ("run_summary.json", lambda f: (f / "run_summary.json").write_bytes(b"\xff\xfe\x00x")),
    "run_summary.json truncated": ("run_summary.json", lambda f: (f / "run_summary.json").write_text(
        (f / "run_summary.json").read_text()[:100])),
    "run_summary.json without provenance": ("run_summary.json", lambda f: edit_json(
        f / "run_summary.json", lambda r: r.pop("provenance"))),
    "run_summary.json budgets a string": ("run_summary.json", lambda f: edit_json(
        f / "run_summary.json", lambda r: settings(r).update(budgets="attn"))),
    "run_summary.json an array": ("run_summary.json", lambda f: (f / "run_summary.json").write_text("[1, 2]")),
    "transfer without distribution": ("transfer.parquet", lambda f: rewrite_table(
        f, "transfer", lambda t: t.drop(columns="distribution"))),
    "drop_sets without drop_set": ("drop_sets.parquet", lambda f: rewrite_table(
        f, "drop_sets", lambda t: t.drop(columns="drop_set"))),
    "scores.per_sample with a column renamed": ("scores.per_sample.parquet", lambda f: rewrite_table(
        f, "scores.per_sample", lambda t: t.rename(columns={"layer": "block"}))),
    "transfer ratios as strings": ("transfer.parquet", lambda f: rewrite_table(
        f, "transfer", lambda t: t.astype({"ppl_ratio": str}))),
    "transfer ratios NaN": ("transfer.parquet", lambda f: rewrite_table(
        f, "transfer", lambda t: t.assign(ppl_ratio=np.nan))),
    "sidecar model a string": ("transfer.json", lambda f: edit_json(
        f / "transfer.json", lambda r: r.update(model="smollm2"))),
    "sidecar layer count 'thirty'": ("scores.json", lambda f: edit_json(
        f / "scores.json", lambda r: r["model"].update(n_layers="thirty"))),
    "bootstrap_pairs truncated": ("bootstrap_pairs.parquet", lambda f: (f / "bootstrap_pairs.parquet").write_bytes(
        (f / "bootstrap_pairs.parquet").read_bytes()[:200])),
}


def assert_one_line(result, *named: str) -> str:
    """Exit 2 with one error line, the last on stderr, naming every one of ``named``; returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines, result.stderr
    errors = [line for line in lines if line.startswith("calibdrop: error:")]
    assert errors == [lines[-1]], result.stderr
    assert all(name in errors[0] for name in named), errors[0]
    return errors[0]


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_run_folder_is_one_line_naming_the_file_and_what_to_do(smoke_run, tmp_path, case):
    name, damage = DAMAGED[case]
    folder = copy_run(smoke_run, tmp_path)
    damage(folder)
    report, summary = ("report", folder, "--no-figures"), ("summary", folder, "--out", tmp_path / "summary")
    readers = {"scores.json": [summary], "scores.per_sample.parquet": [report]}.get(name, [report, summary])
    for argv in readers:
        line = assert_one_line(cli(*argv), str(folder / name))
        assert f"calibdrop run --out {folder}" in line  # what to do


def test_a_report_says_which_listed_tables_are_missing_or_stale_and_leaves_them_out(smoke_run, tmp_path):
    folder = copy_run(smoke_run, tmp_path)
    (folder / "transfer.parquet").unlink()
    edit_json(folder / "validity.json", lambda r: r.update(stage_key="0" * 64))  # written by something else
    with pytest.warns(CalibdropWarning) as caught:
        result = cli("report", folder, "--no-figures")
    assert result.returncode == 0, result.stderr
    [warning] = [str(w.message) for w in caught if issubclass(w.category, CalibdropWarning)]
    assert "transfer.parquet is missing" in warning and "validity.parquet is stale" in warning
    assert f"calibdrop run --out {folder}" in warning
    report = (folder / "report.md").read_text()
    assert "## Tables left out" in report and "transfer.parquet is missing" in report
    assert "validity.parquet is stale" in report

    with pytest.warns(CalibdropWarning, match="validity.parquet is stale.*transfer.parquet is missing"):
        summary = cli("summary", folder, "--out", tmp_path / "summary")
    assert summary.returncode == 0, summary.stderr
    assert not (tmp_path / "summary" / "summary_validity.parquet").exists()  # the stale table is not used


def assert_intact(folder: Path) -> None:
    """Every table of a run folder passes the reader's checks, none is left out, and each has its columns listed."""
    record = artifacts.read_run_summary(folder)
    assert set(record["stage_keys"]) >= {"scores.per_sample", "transfer", "drop_sets"}
    tables = {}
    for path in sorted(folder.glob("*.parquet")):
        tables[path.name.removesuffix(".parquet")] = artifacts.read_result_table(path)  # raises when damaged
    assert artifacts.left_out_tables(list(tables), tables, record) == {}
    assert set(tables) - set(artifacts.TABLE_COLUMNS) == set(), "a table of the run has no columns listed"


def test_the_smoke_run_has_nothing_left_out_and_every_table_its_stage_writes(smoke_run):
    assert_intact(smoke_run)


def test_the_tiny_run_has_nothing_left_out_and_every_table_its_stage_writes(tiny_run):
    assert_intact(tiny_run[0])


def test_every_stage_table_and_every_setting_has_a_schema():
    outputs = {name for stage in STAGES for name in stage.outputs}
    assert outputs == set(artifacts.TABLE_COLUMNS)
    properties = artifacts.RUN_SUMMARY_SCHEMA["properties"]["provenance"]["properties"]["settings"]["properties"]
    assert all(properties[field] for field in RunSettings.__dataclass_fields__), "a setting's annotation is unmapped"


@pytest.mark.parametrize("frame, problem", [
    (pd.DataFrame({"metric": ["cosine"], "module": ["attn"], "k": [2], "drop_set": ["x"]}), "has no column indices"),
    (pd.DataFrame({"metric": ["cosine"], "module": ["attn"], "k": ["2"], "drop_set": ["x"], "indices": [[1, 2]]}),
     "column k of str values, where its stage writes int"),
    (pd.DataFrame({"metric": [None], "module": ["attn"], "k": [2], "drop_set": ["x"], "indices": [[1, 2]]}),
     "1 missing (NaN) values in column metric"),
    (pd.DataFrame({"metric": ["c"], "module": ["attn"], "k": [2.0], "drop_set": ["x"], "indices": [[1, 2]]}),
     "column k of float values, where its stage writes int"),
    (pd.DataFrame({"metric": ["c"], "module": ["attn"], "k": [2], "drop_set": ["x"], "indices": [1], "new": [0]}),
     "column indices of int values"),
])
def test_column_problems_name_the_column_and_what_is_wrong(frame, problem):
    assert problem in artifacts.column_problem(frame, "drop_sets")


def test_extra_columns_and_empty_tables_pass():
    frame = pd.DataFrame({"metric": ["c"], "module": ["attn"], "k": [2], "drop_set": ["x"], "indices": [[1, 2]],
                          "status": ["added later"]})
    assert artifacts.column_problem(frame, "drop_sets") is None
    assert artifacts.column_problem(pd.DataFrame(columns=list(frame.columns)), "drop_sets") is None


def test_the_stage_store_recomputes_a_table_whose_columns_were_damaged(tmp_path):
    good = pd.DataFrame({"metric": ["cosine"], "module": ["attn"], "k": [2], "drop_set": ["cosine/attn-2:borda"],
                         "indices": [[3, 4]]})
    store = StageStore(tmp_path, {"spec": "tiny"}, log=lambda line: None)
    store.table("drop_sets", "a" * 64, lambda: good)
    rewrite_table(tmp_path, "drop_sets", lambda t: t.drop(columns="indices"))
    calls = []
    with pytest.warns(CalibdropWarning, match="drop_sets.parquet has no column indices; computing it again"):
        again = StageStore(tmp_path, {"spec": "tiny"}, log=lambda line: None).table(
            "drop_sets", "a" * 64, lambda: calls.append(1) or good)
    assert calls == [1] and list(again.columns) == list(good.columns)
    assert "indices" in pd.read_parquet(tmp_path / "drop_sets.parquet")


def test_per_sample_scores_read_by_commands_are_checked(tmp_path):
    path = tmp_path / "scores.per_sample.parquet"
    write_table(pd.DataFrame({"metric": ["cosine"], "sample": ["zero"]}), path, {"kind": "scores-per-sample"})
    for argv in (("consensus", path, "--k", "1", "--out", tmp_path / "set.json"),
                 ("route", path, "--out", tmp_path / "route")):
        assert_one_line(cli(*argv), str(path), "has no column layer")


# ---------------------------------------------------------------- options and texts

def test_route_with_no_method_is_one_line(smoke_run, tmp_path):
    assert_one_line(cli("route", smoke_run, "--methods", ",", "--out", tmp_path / "route"), "--methods", "','")


def test_an_integer_dtype_is_one_line(tiny_dir, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "some words to score"}\n')
    for dtype in ("int8", "bool", "complex64"):
        result = cli("score", "--texts", texts, "--model", tiny_dir, "--dtype", dtype, "--out", tmp_path / "s.parquet")
        assert_one_line(result, repr(dtype))


def test_a_window_with_no_next_token_has_no_loss_terms():
    from analysis.importance.ablation import logsumexp_by_position, row_nll

    assert logsumexp_by_position(torch_zeros(2, 0, 5)).shape == (2, 0)
    nll, n_predicted = row_nll(torch_zeros(2, 1, 5), torch_zeros(2, 1, dtype="long"), torch_zeros(2, 1, dtype="long") + 1)
    assert nll.tolist() == [0.0, 0.0] and n_predicted.tolist() == [0, 0]


def torch_zeros(*shape, dtype="float32"):
    import torch

    return torch.zeros(*shape, dtype=getattr(torch, dtype))


def test_check_measures_loss_on_texts_with_a_next_token_only():
    from tiny import byte_tokenizer

    from analysis.evaluation.check import _text_windows

    tokenizer = byte_tokenizer()
    long = [f"text number {i}" for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = _text_windows(tokenizer, long, 3, 64, seed=0)
    assert before["sample"] == sorted(np.random.default_rng(0).choice(6, size=3, replace=False).tolist())
    short = tokenizer.decode(tokenizer("a")["input_ids"][:1], skip_special_tokens=True) or "a"
    mixed = [short, *long[:3], short]
    with pytest.warns(CalibdropWarning, match="2 of your texts have fewer than two tokens"):
        windows = _text_windows(tokenizer, mixed, 2, 64, seed=0)
    assert set(windows["sample"]) <= {1, 2, 3}
    with pytest.raises(InputError, match=r"loss_samples=3: only 2 of your 4 texts have two tokens or more"):
        _text_windows(tokenizer, [short, short, *long[:2]], 3, 64, seed=0)


def test_check_on_texts_of_one_token_is_one_line(smoke_run, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a"}\n' * 8)
    made = cli("consensus", smoke_run, "--k", "2", "--out", tmp_path / "set.json")
    assert made.returncode == 0, made.stderr
    result = cli("check", "--drop-set", tmp_path / "set.json", "--texts", texts, "--loss-samples", "4", "--n-perm", "10",
                 "--out", tmp_path / "check")
    assert_one_line(result, "loss_samples=4", "only 0 of your 8 texts")


# ---------------------------------------------------------------- git

def test_provenance_asks_git_quietly_and_says_when_there_is_no_checkout(tmp_path):
    shutil.copytree(ROOT / "analysis", tmp_path / "analysis", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    code = "from analysis.io import provenance; print(provenance()['source'])"
    outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                             check=False)
    assert outside.stdout.strip() == "not a git checkout" and outside.stderr == "", outside.stderr
    inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert inside.stderr == "", inside.stderr
    if (ROOT / ".git").exists():  # a checkout (a worktree's .git is a file)
        assert len(inside.stdout.strip().removesuffix("+modified")) == 40, inside.stdout


def test_lm_eval_asks_no_git_of_the_working_folder(tmp_path, monkeypatch, capfd):
    import lm_eval
    import lm_eval.models.huggingface
    from lm_eval import evaluator

    from analysis.evaluation import heldout
    from analysis.io import source_revision

    monkeypatch.chdir(tmp_path)  # not a checkout: lm-eval's own `git describe` prints "fatal: not a git repository"
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **kwargs: {"git_hash": evaluator.get_git_commit_hash()})
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", evaluator.get_git_commit_hash)  # restored
    monkeypatch.setattr(heldout, "input_device", lambda model: "cpu")
    monkeypatch.setattr(heldout, "task_configs", lambda names: [])
    results = heldout.lm_eval_results(None, None, ["arc_easy"])
    assert results["git_hash"] == source_revision()
    assert "fatal" not in capfd.readouterr().err
