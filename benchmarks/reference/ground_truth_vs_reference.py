"""Is a lean run's ablation ground truth the reference's?  Reliability and the sets built from it, against a reference.

  python benchmarks/reference/ground_truth_vs_reference.py RUN reference/<model> --out benchmarks/results/NAME

Reads only the tables up to the greedy stage (``split_half``, ``drop_sets``, ``greedy``), so it also takes a run that
stopped before its held-out evaluation.  Per module kind:

* the split-half reliability of the run's ground truth (Spearman-Brown of the split-half ρ, per distribution: min and
  max) and whether it passes the resolution rule's 0.95 on every distribution
  (:data:`analysis.study.resolution.RELIABLE`), beside the reference's;
* per metric, the share of consensus drop sets (every method and budget) whose members equal the reference's, and their
  mean Jaccard overlap: the proxies' sets are the control (their calibration is the same size in both presets only
  when the presets agree on it);
* per greedy path, the members the run's size-k set shares with the reference's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analysis.importance.metrics import GROUND_TRUTH  # noqa: E402
from analysis.io import package_versions, read_table  # noqa: E402
from analysis.study.resolution import RELIABLE as TRUTH_RELIABILITY  # noqa: E402
from benchmarks.reference.results_file import write_comparison  # noqa: E402


def reliability(split_half: pd.DataFrame) -> pd.DataFrame:
    """Per module kind: the ground truth's split-half reliability, min and max over distributions."""
    truth = split_half[split_half["metric"] == GROUND_TRUTH]
    return truth.groupby("module")["reliability"].agg(["min", "max"])


def set_agreement(run: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per metric: consensus sets compared, the share with the reference's members, and the mean Jaccard overlap."""
    keys = ["metric", "module", "k", "drop_set"]
    both = run.merge(reference, on=keys, suffixes=("", "_reference"))
    pairs = list(zip(both["indices"].map(set), both["indices_reference"].map(set)))
    both["same"] = [a == b for a, b in pairs]
    both["jaccard"] = [len(a & b) / len(a | b) for a, b in pairs]
    return both.groupby("metric").agg(sets=("same", "size"), same=("same", "mean"), jaccard=("jaccard", "mean"))


def greedy_agreement(run: pd.DataFrame, reference: pd.DataFrame) -> list[dict]:
    """Per greedy path: its size-k members (k: the path's length), the reference's, and how many they share."""
    def members(table, objective):
        path = table[table["objective"] == objective].sort_values("step")
        return sorted(path["candidate"], key=lambda c: (len(str(c)), str(c)))

    rows = []
    for objective in dict.fromkeys(run["objective"]):
        ours, theirs = members(run, objective), members(reference, objective)
        rows.append({"objective": objective, "run": ours, "reference": theirs,
                     "shared": len(set(ours) & set(theirs)), "k": len(ours)})
    return rows


def compare(run: Path, reference: Path) -> dict:
    table = lambda folder, name: read_table(folder / f"{name}.parquet")  # noqa: E731
    ours, theirs = reliability(table(run, "split_half")), reliability(table(reference, "split_half"))
    truth = table(run, "scores.per_sample")
    truth = truth[truth["metric"] == GROUND_TRUTH]
    return {
        "run": str(run), "reference": str(reference),
        "run_ground_truth": f"{truth['sample'].nunique()} windows, {truth['n_tokens'].max()} predicted tokens at most, "
                            "per distribution",
        "rule_threshold": TRUTH_RELIABILITY,
        "reliability": {module: {"run_min": round(ours.loc[module, "min"], 3),
                                 "run_max": round(ours.loc[module, "max"], 3),
                                 "passes_rule": bool(ours.loc[module, "min"] >= TRUTH_RELIABILITY),
                                 "reference_min": round(theirs.loc[module, "min"], 3)} for module in ours.index},
        "consensus_sets": set_agreement(table(run, "drop_sets"),
                                        table(reference, "drop_sets")).round(3).to_dict("index"),
        "greedy": greedy_agreement(table(run, "greedy"), table(reference, "greedy")),
        "versions": package_versions(),
    }


def markdown(result: dict) -> str:
    lines = [f"# Ground truth of {result['run']} ({result['run_ground_truth']}) against {result['reference']}", "",
             "| module | run reliability (min–max) | passes the rule (≥ {:.2f}) | reference min |".format(
                 result["rule_threshold"]), "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {r['run_min']:.3f}–{r['run_max']:.3f} | {'yes' if r['passes_rule'] else 'no'} | "
              f"{r['reference_min']:.3f} |" for m, r in result["reliability"].items()]
    lines += ["", "| metric | consensus sets | same members as the reference | mean Jaccard |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {r['sets']} | {r['same']:.0%} | {r['jaccard']:.2f} |"
              for m, r in result["consensus_sets"].items()]
    lines += ["", "| greedy path | run | reference | shared |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['objective']} | {', '.join(map(str, g['run']))} | {', '.join(map(str, g['reference']))} | "
              f"{g['shared']} of {g['k']} |" for g in result["greedy"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    result = compare(args.run, args.reference)
    write_comparison(args.out, result, markdown, "benchmarks/reference/ground_truth_vs_reference.py",
                     argv if argv is not None else sys.argv[1:])
    print(markdown(result))


if __name__ == "__main__":
    main()
