"""benchmarks/reference/precision_agreement.py and ground_truth_vs_reference.py on a committed reference study against
itself (everything the same) and against a copy with known changes (each change found, nothing else)."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.io import read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference" / "smollm2-135m"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "reference" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


precision = script("precision_agreement")
ground_truth = script("ground_truth_vs_reference")
TABLES = ("scores.per_sample", "drop_sets", "greedy", "pruned", "transfer", "claims", "split_half")


def replaced_last(members) -> list:
    """The members with the last one replaced by layer 0 (of the members' own type: the tables keep them as text)."""
    members = list(members)
    return [*members[:-1], type(members[0])(0)]


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    """A copy of the reference's tables with one consensus set's, one greedy path's and one evaluated set's members
    changed, one set's held-out ratio raised by 1%, one claim's resolution flipped and one importance score moved."""
    out = tmp_path_factory.mktemp("changed")
    shutil.copy(REFERENCE / "run_summary.json", out)
    tables = {name: read_table(REFERENCE / f"{name}.parquet") for name in TABLES}
    sets = tables["drop_sets"]
    sets.at[0, "indices"] = replaced_last(sets.at[0, "indices"])
    greedy = tables["greedy"]
    last = greedy[greedy["objective"] == "code"]["step"].idxmax()
    greedy.at[last, "candidate"] = "0"
    pruned = tables["pruned"]
    row = pruned.index[pruned["drop_set"] == "cosine/attn-8:borda"][0]
    pruned.at[row, "indices"] = replaced_last(pruned.at[row, "indices"])
    transfer = tables["transfer"]
    bump = transfer.index[(transfer["drop_set"] == "relative_update/attn-8:borda")
                          & (transfer["distribution"] == "code")][0]
    transfer.at[bump, "ppl_ratio"] *= 1.01
    tables["claims"].at[0, "resolved"] = not tables["claims"].at[0, "resolved"]
    scores = tables["scores.per_sample"]
    scores.loc[(scores["metric"] == "cosine") & (scores["layer"] == 3) & (scores["module"] == "attn")
               & (scores["distribution"] == "math"), "importance"] += 1.0
    for name, table in tables.items():
        write_table(table, out / f"{name}.parquet", {"kind": name})
    return out


def test_a_study_against_itself_agrees_on_everything():
    summary, importance, differing = precision.compare(REFERENCE, REFERENCE)
    assert summary["importance"]["min_rho"] == pytest.approx(1.0)
    assert summary["importance"]["max_relative_difference"] == 0
    for name in ("drop_sets", "greedy_paths", "evaluated_sets"):
        assert summary[name]["same"] == summary[name]["compared"] > 0 and not summary[name]["differ"]
    assert summary["heldout_ratios"]["max_abs_log_difference"] == 0
    claims = summary["claims"]
    assert claims["same_subject"] == claims["same_resolution"] == claims["same_finding"] == claims["claims"] > 0
    assert differing.empty


def test_each_change_is_found_and_nothing_else(changed):
    summary, importance, differing = precision.compare(REFERENCE, changed)
    assert summary["drop_sets"]["same"] == summary["drop_sets"]["compared"] - 1
    assert [d["key"] for d in summary["greedy_paths"]["differ"]] == [["code", "attn"]]
    assert [d["key"] for d in summary["evaluated_sets"]["differ"]] == [["cosine/attn-8:borda"]]
    # the changed evaluated set is left out of the ratios; the bumped one moves by log(1.01)
    assert summary["heldout_ratios"]["max_abs_log_difference"] == pytest.approx(np.log(1.01))
    assert summary["claims"]["same_resolution"] == summary["claims"]["claims"] - 1 and len(differing) == 1
    moved = importance[importance["max_relative_difference"] > 0]
    assert moved[["metric", "module", "distribution"]].values.tolist() == [["cosine", "attn", "math"]]


def test_ground_truth_against_itself_and_against_the_changed_copy(changed):
    itself = ground_truth.compare(REFERENCE, REFERENCE)
    split = read_table(REFERENCE / "split_half.parquet")
    truth = split[split["metric"] == "ablation"].groupby("module")["reliability"].min()
    for module, row in itself["reliability"].items():
        assert row["run_min"] == row["reference_min"] == round(truth[module], 3)
        assert row["passes_rule"] == (truth[module] >= 0.95)
    assert all(row["same"] == 1 and row["jaccard"] == 1 for row in itself["consensus_sets"].values())
    assert all(path["shared"] == path["k"] for path in itself["greedy"])
    against = ground_truth.compare(changed, REFERENCE)
    metric = read_table(REFERENCE / "drop_sets.parquet").at[0, "metric"]
    assert against["consensus_sets"][metric]["same"] < 1
    assert {path["objective"]: path["k"] - path["shared"] for path in against["greedy"]}["code"] == 1
    assert sum(path["k"] - path["shared"] for path in against["greedy"]) == 1
