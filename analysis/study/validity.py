"""Is a ranking a property of the metric?  Proxies judged against the ablation ground truth.

* :func:`metric_validity`: per distribution, module kind and proxy metric, Spearman ρ and Kendall
  τ-b between the proxy's ranking and the ablation ranking (the increase in NLL when each module
  alone is dropped), with bootstrap CIs (the proxy's and the ablation's samples each resampled).
* :func:`ranking_decomposition`: agreement across distributions within a metric against agreement
  across metrics within a distribution.  ``1 - mean ρ`` of each is the part of the ranking's
  variation that comes from the data and from the metric.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..importance.metrics import GROUND_TRUTH, get_metric
from .stability import (
    bootstrap_replicates,
    importance_matrix,
    metrics_in,
    percentile_interval,
    rowwise_spearman,
    sample_arrays,
)


def rowwise_kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall τ-b between matching rows of ``a`` and ``b``, all rows at once.

    ``τ_b = S / sqrt(n_a) / sqrt(n_b)`` with ``S = sum_{i<j} sgn(a_i - a_j) sgn(b_i - b_j)`` and ``n_a``, ``n_b`` the
    pairs not tied in ``a``, in ``b`` (NaN when a row is constant), as ``scipy.stats.kendalltau(variant="b")``.
    """
    sign_a = np.sign(a[:, :, None] - a[:, None, :])
    sign_b = np.sign(b[:, :, None] - b[:, None, :])
    concordance = (sign_a * sign_b).sum(axis=(1, 2)) / 2
    untied_a, untied_b = np.abs(sign_a).sum(axis=(1, 2)) / 2, np.abs(sign_b).sum(axis=(1, 2)) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return concordance / np.sqrt(untied_a) / np.sqrt(untied_b)



def proxies_in(scores: pd.DataFrame) -> list[str]:
    """The proxy metrics of a score table (every metric but the ground truth)."""
    return [m for m in metrics_in(scores) if get_metric(m).is_proxy]


def metric_validity(scores: pd.DataFrame, *, modules: Sequence[str] = ("attn", "mlp", "block", "joint"), n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per distribution, module kind and proxy: ρ and τ-b of the proxy's ranking against the ablation's, with CIs.

    Columns: ``distribution, module, metric, spearman, spearman_ci_low, spearman_ci_high,
    kendall, kendall_ci_low, kendall_ci_high``.  Needs per-sample rows with ``ablation``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for module in modules:
        truth = sample_arrays(scores, module, GROUND_TRUTH)
        truth_boot = {d: bootstrap_replicates(s, t, n_boot, rng, GROUND_TRUTH) for d, (s, t, _) in truth.items()}
        truth_point = importance_matrix(scores, module, GROUND_TRUTH)
        for metric in proxies_in(scores):
            proxy = sample_arrays(scores, module, metric)
            point = importance_matrix(scores, module, metric)
            for d in truth:
                replicates = bootstrap_replicates(proxy[d][0], proxy[d][1], n_boot, rng, metric)
                rho = rowwise_spearman(replicates, truth_boot[d])
                tau = rowwise_kendall(replicates, truth_boot[d])
                row = {"distribution": d, "module": module, "metric": metric,
                       "spearman": stats.spearmanr(point[d], truth_point[d]).statistic,
                       "kendall": stats.kendalltau(point[d], truth_point[d], variant="b").statistic}
                row["spearman_ci_low"], row["spearman_ci_high"] = percentile_interval(rho, level)
                row["kendall_ci_low"], row["kendall_ci_high"] = percentile_interval(tau, level)
                rows.append(row)
    return pd.DataFrame(rows)


def ranking_decomposition(scores: pd.DataFrame, *, modules: Sequence[str] = ("attn", "mlp", "block", "joint")) -> pd.DataFrame:
    """Mean and minimum Spearman ρ between rankings that differ in one axis only.

    ``axis = "distribution"``: pairs of distributions under one metric (``held`` names the
    metric); ``axis = "metric"``: pairs of metrics (ablation included) on one distribution
    (``held`` names the distribution).  Columns: ``module, axis, held, mean_spearman,
    min_spearman, n_pairs``.
    """
    rows = []
    metrics = metrics_in(scores)
    for module in modules:
        matrices = {m: importance_matrix(scores, module, m) for m in metrics}
        distributions = list(next(iter(matrices.values())).columns)
        for metric, matrix in matrices.items():
            rhos = [stats.spearmanr(matrix[a], matrix[b]).statistic for a, b in combinations(distributions, 2)]
            rows.append({"module": module, "axis": "distribution", "held": metric, "mean_spearman": float(np.mean(rhos)),
                         "min_spearman": float(np.min(rhos)), "n_pairs": len(rhos)})
        for d in distributions:
            rhos = [stats.spearmanr(matrices[a][d], matrices[b][d]).statistic for a, b in combinations(metrics, 2)]
            if rhos:
                rows.append({"module": module, "axis": "metric", "held": d, "mean_spearman": float(np.mean(rhos)),
                             "min_spearman": float(np.min(rhos)), "n_pairs": len(rhos)})
    return pd.DataFrame(rows)
