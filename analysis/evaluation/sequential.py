"""Sequential held-out evaluation: windows in rounds, each set evaluated only while its answer is still open.

The looks ``n_1 < n_2 < ... < n_R`` (windows per distribution) are fixed before any window is read.  Every set is
evaluated on the first ``n_1`` windows of every distribution.  At each look the recommendation rule
(:func:`analysis.study.recommend.set_groups`) runs on the windows so far, each pair of sets on the windows both have:
per module kind and budget, the best (the lowest worst-case ratio among the sets with the most windows) and the sets
neither separated from it nor shown within the margin go on to the next look; every other set stops.  A stopped set
that a new best leaves undecided is evaluated again from its last window.  The rounds end when every module kind and
budget is decided, at the last look, or when no open answer's next round fits in what is left of ``budget``
set-windows per distribution (the first look always runs); when the next round does not fit whole, the module kinds
and budgets nearest a decision (fewest windows needed) go first, each taken if it still fits.

**Validity under peeking** (alpha spending over a fixed schedule, Bonferroni over the looks): a test over the
first ``n_r`` windows runs at ``alpha · s_r / K`` for ``K`` candidates, the shares ``s_r`` fixed in advance and
summing to 1 (:func:`equal_spending`).  Recommending set ``i`` needs ``i`` separated from every other set, in
particular from one fixed set ``j``; the tests of that one pair over the ``R`` looks reject, when neither is better,
with probability at most ``sum_r alpha · s_r / K = alpha / K``, so any recommendation when no set is better happens
with probability at most ``K · alpha / K = alpha``, whatever the looks decided in between (which windows a set gets
depends on earlier looks, but each test is over a prefix of the fixed schedule).  ``benchmarks/study/
sequential_simulation.py`` checks it with heavy-tailed windows and counts the windows it saves.
"""

from __future__ import annotations

import pandas as pd

from collections.abc import Callable

from ..study import recommend
from ..study.dropsets import UNPRUNED
from .heldout import replicates_of, window_nll

# The windows per distribution at which the rule looks: every set gets the first, the contested ones up to the last
LOOKS = (8, 32, 128)
LOOK_COLUMNS = ["look", "windows", "sets", "set_windows", "spent", "open", "ended"]
# what a round evaluates: (each wanted set → the look it goes to, each set's windows so far) → their window rows
Evaluate = Callable[[dict, dict], pd.DataFrame]


def equal_spending(looks) -> dict[int, float]:
    """The share of alpha spent at each look: ``1 / R`` each (Bonferroni over ``R`` looks)."""
    return {int(n): 1 / len(looks) for n in looks}


def open_sets(groups: pd.DataFrame) -> set[str]:
    """The names (every alias) of the sets whose answer is still open: per module kind and budget that is not resolved,
    the best and every candidate neither separated from it nor shown within the margin."""
    if not len(groups):
        return set()
    going_on = ~groups["resolved"] & ((groups["rank"] == 1) | recommend.undecided(groups))
    return {name for aliases in groups.loc[going_on, "aliases"] for name in aliases}


def open_groups(groups: pd.DataFrame) -> list[set[str]]:
    """:func:`open_sets` per module kind and budget, the one nearest a decision first: by the held-out windows per
    distribution its hardest undecided set needs (``windows_needed``)."""
    if not len(groups):
        return []
    need = {key: recommend.needs(part)[0] for key, part in groups.groupby(["module", "k"], sort=False)}
    by_group = {key: open_sets(part) for key, part in groups.groupby(["module", "k"], sort=False)}
    return [by_group[key] for key in sorted(by_group, key=need.get) if by_group[key]]


def within_budget(groups: list[set[str]], target: int, have: dict[str, int], members: dict, left: int) -> dict:
    """The sets to take to ``target`` windows when not every open one fits in the ``left`` set-windows: whole module
    kinds and budgets, nearest a decision first (:func:`open_groups`), each taken if it still fits."""
    chosen: dict[str, int] = {}
    for names in groups:
        trial = {**chosen, **{name: target for name in names if name in members}}
        if round_cost(trial, have, members) <= left:
            chosen = trial
    return chosen


def windows_per_set(windows: pd.DataFrame) -> dict[str, int]:
    """Each set's windows per distribution (the fewest over the distributions)."""
    return windows.groupby(["drop_set", "distribution"]).size().groupby(level="drop_set").min().to_dict()


def round_cost(wanted: dict[str, int], have: dict[str, int], members: dict) -> int:
    """Set-windows per distribution a round costs: each distinct member set (``members``: name → its removed modules)
    once, from its windows to the look it goes to."""
    cost: dict = {}
    for name, target in wanted.items():
        cost[members[name]] = max(cost.get(members[name], 0), target - have.get(name, 0))
    return sum(cost.values())


def model_rounds(model, samples: dict, drop_sets: dict, *, batch_size: int = 4) -> Evaluate:
    """The :data:`Evaluate` of a model: window NLL (:func:`~analysis.evaluation.heldout.window_nll`) of each wanted set
    on the ``samples`` windows it lacks (sets that start from the same window run together, with the unpruned
    model)."""

    def evaluate(wanted: dict[str, int], have: dict[str, int]) -> pd.DataFrame:
        starts: dict[tuple, dict] = {}
        for name, target in wanted.items():
            starts.setdefault((have.get(name, 0), target), {})[name] = drop_sets[name]
        parts = []
        for (start, stop), sets in starts.items():
            chosen = {d: windows.select(range(start, stop)) for d, windows in samples.items()}
            parts.append(window_nll(model, chosen, {UNPRUNED: None, **sets}, batch_size=batch_size))
        return pd.concat(parts, ignore_index=True)

    return evaluate


def _groups(windows: pd.DataFrame, sets: pd.DataFrame, rule: dict) -> pd.DataFrame:
    return recommend.set_groups(replicates_of(windows, n_boot=rule["n_boot"], seed=rule["seed"]), sets,
                                margin=rule["margin"], alpha=rule["alpha"], spending=rule["spending"])


def _open_count(groups: pd.DataFrame) -> int:
    return int((~groups.drop_duplicates(["module", "k"])["resolved"]).sum()) if len(groups) else 0


def sequential_windows(evaluate: Evaluate, members: dict, sets: pd.DataFrame, *, looks=LOOKS, budget: int,
                       margin: float = recommend.MARGIN, alpha: float = recommend.ALPHA, n_boot: int = 1000,
                       seed: int = 0, saved=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The window table of a sequential evaluation (module docstring) and one row per look.

    ``evaluate(wanted, have)``: the window rows of each set of ``wanted`` (name → the look it goes to) from its
    ``have`` windows on, and of the unpruned model (:func:`model_rounds`); ``members``: every set's name (the
    unpruned model left out) → its removed modules; ``sets``: their distinct member sets
    (:func:`analysis.study.recommend.distinct_sets`); ``budget``: set-windows per distribution in total.
    ``saved(look, compute)`` may keep each round's rows (a stage part), so an interrupted evaluation resumes.  The
    window table has the columns of :func:`~analysis.evaluation.heldout.window_nll`; the looks table: ``look``
    (1..R), ``windows`` (per distribution at that look), ``sets`` (evaluated in the round that reached it),
    ``set_windows`` (what that round cost per distribution), ``spent`` (so far), ``open`` (module kinds and budgets
    not decided there) and ``ended`` (on the last row: why the evaluation stopped)."""
    saved = saved or (lambda look, compute: compute())
    rule = {"n_boot": n_boot, "seed": seed, "margin": margin, "alpha": alpha, "spending": equal_spending(looks)}
    first = {name: looks[0] for name in members}
    windows = saved(1, lambda: evaluate(first, {}))
    spent = round_cost(first, {}, members)
    rows = [{"look": 1, "windows": looks[0], "sets": len(set(members.values())), "set_windows": spent, "spent": spent}]
    ended = "the last look"
    for look, target in enumerate(looks[1:], start=2):
        have, groups = windows_per_set(windows), _groups(windows, sets, rule)
        rows[-1]["open"] = _open_count(groups)
        every = {name: target for name in open_sets(groups) if name in members}
        wanted = every if spent + round_cost(every, have, members) <= budget else within_budget(
            open_groups(groups), target, have, members, budget - spent)
        if not wanted:
            ended = ("every module kind and budget decided" if not every else
                     f"budget: {spent:,} of {budget:,} set-windows spent, and no open answer's next look fits")
            break
        cost = round_cost(wanted, have, members)
        new = saved(look, lambda wanted=wanted, have=have: evaluate(wanted, have))
        windows = pd.concat([windows, new], ignore_index=True).drop_duplicates(
            ["drop_set", "distribution", "window"], keep="first", ignore_index=True)
        spent += cost
        rows.append({"look": look, "windows": target, "sets": len({members[name] for name in wanted}),
                     "set_windows": cost, "spent": spent})
    else:
        rows[-1]["open"] = _open_count(_groups(windows, sets, rule))
    looks_table = pd.DataFrame(rows).reindex(columns=LOOK_COLUMNS)
    looks_table["ended"] = [""] * (len(rows) - 1) + [ended]
    return windows, looks_table
