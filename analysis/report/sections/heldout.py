"""The sections on held-out text: the pruned models, text no stage saw, leave one distribution out and the
paired comparisons."""

from __future__ import annotations


import numpy as np
import pandas as pd

from ...evaluation.lodo import BEST
from ...study import resolution
from ...study.lodo import baseline
from ...study.dropsets import UNPRUNED


from .common import Results, _ci, _names, _resolved, _table, ranked_sets


def section_heldout(results: Results) -> list[str]:
    ranked = ranked_sets(results)
    if not len(ranked):
        return []
    shown = ranked[["module", "k", "metric", "method", "worst ratio [95% CI]", "median ratio", "mean ratio"]]
    per = results.table("transfer")
    per = per[~per["distribution"].isin(["worst", "mean"])]
    pivot = per.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio", sort=False)
    pivot = pivot.loc[[UNPRUNED, *ranked["drop_set"]]].reset_index()
    return ["## Pruned models on held-out text", "",
            "Held-out perplexity / unpruned perplexity (lower is better; 1.00 = no loss) on each distribution's "
            "held-out documents. Sets ranked by their worst distribution; the median over distributions is robust "
            "where one distribution's ratio dominates the mean (random sets).", "", _table(shown), "",
            "### Per distribution", "", _table(pivot), ""]


def unseen_ranking(results: Results) -> pd.DataFrame:
    """Every evaluated set's worst-case ratio over the test-only distributions (CI from the same replicates), beside its
    rank on the calibration distributions' held-out text, which chose it; per module and budget, best on unseen
    first."""
    unseen, ranked = results.table("transfer_unseen"), ranked_sets(results)
    if not len(unseen) or not len(ranked):
        return pd.DataFrame()
    worst = unseen[(unseen["distribution"] == "worst") & (unseen["drop_set"] != UNPRUNED)].copy()
    chosen = ranked[ranked["family"] != "random"].copy()
    chosen["calibration rank"] = chosen.groupby(["module", "k"]).cumcount() + 1
    worst = worst.merge(chosen[["drop_set", "calibration rank", "worst ratio [95% CI]"]].rename(
        columns={"worst ratio [95% CI]": "worst on calibration [95% CI]"}), on="drop_set", how="left")
    worst["worst on unseen [95% CI]"] = [_ci(r.ppl_ratio, r.ci_low, r.ci_high) for r in worst.itertuples()]
    per = unseen[~unseen["distribution"].isin(["worst", "mean"])].pivot_table(index="drop_set", columns="distribution",
                                                                             values="ppl_ratio", sort=False)
    worst = worst.join(per, on="drop_set")
    worst = worst.sort_values(["module", "k", "ppl_ratio"])
    worst["unseen rank"] = worst.groupby(["module", "k"]).cumcount() + 1
    return worst


def section_unseen(results: Results) -> list[str]:
    table = unseen_ranking(results)
    if not len(table):
        return []
    names = [c for c in results.table("transfer_unseen")["distribution"].unique() if c not in ("worst", "mean")]
    lines = ["## On text no stage saw", "",
             f"Every evaluated set on the held-out documents of the test-only distributions ({_names(names)}): text of "
             f"kinds none of the calibration distributions contains, never read by a stage that scores, selects or "
             f"compares. Held-out perplexity / unpruned perplexity, worst over the test-only distributions with its "
             f"95% CI; *calibration rank* is the set's rank by worst-case ratio on the calibration distributions' "
             f"held-out text (how it was chosen; random sets unranked).", ""]
    for (module, k), part in table.groupby(["module", "k"], sort=False):
        best = part.iloc[0]
        pick = part[part["calibration rank"] == 1]
        if len(pick):
            pick = pick.iloc[0]
            beaten = part[part["ci_high"] < pick["ci_low"]]
            verdict = (
                f"The set chosen on calibration text ({pick['metric']} {pick['method']}) ranks "
                f"{int(pick['unseen rank'])} "
                       f"of {len(part)} here, worst ratio {pick['worst on unseen [95% CI]']}; "
                       + (
                           f"{len(beaten)} set(s) are clearly better (CIs apart), the best {best['metric']} "
                           f"{best['method']} "
                          f"{best['worst on unseen [95% CI]']}." if len(
                              beaten) else "no set is clearly better (CIs overlap)."))
            lines += [f"**{module}, k = {k}.** {verdict}", ""]
        shown = part[["metric", "method", "worst on unseen [95% CI]", *names, "calibration rank",
                      "worst on calibration [95% CI]"]]
        lines += [_table(shown), ""]
    return lines


def lodo_ranking(results: Results) -> pd.DataFrame:
    """Per procedure, its set built without each left-out distribution d and evaluated on d's held-out windows: the mean
    and worst ratio over the left-out distributions (95% CIs), paired against the primary metric's borda set built
    without d (:func:`analysis.study.lodo.baseline`) and against
    the same procedure built with d (mean over d; ``resolved``: the paired CI excludes 1); best mean first."""
    summary, paired = results.table("lodo"), results.table("lodo_paired")
    if not len(summary):
        return pd.DataFrame()
    without = summary[summary["variant"] == "without"]
    wide = {where: without[without["distribution"] == where].set_index("procedure") for where in ("mean", "worst")}
    mean_pairs = paired[paired["distribution"] == "mean"].set_index("comparison")
    rows = []
    for procedure, mean in wide["mean"].iterrows():
        worst = wide["worst"].loc[procedure]
        row = {
            "procedure": procedure,
            "mean": mean["ppl_ratio"],
            "mean_low": mean["ci_low"],
            "mean_high": mean["ci_high"],
            "worst": worst["ppl_ratio"],
            "worst_low": worst["ci_low"],
            "worst_high": worst["ci_high"],
        }
        for name, comparison in (
            ("vs_baseline", f"{procedure} vs {baseline(results.metric)}"),
            ("vs_with", f"{procedure}: without vs with"),
        ):
            pair = mean_pairs.loc[comparison] if comparison in mean_pairs.index else None
            row.update(
                {
                    name: np.nan if pair is None else pair["ratio"],
                    f"{name}_low": np.nan if pair is None else pair["ci_low"],
                    f"{name}_high": np.nan if pair is None else pair["ci_high"],
                }
            )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("mean", kind="stable").reset_index(drop=True)
    return table.assign(resolved=(table["vs_baseline_high"] < 1) | (table["vs_baseline_low"] > 1))


def lodo_not_separated(results: Results, best: str) -> list[str] | None:
    """The procedures whose paired mean ratio against ``best`` (``lowest mean: <best> vs <p>`` in ``lodo_paired``, over
    the same windows) has a 95% CI that includes 1; ``None`` when the tables hold no such pairs (a run before they
    were written)."""
    paired = results.table("lodo_paired")
    prefix = f"{BEST}: {best} vs "
    rows = paired[paired["comparison"].str.startswith(prefix) & (paired["distribution"] == "mean")]
    if not len(rows):
        return None
    return [row.comparison.removeprefix(prefix) for row in rows.itertuples() if row.ci_low <= 1 <= row.ci_high]


def lodo_best_line(results: Results, table: pd.DataFrame) -> str:
    """Which procedure generalises best: the lowest mean ratio, *resolved* only when its paired CI separates it from
    every other procedure (:func:`lodo_not_separated`); then how it compares with the primary metric's borda set."""
    best, base = table.iloc[0], baseline(results.metric)
    mean = _ci(best["mean"], best["mean_low"], best["mean_high"], 3)
    group = lodo_not_separated(results, best["procedure"])
    if group is None:
        runner = table.iloc[1] if len(table) > 1 else None
        line = (f"**{best['procedure']}** has the lowest mean ratio on the left-out distribution, {mean}; this run's "
                "tables do not pair it with the other procedures, so whether it generalises best is **not resolved**"
                + (f" (runner-up {runner['procedure']}, {runner['mean']:.3f})." if runner is not None else "."))
    elif group:
        line = (f"**{best['procedure']}** has the lowest mean ratio on the left-out distribution, {mean}, but cannot "
                f"be separated from {_names(group)} (paired mean ratio CIs include 1): which generalises best is "
                "**not resolved**.")
    else:
        line = (f"**{best['procedure']}** generalises best (**resolved**: separated from every other procedure by the "
                f"paired CI): mean ratio on the left-out distribution {mean}.")
    base_row = table[table["procedure"] == base]
    if best["procedure"] == base or not len(base_row):
        return line
    against = "resolved: the paired CI excludes 1" if best["resolved"] else "not resolved: the paired CI includes 1"
    return (f"{line} Against {base} ({base_row['mean'].iloc[0]:.3f}): paired, {best['procedure']} / {base} "
            f"{_ci(best['vs_baseline'], best['vs_baseline_low'], best['vs_baseline_high'], 3)} ({against}).")


def _paired_cell(value: float, low: float, high: float) -> str:
    return "" if np.isnan(value) else _ci(value, low, high, 3) + (" *" if high < 1 or low > 1 else "")


def section_lodo(results: Results) -> list[str]:
    table = lodo_ranking(results)
    if not len(table):
        return []
    summary, cost, chosen = results.table("lodo"), results.table("lodo_cost"), results.table("lodo_choices")
    base = baseline(results.metric)
    first = summary[summary["variant"] == "without"].iloc[0]
    names = [d for d in summary["distribution"].unique() if d not in ("worst", "mean")]
    shown = pd.DataFrame(
        {
            "procedure": table["procedure"],
            "mean ratio over left-out [95% CI]": [_ci(r.mean, r.mean_low, r.mean_high, 3) for r in table.itertuples()],
            "worst ratio [95% CI]": [_ci(r.worst, r.worst_low, r.worst_high, 3) for r in table.itertuples()],
            f"/ {base} without d, mean [95% CI]": [
                _paired_cell(r.vs_baseline, r.vs_baseline_low, r.vs_baseline_high) for r in table.itertuples()
            ],
            "without d / with d, mean [95% CI]": [
                _paired_cell(r.vs_with, r.vs_with_low, r.vs_with_high) for r in table.itertuples()
            ],
        }
    )
    per = summary[(summary["variant"] == "without") & summary["distribution"].isin(names)]
    pivot = (
        per.pivot_table(index="procedure", columns="distribution", values="ppl_ratio", sort=False)
        .loc[table["procedure"], names]
        .reset_index()
    )
    verdict = lodo_best_line(results, table)
    safest = table.sort_values("worst", kind="stable").iloc[0]
    lines = [
        "## Does the method generalise to a distribution it never saw?",
        "",
        f"Leave one distribution out on real loss: for each calibration distribution d ({_names(names)}) every "
        f"procedure builds its {first['module']}-{int(first['k'])} drop set **without d's calibration data** and the "
        f"set is evaluated on d's held-out windows (perplexity / unpruned perplexity, 1.00 = no loss). Procedures: "
        f"each metric's borda and minimax consensus over the other distributions; *robust greedy*, the greedy path by "
        f"the worst real calibration loss over the others; *nearest greedy*, the real-loss greedy set of the "
        f"calibration distribution whose {results.metric} ranking agrees best with the ranking from a few of d's "
        f"held-out windows (one scoring pass, as `calibdrop check` judges nearness; the windows' loss is not read); "
        f"*best own set*, the other distributions' own sets judged by their worst ratio on the others' held-out "
        f"windows; *pick best*, every set above and every other distribution's own and greedy set, judged the same "
        f"way. Mean and worst over the left-out distributions with 95% bootstrap CIs over windows; the paired columns "
        f"compare the same windows (below 1: the procedure loses less; * the CI excludes 1): against the {base} set "
        f"built without d, and against the procedure's own set built with d.",
        "",
        f"{verdict} Lowest worst case: **{safest['procedure']}**, "
        f"{_ci(safest['worst'], safest['worst_low'], safest['worst_high'], 3)}.",
        "",
        _table(shown),
        "",
        "### Per left-out distribution",
        "",
        _table(pivot),
        "",
    ]
    picks = chosen[
        (chosen["variant"] == "without") & chosen["procedure"].isin(["nearest greedy", "best own set", "pick best"])
    ]
    if len(picks):
        lines += [
            "What the choosing procedures chose without d: "
            + "; ".join(f"{row.held_out}: {row.procedure} → {row.note}" for row in picks.itertuples())
            + ".",
            "",
        ]
    if len(cost):
        c = cost.iloc[0]
        lines += [
            f"Cost: {int(c['greedy_paths'])} extra greedy paths ran {int(c['greedy_trials_run'])} (candidate, "
            f"distribution) trials ({int(c['greedy_trials_requested'])} asked for; the rest shared between paths), "
            f"beside {int(c['greedy_stage_trials'])} in the greedy stage; of {int(c['pairs_needed'])} set-distribution "
            f"pairs needed, {int(c['pairs_looked_up'])} were read from the held-out stage and "
            f"{int(c['pairs_evaluated'])} evaluated anew (the held-out stage evaluates "
            f"{int(c['heldout_stage_pairs'])}).",
            "",
        ]
    return lines


def section_comparisons(results: Results) -> list[str]:
    comparisons = results.table("comparisons")
    if not len(comparisons):
        return []
    worst = resolution.headline_comparisons(comparisons).copy()
    floor = worst["p_floor"] if "p_floor" in worst else 1 / results.settings.n_boot
    worst["verdict"] = np.where(worst["ci_high"] < 1, "a loses less",
                                np.where(worst["ci_low"] > 1, "b loses less", "not separated"))
    worst["ratio a/b [95% CI]"] = [_ci(r.ratio, r.ci_low, r.ci_high, 3) for r in worst.itertuples()]
    worst["p"] = [resolution.p_text(p, f) for p, f in zip(worst["p_value"], np.broadcast_to(floor, len(worst)))]
    claimed = pd.DataFrame(resolution.comparison_claims(
        comparisons, reliability=resolution.truth_reliability(results.table("split_half")),
        truth_tokens=results.settings.truth_tokens))
    worst["resolution"] = [_resolved(c.resolved) + ("" if c.resolved else f": {c.needs}") for c in claimed.itertuples()]
    return ["## Paired comparisons on the same held-out windows", "",
            "Worst-case perplexity of drop set a over drop set b (below 1: a loses less; for a comparison on one "
            "distribution, that distribution's); paired bootstrap over windows. Resolved when the CI excludes 1; "
            "otherwise the held-out windows per distribution that would resolve it at the observed difference (power "
            "0.8). A comparison naming a set built from the ground truth is resolved only once the ground truth's "
            f"split-half reliability reaches {resolution.RELIABLE} (else that set changes with its windows). "
            "Per-distribution rows are in comparisons.parquet.", "",
            _table(worst[["comparison", "ratio a/b [95% CI]", "p", "verdict", "resolution"]]), ""]
