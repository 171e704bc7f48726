"""benchmarks/reference/default_vs_reference.py on synthetic claims and set groups: agree, disagree, missing, unresolved in the
reference, a comparison matched by its sets' members the other way round, and the run's best set inside and outside
the reference's top group."""

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference" / "default_vs_reference.py"
spec = importlib.util.spec_from_file_location("default_vs_reference", SCRIPT)
dvr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dvr)

LOSES = "a loses less than b"


def claim(subject, ci, resolved=True, kind=LOSES, module=None, k=None):
    return {"claim": kind, "module": module, "k": k, "subject": subject, "finding": f"finding on {subject}",
            "estimate": sum(ci) / 2, "ci_low": ci[0], "ci_high": ci[1], "resolved": resolved}


def group(module, k, rows, resolved):
    """``rows``: (label, in_group) from the best down."""
    return [{"module": module, "k": k, "drop_set": label, "rank": rank, "ppl_ratio": 1.5 + rank / 10, "ci_low": 1.4,
             "ci_high": 1.9, "in_group": in_group, "resolved": resolved, "ratio_to_best": 1 - rank / 100,
             "pair_ci_low": 0.9, "pair_ci_high": 1.01} for rank, (label, in_group) in enumerate(rows, start=1)]


def tables(claims, pruned, comparisons, groups):
    return {"claims": pd.DataFrame(claims).astype({"k": "Int64"}),
            "pruned": pd.DataFrame([{"drop_set": label, "indices": idx} for label, idx in pruned.items()]),
            "comparisons": pd.DataFrame([{"comparison": c, "a": a, "b": b, "distribution": "worst"}
                                         for c, a, b in comparisons]),
            "set_groups": pd.DataFrame(groups),
            "validity": pd.DataFrame(columns=["metric", "distribution", "module", "spearman", "spearman_ci_low",
                                              "spearman_ci_high"]),
            "split_half": pd.DataFrame(columns=["metric", "distribution", "module", "reliability"])}


RUN = tables(
    [claim("same", (0.8, 0.9)), claim("opposite", (0.8, 0.9)), claim("only in the run", (0.8, 0.9)),
     claim("unsure there", (0.8, 0.9)), claim("new name", (1.1, 1.2)), claim("unsure here", (0.9, 1.1), False),
     claim("cosine/attn-2:borda", (1.4, 1.6), kind="recommended set", module="attn", k=2),
     claim("cosine/mlp-2:borda", (1.4, 1.6), kind="recommended set", module="mlp", k=2),
     claim("cosine/block-2:borda", (1.4, 1.6), kind="recommended set", module="block", k=2)],
    {"cosine/attn-2:borda": [2, 1], "x/attn-2:own": [3, 4], "y/attn-2:own": [1, 2], "cosine/mlp-2:borda": [7, 8],
     "z/mlp-2:borda": [9, 10], "cosine/block-2:borda": [11, 12]},
    [("new name", "y/attn-2:own", "x/attn-2:own")],
    group("attn", 2, [("cosine/attn-2:borda", True), ("x/attn-2:own", False)], True)
    + group("mlp", 2, [("cosine/mlp-2:borda", True), ("z/mlp-2:borda", False)], True)
    + group("block", 2, [("cosine/block-2:borda", True)], True))

REFERENCE = tables(
    [claim("same", (0.85, 0.95)), claim("opposite", (1.1, 1.2)), claim("unsure there", (0.9, 1.1), False),
     claim("old name", (0.7, 0.8)), claim("unsure here", (0.9, 1.1), False),
     claim("a/attn-2:greedy", (1.4, 1.6), False, kind="recommended set", module="attn", k=2),
     claim("z/mlp-2:borda", (1.4, 1.6), kind="recommended set", module="mlp", k=2),
     claim("e/block-2:borda", (1.4, 1.6), False, kind="recommended set", module="block", k=2)],
    {"a/attn-2:greedy": [1, 3], "b/attn-2:borda": [1, 2], "c/attn-2:borda": [3, 4], "d/attn-2:own": [1, 2],
     "z/mlp-2:borda": [9, 10], "w/mlp-2:borda": [8, 7], "e/block-2:borda": [13, 14], "f/block-2:borda": [15, 16],
     "g/block-2:borda": [11, 12]},
    [("old name", "c/attn-2:borda", "d/attn-2:own")],
    group("attn", 2, [("a/attn-2:greedy", True), ("b/attn-2:borda", True), ("c/attn-2:borda", False)], False)
    + group("mlp", 2, [("z/mlp-2:borda", True), ("w/mlp-2:borda", False)], True)
    + group("block", 2, [("e/block-2:borda", True), ("f/block-2:borda", True), ("g/block-2:borda", False)], False))


def test_each_resolved_claim_gets_its_outcome():
    rows = dvr.compare_claims(RUN, REFERENCE).set_index("subject")
    assert rows.loc["same", "outcome"] == "agree"
    assert rows.loc["opposite", "outcome"] == "disagree"
    assert rows.loc["only in the run", "outcome"] == "missing"
    assert rows.loc["unsure there", "outcome"] == "reference unresolved"
    assert rows.loc["unsure here", "outcome"] == ""          # the run does not resolve it: nothing to compare
    # {3, 4} loses less in both: the run's side b is the reference's side a of the same two sets
    assert rows.loc["new name", ["outcome", "matched_by", "reference_subject", "reference_verdict"]].tolist() == \
        ["agree", "members", "old name", "b"]
    # the run's recommended {1, 2} is in the reference's unresolved top group: the reference cannot tell; {7, 8} is
    # not the reference's resolved recommendation; {11, 12} is ranked out of the reference's unresolved top group
    assert rows.loc["cosine/attn-2:borda", "outcome"] == "reference unresolved"
    assert rows.loc["cosine/mlp-2:borda", "outcome"] == "disagree"
    assert rows.loc["cosine/block-2:borda", "outcome"] == "disagree"


def test_the_run_best_set_by_members_inside_or_outside_the_reference_top_group():
    groups = {(g["module"], g["k"]): g for g in dvr.top_groups(RUN, REFERENCE)}
    inside, outside, below = groups[("attn", 2)], groups[("mlp", 2)], groups[("block", 2)]
    assert (inside["in_reference_group"], inside["reference_name"], inside["reference_rank"]) == \
        (True, "b/attn-2:borda", 2)
    assert [s["drop_set"] for s in inside["reference_group"]] == ["a/attn-2:greedy", "b/attn-2:borda"]
    assert (outside["in_reference_group"], outside["evaluated_in_reference"], outside["reference_rank"]) == \
        (False, True, 2)
    assert (below["in_reference_group"], below["reference_rank"], below["reference_resolved"]) == (False, 3, False)
