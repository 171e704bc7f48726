"""What each figure shows and what to look at: one caption per figure file stem (:data:`CAPTIONS`).

Per-metric figures (``figures/<metric>/``) share the stems, so ``CAPTIONS.get(stem)`` serves them too.
"""

from __future__ import annotations

MODULE_NAMES = {"attn": "attention", "mlp": "MLP", "block": "block", "joint": "attention + MLP"}


def _module_captions(module: str) -> dict[str, str]:
    """Captions of the per-module figures of :func:`stability_figures` for one module kind."""
    name = MODULE_NAMES[module]
    captions = {
        f"similarity_{module}_spearman": (
            f"Spearman ρ between the {name} importance rankings of every pair of calibration distributions; the "
            f"outlined diagonal is each distribution's split-half noise floor (the red line on the colour bar marks "
            f"the lowest). Look for off-diagonal cells well below the floor: there the data, not sampling noise, "
            f"changes the ranking (* = beyond resampling noise: the pair's CI upper end below sqrt(floor_a · "
            f"floor_b)). The colour scale spans the observed values only."),
        f"profile_{module}": (
            f"{name[0].upper()}{name[1:]} importance of every layer under each distribution (log scale, symlog when a "
            f"metric can be negative; bands = 95% bootstrap CI). Look where the lines separate by more than their "
            f"bands, especially among the low-importance layers that decide the drop set."),
        f"importance_{module}": (
            f"Left: {name} importance per layer and distribution on a log colour scale (linear when a metric has "
            f"values ≤ 0). Right: the same values relative to each layer's geometric mean over distributions (log2 "
            f"ratio; red = this distribution finds the layer more important than the others do). Look at the right "
            f"panel for the layers whose importance depends on the data."),
        f"membership_{module}": (
            f"Probability over bootstrap resamples that each {name} candidate is in the distribution's drop set. "
            "Dark rows across all columns are dropped whatever the data; rows dark in some columns only are "
            "where the calibration data decides; pale cells (0.2–0.8) are uncertain even within one distribution."),
        f"convergence_{module}": (
            f"Spearman ρ between the {name} ranking from n calibration samples of one random half and the ranking from "
            "the other half (mean ± std over repeats; the halves share no sample, so the curve levels off at the "
            "split-half agreement, not at 1). Look where each line crosses the dashed target."),
        f"regret_{module}": (
            f"Leave-one-distribution-out: for each held-out distribution, the importance a {name} drop set built "
            f"without it removes beyond that distribution's own best set (symlog axis). Compare the consensus methods "
            f"with 'single (mean)' (a typical other distribution's set) and the random expectation; lower is better."),
    }
    for k in range(1, 129):
        captions[f"similarity_{module}_jaccard{k}"] = (
            f"Jaccard overlap of the size-{k} {name} drop sets chosen on each pair of distributions (1 = same set); "
            f"the outlined diagonal is the overlap of two random halves of one distribution (the noise floor, lowest "
            f"marked red on the colour bar). Look for pairs well below the floor: their drop sets differ because of "
            f"the data.")
    return captions


CAPTIONS: dict[str, str] = {
    **{stem: text for module in MODULE_NAMES for stem, text in _module_captions(module).items()},
    "transfer_matrix": (
        "Held-out perplexity of each pruned model relative to the unpruned one, per distribution and the worst over "
        "them (rows sorted by the worst column; log colour scale fitted to the non-random sets; random sets below the "
        "line are off the scale, their values printed). Look at the top rows (best worst case) and at columns where a "
        "set built on one distribution does badly on another."),
    "transfer_worst_case": (
        "Worst held-out perplexity ratio over distributions of every drop set with its 95% bootstrap CI, colour = the "
        "ranking it came from. Lower is better; sets whose intervals overlap are not distinguishable."),
    "regret_consensus_vs_single": (
        "Worst-case regret over distributions (importance dropped beyond each distribution's best set) of every drop "
        "set, one panel per module kind and budget, one labelled row per consensus method, single-distribution set "
        "(own:<distribution>) and the random expectation. Look whether the consensus rows sit left of the own: rows."),
    "metric_validity": (
        "Spearman ρ (95% bootstrap CI) between each proxy metric's ranking and the ablation ranking (the real loss "
        "increase when one module is dropped), per module kind and distribution; colour scale fitted to the data. "
        "Higher means the cheap proxy ranks modules like the real loss does."),
    "proxy_vs_ablation": (
        "The primary metric's importance (named on the x axis) against the measured loss increase when the module is "
        "dropped alone, one point per layer and distribution (symlog y: points below 0 are modules whose removal "
        "lowered the loss). A monotone cloud means the proxy ranks well; look at the low-proxy corner, which decides "
        "the drop set."),
    "ranking_decomposition": (
        "Mean Spearman ρ, corrected for each ranking's split-half reliability, between rankings that differ only in "
        "the calibration distribution (blue, one bar per metric) or only in the proxy metric (orange, one bar per "
        "distribution), and of each proxy with the ablation ground truth (green, apart, so its noise is not counted as "
        "metric disagreement). Lower bars move more: compare blue with orange to see whether the data or the proxy "
        "changes the ranking more."),
}
