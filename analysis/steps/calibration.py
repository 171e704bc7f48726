"""The stages on calibration data: scores, stability, validity, the data-or-metric decomposition, drop sets,
regret, leave-one-out regret and the greedy paths by real loss."""

from __future__ import annotations


import pandas as pd

from ..importance import ablation
from ..importance.metrics import GROUND_TRUTH
from ..importance.scoring import aggregate_importance
from ..models.adapters import decoder_layers
from ..study import consensus, stability, validity
from ..study.selection import consensus_sets, regrets

from .core import Study, budgets_union, subset_names


def stage_scores_proxies(study: Study) -> pd.DataFrame:
    return study.score(study.distributions, study.settings.samples, study.settings.seq_len, study.proxies())


def stage_scores_ablation(study: Study) -> pd.DataFrame:
    """The ablation ground truth.  Its single drops are the greedy paths' first step on the same windows: they are kept
    in the run's trial cache (:meth:`~analysis.importance.ablation.TrialCache.single_drops`), with the unpruned NLL and
    block inputs, so the greedy stage does not run them again (the same values: ``tests/test_trial_cache.py``)."""
    s = study.settings
    keep = None if not s.greedy_module else study.trials.single_drops(
        study.ablation_batches(), ablation.candidates_of(s.greedy_module, len(decoder_layers(study.model))))
    return study.score(study.distributions, s.ablation_samples, s.ablation_seq_len, (GROUND_TRUTH,), keep=keep)


def stage_per_sample(study: Study) -> pd.DataFrame:
    return pd.concat([study.results[name] for name in ("scores.proxies", "scores.ablation") if name in study.results],
                     ignore_index=True)


def stage_aggregate(study: Study) -> pd.DataFrame:
    return aggregate_importance(study.results["scores.per_sample"], by=["distribution"])


def stage_subsets(study: Study) -> pd.DataFrame:
    return study.score(subset_names(study), study.settings.subset_samples, study.settings.subset_seq_len,
                       study.proxies())


def stage_subset_agreement(study: Study) -> pd.DataFrame:
    s = study.settings
    return stability.rank_agreement(study.results["subsets.per_sample"], module="attn", k=s.budgets.get("attn", (1,)),
                                    metric=s.primary_metric)


def stage_stability(study: Study) -> dict[str, pd.DataFrame]:
    s = study.settings
    return stability.stability_tables(study.results["scores.per_sample"], modules=tuple(s.budgets), k=budgets_union(s),
                                      n_boot=s.n_boot,
                                      n_perm=s.n_perm, seed=s.seed, progress=study.progress)


def stage_validity(study: Study) -> pd.DataFrame:
    s = study.settings
    return validity.metric_validity(study.results["scores.per_sample"], modules=tuple(s.budgets), n_boot=s.n_boot,
                                    seed=s.seed)


def stage_decomposition(study: Study) -> dict[str, pd.DataFrame]:
    """Data or metric: the rankings' agreement along each axis, corrected for the split-half reliabilities, and the
    bootstrap test of the proxies' agreement across distributions against across metrics."""
    s, scores, modules = study.settings, study.results["scores.per_sample"], tuple(study.settings.budgets)
    reliability = study.results["split_half"]
    return {"decomposition": validity.ranking_decomposition(scores, modules=modules, reliability=reliability),
            "data_or_metric": validity.data_or_metric(scores, modules=modules, n_boot=s.n_boot, seed=s.seed)}


def stage_drop_sets(study: Study) -> pd.DataFrame:
    return consensus_sets(study.results["scores.per_sample"], study.settings.budgets)


def stage_regret(study: Study) -> pd.DataFrame:
    return regrets(study.results["scores.per_sample"], study.results["drop_sets"])


def stage_leave_one_out(study: Study) -> pd.DataFrame:
    return consensus.leave_one_out_at_budgets(study.results["scores.per_sample"], study.settings.budgets)


def stage_greedy(study: Study) -> pd.DataFrame:
    """Greedy drop paths by real calibration loss, per distribution and robust, on the ablation's windows.

    With ``settings.greedy_shortlist`` each step tries the candidates of smallest single-drop
    ablation cost (own distribution's; the largest over distributions for robust).  The paths share the run's
    :class:`~analysis.importance.ablation.TrialCache` (``study.trials``): a trial on the same distribution, dropped set
    and candidate is computed once, and the paths are the same as without it.
    """
    s = study.settings
    module, k = s.greedy_module, max(s.budgets.get(s.greedy_module, s.transfer_k))
    batches = study.ablation_batches()
    prior = stability.importance_matrix(study.results["scores.per_sample"], module, GROUND_TRUTH)
    parts = []
    for objective in [*study.distributions, "robust"]:
        cost = prior.max(axis=1) if objective == "robust" else prior[objective]
        parts.append(study.part("greedy", objective, lambda objective=objective, cost=cost: ablation.greedy_drop_path(
            study.model, batches, module=module, k=k, objective=objective, shortlist=s.greedy_shortlist,
            prior=cost.to_dict(), cache=study.trials, progress=study.progress)))
    return pd.concat(parts, ignore_index=True)
