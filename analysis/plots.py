"""Figures drawn from calibdrop's tidy tables (matplotlib/seaborn); each saved as PNG and SVG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
import numpy as np
import pandas as pd
import seaborn as sns

from .io import temp_file
from .stability import importance_matrix

MODULE_NAMES = {"attn": "attention", "mlp": "MLP", "block": "block", "joint": "attention + MLP"}


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` (each through a temporary file and a rename)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".svg"):
        target = stem.with_suffix(suffix)
        handle, temporary = temp_file(target.parent, f".{target.name}.", suffix)
        os.close(handle)
        fig.savefig(temporary, dpi=150, bbox_inches="tight")
        os.replace(temporary, target)
        written.append(target)
    plt.close(fig)
    return written


def pair_matrix(pairs: pd.DataFrame, column: str, diagonal: pd.Series) -> pd.DataFrame:
    """Symmetric distributions × distributions matrix of a pair statistic, ``diagonal`` on the diagonal."""
    names = list(diagonal.index)
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for a, b, value in pairs[["a", "b", column]].itertuples(index=False, name=None):
        matrix.loc[a, b] = matrix.loc[b, a] = value
    for name in names:
        matrix.loc[name, name] = diagonal[name]
    return matrix


def similarity_stability_heatmap(agreement: pd.DataFrame, reliability: pd.DataFrame, permutation: pd.DataFrame, *, statistic: str = "spearman"):
    """Heatmap of a pair statistic (``spearman`` or ``jaccard@k``) between distributions.

    The diagonal is each distribution's split-half noise floor (Spearman-Brown corrected ρ, or
    Jaccard@k of random halves); ``*`` marks pairs whose disagreement exceeds resampling noise
    (permutation p < 0.05).
    """
    module = agreement["module"].iloc[0]
    floor_column = "reliability" if statistic == "spearman" else f"split_half_{statistic}"
    floor = reliability.set_index("distribution")[floor_column]
    values = pair_matrix(agreement, statistic, floor)
    p_values = pair_matrix(permutation, f"p_{statistic}", floor * np.nan)
    labels = values.map(lambda v: f"{v:.2f}") + p_values.map(lambda p: "*" if p < 0.05 else "")
    fig, ax = plt.subplots(figsize=(1.3 * len(values) + 2.5, 1.1 * len(values) + 1.5))
    low = -1 if statistic == "spearman" else 0
    sns.heatmap(values, annot=labels, fmt="", vmin=low, vmax=1, cmap="viridis", square=True, ax=ax,
                cbar_kws={"label": "Spearman ρ of importance" if statistic == "spearman" else f"{statistic} of drop sets"})
    title = "Spearman ρ" if statistic == "spearman" else statistic.replace("jaccard@", "Jaccard@")
    ax.set_title(f"{MODULE_NAMES[module]} ranking agreement between calibration distributions ({title})\n"
                 "diagonal: split-half noise floor; * disagreement beyond noise (permutation p < 0.05)", fontsize=9)
    ax.set_xlabel("distribution")
    ax.set_ylabel("distribution")
    return fig


def importance_profiles(bootstrap_importance: pd.DataFrame):
    """Importance by layer per distribution, with bootstrap confidence bands."""
    module = bootstrap_importance["module"].iloc[0]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, part in bootstrap_importance.groupby("distribution", sort=False):
        x = np.arange(len(part)) if module == "joint" else part["candidate"].astype(int).to_numpy()
        ax.plot(x, part["importance"], marker="o", markersize=3, label=name)
        ax.fill_between(x, part["ci_low"], part["ci_high"], alpha=0.2)
    ax.set_xlabel("candidate (attn then MLP sublayers)" if module == "joint" else "layer")
    ax.set_yscale("log")
    ax.set_ylabel("importance  1 − cos(X, Y)  (log scale)")
    ax.set_title(f"{MODULE_NAMES[module]} importance by layer per distribution (bands: 95% bootstrap CI)")
    ax.legend(title="distribution", fontsize=8)
    return fig


def importance_heatmap(scores: pd.DataFrame, module: str = "attn"):
    """Layer × distribution heatmap of importance (the paper's Figures 2–3, one column per distribution)."""
    matrix = importance_matrix(scores, module)
    fig, ax = plt.subplots(figsize=(1.0 * matrix.shape[1] + 3, 0.22 * len(matrix) + 1.5))
    sns.heatmap(matrix, cmap="magma_r", ax=ax, cbar_kws={"label": "importance  1 − cos(X, Y)"})
    ax.set_xlabel("distribution")
    ax.set_ylabel("layer" if module != "joint" else "candidate")
    ax.set_title(f"{MODULE_NAMES[module]} importance (darker = more important)")
    return fig


def membership_heatmap(bootstrap_importance: pd.DataFrame, k: int):
    """Probability (over bootstrap resamples) that each candidate falls in the size-k drop set."""
    module = bootstrap_importance["module"].iloc[0]
    order = list(dict.fromkeys(bootstrap_importance["candidate"]))
    matrix = bootstrap_importance.pivot(index="candidate", columns="distribution", values=f"p_drop@{k}")
    matrix = matrix.loc[order, list(dict.fromkeys(bootstrap_importance["distribution"]))]
    fig, ax = plt.subplots(figsize=(1.0 * matrix.shape[1] + 3, 0.22 * len(matrix) + 1.5))
    sns.heatmap(matrix, vmin=0, vmax=1, cmap="Blues", ax=ax, cbar_kws={"label": f"P(in drop set of size {k})"})
    ax.set_xlabel("distribution")
    ax.set_ylabel("layer" if module != "joint" else "candidate")
    ax.set_title(f"{MODULE_NAMES[module]}: drop-set membership probability (bootstrap), k = {k}")
    return fig


def convergence_plot(curve: pd.DataFrame, summary: pd.DataFrame):
    """Spearman ρ of rankings from n samples against the all-sample ranking, mean ± std over repeats."""
    module = curve["module"].iloc[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, part in curve.groupby("distribution", sort=False):
        ax.plot(part["n"], part["spearman_mean"], marker="o", label=name)
        ax.fill_between(part["n"], part["spearman_mean"] - part["spearman_std"], part["spearman_mean"] + part["spearman_std"], alpha=0.2)
    target = summary["target_spearman"].iloc[0]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target ρ = {target}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration samples n")
    ax.set_ylabel("Spearman ρ with all-sample ranking")
    ax.set_title(f"{MODULE_NAMES[module]}: how many samples a stable ranking needs")
    ax.legend(fontsize=8)
    return fig


def regret_bars(leave_one_out: pd.DataFrame):
    """Leave-one-distribution-out regret: consensus without d, other distributions' own sets, random."""
    module, k = leave_one_out["module"].iloc[0], leave_one_out["k"].iloc[0]
    consensus = leave_one_out.pivot(index="held_out", columns="method", values="consensus_regret")
    baseline = leave_one_out.groupby("held_out", sort=False)[["single_mean_regret", "random_regret"]].first()
    table = consensus.join(baseline.rename(columns={"single_mean_regret": "single (mean)", "random_regret": "random (expected)"}))
    long = table.reset_index().melt(id_vars="held_out", var_name="drop set", value_name="regret")
    fig, ax = plt.subplots(figsize=(9, 4))
    sns.barplot(long, x="held_out", y="regret", hue="drop set", ax=ax)
    ax.set_xlabel("held-out distribution")
    ax.set_ylabel("regret (importance dropped beyond the best set)")
    ax.set_title(f"{MODULE_NAMES[module]}, k = {k}: drop sets built without the held-out distribution")
    return fig


def transfer_heatmap(transfer: pd.DataFrame, value: str = "ppl_ratio"):
    """Drop sets × held-out distributions (and the worst over them) of perplexity relative to the unpruned model.

    The colour scale spans the non-random sets, so one random outlier does not flatten the rest.
    """
    rows = transfer[(transfer["drop_set"] != "none") & (transfer["distribution"] != "mean")]
    matrix = rows.pivot_table(index="drop_set", columns="distribution", values=value, sort=False)
    matrix = matrix.loc[matrix["worst"].sort_values().index] if "worst" in matrix.columns else matrix
    scale = matrix[[not str(name).split(":")[-2:-1] == ["random"] for name in matrix.index]]
    fig, ax = plt.subplots(figsize=(1.2 * matrix.shape[1] + 4, 0.3 * len(matrix) + 1.5))
    norm = LogNorm(vmin=max(scale.min().min(), 1e-3), vmax=max(scale.max().max(), 1.01))
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="rocket_r", norm=norm, ax=ax, cbar_kws={"label": "held-out perplexity / unpruned (log scale)"})
    ax.set_xlabel("held-out distribution")
    ax.set_ylabel("drop set")
    ax.set_title("Transfer: perplexity of each pruned model on each distribution's held-out text")
    return fig


def stability_figures(scores: pd.DataFrame, tables: dict[str, pd.DataFrame], folder: Path, k: int) -> list[Path]:
    """Draw every stability figure per module kind into ``folder``; returns the files written."""
    written = []
    for module in tables["agreement"]["module"].unique():
        pick = {name: table[table["module"] == module] for name, table in tables.items() if "module" in table.columns}
        kk = max(int(c.split("@")[1]) for c in pick["agreement"].columns if c.startswith("jaccard@") and pick["agreement"][c].notna().any())
        for statistic in ("spearman", f"jaccard@{kk}"):
            fig = similarity_stability_heatmap(pick["agreement"], pick["split_half"], pick["permutation"], statistic=statistic)
            written += save_figure(fig, folder / f"similarity_{module}_{statistic.replace('@', '')}")
        written += save_figure(importance_profiles(pick["bootstrap_importance"]), folder / f"profile_{module}")
        written += save_figure(importance_heatmap(scores, module), folder / f"importance_{module}")
        written += save_figure(membership_heatmap(pick["bootstrap_importance"], min(k, kk)), folder / f"membership_{module}")
        written += save_figure(convergence_plot(pick["convergence"], pick["convergence_summary"]), folder / f"convergence_{module}")
        if "leave_one_out" in pick and len(pick["leave_one_out"]):
            written += save_figure(regret_bars(pick["leave_one_out"]), folder / f"regret_{module}")
    return written


def worst_case_forest(transfer: pd.DataFrame):
    """Worst-case held-out perplexity ratio over distributions of every drop set, with its bootstrap 95% CI, per budget."""
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != "none")]
    worst = worst[~worst["method"].str.startswith("random")]
    budgets = sorted(worst["k"].unique())
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 0.28 * worst.groupby("k").size().max() + 1.5), squeeze=False)
    for ax, k in zip(axes[0], budgets):
        part = worst[worst["k"] == k].sort_values("ppl_ratio", ascending=False)
        colours = part["metric"].map(dict(zip(sorted(worst["metric"].unique()), sns.color_palette("deep"))))
        y = np.arange(len(part))
        ax.errorbar(part["ppl_ratio"], y, xerr=[part["ppl_ratio"] - part["ci_low"], part["ci_high"] - part["ppl_ratio"]], fmt="none", ecolor="grey")
        ax.scatter(part["ppl_ratio"], y, c=list(colours), zorder=3)
        ax.set_yticks(y, part["metric"] + " " + part["method"])
        ax.set_xscale("log")
        ax.set_xlabel("worst-case held-out perplexity / unpruned (log)")
        ax.set_title(f"{MODULE_NAMES.get(part['module'].iloc[0], '')} k = {k}: lower is better")
    fig.tight_layout()
    return fig


def validity_heatmap(validity: pd.DataFrame):
    """Spearman ρ between each proxy's ranking and the ablation ranking: metric × distribution, one panel per module kind."""
    modules = list(dict.fromkeys(validity["module"]))
    fig, axes = plt.subplots(1, len(modules), figsize=(4.8 * len(modules) + 1, 3.4), squeeze=False, layout="constrained")
    for ax, module in zip(axes[0], modules):
        part = validity[validity["module"] == module]
        matrix = part.pivot_table(index="metric", columns="distribution", values="spearman", sort=False)
        labels = part.assign(text=part.apply(lambda r: f"{r.spearman:.2f}\n[{r.spearman_ci_low:.2f}, {r.spearman_ci_high:.2f}]", axis=1))
        text = labels.pivot_table(index="metric", columns="distribution", values="text", aggfunc="first", sort=False).loc[matrix.index, matrix.columns]
        sns.heatmap(matrix, annot=text, fmt="", cmap="viridis", vmin=min(0, validity["spearman"].min()), vmax=1, ax=ax, cbar=False,
                    annot_kws={"size": 7})
        ax.set_title(f"{MODULE_NAMES[module]}: ρ(proxy, ablation)")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=30)
    fig.colorbar(axes[0][0].collections[0], ax=axes[0].tolist(), label="Spearman ρ with the ablation ranking")
    return fig


def proxy_vs_ablation(scores: pd.DataFrame, metric: str = "cosine"):
    """Proxy importance against the real loss increase of dropping each module, one panel per module kind."""
    modules = ("attn", "mlp", "block")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, module in zip(axes, modules):
        proxy = importance_matrix(scores, module, metric).stack().rename("proxy")
        truth = importance_matrix(scores, module, "ablation").stack().rename("ablation")
        both = pd.concat([proxy, truth], axis=1).reset_index(names=["layer", "distribution"])
        sns.scatterplot(both, x="proxy", y="ablation", hue="distribution", ax=ax, s=25)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"{metric} importance (log)")
        ax.set_ylabel("ΔNLL when dropped alone (nats/token)")
        ax.set_title(MODULE_NAMES[module])
        if ax is not axes[-1]:
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def decomposition_bars(decomposition: pd.DataFrame):
    """Mean ρ between rankings that differ only in the distribution (per metric) or only in the metric (per distribution)."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    data = decomposition.assign(label=decomposition["axis"].map({"distribution": "across distributions, within ", "metric": "across metrics, within "})
                                + decomposition["held"])
    sns.barplot(data, x="module", y="mean_spearman", hue="label", ax=ax)
    ax.set_ylim(min(0, data["mean_spearman"].min()), 1)
    ax.set_ylabel("mean Spearman ρ")
    ax.set_xlabel("module kind")
    ax.set_title("How much does the ranking move with the data, and how much with the metric?")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def regret_overview(regret: pd.DataFrame):
    """Worst-case regret over distributions of each drop set, per module and budget: consensus vs single."""
    worst = regret.groupby(["module", "k", "drop_set"], sort=False)["regret"].max().reset_index()
    worst["kind"] = worst["drop_set"].map(lambda n: "single distribution" if n.startswith("own:") else ("random (expected)" if n == "random" else "consensus"))
    worst["budget"] = worst["module"] + "-" + worst["k"].astype(str)
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.stripplot(worst, x="budget", y="regret", hue="kind", dodge=True, size=7, ax=ax, jitter=False,
                  hue_order=["consensus", "single distribution", "random (expected)"])
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("module kind and drop-set size")
    ax.set_ylabel("worst-case regret over distributions")
    ax.set_title("Consensus drop sets against each distribution's own set: importance dropped beyond the best set")
    return fig
