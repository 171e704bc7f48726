"""How much a module ranking moves between calibration distributions, and how much is noise.

Input: score tables from :func:`analysis.score_distributions` (per-sample rows with
``metric, distribution, sample, layer, module, stat_sum, n_tokens``) or aggregates
(``importance``).  Each function works on one metric (``metric=``; a table of one metric, or
without a ``metric`` column, needs none; a table without one is read as ``cosine``).
Candidates of a ranking: the layers of one module kind (``attn``, ``mlp``, ``block``), or for
``joint`` the 2L attention and MLP sublayers together, labelled ``attn:i`` / ``mlp:i``.
The size-k drop set under a distribution is its k least important candidates.

Importance of a set of samples ``s`` re-aggregates token-weighted through the metric's
``g`` (:mod:`analysis.importance.metrics`): ``g(sum_s stat_sum[s] / sum_s n_tokens[s])``, also inside
every bootstrap or permutation.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from ..errors import InputError
from .resampling import (
    basic_interval,
    bootstrap_replicates,
    percentile_interval,
    rowwise_jaccard,
    rowwise_spearman,
    weighted_importance,
)
from .tables import (  # noqa: F401
    _candidate_order,
    _check_k,
    _rows_of,
    candidate_labels,
    check_scores,
    drop_set,
    importance_matrix,
    jaccard,
    metrics_in,
    one_metric,
    tables_of_metric,
)


def pair_statistics(x: np.ndarray, y: np.ndarray, k_values: Sequence[int]) -> dict:
    """Spearman ρ, Kendall τ-b, weighted τ (least important weighted most) and Jaccard@k of two rankings."""
    out = {
        "spearman": stats.spearmanr(x, y).statistic,
        "kendall_tau_b": stats.kendalltau(x, y, variant="b").statistic,
        "weighted_tau": stats.weightedtau(-np.asarray(x), -np.asarray(y)).statistic,
    }
    for k in k_values:
        out[f"jaccard@{k}"] = jaccard(drop_set(x, k), drop_set(y, k))
    return out


def rank_agreement(scores: pd.DataFrame, *, module: str = "attn", k: Sequence[int] = (4, 8),
                   metric: str | None = None) -> pd.DataFrame:
    """One row per pair of distributions: Spearman ρ, Kendall τ-b, weighted τ, Jaccard@k of drop sets.

    Weighted τ is ``scipy.stats.weightedtau`` on negated importances, so the least important
    candidates (the drop candidates) weigh most.
    """
    check_scores(scores)
    scores, metric = one_metric(scores, metric)
    matrix = importance_matrix(scores, module)
    k_values = _check_k(k, len(matrix))
    rows = [
        {"metric": metric, "module": module, "a": a, "b": b,
         **pair_statistics(matrix[a].to_numpy(), matrix[b].to_numpy(), k_values)}
        for a, b in combinations(matrix.columns, 2)
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- resampling


class SampleArrays(dict):
    """Per distribution: ``stat_sum (samples, candidates)``, ``n_tokens (samples,)`` and candidate labels; ``.metric``
    names the metric."""

    metric: str


def sample_arrays(scores: pd.DataFrame, module: str, metric: str | None = None) -> SampleArrays:
    """Per distribution: ``stat_sum (samples, candidates)``, ``n_tokens (samples,)`` and candidate labels of one
    metric."""
    check_scores(scores, per_sample=True)
    scores, metric = one_metric(scores, metric)
    rows = _rows_of(scores, module)
    order = _candidate_order(rows)
    arrays = SampleArrays()
    arrays.metric = metric
    for name, part in rows.groupby("distribution", sort=False):
        sums = part.pivot(index="sample", columns="candidate", values="stat_sum")[order]
        tokens = part.groupby("sample")["n_tokens"].first().loc[sums.index]
        arrays[name] = (sums.to_numpy(), tokens.to_numpy(dtype=float), order)
    return arrays


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer (got {value!r})")


def bootstrap(
    scores: pd.DataFrame, *, module: str = "attn", k: Sequence[int] = (4, 8), n_boot: int = 1000, level: float = 0.95,
    seed: int = 0,
    metric: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Bootstrap over samples (token-weighted re-aggregation), seeded.

    Returns ``importance`` (per distribution and candidate: importance, CI, probability of
    being in the size-k drop set for each k) and ``pairs`` (per pair of distributions: the
    point Spearman ρ and Jaccard@k with their basic bootstrap CIs (:func:`basic_interval`); each distribution
    resampled independently) and ``pair_mean`` (their means over pairs, with the CI of the mean over pairs
    taken within each bootstrap replicate).
    """
    arrays = sample_arrays(scores, module, metric)
    k_values = _check_k(k, len(next(iter(arrays.values()))[2]))
    _check_count("n_boot", n_boot)
    rng = np.random.default_rng(seed)
    replicates, point = {}, {}
    rows = []
    for name, (sums, tokens, labels) in arrays.items():
        replicates[name] = bootstrap_replicates(sums, tokens, n_boot, rng, arrays.metric)
        point[name] = weighted_importance(np.ones((1, len(tokens))), sums, tokens, arrays.metric)[0]
        ranks = np.argsort(np.argsort(replicates[name], axis=1, kind="stable"), axis=1)
        for index, label in enumerate(labels):
            low, high = percentile_interval(replicates[name][:, index], level)
            row = {"metric": arrays.metric, "distribution": name, "candidate": label, "importance": point[name][index],
                   "ci_low": low, "ci_high": high}
            row.update({f"p_drop@{kk}": float((ranks[:, index] < kk).mean()) for kk in k_values})
            rows.append(row)
    pair_rows, pair_rhos, pair_jaccards = [], [], {kk: [] for kk in k_values}
    for a, b in combinations(arrays, 2):
        rho = rowwise_spearman(replicates[a], replicates[b])
        pair_rhos.append(rho)
        row = {"metric": arrays.metric, "module": module, "a": a, "b": b,
               "spearman": stats.spearmanr(point[a], point[b]).statistic}
        row["spearman_ci_low"], row["spearman_ci_high"] = basic_interval(rho, row["spearman"], level)
        for kk in k_values:
            row[f"jaccard@{kk}"] = jaccard(drop_set(point[a], kk), drop_set(point[b], kk))
            pair_jaccards[kk].append(rowwise_jaccard(replicates[a], replicates[b], kk))
            row[f"jaccard@{kk}_ci_low"], row[f"jaccard@{kk}_ci_high"] = basic_interval(
                pair_jaccards[kk][-1], row[f"jaccard@{kk}"], level, (0, 1))
        pair_rows.append(row)
    pairs = pd.DataFrame(pair_rows)
    mean_row = {"metric": arrays.metric, "module": module, "n_pairs": len(pair_rows),
                "spearman": pairs["spearman"].mean(),
                "spearman_min": pairs["spearman"].min()}
    mean_row["spearman_ci_low"], mean_row["spearman_ci_high"] = basic_interval(
        np.mean(pair_rhos, axis=0), mean_row["spearman"], level)
    for kk in k_values:
        mean_row[f"jaccard@{kk}"] = pairs[f"jaccard@{kk}"].mean()
        mean_row[f"jaccard@{kk}_ci_low"], mean_row[f"jaccard@{kk}_ci_high"] = basic_interval(
            np.mean(pair_jaccards[kk], axis=0), mean_row[f"jaccard@{kk}"], level, (0, 1))
    return {"importance": pd.DataFrame(rows).assign(module=module), "pairs": pairs,
            "pair_mean": pd.DataFrame([mean_row])}


def split_half_reliability(
    scores: pd.DataFrame, *, module: str = "attn", k: Sequence[int] = (4, 8), n_splits: int = 200, level: float = 0.95,
    seed: int = 0,
    metric: str | None = None,
) -> pd.DataFrame:
    """The noise floor per distribution: Spearman ρ between the rankings of random halves of its
    samples, Spearman-Brown corrected to full size (``2ρ / (1 + ρ)``), and Jaccard@k of the
    halves' drop sets (uncorrected, so a conservative floor); means and CIs over ``n_splits``.
    """
    arrays = sample_arrays(scores, module, metric)
    k_values = _check_k(k, len(next(iter(arrays.values()))[2]))
    rng = np.random.default_rng(seed)
    rows = []
    for name, (sums, tokens, _) in arrays.items():
        n = len(tokens)
        if n < 4:
            raise InputError(f"distribution {name!r} has {n} samples; split-half reliability needs at least 4")
        halves = np.zeros((n_splits, n))
        for row in halves:
            row[rng.permutation(n)[: n // 2]] = 1
        first = weighted_importance(halves, sums, tokens, arrays.metric)
        second = weighted_importance(1 - halves, sums, tokens, arrays.metric)
        rho = rowwise_spearman(first, second)
        corrected = 2 * rho / (1 + rho)
        out = {"metric": arrays.metric, "distribution": name, "module": module, "n_samples": n,
               "split_half_spearman": float(np.nanmean(rho)),
               "reliability": float(np.nanmean(corrected))}
        out["reliability_ci_low"], out["reliability_ci_high"] = percentile_interval(corrected, level)
        for kk in k_values:
            out[f"split_half_jaccard@{kk}"] = float(rowwise_jaccard(first, second, kk).mean())
        rows.append(out)
    return pd.DataFrame(rows)


def permutation_test(
    scores: pd.DataFrame, *, module: str = "attn", k: Sequence[int] = (4, 8), n_perm: int = 1000, seed: int = 0,
    metric: str | None = None
) -> pd.DataFrame:
    """Is the disagreement of two distributions larger than resampling noise?

    Per pair: the statistic is ``1 - ρ`` (and ``1 - Jaccard@k``) between the two rankings; the
    null shuffles the sample labels between the two distributions (group sizes kept).
    ``p = (1 + #{null >= observed}) / (1 + n_perm)``.
    """
    arrays = sample_arrays(scores, module, metric)
    k_values = _check_k(k, len(next(iter(arrays.values()))[2]))
    _check_count("n_perm", n_perm)
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in combinations(arrays, 2):
        sums = np.vstack([arrays[a][0], arrays[b][0]])
        tokens = np.concatenate([arrays[a][1], arrays[b][1]])
        n_a = len(arrays[a][1])
        labels = np.zeros((n_perm + 1, len(tokens)))
        labels[0, :n_a] = 1
        for row in labels[1:]:
            row[rng.permutation(len(tokens))[:n_a]] = 1
        first = weighted_importance(labels, sums, tokens, arrays.metric)
        second = weighted_importance(1 - labels, sums, tokens, arrays.metric)
        disagreement = 1 - rowwise_spearman(first, second)
        out = {"metric": arrays.metric, "module": module, "a": a, "b": b, "spearman": 1 - disagreement[0],
               "p_spearman": float((1 + (disagreement[1:] >= disagreement[0] - 1e-12).sum()) / (1 + n_perm))}
        for kk in k_values:
            distance = 1 - rowwise_jaccard(first, second, kk)
            out[f"p_jaccard@{kk}"] = float((1 + (distance[1:] >= distance[0] - 1e-12).sum()) / (1 + n_perm))
        rows.append(out)
    return pd.DataFrame(rows)


def convergence(
    scores: pd.DataFrame,
    *,
    module: str = "attn",
    k: int = 8,
    repeats: int = 20,
    target: float = 0.9,
    seed: int = 0,
    metric: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rankings from ``n`` samples against an independent reference: the paper's Figure 10 question.

    Each repeat splits the samples at random into halves A and B; the ranking from ``n`` samples of
    A (n = 4, 8, 16, ... and all of A) is compared with the ranking from all of B, which shares no
    sample with it, so agreement cannot reach 1 by construction.  Returns the curve (per
    distribution and n: mean and std over ``repeats`` of Spearman ρ and Jaccard@k against B) and
    per distribution ``n_required``, the smallest n whose mean ρ reaches ``target`` (NaN when even
    all of A does not), with ``n_required_label``: ``"≤ 4"`` when the smallest n tried already
    reaches it, ``"> |A|"`` when none does.
    """
    arrays = sample_arrays(scores, module, metric)
    _check_k((k,), len(next(iter(arrays.values()))[2]))
    rng = np.random.default_rng(seed)
    curve, summary = [], []
    for name, (sums, tokens, _) in arrays.items():
        n_total = len(tokens)
        half = n_total // 2
        if half < 2:
            raise InputError(f"convergence needs at least 4 samples of {name}, it has {n_total}")
        orders = np.stack([rng.permutation(n_total) for _ in range(repeats)])
        rows = np.arange(repeats)[:, None]
        reference_weights = np.zeros((repeats, n_total))
        reference_weights[rows, orders[:, half:]] = 1
        reference = weighted_importance(reference_weights, sums, tokens, arrays.metric)
        sizes = [n for n in 2 ** np.arange(2, 20) if n < half] + [half]
        reached = np.nan
        for n in sizes:
            weights = np.zeros((repeats, n_total))
            weights[rows, orders[:, :n]] = 1
            sub = weighted_importance(weights, sums, tokens, arrays.metric)
            rho = rowwise_spearman(sub, reference)
            jac = rowwise_jaccard(sub, reference, k)
            curve.append({"metric": arrays.metric, "distribution": name, "module": module, "n": int(n),
                          "reference_n": n_total - half,
                          "spearman_mean": rho.mean(), "spearman_std": rho.std(), f"jaccard@{k}_mean": jac.mean(),
                          f"jaccard@{k}_std": jac.std()})
            if np.isnan(reached) and rho.mean() >= target:
                reached = int(n)
        label = f"> {half}" if np.isnan(reached) else (f"≤ {sizes[0]}" if reached == sizes[0] else str(reached))
        summary.append({"metric": arrays.metric, "distribution": name, "module": module, "n_available": n_total,
                        "target_spearman": target,
                        "n_required": reached, "n_required_label": label})
    return pd.DataFrame(curve), pd.DataFrame(summary)


def stability_tables(
    scores: pd.DataFrame,
    *,
    modules: Sequence[str] = ("attn", "mlp", "block", "joint"),
    k: Sequence[int] = (4, 8),
    n_boot: int = 1000,
    n_perm: int = 1000,
    n_splits: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """Every stability table for every metric and module kind (a progress bar over them with ``progress``),
    concatenated (``metric`` and ``module`` columns tell them apart).

    Keys: ``agreement``, ``bootstrap_importance``, ``bootstrap_pairs``, ``bootstrap_pair_mean``, ``split_half``,
    ``permutation``, ``convergence``, ``convergence_summary``.
    """
    parts: dict[str, list[pd.DataFrame]] = {}
    combos = [(metric, module) for metric in metrics_in(scores) for module in modules]
    for metric, module in tqdm(combos, desc="bootstrap, split-half, permutation", unit="table", disable=not progress):
        n_candidates = len(importance_matrix(scores, module, metric))
        k_values = tuple(kk for kk in k if kk <= n_candidates)
        if not k_values:
            raise InputError(
                f"{module} has {n_candidates} candidates, fewer than every drop-set size asked "
                f"({', '.join(map(str, k))}): "
                             "choose smaller budgets for this model")
        options = dict(module=module, seed=seed, metric=metric)
        boot = bootstrap(scores, k=k_values, n_boot=n_boot, **options)
        curve, summary = convergence(scores, k=max(k_values), **options)
        tables = {
            "agreement": rank_agreement(scores, module=module, k=k_values, metric=metric),
            "bootstrap_importance": boot["importance"],
            "bootstrap_pairs": boot["pairs"],
            "bootstrap_pair_mean": boot["pair_mean"],
            "split_half": split_half_reliability(scores, k=k_values, n_splits=n_splits, **options),
            "permutation": permutation_test(scores, k=k_values, n_perm=n_perm, **options),
            "convergence": curve,
            "convergence_summary": summary,
        }
        for name, table in tables.items():
            parts.setdefault(name, []).append(table)
    combined = {name: pd.concat(tables, ignore_index=True) for name, tables in parts.items()}
    combined["bootstrap_importance"]["candidate"] = combined["bootstrap_importance"]["candidate"].astype(str)
    return combined


def least_and_most_important(aggregate: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """Per metric and module kind of an aggregate table (one importance per module, or per distribution and
    module averaged over distributions): the ``n`` least and the ``n`` most important candidates, in order."""
    rows = []
    for (metric, module), group in aggregate.groupby(["metric", "module"], sort=False):
        ranked = group.groupby("layer", sort=False)["importance"].mean().sort_values(kind="stable")
        rows.append({"metric": metric, "module": module, "least important": ", ".join(map(str, ranked.index[:n])),
                     "most important": ", ".join(map(str, ranked.index[::-1][:n]))})
    return pd.DataFrame(rows)
