"""Score tables as the study reads them: checked, one metric at a time, as an importance matrix (candidates x
distributions) and as the size-k drop set of a ranking.

Candidates of a ranking: the layers of one module kind (``attn``, ``mlp``, ``block``), or for ``joint`` the 2L
attention and MLP sublayers together, labelled ``attn:i`` / ``mlp:i``.  A table without a ``metric`` column is
read as the default primary metric's."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..importance.metrics import get_metric, importance_from_sums
from ..presets import MODULE_KINDS, PRIMARY_METRIC


def check_scores(scores: pd.DataFrame, *, per_sample: bool = False) -> None:
    """Raise a clear error unless ``scores`` is one model's table over two or more distributions."""
    need = {"distribution", "layer", "module"} | ({"sample", "stat_sum", "n_tokens"} if per_sample else set())
    missing = need - set(scores.columns)
    if missing:
        kind = "per-sample score rows (score_distributions or `calibdrop score`)" if per_sample else "a score table"
        raise InputError(f"expected {kind}; missing columns: {', '.join(sorted(missing))}")
    if "model" in scores.columns and scores["model"].nunique() > 1:
        raise InputError(
            f"the table mixes models {sorted(scores['model'].unique())}: compare one model's scores at a time")
    settings = scores.attrs.get("settings_by_distribution")
    if settings and len({repr(s) for s in settings.values()}) > 1:
        raise InputError(f"the distributions were scored with different settings: {settings}")
    if scores["distribution"].nunique() < 2:
        raise InputError("stability needs scores of at least two distributions; score more with --distributions")


def metrics_in(scores: pd.DataFrame) -> list[str]:
    """The metrics of a score table, in order of appearance (``["cosine"]`` for a table without a ``metric`` column)."""
    return list(scores["metric"].unique()) if "metric" in scores.columns else [PRIMARY_METRIC]


def one_metric(scores: pd.DataFrame, metric: str | None = None) -> tuple[pd.DataFrame, str]:
    """The rows of one metric and its name; ``metric=None`` is allowed when the table holds only one."""
    present = metrics_in(scores)
    if metric is None:
        if len(present) > 1:
            raise InputError(f"the table holds metrics {', '.join(present)}: choose one with metric=...")
        metric = present[0]
    get_metric(metric)
    if metric not in present:
        raise InputError(f"the table has no {metric!r} scores; it holds {', '.join(present)}")
    return (scores[scores["metric"] == metric] if "metric" in scores.columns else scores), metric


def tables_of_metric(tables: dict[str, pd.DataFrame], metric: str) -> dict[str, pd.DataFrame]:
    """Each table restricted to one importance metric (tables without a ``metric`` column, and the
    accuracy table, whose ``metric`` is acc/acc_norm, are kept whole)."""
    return {name: (table[table["metric"] == metric] if "metric" in table.columns and name != "accuracy" else table)
            for name, table in tables.items()}


def candidate_labels(frame: pd.DataFrame, module: str) -> pd.Series:
    """Candidate id of each row: the layer (int) for attn/mlp/block, ``"attn:i"``/``"mlp:i"`` for joint."""
    if module == "joint":
        return frame["module"] + ":" + frame["layer"].astype(str)
    return frame["layer"]


def _rows_of(scores: pd.DataFrame, module: str) -> pd.DataFrame:
    if module not in MODULE_KINDS:
        raise InputError(f"module must be one of {', '.join(MODULE_KINDS)}, not {module!r}")
    kinds = ("attn", "mlp") if module == "joint" else (module,)
    rows = scores[scores["module"].isin(kinds)]
    return rows.assign(candidate=candidate_labels(rows, module))


def _candidate_order(rows: pd.DataFrame) -> list:
    kind = rows["module"].map({"attn": 0, "mlp": 1, "block": 2})
    return list(rows.assign(kind=kind).sort_values(["kind", "layer"], kind="stable")["candidate"].unique())


def importance_matrix(scores: pd.DataFrame, module: str = "attn", metric: str | None = None) -> pd.DataFrame:
    """Candidates × distributions of one metric's importance (token-weighted over samples for per-sample rows)."""
    scores, metric = one_metric(scores, metric)
    rows = _rows_of(scores, module)
    if "stat_sum" in rows.columns and "sample" in rows.columns:
        sums = rows.groupby(["distribution", "candidate"], sort=False)[["stat_sum", "n_tokens"]].sum()
        values = pd.Series(importance_from_sums(metric, sums["stat_sum"], sums["n_tokens"]), index=sums.index,
                           name="importance").reset_index()
    else:
        values = rows[["distribution", "candidate", "importance"]]
    matrix = values.pivot(index="candidate", columns="distribution", values="importance")
    order = _candidate_order(rows)
    return matrix.loc[order, list(rows["distribution"].unique())]


def drop_set(importance: pd.Series | np.ndarray, k: int, labels: Sequence | None = None) -> list:
    """The ``k`` least important candidates (ties broken by candidate order)."""
    values = np.asarray(importance, dtype=float)
    labels = list(importance.index) if labels is None and isinstance(importance, pd.Series) else labels
    if not 1 <= k <= len(values):
        raise InputError(f"k={k} is outside 1..{len(values)}, the number of candidates")
    chosen = np.argsort(values, kind="stable")[:k]
    return [labels[i] for i in chosen] if labels is not None else sorted(chosen.tolist())


def jaccard(a, b) -> float:
    """``|A ∩ B| / |A ∪ B|``."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def _check_k(k_values: Sequence[int], n: int) -> tuple[int, ...]:
    k_values = (k_values,) if isinstance(k_values, (int, np.integer)) else tuple(k_values)
    for k in k_values:
        if not 1 <= k <= n:
            raise InputError(f"k={k} is outside 1..{n}, the number of candidates")
    return k_values
