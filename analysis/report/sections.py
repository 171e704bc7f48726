"""The report of ``calibdrop run``: ``report.md`` and a self-contained ``report.html``.

The report is a list of section functions (:data:`SECTIONS`); each takes the run's
:class:`Results` and returns Markdown lines (none when its tables are absent), and covers every
module kind and every method present in the tables.  Everything is computed from the saved
tables (no timestamps, no timings), so a rerun over the same saved results writes the same report.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

import markdown
import numpy as np
import pandas as pd

from ..evaluation.accuracy import headline_rows
from ..evaluation.routing import family_name
from ..importance.metrics import get_metric
from ..io import atomic_write_bytes
from ..study import resolution
from ..study.lodo import baseline
from ..study.dropsets import UNPRUNED, method_family, parse_label
from ..study.stability import drop_set, importance_matrix, one_metric, tables_of_metric
from .captions import CAPTIONS
from .plots import pair_matrix


@dataclass
class Results:
    """What the report reads: the model record, the settings, the per-sample scores, the tables and the figure files."""

    model: dict
    settings: object
    scores: pd.DataFrame
    tables: dict
    figures: list[Path]

    def table(self, name: str, metric: str | None = None) -> pd.DataFrame:
        """Table ``name`` (empty when absent), restricted to ``metric`` when given and the table has that column."""
        frame = self.tables.get(name)
        if frame is None or not len(frame):
            return pd.DataFrame()
        return tables_of_metric({name: frame}, metric)[name] if metric else frame

    @property
    def metric(self) -> str:
        """The primary metric (``settings.primary_metric``), which the single-metric sections rank by."""
        return self.settings.primary_metric

    @property
    def modules(self) -> list[str]:
        return list(self.settings.budgets)

    def k(self, module: str) -> int:
        return max(self.settings.budgets[module])


def markdown_to_html(text: str) -> str:
    """HTML of the report's Markdown (tables, a table of contents at ``[TOC]``, section anchors), with any raw HTML
    in it (a model spec, a distribution name) escaped as text."""
    converter = markdown.Markdown(extensions=["tables", "toc"], extension_configs={"toc": {"toc_depth": "2-3"}})
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.round(digits).to_markdown(index=False)


def _names(values) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _numeric_order(values) -> list:
    """Candidates in numeric order (``2, 10, attn:3, mlp:3``), never as text (``10`` before ``2``)."""
    def key(value):
        kind, _, index = str(value).rpartition(":")
        return (kind, int(index)) if index.isdigit() else (kind, 10**9)
    return sorted(values, key=key)


def agreement(results: Results, metric: str | None = None) -> pd.DataFrame:
    """Per module kind: mean ρ between distributions with its CI (the mean over pairs within each bootstrap replicate),
    the lowest pair, mean Jaccard@k with its CI, the split-half noise floor (lowest distribution) and the pairs that
    differ beyond resampling noise (:func:`analysis.study.resolution.beyond_noise`)."""
    names = ("bootstrap_pair_mean", "split_half", "bootstrap_pairs")
    means, floor, pairs = (results.table(name, metric or results.metric) for name in names)
    if not (len(means) and len(floor) and len(pairs)):
        return pd.DataFrame()
    rows = []
    for module in results.modules:
        k = results.k(module)
        mean, fl, pair = (t[t["module"] == module] for t in (means, floor, pairs))
        if not len(mean) or not len(pair):
            continue
        marked = resolution.pairs_beyond_noise(pair, fl)
        m = mean.iloc[0]
        rows.append({"module": module, "k": k, "rho": m["spearman"], "rho_low": m["spearman_ci_low"], "rho_high": m["spearman_ci_high"],
                     "rho_min": m["spearman_min"], "floor": fl["reliability"].min(), "jaccard": m[f"jaccard@{k}"],
                     "jaccard_low": m[f"jaccard@{k}_ci_low"], "jaccard_high": m[f"jaccard@{k}_ci_high"],
                     "floor_jaccard": fl[f"split_half_jaccard@{k}"].min(), "beyond": int(marked["beyond_noise"].sum()),
                     "pairs": len(marked)})
    return pd.DataFrame(rows)


def agreement_display(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`agreement` as people read it: values with their CIs in one cell."""
    return pd.DataFrame({
        "module": summary["module"], "k": summary["k"],
        "ρ mean [95% CI]": [_ci(r.rho, r.rho_low, r.rho_high) for r in summary.itertuples()], "ρ lowest pair": summary["rho_min"],
        "noise floor ρ": summary["floor"], "Jaccard@k mean [95% CI]": [_ci(r.jaccard, r.jaccard_low, r.jaccard_high) for r in summary.itertuples()],
        "noise floor Jaccard@k": summary["floor_jaccard"], "pairs beyond noise": [f"{r.beyond} of {r.pairs}" for r in summary.itertuples()],
    })


def ranked_sets(results: Results) -> pd.DataFrame:
    """Every evaluated drop set by worst-case held-out perplexity ratio (best first, per module and budget), with
    its median and mean over distributions (the median is robust where one distribution dominates)."""
    transfer = results.table("transfer")
    if not len(transfer):
        return pd.DataFrame()
    per = transfer[~transfer["distribution"].isin(["worst", "mean"])]
    median = per.groupby("drop_set")["ppl_ratio"].median()
    mean = transfer[transfer["distribution"] == "mean"].set_index("drop_set")["ppl_ratio"]
    worst = resolution.worst_case(transfer).copy()
    worst["family"] = worst["method"].map(method_family)
    worst["worst ratio [95% CI]"] = [_ci(r.ppl_ratio, r.ci_low, r.ci_high) for r in worst.itertuples()]
    worst["median ratio"] = worst["drop_set"].map(median)
    worst["mean ratio"] = worst["drop_set"].map(mean)
    return worst


def _resolved(flag: bool) -> str:
    return "**resolved**" if flag else "**not resolved**"


def claims(results: Results) -> pd.DataFrame:
    """The run's ``claims`` table, or the claims its other tables support (a run saved before the resolution stage)."""
    table = results.table("claims")
    if len(table):
        return table
    s = results.settings
    return resolution.claims_table(results.tables, truth_tokens=s.ablation_samples * s.ablation_seq_len,
                                   heldout_windows=s.transfer_samples, metric=results.metric)


def recommendations(results: Results) -> pd.DataFrame:
    """Per module and budget, the drop set to use when its paired CI on the same held-out windows separates it from
    every other distinct set (:func:`analysis.study.resolution.set_groups`), else the group of sets the best cannot be
    separated from."""
    groups, ranked = results.table("set_groups"), ranked_sets(results)
    if not len(groups) or not len(ranked):
        return pd.DataFrame()
    pruned = results.table("pruned").set_index("drop_set") if len(results.table("pruned")) else None
    shown = ranked.set_index("drop_set")
    rows = []
    for (module, k), part in groups.groupby(["module", "k"], sort=False):
        best, group = part.iloc[0], part[part["in_group"]]
        members = _numeric_order(pruned.loc[best["drop_set"], "indices"]) if pruned is not None else []
        others, runner = group[~group["same_as_best"]], part[~part["same_as_best"]]
        names = resolution.names_text([_set_name(label) for label in group.loc[group["same_as_best"], "drop_set"]])
        if best["resolved"] and len(runner):
            first = runner.iloc[0]
            status = (f"{_resolved(True)}: recommended; paired best / runner-up {_set_name(first['drop_set'])} "
                      f"{_ci(first['ratio_to_best'], first['pair_ci_low'], first['pair_ci_high'], 3)}")
        elif best["resolved"]:
            status = f"{_resolved(True)}: the only set evaluated"
        else:
            needs = resolution.needs_text(others["windows_needed"].max(), resolution.WINDOWS, others["n_windows"].min())
            status = (f"{_resolved(False)}: cannot be separated from "
                      f"{', '.join(_set_name(label) for label in others['drop_set'])}; {needs} would separate them")
        rows.append({"module": module, "k": k, "best": names, "drop": _names(members),
                     "worst ratio [95% CI]": shown.loc[best["drop_set"], "worst ratio [95% CI]"],
                     "median ratio": shown.loc[best["drop_set"], "median ratio"], "resolution": status})
    return pd.DataFrame(rows)


def _set_name(label: str) -> str:
    """``cosine/attn-8:borda`` → ``cosine borda``."""
    parts = parse_label(label)
    return f"{parts['metric']} {parts['method']}"


def section_header(results: Results) -> list[str]:
    m, s = results.model, results.settings
    distributions = list(results.scores["distribution"].unique())
    return [f"# calibdrop report: {m.get('spec')}", "",
            f"Model `{m.get('spec')}` ({m.get('family')}, {m.get('n_layers')} layers, {m.get('dtype')}), weights sha256 "
            f"`{m.get('weights_sha256')}`. Distributions: {_names(distributions)}; proxy metrics on {s.samples} samples × {s.seq_len} "
            f"tokens each, the ablation ground truth on {s.ablation_samples} × {s.ablation_seq_len} (seed {s.seed}); bootstrap "
            f"{s.n_boot} resamples, permutation test {s.n_perm} shuffles. Metrics: {_names(s.metrics)} (see "
            f"analysis/importance/metrics.py); the primary metric, which the single-metric sections rank by: "
            f"**{results.metric}** ({get_metric(results.metric).label}). "
            "Every number in brackets is a 95% bootstrap CI (for ρ and Jaccard the basic, bias-correcting interval; for "
            "held-out ratios the percentile interval over windows). Each headline claim is marked **resolved** or **not "
            "resolved** at this run's budget, with what would resolve it (see *What this run resolves*).", "", "[TOC]", ""]


def _claim_line(claim) -> str:
    """``"**resolved**"`` or ``"**not resolved** at this run's budget; what would resolve it: <needs>"``."""
    if claim.resolved:
        return _resolved(True)
    return f"{_resolved(False)} at this run's budget; what would resolve it: {claim.needs}"


def section_verdict(results: Results) -> list[str]:
    """The answer in a few sentences with CIs, each claim marked resolved or not (:mod:`analysis.study.resolution`):
    does the data move the ranking, which set loses least (a set only when it is separated from the rest), is the
    proxy right, the data or the metric."""
    lines = ["## Verdict", ""]
    table = claims(results)
    by = {(c.claim, c.module, c.subject): c for c in table.itertuples()}
    for row in agreement(results).itertuples():
        claim = by.get(("data changes the ranking", row.module, f"{results.metric}, {row.pairs} pairs of distributions"))
        moved = ("the calibration data changes the ranking" if row.beyond else
                 "no pair of distributions differs beyond resampling noise")
        lines.append(f"- **{row.module}**: {results.metric} rankings agree at ρ {_ci(row.rho, row.rho_low, row.rho_high)} between "
                     f"distributions, against a split-half noise floor of {row.floor:.2f}; {row.beyond} of {row.pairs} "
                     f"pairs differ beyond resampling noise, so {moved}"
                     f"{f' ({_claim_line(claim)})' if claim is not None else ''}; size-{row.k} drop sets share "
                     f"{_ci(row.jaccard, row.jaccard_low, row.jaccard_high)} of their members (Jaccard).")
    for line in recommendations(results).to_dict("records"):
        ratio, status, best = line["worst ratio [95% CI]"], line["resolution"], line["best"]
        lines.append(f"- **{line['module']}-{line['k']} on held-out text**: " + (
            f"use the {best} set, {ratio}× the unpruned perplexity on its worst distribution; {status}."
            if status.startswith(_resolved(True)) else
            f"the {best} set has the lowest worst-case ratio ({ratio}×), but {status}."))
    for claim in table[(table["claim"] == "proxy vs ground truth") & (table["subject"] == results.metric)].itertuples():
        lines.append(f"- **{claim.module}: is {results.metric} the right metric?** {claim.finding} ({_claim_line(claim)}).")
    for claim in table[table["claim"] == "data or metric"].itertuples():
        lines.append(f"- **{claim.module}: data or metric?** {claim.finding}: {claim.subject} "
                     f"{_ci(claim.estimate, claim.ci_low, claim.ci_high)} ({_claim_line(claim)}).")
    return lines + [""]


def _about(claim) -> str:
    """What a claim is about: ``attn-8: cosine/attn-8:borda``, ``attn: cosine`` or the comparison's name."""
    if claim.module is None or pd.isna(claim.module):
        return str(claim.subject)
    return f"{claim.module}{'' if pd.isna(claim.k) else f'-{int(claim.k)}'}: {claim.subject}"


RESOLUTION_RULES = (
    "The rules (analysis/study/resolution.py): a paired comparison is resolved when its 95% paired bootstrap CI on the "
    "same held-out windows excludes 1; a set is *recommended* only when it is separated that way from every other "
    "distinct set of its module kind and budget, else the group it cannot be separated from is named; a claim resting "
    "on the ablation ranking is resolved when the ground truth's split-half reliability reaches {reliable} on every "
    "distribution; two rankings differ *beyond resampling noise* when the upper end of their ρ's 95% CI is below "
    "sqrt(rel_a · rel_b) of their split-half reliabilities. What would resolve an open claim is sized for a two-sided "
    "test at α = {alpha} with power {power} at the observed effect and spread: held-out windows (standard error "
    "shrinking as 1/√n), ground-truth tokens (Spearman-Brown prophecy) or calibration samples.")


def section_resolution(results: Results) -> list[str]:
    """Every headline claim with its resolution at this run's budget and what would resolve it."""
    table = claims(results)
    if not len(table):
        return []
    estimate = [f"{c.estimate:.3f}" if np.isnan(c.ci_low) else _ci(c.estimate, c.ci_low, c.ci_high, 3)
                for c in table.itertuples()]
    shown = pd.DataFrame({"claim": table["claim"], "about": [_about(c) for c in table.itertuples()],
                          "finding": table["finding"], "estimate [95% CI]": estimate,
                          "resolved": np.where(table["resolved"], "**resolved**", "**not resolved**"),
                          "what would resolve it": table["needs"].fillna("")})
    rules = RESOLUTION_RULES.format(reliable=resolution.RELIABLE, alpha=resolution.ALPHA, power=resolution.POWER)
    return ["## What this run resolves", "",
            f"{int(table['resolved'].sum())} of {len(table)} headline claims are resolved at this run's budget. "
            f"{rules}",
            "", _table(shown), ""]


def section_recommendations(results: Results) -> list[str]:
    table = recommendations(results)
    if not len(table):
        return []
    return ["## Recommended drop sets", "",
            "Per module kind and budget, the set with the lowest worst-case held-out perplexity ratio (real loss on "
            "held-out text of every distribution, not proxy regret); random sets excluded. Ratio 1.00 = no loss. It is "
            "*recommended* only when the paired 95% CI on the same held-out windows (best / other, worst case over "
            "distributions) separates it from every other distinct set of its kind and budget; otherwise the sets it "
            "cannot be separated from are named, with the held-out windows per distribution that would separate them "
            "(power 0.8 at the observed difference). Sets with the same members are one set (joined by =). Every set's "
            "paired comparison with the best is in set_groups.parquet.", "", _table(table), ""]


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
             "ρ and Jaccard@k between every pair of distributions' rankings (higher: more alike), beside the split-half noise floor "
             "(two halves of one distribution's samples, Spearman-Brown corrected) and the pairs that differ beyond "
             "resampling noise: the upper end of the pair's 95% CI of ρ is below sqrt(rel_a · rel_b) of the two "
             "distributions' noise floors (the one definition the whole report and `calibdrop summary` use; "
             "analysis/study/resolution.py).", "", _table(agreement_display(summary)), ""]
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
        rows.append({"candidate": candidate, "in the drop set of": _names([d for d in matrix.columns if candidate in own[d]]),
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
            members = sets[(sets["module"] == module) & (sets["k"] == k) & (sets["drop_set"] == row.drop_set)]["indices"]
            rows.append({"module": module, "k": k, "method": row.drop_set, "drop set": _names(_numeric_order(members.iloc[0])) if len(members) else "",
                         "worst-case regret": row.worst, "own sets' worst (best / median)": f"{own.min():.4f} / {own.median():.4f}",
                         "random (expected)": part[part["family"] == "random"]["worst"].max()})
    return [f"## Drop sets by proxy regret ({results.metric})", "", f"Regret: the importance (summed "
            f"{get_metric(results.metric).label}) a set drops on a distribution beyond "
            "the best set of its size there; worst case over distributions, lower is better. This ranks sets by the proxy; "
            "the recommended sets above are ranked by real loss.", "", _table(pd.DataFrame(rows), 4), ""]


def section_leave_one_out(results: Results) -> list[str]:
    loo = results.table("leave_one_out", results.metric)
    if not len(loo):
        return []
    loo = loo.assign(beats=loo["consensus_regret"] < loo["single_mean_regret"])
    summary = loo.groupby(["module", "k", "method"], sort=False).agg(
        consensus=("consensus_regret", "mean"), wins=("beats", "sum"), n=("beats", "size"), own=("single_mean_regret", "mean"),
        random=("random_regret", "mean")).reset_index()
    summary["beats the own sets' mean on"] = [f"{int(w)} of {n}" for w, n in zip(summary.pop("wins"), summary.pop("n"))]
    summary = summary.rename(columns={"consensus": "consensus regret on the left-out (mean)", "own": "own sets' regret (mean)",
                                      "random": "random (expected)"})
    return [f"## Does a consensus generalise to an unseen distribution? ({results.metric})", "", "Leave one distribution "
            "out, build the "
            "consensus from the rest, and measure its regret on the one left out (lower is better), beside the other distributions' "
            "own sets and a random set; averaged over the distributions left out.", "", _table(summary, 4), ""]


def section_greedy(results: Results) -> list[str]:
    greedy = results.table("greedy")
    if not len(greedy):
        return []
    order = greedy.groupby("objective", sort=False)["candidate"].apply(lambda c: ", ".join(map(str, c))).reset_index(name="dropped, in order")
    last = greedy.groupby("objective", sort=False)["objective_increase"].last().reset_index(name="ΔNLL per token after the last step")
    return ["## Greedy drop sets by real calibration loss", "", "Each step drops the module whose removal (given those already "
            "dropped) raises the calibration loss least: for one distribution, or for `robust` the worst distribution's.", "",
            _table(order.merge(last), 4), ""]


def section_heldout(results: Results) -> list[str]:
    ranked = ranked_sets(results)
    if not len(ranked):
        return []
    shown = ranked[["module", "k", "metric", "method", "worst ratio [95% CI]", "median ratio", "mean ratio"]]
    per = results.table("transfer")
    per = per[~per["distribution"].isin(["worst", "mean"])]
    pivot = per.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio", sort=False)
    pivot = pivot.loc[[UNPRUNED, *ranked["drop_set"]]].reset_index()
    return ["## Pruned models on held-out text", "", "Held-out perplexity / unpruned perplexity (lower is better; 1.00 = no loss) "
            "on each distribution's held-out documents. Sets ranked by their worst distribution; the median over distributions "
            "is robust where one distribution's ratio dominates the mean (random sets).", "", _table(shown), "",
            "### Per distribution", "", _table(pivot), ""]


def unseen_ranking(results: Results) -> pd.DataFrame:
    """Every evaluated set's worst-case ratio over the test-only distributions (CI from the same replicates), beside its
    rank on the calibration distributions' held-out text, which chose it; per module and budget, best on unseen first."""
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
    lines = ["## On text no stage saw", "", f"Every evaluated set on the held-out documents of the test-only distributions "
             f"({_names(names)}): text of kinds none of the calibration distributions contains, never read by a stage that "
             "scores, selects or compares. Held-out perplexity / unpruned perplexity, worst over the test-only distributions "
             "with its 95% CI; *calibration rank* is the set's rank by worst-case ratio on the calibration distributions' "
             "held-out text (how it was chosen; random sets unranked).", ""]
    for (module, k), part in table.groupby(["module", "k"], sort=False):
        best = part.iloc[0]
        pick = part[part["calibration rank"] == 1]
        if len(pick):
            pick = pick.iloc[0]
            beaten = part[part["ci_high"] < pick["ci_low"]]
            verdict = (f"The set chosen on calibration text ({pick['metric']} {pick['method']}) ranks {int(pick['unseen rank'])} "
                       f"of {len(part)} here, worst ratio {pick['worst on unseen [95% CI]']}; "
                       + (f"{len(beaten)} set(s) are clearly better (CIs apart), the best {best['metric']} {best['method']} "
                          f"{best['worst on unseen [95% CI]']}." if len(beaten) else "no set is clearly better (CIs overlap)."))
            lines += [f"**{module}, k = {k}.** {verdict}", ""]
        shown = part[["metric", "method", "worst on unseen [95% CI]", *names, "calibration rank", "worst on calibration [95% CI]"]]
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
    best, base_row = table.iloc[0], table[table["procedure"] == base]
    if best["procedure"] == base or not len(base_row):
        mean = _ci(best["mean"], best["mean_low"], best["mean_high"], 3)
        verdict = f"**{best['procedure']}** has the lowest mean ratio, {mean}."
    else:
        resolved = (
            "resolved: the paired CI excludes 1" if best["resolved"] else "not resolved: the paired CI includes 1"
        )
        verdict = (
            f"**{best['procedure']}** generalises best: mean ratio on the left-out distribution "
            f"{_ci(best['mean'], best['mean_low'], best['mean_high'], 3)} against {base}'s "
            f"{base_row['mean'].iloc[0]:.3f}; paired, {best['procedure']} / {base} "
            f"{_ci(best['vs_baseline'], best['vs_baseline_low'], best['vs_baseline_high'], 3)} ({resolved})."
        )
    safest = table.sort_values("worst", kind="stable").iloc[0]
    lines = [
        "## Does the method generalise to a distribution it never saw?",
        "",
        f"Leave one distribution out on real loss: for each calibration distribution d ({_names(names)}) every "
        f"procedure builds its {first['module']}-{int(first['k'])} drop set **without d's calibration data** and the "
        "set is evaluated on d's held-out windows (perplexity / unpruned perplexity, 1.00 = no loss). Procedures: "
        "each metric's borda and minimax consensus over the other distributions; *robust greedy*, the greedy path by "
        "the worst real calibration loss over the others; *nearest greedy*, the real-loss greedy set of the "
        f"calibration distribution whose {results.metric} ranking agrees best with the ranking from a few of d's held-out "
        "windows (one scoring pass, as `calibdrop check` judges nearness; the windows' loss is not read); *best own "
        "set*, the other distributions' own sets judged by their worst ratio on the others' held-out windows; *pick "
        "best*, every set above and every other distribution's own and greedy set, judged the same way. Mean and "
        "worst over the left-out distributions with 95% bootstrap CIs over windows; the paired columns compare the "
        f"same windows (below 1: the procedure loses less; * the CI excludes 1): against the {base} set built "
        "without d, and against the procedure's own set built with d.",
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
            f"beside {int(c['greedy_stage_trials'])} in the greedy stage; of {int(c['pairs_needed'])} "
            f"set-distribution pairs needed, {int(c['pairs_looked_up'])} were read from the held-out stage and "
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
    claimed = pd.DataFrame(resolution.comparison_claims(comparisons))
    worst["resolution"] = [_resolved(c.resolved) + ("" if c.resolved else f": {c.needs}") for c in claimed.itertuples()]
    return ["## Paired comparisons on the same held-out windows", "", "Worst-case perplexity of drop set a over drop set b "
            "(below 1: a loses less; for a comparison on one distribution, that distribution's); paired bootstrap over "
            "windows. Resolved when the CI excludes 1; otherwise the held-out windows per distribution that would "
            "resolve it at the observed difference (power 0.8). Per-distribution rows are in comparisons.parquet.", "",
            _table(worst[["comparison", "ratio a/b [95% CI]", "p", "verdict", "resolution"]]), ""]


def _span(low: float, high: float, fmt: str = "{:,.0f}") -> str:
    """``"low–high"``, or one number when they are equal."""
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def accuracy_screen_lines(tasks: pd.DataFrame, limit: int | None) -> list[str]:
    """One line per task: excluded (not clearly above chance), or the items a ``delta`` difference needs against those evaluated."""
    lines = []
    for row in headline_rows(tasks).itertuples():
        test = f"one-sided binomial p = {row.p_above_chance:.2g} against chance {row.chance:.2f}, α = {row.alpha:g}"
        if not row.included:
            lines.append(f"- **Excluded**: {row.task} ({row.measure}): the unpruned model scores {row.accuracy:.3f} on {row.n_items} items, "
                         f"not clearly above chance ({test}); differences between drop sets on it say nothing.")
        elif np.isnan(row.items_needed_max):
            lines.append(f"- {row.task} ({row.measure}, unpruned {row.accuracy:.3f}, {test}): too few discordant items to size a "
                         f"{100 * row.delta:g}-point test.")
        else:
            evaluated = f"task_limit {limit}" if limit else "every item"
            verdict = "suffices" if row.limit_suffices else ("does not suffice; the whole task does" if row.task_suffices else
                                                              "does not suffice, nor does the whole task")
            lines.append(f"- {row.task} ({row.measure}, unpruned {row.accuracy:.3f}, {test}): to resolve a {100 * row.delta:g}-point "
                         f"difference (McNemar, α = {row.alpha:g}, power {row.power:g}) at the observed discordance "
                         f"({_span(100 * row.discordant_min, 100 * row.discordant_max)}% of items) takes "
                         f"{_span(row.items_needed_min, row.items_needed_max)} items; the run evaluated {row.n_items} ({evaluated}) of the task's "
                         f"{row.n_available}: that {verdict}.")
    return lines


def section_accuracy(results: Results) -> list[str]:
    accuracy = results.table("accuracy")
    if not len(accuracy):
        return []
    chosen = headline_rows(accuracy.rename(columns={"metric": "measure"}))
    pivot = chosen.pivot_table(index="drop_set", columns="task", values="value", sort=False).reset_index()
    limit = results.settings.task_limit
    lines = ["## Zero-shot accuracy", "", f"lm-evaluation-harness, 0-shot, {f'first {limit} examples per task' if limit else 'all examples'} "
             f"(acc_norm where the task defines it, else acc; higher is better); standard error about ±{chosen['stderr'].max():.2f}.", "",
             _table(pivot), ""]
    tasks, paired = results.table("accuracy_tasks"), results.table("accuracy_paired")
    if len(paired):
        shown = headline_rows(paired).copy()
        shown["a − b, points [95% CI]"] = [_ci(100 * r.difference, 100 * r.ci_low, 100 * r.ci_high, 1) for r in shown.itertuples()]
        shown["only a / only b right"] = [f"{r.a_only} / {r.b_only}" for r in shown.itertuples()]
        lines += ["### Paired on the same items", "", "Each pair on the same items of each task where the unpruned model is clearly "
                  "above chance: accuracy difference with a paired bootstrap CI over items, the discordant items and the exact McNemar "
                  "p-value (binomial test on the discordant items) with its Benjamini-Hochberg adjustment over the table (q). Both "
                  "measures are in accuracy_paired.parquet.", "",
                  _table(shown[["comparison", "task", "measure", "n", "a − b, points [95% CI]", "only a / only b right", "p_mcnemar", "q_bh"]]), ""]
    if len(tasks):
        lines += accuracy_screen_lines(tasks, limit) + [""]
    return lines


def _permutation_floor(checked: pd.DataFrame, results: Results) -> pd.Series:
    """The floor ``1 / (n_perm + 1)`` of each check's permutation p-value (from the table, else the settings)."""
    if "p_floor" in checked:
        return checked["p_floor"]
    return pd.Series(1 / (results.settings.n_perm + 1), index=checked.index)


def section_check(results: Results) -> list[str]:
    checked = results.table("check")
    if not len(checked):
        return []
    shown = checked.assign(**{
        "ρ to the set's ranking": checked["spearman"],
        "your noise floor [95% CI]": [_ci(r.noise_floor, r.noise_floor_ci_low, r.noise_floor_ci_high, 3) for r in checked.itertuples()],
        "permutation p": [resolution.p_text(p, f) for p, f in zip(checked["p_permutation"], _permutation_floor(checked, results))],
        "excess": checked["excess"]})
    first = checked.iloc[0]
    lines = ["## Does a drop set hold on new data? (`calibdrop check`)", "",
             f"Each distribution's held-out windows ({first['n_texts']} per distribution), checked as a user's own texts would be by "
             f"`calibdrop check` ({first['metric']}, {first['module']}-{first['k']}): against the distribution's **own set** (from its "
             "calibration windows) and against the **borda consensus built without it**, as for a user whose data no calibration "
             "distribution covers. ρ: Spearman between the set's calibration ranking and the ranking on the held-out windows, beside "
             "those windows' split-half noise floor; drift: permutation p < 0.05; excess: how much more importance the set drops than "
             "the windows' own best set of the same size. The verdict keeps a set that drifts when its excess is at most 10%.", "",
             _table(shown[["distribution", "checked", "ρ to the set's ranking", "your noise floor [95% CI]", "permutation p", "drift", "excess",
                           "verdict"]]), ""]
    for role, part in checked.groupby("checked", sort=False):
        kept = part.loc[part["verdict"] == "keep", "distribution"].tolist()
        others = part.loc[part["verdict"] != "keep", ["distribution", "verdict"]]
        lines.append(f"- **{role}**: kept on {len(kept)} of {len(part)} distributions" + (
            "; " + ", ".join(f"{row.distribution}: {row.verdict}" for row in others.itertuples()) if len(others) else "") + ".")
    lines += ["", "The windows are calibration-shaped (held-out documents, the run's window length) and no document gives "
              "windows to both sides, but windows of one document are not independent, which makes the permutation test's "
              "drift call sensitive; the verdict therefore rests on the excess, not on drift alone.", ""]
    return lines


def _p(pair, results: Results) -> str:
    """A paired comparison's p-value as text, ``p ≤ floor`` at its bootstrap floor."""
    floor = pair["p_floor"] if "p_floor" in pair and pd.notna(pair["p_floor"]) else 1 / results.settings.n_boot
    return resolution.p_text(pair["p_value"], floor)


def _routing_needs(pair) -> str:
    if "se" not in pair:
        return "more held-out windows would resolve it"
    needed = resolution.windows_needed(pair["effect"], pair["se"], pair["n_windows"])
    return resolution.needs_text(needed, "held-out windows in the mix", pair["n_windows"]) + " would resolve it"


def _family(frame: pd.DataFrame) -> pd.Series:
    """The routing family of each row (``""``, the primary metric's own sets, for tables written before families
    existed)."""
    return frame["family"].fillna("") if "family" in frame else pd.Series("", index=frame.index)


def _routed(label: str) -> bool:
    return ":routed" in label or ":oracle" in label


def routing_display(results: Results) -> pd.DataFrame:
    """Per drop set of the routing stage (static sets, and each family's routed and oracle models): perplexity ratio on
    the pooled mix, the mean and the worst distribution (with CIs), and routed by the primary metric's own sets / this
    set on the mix, paired over windows."""
    summary, paired = results.table("routing"), results.table("routing_paired")
    summary = summary[summary["drop_set"].notna()]
    prefix = f"{results.metric}/{summary['module'].iloc[0]}-{int(summary['k'].iloc[0])}:"
    summary = summary[summary["drop_set"] != UNPRUNED]
    wide = {
        where: summary[summary["distribution"] == where].set_index("drop_set") for where in ("mix", "mean", "worst")
    }
    mix_pairs = paired[(paired["distribution"] == "mix") & (_family(paired) == "")].set_index("b")
    rows = []
    for label in wide["mix"].index:
        row = {"drop set": label.removeprefix(prefix)}
        for where, name in (
            ("mix", "pooled mix"),
            ("mean", "mean over distributions"),
            ("worst", "worst distribution"),
        ):
            r = wide[where].loc[label]
            row[name] = _ci(r["ppl_ratio"], r["ci_low"], r["ci_high"], 3)
        if label in mix_pairs.index:
            pair = mix_pairs.loc[label]
            ratio = _ci(pair['ratio'], pair['ci_low'], pair['ci_high'], 3)
            row["routed / this set, pooled mix"] = f"{ratio}, {_p(pair, results)}"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def best_static(summary: pd.DataFrame) -> pd.Series | None:
    """The static set (neither routed, oracle, unpruned nor random) of lowest perplexity ratio on the pooled mix."""
    mix = summary[(summary["distribution"] == "mix") & summary["drop_set"].notna()]
    static = mix[
        ~mix["drop_set"].map(_routed) & (mix["drop_set"] != UNPRUNED) & ~mix["drop_set"].str.contains(":random")
    ]
    return static.sort_values("ppl_ratio", kind="stable").iloc[0] if len(static) else None


def routing_families_display(results: Results) -> pd.DataFrame:
    """Per routing family: the routed and oracle models on the pooled mix, router accuracy, and routed / the best static
    set and routed / the primary metric's borda on the mix, paired over windows (``beats``: the paired CI is below
    1)."""
    summary, paired, accuracy = (
        results.table("routing"),
        results.table("routing_paired"),
        results.table("routing_accuracy"),
    )
    summary = summary[summary["drop_set"].notna()]
    best = best_static(summary)
    mix = summary[summary["distribution"] == "mix"].set_index("drop_set")
    rows = []
    for family in dict.fromkeys(_family(paired)):
        pairs = paired[(_family(paired) == family) & (paired["distribution"] == "mix")].set_index("b")
        routed_label = pairs["a"].iloc[0]
        oracle_label = routed_label.replace(":routed", ":oracle")
        hits = accuracy[(_family(accuracy) == family) & (accuracy["distribution"] == "all")].iloc[0]
        row = {
            "family": family_name(family, results.metric),
            "routed, pooled mix [95% CI]": _ci(*mix.loc[routed_label, ["ppl_ratio", "ci_low", "ci_high"]], 3),
            "oracle, pooled mix [95% CI]": _ci(*mix.loc[oracle_label, ["ppl_ratio", "ci_low", "ci_high"]], 3),
            "router accuracy [95% CI]": f"{hits['accuracy']:.0%} [{hits['ci_low']:.0%}, {hits['ci_high']:.0%}]",
        }
        primary_borda = f"{results.metric} borda"
        for name, label in (("best static", None if best is None else best["drop_set"]), (primary_borda, None)):
            label = label or next(
                (b for b in pairs.index if b.endswith(":borda") and b.startswith(f"{results.metric}/")), None
            )
            if label in pairs.index:
                pair = pairs.loc[label]
                row[f"routed / {name} [95% CI]"] = _ci(pair["ratio"], pair["ci_low"], pair["ci_high"], 3)
                row[f"beats {name}"] = bool(pair["ci_high"] < 1)
        rows.append(row)
    return pd.DataFrame(rows)


def section_routing(results: Results) -> list[str]:
    summary = results.table("routing")
    if not len(summary):
        return []
    module, k = summary["module"].iloc[0], int(summary["k"].iloc[0])
    title = "## One model, several drop sets: a router per input"
    notes = summary[summary["note"].notna()] if "note" in summary else summary.assign(note="").iloc[:0]
    said = [
        f"No router among the {family_name(f, results.metric)} at {module}-{k}: {n}."
        for f, n in zip(_family(notes), notes["note"])
    ]
    if "drop_set" not in summary or summary["drop_set"].isna().all():
        return [title, "", f"No router at {module}-{k}: {summary['note'].iloc[0]}.", ""]
    paired, accuracy = results.table("routing_paired"), results.table("routing_accuracy")
    own_pairs, own_accuracy = paired[_family(paired) == ""], accuracy[_family(accuracy) == ""].set_index(
        "distribution"
    )
    lines = [title, ""]
    if len(own_pairs):
        versus = own_pairs[
            (own_pairs["distribution"] == "mix") & own_pairs["comparison"].str.endswith(" vs borda")
        ].iloc[0]
        beats, loses = versus["ci_high"] < 1, versus["ci_low"] > 1
        verdict = (
            "**Routing beats the consensus set**"
            if beats
            else "**Routing loses to the consensus set**" if loses else "**Routing does not beat the consensus set**"
        )
        first = summary[summary["drop_set"] == versus["a"]].iloc[0]
        worst_source = own_accuracy.drop(index="all")["accuracy"].idxmin()
        lines += [
            f"Each distribution's own {results.metric} {module}-{k} set and the borda consensus, one copy of the weights; a "
            f"nearest-centroid router on the mean `resid_post` of block {int(first['layer'])} (blocks "
            f"0..{int(first['layer'])} run before routing: {first['layer_ratio']:.0%} of the {int(first['n_layers'])} "
            "blocks, reused by the pruned continuation), trained on the calibration windows, picks a set per "
            "held-out window; windows of all distributions mixed. Perplexity ratio to the unpruned model with 95% "
            "bootstrap CIs; routed / this set paired over the same windows (below 1: routing loses less); *oracle* "
            "sends every window to its true source's own set.",
            "",
            _table(routing_display(results)),
            "",
            f"{verdict}: routed / borda on the pooled mix "
            f"{_ci(versus['ratio'], versus['ci_low'], versus['ci_high'], 3)} ({_p(versus, results)}; "
            f"{_resolved(beats or loses)}{'' if beats or loses else ': ' + _routing_needs(versus)}). Router "
            f"accuracy {own_accuracy.loc['all', 'accuracy']:.0%} [{own_accuracy.loc['all', 'ci_low']:.0%}, "
            f"{own_accuracy.loc['all', 'ci_high']:.0%}] over {int(own_accuracy.loc['all', 'n_windows'])} "
            f"windows (lowest: {worst_source}, {own_accuracy.loc[worst_source, 'accuracy']:.0%}). Routed inference "
            "reproduced the chosen set's static NLL on every window (largest difference "
            f"{summary['max_abs_static_difference'].max():.2g} nats).",
            "",
        ]
    families = routing_families_display(results)
    best = best_static(summary)
    if len(families) and best is not None and "routed / best static [95% CI]" in families:
        winners = families[families["beats best static"].fillna(False).astype(bool)]["family"].tolist()
        plain = (
            f"**{' and '.join(winners)} routed beat{'s' if len(winners) == 1 else ''} the best static set**"
            if winners
            else "**No routed model beats the best static set**"
        )
        lines += [
            "### Routing among real-loss sets",
            "",
            "The same router and held-out mix, routing between each distribution's greedy set by real calibration "
            f"loss and, separately, between each distribution's own set by the ablation (its {k} modules of smallest "
            f"single-drop loss), beside the {results.metric} own sets; each family's router reads the block before every module "
            "its sets drop. Paired over the same windows (below 1: routing loses less).",
            "",
            _table(families),
            "",
            f"{plain} ({best['drop_set']}, {_ci(best['ppl_ratio'], best['ci_low'], best['ci_high'], 3)} "
            "on the pooled mix).",
            "",
        ]
    return lines + (said + [""] if said else [])


def section_sample_size(results: Results) -> list[str]:
    summary = results.table("convergence_summary", results.metric)
    if not len(summary) or "n_required_label" not in summary:
        return []
    pivot = summary.pivot_table(index="distribution", columns="module", values="n_required_label", aggfunc="first", sort=False).reset_index()
    target = summary["target_spearman"].iloc[0]
    return [f"## How many samples does a stable ranking need? ({results.metric})", "", f"Samples needed for the ranking to agree at ρ ≥ {target} with the "
            "ranking of an independent half of the samples (\"≤ 4\": the fewest tried already do; \"> n\": none do).", "", _table(pivot), ""]


def section_figures(results: Results) -> list[str]:
    lines = ["## Figures", ""]
    for path in sorted((p for p in results.figures if p.suffix == ".png"), key=figure_order):
        lines += [f"#### {path.stem}", "", f"![{path.stem}](figures/{path.name})", "", CAPTIONS.get(path.stem, ""), ""]
    return lines


FIGURE_ORDER = ("transfer_worst_case", "transfer_matrix", "metric_validity", "proxy_vs_ablation", "ranking_decomposition", "similarity",
                "importance", "profile", "membership", "regret", "convergence")


def figure_order(path: Path) -> tuple[int, str]:
    """Figures in the order of the report's sections (held-out loss first, convergence last), then by name."""
    rank = next((i for i, prefix in enumerate(FIGURE_ORDER) if path.stem.startswith(prefix)), len(FIGURE_ORDER))
    return rank, path.stem


SECTIONS = (section_header, section_verdict, section_recommendations, section_resolution, section_data_or_metric,
            section_agreement, section_membership, section_regret, section_leave_one_out, section_greedy, section_heldout,
            section_unseen, section_lodo, section_comparisons, section_accuracy,
            section_check, section_routing, section_sample_size, section_figures)


def report_markdown(results: Results) -> str:
    """The report's Markdown: every section of :data:`SECTIONS` in order."""
    return "\n".join(line for section in SECTIONS for line in section(results)) + "\n"


def embedded_html(text: str, folder: Path) -> str:
    """The report's HTML with every figure embedded (base64 PNG)."""
    body = markdown_to_html(text)

    def embed(match):
        path = folder / match.group(1)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"' if path.is_file() else match.group(0)

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}.toc{background:#f6f6f6;padding:.5em 1em}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>calibdrop report</title><style>{style}</style></head><body>{body}</body></html>"


def write_report(out: Path, results: Results) -> list[Path]:
    """Write ``report.md`` and ``report.html`` (figures embedded, table of contents) into ``out``."""
    out = Path(out)
    text = report_markdown(results)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, text.encode())
    atomic_write_bytes(html_path, embedded_html(text, out).encode())
    return [md_path, html_path]
