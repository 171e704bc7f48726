"""The routing section: one model, several drop sets, a router per input."""

from __future__ import annotations


import pandas as pd

from ...evaluation.routing import family_name
from ...study import resolution
from ...study.dropsets import UNPRUNED


from .common import Results, _ci, _resolved, _table


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


def routed_loss_source(largest_difference: float) -> str:
    """Where the routed windows' loss comes from: read from the chosen set's static NLL (difference 0, the routing stage
    since it stopped re-running the routed model), or a routed model that really ran, with its largest difference."""
    if largest_difference == 0:
        return ("A routed window's loss is the chosen set's static NLL on that window (tests/test_routing.py checks "
                "that running the routed model gives it, within 1e-4 relative per window).")
    return (f"Routed inference reproduced the chosen set's static NLL on every window (largest difference "
            f"{largest_difference:.2g} nats).")


def router_reads(row) -> str:
    """What a routing summary row's router reads, in words: the mean ``resid_post`` of its block and the share of blocks
    that run before routing, or the mean token embedding when a set drops a module of block 0 (layer -1)."""
    layer, n_layers = int(row["layer"]), int(row["n_layers"])
    if layer < 0:
        return ("the mean token embedding (`resid_pre` of block 0: a set drops a module of block 0, so no block runs "
                "before routing)")
    return (f"the mean `resid_post` of block {layer} (blocks 0..{layer} run before routing: {row['layer_ratio']:.0%} "
            f"of the {n_layers} blocks, reused by the pruned continuation)")


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
            f"Each distribution's own {results.metric} {module}-{k} set and the borda consensus, one copy of the "
            f"weights; a nearest-centroid router on {router_reads(first)}, trained on the calibration windows, picks a "
            f"set per held-out "
            f"window; windows of all distributions mixed. Perplexity ratio to the unpruned model with 95% bootstrap "
            f"CIs; routed / this set paired over the same windows (below 1: routing loses less); *oracle* sends every "
            f"window to its true source's own set.",
            "",
            _table(routing_display(results)),
            "",
            f"{verdict}: routed / borda on the pooled mix "
            f"{_ci(versus['ratio'], versus['ci_low'], versus['ci_high'], 3)} ({_p(versus, results)}; "
            f"{_resolved(beats or loses)}{'' if beats or loses else ': ' + _routing_needs(versus)}). Router accuracy "
            f"{own_accuracy.loc['all', 'accuracy']:.0%} [{own_accuracy.loc['all', 'ci_low']:.0%}, "
            f"{own_accuracy.loc['all', 'ci_high']:.0%}] over {int(own_accuracy.loc['all', 'n_windows'])} windows "
            f"(lowest: {worst_source}, {own_accuracy.loc[worst_source, 'accuracy']:.0%}). "
            f"{routed_loss_source(summary['max_abs_static_difference'].max())}",
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
            f"The same router and held-out mix, routing between each distribution's greedy set by real calibration "
            f"loss and, separately, between each distribution's own set by the ablation (its {k} modules of smallest "
            f"single-drop loss), beside the {results.metric} own sets; each family's router reads the block before "
            f"every module its sets drop. Paired over the same windows (below 1: routing loses less).",
            "",
            _table(families),
            "",
            f"{plain} ({best['drop_set']}, {_ci(best['ppl_ratio'], best['ci_low'], best['ci_high'], 3)} "
            "on the pooled mix).",
            "",
        ]
    return lines + (said + [""] if said else [])
