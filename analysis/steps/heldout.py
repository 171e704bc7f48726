"""The stages on held-out text: the pruned sets, their window NLL (calibration and test-only distributions),
transfer, the paired comparisons, zero-shot accuracy and the resolution of every headline claim."""

from __future__ import annotations


import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..evaluation import accuracy
from ..evaluation import heldout as evaluation
from ..evaluation import sequential
from ..presets import ANSWERS
from ..study import recommend, resolution
from ..study.dropsets import UNPRUNED
from ..study.selection import comparison_pairs, evaluated_sets, pruned_size, sets_from_table

from .core import Study


def stage_pruned(study: Study) -> pd.DataFrame:
    return pruned_size(study.model, evaluated_sets(study.results["scores.per_sample"], study.results.get("greedy"),
                                                   study.settings))


def stage_heldout(study: Study) -> dict[str, pd.DataFrame]:
    """Summed NLL of held-out windows of every calibration distribution under every pruned model, and one row per
    look: with ``heldout_budget`` the sequential evaluation (:mod:`analysis.evaluation.sequential`, one saved part per
    look), else every set on ``transfer_samples`` windows (one saved part per distribution, one look)."""
    s = study.settings
    sets = {name: spec for name, spec in sets_from_table(study.results["pruned"]).items() if spec is not None}
    if not s.heldout_budget:
        windows = evaluated_windows(study, study.distributions, {UNPRUNED: None, **sets}, "heldout",
                                    s.transfer_samples)
        n_sets = len({evaluation.removed_modules(spec) for spec in sets.values()})
        looks = pd.DataFrame([{"look": 1, "windows": s.transfer_samples, "sets": len(sets),
                               "set_windows": n_sets * s.transfer_samples, "spent": n_sets * s.transfer_samples,
                               "open": np.nan, "ended": "fixed design: every set on the same windows"}])
        return {"heldout_windows": windows, "heldout_looks": looks}
    samples = evaluation.heldout_samples(study.tokenizer, study.distributions, n_samples=s.heldout_looks[-1],
                                         seq_len=s.transfer_seq_len, seed=s.seed)
    windows, looks = sequential.sequential_windows(
        sequential.model_rounds(study.model, samples, sets, batch_size=s.heldout_batch_size),
        {name: evaluation.removed_modules(spec) for name, spec in sets.items()},
        recommend.distinct_sets(study.results["pruned"]), looks=s.heldout_looks,
        budget=s.heldout_budget, margin=s.equivalence_margin, n_boot=s.n_boot, seed=s.seed,
        saved=lambda look, compute: study.part("heldout", f"look-{look}", compute))
    return {"heldout_windows": windows, "heldout_looks": looks}


def evaluated_windows(study: Study, names, sets: dict, kind: str, n_samples: int) -> pd.DataFrame:
    """:func:`~analysis.evaluation.heldout.window_nll` of ``sets`` on ``n_samples`` held-out windows of each
    distribution of ``names`` (one saved part per distribution)."""
    s = study.settings

    def windows(name):
        samples = evaluation.heldout_samples(study.tokenizer, [name], n_samples=n_samples, seq_len=s.transfer_seq_len,
                                             seed=s.seed)
        return evaluation.window_nll(study.model, samples, sets, batch_size=s.heldout_batch_size, progress=False)

    return pd.concat([study.part(kind, name, lambda name=name: windows(name))
                      for name in tqdm(names, desc="held-out evaluation", unit="dist", disable=not study.progress)],
                     ignore_index=True)


def in_the_race(study: Study, groups: pd.DataFrame | None = None) -> dict:
    """The sets worth evaluating beyond the calibration distributions: after a sequential evaluation, per module kind
    and budget the candidates not separated from the best (``groups``, by default :func:`resolved_groups`) and the
    baselines; after a fixed one, every set."""
    s, r = study.settings, study.results
    sets = {name: spec for name, spec in sets_from_table(r["pruned"]).items() if spec is not None}
    if not s.heldout_budget:
        return sets
    groups = resolved_groups(study) if groups is None else groups
    kept = groups[(groups["in_group"] & (groups["role"] == "candidate")) | groups["baselines"].map(len).gt(0)]
    names = {name for aliases in kept["aliases"] for name in aliases}
    return {name: spec for name, spec in sets.items() if name in names}


def stage_heldout_unseen(study: Study) -> pd.DataFrame:
    """Held-out windows (``unseen_windows`` each) of the test-only distributions (``unseen``): text of kinds no stage
    calibrated, selected or compared on, under the sets still in the race (:func:`in_the_race`); only
    :func:`stage_transfer_unseen` and the report read it."""
    return evaluated_windows(study, study.unseen, {UNPRUNED: None, **in_the_race(study)}, "heldout-unseen",
                             study.settings.unseen_windows)


def stage_transfer_unseen(study: Study) -> pd.DataFrame:
    """Every evaluated set's perplexity ratio on each test-only distribution, and the worst and mean over them."""
    return evaluation.transfer_summary(study.results["heldout_windows_unseen"], n_boot=study.settings.n_boot,
                                       seed=study.settings.seed)


def stage_transfer(study: Study) -> pd.DataFrame:
    return evaluation.transfer_summary(study.results["heldout_windows"], n_boot=study.settings.n_boot,
                                       seed=study.settings.seed)


def stage_comparisons(study: Study) -> pd.DataFrame:
    s = study.settings
    sets = {label: chosen for label, chosen in sets_from_table(study.results["pruned"]).items() if chosen is not None}
    return evaluation.paired_comparisons(study.results["heldout_windows"],
                                         comparison_pairs(sets, study.distributions, s), n_boot=s.n_boot,
                                         seed=s.seed)


def resolved_answers(groups: pd.DataFrame) -> list[str]:
    """The resolved answers of :func:`resolved_groups`: each module kind and budget's best (rank 1) when it is
    recommended or heads an equivalent group."""
    return [] if not len(groups) else list(groups.loc[(groups["rank"] == 1) & groups["resolved"], "drop_set"])


def accuracy_sets(study: Study) -> dict:
    """Label → drop set of the sets evaluated for zero-shot accuracy: each of ``settings.accuracy_labels`` still in
    the race (:func:`in_the_race`), ``{answers}`` standing for the resolved answers (:func:`resolved_answers`)."""
    s = study.settings
    groups = resolved_groups(study) if s.heldout_budget or ANSWERS in s.accuracy_labels else None
    race = {UNPRUNED: None, **in_the_race(study, groups)}
    labels = [name for label in s.accuracy_labels
              for name in (resolved_answers(groups) if label == ANSWERS else [label])]
    return {name: race[name] for name in dict.fromkeys(labels) if name in race}


def stage_accuracy(study: Study) -> dict[str, pd.DataFrame]:
    """Item-level zero-shot correctness of the unpruned model and of each set of :func:`accuracy_sets` (one saved part
    per set; a set that removes the same modules as an earlier one, such as a joint set of attention layers only,
    takes that set's items), and the per-set accuracy table computed from it.  The sets resume from the unpruned
    model's block inputs (:class:`analysis.evaluation.accuracy.KeptInputs`)."""
    s = study.settings
    chosen = accuracy_sets(study)
    kept = accuracy.KeptInputs.for_sets(chosen.values())
    by_members, parts = {}, []
    for name in tqdm(chosen, desc="zero-shot accuracy", unit="set", disable=not study.progress):
        members = evaluation.removed_modules(chosen[name])
        if members not in by_members:
            by_members[members] = study.part("accuracy_items", name.replace(":", "_").replace("/", "_"),
                                             lambda name=name: accuracy.items_of_set(
                                                 study.model, study.tokenizer, name, chosen[name], s.tasks,
                                                 limit=s.task_limit, kept=kept))
        parts.append(by_members[members].assign(drop_set=name))
    if not parts:
        return {"accuracy_items": pd.DataFrame(), "accuracy": pd.DataFrame()}
    items = pd.concat(parts, ignore_index=True).assign(model=study.store.model_record.get("spec"))
    return {"accuracy_items": items, "accuracy": accuracy.accuracy_table(items)}


def accuracy_pairs(study: Study, evaluated) -> list[tuple[str, str, str]]:
    """Every set evaluated for accuracy against the unpruned model, then the held-out stage's overall comparisons
    (:func:`comparison_pairs`) whose two sets were both evaluated for accuracy."""
    sets = {label: chosen for label, chosen in sets_from_table(study.results["pruned"]).items() if chosen is not None}
    versus = [(f"{name} vs unpruned", name, UNPRUNED) for name in evaluated if name != UNPRUNED]
    held = [(comparison, a, b) for comparison, a, b,
            *only in comparison_pairs(sets, study.distributions, study.settings)
            if not only and a in evaluated and b in evaluated]
    return versus + list(dict.fromkeys(held))


def stage_accuracy_paired(study: Study) -> dict[str, pd.DataFrame]:
    """Paired item-level comparisons on the tasks where the unpruned model is clearly above chance, and per task the
    screen and the items a 3-point difference needs (:func:`analysis.evaluation.accuracy.accuracy_analysis`)."""
    s, items = study.settings, study.results["accuracy_items"]
    if not len(items) or UNPRUNED not in set(items["drop_set"]):
        return {"accuracy_paired": pd.DataFrame(), "accuracy_tasks": pd.DataFrame()}
    paired, tasks = accuracy.accuracy_analysis(items, accuracy_pairs(study, list(items["drop_set"].unique())),
                                               task_limit=s.task_limit,
                                               n_boot=s.n_boot, seed=s.seed)
    return {"accuracy_paired": paired, "accuracy_tasks": tasks}


def resolved_groups(study: Study) -> pd.DataFrame:
    """:func:`analysis.study.recommend.set_groups` of the held-out windows: each distinct member set of each module
    kind and budget paired against the best, on the windows both have, at the sequential evaluation's spending of
    alpha over its looks (one look for a fixed design)."""
    s, r = study.settings, study.results
    spending = sequential.equal_spending(s.heldout_looks) if s.heldout_budget else None
    return recommend.set_groups(evaluation.replicates_of(r["heldout_windows"], n_boot=s.n_boot, seed=s.seed),
                                recommend.distinct_sets(r["pruned"]), margin=s.equivalence_margin,
                                spending=spending)


def stage_resolution(study: Study) -> dict[str, pd.DataFrame]:
    """Every headline claim marked resolved or not (:mod:`analysis.study.resolution`): each distinct member set of
    each module kind and budget paired against the best on the same held-out windows, with its status
    (:func:`resolved_groups`, ``set_groups``), then ``claims``."""
    s, r = study.settings, study.results
    groups = resolved_groups(study) if len(r.get("transfer", [])) else pd.DataFrame()
    names = ("comparisons", "validity", "split_half", "data_or_metric", "bootstrap_pairs", "routing_paired")
    tables = {name: r.get(name) for name in names} | {"set_groups": groups}
    return {"set_groups": groups,
            "claims": resolution.claims_table(tables, truth_tokens=s.truth_tokens,
                                              metric=s.primary_metric)}
