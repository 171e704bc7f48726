"""The numeric core of the resampling statistics: token-weighted importances of weighted samples, bootstrap
replicates, row-wise Spearman ρ and Jaccard@k, and the percentile and basic bootstrap intervals."""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..importance.metrics import get_metric


def weighted_importance(weights: np.ndarray, sums: np.ndarray, tokens: np.ndarray, metric: str) -> np.ndarray:
    """``g((W @ stat_sum) / (W @ n_tokens))`` for sample-weight rows ``W (replicates, samples)``."""
    return get_metric(metric).importance((weights @ sums) / (weights @ tokens)[:, None])


def bootstrap_replicates(sums, tokens, n_boot: int, rng: np.random.Generator, metric: str) -> np.ndarray:
    """``(n_boot, candidates)`` importances of samples drawn with replacement, token-weighted."""
    n = len(tokens)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    return weighted_importance(counts, sums, tokens, metric)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ between matching rows of ``a`` and ``b`` (Pearson of average ranks)."""
    ra = stats.rankdata(a, axis=-1)
    rb = stats.rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))


def rowwise_jaccard(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Jaccard@k of the drop sets of matching rows."""
    sa = np.argsort(a, axis=-1, kind="stable")[:, :k]
    sb = np.argsort(b, axis=-1, kind="stable")[:, :k]
    inter = np.array([len(set(x) & set(y)) for x, y in zip(sa, sb)])
    return inter / (2 * k - inter)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    return tuple(np.nanpercentile(values, [tail, 100 - tail]))


def basic_interval(values: np.ndarray, point: float, level: float,
                   bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float]:
    """The basic (reverse-percentile) bootstrap interval ``[2 θ̂ - q_(1+level)/2, 2 θ̂ - q_(1-level)/2]`` of
    replicates ``values`` around the estimate ``point``, clipped to ``bounds`` (NaNs ignored).

    It corrects the bias the bootstrap sees (replicates below the estimate put the interval above it), which the
    percentile interval doubles: a ρ between two noisy rankings is attenuated, and its replicates, noisier still, are
    attenuated twice.  tests/test_resolution.py measures the coverage of a population ρ by simulation (percentile,
    BC and basic intervals side by side; the basic one is the only one near 95% where the rankings are noisy).
    """
    low, high = percentile_interval(values, level)
    return float(np.clip(2 * point - high, *bounds)), float(np.clip(2 * point - low, *bounds))
