"""Accuracy that can resolve differences: item-level zero-shot correctness, paired exact McNemar tests, items needed.

Two drop sets evaluated on the same ``n`` items are compared by their discordant items:
``b`` items only ``a`` gets right, ``c`` items only ``b`` gets right.  The accuracy difference is
``(b - c) / n``; under equal accuracy ``b ~ Binomial(b + c, 1/2)``, so the exact two-sided
McNemar p-value is the binomial test's (``scipy.stats.binomtest``); the difference's CI comes
from a paired bootstrap over items.

Items needed to detect a difference ``delta`` with a two-sided level-``alpha`` McNemar test at
power ``1 - beta`` when a fraction ``p_d`` of items is discordant (Connor, 1987):
``n = (z_{1-alpha/2} sqrt(p_d) + z_{1-beta} sqrt(p_d - delta^2))^2 / delta^2``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError
from .stability import percentile_interval


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


def paired_accuracy(items: pd.DataFrame, a: str, b: str, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    delta: float = 0.03) -> pd.DataFrame:
    """Drop set ``a`` against ``b`` on the same items, per task.

    ``items`` has one row per ``drop_set``, ``task``, ``item`` with ``correct`` (0/1).  Columns:
    ``n``, ``acc_a``, ``acc_b``, ``difference`` (a − b) with its paired bootstrap CI, the discordant
    counts ``a_only``/``b_only``, ``p_mcnemar`` and ``items_for_delta``, the items a McNemar test
    needs to detect ``delta`` at this discordance (NaN when no item or every item is discordant beyond it).
    """
    missing = {a, b} - set(items["drop_set"])
    if missing:
        raise InputError(f"no items of drop set(s) {', '.join(sorted(missing))}; the items have {', '.join(sorted(set(items['drop_set'])))}")
    rng = np.random.default_rng(seed)
    rows = []
    for task, part in items.groupby("task", sort=False):
        wide = part.pivot_table(index="item", columns="drop_set", values="correct", aggfunc="first")
        if wide[[a, b]].isna().any().any():
            raise InputError(f"task {task}: {a} and {b} were not evaluated on the same items; pair them on the same --limit")
        x, y = wide[a].to_numpy(dtype=float), wide[b].to_numpy(dtype=float)
        n = len(x)
        replicates = (x - y)[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        low, high = percentile_interval(replicates, level)
        a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        discordant = (a_only + b_only) / n
        rows.append({"task": task, "a": a, "b": b, "n": n, "acc_a": x.mean(), "acc_b": y.mean(), "difference": (x - y).mean(),
                     "ci_low": low, "ci_high": high, "a_only": a_only, "b_only": b_only, "p_mcnemar": mcnemar_exact(a_only, b_only),
                     "items_for_delta": items_needed(discordant, delta) if delta**2 < discordant else np.nan})
    return pd.DataFrame(rows)


def item_correctness(model, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8, metric: str = "acc") -> pd.DataFrame:
    """Per item of each task, whether the model answers it correctly (lm-eval's ``metric``, zero-shot, the tasks'
    local copies as in :func:`analysis.evaluation.zero_shot_accuracy`): columns ``task, subtask, item, correct``."""
    from .evaluation import lm_eval_results

    results = lm_eval_results(model, tokenizer, tasks, limit=limit, batch_size=batch_size, log_samples=True)
    rows = []
    for key, samples in results["samples"].items():
        subtask = key.removeprefix("calibdrop_")
        task = "mmlu" if subtask.startswith("mmlu_") else subtask
        rows += [{"task": task, "subtask": subtask, "item": f"{subtask}:{sample['doc_id']}", "correct": int(sample[metric])} for sample in samples]
    return pd.DataFrame(rows)
