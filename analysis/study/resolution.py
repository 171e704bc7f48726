"""What a run resolves: the rules that mark each headline claim resolved or not, and what would resolve it.

Small pure functions over the run's tidy tables, so a report can be re-rendered from tables alone.

* **Beyond resampling noise** (one definition, used by the report and ``calibdrop summary``): two rankings
  differ beyond resampling noise when the upper end of the 95% bootstrap CI of their Spearman ρ lies below
  their *noise ceiling* ``sqrt(rel_a rel_b)``, the ρ two independent samples of one population would reach
  (``rel``: the split-half reliability, Spearman-Brown stepped up to full size; :func:`noise_ceiling`).  In
  other words their ρ corrected for attenuation, ``ρ / sqrt(rel_a rel_b)`` (Spearman's correction), is below 1
  with 95% confidence.  The same rule applies to Jaccard@k against the split-half Jaccard@k floors.
* **Separated** (paired comparisons on the same held-out windows): the 95% paired bootstrap CI of the
  perplexity ratio ``a / b`` excludes 1.  These are claims about *procedures* (consensus against a distribution's
  own set, greedy by real loss against a consensus).  Which *members* to drop is a different claim, with its own
  rules (:mod:`analysis.study.recommend`: member sets on their held-out loss, the family-wise error of choosing the
  best of many controlled, equivalence within a margin).
* **Procedures built from an unstable ground truth**: a set chosen from the ablation ground truth (its metric)
  changes when the ground-truth windows are resampled unless the ground truth is reliable, so a paired comparison
  naming such a set is resolved only when the ground truth's split-half reliability for that module kind reaches
  :data:`RELIABLE` on every distribution (:func:`truth_reliability`); else the ground-truth tokens that would get it
  there.  A recommendation of members is never blocked by it: its evidence is the held-out loss of those members,
  whatever built them.
* **What would resolve it**: held-out windows per distribution for a paired comparison (:func:`windows_needed`,
  from the observed effect and its bootstrap standard error, as the accuracy section sizes items for McNemar);
  ground-truth tokens per distribution for a claim that rests on the ablation ranking
  (:func:`tokens_for_reliability`, the Spearman-Brown prophecy to a reliability of :data:`RELIABLE`); calibration
  samples per distribution for a claim about rankings of the proxies (:func:`samples_needed`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import InputError
from ..importance.metrics import GROUND_TRUTH
from ..presets import PRIMARY_METRIC
from . import recommend
from .dropsets import UNPRUNED, method_family, parse_label

ALPHA = 0.05
POWER = 0.8
RELIABLE = 0.95
CLAIM_COLUMNS = ["claim", "module", "k", "subject", "status", "finding", "estimate", "ci_low", "ci_high", "resolved",
                 "needs", "windows_needed", "tokens_needed", "samples_needed"]
WINDOWS = "held-out windows per distribution"


def noise_ceiling(floor_a, floor_b):
    """``sqrt(floor_a floor_b)``: the agreement two independent samples reach when the populations agree perfectly
    (for ρ the attenuation bound of Spearman's correction, ``floor`` being the stepped-up split-half reliability);
    NaN where a floor is not positive, so nothing is beyond it."""
    product = np.asarray(floor_a, dtype=float) * np.asarray(floor_b, dtype=float)
    return np.sqrt(np.where(product > 0, product, np.nan))


def beyond_noise(ci_high, floor_a, floor_b):
    """The one definition of "beyond resampling noise": the CI's upper end is below :func:`noise_ceiling`."""
    return np.asarray(ci_high, dtype=float) < noise_ceiling(floor_a, floor_b)


def disattenuate(rho, rel_a, rel_b):
    """Spearman's correction for attenuation: ``ρ / sqrt(rel_a rel_b)``."""
    return np.asarray(rho, dtype=float) / noise_ceiling(rel_a, rel_b)


def tokens_for_reliability(reliability: float, tokens: float, target: float = RELIABLE) -> float:
    """Tokens a measurement of reliability ``reliability`` on ``tokens`` tokens needs to reach ``target``, by the
    Spearman-Brown prophecy ``m = target (1 - r) / (r (1 - target))`` (``tokens`` itself once it reaches it; NaN for
    ``r <= 0``, where no amount is predicted to)."""
    if not reliability > 0:
        return math.nan
    if reliability >= target:
        return float(tokens)
    return float(math.ceil(tokens * target * (1 - reliability) / (reliability * (1 - target))))


def scale_needed(effect: float, se: float, n: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The size a test of ``effect`` (standard error ``se`` at size ``n``, shrinking as ``1 / sqrt(n)``) needs to
    reject 0 at two-sided level ``alpha`` with probability ``power``:
    ``n ((z_(1-alpha/2) + z_power) se / |effect|)^2``, rounded up; inf for a zero effect; ``n`` when ``se`` is 0."""
    if effect == 0 or not np.isfinite(effect):
        return math.inf
    if not (np.isfinite(se) and np.isfinite(n)):
        return math.nan
    if se == 0:
        return float(n)
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(math.ceil(n * (z * se / abs(effect)) ** 2))


def windows_needed(effect: float, se: float, n_windows: float, **test) -> float:
    """Held-out windows per distribution a paired comparison of log-perplexity difference ``effect`` (bootstrap
    standard error ``se`` on ``n_windows`` windows) needs to be separated (:func:`scale_needed`)."""
    return scale_needed(effect, se, n_windows, **test)


def samples_needed(effect: float, se: float, n_samples: float, **test) -> float:
    """Calibration samples per distribution a difference ``effect`` between rankings (bootstrap standard error ``se``
    on ``n_samples`` samples) needs to be resolved (:func:`scale_needed`)."""
    return scale_needed(effect, se, n_samples, **test)


def separated(ci_low, ci_high):
    """A paired ratio's 95% CI excludes 1."""
    return (np.asarray(ci_high) < 1) | (np.asarray(ci_low) > 1)


def p_text(p: float, floor: float) -> str:
    """``"p = 0.012"``, or ``"p ≤ 0.001"`` when ``p`` sits at the floor ``1 / n_boot`` (or ``1 / (n_perm + 1)``)
    of its resampling."""
    return f"p ≤ {floor:.3g}" if p <= floor * (1 + 1e-9) else f"p = {p:.3g}"


def needs_text(amount: float, unit: str, now: float, why: str = "the estimate shows no difference to separate") -> str:
    """What would resolve a claim: ``"about 1,234 <unit> (now 32)"``, or
    ``"no number of <unit> is predicted to (now 32): <why>"`` when the amount is not finite."""
    if not np.isfinite(amount):
        return f"no number of {unit} is predicted to (now {now:,.0f}): {why}"
    return f"about {amount:,.0f} {unit} (now {now:,.0f})"


def truth_reliability(split_half: pd.DataFrame | None) -> dict[str, float]:
    """The ground truth's lowest split-half reliability over distributions, per module kind (``{}`` without one)."""
    if split_half is None or not len(split_half):
        return {}
    part = split_half[split_half["metric"] == GROUND_TRUTH]
    return {module: float(value) for module, value in part.groupby("module")["reliability"].min().items()}


def unstable_truth(label: str, reliability: dict[str, float]) -> float:
    """For a set built from the ground truth (its label's metric) whose module kind's ground truth is below
    :data:`RELIABLE`: that reliability; else NaN."""
    try:
        parsed = parse_label(label)
    except InputError:
        return np.nan
    value = reliability.get(parsed["module"], np.nan) if parsed["metric"] == GROUND_TRUTH else np.nan
    return value if value < RELIABLE else np.nan


def truth_needs_text(reliability: float, truth_tokens: float) -> tuple[float, str]:
    """Ground-truth tokens per distribution that would raise ``reliability`` to :data:`RELIABLE`, and the text."""
    tokens = tokens_for_reliability(reliability, truth_tokens)
    needs = needs_text(tokens, "ground-truth tokens per distribution", truth_tokens,
                       f"its split-half reliability {reliability:.2f} is not above 0")
    if np.isfinite(tokens):
        needs += f", to raise its reliability {reliability:.2f} to {RELIABLE} (Spearman-Brown)"
    return tokens, needs


# ---------------------------------------------------------------- recommended sets


def worst_case(transfer: pd.DataFrame) -> pd.DataFrame:
    """The held-out ranking: every pruned set's worst-case row of a transfer table (the unpruned model left out),
    ordered per module kind and budget by its worst-case held-out perplexity ratio, lowest first (stable on ties)."""
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != UNPRUNED)]
    return worst.sort_values(["module", "k", "ppl_ratio"], kind="stable")


# ---------------------------------------------------------------- paired comparisons


def _family(label: str) -> str | None:
    """The method family of a drop-set label (None for the unpruned model or another form of label, e.g. routed)."""
    try:
        return method_family(parse_label(label)["method"])
    except InputError:
        return None


def headline_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The rows a comparison's claim rests on: the worst case over distributions, or the one distribution it is
    limited to (a comparison named ``..., on <distribution>``)."""
    if not len(comparisons):
        return comparisons
    limited = [c.endswith(f", on {d}") for c, d in zip(comparisons["comparison"], comparisons["distribution"])]
    return comparisons[(comparisons["distribution"] == "worst") | np.array(limited)]


def with_standard_error(comparisons: pd.DataFrame, n_windows: float = np.nan) -> pd.DataFrame:
    """``comparisons`` with ``se`` and ``n_windows``: as saved, or, in tables written before they were (the first
    reference studies), ``se = (log ci_high - log ci_low) / (2 z_0.975)`` from the 95% interval and the run's
    ``n_windows`` held-out windows per distribution."""
    comparisons = comparisons.copy()
    if "se" not in comparisons:
        comparisons[
            "se"] = (np.log(comparisons["ci_high"]) - np.log(comparisons["ci_low"])) / (2 * stats.norm.ppf(0.975))
    if "n_windows" not in comparisons:
        comparisons["n_windows"] = n_windows
    return comparisons


def comparison_claims(comparisons: pd.DataFrame, claim: str = "a loses less than b", n_windows: float = np.nan,
                      reliability: dict[str, float] | None = None, truth_tokens: float = np.nan) -> list[dict]:
    """One claim per headline comparison: which side loses less on the same windows, resolved when the paired CI
    excludes 1 (or when both sides have the same loss on every window: the same members), and, for a side built
    from the ground truth, that ground truth reaches :data:`RELIABLE` (``reliability``: :func:`truth_reliability`)."""
    rows = []
    for row in with_standard_error(headline_comparisons(comparisons), n_windows).itertuples():
        same = row.effect == 0 and row.se == 0
        unstable = np.nanmin([unstable_truth(row.a, reliability or {}), unstable_truth(row.b, reliability or {}),
                              np.inf])
        shaky = np.isfinite(unstable) and not same
        resolved = (bool(separated(row.ci_low, row.ci_high)) or same) and not shaky
        own = claim != "routing" and _family(row.b) == "own" and _family(row.a) == "borda"
        kind = "consensus vs own set" if own else claim
        finding = ("the same held-out loss on every window (the same members)" if same else f"{row.a} loses less"
                   if row.ci_high < 1 else f"{row.b} loses less" if row.ci_low > 1 else "not separated")
        split = bool(separated(row.ci_low, row.ci_high)) or same
        windows = 0.0 if split else windows_needed(row.effect, row.se, row.n_windows)
        needs = [] if split else [needs_text(windows, WINDOWS, row.n_windows)]
        tokens = 0.0
        if shaky:
            tokens, text = truth_needs_text(float(unstable), truth_tokens)
            finding += " (on this run's sets; a side is built from an unstable ground truth)"
            needs.append(text)
        rows.append({"claim": kind, "module": None, "k": None, "subject": row.comparison, "finding": finding,
                     "estimate": row.ratio, "ci_low": row.ci_low, "ci_high": row.ci_high, "resolved": resolved,
                     "needs": "; ".join(needs), "windows_needed": windows, "tokens_needed": tokens})
    return rows


def routing_claims(routing_paired: pd.DataFrame) -> list[dict]:
    """Routed against the borda consensus on the pooled mix of every distribution's windows."""
    if not len(routing_paired):
        return []
    versus = routing_paired["comparison"].str.endswith(" vs borda")
    mix = routing_paired[(routing_paired["distribution"] == "mix") & versus]
    claims = comparison_claims(mix.assign(distribution="worst"), claim="routing")
    return [{**claim, "subject": claim["subject"] + " (pooled mix)"} for claim in claims]


# ---------------------------------------------------------------- rankings


def corrected_validity(validity: pd.DataFrame, split_half: pd.DataFrame) -> pd.DataFrame:
    """:func:`analysis.study.validity.metric_validity` with each pair's reliabilities (``reliability_proxy``,
    ``reliability_truth``), ρ and its CI corrected for attenuation (:func:`disattenuate`: ``corrected``,
    ``corrected_ci_low``, ``corrected_ci_high``) and ``beyond_noise`` (:func:`beyond_noise`: the proxy ranks unlike
    the ground truth beyond both rankings' noise)."""
    rel = split_half.set_index(["metric", "distribution", "module"])["reliability"]
    out = validity.copy()
    keys = list(zip(out["metric"], out["distribution"], out["module"]))
    out["reliability_proxy"] = [rel.get(key, np.nan) for key in keys]
    out["reliability_truth"] = [rel.get((GROUND_TRUTH, d, module), np.nan) for _, d, module in keys]
    for column, source in (("corrected", "spearman"), ("corrected_ci_low", "spearman_ci_low"),
                           ("corrected_ci_high", "spearman_ci_high")):
        out[column] = disattenuate(out[source], out["reliability_proxy"], out["reliability_truth"])
    out["beyond_noise"] = beyond_noise(out["spearman_ci_high"], out["reliability_proxy"], out["reliability_truth"])
    return out


def validity_claims(corrected: pd.DataFrame, truth_tokens: float) -> list[dict]:
    """Per module kind and proxy: how it ranks against the ground truth.  Resolved when the ground truth's
    reliability reaches :data:`RELIABLE` on every distribution; otherwise the ground-truth tokens per distribution
    that would get it there (:func:`tokens_for_reliability`)."""
    rows = []
    for (module, metric), part in corrected.groupby(["module", "metric"], sort=False):
        reliability = float(part["reliability_truth"].min())
        resolved = reliability >= RELIABLE
        tokens, needs = truth_needs_text(reliability, truth_tokens)
        finding = (f"ρ {part['spearman'].mean():.2f} with the ground truth, {part['corrected'].mean():.2f} corrected "
                   f"for both rankings' reliability; ranks unlike it beyond noise on {int(part['beyond_noise'].sum())} "
                   f"of {len(part)} distributions")
        rows.append({"claim": "proxy vs ground truth", "module": module, "k": None, "subject": metric,
                     "finding": finding,
                     "estimate": part["corrected"].mean(), "ci_low": np.nan, "ci_high": np.nan, "resolved": resolved,
                     "tokens_needed": tokens, "needs": "" if resolved else needs})
    return rows


def data_or_metric_claims(table: pd.DataFrame) -> list[dict]:
    """Per module kind: whether the data or the choice of proxy moves the ranking more (resolved when the CI of the
    difference of mean ρ excludes 0; else the calibration samples per distribution that would resolve it)."""
    rows = []
    for row in table.itertuples():
        still = row.difference == 0 and row.se == 0
        resolved = bool(row.ci_low > 0 or row.ci_high < 0) or still
        finding = ("the data moves the ranking more than the metric" if row.ci_low > 0 else
                   "the metric moves the ranking more than the data" if row.ci_high < 0 else
                   "neither moves it: every proxy and distribution gives the same ranking" if still else
                   "not separated: the data and the metric move it alike")
        samples = 0.0 if resolved else samples_needed(row.difference, row.se, row.n_samples)
        rows.append({"claim": "data or metric", "module": row.module, "k": None,
                     "subject": "mean ρ across proxies − across distributions", "finding": finding,
                     "estimate": row.difference, "ci_low": row.ci_low, "ci_high": row.ci_high, "resolved": resolved,
                     "samples_needed": samples,
                     "needs": "" if resolved else needs_text(samples, "calibration samples per distribution",
                                                             row.n_samples)})
    return rows


def pairs_beyond_noise(pairs: pd.DataFrame, split_half: pd.DataFrame, statistic: str = "spearman") -> pd.DataFrame:
    """``bootstrap_pairs`` rows with each pair's noise ``ceiling`` (:func:`noise_ceiling` of the two distributions'
    split-half floors of ``statistic``: ``reliability`` for ρ, ``split_half_jaccard@k`` for Jaccard@k) and
    ``beyond_noise``."""
    column = "reliability" if statistic == "spearman" else f"split_half_{statistic}"
    floor = split_half.set_index(["metric", "module", "distribution"])[column]
    a, b = (np.array([floor.get(key, np.nan) for key in zip(pairs["metric"], pairs["module"], pairs[side])])
            for side in ("a", "b"))
    return pairs.assign(ceiling=noise_ceiling(a, b), beyond_noise=beyond_noise(pairs[f"{statistic}_ci_high"], a, b))


def agreement_claims(pairs: pd.DataFrame, split_half: pd.DataFrame, metric: str = PRIMARY_METRIC) -> list[dict]:
    """Per module kind: does the calibration data change the ``metric`` ranking?  Resolved when some pair of
    distributions differs beyond resampling noise (:func:`pairs_beyond_noise`); otherwise the samples per
    distribution that would separate the lowest pair's corrected ρ from 1 (its standard error from its CI width)."""
    rows = []
    marked = pairs_beyond_noise(pairs[pairs["metric"] == metric], split_half)
    samples = split_half[split_half["metric"] == metric].groupby("module")["n_samples"].min()
    for module, part in marked.groupby("module", sort=False):
        beyond, n = int(part["beyond_noise"].sum()), samples.get(module, 0)
        corrected = part["spearman"] / part["ceiling"]
        needed, lowest, estimate = math.inf, "", np.nan
        if corrected.notna().any():
            low = part.loc[corrected.idxmin()]
            estimate, lowest = corrected.min(), f" for the lowest pair, {low['a']}–{low['b']},"
            se = (low["spearman_ci_high"] - low["spearman_ci_low"]) / (2 * stats.norm.ppf(0.975)) / low["ceiling"]
            needed = samples_needed(1 - estimate, se, n) if estimate < 1 else math.inf
        resolved = beyond > 0
        finding = f"{beyond} of {len(part)} pairs differ beyond resampling noise" if resolved else \
            "no pair differs beyond resampling noise"
        needs = needs_text(needed, f"calibration samples per distribution{lowest}", n,
                           "the corrected ρ is at the noise ceiling, or a floor is not above 0")
        rows.append({"claim": "data changes the ranking", "module": module, "k": None,
                     "subject": f"{metric}, {len(part)} pairs of distributions", "finding": finding,
                     "estimate": estimate, "ci_low": np.nan, "ci_high": np.nan, "resolved": resolved,
                     "samples_needed": 0.0 if resolved else needed, "needs": "" if resolved else needs})
    return rows


def claims_table(tables: dict, *, truth_tokens: float, heldout_windows: float = np.nan,
                 metric: str = PRIMARY_METRIC) -> pd.DataFrame:
    """Every headline claim of a run with its resolution (columns :data:`CLAIM_COLUMNS`), from its tables:
    ``set_groups``, ``comparisons``, ``validity`` and ``split_half``, ``data_or_metric``, ``bootstrap_pairs``,
    ``routing_paired`` (those absent or empty are skipped).  ``truth_tokens``: ground-truth tokens per distribution;
    ``metric``: the primary metric, whose ranking the agreement claim is about."""
    def has(name):
        return tables.get(name) is not None and len(tables[name])

    rows, reliability = [], truth_reliability(tables.get("split_half"))
    if has("set_groups"):
        rows += recommend.recommendation_claims(tables["set_groups"])
    if has("comparisons"):
        rows += comparison_claims(tables["comparisons"], n_windows=heldout_windows, reliability=reliability,
                                  truth_tokens=truth_tokens)
    if has("validity") and has("split_half"):
        rows += validity_claims(corrected_validity(tables["validity"], tables["split_half"]), truth_tokens)
    if has("data_or_metric"):
        rows += data_or_metric_claims(tables["data_or_metric"])
    if has("bootstrap_pairs") and has("split_half"):
        rows += agreement_claims(tables["bootstrap_pairs"], tables["split_half"], metric)
    if has("routing_paired"):
        rows += routing_claims(tables["routing_paired"])
    table = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    for column in ("windows_needed", "tokens_needed", "samples_needed", "estimate", "ci_low", "ci_high"):
        table[column] = table[column].astype(float)
    table["resolved"] = table["resolved"].astype(bool)
    table["k"] = table["k"].astype("Int64")
    return table
