"""Drop sets that hold across calibration distributions, and what each drop set costs where.

``I[m, d]`` is candidate m's importance under distribution d for one metric
(:func:`analysis.study.stability.importance_matrix`; ``metric=`` chooses it in tables of several).

* ``borda``: the k candidates of smallest mean rank (rank 1 = least important under d);
* ``median``: smallest median rank;
* ``mean``: smallest mean of per-distribution min-max normalised importance
  ``(I[m, d] - min_m I[., d]) / (max_m I[., d] - min_m I[., d])``;
* ``minimax``: the size-k set D minimising ``max_d regret(D, d)``, solved exactly as a mixed
  integer program (``scipy.optimize.milp``).

``regret(D, d) = sum_{m in D} I[m, d] - min_{|D'| = k} sum_{m in D'} I[m, d]``: the importance
dropped beyond the best size-k set for d (0 for d's own drop set).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import InputError
from ..presets import CONSENSUS_METHODS
from .tables import check_scores, drop_set, importance_matrix, metrics_in

METHODS = CONSENSUS_METHODS


def _ranks(matrix: pd.DataFrame) -> pd.DataFrame:
    return matrix.rank(axis=0, method="average")


def _smallest(score: pd.Series, k: int) -> list:
    return drop_set(score, k)


def minimax_set(matrix: pd.DataFrame, k: int) -> list:
    """The size-k set minimising the worst distribution's regret (exact MILP).

    Variables: ``x_m`` in {0, 1} and ``t``; minimise ``t`` subject to ``sum_m x_m = k`` and
    ``sum_m I[m, d] x_m - t <= best_d`` for every d.
    """
    values = matrix.to_numpy(dtype=float)
    n, n_dist = values.shape
    best = np.array([np.sort(values[:, d])[:k].sum() for d in range(n_dist)])
    cost = np.r_[np.zeros(n), 1.0]
    choose_k = LinearConstraint(np.r_[np.ones(n), 0.0][None, :], k, k)
    regret = LinearConstraint(np.hstack([values.T, -np.ones((n_dist, 1))]), -np.inf, best)
    result = milp(cost, constraints=[choose_k, regret], integrality=np.r_[np.ones(n), 0],
                  bounds=Bounds(np.r_[np.zeros(n), -np.inf], np.r_[np.ones(n), np.inf]))
    if not result.success:
        raise RuntimeError(f"the minimax integer program failed: {result.message}")
    chosen = np.flatnonzero(result.x[:n] > 0.5)
    return [matrix.index[i] for i in chosen]


def consensus_from_matrix(matrix: pd.DataFrame, k: int, method: str) -> list:
    """The consensus drop set of size k from a candidates × distributions importance matrix."""
    if method not in METHODS:
        raise InputError(f"unknown consensus method {method!r}; methods: {', '.join(METHODS)}")
    if not 1 <= k <= len(matrix):
        raise InputError(f"k={k} is outside 1..{len(matrix)}, the number of candidates")
    if method == "borda":
        return _smallest(_ranks(matrix).mean(axis=1), k)
    if method == "median":
        return _smallest(_ranks(matrix).median(axis=1), k)
    if method == "mean":
        spread = (matrix.max() - matrix.min()).replace(0, 1)
        return _smallest(((matrix - matrix.min()) / spread).mean(axis=1), k)
    return minimax_set(matrix, k)


def consensus_drop_set(scores: pd.DataFrame, *, module: str = "attn", k: int = 8, method: str = "borda",
                       metric: str | None = None) -> list:
    """Module indices (for ``joint``: ``"attn:i"``/``"mlp:i"``) to drop, agreed across distributions."""
    check_scores(scores)
    return consensus_from_matrix(importance_matrix(scores, module, metric), k, method)


def regret(matrix: pd.DataFrame, chosen: list, distribution: str) -> float:
    """Importance of ``chosen`` under ``distribution`` minus the best size-k set's."""
    column = matrix[distribution]
    return float(column.loc[chosen].sum() - np.sort(column.to_numpy())[: len(chosen)].sum())


def regret_table(scores: pd.DataFrame, drop_sets: dict[str, list], *, module: str = "attn",
                 metric: str | None = None) -> pd.DataFrame:
    """Every drop set × every distribution: dropped importance, best possible, regret.

    A row ``random`` per distribution gives the expected regret of a uniformly random size-k
    set, ``k * mean_m I[m, d] - best_d``.
    """
    check_scores(scores)
    matrix = importance_matrix(scores, module, metric)
    rows = []
    sizes = {len(chosen) for chosen in drop_sets.values()}
    for name, chosen in drop_sets.items():
        unknown = set(chosen) - set(matrix.index)
        if unknown:
            raise InputError(
                f"drop set {name!r} names candidates {sorted(unknown, key=str)} that are not {module} candidates")
        for d in matrix.columns:
            best = float(np.sort(matrix[d].to_numpy())[: len(chosen)].sum())
            rows.append({"drop_set": name, "distribution": d, "k": len(chosen),
                         "dropped_importance": float(matrix[d].loc[chosen].sum()),
                         "best_importance": best, "regret": regret(matrix, chosen, d)})
    for k in sorted(sizes):
        for d in matrix.columns:
            best = float(np.sort(matrix[d].to_numpy())[:k].sum())
            expected = float(k * matrix[d].mean())
            rows.append({"drop_set": "random", "distribution": d, "k": k, "dropped_importance": expected,
                         "best_importance": best,
                         "regret": expected - best})
    return pd.DataFrame(rows).assign(metric=metric or metrics_in(scores)[0], module=module)


def leave_one_out(scores: pd.DataFrame, *, module: str = "attn", k: int = 8, methods=METHODS,
                  metric: str | None = None) -> pd.DataFrame:
    """For each distribution d: consensus built without d, its regret on d, beside the regret on d
    of the other distributions' own sets (mean, best and worst) and of a random set (expected).
    """
    check_scores(scores)
    matrix = importance_matrix(scores, module, metric)
    if matrix.shape[1] < 3:
        raise InputError("leave-one-distribution-out needs at least three distributions")
    rows = []
    for held in matrix.columns:
        rest = matrix.drop(columns=held)
        singles = [regret(matrix, drop_set(rest[d], k), held) for d in rest.columns]
        base = {"held_out": held, "metric": metric or metrics_in(scores)[0], "module": module, "k": k,
                "single_mean_regret": float(np.mean(singles)),
                "single_best_regret": float(np.min(singles)), "single_worst_regret": float(np.max(singles)),
                "random_regret": float(k * matrix[held].mean() - np.sort(matrix[held].to_numpy())[:k].sum())}
        for method in methods:
            chosen = consensus_from_matrix(rest, k, method)
            rows.append({**base, "method": method, "consensus_regret": regret(matrix, chosen, held),
                         "drop_set": chosen})
    return pd.DataFrame(rows)


def leave_one_out_at_budgets(scores: pd.DataFrame, budgets: dict) -> pd.DataFrame:
    """:func:`leave_one_out` for every metric and module kind at its largest budget that fits its candidates.

    ``budgets`` maps a module kind to drop-set sizes; drop sets come back as string labels
    (``"3"``, ``"attn:3"``) so that the module kinds share one column type.
    """
    parts = []
    for metric in metrics_in(scores):
        for module, ks in budgets.items():
            k = max(v for v in ks if v <= len(importance_matrix(scores, module, metric)))
            parts.append(leave_one_out(scores, module=module, k=k, metric=metric))
    table = pd.concat(parts, ignore_index=True)
    return table.assign(drop_set=table["drop_set"].map(lambda chosen: [str(c) for c in chosen]))
