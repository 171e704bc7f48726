"""Accuracy that can resolve differences: item-level zero-shot correctness, paired exact McNemar tests, items needed.

Two drop sets evaluated on the same ``n`` items are compared by their discordant items:
``b`` items only ``a`` gets right, ``c`` items only ``b`` gets right.  The accuracy difference is
``(b - c) / n``; under equal accuracy ``b ~ Binomial(b + c, 1/2)``, so the exact two-sided
McNemar p-value is the binomial test's (``scipy.stats.binomtest``); the difference's CI is a
percentile bootstrap over items of the per-item differences (``scipy.stats.bootstrap``: paired).

A task is compared only where the unpruned model is clearly above chance: the one-sided exact
binomial test of its correct count against the task's chance rate has ``p < alpha``; elsewhere a
difference between drop sets measures noise around guessing.

Items needed to detect a difference ``delta`` with a two-sided level-``alpha`` McNemar test at
power ``1 - beta`` when a fraction ``p_d`` of items is discordant (Connor, 1987):
``n = (z_{1-alpha/2} sqrt(p_d) + z_{1-beta} sqrt(p_d - delta^2))^2 / delta^2``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..errors import InputError
from ..importance.ablation import block_inputs, stack_from
from ..models.pruning import modules_dropped
from ..study.dropsets import UNPRUNED
from .heldout import CHANCE, lm_eval_results, removed_modules

ITEM_COLUMNS = {"acc": "correct", "acc_norm": "correct_norm"}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (1 when there are none)."""
    if a_only < 0 or b_only < 0:
        raise InputError(f"discordant counts must be non-negative, not {a_only} and {b_only}")
    discordant = a_only + b_only
    return 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)


def items_needed(discordant: float, delta: float = 0.03, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items for a McNemar test to detect an accuracy difference ``delta`` (Connor's formula, module docstring)."""
    if not 0 < delta**2 < discordant <= 1:
        raise InputError(f"need 0 < delta^2 < discordant fraction <= 1; got delta {delta}, discordant {discordant}")
    z_alpha, z_beta = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return math.ceil((z_alpha * math.sqrt(discordant) + z_beta * math.sqrt(discordant - delta**2)) ** 2 / delta**2)


def above_chance(correct: int, n: int, chance: float) -> float:
    """One-sided exact binomial p-value that an accuracy of ``correct / n`` is above ``chance``."""
    return float(stats.binomtest(correct, n, chance, alternative="greater").pvalue)


def paired_accuracy(items: pd.DataFrame, a: str, b: str, *, column: str = "correct", n_boot: int = 1000,
                    level: float = 0.95,
                    seed: int = 0, delta: float = 0.03, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Drop set ``a`` against ``b`` on the same items, per task.

    ``items`` has one row per ``drop_set``, ``task``, ``item`` with 0/1 ``column``.  Columns:
    ``n``, ``acc_a``, ``acc_b``, ``difference`` (a − b) with its paired bootstrap CI, the discordant
    counts ``a_only``/``b_only`` and ``discordant`` rate, ``p_mcnemar`` and ``items_for_delta``, the items a McNemar
    test needs to detect ``delta`` at this discordance (NaN when ``discordant <= delta^2``: no such difference fits).
    """
    missing = {a, b} - set(items["drop_set"])
    if missing:
        raise InputError(
            f"no items of drop set(s) {', '.join(sorted(missing))}; the items have "
            f"{', '.join(sorted(set(items['drop_set'])))}")
    rng = np.random.default_rng(seed)
    rows = []
    for task, part in items[items["drop_set"].isin([a, b])].groupby("task", sort=False):
        wide = part.pivot_table(index="item", columns="drop_set", values=column, aggfunc="first")
        if {a, b} - set(wide.columns) or wide[[a, b]].isna().any().any():
            raise InputError(
                f"task {task}: {a} and {b} were not evaluated on the same items; pair them on the same --limit")
        x, y = wide[a].to_numpy(dtype=float), wide[b].to_numpy(dtype=float)
        n = len(x)
        interval = stats.bootstrap((x - y,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                                   rng=rng).confidence_interval
        a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        discordant = (a_only + b_only) / n
        rows.append({"task": task, "a": a, "b": b, "n": n, "acc_a": x.mean(), "acc_b": y.mean(),
                     "difference": (x - y).mean(),
                     "ci_low": interval.low, "ci_high": interval.high, "a_only": a_only, "b_only": b_only,
                     "discordant": discordant,
                     "p_mcnemar": mcnemar_exact(a_only, b_only),
                     "items_for_delta": items_needed(discordant, delta, alpha=alpha,
                                                     power=power) if delta**2 < discordant else np.nan})
    return pd.DataFrame(rows)


def headline_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``acc_norm`` where a task has it, else ``acc`` (the measure the report shows); ``frame`` has ``task``
    and ``measure``."""
    normalised = set(frame.loc[frame["measure"] == "acc_norm", "task"])
    return frame[(frame["measure"] == "acc_norm") | ~frame["task"].isin(normalised)]


def accuracy_table(items: pd.DataFrame) -> pd.DataFrame:
    """Per drop set, task and lm-eval metric (``acc``, ``acc_norm`` where the task has it): accuracy ``value`` = the
    mean
    of the items' correctness (MMLU: over all its subjects' items, i.e. size-weighted), ``n``, the binomial
    ``stderr = sqrt(value (1 - value) / n)`` and the task's ``chance`` rate (the table of
    :func:`analysis.evaluation.heldout.zero_shot_accuracy`)."""
    renamed = items.rename(columns={column: metric for metric, column in ITEM_COLUMNS.items()})
    long = renamed.melt(id_vars=["drop_set", "task", "item"], value_vars=[m for m in ITEM_COLUMNS if m in renamed],
                        var_name="metric",
                        value_name="right").dropna(subset=["right"])
    table = long.groupby(["drop_set", "task", "metric"], sort=False)["right"].agg(value="mean", n="size").reset_index()
    table["stderr"] = np.sqrt(table["value"] * (1 - table["value"]) / table["n"])
    table["chance"] = table["task"].map(CHANCE)
    return table[["task", "metric", "value", "n", "stderr", "chance", "drop_set"]]


def screen_tasks(items: pd.DataFrame, *, baseline: str = UNPRUNED, alpha: float = 0.05) -> pd.DataFrame:
    """Per task and measure, whether ``baseline`` is clearly above the task's chance rate: ``p_above_chance`` is the
    one-sided exact binomial test (:func:`above_chance`) of its correct count, ``included`` is ``p < alpha``.  Also
    ``n_items`` evaluated and ``n_available``, the items the task has."""
    if baseline not in set(items["drop_set"]):
        raise InputError(
            f"no items of the baseline {baseline!r}; the items have {', '.join(sorted(set(items['drop_set'])))}")
    base = items[items["drop_set"] == baseline]
    available = base.groupby(["task", "subtask"], sort=False)["subtask_items"].first().groupby("task", sort=False).sum()
    rows = []
    for (task, measure), part in accuracy_table(base).groupby(["task", "metric"], sort=False):
        row = part.iloc[0]
        correct = int(round(row["value"] * row["n"]))
        p = above_chance(correct, int(row["n"]), row["chance"])
        rows.append({"task": task, "measure": measure, "accuracy": row["value"], "chance": row["chance"],
                     "n_items": int(row["n"]),
                     "n_available": int(available[task]), "p_above_chance": p, "alpha": alpha, "included": p < alpha})
    return pd.DataFrame(rows)


def accuracy_analysis(items: pd.DataFrame, pairs, *, task_limit: int | None, baseline: str = UNPRUNED,
                      delta: float = 0.03,
                      alpha: float = 0.05, power: float = 0.8, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paired table and the per-task table of a run's items.

    ``pairs`` lists ``(comparison, a, b)``.  Paired table: :func:`paired_accuracy` of every pair on every measure
    (``acc``, ``acc_norm``) of every task where :func:`screen_tasks` includes it, with ``comparison``, ``measure`` and
    ``q_bh``, the McNemar p-values adjusted over the table's rows of that measure (Benjamini-Hochberg,
    ``scipy.stats.false_discovery_control``).
    Task table: :func:`screen_tasks` with, over that task's pairs, the range of the discordant rate and of the items
    needed to resolve ``delta`` (``items_needed_min``/``_max``), and whether ``task_limit`` (None: the whole task) and
    the whole task (``n_available``) reach the largest of them (``limit_suffices``, ``task_suffices``); ``delta`` and
    ``power`` are columns too.
    """
    screen = screen_tasks(items, baseline=baseline, alpha=alpha)
    parts = []
    for measure, column in ITEM_COLUMNS.items():
        tasks = screen.loc[screen["included"] & (screen["measure"] == measure), "task"]
        chosen = items[items["task"].isin(tasks)]
        for comparison, a, b in pairs if len(chosen) else ():
            parts.append(paired_accuracy(chosen, a, b, column=column, n_boot=n_boot, level=level, seed=seed,
                                         delta=delta, alpha=alpha,
                                         power=power).assign(comparison=comparison, measure=measure))
    if not parts:
        spread = pd.DataFrame(columns=["task", "measure", "discordant_min", "discordant_max", "items_needed_min",
                                       "items_needed_max"])
        return pd.DataFrame(columns=["comparison", "measure", "task", "a",
                                     "b"]), _sufficiency(screen.merge(spread, how="left"), task_limit, delta, power)
    paired = pd.concat(parts, ignore_index=True)
    paired["q_bh"] = paired.groupby("measure")["p_mcnemar"].transform(stats.false_discovery_control)
    paired = paired[["comparison", "measure", *[c for c in paired.columns if c not in ("comparison", "measure")]]]
    spread = paired.groupby(["task", "measure"]).agg(discordant_min=("discordant", "min"),
                                                     discordant_max=("discordant", "max"),
                                                      items_needed_min=("items_for_delta", "min"),
                                                      items_needed_max=("items_for_delta", "max"))
    return paired, _sufficiency(screen.merge(spread.reset_index(), on=["task", "measure"], how="left"), task_limit,
                                delta, power)


def _sufficiency(tasks: pd.DataFrame, task_limit: int | None, delta: float, power: float) -> pd.DataFrame:
    """``limit_suffices``: the items ``task_limit`` evaluates (None: the whole task) reach ``items_needed_max``;
    ``task_suffices``: the whole task does; with the ``delta`` and ``power`` they were sized for."""
    tasks = tasks.astype({column: float for column in ("discordant_min", "discordant_max", "items_needed_min",
                                                       "items_needed_max")})
    limit = tasks["n_available"] if task_limit is None else np.minimum(task_limit, tasks["n_available"])
    tasks["limit_suffices"] = tasks["items_needed_max"].notna() & (limit >= tasks["items_needed_max"])
    tasks["task_suffices"] = tasks["items_needed_max"].notna() & (tasks["n_available"] >= tasks["items_needed_max"])
    return tasks.assign(delta=delta, power=power)


class KeptInputs:
    """Block inputs of the unpruned model's lm-eval batches at ``layers``, by the batch's tokens, so that a drop set
    whose first removed layer is ``L`` runs only blocks ``L ..`` and the LM head on each batch the unpruned model ran.

    lm-eval orders and pads the requests of given tasks and limit the same way for every model, so a pruned model's
    batch is one the unpruned model ran, and blocks ``0 .. L - 1`` compute there what they compute here: the logits
    equal those of the whole pass with the set removed (same bits, as in
    :func:`analysis.evaluation.heldout.window_nll`).  Inputs stay within ``max_bytes``; a batch without one runs whole.
    """

    def __init__(self, layers, max_bytes: int = 2 ** 30):
        self.layers = sorted(set(layers))
        self.inputs: dict = {}
        self.max_bytes, self.kept_bytes = max_bytes, 0

    @classmethod
    def for_sets(cls, drop_sets, max_bytes: int = 2 ** 30) -> KeptInputs:
        """Kept inputs at the first removed layer of each of ``drop_sets`` (``None``: the unpruned model)."""
        return cls((min(layer for _, layer in members) for members in map(removed_modules, drop_sets) if members),
                   max_bytes)

    def logits(self, model, input_ids: torch.Tensor, dropped=()) -> torch.Tensor:
        """Logits of ``model`` with ``dropped`` (``(kind, layer)`` pairs) removed on ``input_ids`` (no KV cache):
        kept for the unpruned model, resumed at the first removed layer for a drop set."""
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes())
        if not dropped:
            with block_inputs(model, self.layers) as resid_pre:
                logits = model(input_ids, use_cache=False).logits
            for layer in self.layers:
                if (key, layer) in self.inputs:
                    continue
                size = resid_pre[layer].numel() * resid_pre[layer].element_size()
                if self.kept_bytes + size <= self.max_bytes:
                    self.inputs[(key, layer)] = resid_pre[layer]
                    self.kept_bytes += size
            return logits
        start = min(layer for _, layer in dropped)
        kept = self.inputs.get((key, start))
        with modules_dropped(model, dropped):
            if kept is None:
                return model(input_ids, use_cache=False).logits
            with stack_from(model, start):
                return model(inputs_embeds=kept, use_cache=False).logits


def item_correctness(model, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8,
                     dropped=(), kept: KeptInputs | None = None) -> pd.DataFrame:
    """Per item of each task, whether the model answers it correctly, zero-shot through lm-eval on the tasks' local
    copies (as :func:`analysis.evaluation.heldout.zero_shot_accuracy`).  Columns ``task, subtask, item, correct``
    (lm-eval's
    ``acc``: the answer of highest log-likelihood is right), ``correct_norm`` (``acc_norm``: of highest
    length-normalised log-likelihood; NaN where the task has none) and ``subtask_items`` (the items the subtask has,
    of which ``limit`` were evaluated).  ``dropped`` (``(kind, layer)`` pairs) are removed for the evaluation, through
    ``kept`` (:class:`KeptInputs`) when given."""
    kept = kept or KeptInputs([])
    results = lm_eval_results(model, tokenizer, tasks, limit=limit, batch_size=batch_size, log_samples=True,
                              logits_of=lambda model, ids: kept.logits(model, ids, dropped))
    rows = []
    for key, samples in results["samples"].items():
        subtask = key.removeprefix("calibdrop_")
        task = "mmlu" if subtask.startswith("mmlu_") else subtask
        size = results["n-samples"][key]["original"]
        rows += [{"task": task, "subtask": subtask, "item": f"{subtask}:{sample['doc_id']}",
                  **{column: float(sample[metric]) if metric in sample else np.nan for metric,
                     column in ITEM_COLUMNS.items()},
                  "subtask_items": size} for sample in samples]
    return pd.DataFrame(rows)


def items_of_set(model, tokenizer, name: str, drop_set, tasks, *, limit: int | None = None,
                 kept: KeptInputs | None = None) -> pd.DataFrame:
    """:func:`item_correctness` of ``model`` with ``drop_set`` removed (``None``: the model itself), with a
    ``drop_set`` column ``name``; ``kept`` (:class:`KeptInputs`) shares the unpruned model's block inputs."""
    return item_correctness(model, tokenizer, tasks, limit=limit, dropped=removed_modules(drop_set),
                            kept=kept).assign(drop_set=name)
