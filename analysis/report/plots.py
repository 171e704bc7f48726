"""Figures drawn from calibdrop's tidy tables (matplotlib/seaborn); each saved as PNG and SVG.

Every figure has a caption in :data:`CAPTIONS`, keyed by the file stem it is saved under (the
per-metric figures of ``compare`` live under ``figures/<metric>/`` with the same stems).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..importance.metrics import get_metric
from ..io import temp_file
from ..presets import PRIMARY_METRIC
from ..study.resolution import beyond_noise
from ..study.tables import importance_matrix
from .captions import MODULE_NAMES

PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


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


def fitted_limits(values, step: float = 0.05, top: float = 1.0) -> tuple[float, float]:
    """Colour limits fitted to the data: (min rounded down to ``step``, max rounded up, at most ``top``).

    A constant matrix gets one ``step`` of room below, so the scale never collapses.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    low = math.floor(finite.min() / step + 1e-9) * step
    high = min(top, math.ceil(finite.max() / step - 1e-9) * step)
    return (low - step, high) if high <= low else (low, high)


def positive_norm(values, vmin: float | None = None, vmax: float | None = None):
    """``LogNorm`` over the values when all are positive, else a linear ``Normalize`` (log needs > 0)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    vmin = finite.min() if vmin is None else vmin
    vmax = finite.max() if vmax is None else vmax
    return LogNorm(vmin=vmin, vmax=vmax) if vmin > 0 else Normalize(vmin=vmin, vmax=vmax)


def importance_label(frame: pd.DataFrame) -> str:
    """``importance  <formula>`` of the table's metric (its ``metric`` column; cosine's when it has none)."""
    metrics = frame["metric"].unique() if "metric" in frame.columns else [PRIMARY_METRIC]
    return "importance  " + (get_metric(metrics[0]).label if len(metrics) == 1 else "")


def legible_layer_ticks(ax, axis: str = "y") -> None:
    """Every candidate labelled, horizontal, small enough not to collide with the axis label."""
    ax.tick_params(axis=axis, rotation=0, labelsize=7)


def mark_diagonal(ax, n: int) -> None:
    """Outline the diagonal cells of an ``n`` × ``n`` heatmap."""
    for i in range(n):
        ax.add_patch(Rectangle((i, i), 1, 1, fill=False, edgecolor="white", linewidth=2))


def similarity_stability_heatmap(agreement: pd.DataFrame, reliability: pd.DataFrame, pairs: pd.DataFrame, *,
                                  statistic: str = "spearman"):
    """Heatmap of a pair statistic (``spearman`` or ``jaccard@k``) between distributions.

    The diagonal (outlined) is each distribution's split-half noise floor (Spearman-Brown corrected
    ρ, or Jaccard@k of random halves), also drawn as a line on the colour bar at its lowest value;
    ``*`` marks pairs that differ beyond resampling noise: the upper end of the pair's bootstrap CI (``pairs``, the
    ``bootstrap_pairs`` table) is below ``sqrt(floor_a floor_b)`` (:func:`analysis.study.resolution.beyond_noise`).
    The colour scale spans the data (see :func:`fitted_limits`), not −1..1, so 0.6 and 0.9 look different.
    """
    module = agreement["module"].iloc[0]
    floor_column = "reliability" if statistic == "spearman" else f"split_half_{statistic}"
    floor = reliability.set_index("distribution")[floor_column]
    values = pair_matrix(agreement, statistic, floor)
    marks = beyond_noise(pairs[f"{statistic}_ci_high"], pairs["a"].map(floor), pairs["b"].map(floor))
    beyond = pair_matrix(pairs.assign(beyond=marks.astype(float)), "beyond", floor * 0)
    labels = values.map(lambda v: f"{v:.2f}") + beyond.map(lambda b: "*" if b == 1 else "")
    low, high = fitted_limits(values.to_numpy())
    fig, ax = plt.subplots(figsize=(1.3 * len(values) + 2.5, 1.1 * len(values) + 1.5))
    name = "Spearman ρ" if statistic == "spearman" else statistic.replace("jaccard@", "Jaccard@")
    sns.heatmap(values, annot=labels, fmt="", vmin=low, vmax=high, cmap="viridis", square=True, ax=ax,
                cbar_kws={
                    "label": f"{name} of importance rankings" if statistic == "spearman" else f"{name} of drop sets"})
    mark_diagonal(ax, len(values))
    lowest = floor.min()
    colorbar = ax.collections[0].colorbar
    colorbar.ax.axhline(lowest, color="red", linewidth=2)
    ax.set_title(f"{MODULE_NAMES[module]} ranking agreement between calibration distributions ({name})\n"
                 f"outlined diagonal: split-half noise floor (lowest {lowest:.2f}, red line on the scale)\n"
                 "* beyond resampling noise (CI upper end below sqrt(floor_a · floor_b))", fontsize=9)
    ax.set_xlabel("distribution")
    ax.set_ylabel("distribution")
    ax.tick_params(axis="y", rotation=0)
    return fig


def candidate_axis(ax, candidates: list, module: str) -> None:
    """x ticks of a per-candidate line plot: layers, or for ``joint`` ``attn:i``/``mlp:i`` labels and a line between
    the kinds."""
    if module != "joint":
        ax.set_xlabel("layer")
        return
    x = np.arange(len(candidates))
    step = max(1, len(candidates) // 12)
    ax.set_xticks(x[::step], [str(c) for c in candidates[::step]], rotation=45, ha="right", fontsize=7)
    kinds = [str(c).split(":")[0] for c in candidates]
    for i in range(1, len(kinds)):
        if kinds[i] != kinds[i - 1]:
            ax.axvline(i - 0.5, color="grey", linewidth=1, linestyle=":")
    ax.set_xlabel("candidate (attention sublayers, then MLP sublayers)")


def importance_profiles(bootstrap_importance: pd.DataFrame):
    """Importance by layer per distribution, with bootstrap confidence bands (log scale)."""
    module = bootstrap_importance["module"].iloc[0]
    fig, ax = plt.subplots(figsize=(9, 4))
    candidates = list(bootstrap_importance["candidate"].unique())
    for name, part in bootstrap_importance.groupby("distribution", sort=False):
        x = np.arange(len(part)) if module == "joint" else part["candidate"].astype(int).to_numpy()
        ax.plot(x, part["importance"], marker="o", markersize=3, label=name)
        ax.fill_between(x, part["ci_low"], part["ci_high"], alpha=0.2)
    candidate_axis(ax, candidates, module)
    if (bootstrap_importance["ci_low"] > 0).all():
        ax.set_yscale("log")
        ax.set_yticks(ratio_ticks(bootstrap_importance["ci_low"].min(), bootstrap_importance["ci_high"].max()))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{importance_label(bootstrap_importance)}  (log scale)")
    else:
        ax.set_yscale("symlog", linthresh=linear_threshold(bootstrap_importance["importance"]))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"{importance_label(bootstrap_importance)}  (symlog)")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_title(f"{MODULE_NAMES[module]} importance by layer per distribution (bands: 95% bootstrap CI)")
    ax.legend(title="distribution", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def relative_importance(matrix: pd.DataFrame) -> pd.DataFrame:
    """Per candidate, log2 of each distribution's importance over the candidate's geometric mean across distributions.

    ``r[l, d] = log2 S[l, d] − mean_d' log2 S[l, d']``: +1 means distribution d finds layer l twice
    as important as the distributions' typical value, whatever the layer's overall size.
    """
    logs = np.log2(matrix.where(matrix > 0))
    return logs.sub(logs.mean(axis=1), axis=0)


def importance_heatmap(scores: pd.DataFrame, module: str = "attn"):
    """Candidates × distributions of importance (log colour scale) beside each candidate's between-distribution
    differences.

    Left: raw importance (the paper's Figures 2–3) on a log colour scale, so layers 0/1 do not
    saturate it. Right: :func:`relative_importance`, on a diverging scale centred at 0.
    """
    matrix = importance_matrix(scores, module)
    relative = relative_importance(matrix)
    spread = max(float(np.nanmax(np.abs(relative.to_numpy()))), 1e-6)
    height = 0.2 * len(matrix) + 2
    fig, (raw_ax, rel_ax) = plt.subplots(1, 2, figsize=(2 * (0.8 * matrix.shape[1] + 2.5), height), sharey=True,
                                         layout="constrained")
    norm = positive_norm(matrix.to_numpy())
    scale = "log scale" if isinstance(norm, LogNorm) else "linear: some values ≤ 0"
    sns.heatmap(matrix, cmap="magma_r", norm=norm, ax=raw_ax, yticklabels=True,
                cbar_kws={"label": f"{importance_label(scores)}  ({scale})", "format": PLAIN})
    if isinstance(norm, LogNorm):
        raw_ax.collections[0].colorbar.set_ticks(ratio_ticks(norm.vmin, norm.vmax))
        raw_ax.collections[0].colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
    sns.heatmap(relative, cmap="RdBu_r", norm=TwoSlopeNorm(0, -spread, spread), ax=rel_ax, yticklabels=True,
                cbar_kws={"label": "log2(importance / layer's geometric mean over distributions)"})
    raw_ax.set_title("importance (darker = more important)", fontsize=10)
    blank = "; blank: importance ≤ 0" if relative.isna().to_numpy().any() else ""
    rel_ax.set_title(f"between distributions, per layer\n(red = more important here than elsewhere{blank})",
                     fontsize=10)
    for ax in (raw_ax, rel_ax):
        ax.set_xlabel("distribution")
        ax.tick_params(axis="x", rotation=30)
    raw_ax.set_ylabel("layer" if module != "joint" else "candidate")
    rel_ax.set_ylabel("")
    rel_ax.tick_params(labelleft=True)
    for ax in (raw_ax, rel_ax):
        legible_layer_ticks(ax)
    fig.get_layout_engine().set(wspace=0.06)
    fig.suptitle(f"{MODULE_NAMES[module]} importance per calibration distribution")
    return fig


def membership_heatmap(bootstrap_importance: pd.DataFrame, k: int):
    """Probability (over bootstrap resamples) that each candidate falls in the size-k drop set."""
    module = bootstrap_importance["module"].iloc[0]
    order = list(bootstrap_importance["candidate"].unique())
    matrix = bootstrap_importance.pivot(index="candidate", columns="distribution", values=f"p_drop@{k}")
    matrix = matrix.loc[order, list(bootstrap_importance["distribution"].unique())]
    fig, ax = plt.subplots(figsize=(0.9 * matrix.shape[1] + 3, 0.2 * len(matrix) + 1.8))
    sns.heatmap(matrix, vmin=0, vmax=1, cmap="Blues", ax=ax, yticklabels=True, linewidths=0.3, linecolor="#eeeeee",
                cbar_kws={"label": f"P(in drop set of size {k})"})
    ax.set_xlabel("distribution")
    ax.set_ylabel("layer" if module != "joint" else "candidate")
    ax.tick_params(axis="x", rotation=30)
    legible_layer_ticks(ax)
    ax.set_title(f"{MODULE_NAMES[module]}: drop-set membership probability (bootstrap), k = {k}", fontsize=10)
    return fig


def convergence_plot(curve: pd.DataFrame, summary: pd.DataFrame):
    """Spearman ρ of rankings from n samples of one half against the ranking of the other half, mean ± std over
    repeats."""
    module = curve["module"].iloc[0]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, part in curve.groupby("distribution", sort=False):
        ax.plot(part["n"], part["spearman_mean"], marker="o", label=name)
        ax.fill_between(part["n"], part["spearman_mean"] - part["spearman_std"],
                        part["spearman_mean"] + part["spearman_std"], alpha=0.2)
    target = summary["target_spearman"].iloc[0]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target ρ = {target}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(PLAIN)
    ax.set_xticks(sorted(curve["n"].unique()))
    ax.set_xlabel("calibration samples n")
    ax.set_ylabel("Spearman ρ with an independent half")
    ax.set_title(f"{MODULE_NAMES[module]}: how many samples a stable ranking needs\n(reference: the ranking from "
                 f"{curve['reference_n'].iloc[0]} other samples, none shared with the n)",
                 fontsize=10)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def regret_bars(leave_one_out: pd.DataFrame):
    """Leave-one-distribution-out regret: consensus without d, other distributions' own sets, random (symlog axis)."""
    module, k = leave_one_out["module"].iloc[0], leave_one_out["k"].iloc[0]
    consensus = leave_one_out.pivot(index="held_out", columns="method", values="consensus_regret")
    baseline = leave_one_out.groupby("held_out", sort=False)[["single_mean_regret", "random_regret"]].first()
    table = consensus.join(baseline.rename(columns={"single_mean_regret": "single (mean)",
                                                    "random_regret": "random (expected)"}))
    long = table.reset_index().melt(id_vars="held_out", var_name="drop set", value_name="regret")
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.barplot(long, x="held_out", y="regret", hue="drop set", ax=ax)
    for bar in ax.patches:
        if bar.get_height() == 0 and bar.get_width() > 0:
            ax.text(bar.get_x() + bar.get_width() / 2, 0, "0", ha="center", va="bottom", fontsize=7)
    threshold = linear_threshold(long["regret"])
    ax.set_yscale("symlog", linthresh=threshold)
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("held-out distribution")
    ax.set_ylabel(f"regret (symlog; linear below {threshold:g})")
    ax.set_title(f"{MODULE_NAMES[module]}, k = {k}: importance dropped beyond the held-out distribution's best set\n"
                 "by drop sets built without it (lower is better)", fontsize=10)
    ax.legend(title="drop set", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def linear_threshold(values: pd.Series) -> float:
    """Linear range of a symlog axis: the power of ten at or below the smallest nonzero magnitude, but within 3 decades
    of the largest (1e-3 when none)."""
    positive = values.abs()[values != 0]
    return 10.0 ** math.floor(math.log10(max(positive.min(), positive.max() / 1e3))) if len(positive) else 1e-3


RATIO_STEPS = ((4, (1, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 7.5)), (1000, (1, 2, 5)), (math.inf, (1,)))


def ratio_ticks(low: float, high: float) -> list[float]:
    """Readable ticks for a log scale of ratios between ``low`` and ``high``: steps times powers of ten.

    Fine steps (1, 1.1, 1.25, ... 7.5) when ``high / low`` < 4, 1-2-5 below 1000, powers of ten beyond.
    """
    steps = next(steps for span, steps in RATIO_STEPS if high / low < span)
    return [
        float(
            f"{step * 10.0 ** power:.6g}") for power in range(
                -8, 9) for step in steps if low <= step * 10.0 ** power <= high]


def stability_figures(scores: pd.DataFrame, tables: dict[str, pd.DataFrame], folder: Path, k: int) -> list[Path]:
    """Draw every stability figure per module kind into ``folder``; returns the files written."""
    written = []
    for module in tables["agreement"]["module"].unique():
        pick = {name: table[table["module"] == module] for name, table in tables.items() if "module" in table.columns}
        kk = max(
            int(
                c.split(
                    "@")[
                        1]) for c in pick[
                            "agreement"].columns if c.startswith("jaccard@") and pick["agreement"][c].notna().any())
        for statistic in ("spearman", f"jaccard@{kk}"):
            fig = similarity_stability_heatmap(pick["agreement"], pick["split_half"], pick["bootstrap_pairs"],
                                               statistic=statistic)
            written += save_figure(fig, folder / f"similarity_{module}_{statistic.replace('@', '')}")
        written += save_figure(importance_profiles(pick["bootstrap_importance"]), folder / f"profile_{module}")
        written += save_figure(importance_heatmap(scores, module), folder / f"importance_{module}")
        written += save_figure(membership_heatmap(pick["bootstrap_importance"], min(k, kk)),
                               folder / f"membership_{module}")
        written += save_figure(convergence_plot(pick["convergence"], pick["convergence_summary"]),
                               folder / f"convergence_{module}")
        if "leave_one_out" in pick and len(pick["leave_one_out"]):
            written += save_figure(regret_bars(pick["leave_one_out"]), folder / f"regret_{module}")
    return written
