"""The main job: score every distribution, measure stability, choose drop sets, prune, evaluate, report.

Every stage writes its result atomically under the output folder with a sidecar holding a
key (the sha256 of the model's weights checksum, the preset and the stage's inputs).  A
rerun skips every stage whose saved key matches, so a run killed at any point and started
again recomputes nothing already saved; the report is rebuilt from the saved tables.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from . import consensus, data, evaluation, models, plots, stability
from .errors import InputError
from .io import atomic_write_json, provenance, read_cached_table, write_table
from .report import write_report
from .scoring import aggregate_importance, score_distributions


@dataclass(frozen=True)
class RunSettings:
    """What ``calibdrop run`` computes; the presets fix these."""

    distributions: tuple[str, ...] = data.TOP_LEVEL
    subsets: bool = True
    samples: int = 64
    seq_len: int = 512
    subset_samples: int = 32
    subset_seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    n_boot: int = 1000
    n_perm: int = 1000
    budgets: dict = field(default_factory=lambda: {"attn": (4, 8), "mlp": (2, 4), "block": (2, 4), "joint": (4, 8)})
    transfer_module: str = "attn"
    transfer_k: tuple[int, ...] = (4, 8)
    transfer_samples: int = 8
    transfer_seq_len: int = 256
    random_seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = ("arc_easy", "hellaswag", "piqa", "boolq")
    task_limit: int | None = 50
    accuracy_sets: tuple[str, ...] = ("none", "attn-8:borda", "attn-8:minimax", "attn-8:random")


PRESETS = {
    "default": RunSettings(),
    "quick": RunSettings(
        subsets=False, samples=16, seq_len=256, n_boot=200, n_perm=200, budgets={"attn": (4, 8), "mlp": (4,), "block": (4,), "joint": (8,)},
        transfer_k=(8,), transfer_samples=4, transfer_seq_len=256, random_seeds=(0,), tasks=("arc_easy", "piqa"), task_limit=20,
        accuracy_sets=("none", "attn-8:borda"),
    ),
    "paper": RunSettings(
        samples=256, seq_len=2048, subset_samples=64, subset_seq_len=2048, transfer_samples=64, transfer_seq_len=2048,
        random_seeds=(0, 1, 2), tasks=tuple(evaluation.PAPER_TASKS), task_limit=None,
        accuracy_sets=("none", "attn-4:borda", "attn-4:minimax", "attn-8:borda", "attn-8:minimax", "attn-8:random"),
    ),
}


STABILITY_TABLES = ("agreement", "bootstrap_importance", "bootstrap_pairs", "split_half", "permutation", "convergence", "convergence_summary")


def stage_key(*parts) -> str:
    """sha256 of the JSON of everything a stage's result depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Stages:
    """Saved stage results under ``folder``, each reused while its key matches."""

    def __init__(self, folder: Path, model_record: dict, log: Callable[[str], None]):
        self.folder = Path(folder)
        self.model_record = model_record
        self.log = log
        self.reused: list[str] = []
        self.computed: list[str] = []

    def table(self, name: str, key: str, compute: Callable[[], pd.DataFrame], **record) -> pd.DataFrame:
        """The table ``name``: read if saved intact with ``key``, else computed and saved."""
        path = self.folder / f"{name}.parquet"
        saved = read_cached_table(path, {"stage_key": key})
        if saved is not None:
            self.reused.append(name)
            return saved
        self.log(f"computing {name}")
        frame = compute()
        write_table(frame, path, provenance(kind=name, stage_key=key, model=self.model_record, **record))
        self.computed.append(name)
        return frame


def _as_labels(value) -> list[str]:
    """Drop-set members as strings (``"3"``, ``"attn:3"``), so tables of several module kinds share one column type."""
    return [str(v) for v in value]


def consensus_sets(scores: pd.DataFrame, budgets: dict) -> pd.DataFrame:
    """Per module kind and budget k: each consensus method's drop set and each distribution's own."""
    rows = []
    for module, ks in budgets.items():
        matrix = stability.importance_matrix(scores, module)
        for k in ks:
            if k > len(matrix):
                continue
            for method in consensus.METHODS:
                rows.append({"module": module, "k": k, "drop_set": method, "indices": _as_labels(consensus.consensus_from_matrix(matrix, k, method))})
            for name, chosen in consensus.single_distribution_sets(matrix, k).items():
                rows.append({"module": module, "k": k, "drop_set": name, "indices": _as_labels(chosen)})
    return pd.DataFrame(rows)


def regrets(scores: pd.DataFrame, sets: pd.DataFrame) -> pd.DataFrame:
    """Regret of every drop set of :func:`consensus_sets` on every distribution."""
    parts = []
    for (module, k), group in sets.groupby(["module", "k"], sort=False):
        labels = {str(c): c for c in stability.importance_matrix(scores, module).index}
        named = {row.drop_set: [labels[str(i)] for i in row.indices] for row in group.itertuples()}
        parts.append(consensus.regret_table(scores, named, module=module).assign(k=k))
    return pd.concat(parts, ignore_index=True)


def transfer_sets(scores: pd.DataFrame, settings: RunSettings) -> dict:
    """The named drop sets of the transfer matrix: none, and per k own/borda/minimax/random."""
    sets = {"none": None}
    for k in settings.transfer_k:
        family = evaluation.drop_sets_for_transfer(scores, module=settings.transfer_module, k=k, random_seeds=settings.random_seeds)
        sets.update({f"{settings.transfer_module}-{k}:{name}": spec for name, spec in family.items() if name != "none"})
    return sets


def run(spec: str = models.DEFAULT_MODEL, out: Path = Path("results"), *, preset: str | RunSettings = "default",
        dtype=None, device=None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the whole study for one model into ``out``; returns where everything went."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    settings = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, fn):
        begin = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - begin, 1)
        return value

    for name in settings.distributions:
        data.load_manifest(name)
    model, tokenizer = timed("load model", lambda: models.load_model(spec, dtype=dtype, device=device))
    record = models.model_info(model)
    stages = Stages(out, record, log)
    base_key = [record.get("weights_sha256"), record.get("dtype"), asdict(settings)]
    manifests = {name: data.load_manifest(name)["_sha256"] for name in settings.distributions}

    def score(names, samples, seq_len):
        return score_distributions(model, tokenizer, names, n_samples=samples, seq_len=seq_len, batch_size=settings.batch_size,
                                   seed=settings.seed, cache=out / "parts" / "scores", progress=progress)

    top = timed("score distributions", lambda: stages.table(
        "scores.per_sample", stage_key("scores", base_key, manifests), lambda: score(settings.distributions, settings.samples, settings.seq_len)))
    stages.table("scores", stage_key("aggregate", base_key, manifests), lambda: aggregate_importance(top, by=["distribution"]))
    subset_names = [s for name in settings.distributions for s in data.subsets(name)] if settings.subsets else []
    subsets = None
    if subset_names:
        subsets = timed("score sub-distributions", lambda: stages.table(
            "subsets.per_sample", stage_key("subsets", base_key, manifests, subset_names),
            lambda: score(subset_names, settings.subset_samples, settings.subset_seq_len)))

    modules = tuple(settings.budgets)
    ks = tuple(sorted({k for values in settings.budgets.values() for k in values}))
    bundle_cache: dict = {}

    def stability_bundle():
        if not bundle_cache:
            bundle_cache.update(stability.stability_tables(top, modules=modules, k=ks, n_boot=settings.n_boot, n_perm=settings.n_perm, seed=settings.seed))
        return bundle_cache

    tables = timed("stability", lambda: {
        name: stages.table(name, stage_key(name, base_key, manifests), lambda name=name: stability_bundle()[name])
        for name in STABILITY_TABLES
    })
    if subsets is not None:
        tables["subset_agreement"] = stages.table(
            "subset_agreement", stage_key("subset_agreement", base_key, manifests, subset_names),
            lambda: stability.rank_agreement(subsets, module="attn", k=settings.budgets.get("attn", (1,))))
    sets = stages.table("drop_sets", stage_key("drop_sets", base_key, manifests), lambda: consensus_sets(top, settings.budgets))
    tables["regret"] = stages.table("regret", stage_key("regret", base_key, manifests), lambda: regrets(top, sets))
    tables["leave_one_out"] = stages.table("leave_one_out", stage_key("loo", base_key, manifests),
                                           lambda: consensus.leave_one_out_at_budgets(top, settings.budgets))

    named_sets = transfer_sets(top, settings)
    heldout: dict = {}
    base: dict = {}

    def heldout_samples():
        if not heldout:
            heldout.update(evaluation.heldout_samples(tokenizer, list(settings.distributions), n_samples=settings.transfer_samples,
                                                      seq_len=settings.transfer_seq_len, seed=settings.seed))
        return heldout

    def unpruned():
        if not base:
            base.update(evaluation.unpruned_perplexities(model, heldout_samples()))
        return base

    transfer_parts = []
    for name, spec_ in tqdm(named_sets.items(), desc="transfer matrix", unit="set", disable=not progress):
        key = stage_key("transfer", base_key, manifests, name, spec_)
        part = stages.table(f"parts/transfer-{name.replace(':', '_')}", key, lambda spec_=spec_, name=name: pd.DataFrame(
            evaluation.perplexity_rows(model, name, spec_, heldout_samples(), unpruned())))
        if spec_ is None and not base:
            base.update(part.set_index("distribution")["ppl"].to_dict())
        transfer_parts.append(part)
    tables["transfer"] = pd.concat(transfer_parts, ignore_index=True)
    base_ppl = tables["transfer"][tables["transfer"]["drop_set"] == "none"].set_index("distribution")["ppl"]
    tables["transfer"]["ppl_ratio"] = tables["transfer"]["ppl"] / tables["transfer"]["distribution"].map(base_ppl)

    accuracy_parts = []
    for name in tqdm(settings.accuracy_sets, desc="zero-shot accuracy", unit="set", disable=not progress):
        if name not in named_sets:
            continue
        variants = named_sets[name] if isinstance(named_sets[name], list) else [named_sets[name]]
        for index, variant in enumerate(variants[:1] if name.endswith("random") else variants):
            key = stage_key("accuracy", base_key, name, variant, settings.tasks, settings.task_limit)
            part = stages.table(f"parts/accuracy-{name.replace(':', '_')}-{index}", key, lambda variant=variant, name=name: evaluation.zero_shot_accuracy(
                evaluation.pruned_copy(model, variant), tokenizer, settings.tasks, limit=settings.task_limit).assign(drop_set=name))
            accuracy_parts.append(part)
    tables["accuracy"] = pd.concat(accuracy_parts, ignore_index=True) if accuracy_parts else pd.DataFrame()

    figures = timed("figures", lambda: draw_figures(top, tables, out / "figures", max(ks)))
    report = write_report(out, record, settings, top, tables, sets, figures)
    summary = {
        "out": str(out),
        "report": [str(p) for p in report],
        "figures": len(figures),
        "stages_computed": stages.computed,
        "stages_reused": stages.reused,
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
    }
    atomic_write_json(out / "run_summary.json", {**summary, "provenance": provenance(kind="run", model=record, settings=asdict(settings))})
    return summary


def draw_figures(scores, tables, folder: Path, k: int) -> list[Path]:
    """Every figure of the report."""
    written = plots.stability_figures(scores, tables, folder, k)
    if len(tables.get("transfer", [])):
        written += plots.save_figure(plots.transfer_heatmap(tables["transfer"]), folder / "transfer_matrix")
    if len(tables.get("regret", [])):
        written += plots.save_figure(plots.regret_overview(tables["regret"]), folder / "regret_consensus_vs_single")
    return written
