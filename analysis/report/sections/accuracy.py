"""The sections on zero-shot accuracy and on the check of each distribution's held-out windows."""

from __future__ import annotations


import numpy as np
import pandas as pd

from ...evaluation.accuracy import headline_rows
from ...study import resolution


from .common import Results, _ci, _table


def _span(low: float, high: float, fmt: str = "{:,.0f}") -> str:
    """``"low–high"``, or one number when they are equal."""
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def accuracy_screen_lines(tasks: pd.DataFrame, limit: int | None) -> list[str]:
    """One line per task: excluded (not clearly above chance), or the items a ``delta`` difference needs against those
    evaluated."""
    lines = []
    for row in headline_rows(tasks).itertuples():
        test = f"one-sided binomial p = {row.p_above_chance:.2g} against chance {row.chance:.2f}, α = {row.alpha:g}"
        if not row.included:
            lines.append(
                f"- **Excluded**: {row.task} ({row.measure}): the unpruned model scores {row.accuracy:.3f} on "
                f"{row.n_items} items, "
                         f"not clearly above chance ({test}); differences between drop sets on it say nothing.")
        elif np.isnan(row.items_needed_max):
            lines.append(
                f"- {row.task} ({row.measure}, unpruned {row.accuracy:.3f}, {test}): too few discordant items to size "
                f"a "
                         f"{100 * row.delta:g}-point test.")
        else:
            evaluated = f"task_limit {limit}" if limit else "every item"
            verdict = "suffices" if row.limit_suffices else (
                "does not suffice; the whole task does" if row.task_suffices else
                                                              "does not suffice, nor does the whole task")
            lines.append(
                f"- {row.task} ({row.measure}, unpruned {row.accuracy:.3f}, {test}): to resolve a "
                f"{100 * row.delta:g}-point "
                         f"difference (McNemar, α = {row.alpha:g}, power {row.power:g}) at the observed discordance "
                         f"({_span(100 * row.discordant_min, 100 * row.discordant_max)}% of items) takes "
                         f"{_span(row.items_needed_min, row.items_needed_max)} items; the run evaluated {row.n_items} "
                         f"({evaluated}) of the task's {row.n_available}: that {verdict}.")
    return lines


def section_accuracy(results: Results) -> list[str]:
    accuracy = results.table("accuracy")
    if not len(accuracy):
        return []
    chosen = headline_rows(accuracy.rename(columns={"metric": "measure"}))
    pivot = chosen.pivot_table(index="drop_set", columns="task", values="value", sort=False).reset_index()
    limit = results.settings.task_limit
    lines = ["## Zero-shot accuracy", "",
             f"lm-evaluation-harness, 0-shot, {f'first {limit} examples per task' if limit else 'all examples'} "
             f"(acc_norm where the task defines it, else acc; higher is better); standard error about "
             f"±{chosen['stderr'].max():.2f}. The sets: `accuracy_sets` = {', '.join(results.settings.accuracy_labels)}"
             f" among those still in the race (`{{answers}}`: each resolved answer on held-out text).", "",
             _table(pivot), ""]
    tasks, paired = results.table("accuracy_tasks"), results.table("accuracy_paired")
    if len(paired):
        shown = headline_rows(paired).copy()
        shown["a − b, points [95% CI]"] = [_ci(100 * r.difference, 100 * r.ci_low, 100 * r.ci_high,
                                               1) for r in shown.itertuples()]
        shown["only a / only b right"] = [f"{r.a_only} / {r.b_only}" for r in shown.itertuples()]
        lines += ["### Paired on the same items", "",
                  "Each pair on the same items of each task where the unpruned model is clearly above chance: accuracy "
                  "difference with a paired bootstrap CI over items, the discordant items and the exact McNemar "
                  "p-value (binomial test on the discordant items) with its Benjamini-Hochberg adjustment over the "
                  "table (q). Both measures are in accuracy_paired.parquet.", "",
                  _table(shown[["comparison", "task", "measure", "n", "a − b, points [95% CI]", "only a / only b right",
                                "p_mcnemar", "q_bh"]]), ""]
    if len(tasks):
        lines += accuracy_screen_lines(tasks, limit) + [""]
    return lines


def _permutation_floor(checked: pd.DataFrame, results: Results) -> pd.Series:
    """The floor ``1 / (n_perm + 1)`` of each check's permutation p-value (from the table, else the settings)."""
    if "p_floor" in checked:
        return checked["p_floor"]
    return pd.Series(1 / (results.settings.n_perm + 1), index=checked.index)


def section_check(results: Results) -> list[str]:
    checked = results.table("check")
    if not len(checked):
        return []
    shown = checked.assign(**{
        "ρ to the set's ranking": checked["spearman"],
        "your noise floor [95% CI]": [_ci(r.noise_floor, r.noise_floor_ci_low, r.noise_floor_ci_high,
                                          3) for r in checked.itertuples()],
        "permutation p": [resolution.p_text(p, f) for p,
                          f in zip(checked["p_permutation"], _permutation_floor(checked, results))],
        "excess": checked["excess"]})
    first = checked.iloc[0]
    lines = ["## Does a drop set hold on new data? (`calibdrop check`)", "",
             f"Each distribution's held-out windows ({first['n_texts']} per distribution), checked as a user's own "
             f"texts would be by `calibdrop check` ({first['metric']}, {first['module']}-{first['k']}): against the "
             f"distribution's **own set** (from its calibration windows) and against the **borda consensus built "
             f"without it**, as for a user whose data no calibration distribution covers. ρ: Spearman between the "
             f"set's calibration ranking and the ranking on the held-out windows, beside those windows' split-half "
             f"noise floor; drift: permutation p < 0.05; excess: how much more importance the set drops than the "
             f"windows' own best set of the same size. The verdict keeps a set that drifts when its excess is at most "
             f"10%.", "",
             _table(shown[["distribution", "checked", "ρ to the set's ranking", "your noise floor [95% CI]",
                           "permutation p", "drift", "excess",
                           "verdict"]]), ""]
    for role, part in checked.groupby("checked", sort=False):
        kept = part.loc[part["verdict"] == "keep", "distribution"].tolist()
        others = part.loc[part["verdict"] != "keep", ["distribution", "verdict"]]
        lines.append(f"- **{role}**: kept on {len(kept)} of {len(part)} distributions" + (
            "; " + ", ".join(
                f"{row.distribution}: {row.verdict}" for row in others.itertuples()) if len(others) else "") + ".")
    lines += ["",
              "The windows are calibration-shaped (held-out documents, the run's window length) and no document gives "
              "windows to both sides, but windows of one document are not independent, which makes the permutation "
              "test's drift call sensitive; the verdict therefore rests on the excess, not on drift alone.", ""]
    return lines
