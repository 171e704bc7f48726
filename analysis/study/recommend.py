"""Which drop set to use: a recommendation of *members*, resting on the held-out loss of those members.

For one module kind and budget, the candidate sets ``i = 1..K`` (distinct members: sets with the same members are one
set under several names, whatever built them) have worst-case log perplexity ratios
``L_i = max_d log(ppl_i,d / ppl_none,d)`` over the distributions ``d``, estimated on the same held-out windows and
resampled together (a paired bootstrap over windows; row 0 the estimate).  ``b`` is the set of lowest ``L``; for every
other set ``j``, ``D_j = L_b - L_j`` (negative: ``b`` loses less); every test is one-sided at ``level = alpha / K``.

* **Separated** (``b`` loses less than ``j``): the one-sided p-value of ``D_j / se_j`` (``se_j`` the paired
  bootstrap standard error, Student's t with ``n - 1`` degrees of freedom for ``n`` windows) is at most ``level``.
  Bonferroni over the candidates guards against choosing the best of many sets on the windows that judge it:
  recommending set ``i`` needs ``i`` separated from every other set, in particular from one fixed set, so the
  chance that any of the ``K`` sets is recommended when none is truly better is at most ``K · alpha / K = alpha``
  (and a wrong recommendation, of a set that is not the true best, at most ``(K - 1) alpha / K``);
  ``tests/test_recommend.py`` and ``benchmarks/study/recommendation_null.py`` check it by simulation with
  heavy-tailed windows.  For two sets this is the 95% two-sided paired interval excluding 1.
* **Equivalent** (within the margin ``δ``, default 2% on the worst-case ratio): two one-sided tests at ``level``
  (TOST): ``exp(D_j ± t_(1-level) se_j)`` lies inside ``[1/(1+δ), 1+δ]``.
* Each module kind and budget is exactly one of: **recommended** (``b`` separated from every other set);
  **equivalent group** (every set not separated from ``b`` is equivalent to it: the group is ``b`` and those sets,
  and ``b``, the lowest worst-case ratio on these windows, is the one suggested; any member of the group serves
  within the margin); **not resolved**, with the held-out windows per distribution that would separate each
  undecided set or show it equivalent, whichever is fewer (power 0.8 at the observed effect and spread).

Random sets and the baselines (drop the last k; the paper's recipe, cosine's own set of general text) are paired
with ``b`` at the same level; random sets are compared but never candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

from .dropsets import baseline_labels, joint_sort_key, method_family, parse_label
from .stability import percentile_interval

ALPHA = 0.05
POWER = 0.8
MARGIN = 0.02
RECOMMENDED, EQUIVALENT, OPEN = "recommended", "equivalent group", "not resolved"
# the worst-case replicates (row 0 the estimate) of some sets on the windows they share, and how many that is
Replicates = Callable[[list[str]], tuple[pd.DataFrame, float]]


def distinct_sets(pruned: pd.DataFrame, metric: str = "cosine") -> pd.DataFrame:
    """One row per module kind, budget and distinct member set of the ``pruned`` stage's table (the unpruned model
    left out): ``module, k, drop_set`` (its first name that is not a random set's), ``aliases`` (every name of those
    members), ``members``, ``role`` (``random`` when every name is a random set's, else ``candidate``) and
    ``baselines`` (the baselines among its names, ``last k`` / ``paper recipe``,
    :func:`~analysis.study.dropsets.baseline_labels` of ``metric``)."""
    rows: dict[tuple, dict] = {}
    for row in pruned[pruned["module"].notna()].itertuples():
        members = sorted(map(str, row.indices), key=joint_sort_key)
        entry = rows.setdefault((row.module, int(row.k), *members), {"module": row.module, "k": int(row.k),
                                                                     "aliases": [], "members": members,
                                                                     "families": []})
        entry["aliases"].append(row.drop_set)
        entry["families"].append(method_family(parse_label(row.drop_set)["method"]))
    table = []
    for entry in rows.values():
        names, families = baseline_labels(entry["module"], entry["k"], metric), entry.pop("families")
        named = [label for label, family in zip(entry["aliases"], families) if family != "random"]
        table.append({**entry, "drop_set": (named or entry["aliases"])[0],
                      "role": "candidate" if named else "random",
                      "baselines": [name for name, label in names.items() if label in entry["aliases"]]})
    return pd.DataFrame(table)[["module", "k", "drop_set", "aliases", "members", "role", "baselines"]]


def one_sided_p(effect: float, se: float, n: float) -> float:
    """The one-sided p-value of "the best loses less" for a paired effect ``D`` (negative: the best loses less) with
    bootstrap standard error ``se`` on ``n`` windows per distribution: ``1 - F_(n-1)(-D / se)``, ``F`` Student's t
    (a percentile bootstrap test rejects too often on 32 heavy-tailed windows: 7-11% at a nominal 5% in
    ``tests/test_recommend.py``'s simulation)."""
    if not se > 0:
        return 0.0 if effect < 0 else 1.0
    return float(stats.t.sf(-effect / se, df=max(n - 1, 1)))


def windows_to_decide(effect: float, se: float, n: float, margin: float, level: float,
                      power: float = POWER) -> float:
    """Held-out windows per distribution that would separate a set (``|effect|`` from 0) or show it equivalent
    (``log(1+margin) - |effect|`` from the margin) in a one-sided test at ``level`` with ``power``, whichever is
    fewer: ``n ((z_(1-level) + z_power) se / gap)^2`` (standard error shrinking as ``1 / sqrt(n)``); inf when
    neither gap is positive."""
    if not (np.isfinite(se) and se > 0):
        return math.inf if se != 0 else float(n)
    z = stats.norm.ppf(1 - level) + stats.norm.ppf(power)
    gaps = [g for g in (abs(effect), math.log1p(margin) - abs(effect)) if g > 0]
    return min((float(math.ceil(n * (z * se / g) ** 2)) for g in gaps), default=math.inf)


def _pair(best: np.ndarray, other: np.ndarray, level: float, margin: float, n: float) -> dict:
    """The paired columns of one set against the best at one-sided ``level``: ``D = L_best - L_other`` (row 0 of the
    replicates), ``se`` its bootstrap standard deviation scaled by ``sqrt(n / (n - 1))``, the interval
    ``D ± t_(1-level, n-1) se``."""
    effect = best[0] - other[0]
    # the bootstrap variance of a mean over n windows is (n - 1) / n of its usual estimate s^2 / n: undone here
    se = float(np.std(best[1:] - other[1:], ddof=1)) * math.sqrt(n / max(n - 1, 1))
    half = stats.t.ppf(1 - level, df=max(n - 1, 1)) * se
    p = one_sided_p(effect, se, n)
    separated = p <= level
    equivalent = -math.log1p(margin) < effect - half and effect + half < math.log1p(margin)
    return {"ratio_to_best": math.exp(effect), "pair_ci_low": math.exp(effect - half),
            "pair_ci_high": math.exp(effect + half), "p_value": p, "separated": bool(separated),
            "equivalent": bool(equivalent), "se": se,
            "windows_needed": 0.0 if separated or equivalent else windows_to_decide(effect, se, n, margin, level)}


def group_status(part: pd.DataFrame) -> str:
    """:data:`RECOMMENDED`, :data:`EQUIVALENT` or :data:`OPEN` for one module kind and budget of :func:`set_groups`
    (its candidate rows)."""
    others = part[part["rank"] > 1]
    if others["separated"].all():
        return RECOMMENDED
    if (others["separated"] | others["equivalent"]).all():
        return EQUIVALENT
    return OPEN


def _against_best(part: pd.DataFrame, worst: Replicates, alpha: float, margin: float,
                  spending: Mapping[int, float] | None = None, *, per_candidate: bool = True) -> pd.DataFrame:
    """One module kind and budget's sets (the best first) with their paired columns against the best, each pair on
    the windows both sets have and one-sided at ``level = alpha * share / K`` for ``K`` candidates (``share``:
    :func:`spent_share` at those windows; ``K = 1`` unless ``per_candidate``), ``status`` and ``resolved``."""
    n_candidates = max(int((part["role"] == "candidate").sum()), 1) if per_candidate else 1
    names = list(part["drop_set"])
    n_best = float(worst([names[0]])[1])
    levels, shared = [alpha * spent_share(spending, n_best) / n_candidates], [n_best]
    first = {"ratio_to_best": 1.0, "pair_ci_low": 1.0, "pair_ci_high": 1.0, "p_value": 1.0, "separated": False,
             "equivalent": True, "se": 0.0, "windows_needed": 0.0}
    pairs = [first]
    for name in names[1:]:
        replicates, n = worst([names[0], name])
        levels.append(alpha * spent_share(spending, n) / n_candidates)
        shared.append(float(n))
        pairs.append(_pair(replicates[names[0]].to_numpy(), replicates[name].to_numpy(), levels[-1], margin, n))
    part = pd.concat([part.reset_index(drop=True), pd.DataFrame(pairs)], axis=1)
    part = part.assign(rank=range(1, len(part) + 1), same_as_best=[True] + [False] * (len(part) - 1),
                       in_group=~part["separated"], level=levels, n_windows=shared, margin=margin)
    status = group_status(part[part["role"] == "candidate"])
    return part.assign(status=status, resolved=status != OPEN)


def spent_share(spending: Mapping[int, float] | None, n: float) -> float:
    """The share of alpha spent on a test over ``n`` windows: ``spending[m]`` for the largest look ``m <= n`` (1
    without a schedule: one look)."""
    if not spending:
        return 1.0
    looks = [m for m in sorted(spending) if m <= n] or [min(spending)]
    return float(spending[looks[-1]])


def table_replicates(worst: pd.DataFrame, n_windows: float) -> Replicates:
    """The :data:`Replicates` of one table of worst-case replicates whose sets all have ``n_windows``."""
    return lambda names: (worst[list(names)], n_windows)


def _ratios(part: pd.DataFrame, worst: Replicates) -> pd.DataFrame:
    """``part`` with each set's worst-case ratio ``ppl_ratio`` on its own windows, its 95% percentile interval
    ``ci_low, ci_high`` (the transfer table's, from the same replicates) and ``set_windows``, those windows."""
    own = {name: worst([name]) for name in part["drop_set"]}
    column = {name: replicates[name].to_numpy() for name, (replicates, _) in own.items()}
    bounds = [percentile_interval(np.exp(column[name][1:]), 0.95) for name in part["drop_set"]]
    return part.assign(ppl_ratio=[math.exp(column[name][0]) for name in part["drop_set"]],
                       ci_low=[low for low, _ in bounds], ci_high=[high for _, high in bounds],
                       set_windows=[float(own[name][1]) for name in part["drop_set"]])


def _best_first(part: pd.DataFrame) -> pd.DataFrame:
    """Candidates before random sets; among candidates, those with the most windows first (a sequential
    evaluation's sets still in the race); then by ``ppl_ratio``."""
    return part.assign(random=part["role"] == "random", fewer=-part["set_windows"]).sort_values(
        ["random", "fewer", "ppl_ratio"], kind="stable").drop(columns=["random", "fewer"])


def set_groups(worst: pd.DataFrame | Replicates, sets: pd.DataFrame, *, n_windows: float | None = None,
               margin: float = MARGIN, alpha: float = ALPHA,
               spending: Mapping[int, float] | None = None) -> pd.DataFrame:
    """Every distinct set of :func:`distinct_sets` against the best of its module kind and budget, chosen and judged
    on the same windows.

    ``worst``: worst-case log perplexity ratios, one column per set name, row 0 the estimate and the other rows
    paired bootstrap replicates (:func:`analysis.evaluation.heldout.worst_case_replicates`), of ``n_windows``
    held-out windows per distribution; or :data:`Replicates` giving them for any sets on the windows they share (a
    sequential evaluation, whose sets have different windows: :func:`analysis.evaluation.heldout.replicates_of`),
    with ``spending`` the share of alpha spent at each look (:mod:`analysis.evaluation.sequential`).  The best is the
    set of lowest ratio among those with the most windows.  Columns: the set's ``module, k, drop_set, aliases,
    members, role, baselines``, ``rank`` (1: the best; random sets after the candidates), ``ppl_ratio`` (its
    worst-case ratio) with its 95% interval ``ci_low, ci_high`` and ``set_windows`` (its windows per distribution),
    ``same_as_best`` (the best's own row), ``ratio_to_best`` (best / this), ``pair_ci_low``/``pair_ci_high`` (the
    ``exp(D ± t_(1-level) se)`` interval, ``level = alpha / K`` for ``K`` candidates, times the share spent),
    ``p_value`` (one-sided), ``level``, ``separated``, ``equivalent``, ``in_group`` (the best, or not separated from
    it), ``se``, ``windows_needed``, ``n_windows`` (the windows the pair shares), ``margin``, and per module kind and
    budget ``status`` (:func:`group_status`) and ``resolved`` (not :data:`OPEN`)."""
    replicates = worst if callable(worst) else table_replicates(worst, n_windows)
    parts = []
    for _, part in sets.groupby(["module", "k"], sort=False):
        parts.append(_against_best(_best_first(_ratios(part, replicates)), replicates, alpha, margin, spending))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def confirm_groups(choose: pd.DataFrame, confirm: pd.DataFrame, sets: pd.DataFrame, *, n_windows: float,
                   margin: float = MARGIN, alpha: float = ALPHA) -> pd.DataFrame:
    """The set of lowest worst-case ratio on one part of the windows (``choose``, as ``worst`` of
    :func:`set_groups`), judged against every other set on another part (``confirm``): the same columns, from the
    confirming windows, with ``chosen_ratio`` (each set's ratio on the choosing windows).  The pick is fixed before
    the confirming windows are read, so each comparison is one-sided at ``alpha`` itself (an intersection-union
    test: the pick is recommended only if every comparison rejects)."""
    parts = []
    for _, part in sets.groupby(["module", "k"], sort=False):
        part = _ratios(part, table_replicates(choose, n_windows)).rename(columns={"ppl_ratio": "chosen_ratio"})
        part = part.drop(columns=["ci_low", "ci_high", "set_windows"]).sort_values("chosen_ratio", kind="stable")
        confirming = table_replicates(confirm, n_windows)
        parts.append(_against_best(_ratios(part, confirming), confirming, alpha, margin, per_candidate=False))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def group_of(part: pd.DataFrame) -> pd.DataFrame:
    """The candidate sets not separated from the best of one module kind and budget of :func:`set_groups`."""
    return part[(part["role"] == "candidate") & part["in_group"]]


def undecided(groups: pd.DataFrame) -> pd.Series:
    """Which rows of :func:`set_groups` are candidates neither separated from their best nor shown within the margin
    (the best itself is not)."""
    return (groups["role"] == "candidate") & ~groups["separated"] & ~groups["equivalent"] & (groups["rank"] > 1)


def needs(part: pd.DataFrame) -> tuple[float, str]:
    """What would resolve an open recommendation: the held-out windows per distribution its hardest undecided set
    needs, and the text."""
    undecided_sets = part[undecided(part)]
    windows = float(undecided_sets["windows_needed"].max()) if len(undecided_sets) else 0.0
    now = float(part["n_windows"].min())
    if not np.isfinite(windows):
        return windows, f"no number of held-out windows per distribution is predicted to (now {now:,.0f})"
    return windows, (f"about {windows:,.0f} held-out windows per distribution (now {now:,.0f}) would separate "
                     f"{', '.join(undecided_sets['drop_set'])} from the best or show them within "
                     f"{part['margin'].iloc[0]:.0%}")


def finding(part: pd.DataFrame, name=str) -> str:
    """One module kind and budget's answer in words, after its status (``name`` shows a set's label)."""
    best, status = part.iloc[0], part["status"].iloc[0]
    drop = f"drop {', '.join(best['members'])} ({name(best['drop_set'])})"
    if status == RECOMMENDED:
        runner = part[(part["rank"] == 2) & (part["role"] == "candidate")]
        versus = "" if not len(runner) else (
            f"; separated from the runner-up {name(runner['drop_set'].iloc[0])} (best / it "
            f"{runner['ratio_to_best'].iloc[0]:.3f}) and every other set at one-sided p ≤ {best['level']:.3g}")
        return f"{drop}{versus}"
    group = group_of(part)
    if status == EQUIVALENT:
        names = ", ".join(map(name, group["drop_set"]))
        return (f"{len(group)} sets within {best['margin']:.0%} of the best: {names}; "
                f"suggested: {drop}, the lowest worst-case ratio")
    open_sets = group["drop_set"].iloc[1:]
    verb = "is" if len(open_sets) == 1 else "are"
    return (f"{drop} has the lowest worst-case ratio, but {', '.join(map(name, open_sets))} {verb} neither separated "
            f"from it nor shown within {best['margin']:.0%}")


def baseline_rows(part: pd.DataFrame) -> list[tuple[str, str, pd.Series]]:
    """``(baseline name, its own label, the row of its members)`` for the baselines and random sets of one module kind
    and budget (a baseline's members may be another set's, under that set's name)."""
    labels = baseline_labels(part["module"].iloc[0], int(part["k"].iloc[0])) if len(part) else {}
    rows = [(name, labels.get(name, row["drop_set"]), row) for _, row in part.iterrows() for name in row["baselines"]]
    return rows + [("random", row["drop_set"], row) for _, row in part[part["role"] == "random"].iterrows()]


def versus_text(row: pd.Series) -> str:
    """The answer against one other set: ``beats it``, ``within the margin`` or ``not separated``, with the ratio."""
    ratio = f"best / it {row['ratio_to_best']:.3f} [{row['pair_ci_low']:.3f}, {row['pair_ci_high']:.3f}]"
    if row["rank"] == 1:
        return "is the answer itself"
    verdict = ("loses less (resolved)" if row["separated"] else
               f"within {row['margin']:.0%} (equivalent, resolved)" if row["equivalent"] else "not separated")
    return f"{verdict}: {ratio}"


def recommendation_claims(groups: pd.DataFrame, name=str) -> list[dict]:
    """One claim per module kind and budget (``recommended set``: the suggested set, its status and what would
    resolve it), and one per baseline beside it (``answer vs baseline``)."""
    rows = []
    for (module, k), part in groups.groupby(["module", "k"], sort=False):
        best, status = part.iloc[0], part["status"].iloc[0]
        windows, text = needs(part) if status == OPEN else (0.0, "")
        rows.append({"claim": "recommended set", "module": module, "k": int(k), "subject": best["drop_set"],
                     "status": status, "finding": finding(part, name), "estimate": best["ppl_ratio"],
                     "ci_low": np.nan, "ci_high": np.nan, "resolved": status != OPEN, "needs": text,
                     "windows_needed": windows, "tokens_needed": 0.0})
        for baseline, label, row in baseline_rows(part):
            decided = bool(row["separated"] or row["equivalent"] or row["rank"] == 1)
            rows.append({"claim": "answer vs baseline", "module": module, "k": int(k),
                         "subject": f"{baseline}: {label}", "status": "", "finding": versus_text(row),
                         "estimate": row["ratio_to_best"], "ci_low": row["pair_ci_low"],
                         "ci_high": row["pair_ci_high"], "resolved": decided, "needs": "" if decided else
                         f"about {row['windows_needed']:,.0f} held-out windows per distribution "
                         f"(now {row['n_windows']:,.0f})", "windows_needed": row["windows_needed"],
                         "tokens_needed": 0.0})
    return rows
