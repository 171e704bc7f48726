"""Is a ranking a property of the metric?  Proxies judged against the ablation ground truth.

* :func:`metric_validity`: per distribution, module kind and proxy metric, Spearman ρ and Kendall
  τ-b between the proxy's ranking and the ablation ranking (the increase in NLL when each module
  alone is dropped), with basic bootstrap CIs (the proxy's and the ablation's samples each resampled;
  :func:`~analysis.study.stability.basic_interval`).
* :func:`ranking_decomposition`: agreement across distributions within a metric, across proxies within a
  distribution, and of each proxy with the ground truth (apart), raw and corrected for attenuation.
* :func:`data_or_metric`: across distributions against across proxies, with a bootstrap CI of the difference.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..importance.metrics import GROUND_TRUTH, get_metric
from .resolution import disattenuate
from .stability import basic_interval, bootstrap_replicates, rowwise_spearman, sample_arrays, weighted_importance
from .tables import importance_matrix, metrics_in


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


def metric_validity(scores: pd.DataFrame, *, modules: Sequence[str] = ("attn", "mlp", "block", "joint"),
                    n_boot: int = 1000,
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
                row["spearman_ci_low"], row["spearman_ci_high"] = basic_interval(rho, row["spearman"], level)
                row["kendall_ci_low"], row["kendall_ci_high"] = basic_interval(tau, row["kendall"], level)
                rows.append(row)
    return pd.DataFrame(rows)


def _reliability_of(reliability: pd.DataFrame | None, module: str):
    """``(metric, distribution) -> split-half reliability`` of one module kind (NaN where the table lacks it)."""
    if reliability is None or not len(reliability):
        return lambda metric, d: np.nan
    table = reliability[reliability["module"] == module].set_index(["metric", "distribution"])["reliability"]
    return lambda metric, d: float(table.get((metric, d), np.nan))


def ranking_decomposition(scores: pd.DataFrame, *, modules: Sequence[str] = ("attn", "mlp", "block", "joint"),
                          reliability: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean and minimum Spearman ρ between rankings that differ in one axis only, the ground truth apart.

    ``axis = "distribution"``: pairs of distributions under one metric (``held`` names the metric, the ground
    truth included); ``axis = "metric"``: pairs of *proxies* on one distribution (``held`` names it), so the ground
    truth's noise is not counted as metric disagreement; ``axis = "ground truth"``: each proxy against the ablation
    on one distribution.  ``mean_corrected`` is the mean of each pair's ρ corrected for attenuation,
    ``ρ / sqrt(rel_a rel_b)`` (Spearman's correction; ``rel`` the Spearman-Brown stepped-up split-half reliability of
    that metric on that distribution, from ``reliability``, the ``split_half`` table; NaN without it).  Columns:
    ``module, axis, held, mean_spearman, min_spearman, mean_corrected, n_pairs``.
    """
    rows = []
    metrics = metrics_in(scores)
    proxies = [m for m in metrics if get_metric(m).is_proxy]

    def row(module, axis, held, pairs):
        rhos = np.array([rho for rho, _ in pairs])
        return {"module": module, "axis": axis, "held": held, "mean_spearman": float(rhos.mean()),
                "min_spearman": float(rhos.min()), "mean_corrected": float(np.mean([c for _, c in pairs])),
                "n_pairs": len(pairs)}

    for module in modules:
        rel = _reliability_of(reliability, module)
        matrices = {m: importance_matrix(scores, module, m) for m in metrics}
        distributions = list(next(iter(matrices.values())).columns)

        def pair(a, b, da, db):
            rho = stats.spearmanr(matrices[a][da], matrices[b][db]).statistic
            return rho, float(disattenuate(rho, rel(a, da), rel(b, db)))

        for metric in metrics:
            pairs = [pair(metric, metric, a, b) for a, b in combinations(distributions, 2)]
            rows.append(row(module, "distribution", metric, pairs))
        for d in distributions:
            if len(proxies) > 1:
                rows.append(row(module, "metric", d, [pair(a, b, d, d) for a, b in combinations(proxies, 2)]))
            if GROUND_TRUTH in matrices and proxies:
                rows.append(row(module, "ground truth", d, [pair(m, GROUND_TRUTH, d, d) for m in proxies]))
    return pd.DataFrame(rows)


def data_or_metric(scores: pd.DataFrame, *, modules: Sequence[str] = ("attn", "mlp", "block", "joint"),
                   n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Does the data or the metric move the ranking more?  Proxies only, so the ground truth's noise plays no part.

    Per module kind: ``across_distributions``, the mean ρ over every proxy and pair of distributions, and
    ``across_metrics``, the mean ρ over every distribution and pair of proxies; ``difference = across_metrics -
    across_distributions`` (positive: rankings differ more between distributions, the data moves the ranking more)
    with its basic bootstrap CI and ``se`` (the samples of each distribution resampled, the same draw for every
    proxy, since the proxies score the same samples).  ``n_samples``: the smallest number of samples of a
    distribution.  Empty with fewer than two proxies.
    """
    proxies = proxies_in(scores)
    if len(proxies) < 2:
        return pd.DataFrame()
    rng = np.random.default_rng(seed)
    rows = []
    for module in modules:
        arrays = {m: sample_arrays(scores, module, m) for m in proxies}
        distributions = list(arrays[proxies[0]])
        values = {}
        for d in distributions:
            n = len(arrays[proxies[0]][d][1])
            weights = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=n_boot)])
            for m in proxies:
                sums, tokens, _ = arrays[m][d]
                values[m, d] = weighted_importance(weights, sums, tokens, m)
        across_d = np.mean([rowwise_spearman(values[m, a], values[m, b])
                            for m in proxies for a, b in combinations(distributions, 2)], axis=0)
        across_m = np.mean([rowwise_spearman(values[a, d], values[b, d])
                            for d in distributions for a, b in combinations(proxies, 2)], axis=0)
        difference = across_m - across_d
        low, high = basic_interval(difference[1:], difference[0], level, (-2, 2))
        rows.append({"module": module, "across_distributions": across_d[0], "across_metrics": across_m[0],
                     "difference": difference[0], "ci_low": low, "ci_high": high,
                     "se": float(np.std(difference[1:], ddof=1)),
                     "n_samples": min(len(arrays[proxies[0]][d][1]) for d in distributions), "n_proxies": len(proxies),
                     "n_distributions": len(distributions)})
    return pd.DataFrame(rows)
