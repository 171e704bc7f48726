"""The report: a verdict with CIs, the recommended set by held-out loss, every module kind, flags, numeric order, a linked HTML."""

import pandas as pd
import pytest

from analysis import report
from analysis.accuracy import accuracy_analysis, accuracy_table
from analysis.io import read_table
from analysis.pipeline import RunSettings, run
from test_pipeline import SETTINGS


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-run")
    run(str(tiny_dir), out, preset=RunSettings(**SETTINGS), progress=False, log=lambda m: None)
    return out


def test_recommended_set_is_the_lowest_worst_case_held_out_ratio_of_every_evaluated_kind(tiny_run):
    transfer = read_table(tiny_run / "transfer.parquet")
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != "none") & ~transfer["method"].str.startswith("random")]
    expected = worst.loc[worst.groupby(["module", "k"])["ppl_ratio"].idxmin()]
    text = (tiny_run / "report.md").read_text()
    section = text.split("## Recommended drop sets")[1].split("\n## ")[0]
    assert set(expected["module"]) == {"attn", "mlp", "block", "joint"}
    for row in expected.itertuples():
        assert f"| {row.module} " in section and f"{row.metric} {row.method}" in section and f"{row.ppl_ratio:.2f} [" in section


def test_the_verdict_carries_cis_and_every_module_kind_has_its_section(tiny_run):
    text = (tiny_run / "report.md").read_text()
    verdict = text.split("## Verdict")[1].split("\n## ")[0]
    assert verdict.count("[") >= 8 and "noise floor" in verdict
    for module in ("attn", "mlp", "block", "joint"):
        assert f"### {module}, k = " in text and f"**{module}**" in verdict


def test_html_has_a_table_of_contents_linking_sections_and_captioned_figures(tiny_run):
    html = (tiny_run / "report.html").read_text()
    assert 'class="toc"' in html and 'href="#verdict"' in html and 'id="verdict"' in html
    assert "data:image/png;base64," in html and 'src="figures/' not in html
    assert report.CAPTIONS["transfer_matrix"].split(".")[0] in html


def test_candidates_are_ordered_as_numbers():
    assert report._numeric_order(["10", "2", "attn:10", "attn:3", "mlp:1"]) == ["2", "10", "attn:3", "attn:10", "mlp:1"]


def test_a_baseline_not_clearly_above_chance_is_excluded():
    # boolq: 96 of 200 against chance 0.5 (excluded); arc_easy: 120 of 200 against 0.25 (kept)
    items = pd.DataFrame([{"drop_set": "none", "task": task, "subtask": task, "item": f"{task}:{i}", "correct": float(i < right),
                           "correct_norm": float("nan"), "subtask_items": 200} for task, right in (("boolq", 96), ("arc_easy", 120))
                          for i in range(200)])
    paired, tasks = accuracy_analysis(items, [], task_limit=200)
    tables = {"accuracy": accuracy_table(items), "accuracy_paired": paired, "accuracy_tasks": tasks}
    results = report.Results({}, RunSettings(task_limit=200), pd.DataFrame(), tables, [])
    excluded = [line for line in report.section_accuracy(results) if line.startswith("- **Excluded**")]
    assert len(excluded) == 1 and "boolq" in excluded[0] and "0.480 on 200 items" in excluded[0]
