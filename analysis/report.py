"""The report of ``calibdrop run``: ``report.md`` and a self-contained ``report.html``.

Everything in it is computed from the saved tables (no timestamps, no timings), so a rerun
over the same saved results writes the same report.
"""

from __future__ import annotations

import base64
from pathlib import Path

import markdown
import pandas as pd

from .io import atomic_write_bytes
from .plots import pair_matrix
from .stability import drop_set, importance_matrix, one_metric, tables_of_metric


def markdown_to_html(text: str) -> str:
    """HTML of the report's Markdown, with any raw HTML in it (a model spec, a distribution name) escaped as text."""
    converter = markdown.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.round(digits).to_markdown(index=False)


def _names(values) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def headline(tables: dict, module: str, k: int) -> list[str]:
    """The answer in a few sentences, from the agreement, noise-floor, permutation and LOO tables."""
    agreement = tables["agreement"][tables["agreement"]["module"] == module]
    floor = tables["split_half"][tables["split_half"]["module"] == module]
    permutation = tables["permutation"][tables["permutation"]["module"] == module]
    beyond = int((permutation["p_spearman"] < 0.05).sum())
    lines = [
        f"- **Ranking agreement ({module})**: Spearman ρ between distributions averages {agreement['spearman'].mean():.3f} "
        f"(range {agreement['spearman'].min():.3f} to {agreement['spearman'].max():.3f}); the drop sets of size {k} overlap by "
        f"Jaccard {agreement[f'jaccard@{k}'].mean():.2f} on average (range {agreement[f'jaccard@{k}'].min():.2f} to {agreement[f'jaccard@{k}'].max():.2f}).",
        f"- **Noise floor**: within one distribution, two independent halves of the samples agree with Spearman-Brown corrected ρ ≥ "
        f"{floor['reliability'].min():.3f}; {beyond} of {len(permutation)} pairs of distributions disagree beyond resampling noise "
        f"(permutation p < 0.05).",
    ]
    loo = tables["leave_one_out"]
    for kind, part_kind in loo.groupby("module", sort=False):
        results = []
        for method in ("borda", "minimax"):
            part = part_kind[part_kind["method"] == method]
            wins = int((part["consensus_regret"] < part["single_mean_regret"]).sum())
            results.append(f"{method} {wins} of {len(part)} (mean regret {part['consensus_regret'].mean():.4f})")
        lines.append(
            f"- **Consensus on an unseen distribution ({kind}, k = {part_kind['k'].iloc[0]})**: built without the held-out "
            f"distribution, its regret there was below the mean regret of the other distributions' own sets in: "
            f"{'; '.join(results)}; the own sets' mean regret {part_kind['single_mean_regret'].mean():.4f}, a random set's "
            f"{part_kind['random_regret'].mean():.4f}."
        )
    return lines


def stable_and_unstable(scores: pd.DataFrame, tables: dict, module: str, k: int) -> tuple[list[str], pd.DataFrame]:
    """Candidates in every distribution's size-k drop set, and those in some but not all of them."""
    matrix = importance_matrix(scores, module)
    own = {d: set(drop_set(matrix[d], k)) for d in matrix.columns}
    everywhere = sorted(set.intersection(*own.values()), key=str)
    somewhere = sorted(set.union(*own.values()) - set(everywhere), key=str)
    boot = tables["bootstrap_importance"]
    boot = boot[boot["module"] == module]
    rows = []
    for candidate in somewhere:
        probabilities = boot[boot["candidate"] == str(candidate)].set_index("distribution")[f"p_drop@{k}"]
        rows.append({"candidate": candidate, "in the drop set of": _names([d for d in matrix.columns if candidate in own[d]]),
                     "not of": _names([d for d in matrix.columns if candidate not in own[d]]),
                     "P(drop) range over distributions": f"{probabilities.min():.2f} to {probabilities.max():.2f}"})
    return everywhere, pd.DataFrame(rows)


def recommended(tables: dict, sets: pd.DataFrame) -> pd.DataFrame:
    """Per module and budget: minimax and borda sets with their worst-case regret, beside the single sets'."""
    regret = tables["regret"]
    worst = regret.groupby(["module", "k", "drop_set"], sort=False)["regret"].max()
    rows = []
    for (module, k), group in sets.groupby(["module", "k"], sort=False):
        singles = worst.loc[module, k][[n for n in worst.loc[module, k].index if n.startswith("own:")]]
        for method in ("minimax", "borda"):
            chosen = group[group["drop_set"] == method]["indices"].iloc[0]
            rows.append({"module": module, "k": k, "method": method, "drop set": _names(list(chosen)),
                         "worst-case regret": worst.loc[module, k, method], "best single set's worst regret": singles.min(),
                         "mean single set's worst regret": singles.mean(), "random (expected) worst regret": worst.loc[module, k, "random"]})
    return pd.DataFrame(rows)


def figure_list(figures: list[Path]) -> list[Path]:
    return sorted(p for p in figures if p.suffix == ".png")


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def metric_answer(tables: dict) -> list[str]:
    """How much of the ranking is the data and how much the metric, and how well each proxy tracks the ground truth."""
    lines = []
    decomposition = tables.get("decomposition")
    if decomposition is not None and len(decomposition):
        for module, part in decomposition.groupby("module", sort=False):
            across_data = part[(part["axis"] == "distribution") & (part["held"] == "cosine")]["mean_spearman"]
            across_metrics = part[part["axis"] == "metric"]["mean_spearman"]
            if len(across_data) and len(across_metrics):
                lines.append(f"- **{module}: data vs metric.** Cosine rankings of different distributions agree at mean ρ {across_data.iloc[0]:.2f}; "
                             f"rankings of different metrics (ground truth included) on one distribution agree at mean ρ {across_metrics.mean():.2f} "
                             f"(range over distributions {across_metrics.min():.2f} to {across_metrics.max():.2f}): the "
                             f"{'metric' if across_metrics.mean() < across_data.iloc[0] else 'calibration data'} moves the ranking more.")
    validity = tables.get("validity")
    if validity is not None and len(validity):
        for module, part in validity.groupby("module", sort=False):
            best = part.groupby("metric")["spearman"].mean().sort_values(ascending=False)
            cosine = part[part["metric"] == "cosine"]
            lines.append(f"- **{module}: does the proxy rank like the real loss?** ρ(cosine, ablation) per distribution "
                         f"{cosine['spearman'].min():.2f} to {cosine['spearman'].max():.2f} (95% CIs from {cosine['spearman_ci_low'].min():.2f} "
                         f"to {cosine['spearman_ci_high'].max():.2f}); best proxy on average: {best.index[0]} (mean ρ {best.iloc[0]:.2f}).")
    return lines


def best_sets(transfer: pd.DataFrame) -> pd.DataFrame:
    """Per budget: every drop set by its worst-case held-out perplexity ratio (CI), best first."""
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != "none")].copy()
    mean = transfer[transfer["distribution"] == "mean"].set_index("drop_set")["ppl_ratio"]
    worst["mean ratio"] = worst["drop_set"].map(mean)
    worst["worst ratio [95% CI]"] = [_ci(r.ppl_ratio, r.ci_low, r.ci_high) for r in worst.itertuples()]
    worst = worst.sort_values(["module", "k", "ppl_ratio"])
    return worst[["module", "k", "metric", "method", "worst ratio [95% CI]", "mean ratio", "ppl_ratio"]]


def transfer_answer(tables: dict) -> list[str]:
    """The lowest worst-case held-out perplexity per budget, and what the proxy loses against the ground truth."""
    transfer = tables.get("transfer")
    if transfer is None or not len(transfer):
        return []
    lines = []
    ranked = best_sets(transfer)
    for (module, k), part in ranked.groupby(["module", "k"], sort=False):
        top = part.iloc[0]
        cosine_borda = part[(part["metric"] == "cosine") & (part["method"] == "borda")]
        lines.append(f"- **{module}-{k}: lowest worst-case held-out perplexity**: {top['metric']} {top['method']}, "
                     f"{top['worst ratio [95% CI]']}× the unpruned model on its worst distribution"
                     + (f" (cosine Borda consensus: {cosine_borda['worst ratio [95% CI]'].iloc[0]}×)." if len(cosine_borda) else "."))
    comparisons = tables.get("comparisons")
    if comparisons is not None and len(comparisons):
        worst = comparisons[comparisons["distribution"] == "worst"]
        own = worst[worst["comparison"].str.contains("own cosine set")]
        for prefix, part in own.groupby(own["comparison"].str.split(":").str[0], sort=False):
            lower, higher = int((part["ci_high"] < 1).sum()), int((part["ci_low"] > 1).sum())
            lines.append(f"- **{prefix}: cosine Borda consensus against each distribution's own cosine set**, worst distribution: lower in "
                         f"{lower} of {len(part)}, higher in {higher}, not distinguishable in {len(part) - lower - higher} "
                         f"(ratios {part['ratio'].min():.2f} to {part['ratio'].max():.2f}; paired bootstrap over windows).")
        for row in worst[~worst.index.isin(own.index)].itertuples():
            verdict = "lower" if row.ci_high < 1 else ("higher" if row.ci_low > 1 else "not distinguishable")
            lines.append(f"- {row.comparison}: worst-case perplexity ratio {_ci(row.ratio, row.ci_low, row.ci_high, 3)} (p = {row.p_value:.3f}; "
                         f"{verdict}).")
    return lines


def metric_sections(tables: dict) -> list[str]:
    """Metric validity, the data/metric decomposition, the greedy paths, held-out transfer with CIs and the paired comparisons."""
    lines = []
    validity = tables.get("validity")
    if validity is not None and len(validity):
        shown = validity.assign(**{"ρ [95% CI]": [_ci(r.spearman, r.spearman_ci_low, r.spearman_ci_high) for r in validity.itertuples()],
                                   "τ-b [95% CI]": [_ci(r.kendall, r.kendall_ci_low, r.kendall_ci_high) for r in validity.itertuples()]})
        lines += ["## Does each proxy rank modules like the real loss?", "",
                  "Spearman ρ and Kendall τ-b between each proxy metric's ranking and the ablation ranking (increase in next-token NLL "
                  "when the module alone is dropped), per distribution; bootstrap 95% CIs resample both tables' samples.", "",
                  _table(shown.pivot_table(index=["module", "metric"], columns="distribution", values="ρ [95% CI]", aggfunc="first", sort=False).reset_index()),
                  ""]
    decomposition = tables.get("decomposition")
    if decomposition is not None and len(decomposition):
        lines += ["## The model, the data or the metric?", "",
                  "Mean (and lowest) Spearman ρ between rankings that differ only in the calibration distribution (one metric held) or "
                  "only in the metric (one distribution held; ablation included). Lower ρ along an axis: that axis moves the ranking more.", "",
                  _table(decomposition), ""]
    greedy = tables.get("greedy")
    if greedy is not None and len(greedy):
        order = greedy.groupby("objective", sort=False)["candidate"].apply(lambda c: ", ".join(c)).reset_index(name="dropped, in order")
        last = greedy.groupby("objective", sort=False)["objective_increase"].last().reset_index(name="ΔNLL after the last step")
        lines += ["## Greedy drop sets by real calibration loss", "",
                  "Each step drops the module whose removal (given those already dropped) raises the calibration loss least: for one "
                  "distribution, or for `robust` the worst distribution's.", "", _table(order.merge(last), 4), ""]
    transfer = tables.get("transfer")
    if transfer is not None and len(transfer):
        ranked = best_sets(transfer).drop(columns="ppl_ratio")
        lines += ["## Pruned models on held-out text", "",
                  "Every drop set ranked by its worst-case held-out perplexity ratio over distributions (bootstrap 95% CI over windows; "
                  "1.00 = no loss), with the mean over distributions.", "", _table(ranked), ""]
        per = transfer[~transfer["distribution"].isin(["worst", "mean"])]
        lines += ["Per distribution (perplexity ratio):", "",
                  _table(per.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio", sort=False).reset_index()), ""]
    comparisons = tables.get("comparisons")
    if comparisons is not None and len(comparisons):
        shown = comparisons.assign(**{"ratio a/b [95% CI]": [_ci(r.ratio, r.ci_low, r.ci_high, 3) for r in comparisons.itertuples()]})
        lines += ["## Paired comparisons on the same held-out windows", "",
                  "Perplexity of drop set a over drop set b (below 1: a loses less), per distribution and for the worst and mean over "
                  "distributions; paired bootstrap over windows.", "",
                  _table(shown[["comparison", "a", "b", "distribution", "ratio a/b [95% CI]", "p_value"]]), ""]
    return lines


def write_report(out: Path, model_record: dict, settings, scores: pd.DataFrame, tables: dict, sets: pd.DataFrame, figures: list[Path]) -> list[Path]:
    """Write ``report.md`` and ``report.html`` (figures embedded) into ``out``.

    The stability sections describe the paper's metric (cosine); the metric sections compare
    every metric with the ablation ground truth.
    """
    out = Path(out)
    all_tables = tables
    scores = one_metric(scores, "cosine")[0]
    tables = tables_of_metric(tables, "cosine")
    sets = tables_of_metric({"drop_sets": sets}, "cosine")["drop_sets"]
    module, k = "attn", max(settings.budgets.get("attn", (8,)))
    everywhere, unstable = stable_and_unstable(scores, tables, module, k)
    floor = tables["split_half"][tables["split_half"]["module"] == module].set_index("distribution")
    agreement = tables["agreement"][tables["agreement"]["module"] == module]
    permutation = tables["permutation"][tables["permutation"]["module"] == module]
    convergence = tables["convergence_summary"]
    lines = [
        f"# calibdrop report: {model_record.get('spec')}",
        "",
        f"Model `{model_record.get('spec')}` ({model_record.get('family')}, {model_record.get('n_layers')} layers, {model_record.get('dtype')}), "
        f"weights sha256 `{model_record.get('weights_sha256')}`. Distributions: {_names(settings.distributions)}; "
        f"proxy metrics on {settings.samples} samples × {settings.seq_len} tokens each, the ablation ground truth on "
        f"{settings.ablation_samples} × {settings.ablation_seq_len} (seed {settings.seed}); bootstrap {settings.n_boot} resamples, "
        f"permutation test {settings.n_perm} shuffles. Metrics: {_names(settings.metrics)} (`calibdrop` docs: analysis/metrics.py).",
        "",
        "## The answer",
        "",
        *metric_answer(all_tables),
        *transfer_answer(all_tables),
        *headline(tables, module, k),
        "",
        f"## Modules unimportant on every distribution ({module}, k = {k}, cosine)",
        "",
        f"In the size-{k} drop set of every distribution: **{_names(everywhere)}**. These are safe to drop whatever the calibration data.",
        "",
        "## Modules whose importance depends on the distribution",
        "",
        "In some distributions' drop sets but not all (bootstrap probability of being in the drop set, lowest to highest over distributions):",
        "",
        _table(unstable) if len(unstable) else "None: every distribution picks the same set.",
        "",
        *metric_sections(all_tables),
        "## Agreement between distributions and the noise floor (cosine)",
        "",
        f"Spearman ρ of {module} importance between distributions; the diagonal is the split-half noise floor (Spearman-Brown corrected).",
        "",
        _table(pair_matrix(agreement, "spearman", floor["reliability"]).reset_index(names="distribution")),
        "",
        f"Jaccard@{k} of drop sets; the diagonal is the Jaccard@{k} of two random halves of one distribution's samples.",
        "",
        _table(pair_matrix(agreement, f"jaccard@{k}", floor[f"split_half_jaccard@{k}"]).reset_index(names="distribution")),
        "",
        "Pairs whose disagreement is beyond resampling noise (permutation test on sample labels):",
        "",
        _table(permutation[["a", "b", "spearman", "p_spearman", f"p_jaccard@{k}"]]),
        "",
        "## Drop sets by proxy regret (cosine)",
        "",
        "Worst-case regret is the most importance (summed 1 − cos) a set drops beyond the best set of its size, over all distributions. "
        "This ranks sets by the proxy; the held-out section above ranks them by real loss.",
        "",
        _table(recommended(tables, sets), 4),
        "",
        "## Does consensus generalise to an unseen distribution? (cosine)",
        "",
        "Leave one distribution out, build the consensus from the rest, and measure its regret on the one left out, beside the other "
        "distributions' own sets (mean, best, worst) and a random set (expected).",
        "",
        _table(tables["leave_one_out"].drop(columns=["drop_set"]), 4),
        "",
    ]
    accuracy = tables.get("accuracy")
    if accuracy is not None and len(accuracy):
        chosen = accuracy[(accuracy["metric"] == "acc_norm") | ~accuracy["task"].isin(accuracy.loc[accuracy["metric"] == "acc_norm", "task"])]
        pivot = chosen.pivot_table(index="drop_set", columns="task", values="value", sort=False).reset_index()
        limit = f"first {settings.task_limit} examples per task" if settings.task_limit else "all examples"
        lines += ["## Zero-shot accuracy", "", f"lm-evaluation-harness, 0-shot, {limit} (acc_norm where the task defines it, else acc); "
                  f"standard error about ±{chosen['stderr'].max():.2f}.", "", _table(pivot), ""]
    lines += [
        "## How many samples does a stable ranking need?",
        "",
        _table(convergence[["distribution", "module", "n_available", "target_spearman", "n_required"]]),
        "",
        "## Figures",
        "",
    ]
    pngs = figure_list(figures)
    lines += [f"![{p.stem}](figures/{p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, text.encode())
    html_body = markdown_to_html(text)
    for p in pngs:
        html_body = html_body.replace(f'src="figures/{p.name}"', f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"')
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    atomic_write_bytes(html_path, f"<!doctype html><html><head><meta charset='utf-8'><title>calibdrop report</title><style>{style}</style></head><body>{html_body}</body></html>".encode())
    return [md_path, html_path]
