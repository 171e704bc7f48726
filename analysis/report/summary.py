"""One answer across models: tidy tables and figures over several ``calibdrop run`` folders.

Each folder is read through its saved tables (``scores``, ``bootstrap_pairs``, ``split_half``,
``drop_sets`` and, where the run got that far, ``validity``, ``decomposition``, ``transfer`` and
``comparisons``), each checked by :mod:`analysis.artifacts`; the model comes from the tables' provenance sidecars,
so a run that stopped part-way contributes what it has.

Tables (all tidy, one row per model and what the row is about):

* ``models``: model, family, layers, the folder and which tables it had.
* ``agreement``: per model, metric, module kind and statistic (``spearman``, ``jaccard@k``): the
  mean and the smallest value over pairs of distributions, the smallest pair's bootstrap CI, the
  split-half noise floor (mean and smallest over distributions) and how many pairs differ beyond resampling
  noise (``beyond_noise``: the pair's CI upper bound below ``sqrt(floor_a floor_b)``, the report's one definition).
* ``importance``: the aggregate importance per model, module, distribution and layer with the
  relative depth ``layer / (n_layers - 1)``.
* ``unimportant``: every candidate in some distribution's own drop set of size k, with how many
  distributions' sets hold it and whether every one does (unimportant on every distribution).
* ``validity``: per model, module and proxy, ρ with the ablation ranking over distributions
  (mean, lowest and highest with their CIs) and the ground truth's split-half reliability.
* ``decomposition``: mean ρ across distributions within a metric against across metrics within a distribution.
* ``heldout``: every non-random drop set's worst-case held-out perplexity ratio with its CI,
  ranked per model and budget (rank 1 wins).
* ``comparisons``: the paired comparisons on the same windows, with which side wins beyond noise.
* ``claims``: every headline claim of every run that has the resolution stage, marked resolved or not at its run's
  budget, with what would resolve it (:mod:`analysis.study.resolution`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from ..artifacts import (
    RUN_SUMMARY,
    left_out_line,
    left_out_tables,
    read_result_table,
    read_run_summary,
    rerun_hint,
    warn_left_out,
)
from ..errors import InputError
from ..io import provenance, write_table
from ..presets import GROUND_TRUTH, PRIMARY_METRIC
from ..study.dropsets import method_kind, parse_label
from ..study.resolution import pairs_beyond_noise, worst_case
from .plots import MODULE_NAMES, save_figure

REQUIRED = ("scores", "bootstrap_pairs", "split_half", "drop_sets")
OPTIONAL = ("validity", "decomposition", "transfer", "comparisons", "claims")


@dataclass
class RunFolder:
    """One ``calibdrop run`` folder: the model's label and record, and the tables it holds."""

    label: str
    folder: Path
    model: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model (from its record, else from the scores)."""
        return int(self.model.get("n_layers") or self.tables["scores"]["layer"].max() + 1)


def load_run(folder) -> RunFolder:
    """The tables of a run folder, each read and checked by :func:`~analysis.artifacts.read_result_table`; an
    :class:`InputError` when it lacks one of :data:`REQUIRED` or a file is damaged.  A table of :data:`OPTIONAL` that
    the run's ``run_summary.json`` lists but that is missing or stale is left out with a warning
    (:func:`~analysis.artifacts.left_out_tables`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give the output folders of `calibdrop run`")
    missing = [name for name in REQUIRED if not (folder / f"{name}.parquet").exists()]
    if missing:
        raise InputError(
            f"{folder} is not a finished-enough `calibdrop run` folder: it has no "
            f"{', '.join(m + '.parquet' for m in missing)}")
    record = read_run_summary(folder) if (folder / RUN_SUMMARY).is_file() else {}
    tables = {name: read_result_table(folder / f"{name}.parquet")
              for name in REQUIRED + OPTIONAL if (folder / f"{name}.parquet").exists()}
    left_out = left_out_tables(REQUIRED + OPTIONAL, tables, record)
    stale = [name for name in REQUIRED if name in left_out]
    if stale:
        raise InputError(f"{folder}: {left_out_line({name: left_out[name] for name in stale})}: {rerun_hint(folder)}")
    warn_left_out(folder, left_out, "the summary leaves out what they hold")
    tables = {name: table for name, table in tables.items() if name not in left_out}
    model = tables["scores"].attrs["provenance"].get("model") or {}
    return RunFolder(label=str(model.get("spec") or folder.name), folder=folder, model=model, tables=tables)


def load_runs(folders) -> list[RunFolder]:
    """:func:`load_run` of every folder; a model given twice is labelled ``spec (folder name)``."""
    runs = [load_run(folder) for folder in folders]
    if not runs:
        raise InputError("give at least one results folder")
    labels = pd.Series([run.label for run in runs])
    for run, repeated in zip(runs, labels.duplicated(keep=False)):
        if repeated:
            run.label = f"{run.label} ({run.folder.name})"
    if len({run.label for run in runs}) < len(runs):
        raise InputError("two results folders have the same model and folder name; give each run its own folder name")
    return runs


def _statistics(pairs: pd.DataFrame) -> list[str]:
    """The pair statistics of a ``bootstrap_pairs`` table: ``spearman`` and every ``jaccard@k``."""
    return [
        "spearman"] + sorted(
            (c for c in pairs.columns if c.startswith("jaccard@") and not c.endswith(("_ci_low", "_ci_high"))),
                                 key=lambda c: int(c.split("@")[1]))


def agreement_rows(run: RunFolder) -> list[dict]:
    """Rows of :func:`agreement_table` for one run.

    ``beyond_noise`` counts pairs ``(a, b)`` that differ beyond resampling noise by the report's one definition
    (:func:`analysis.study.resolution.beyond_noise`): the CI's upper end is below ``sqrt(floor_a floor_b)``, the floor
    being the Spearman-Brown corrected split-half ρ (``reliability``) or the split-half Jaccard@k.
    """
    pairs, halves = run.tables["bootstrap_pairs"], run.tables["split_half"]
    rows = []
    for (metric, module), part in pairs.groupby(["metric", "module"], sort=False):
        floors = halves[(halves["metric"] == metric) & (halves["module"] == module)].set_index("distribution")
        for statistic in _statistics(part):
            floor = floors["reliability" if statistic == "spearman" else f"split_half_{statistic}"]
            beyond = pairs_beyond_noise(part, halves, statistic)["beyond_noise"]
            lowest = part.loc[part[statistic].idxmin()]
            rows.append({
                "model": run.label, "n_layers": run.n_layers, "metric": metric, "module": module,
                "statistic": statistic,
                "n_pairs": len(part), "mean": part[statistic].mean(), "min": lowest[statistic],
                "min_pair": f"{lowest['a']}–{lowest['b']}",
                "min_ci_low": lowest[f"{statistic}_ci_low"], "min_ci_high": lowest[f"{statistic}_ci_high"],
                "floor_mean": floor.mean(), "floor_min": floor.min(),
                "beyond_noise": int(beyond.sum()),
            })
    return rows


def agreement_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Agreement between distributions against the noise floor, per model, metric, module kind and statistic."""
    return pd.DataFrame([row for run in runs for row in agreement_rows(run)])


def importance_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Aggregate importance per model, metric, module, distribution and layer, with ``relative_depth = layer /
    (n_layers - 1)``."""
    parts = []
    for run in runs:
        scores = run.tables["scores"][["metric", "distribution", "module", "layer", "importance"]]
        parts.append(scores.assign(model=run.label, n_layers=run.n_layers,
                                   relative_depth=scores["layer"] / max(run.n_layers - 1, 1)))
    return pd.concat(parts, ignore_index=True)[["model", "n_layers", "metric", "module", "distribution", "layer",
                                                "relative_depth", "importance"]]


def _layer_of(candidate: str) -> int:
    """The layer of a drop-set member: ``"7"`` or ``"attn:7"`` → 7."""
    return int(str(candidate).rsplit(":", 1)[-1])


def unimportant_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Every candidate in at least one distribution's own drop set (``own:<d>``), per model, metric, module and k:
    ``n_sets`` of the ``n_distributions`` own sets hold it; ``every_distribution`` when all do."""
    rows = []
    for run in runs:
        sets = run.tables["drop_sets"]
        own = sets[sets["drop_set"].str.startswith("own:")]
        for (metric, module, k), part in own.groupby(["metric", "module", "k"], sort=False):
            counts = pd.Series([str(c) for members in part["indices"] for c in members]).value_counts()
            for candidate, n_sets in counts.items():
                layer = _layer_of(candidate)
                rows.append({"model": run.label, "n_layers": run.n_layers, "metric": metric, "module": module,
                             "k": int(k),
                             "candidate": candidate, "layer": layer, "relative_depth": layer / max(run.n_layers - 1, 1),
                             "n_sets": int(n_sets), "n_distributions": len(part),
                             "every_distribution": bool(n_sets == len(part))})
    columns = ["model", "n_layers", "metric", "module", "k", "candidate", "layer", "relative_depth", "n_sets",
               "n_distributions", "every_distribution"]
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "metric", "module", "k", "layer", "candidate"],
                                                           ignore_index=True)


def validity_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Per model, module and proxy: ρ with the ablation ranking over distributions (mean; lowest and highest with
    their 95% CIs) and ``ground_truth_reliability``, the mean split-half reliability of the ablation ranking."""
    rows = []
    for run in runs:
        if "validity" not in run.tables:
            continue
        halves = run.tables["split_half"]
        truth = halves[halves["metric"] == GROUND_TRUTH].groupby("module")["reliability"].mean()
        for (module, metric), part in run.tables["validity"].groupby(["module", "metric"], sort=False):
            low, high = part.loc[part["spearman"].idxmin()], part.loc[part["spearman"].idxmax()]
            rows.append({"model": run.label, "module": module, "metric": metric,
                         "mean_spearman": part["spearman"].mean(),
                         "min_spearman": low["spearman"], "min_distribution": low["distribution"],
                         "min_ci_low": low["spearman_ci_low"], "min_ci_high": low["spearman_ci_high"],
                         "max_spearman": high["spearman"], "max_distribution": high["distribution"],
                         "max_ci_low": high["spearman_ci_low"], "max_ci_high": high["spearman_ci_high"],
                         "ground_truth_reliability": truth.get(module, np.nan)})
    return pd.DataFrame(rows)


def decomposition_table(runs: list[RunFolder]) -> pd.DataFrame:
    """The data-or-metric decomposition of every run that has it, with a ``model`` column."""
    parts = [run.tables["decomposition"].assign(model=run.label) for run in runs if "decomposition" in run.tables]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def heldout_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Every drop set's worst-case held-out perplexity ratio (over distributions) with its CI, per model and budget;
    ``rank`` 1 is the lowest ratio among non-random sets (random sets get no rank)."""
    parts = []
    for run in runs:
        if "transfer" not in run.tables:
            continue
        worst = worst_case(run.tables["transfer"])
        parts.append(worst[["drop_set", "metric", "module", "k", "method", "ppl_ratio", "ci_low", "ci_high"]].assign(
            model=run.label, n_layers=run.n_layers))
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    table["kind"] = table["method"].map(method_kind)
    ranked = table["kind"] != "random"
    table.loc[ranked, "rank"] = table[ranked].groupby(["model", "module", "k"])["ppl_ratio"].rank(method="min")
    table["rank"] = table["rank"].astype("Int64")
    columns = ["model", "n_layers", "module", "k", "drop_set", "metric", "method", "kind", "ppl_ratio", "ci_low",
               "ci_high", "rank"]
    return table[columns].sort_values(["model", "module", "k", "rank"], ignore_index=True)


def comparisons_table(runs: list[RunFolder]) -> pd.DataFrame:
    """The paired comparisons of every run (``ratio`` = ppl of a / ppl of b on the same windows), with ``winner``:
    ``a`` when the CI lies below 1, ``b`` when above, else ``neither``; and the method families of a and b."""
    parts = [run.tables["comparisons"].assign(model=run.label) for run in runs if "comparisons" in run.tables]
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    table["winner"] = np.select([table["ci_high"] < 1, table["ci_low"] > 1], ["a", "b"], "neither")
    table["a_kind"] = [method_kind(parse_label(label)["method"]) for label in table["a"]]
    table["b_kind"] = [method_kind(parse_label(label)["method"]) for label in table["b"]]
    return table


def claims_table(runs: list[RunFolder]) -> pd.DataFrame:
    """The ``claims`` table of every run that has one, with a ``model`` column first."""
    parts = [run.tables["claims"].assign(model=run.label) for run in runs if "claims" in run.tables]
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def models_table(runs: list[RunFolder]) -> pd.DataFrame:
    """One row per run: model, family, layers, folder and the optional tables it had."""
    return pd.DataFrame([{"model": run.label, "family": run.model.get("family"), "n_layers": run.n_layers,
                          "weights_sha256": run.model.get("weights_sha256"), "folder": str(run.folder),
                          "tables": ",".join(name for name in OPTIONAL if name in run.tables)} for run in runs])


TABLES = {
    "models": models_table,
    "agreement": agreement_table,
    "importance": importance_table,
    "unimportant": unimportant_table,
    "validity": validity_table,
    "decomposition": decomposition_table,
    "heldout": heldout_table,
    "comparisons": comparisons_table,
    "claims": claims_table,
}


def summary(results_dirs) -> dict[str, pd.DataFrame]:
    """Every table of :data:`TABLES` across the run folders ``results_dirs`` (see the module docstring)."""
    runs = load_runs(results_dirs)
    return {name: build(runs) for name, build in TABLES.items()}


def importance_panels(importance: pd.DataFrame, *, module: str = "attn", metric: str = PRIMARY_METRIC):
    """Small multiples: per model, the importance heatmap (distribution × layer) on a relative-depth axis, each
    model's importance divided by its largest value on a shared log colour scale."""
    part = importance[(importance["module"] == module) & (importance["metric"] == metric)]
    if part.empty:
        raise InputError(f"no {metric} importance of {module} in the results")
    names = list(part["model"].unique())
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.1 + 1.5 * len(names)), sharex=True, squeeze=False,
                             layout="constrained")
    norm = LogNorm(vmin=1e-3, vmax=1)
    for ax, name in zip(axes[:, 0], names):
        one = part[part["model"] == name]
        matrix = one.pivot_table(index="distribution", columns="layer", values="importance", sort=False)
        n_layers = int(one["n_layers"].iloc[0])
        edges = (np.arange(n_layers + 1) - 0.5) / max(n_layers - 1, 1)
        mesh = ax.pcolormesh(edges, np.arange(len(matrix) + 1),
                             (matrix / matrix.to_numpy().max()).clip(lower=1e-3).to_numpy(),
                             norm=norm, cmap="viridis")
        ax.set_yticks(np.arange(len(matrix)) + 0.5, matrix.index)
        ax.set_title(f"{name} ({n_layers} layers)", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("relative depth (layer / (layers − 1))")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label=f"{metric} importance / model's largest (log)")
    fig.suptitle(f"{MODULE_NAMES[module].capitalize()} importance per model and distribution")
    return fig


def consensus_forest(comparisons: pd.DataFrame):
    """Forest plot of the consensus-vs-single advantage per model: the worst-case held-out perplexity ratio of
    the consensus set (a) to each distribution's own set (b) on the same windows, with its 95% CI (< 1: consensus
    better)."""
    rows = comparisons[
        (
            comparisons[
                "a_kind"] == "consensus") & (
                    comparisons["b_kind"] == "single") & (comparisons["distribution"] == "worst")]
    if rows.empty:
        raise InputError("no consensus-vs-single comparisons in the results (the runs have no held-out evaluation)")
    rows = rows.drop_duplicates(["model", "a", "b"]).reset_index(drop=True)
    labels = rows[
        "model"] + ": vs " + rows["b"].map(lambda label: parse_label(label)["method"].removeprefix("own:")) + " (k=" + \
        rows["b"].map(lambda label: str(parse_label(label)["k"])) + ")"
    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.4))
    colours = rows["model"].map(dict(zip(rows["model"].unique(),
                                         plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)))
    ax.errorbar(rows["ratio"], y, xerr=[rows["ratio"] - rows["ci_low"], rows["ci_high"] - rows["ratio"]], fmt="none",
                ecolor="grey")
    ax.scatter(rows["ratio"], y, c=list(colours), zorder=3)
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("worst-case held-out perplexity: consensus / single-distribution set (log; < 1 consensus better)")
    metrics = ", ".join(dict.fromkeys(parse_label(label)["metric"] for label in rows["a"]))
    ax.set_title(f"Consensus ({metrics} Borda) against each distribution's own set, paired 95% CI")
    fig.tight_layout()
    return fig


def write_summary(results_dirs, out) -> dict[str, list[Path]]:
    """Write every summary table (``summary_<name>.parquet`` + sidecar) and the figures into ``out``."""
    out = Path(out)
    runs = load_runs(results_dirs)
    tables = {name: build(runs) for name, build in TABLES.items()}
    record = provenance(kind="summary", results=[str(run.folder) for run in runs], models=[run.model for run in runs])
    written = {"tables": [write_table(frame, out / f"summary_{name}.parquet", {**record, "table": name})
                          for name, frame in tables.items() if len(frame)]}
    figures = save_figure(importance_panels(tables["importance"]), out / "figures" / "summary_importance_attn")
    if len(
        tables[
            "comparisons"]) and (
                (tables["comparisons"]["a_kind"] == "consensus") & (tables["comparisons"]["b_kind"] == "single")).any():
        figures += save_figure(consensus_forest(tables["comparisons"]), out / "figures" / "summary_consensus_vs_single")
    written["figures"] = figures
    return written
