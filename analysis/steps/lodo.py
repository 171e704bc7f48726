"""The leave-one-distribution-out stages on real held-out loss, and what they cost."""

from __future__ import annotations


import pandas as pd

from ..evaluation import heldout as evaluation
from ..importance import ablation
from ..importance.scoring import score_windows
from ..models.adapters import decoder_layers
from ..presets import RunSettings
from ..study import stability
from ..study.dropsets import UNPRUNED

from .core import Study


def lodo_budget(settings: RunSettings) -> tuple[str, int]:
    """The module kind and size of the leave-one-distribution-out sets: ``greedy_module`` at its largest evaluated
    budget."""
    return settings.greedy_module, max(settings.budget(settings.greedy_module))


def stage_lodo_sets(study: Study) -> dict[str, pd.DataFrame]:
    """Every leave-one-distribution-out set (:func:`analysis.study.lodo.lodo_sets`): per left-out d a robust greedy path
    over the other distributions' calibration windows (one saved part per d; the paths share their common trials
    with each other and with the greedy stage's paths when it ran in the same process, through the run's
    :class:`~analysis.importance.ablation.TrialCache` ``study.trials``) and the nearness of the first ``lodo_probes``
    of d's held-out windows to each distribution (one scoring pass of the primary metric, one saved part per d)."""
    from ..study import lodo

    s = study.settings
    module, k = lodo_budget(s)
    scores = study.results["scores.per_sample"]
    batches = study.ablation_batches()
    cache = study.trials

    def robust_without(held_out):
        before = (cache.trials, cache.requested, cache.passes)
        path = ablation.greedy_drop_path(
            study.model,
            {d: b for d, b in batches.items() if d != held_out},
            module=module,
            k=k,
            objective="robust",
            shortlist=s.greedy_shortlist,
            prior=lodo.robust_prior(scores, module, held_out),
            cache=cache,
            progress=study.progress,
        )
        return path.assign(
            held_out=held_out,
            trials_computed=cache.trials - before[0],
            trials_requested=cache.requested - before[1],
            passes=cache.passes - before[2],
        )

    paths = {d: study.part("lodo_greedy", d, lambda d=d: robust_without(d)) for d in study.distributions}
    samples = evaluation.heldout_samples(
        study.tokenizer, study.distributions, n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed
    )
    metric = s.primary_metric
    primary = stability.one_metric(scores, metric)[0]
    nearest = []
    for name in study.distributions:
        probe = samples[name].select(range(min(s.lodo_probes, len(samples[name]))))
        scored = study.part(
            "lodo_probe",
            name,
            lambda probe=probe, name=name: score_windows(
                study.model, probe, name, batch_size=s.batch_size, metrics=(metric,), progress=False
            ),
        )
        nearest += [
            lodo.nearness(scored, primary, name, module=module, metric=metric, include_held_out=with_it)
            for with_it in (False, True)
        ]
    nearest = pd.concat(nearest, ignore_index=True)
    sets = lodo.lodo_sets(
        scores, study.results["greedy"], paths, nearest, module=module, k=k, own_metrics=s.own_metrics
    )
    return {"lodo_sets": sets, "lodo_greedy": pd.concat(paths.values(), ignore_index=True), "lodo_nearest": nearest}


def stage_lodo_windows(study: Study) -> pd.DataFrame:
    """Window NLL of every leave-one-out set on every calibration distribution's held-out windows that the held-out
    stage did not already evaluate (looked up by members); one saved part per distribution."""
    from ..evaluation import lodo as lodo_evaluation

    s = study.settings
    known = lodo_evaluation.known_windows(study.results["heldout_windows"], study.results["pruned"],
                                               s.transfer_samples)
    missing = lodo_evaluation.missing_pairs(study.results["lodo_sets"], known, study.distributions)
    samples = evaluation.heldout_samples(
        study.tokenizer,
        [name for name in study.distributions if missing[name]],
        n_samples=s.transfer_samples,
        seq_len=s.transfer_seq_len,
        seed=s.seed,
    )
    parts = [
        study.part(
            "lodo_windows",
            name,
            lambda name=name: lodo_evaluation.new_windows(study.model, samples, {name: missing[name]},
                                                          batch_size=s.heldout_batch_size),
        )
        for name in samples
    ]
    return pd.concat(parts, ignore_index=True) if parts else lodo_evaluation.new_windows(study.model, {}, {})


def stage_lodo(study: Study) -> dict[str, pd.DataFrame]:
    """Leave one distribution out on real held-out loss (:func:`analysis.evaluation.lodo.lodo_tables`), and what it cost
    (:func:`lodo_cost`)."""
    from ..evaluation import lodo as lodo_evaluation

    s = study.settings
    known = lodo_evaluation.known_windows(study.results["heldout_windows"], study.results["pruned"],
                                               s.transfer_samples)
    windows = pd.concat([known, study.results["lodo_windows"]], ignore_index=True)
    tables = lodo_evaluation.lodo_tables(study.results["lodo_sets"], windows, n_boot=s.n_boot, seed=s.seed,
                                         metric=s.primary_metric)
    return {**tables, "lodo_cost": lodo_cost(study, known)}


def greedy_trials(paths: pd.DataFrame, n_candidates: int, shortlist: int | None) -> int:
    """(candidate, distribution) trials a set of greedy paths runs without sharing: per step j, ``min(shortlist, C - j +
    1)`` candidates on each distribution of the objective."""
    total = 0
    for _, path in paths.groupby("objective", sort=False):
        n_distributions = sum(column.startswith("increase:") and path[column].notna().any() for column in path.columns)
        total += n_distributions * sum(min(shortlist or n_candidates, n_candidates - step + 1) for step in path["step"])
    return total


def lodo_cost(study: Study, known: pd.DataFrame) -> pd.DataFrame:
    """The extra work of the leave-one-out stages beside the greedy and held-out stages they extend: greedy trials
    (requested, and really run after sharing with each other and, when the greedy stage ran in the same process, with
    its paths), forward passes of the trial cache, and set-distribution pairs needed, looked up in the held-out stage's
    windows or newly evaluated."""
    s, paths, sets = study.settings, study.results["lodo_greedy"], study.results["lodo_sets"]
    per = paths.groupby("held_out", sort=False)[["trials_computed", "trials_requested", "passes"]].first()
    n_candidates = len(ablation.candidates_of(s.greedy_module, len(decoder_layers(study.model))))
    needed = {(key, name) for key in sets["key"].unique() for name in study.distributions}
    new = study.results["lodo_windows"]
    heldout = study.results["heldout_windows"]
    return pd.DataFrame(
        [
            {
                "greedy_paths": len(per),
                "greedy_trials_requested": int(per["trials_requested"].sum()),
                "greedy_trials_run": int(per["trials_computed"].sum()),
                "greedy_passes": int(per["passes"].sum()),
                "greedy_stage_trials": greedy_trials(study.results["greedy"], n_candidates, s.greedy_shortlist),
                "pairs_needed": len(needed),
                "pairs_looked_up": len(needed & set(zip(known["key"], known["distribution"]))),
                "pairs_evaluated": len(set(zip(new["key"], new["distribution"]))),
                "heldout_stage_pairs": len(
                    set(zip(heldout["drop_set"], heldout["distribution"]))
                    - {(UNPRUNED, d) for d in study.distributions}
                ),
            }
        ]
    )
