"""Figures of the metric study and the held-out evaluation: the transfer matrix, the worst-case forest, proxy
validity, proxy against ablation, the data/metric decomposition and the regret overview.  The stability
figures and the shared axis helpers live in :mod:`analysis.report.plots`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullFormatter

from ..presets import PRIMARY_METRIC
from ..study.tables import importance_matrix
from .captions import MODULE_NAMES
from .plots import PLAIN, fitted_limits, linear_threshold, positive_norm, ratio_ticks


def transfer_heatmap(transfer: pd.DataFrame, value: str = "ppl_ratio"):
    """Drop sets × held-out distributions (and the worst over them) of perplexity relative to the unpruned model.

    The log colour scale spans the non-random sets, so the random sets (bottom rows, below a line,
    values printed) run off its end instead of flattening the rest.
    """
    rows = transfer[(transfer["drop_set"] != "none") & (transfer["distribution"] != "mean")]
    matrix = rows.pivot_table(index="drop_set", columns="distribution", values=value, sort=False)
    random_sets = set(rows.loc[rows["method"].astype(str).str.startswith("random"), "drop_set"])
    matrix["_random"] = [name in random_sets for name in matrix.index]
    order = matrix.sort_values(["_random", "worst" if "worst" in matrix.columns else matrix.columns[0]]).index
    is_random = matrix.loc[order, "_random"].to_numpy()
    matrix = matrix.drop(columns="_random").loc[order]
    scale = matrix[~is_random] if (~is_random).any() else matrix
    norm = positive_norm(scale.to_numpy(), vmin=max(np.nanmin(scale.to_numpy()), 1e-3),
                         vmax=max(np.nanmax(scale.to_numpy()), 1.01))
    fig, ax = plt.subplots(figsize=(1.2 * matrix.shape[1] + 4, 0.3 * len(matrix) + 1.8))
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="rocket_r", norm=norm, ax=ax,
                cbar_kws={"label": "held-out perplexity / unpruned (log scale)", "extend": "max", "format": PLAIN})
    colorbar = ax.collections[0].colorbar
    colorbar.set_ticks(ratio_ticks(norm.vmin, norm.vmax))
    colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
    if is_random.any() and (~is_random).any():
        ax.axhline(int((~is_random).sum()), color="white", linewidth=3)
    if "worst" in matrix.columns:
        ax.axvline(list(matrix.columns).index("worst"), color="white", linewidth=3)
    ax.set_xlabel("held-out distribution")
    ax.set_ylabel("drop set")
    ax.set_title("Transfer: perplexity of each pruned model on each distribution's held-out text (lower is better)\n"
                 "sorted by the worst column; random sets (below the line) are off the colour scale", fontsize=10)
    return fig


def metric_colours(metrics) -> dict:
    """One colour per metric name, stable across figures (sorted names on seaborn's ``deep`` palette)."""
    names = sorted(set(metrics))
    return dict(zip(names, sns.color_palette("deep", len(names))))


def forest_labels(part: pd.DataFrame) -> list[str]:
    """One label per drop set of a panel: ``metric method``, with the set's name after it where two sets of the panel
    would otherwise read the same."""
    short = part["metric"] + " " + part["method"]
    repeated = short.duplicated(keep=False)
    return [f"{label} ({name})" if twice else label for label, name, twice in zip(short, part["drop_set"], repeated)]


def worst_case_forest(transfer: pd.DataFrame):
    """Worst-case held-out perplexity ratio over distributions of every drop set, with its bootstrap 95% CI, per
    budget."""
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != "none")]
    worst = worst[~worst["method"].str.startswith("random")]
    panels = list(worst.groupby(["module", "k"], sort=False).groups)
    colours = metric_colours(worst["metric"])
    tallest = worst.groupby(["module", "k"]).size().max()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.28 * tallest + 2), squeeze=False)
    for ax, (module, k) in zip(axes[0], panels):
        part = worst[(worst["module"] == module) & (worst["k"] == k)].sort_values("ppl_ratio", ascending=False)
        y = np.arange(len(part))
        ax.errorbar(part["ppl_ratio"], y, xerr=[part["ppl_ratio"] - part["ci_low"],
                                                part["ci_high"] - part["ppl_ratio"]], fmt="none", ecolor="grey")
        ax.scatter(part["ppl_ratio"], y, c=list(part["metric"].map(colours)), zorder=3)
        ax.set_yticks(y, forest_labels(part))
        ax.set_xscale("log")
        ax.set_xticks(ratio_ticks(0.95 * part["ci_low"].min(), 1.05 * part["ci_high"].max()))
        ax.xaxis.set_major_formatter(PLAIN)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("worst-case held-out perplexity / unpruned (log)")
        ax.set_title(f"{MODULE_NAMES.get(module, module)} k = {k}: lower is better")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour, label=name) for name,
               colour in colours.items()]
    fig.legend(handles=handles, title="ranking from", loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)
    fig.tight_layout()
    return fig


def validity_heatmap(validity: pd.DataFrame):
    """Spearman ρ between each proxy's ranking and the ablation ranking: metric × distribution, one panel per module
    kind (stacked, to stay legible at page width)."""
    modules = list(validity["module"].unique())
    low, high = fitted_limits(validity["spearman"], step=0.1)
    fig, axes = plt.subplots(len(modules), 1, figsize=(7.5, 2.6 * len(modules) + 0.5), squeeze=False,
                             layout="constrained")
    for ax, module in zip(axes.flat, modules):
        part = validity[validity["module"] == module]
        matrix = part.pivot_table(index="metric", columns="distribution", values="spearman", sort=False)
        labels = part.assign(
            text=part.apply(lambda r: f"{r.spearman:.2f}\n[{r.spearman_ci_low:.2f}, {r.spearman_ci_high:.2f}]", axis=1))
        text = labels.pivot_table(index="metric", columns="distribution", values="text", aggfunc="first",
                                  sort=False).loc[matrix.index, matrix.columns]
        sns.heatmap(matrix, annot=text, fmt="", cmap="viridis", vmin=low, vmax=high, ax=ax, cbar=False,
                    annot_kws={"size": 8})
        ax.set_title(f"{MODULE_NAMES[module]}: ρ(proxy, ablation)", fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=30)
        ax.tick_params(axis="y", rotation=0)
    for ax in list(axes.flat)[len(modules):]:
        ax.set_visible(False)
    fig.colorbar(axes.flat[0].collections[0], ax=axes.ravel().tolist(),
                 label="Spearman ρ with the ablation ranking (95% CI)")
    return fig


def proxy_vs_ablation(scores: pd.DataFrame, metric: str = PRIMARY_METRIC):
    """Proxy importance against the real loss increase of dropping each module, one panel per module kind (2 × 2,
    legend in the fourth)."""
    modules = ("attn", "mlp", "block")
    fig, grid = plt.subplots(2, 2, figsize=(10, 7.5), layout="constrained")
    axes, legend_ax = grid.flat[:3], grid.flat[3]
    for ax, module in zip(axes, modules):
        proxy = importance_matrix(scores, module, metric).stack().rename("proxy")
        truth = importance_matrix(scores, module, "ablation").stack().rename("ablation")
        both = pd.concat([proxy, truth], axis=1).reset_index(names=["layer", "distribution"])
        sns.scatterplot(both, x="proxy", y="ablation", hue="distribution", ax=ax, s=25, legend=ax is axes[-1])
        ax.set_xscale("log")
        if (both["ablation"] > 0).all():
            ax.set_yscale("log")
            ax.set_ylabel("ΔNLL when dropped alone (nats/token, log)")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_ylabel("ΔNLL when dropped alone (nats/token, symlog)")
        ax.set_xlabel(f"{metric} importance (log)")
        ax.set_title(MODULE_NAMES[module])
    handles, labels = axes[-1].get_legend_handles_labels()
    axes[-1].get_legend().remove()
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, title="distribution", loc="center")
    fig.suptitle(
        "Does the proxy rank modules like the real loss of dropping them?\n(one point per layer and distribution)",
        fontsize=10)
    return fig


def decomposition_bars(decomposition: pd.DataFrame):
    """Mean ρ between rankings that differ only in the distribution (per metric), only in the proxy (per
    distribution), and of each proxy with the ground truth (per distribution), corrected for attenuation where the
    table has ``mean_corrected`` for every row."""
    fig, ax = plt.subplots(figsize=(10, 4))
    corrected = "mean_corrected" in decomposition and decomposition["mean_corrected"].notna().all()
    value = "mean_corrected" if corrected else "mean_spearman"
    axes = {"distribution": ("across distributions, within ", "Blues_d"),
            "metric": ("across proxies, within ", "Oranges_d"),
            "ground truth": ("proxy vs ground truth, within ", "Greens_d")}
    labels = decomposition["axis"].map({axis: text for axis, (text, _) in axes.items()}) + decomposition["held"]
    modules = decomposition["module"].map(MODULE_NAMES).fillna(decomposition["module"])
    data = decomposition.assign(label=labels, module=modules)
    order, palette = [], {}
    for axis, (_, colours) in axes.items():
        labels = list(dict.fromkeys(data.loc[data["axis"] == axis, "label"]))
        order += labels
        palette.update(zip(labels, sns.color_palette(colours, len(labels))))
    sns.barplot(data, x="module", y=value, hue="label", hue_order=order, palette=palette, ax=ax)
    ax.set_ylim(min(0, data[value].min()), max(1, data[value].max()))
    ax.set_ylabel("mean Spearman ρ" + (", corrected for reliability" if value == "mean_corrected" else ""))
    ax.set_xlabel("module kind")
    ax.set_title("How much does the ranking move with the data (blue), with the proxy (orange), and how far is each\n"
                 "proxy from the ground truth (green)?  lower bars = the ranking moves more", fontsize=10)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


DROP_SET_KINDS = {"consensus": "consensus", "own": "single distribution", "random": "random (expected)"}


def drop_set_kind(name: str) -> str:
    """``consensus``, ``single distribution`` (``own:<d>``) or ``random (expected)`` for a regret table's drop-set
    name."""
    return DROP_SET_KINDS.get(name.split(":")[0], DROP_SET_KINDS["consensus"])


def regret_overview(regret: pd.DataFrame):
    """Worst-case regret over distributions of each drop set, one panel per module kind and budget, one labelled row
    per drop set.

    Rows: the consensus methods, each distribution's own set (``own:<d>``), the random expectation;
    symlog x axis (regret can be 0).
    """
    worst = regret.groupby(["module", "k", "drop_set"], sort=False)["regret"].max().reset_index()
    worst["kind"] = worst["drop_set"].map(drop_set_kind)
    names = list(worst["drop_set"].unique())
    order = sorted(names, key=lambda n: list(DROP_SET_KINDS.values()).index(drop_set_kind(n)))
    position = {name: i for i, name in enumerate(order)}
    modules = list(worst["module"].unique())
    columns = max(worst.groupby("module")["k"].nunique())
    palette = dict(zip(DROP_SET_KINDS.values(), sns.color_palette("deep")))
    fig, axes = plt.subplots(len(modules), columns, figsize=(5 * columns + 2, 0.25 * len(order) * len(modules) + 1.5),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    for row, module in zip(axes, modules):
        budgets = sorted(worst.loc[worst["module"] == module, "k"].unique())
        for ax, k in zip(row, budgets):
            part = worst[(worst["module"] == module) & (worst["k"] == k)]
            ax.scatter(part["regret"], part["drop_set"].map(position), c=list(part["kind"].map(palette)), s=30,
                       zorder=3)
            ax.set_title(f"{MODULE_NAMES[module]}, k = {k}", fontsize=9)
            ax.grid(axis="both", alpha=0.3)
        for ax in row[len(budgets):]:
            ax.set_visible(False)
    first = axes[0][0]
    first.set_yticks(range(len(order)), order)
    first.set_ylim(len(order) - 0.5, -0.5)
    first.set_xscale("symlog", linthresh=linear_threshold(worst["regret"]))
    first.set_xlim(0, worst["regret"].max() * 2)
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("worst-case regret over distributions (symlog)")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour, label=kind) for kind,
               colour in palette.items()]
    fig.legend(handles=handles, loc="outside upper right", fontsize=8)
    fig.suptitle("Importance dropped beyond each distribution's best set, worst over distributions (lower is better)",
                 fontsize=10)
    return fig
