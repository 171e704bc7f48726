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

from . import ablation, consensus, documents, evaluation, models, plots, stability, validity
from .dropsets import UNPRUNED, DropSet, make_drop_set, parse_label
from .errors import InputError
from .io import atomic_write_json, provenance, read_cached_table, write_table
from .manifests import load_manifest, top_level
from .metrics import GROUND_TRUTH, check_metrics, get_metric
from .report import write_report
from .samples import calibration_samples, token_batches
from .scoring import aggregate_importance, score_distributions


@dataclass(frozen=True)
class RunSettings:
    """What ``calibdrop run`` computes; the presets fix these."""

    distributions: tuple[str, ...] = field(default_factory=top_level)
    subsets: bool = True
    metrics: tuple[str, ...] = ("cosine", "angular", "relative_update", "ablation")
    samples: int = 32
    seq_len: int = 512
    ablation_samples: int = 4
    ablation_seq_len: int = 128
    greedy_module: str = "attn"
    greedy_shortlist: int | None = 4
    subset_samples: int = 16
    subset_seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    n_boot: int = 1000
    n_perm: int = 1000
    budgets: dict = field(default_factory=lambda: {"attn": (4, 8), "mlp": (2, 4), "block": (2, 4), "joint": (4, 8)})
    transfer_module: str = "attn"
    transfer_k: tuple[int, ...] = (8,)
    own_set_metrics: tuple[str, ...] = ("cosine",)
    transfer_samples: int = 32
    transfer_seq_len: int = 128
    random_seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    task_limit: int | None = 100
    accuracy_sets: tuple[str, ...] = ("none", "cosine/attn-8:borda", "ablation/attn-8:greedy:robust")


PRESETS = {
    "default": RunSettings(),
    "quick": RunSettings(
        subsets=False, samples=16, seq_len=256, ablation_samples=4, ablation_seq_len=64, greedy_shortlist=4, n_boot=200, n_perm=200,
        budgets={"attn": (4, 8), "mlp": (4,), "block": (4,), "joint": (8,)}, transfer_k=(8,), transfer_samples=8, transfer_seq_len=128,
        random_seeds=(0,), tasks=("arc_easy", "piqa"), task_limit=20, accuracy_sets=("none", "cosine/attn-8:borda"),
    ),
    "paper": RunSettings(
        samples=256, seq_len=2048, ablation_samples=32, ablation_seq_len=2048, greedy_shortlist=None, subset_samples=64, subset_seq_len=2048,
        transfer_k=(4, 8), transfer_samples=64, transfer_seq_len=2048, random_seeds=(0, 1, 2), tasks=tuple(evaluation.PAPER_TASKS), task_limit=None,
        accuracy_sets=("none", "cosine/attn-4:borda", "cosine/attn-8:borda", "cosine/attn-8:minimax", "ablation/attn-8:greedy:robust",
                       "cosine/attn-8:random:0"),
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
    """Per metric, module kind and budget k: each consensus method's drop set and each distribution's own."""
    rows = []
    for metric in stability.metrics_in(scores):
        for module, ks in budgets.items():
            matrix = stability.importance_matrix(scores, module, metric)
            for k in ks:
                if k > len(matrix):
                    continue
                named = {method: consensus.consensus_from_matrix(matrix, k, method) for method in consensus.METHODS}
                named.update(consensus.single_distribution_sets(matrix, k))
                rows += [{"metric": metric, "module": module, "k": k, "drop_set": name, "indices": _as_labels(chosen)} for name, chosen in named.items()]
    return pd.DataFrame(rows)


def regrets(scores: pd.DataFrame, sets: pd.DataFrame) -> pd.DataFrame:
    """Regret of every drop set of :func:`consensus_sets` on every distribution, under the metric that chose it."""
    parts = []
    for (metric, module, k), group in sets.groupby(["metric", "module", "k"], sort=False):
        labels = {str(c): c for c in stability.importance_matrix(scores, module, metric).index}
        named = {row.drop_set: [labels[str(i)] for i in row.indices] for row in group.itertuples()}
        parts.append(consensus.regret_table(scores, named, module=module, metric=metric).assign(k=k))
    return pd.concat(parts, ignore_index=True)


def greedy_sets(paths: pd.DataFrame, module: str, ks) -> dict[str, DropSet]:
    """Greedy drop sets of every size in ``ks`` from the greedy paths (``ablation/<module>-k:greedy:<objective>``)."""
    sets = {}
    for objective, path in paths.groupby("objective", sort=False):
        for k in ks:
            if k <= len(path):
                chosen = make_drop_set(module, ablation.greedy_set(path, k), f"greedy:{objective}", GROUND_TRUTH)
                sets[chosen.label] = chosen
    return sets


def transfer_sets(scores: pd.DataFrame, paths: pd.DataFrame | None, settings: RunSettings) -> dict[str, DropSet]:
    """The drop sets evaluated on held-out text, by label, per budget: every metric's consensus (borda,
    minimax), each distribution's own set by the metrics of ``settings.own_set_metrics``, the greedy
    sets and random sets."""
    sets: dict[str, DropSet] = {}
    module = settings.transfer_module
    for k in settings.transfer_k:
        for metric in stability.metrics_in(scores):
            seeds = settings.random_seeds if metric == "cosine" else ()
            sets.update(evaluation.drop_sets_for_transfer(scores, module=module, k=k, random_seeds=seeds, metric=metric,
                                                          own=metric in settings.own_set_metrics))
    if paths is not None:
        sets.update(greedy_sets(paths, module, settings.transfer_k))
    return sets


def comparison_pairs(sets: dict, distributions, settings: RunSettings) -> list[tuple]:
    """The paired comparisons of the transfer stage, per budget: consensus cosine against each distribution's own
    cosine set (on that distribution), robust greedy against consensus cosine, each proxy's consensus against the ablation's."""
    pairs = []
    module = settings.transfer_module
    for k in settings.transfer_k:
        label = lambda metric, method: f"{metric}/{module}-{k}:{method}"  # noqa: E731
        borda = label("cosine", "borda")
        for d in distributions:
            pairs.append((f"{module}-{k}: cosine borda vs {d}'s own cosine set, on {d}", borda, label("cosine", f"own:{d}"), [d]))
            pairs.append((f"{module}-{k}: cosine borda vs {d}'s own cosine set", borda, label("cosine", f"own:{d}")))
        robust = label(GROUND_TRUTH, "greedy:robust")
        if robust in sets:
            pairs.append((f"{module}-{k}: robust greedy vs cosine borda", robust, borda))
        for metric in {parse_label(name)["metric"] for name in sets} - {GROUND_TRUTH, None}:
            pairs.append((f"{module}-{k}: {metric} borda vs ablation borda", label(metric, "borda"), label(GROUND_TRUTH, "borda")))
    return [pair for pair in pairs if pair[1] in sets and pair[2] in sets]


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
        load_manifest(name)
    proxies = tuple(m for m in check_metrics(settings.metrics) if get_metric(m).is_proxy)
    ground_truth = GROUND_TRUTH in settings.metrics
    model, tokenizer = timed("load model", lambda: models.load_model(spec, dtype=dtype, device=device))
    record = models.model_info(model)
    stages = Stages(out, record, log)
    base_key = [record.get("weights_sha256"), record.get("dtype"), asdict(settings)]
    manifests = {name: load_manifest(name)["_sha256"] for name in settings.distributions}

    def score(names, samples, seq_len, metrics):
        return score_distributions(model, tokenizer, names, n_samples=samples, seq_len=seq_len, batch_size=settings.batch_size,
                                   seed=settings.seed, metrics=metrics, cache=out / "parts" / "scores", progress=progress)

    parts = [timed("score proxies", lambda: stages.table("scores.proxies", stage_key("proxies", base_key, manifests),
                                                         lambda: score(settings.distributions, settings.samples, settings.seq_len, proxies)))]
    if ground_truth:
        parts.append(timed("score ablation", lambda: stages.table(
            "scores.ablation", stage_key("ablation", base_key, manifests),
            lambda: score(settings.distributions, settings.ablation_samples, settings.ablation_seq_len, (GROUND_TRUTH,)))))
    top = stages.table("scores.per_sample", stage_key("per_sample", base_key, manifests), lambda: pd.concat(parts, ignore_index=True))
    stages.table("scores", stage_key("aggregate", base_key, manifests), lambda: aggregate_importance(top, by=["distribution"]))
    subset_names = [s for name in settings.distributions for s in documents.subsets(name)] if settings.subsets else []
    subsets = None
    if subset_names:
        subsets = timed("score sub-distributions", lambda: stages.table(
            "subsets.per_sample", stage_key("subsets", base_key, manifests, subset_names),
            lambda: score(subset_names, settings.subset_samples, settings.subset_seq_len, proxies)))

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
            lambda: stability.rank_agreement(subsets, module="attn", k=settings.budgets.get("attn", (1,)), metric="cosine"))
    if ground_truth:
        tables["validity"] = timed("metric validity", lambda: stages.table(
            "validity", stage_key("validity", base_key, manifests),
            lambda: validity.metric_validity(top, modules=modules, n_boot=settings.n_boot, seed=settings.seed)))
    tables["decomposition"] = stages.table("decomposition", stage_key("decomposition", base_key, manifests),
                                           lambda: validity.ranking_decomposition(top, modules=modules))
    sets = stages.table("drop_sets", stage_key("drop_sets", base_key, manifests), lambda: consensus_sets(top, settings.budgets))
    tables["regret"] = stages.table("regret", stage_key("regret", base_key, manifests), lambda: regrets(top, sets))
    tables["leave_one_out"] = stages.table("leave_one_out", stage_key("loo", base_key, manifests),
                                           lambda: consensus.leave_one_out_at_budgets(top, settings.budgets))

    paths = None
    if ground_truth and settings.greedy_module:
        paths = timed("greedy drop sets", lambda: greedy_paths(model, tokenizer, top, settings, stages, base_key, manifests, progress))
        tables["greedy"] = paths

    named_sets = transfer_sets(top, paths, settings)
    heldout: dict = {}

    def heldout_windows(name):
        if name not in heldout:
            heldout.update(evaluation.heldout_samples(tokenizer, [name], n_samples=settings.transfer_samples,
                                                      seq_len=settings.transfer_seq_len, seed=settings.seed))
        return {name: heldout[name]}

    evaluated = {UNPRUNED: None, **named_sets}
    set_key = {name: (s.candidates() if s else None) for name, s in evaluated.items()}
    windows = timed("held-out windows", lambda: pd.concat([
        stages.table(f"parts/heldout-{name}", stage_key("heldout", base_key, manifests, name, set_key),
                     lambda name=name: evaluation.window_nll(model, heldout_windows(name), evaluated, progress=False))
        for name in tqdm(settings.distributions, desc="held-out evaluation", unit="dist", disable=not progress)
    ], ignore_index=True))
    tables["heldout_windows"] = windows
    tables["transfer"] = stages.table("transfer", stage_key("transfer", base_key, manifests, set_key),
                                      lambda: evaluation.transfer_summary(windows, n_boot=settings.n_boot, seed=settings.seed))
    tables["comparisons"] = stages.table("comparisons", stage_key("comparisons", base_key, manifests, set_key), lambda: evaluation.paired_comparisons(
        windows, comparison_pairs(named_sets, settings.distributions, settings), n_boot=settings.n_boot, seed=settings.seed))

    accuracy_parts = []
    for name in tqdm(settings.accuracy_sets, desc="zero-shot accuracy", unit="set", disable=not progress):
        if name != UNPRUNED and name not in named_sets:
            continue
        chosen = named_sets.get(name)
        key = stage_key("accuracy", base_key, name, set_key.get(name), settings.tasks, settings.task_limit)
        part = stages.table(f"parts/accuracy-{name.replace(':', '_').replace('/', '_')}", key, lambda chosen=chosen, name=name: evaluation.zero_shot_accuracy(
            evaluation.pruned_copy(model, chosen), tokenizer, settings.tasks, limit=settings.task_limit).assign(drop_set=name))
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


def greedy_paths(model, tokenizer, scores, settings: RunSettings, stages: Stages, base_key, manifests, progress) -> pd.DataFrame:
    """Greedy drop paths by real calibration loss, per distribution and robust, on the ablation's windows.

    With ``settings.greedy_shortlist`` each step tries the candidates of smallest single-drop
    ablation cost (own distribution's; the largest over distributions for robust).
    """
    module, k = settings.greedy_module, max(settings.budgets.get(settings.greedy_module, settings.transfer_k))
    batches = {name: list(token_batches(calibration_samples(
        documents.load_distribution(name, "calibration"), tokenizer, n_samples=settings.ablation_samples, seq_len=settings.ablation_seq_len,
        seed=settings.seed), settings.batch_size)) for name in settings.distributions}
    prior = stability.importance_matrix(scores, module, GROUND_TRUTH)
    parts = []
    for objective in [*settings.distributions, "robust"]:
        cost = prior.max(axis=1) if objective == "robust" else prior[objective]
        parts.append(stages.table(f"parts/greedy-{objective}", stage_key("greedy", base_key, manifests, objective), lambda objective=objective, cost=cost:
                                  ablation.greedy_drop_path(model, batches, module=module, k=k, objective=objective,
                                                            shortlist=settings.greedy_shortlist, prior=cost.to_dict(), progress=progress)))
    return pd.concat(parts, ignore_index=True)


def draw_figures(scores, tables, folder: Path, k: int) -> list[Path]:
    """Every figure of the report."""
    cosine, cosine_tables = stability.one_metric(scores, "cosine")[0], stability.tables_of_metric(tables, "cosine")
    written = plots.stability_figures(cosine, cosine_tables, folder, k)
    if len(tables.get("transfer", [])):
        written += plots.save_figure(plots.transfer_heatmap(tables["transfer"]), folder / "transfer_matrix")
        written += plots.save_figure(plots.worst_case_forest(tables["transfer"]), folder / "transfer_worst_case")
    if len(tables.get("regret", [])):
        written += plots.save_figure(plots.regret_overview(cosine_tables["regret"]), folder / "regret_consensus_vs_single")
    if len(tables.get("validity", [])):
        written += plots.save_figure(plots.validity_heatmap(tables["validity"]), folder / "metric_validity")
        written += plots.save_figure(plots.proxy_vs_ablation(scores), folder / "proxy_vs_ablation")
    if len(tables.get("decomposition", [])):
        written += plots.save_figure(plots.decomposition_bars(tables["decomposition"]), folder / "ranking_decomposition")
    return written
