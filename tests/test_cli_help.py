"""The command line as a shell user meets it: help at once (no torch), every option explained with its default, one preset table."""

import argparse
import json
import subprocess
import sys

import pytest

from analysis import presets
from analysis.cli import parser as cli


def _subparsers(parser: argparse.ArgumentParser):
    """Every (command path, parser) reachable from ``parser``."""
    found = [("calibdrop", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{path} {name}" if path != "calibdrop" else f"calibdrop {name}", p) for path, p in _subparsers(sub)]
    return found


def test_help_starts_without_importing_torch_pandas_or_scipy():
    code = ("import sys; from analysis.cli.parser import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert subprocess.run([sys.executable, "-m", "analysis", "--help"], capture_output=True, text=True).returncode == 0


def test_every_option_of_every_command_has_help_text():
    missing = []
    for path, parser in _subparsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_help_shows_the_real_defaults_from_the_one_presets_table():
    parser = cli.build_parser()
    score_help = dict(_subparsers(parser))["calibdrop score"].format_help()
    default = presets.PRESETS["default"]
    assert f"default: {default.samples} x {default.seq_len} tokens per distribution" in " ".join(score_help.split())
    run = dict(_subparsers(parser))["calibdrop run"]
    assert {a.dest: a.choices for a in run._actions}["preset"] == list(presets.PRESETS)
    assert "(default: results)" in " ".join(run.format_help().split())


def test_the_presets_name_only_registered_tasks_metrics_and_methods():
    from analysis.study import consensus
    from analysis.evaluation import heldout as evaluation
    from analysis.importance import metrics

    assert set(presets.PAPER_TASKS) == set(evaluation.TASKS)
    assert set(presets.PROXY_METRICS) | {presets.GROUND_TRUTH} <= set(metrics.metric_names())
    assert tuple(consensus.METHODS) == presets.CONSENSUS_METHODS
    for settings in presets.PRESETS.values():
        assert set(settings.metrics) <= set(metrics.metric_names()) and set(settings.tasks) <= set(evaluation.TASKS)


@pytest.mark.parametrize("command", [["models"], ["data", "list"]])
def test_list_commands_fit_a_100_column_terminal(command, capsys):
    assert cli.main(command) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(line) for line in lines) <= 100


def test_json_output_is_plain_utf8(capsys):
    assert cli.main(["data", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\\/" not in out and "\\u" not in out
    assert json.loads(out)
