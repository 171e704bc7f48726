"""The report's opening: the header, the Verdict, the recommended drop sets and what this run resolves."""

from __future__ import annotations


import numpy as np
import pandas as pd

from ...importance.metrics import get_metric
from ...study import resolution


from .common import Results, _ci, _claim_line, _names, _numeric_order, _resolved, _set_name, _table, claims, ranked_sets


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
        rows.append({"module": module, "k": k, "rho": m["spearman"], "rho_low": m["spearman_ci_low"],
                     "rho_high": m["spearman_ci_high"],
                     "rho_min": m["spearman_min"], "floor": fl["reliability"].min(), "jaccard": m[f"jaccard@{k}"],
                     "jaccard_low": m[f"jaccard@{k}_ci_low"], "jaccard_high": m[f"jaccard@{k}_ci_high"],
                     "floor_jaccard": fl[f"split_half_jaccard@{k}"].min(), "beyond": int(marked["beyond_noise"].sum()),
                     "pairs": len(marked)})
    return pd.DataFrame(rows)


def agreement_display(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`agreement` as people read it: values with their CIs in one cell."""
    return pd.DataFrame({
        "module": summary["module"], "k": summary["k"],
        "ρ mean [95% CI]": [_ci(r.rho, r.rho_low, r.rho_high) for r in summary.itertuples()],
        "ρ lowest pair": summary["rho_min"],
        "noise floor ρ": summary["floor"],
        "Jaccard@k mean [95% CI]": [_ci(r.jaccard, r.jaccard_low, r.jaccard_high) for r in summary.itertuples()],
        "noise floor Jaccard@k": summary["floor_jaccard"],
        "pairs beyond noise": [f"{r.beyond} of {r.pairs}" for r in summary.itertuples()],
    })


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
        runner = part[~part["same_as_best"]]
        names = resolution.names_text([_set_name(label) for label in group.loc[group["same_as_best"], "drop_set"]])
        if best["resolved"] and len(runner):
            first = runner.iloc[0]
            status = (f"{_resolved(True)}: recommended; paired best / runner-up {_set_name(first['drop_set'])} "
                      f"{_ci(first['ratio_to_best'], first['pair_ci_low'], first['pair_ci_high'], 3)}")
        elif best["resolved"]:
            status = f"{_resolved(True)}: the only set evaluated"
        else:
            why, needs, _, _ = resolution.recommendation_status(part, results.settings.truth_tokens, _set_name)
            status = f"{_resolved(False)}: {why}; {needs} would resolve it"
        rows.append({"module": module, "k": k, "best": names, "drop": _names(members),
                     "worst ratio [95% CI]": shown.loc[best["drop_set"], "worst ratio [95% CI]"],
                     "median ratio": shown.loc[best["drop_set"], "median ratio"], "resolution": status})
    return pd.DataFrame(rows)


def section_header(results: Results) -> list[str]:
    m, s = results.model, results.settings
    distributions = list(results.scores["distribution"].unique())
    return [f"# calibdrop report: {m.get('spec')}", "",
            f"Model `{m.get('spec')}` ({m.get('family')}, {m.get('n_layers')} layers, {m.get('dtype')}"
            f"{'' if s.matmul_precision == 'highest' else f', matmul precision {s.matmul_precision}'}), weights "
            f"sha256 `{m.get('weights_sha256')}`. Distributions: {_names(distributions)}; proxy metrics on {s.samples} "
            f"samples × {s.seq_len} tokens each, the ablation ground truth on {s.ablation_samples} × "
            f"{s.ablation_seq_len} (seed {s.seed}); bootstrap {s.n_boot} resamples, permutation test {s.n_perm} "
            f"shuffles. Metrics: {_names(s.metrics)} (see analysis/importance/metrics.py); the primary metric, which "
            f"the single-metric sections rank by: **{results.metric}** ({get_metric(results.metric).label}). Every "
            f"number in brackets is a 95% bootstrap CI (for ρ and Jaccard the basic, bias-correcting interval; for "
            f"held-out ratios the percentile interval over windows). Each headline claim is marked **resolved** or "
            f"**not resolved** at this run's budget, with what would resolve it (see *What this run "
            f"resolves*).", "", "[TOC]",
            ""]


def section_verdict(results: Results) -> list[str]:
    """The answer in a few sentences with CIs, each claim marked resolved or not (:mod:`analysis.study.resolution`):
    does the data move the ranking, which set loses least (a set only when it is separated from the rest), is the
    proxy right, the data or the metric."""
    lines = ["## Verdict", ""]
    table = claims(results)
    by = {(c.claim, c.module, c.subject): c for c in table.itertuples()}
    for row in agreement(results).itertuples():
        claim = by.get(("data changes the ranking", row.module,
                        f"{results.metric}, {row.pairs} pairs of distributions"))
        moved = ("the calibration data changes the ranking" if row.beyond else
                 "no pair of distributions differs beyond resampling noise")
        lines.append(
            f"- **{row.module}**: {results.metric} rankings agree at ρ {_ci(row.rho, row.rho_low, row.rho_high)} "
            f"between "
                     f"distributions, against a split-half noise floor of {row.floor:.2f}; {row.beyond} of {row.pairs} "
                     f"pairs differ beyond resampling noise, so "
                     f"{moved}{f' ({_claim_line(claim)})' if claim is not None else ''}; size-{row.k} drop sets share "
                     f"{_ci(row.jaccard, row.jaccard_low, row.jaccard_high)} of their members (Jaccard).")
    for line in recommendations(results).to_dict("records"):
        ratio, status, best = line["worst ratio [95% CI]"], line["resolution"], line["best"]
        lines.append(f"- **{line['module']}-{line['k']} on held-out text**: " + (
            f"use the {best} set, {ratio}× the unpruned perplexity on its worst distribution; {status}."
            if status.startswith(_resolved(True)) else
            f"the {best} set has the lowest worst-case ratio ({ratio}×), but {status}."))
    for claim in table[(table["claim"] == "proxy vs ground truth") & (table["subject"] == results.metric)].itertuples():
        lines.append(
            f"- **{claim.module}: is {results.metric} the right metric?** {claim.finding} ({_claim_line(claim)}).")
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
    "distribution, and so is a comparison naming a set built from the ground truth, or a recommendation among "
    "candidates that include one (such a set changes with the ground truth's windows until then); two rankings "
    "differ *beyond resampling noise* when the upper end of their ρ's 95% CI is below "
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
            "(power 0.8 at the observed difference); nor while candidates built from the ground truth rest on a "
            f"ground truth of split-half reliability below {resolution.RELIABLE}, with the ground-truth tokens that "
            "would raise it. Sets with the same members are one set (joined by =). Every set's "
            "paired comparison with the best is in set_groups.parquet.", "", _table(table), ""]
