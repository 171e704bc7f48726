"""The sections on the rankings themselves: data or metric, agreement against the noise floor, membership,
proxy regret, leave-one-out regret, the greedy paths and the samples a stable ranking needs."""

from __future__ import annotations


import numpy as np
import pandas as pd

from ...importance.metrics import get_metric
from ...study import resolution
from ...study.dropsets import method_family
from ...study.tables import drop_set, importance_matrix, one_metric
from ..plots import pair_matrix


from .common import Results, _ci, _names, _numeric_order, _resolved, _table
from .verdict import agreement, agreement_display


DECOMPOSITION_AXES = {"distribution": "across distributions, one metric held",
                      "metric": "across proxies, one distribution held",
                      "ground truth": "proxy against the ground truth, one distribution held"}


def decomposition_lines(decomposition: pd.DataFrame) -> list[str]:
    """Mean ρ along each axis of the decomposition, raw (corrected), one table per axis."""
    if "mean_corrected" not in decomposition:
        decomposition = decomposition.assign(mean_corrected=np.nan)
    lines = ["## The model, the data or the metric?", "",
             "Mean Spearman ρ between rankings that differ in one thing only, raw and corrected for attenuation "
             "(ρ / sqrt(rel_a · rel_b), each ranking's split-half reliability stepped up by Spearman-Brown). Lower ρ "
             "along an axis: that axis moves the ranking more. The proxies among themselves and each proxy against the "
             "ablation ground truth are shown apart, so the ground truth's own noise is not counted as metric "
             "disagreement. A corrected value above 1 means the split-half reliabilities understate the rankings' "
             "agreement (read it as 1); nan: a reliability at or below 0.", ""]
    for axis, title in DECOMPOSITION_AXES.items():
        part = decomposition[decomposition["axis"] == axis]
        if len(part):
            cells = part.assign(cell=[f"{r.mean_spearman:.2f} ({r.mean_corrected:.2f})" for r in part.itertuples()])
            pivot = cells.pivot_table(index="module", columns="held", values="cell", aggfunc="first", sort=False)
            lines += [f"### Mean ρ {title}: raw (corrected)", "", _table(pivot.reset_index()), ""]
    return lines


def data_or_metric_lines(test: pd.DataFrame) -> list[str]:
    """The bootstrap test of the proxies' agreement across distributions against across metrics."""
    shown = pd.DataFrame({"module": test["module"], "across distributions": test["across_distributions"],
                          "across proxies": test["across_metrics"],
                          "proxies − distributions [95% CI]": [_ci(r.difference, r.ci_low, r.ci_high)
                                                               for r in test.itertuples()],
                          "resolution": [_resolved(r.ci_low > 0 or r.ci_high < 0) for r in test.itertuples()]})
    return ["### Data or metric, tested", "",
            "Mean ρ over every proxy and pair of distributions against mean ρ over every distribution and pair of "
            "proxies, the difference with a basic bootstrap CI (samples resampled, the same draw for every proxy). "
            "Above 0: the data moves the ranking more; resolved when the CI excludes 0.", "", _table(shown), ""]


def validity_lines(validity: pd.DataFrame, split_half: pd.DataFrame) -> list[str]:
    """Each proxy against the ground truth, raw and corrected for attenuation, and the ground truth's reliability."""
    corrected = resolution.corrected_validity(validity, split_half)
    cells = [f"{_ci(r.spearman, r.spearman_ci_low, r.spearman_ci_high)}; corrected {r.corrected:.2f}"
             f"{' (beyond noise)' if r.beyond_noise else ''}" for r in corrected.itertuples()]
    pivot = corrected.assign(cell=cells).pivot_table(index=["module", "metric"], columns="distribution", values="cell",
                                                     aggfunc="first", sort=False)
    reliability = corrected.pivot_table(index="module", columns="distribution", values="reliability_truth",
                                        aggfunc="first", sort=False)
    return ["### Does each proxy rank modules like the real loss?", "",
            "Spearman ρ between each proxy's ranking and the ablation ranking (NLL increase when the module alone is "
            "dropped), per distribution, with its basic bootstrap CI, and corrected for both rankings' split-half "
            "reliability; *beyond noise*: the CI's upper end is below sqrt(rel_proxy · rel_truth), so the proxy ranks "
            "unlike the real loss even allowing for the noise of both.", "", _table(pivot.reset_index()), "",
            "The ground truth's split-half reliability (Spearman-Brown stepped up):", "",
            _table(reliability.reset_index(), 2), ""]


def section_data_or_metric(results: Results) -> list[str]:
    decomposition, validity, test = (results.table(name) for name in ("decomposition", "validity", "data_or_metric"))
    lines = decomposition_lines(decomposition) if len(decomposition) else []
    if len(test):
        lines += data_or_metric_lines(test)
    if len(validity) and len(results.table("split_half")):
        lines += validity_lines(validity, results.table("split_half"))
    return lines


def section_agreement(results: Results) -> list[str]:
    summary = agreement(results)
    if not len(summary):
        return []
    lines = [f"## Agreement between distributions and the noise floor ({results.metric})", "",
             "ρ and Jaccard@k between every pair of distributions' rankings (higher: more alike), beside the "
             "split-half noise floor (two halves of one distribution's samples, Spearman-Brown corrected) and the "
             "pairs that differ beyond resampling noise: the upper end of the pair's 95% CI of ρ is below sqrt(rel_a · "
             "rel_b) of the two distributions' noise floors (the one definition the whole report and `calibdrop "
             "summary` use; analysis/study/resolution.py).", "", _table(agreement_display(summary)), ""]
    pairs, floor = results.table("agreement", results.metric), results.table("split_half", results.metric)
    for module in summary["module"]:
        part, fl = pairs[pairs["module"] == module], floor[floor["module"] == module].set_index("distribution")
        lines += [f"### {module}: ρ between distributions (diagonal: noise floor)", "",
                  _table(pair_matrix(part, "spearman", fl["reliability"]).reset_index(names="distribution")), ""]
    return lines


def unstable_candidates(results: Results, module: str, k: int) -> tuple[list, pd.DataFrame]:
    """Candidates in every distribution's size-k drop set by the primary metric, and those in some but not all of them
    (numeric order)."""
    matrix = importance_matrix(one_metric(results.scores, results.metric)[0], module)
    own = {d: set(drop_set(matrix[d], k)) for d in matrix.columns}
    everywhere = _numeric_order(set.intersection(*own.values()))
    somewhere = _numeric_order(set.union(*own.values()) - set(everywhere))
    boot = results.table("bootstrap_importance", results.metric)
    boot = boot[boot["module"] == module]
    rows = []
    for candidate in somewhere:
        p = boot[boot["candidate"] == str(candidate)].set_index("distribution")[f"p_drop@{k}"]
        rows.append({"candidate": candidate,
                     "in the drop set of": _names([d for d in matrix.columns if candidate in own[d]]),
                     "not of": _names([d for d in matrix.columns if candidate not in own[d]]),
                     "P(in drop set), lowest to highest": f"{p.min():.2f} to {p.max():.2f}"})
    return everywhere, pd.DataFrame(rows)


def section_membership(results: Results) -> list[str]:
    lines = [f"## Which modules are unimportant everywhere, and which depend on the data ({results.metric})", ""]
    n_layers = results.model.get("n_layers") or 1
    for module in results.modules:
        k = results.k(module)
        everywhere, unstable = unstable_candidates(results, module, k)
        depth = _names([f"{c} ({int(str(c).rpartition(':')[2]) / n_layers:.0%})" for c in everywhere])
        lines += [f"### {module}, k = {k}", "", f"In every distribution's drop set (relative depth): **{depth}**.", ""]
        lines += ([_table(unstable), ""] if len(unstable) else ["Every distribution picks the same set.", ""])
    return lines


def section_regret(results: Results) -> list[str]:
    regret, sets = results.table("regret", results.metric), results.table("drop_sets", results.metric)
    if not len(regret):
        return []
    worst = regret.groupby(["module", "k", "drop_set"], sort=False)["regret"].max().rename("worst").reset_index()
    worst["family"] = worst["drop_set"].map(method_family)
    rows = []
    for (module, k), part in worst.groupby(["module", "k"], sort=False):
        own = part[part["family"] == "own"]["worst"]
        for row in part[~part["family"].isin(["own", "random"])].sort_values("worst").itertuples():
            members = sets[
                (sets["module"] == module) & (sets["k"] == k) & (sets["drop_set"] == row.drop_set)]["indices"]
            rows.append({"module": module, "k": k, "method": row.drop_set,
                         "drop set": _names(_numeric_order(members.iloc[0])) if len(members) else "",
                         "worst-case regret": row.worst,
                         "own sets' worst (best / median)": f"{own.min():.4f} / {own.median():.4f}",
                         "random (expected)": part[part["family"] == "random"]["worst"].max()})
    return [f"## Drop sets by proxy regret ({results.metric})", "", f"Regret: the importance (summed "
            f"{get_metric(results.metric).label}) a set drops on a distribution beyond the best set of its size there; "
            f"worst case over distributions, lower is better. This ranks sets by the proxy; the recommended sets above "
            f"are ranked by real loss.", "", _table(pd.DataFrame(rows), 4), ""]


def section_leave_one_out(results: Results) -> list[str]:
    loo = results.table("leave_one_out", results.metric)
    if not len(loo):
        return []
    loo = loo.assign(beats=loo["consensus_regret"] < loo["single_mean_regret"])
    summary = loo.groupby(["module", "k", "method"], sort=False).agg(
        consensus=("consensus_regret", "mean"), wins=("beats", "sum"), n=("beats", "size"),
        own=("single_mean_regret", "mean"),
        random=("random_regret", "mean")).reset_index()
    summary["beats the own sets' mean on"] = [f"{int(w)} of {n}" for w, n in zip(summary.pop("wins"), summary.pop("n"))]
    summary = summary.rename(columns={"consensus": "consensus regret on the left-out (mean)",
                                      "own": "own sets' regret (mean)",
                                      "random": "random (expected)"})
    return [f"## Does a consensus generalise to an unseen distribution? ({results.metric})", "",
            "Leave one distribution out, build the consensus from the rest, and measure its regret on the one left out "
            "(lower is better), beside the other distributions' own sets and a random set; averaged over the "
            "distributions left out.", "", _table(summary, 4), ""]


def section_greedy(results: Results) -> list[str]:
    greedy = results.table("greedy")
    if not len(greedy):
        return []
    order = greedy.groupby("objective",
                           sort=False)[
                               "candidate"].apply(
                                   lambda c: ", ".join(map(str, c))).reset_index(name="dropped, in order")
    last = greedy.groupby("objective",
                          sort=False)[
                              "objective_increase"].last().reset_index(name="ΔNLL per token after the last step")
    return ["## Greedy drop sets by real calibration loss", "",
            "Each step drops the module whose removal (given those already dropped) raises the calibration loss least: "
            "for one distribution, or for `robust` the worst distribution's.", "",
            _table(order.merge(last), 4), ""]


def section_sample_size(results: Results) -> list[str]:
    summary = results.table("convergence_summary", results.metric)
    if not len(summary) or "n_required_label" not in summary:
        return []
    pivot = summary.pivot_table(index="distribution", columns="module", values="n_required_label", aggfunc="first",
                                sort=False).reset_index()
    target = summary["target_spearman"].iloc[0]
    return [f"## How many samples does a stable ranking need? ({results.metric})", "",
            f"Samples needed for the ranking to agree at ρ ≥ {target} with the ranking of an independent half of the "
            f"samples (\"≤ 4\": the fewest tried already do; \"> n\": none do).",
            "", _table(pivot), ""]
