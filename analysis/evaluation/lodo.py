"""Leave one distribution out on real held-out loss: each procedure's set built without d, on d's held-out windows.

The sets come from :func:`analysis.study.lodo.lodo_sets`.  A set is known by its members
(:func:`analysis.study.lodo.set_key`): one already evaluated on a distribution by the held-out stage is read from its
windows, never evaluated again (:func:`missing_pairs`).  Two procedures choose on held-out loss, among sets built
without d and judged on the held-out windows of the other distributions only (``variant = without``; every
distribution's for ``with``):

* ``best own set``: the own set (``<metric> own:<d'>``) of lowest worst-case ratio there;
* ``pick best``: every set of the study for d (procedures and single-distribution candidates) of lowest worst-case
  ratio there.

Each chosen set's windows on d are relabelled ``<procedure>/<module>-<k>:<variant>`` so that
:func:`analysis.evaluation.heldout.transfer_summary` gives its ratio on every d, the mean and the worst over the
left-out distributions, and :func:`analysis.evaluation.heldout.paired_comparisons` pairs procedures over the same
windows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..study.dropsets import UNPRUNED, make_drop_set
from ..presets import PRIMARY_METRIC
from ..study.lodo import WITH, WITHOUT, baseline, set_key
from .heldout import paired_comparisons, transfer_summary, window_nll

SELECTIONS = ("best own set", "pick best")


def known_windows(heldout_windows: pd.DataFrame, pruned: pd.DataFrame, n_windows: int) -> pd.DataFrame:
    """The held-out stage's window NLL on the first ``n_windows`` windows of each distribution keyed by set members
    (``key``; ``none``: unpruned), one set per key, only the sets that have every one of those windows (a sequential
    evaluation stops some sets earlier)."""
    keys = {
        row.drop_set: UNPRUNED if row.drop_set == UNPRUNED else set_key(row.module, row.indices)
        for row in pruned.itertuples()
    }
    frame = heldout_windows[heldout_windows["window"] < n_windows]
    counts = frame.groupby("drop_set")["window"].transform("size")
    complete = counts == n_windows * frame["distribution"].nunique()
    frame = frame[complete].assign(key=frame.loc[complete, "drop_set"].map(keys))
    first = frame.drop_duplicates("key")[["key", "drop_set"]]
    return frame.merge(first, on=["key", "drop_set"])[["key", "distribution", "window", "nll_sum", "n_tokens"]]


def missing_pairs(sets: pd.DataFrame, known: pd.DataFrame, distributions) -> dict[str, dict]:
    """Per calibration distribution, the sets of ``sets`` (by key, as :class:`DropSet`) not yet evaluated on its
    windows: every set on every distribution (on d itself to evaluate it, on the others to judge it)."""
    done = set(zip(known["key"], known["distribution"]))
    unique = sets.drop_duplicates("key")
    return {
        name: {
            row.key: make_drop_set(row.module, row.indices, "lodo", row.metric)
            for row in unique.itertuples()
            if (row.key, name) not in done
        }
        for name in distributions
    }


def new_windows(model, samples: dict, missing: dict, *, batch_size: int = 4) -> pd.DataFrame:
    """Window NLL of the ``missing`` sets of one or more distributions (:func:`window_nll`), keyed by set members."""
    parts = [
        window_nll(model, {name: samples[name]}, sets, batch_size=batch_size).rename(columns={"drop_set": "key"})
        for name, sets in missing.items()
        if sets
    ]
    empty = pd.DataFrame(
        {
            "key": [],
            "distribution": [],
            "window": pd.Series(dtype=int),
            "nll_sum": pd.Series(dtype=float),
            "n_tokens": pd.Series(dtype=int),
        }
    )
    return pd.concat(parts, ignore_index=True) if parts else empty


def ratios(windows: pd.DataFrame) -> pd.Series:
    """``exp((sum_w nll_set[w] - sum_w nll_none[w]) / sum_w n_tokens[w])`` by (key, distribution)."""
    totals = windows.groupby(["key", "distribution"])[["nll_sum", "n_tokens"]].sum()
    base = totals.xs(UNPRUNED, level="key")
    delta = totals["nll_sum"] - base["nll_sum"].reindex(totals.index, level="distribution")
    return np.exp(delta / base["n_tokens"].reindex(totals.index, level="distribution"))


def choices(sets: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """The set each procedure uses for each left-out d and variant: the procedure rows as built, and the two selections
    (:data:`SELECTIONS`) with the distributions they were judged on and the worst ratio there.
    Columns: ``held_out, variant, procedure, key, module, k, metric, indices, judged_on, judged_worst, note``."""
    ratio = ratios(windows)
    names = list(sets["held_out"].unique())
    rows = []
    for (held_out, variant), part in sets.groupby(["held_out", "variant"], sort=False):
        judged = [d for d in names if variant == WITH or d != held_out]
        worst = {key: max(ratio[(key, d)] for d in judged) for key in part["key"]}
        for row in part[part["role"] == "procedure"].itertuples():
            rows.append({**row._asdict(), "procedure": row.name, "judged_on": "", "judged_worst": np.nan})
        for procedure, pool in zip(SELECTIONS, (part[part["name"].str.contains(" own:")], part)):
            best = pool.loc[pool["key"].map(worst).idxmin()]
            rows.append(
                {
                    **best.to_dict(),
                    "procedure": procedure,
                    "judged_on": ", ".join(judged),
                    "judged_worst": worst[best["key"]],
                    "note": f"{best['name']} ({best['note']})" if best["note"] else best["name"],
                }
            )
    columns = [
        "held_out",
        "variant",
        "procedure",
        "key",
        "module",
        "k",
        "metric",
        "indices",
        "judged_on",
        "judged_worst",
        "note",
    ]
    return pd.DataFrame(rows)[columns]


def label(procedure: str, module: str, k: int, variant: str) -> str:
    """``<procedure>/<module>-<k>:<variant>``: a label :func:`~analysis.study.dropsets.parse_label` reads."""
    return f"{procedure}/{module}-{k}:{variant}"


def relabelled(chosen: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """Window rows of every chosen set on its left-out distribution, labelled by procedure and variant (:func:`label`),
    and the unpruned model's rows of the same windows: the table :func:`transfer_summary` and
    :func:`paired_comparisons` read.
    """
    base = windows[(windows["key"] == UNPRUNED) & windows["distribution"].isin(chosen["held_out"])].assign(
        drop_set=UNPRUNED
    )
    keyed = windows.set_index(["key", "distribution"]).sort_index()
    parts = [base] + [
        keyed.loc[(row.key, row.held_out)]
        .reset_index()
        .assign(drop_set=label(row.procedure, row.module, row.k, row.variant))
        for row in chosen.itertuples()
    ]
    return pd.concat(parts, ignore_index=True)[["drop_set", "distribution", "window", "nll_sum", "n_tokens"]]


def lodo_pairs(chosen: pd.DataFrame, metric: str = PRIMARY_METRIC) -> list[tuple[str, str, str]]:
    """Every procedure built without d against ``metric``'s borda set built without d (:func:`baseline`), and against
    itself built with d."""
    first, base = chosen.iloc[0], baseline(metric)
    procedures = list(chosen["procedure"].unique())
    without = {p: label(p, first["module"], first["k"], WITHOUT) for p in procedures}
    pairs = [
        (f"{p} vs {base}", without[p], without[base])
        for p in procedures
        if p != base and base in without
    ]
    return pairs + [
        (f"{p}: without vs with", without[p], label(p, first["module"], first["k"], WITH)) for p in procedures
    ]


BEST = "lowest mean"


def best_pairs(chosen: pd.DataFrame, summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The procedure of lowest mean ratio over the left-out distributions (built without d) against every other
    procedure built without d, named ``lowest mean: <best> vs <other>``: whether the best is separated from each."""
    without = summary[(summary["variant"] == WITHOUT) & (summary["distribution"] == "mean")]
    if not len(without):
        return []
    best = without.sort_values("ppl_ratio", kind="stable")["procedure"].iloc[0]
    first = chosen.iloc[0]
    procedures = list(chosen["procedure"].unique())
    return [
        (f"{BEST}: {best} vs {p}", label(best, first["module"], first["k"], WITHOUT),
         label(p, first["module"], first["k"], WITHOUT))
        for p in procedures
        if p != best
    ]


def lodo_tables(
    sets: pd.DataFrame, windows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, metric: str = PRIMARY_METRIC
) -> dict[str, pd.DataFrame]:
    """``lodo_choices`` (:func:`choices`), ``lodo`` (each procedure's perplexity ratio on every left-out d, their
    ``mean`` and ``worst``, with bootstrap CIs over windows; columns of :func:`transfer_summary` with ``procedure`` and
    ``variant``) and
    ``lodo_paired`` (:func:`lodo_pairs` against ``metric``'s borda and :func:`best_pairs`, paired over d's windows,
    per d, mean and worst)."""
    windows = windows.astype({"window": int, "nll_sum": float, "n_tokens": int})
    chosen = choices(sets, windows)
    table = relabelled(chosen, windows)
    summary = transfer_summary(table, n_boot=n_boot, seed=seed).rename(
        columns={"metric": "procedure", "method": "variant"}
    )
    pairs = lodo_pairs(chosen, metric) + best_pairs(chosen, summary)
    paired = paired_comparisons(table, pairs, n_boot=n_boot, seed=seed)
    return {"lodo_choices": chosen, "lodo": summary, "lodo_paired": paired}
