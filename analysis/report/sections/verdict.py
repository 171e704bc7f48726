"""The report's opening: the header, the Verdict, the recommended drop sets and what this run resolves."""

from __future__ import annotations


import numpy as np
import pandas as pd

from ...importance.metrics import get_metric
from ...study import recommend, resolution


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


def member_groups(results: Results) -> pd.DataFrame:
    """The run's ``set_groups`` (:func:`analysis.study.recommend.set_groups`).  A table written before member
    recommendations (no ``status``) is read in their terms: ``recommended`` where it was resolved, else ``not
    resolved``; one row per member set (its other names dropped), members in layer order from the ``pruned`` table,
    its two-sided 95% test as one-sided at 0.025, no baselines."""
    groups = results.table("set_groups")
    if not len(groups) or "status" in groups:
        return groups
    pruned = results.table("pruned").set_index("drop_set")["indices"]
    groups = groups[~groups["same_as_best"] | (groups["rank"] == groups.groupby(["module", "k"])["rank"].transform(
        "min"))]
    status = groups.groupby(["module", "k"])["resolved"].transform("first")
    return groups.assign(status=status.map({True: recommend.RECOMMENDED, False: recommend.OPEN}),
                         aliases=[[label] for label in groups["drop_set"]], role="candidate",
                         baselines=[[] for _ in range(len(groups))], equivalent=False, level=resolution.ALPHA / 2,
                         margin=results.settings.equivalence_margin,
                         members=[_numeric_order(map(str, pruned.get(label, []))) for label in groups["drop_set"]])


def _baseline_cell(part: pd.DataFrame, name: str) -> str:
    rows = [row for baseline, _, row in recommend.baseline_rows(part) if baseline == name]
    return recommend.versus_text(rows[0]) if rows else "not evaluated"


def recommendations(results: Results) -> pd.DataFrame:
    """Per module kind and budget, the answer (:mod:`analysis.study.recommend`): recommended, an equivalent group
    (the set suggested) or not resolved; the members to drop, the set's worst-case ratio, and how it compares with
    the baselines (drop the last k, the paper's recipe) and a random set."""
    groups, ranked = member_groups(results), ranked_sets(results)
    if not len(groups) or not len(ranked):
        return pd.DataFrame()
    shown, rows = ranked.set_index("drop_set"), []
    for (module, k), part in groups.groupby(["module", "k"], sort=False):
        best, status = part.iloc[0], part["status"].iloc[0]
        answer = recommend.finding(part, _set_name)
        needs = recommend.needs(part)[1] if status == recommend.OPEN else ""
        rows.append({"module": module, "k": k, "answer": status,
                     "drop": _names(_numeric_order(best["members"])) if len(best["members"]) else "",
                     "set": _set_name(best["drop_set"]),
                     "worst ratio [95% CI]": shown.loc[best["drop_set"], "worst ratio [95% CI]"],
                     "vs drop the last k": _baseline_cell(part, "last k"),
                     "vs paper recipe": _baseline_cell(part, "paper recipe"),
                     "vs random": _baseline_cell(part, "random"), "finding": answer, "what would resolve it": needs})
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
        needs = f"; {line['what would resolve it']}" if line["what would resolve it"] else ""
        lines.append(f"- **{line['module']}-{line['k']} on held-out text: {line['answer']}**. {line['finding']}; "
                     f"{line['worst ratio [95% CI]']}× the unpruned perplexity on its worst distribution{needs}. "
                     f"Against dropping the last {line['k']}: {line['vs drop the last k']}; against the paper's "
                     f"recipe: {line['vs paper recipe']}.")
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
    "The rules (analysis/study/resolution.py and recommend.py): a recommendation of members rests on the held-out loss "
    "of those members: it is *recommended* when separated from every other distinct set of its module kind and budget, "
    "an *equivalent group* when every set not separated from it is shown within the margin of {margin:.0%} (two "
    "one-sided tests), each comparison one-sided at α / K for K candidate sets; a comparison of procedures is resolved "
    "when its 95% paired bootstrap CI on the same held-out windows excludes 1, and, when a side is built from the "
    "ablation ranking, the ground truth's split-half reliability reaches {reliable} on every distribution (such a set "
    "changes with the ground truth's windows until then); a claim resting on the ablation ranking needs the same; two "
    "rankings differ *beyond resampling noise* when the upper end of their ρ's 95% CI is below "
    "sqrt(rel_a · rel_b) of their split-half reliabilities. What would resolve an open claim is sized at α = {alpha} "
    "with power {power} at the observed effect and spread: held-out windows (standard error shrinking as 1/√n), "
    "ground-truth tokens (Spearman-Brown prophecy) or calibration samples.")


def _status_cell(claim) -> str:
    """A claim's answer in bold: its status (a recommendation), else resolved or not."""
    status = getattr(claim, "status", None)
    return f"**{status}**" if isinstance(status, str) and status else _resolved(claim.resolved)


def section_resolution(results: Results) -> list[str]:
    """Every headline claim with its resolution at this run's budget and what would resolve it."""
    table = claims(results)
    if not len(table):
        return []
    estimate = [f"{c.estimate:.3f}" if np.isnan(c.ci_low) else _ci(c.estimate, c.ci_low, c.ci_high, 3)
                for c in table.itertuples()]
    shown = pd.DataFrame({"claim": table["claim"], "about": [_about(c) for c in table.itertuples()],
                          "finding": table["finding"], "estimate [95% CI]": estimate,
                          "resolved": [_status_cell(c) for c in table.itertuples()],
                          "what would resolve it": table["needs"].fillna("")})
    rules = RESOLUTION_RULES.format(reliable=resolution.RELIABLE, alpha=resolution.ALPHA, power=resolution.POWER,
                                    margin=results.settings.equivalence_margin)
    return ["## What this run resolves", "",
            f"{int(table['resolved'].sum())} of {len(table)} headline claims are resolved at this run's budget. "
            f"{rules}",
            "", _table(shown), ""]


def section_recommendations(results: Results) -> list[str]:
    table = recommendations(results)
    if not len(table):
        return []
    margin = results.settings.equivalence_margin
    return ["## Recommended drop sets", "",
            "Per module kind and budget, which members to drop, judged by the held-out loss of those members (real "
            "loss on held-out text of every distribution; ratio 1.00 = no loss), whatever built them. Each row is "
            "exactly one of: **recommended** (separated from every other distinct set), **equivalent group** (every "
            f"set not separated from the best is shown within {margin:.0%} of it by two one-sided tests; the lowest "
            "is suggested, any member serves) or **not resolved** (with the held-out windows that would resolve it). "
            "Each comparison with the best is one-sided at α / K for the K candidate sets (Bonferroni), and over the "
            "R looks of a sequential evaluation at α / (K R), so choosing the best of many sets on the windows that "
            "judge it errs at most 5% of the time (analysis/study/recommend.py, analysis/evaluation/sequential.py). "
            "Beside it: drop the last k (reverse-order removal), the paper's recipe "
            "(the paper's metric on the general-text distribution alone) and a random set, each as *best / it* "
            "[its interval at the same level]. Every set's comparison is in set_groups.parquet.", "",
            _table(table.drop(columns=["finding"]).assign(answer="**" + table["answer"] + "**")), "",
            *section_windows(results)]


def stop_reason(row, ended: str) -> str:
    """Why one set of ``set_groups`` got no more held-out windows, after a sequential evaluation that ``ended``."""
    if row.role == "random":
        return "a random set: compared with the best, never a candidate"
    if row.rank > 1 and row.separated:
        return f"separated from the best on {row.n_windows:.0f} windows"
    if row.rank > 1 and row.equivalent:
        return f"within {row.margin:.0%} of the best on {row.n_windows:.0f} windows"
    return "the answer is decided" if row.resolved else ended


def section_windows(results: Results) -> list[str]:
    """How a sequential evaluation spent the held-out windows: one row per look, then each set's windows and why it
    stopped (nothing for a fixed design)."""
    looks, groups = results.table("heldout_looks"), member_groups(results)
    if len(looks) < 2 or not len(groups) or "set_windows" not in groups:
        return []
    ended = looks["ended"].iloc[-1]
    per_set = pd.DataFrame({"module": groups["module"], "k": groups["k"], "set": groups["drop_set"].map(_set_name),
                            "windows per distribution": groups["set_windows"].astype(int),
                            "why it stopped": [stop_reason(row, ended) for row in groups.itertuples()]})
    return ["### How the held-out windows were spent", "",
            f"Every set got {int(looks['windows'].iloc[0])} windows per calibration distribution; at each look the "
            "sets whose answer was still open got more (analysis/evaluation/sequential.py). The evaluation stopped "
            f"at look {int(looks['look'].iloc[-1])}: {ended}. An answer left open by the budget is decided by a "
            f"larger `heldout_budget` (the looks go up to {results.settings.heldout_looks[-1]} windows, "
            "`heldout_looks`); each set's own windows and why it stopped are below.", "",
            _table(looks.drop(columns=["ended"]).rename(columns={
                "windows": "windows per distribution", "sets": "sets evaluated", "set_windows": "set-windows",
                "spent": "set-windows so far", "open": "answers open"})), "", _table(per_set), ""]
