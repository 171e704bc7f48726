"""Which drop sets a study builds, evaluates on held-out text and compares, and what each removes.

Every set comes from :func:`analysis.study.dropsets.drop_set_family` (consensus methods, each
distribution's own, random) or from the greedy paths by real loss; :func:`evaluated_sets` picks
the ones the held-out stage evaluates and :func:`comparison_pairs` the paired comparisons.
"""

from __future__ import annotations

import pandas as pd

from ..importance import ablation
from ..importance.metrics import GROUND_TRUTH
from ..models.pruning import modules_dropped
from ..presets import RunSettings
from . import consensus, stability
from .dropsets import (PAPER_DISTRIBUTION, UNPRUNED, DropSet, drop_set_family, last_k_set, make_drop_set,
                       parse_label)


def _as_labels(value) -> list[str]:
    """Drop-set members as strings (``"3"``, ``"attn:3"``), so tables of several module kinds share one column type."""
    return [str(v) for v in value]


def consensus_sets(scores: pd.DataFrame, budgets: dict) -> pd.DataFrame:
    """Per metric, module kind and budget k: each consensus method's drop set and each distribution's own
    (:func:`drop_set_family`)."""
    rows = []
    for metric in stability.metrics_in(scores):
        for module, ks in budgets.items():
            n_candidates = len(stability.importance_matrix(scores, module, metric))
            for k in (k for k in ks if k <= n_candidates):
                family = drop_set_family(scores, module=module, k=k, metric=metric)
                rows += [{"metric": metric, "module": module, "k": k, "drop_set": s.method,
                          "indices": _as_labels(s.indices)} for s in family.values()]
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


def baseline_sets(scores: pd.DataFrame, module: str, k: int) -> dict[str, DropSet]:
    """The baselines every module kind and budget is weighed against, by label: drop the last k
    (:func:`~analysis.study.dropsets.last_k_set`) and the paper's recipe, cosine's own set of the general-text
    distribution (when the run scores both)."""
    candidates = list(stability.importance_matrix(scores, module, stability.metrics_in(scores)[0]).index)
    sets = {(last := last_k_set(candidates, module, k)).label: last}
    if "cosine" in stability.metrics_in(scores) and PAPER_DISTRIBUTION in set(scores["distribution"]):
        general = scores[scores["distribution"] == PAPER_DISTRIBUTION]
        sets.update(drop_set_family(general, module=module, k=k, metric="cosine", methods=(), own=True))
    return sets


def evaluated_sets(scores: pd.DataFrame, paths: pd.DataFrame | None, settings: RunSettings) -> dict[str, DropSet]:
    """The drop sets evaluated on held-out text, by label.  Attention, per budget: every metric's borda
    and minimax sets, each distribution's own set by the metrics of ``settings.own_metrics``,
    random sets (labelled with the primary metric) and the greedy sets.  Every other module kind of
    ``settings.transfer_modules`` at its largest budget: every metric's borda set and one random set.  Every module
    kind and budget: the baselines (:func:`baseline_sets`)."""
    sets: dict[str, DropSet] = {}
    for module in settings.transfer_modules:
        attention = module == "attn"
        for k in settings.budget(module):
            for metric in stability.metrics_in(scores):
                primary = metric == settings.primary_metric
                seeds = (settings.random_seeds if attention else settings.random_seeds[:1]) if primary else ()
                methods = ("borda", "minimax") if attention else ("borda",)
                sets.update(drop_set_family(scores, module=module, k=k, metric=metric, methods=methods,
                                            own=attention and metric in settings.own_metrics, random_seeds=seeds))
            sets.update(baseline_sets(scores, module, k))
    if paths is not None:
        sets.update(greedy_sets(paths, settings.greedy_module, settings.budget(settings.greedy_module)))
    return sets


def comparison_pairs(sets: dict, distributions, settings: RunSettings) -> list[tuple]:
    """The paired comparisons of the transfer stage, per module kind and budget, with p the primary metric
    (``settings.primary_metric``): p's borda consensus against each distribution's own p set (on that distribution
    and overall), robust greedy against p's borda, each proxy's borda against the ablation's, and p's borda against a
    random set."""
    primary, pairs = settings.primary_metric, []
    for module in settings.transfer_modules:
        for k in settings.budget(module):
            def label(metric, method):
                return f"{metric}/{module}-{k}:{method}"

            borda = label(primary, "borda")
            for d in distributions:
                own = label(primary, f"own:{d}")
                pairs.append((f"{module}-{k}: {primary} borda vs {d}'s own {primary} set, on {d}", borda, own, [d]))
                pairs.append((f"{module}-{k}: {primary} borda vs {d}'s own {primary} set", borda, own))
            pairs.append((f"{module}-{k}: robust greedy vs {primary} borda", label(GROUND_TRUTH, "greedy:robust"),
                          borda))
            for metric in sorted({parse_label(name)["metric"] for name in sets} - {GROUND_TRUTH, None}):
                pairs.append((f"{module}-{k}: {metric} borda vs ablation borda", label(metric, "borda"),
                              label(GROUND_TRUTH, "borda")))
            if module != "attn":
                random = label(primary, f"random:{settings.random_seeds[0]}")
                pairs.append((f"{module}-{k}: {primary} borda vs random", borda, random))
    return [pair for pair in pairs if pair[1] in sets and pair[2] in sets]


def pruned_size(model, sets: dict[str, DropSet]) -> pd.DataFrame:
    """Per drop set: what it removes and the parameters left, measured on the model with its modules skipped."""
    total = sum(p.numel() for p in model.parameters())
    rows = [{"drop_set": UNPRUNED, "module": None, "k": 0, "method": UNPRUNED, "metric": None, "indices": [],
             "sources": [],
             "parameters": total, "parameters_removed": 0.0}]
    for label, chosen in sets.items():
        with modules_dropped(model, chosen.candidates()) as pruned:
            left = sum(p.numel() for p in pruned.parameters())
        rows.append({"drop_set": label, "module": chosen.module, "k": chosen.k, "method": chosen.method,
                     "metric": chosen.metric,
                     "indices": _as_labels(chosen.indices), "sources": list(chosen.sources), "parameters": left,
                     "parameters_removed": 1 - left / total})
    return pd.DataFrame(rows)


def sets_from_table(table: pd.DataFrame) -> dict[str, DropSet | None]:
    """The drop sets of the ``pruned`` stage's table, by label (``none``: the unpruned model)."""
    return {
        row.drop_set: None if row.drop_set == UNPRUNED else make_drop_set(
            row.module, row.indices, row.method, row.metric, row.sources)
            for row in table.itertuples()}
