"""Does a reference study's answer depend on the matmul precision?  Two run folders of one model, table by table.

  python benchmarks/reference/precision_agreement.py reference/smollm2-135m /tmp/tf32/smollm2-135m \
      --out benchmarks/results/precision-tf32-vs-fp32-smollm2-135m-h200

``a`` and ``b`` are finished ``calibdrop run`` folders (or committed copies) of the same model, settings and data at two
matmul precisions.  Compared:

* importance: per metric, module kind and distribution, Spearman's ρ between the two runs' layer means, and the largest
  relative difference of a score ``|s_b - s_a| / max(|s_a|)`` (over that metric's scores);
* drop sets: how many of the consensus sets (``drop_sets``), greedy paths (``greedy``) and evaluated sets (``pruned``)
  have the same members;
* held-out ratios: ``|log ratio_b - log ratio_a|`` of every evaluated set with the same members in both runs on every
  distribution (``transfer``), against the width of the set's own 95% CI in log units;
* claims: for each headline claim (``claims``), whether both runs name the same subject, resolve it alike, and state the
  same finding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analysis.io import package_versions, read_table  # noqa: E402
from benchmarks.reference.results_file import write_comparison  # noqa: E402


def importance_agreement(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per (metric, module, distribution): ρ of the layer means, and the largest relative score difference."""
    keys = ["metric", "module", "distribution", "layer"]
    mean_a = a.groupby(keys)["importance"].mean()
    mean_b = b.groupby(keys)["importance"].mean().loc[mean_a.index]
    joined = pd.DataFrame({"a": mean_a, "b": mean_b}).reset_index()
    scale = joined.groupby("metric")["a"].transform(lambda s: s.abs().max())
    joined["relative_difference"] = (joined["b"] - joined["a"]).abs() / scale
    rows = []
    for (metric, module, distribution), part in joined.groupby(["metric", "module", "distribution"]):
        rows.append({"metric": metric, "module": module, "distribution": distribution,
                     "rho": stats.spearmanr(part["a"], part["b"]).statistic,
                     "max_relative_difference": part["relative_difference"].max()})
    return pd.DataFrame(rows)


def same_members(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], members: str) -> dict:
    """How many rows (by ``keys``) list the same ``members`` (as sets) in both tables, and which differ."""
    left = a.set_index(keys)[members].map(lambda v: tuple(sorted(map(str, v))))
    right = b.set_index(keys)[members].map(lambda v: tuple(sorted(map(str, v)))).reindex(left.index)
    differ = left[left != right]
    return {"compared": len(left), "same": int((left == right).sum()),
            "differ": [{"key": list(map(str, k if isinstance(k, tuple) else (k,))), "a": list(differ[k]),
                        "b": list(right[k]) if isinstance(right[k], tuple) else None} for k in differ.index]}


def greedy_paths(table: pd.DataFrame) -> pd.DataFrame:
    """One row per greedy path: its candidates in step order."""
    ordered = table.sort_values("step")
    return ordered.groupby(["objective", "module"])["candidate"].agg(list).rename("path").reset_index()


def ratio_agreement(a: pd.DataFrame, b: pd.DataFrame, other_members=()) -> dict:
    """``|Δ log ratio|`` between the runs over every (set, distribution) whose set has the same members in both runs
    (``other_members``: the labels that do not), and the same relative to the set's own CI width in log units
    (``log ci_high - log ci_low`` of run ``a``)."""
    keys = ["drop_set", "distribution"]
    joined = a.set_index(keys)[["ppl_ratio", "ci_low", "ci_high"]].join(
        b.set_index(keys)[["ppl_ratio"]].add_suffix("_b"), how="inner")
    labels = joined.index.get_level_values("drop_set")
    joined = joined[(labels != "none") & ~labels.isin(list(other_members))]
    delta = (np.log(joined["ppl_ratio_b"]) - np.log(joined["ppl_ratio"])).abs()
    width = np.log(joined["ci_high"]) - np.log(joined["ci_low"])
    return {"compared": len(joined), "max_abs_log_difference": float(delta.max()),
            "median_abs_log_difference": float(delta.median()),
            "max_difference_over_ci_width": float((delta / width).max())}


def claims_agreement(a: pd.DataFrame, b: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Per headline claim (by ``claim, module, k`` and its order among equals): same subject, resolution, finding?"""
    def keyed(table):
        table = table.assign(k=table["k"].fillna(-1), module=table["module"].fillna(""))
        table = table.assign(n=table.groupby(["claim", "module", "k"]).cumcount())
        return table.set_index(["claim", "module", "k", "n"])

    left, right = keyed(a), keyed(b)
    joined = left[["subject", "resolved", "finding"]].join(
        right[["subject", "resolved", "finding"]].add_suffix("_b"), how="outer")
    joined["same_subject"] = joined["subject"] == joined["subject_b"]
    joined["same_resolution"] = joined["resolved"] == joined["resolved_b"]
    joined["same_finding"] = joined["finding"] == joined["finding_b"]
    summary = {"claims": len(joined), "same_subject": int(joined["same_subject"].sum()),
               "same_resolution": int(joined["same_resolution"].sum()),
               "same_finding": int(joined["same_finding"].sum()),
               "resolved_a": int(left["resolved"].sum()), "resolved_b": int(right["resolved"].sum()),
               "resolved_in_both_and_same_subject": int((joined["resolved"].astype(bool)
                                                         & joined["resolved_b"].astype(bool)
                                                         & joined["same_subject"]).sum())}
    return summary, joined[~(joined["same_subject"] & joined["same_resolution"])].reset_index()


def compare(a: Path, b: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    table = lambda folder, name: read_table(folder / f"{name}.parquet")  # noqa: E731
    importance = importance_agreement(table(a, "scores.per_sample"), table(b, "scores.per_sample"))
    claims, differing = claims_agreement(table(a, "claims"), table(b, "claims"))
    evaluated = same_members(table(a, "pruned"), table(b, "pruned"), ["drop_set"], "indices")
    precision = lambda folder: json.loads((folder / "run_summary.json").read_text())[  # noqa: E731
        "provenance"]["settings"].get("matmul_precision", "highest")
    summary = {
        "a": {"folder": str(a), "matmul_precision": precision(a)},
        "b": {"folder": str(b), "matmul_precision": precision(b)},
        "importance": {"groups": len(importance), "min_rho": float(importance["rho"].min()),
                       "median_rho": float(importance["rho"].median()),
                       "max_relative_difference": float(importance["max_relative_difference"].max()),
                       "min_rho_by_metric": importance.groupby("metric")["rho"].min().round(4).to_dict()},
        "drop_sets": same_members(table(a, "drop_sets"), table(b, "drop_sets"), ["metric", "module", "k", "drop_set"],
                                  "indices"),
        "greedy_paths": same_members(greedy_paths(table(a, "greedy")), greedy_paths(table(b, "greedy")),
                                     ["objective", "module"], "path"),
        "evaluated_sets": evaluated,
        "heldout_ratios": ratio_agreement(table(a, "transfer"), table(b, "transfer"),
                                          [d["key"][0] for d in evaluated["differ"]]),
        "claims": claims,
        "versions": package_versions(),
    }
    return summary, importance, differing


def markdown(summary: dict, differing: pd.DataFrame) -> str:
    s = summary
    lines = [f"# Matmul precision: {s['a']['matmul_precision']} ({s['a']['folder']}) vs "
             f"{s['b']['matmul_precision']} ({s['b']['folder']})", "",
             f"* importance: {s['importance']['groups']} (metric, module, distribution) rankings, ρ min "
             f"{s['importance']['min_rho']:.4f}, median {s['importance']['median_rho']:.4f}; largest score difference "
             f"{s['importance']['max_relative_difference']:.2e} of the metric's largest score",
             f"* consensus drop sets with the same members: {s['drop_sets']['same']} of {s['drop_sets']['compared']}",
             f"* greedy paths identical: {s['greedy_paths']['same']} of {s['greedy_paths']['compared']}",
             f"* evaluated sets with the same members: {s['evaluated_sets']['same']} of "
             f"{s['evaluated_sets']['compared']}",
             f"* held-out ratios ({s['heldout_ratios']['compared']} set × distribution, sets with the same members): "
             f"|Δ log ratio| median "
             f"{s['heldout_ratios']['median_abs_log_difference']:.2e}, max "
             f"{s['heldout_ratios']['max_abs_log_difference']:.2e} (at most "
             f"{s['heldout_ratios']['max_difference_over_ci_width']:.1%} of the set's own 95% CI width)",
             f"* claims: {s['claims']['claims']}; same subject {s['claims']['same_subject']}, same resolution "
             f"{s['claims']['same_resolution']}, same finding text {s['claims']['same_finding']}; resolved "
             f"{s['claims']['resolved_a']} vs {s['claims']['resolved_b']}", ""]
    if s["drop_sets"]["differ"] or s["evaluated_sets"]["differ"] or s["greedy_paths"]["differ"]:
        lines += ["## Sets whose members differ", ""]
        for name in ("drop_sets", "greedy_paths", "evaluated_sets"):
            lines += [f"* {name} {'/'.join(d['key'])}: {d['a']} vs {d['b']}" for d in s[name]["differ"]]
        lines.append("")
    if len(differing):
        lines += ["## Claims whose subject or resolution differ", ""]
        for row in differing.itertuples():
            lines += [f"* {row.claim} {row.module} {row.k if row.k != -1 else ''}: {row.finding} | {row.finding_b}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    summary, importance, differing = compare(args.a, args.b)
    write_comparison(args.out, summary, lambda written: markdown(written, differing),
                     "benchmarks/reference/precision_agreement.py", argv if argv is not None else sys.argv[1:])
    print(markdown(summary, differing))


if __name__ == "__main__":
    main()
