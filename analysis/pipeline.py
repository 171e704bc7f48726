"""The main job as a list of named stages: score, measure stability, choose drop sets, prune, evaluate, report.

Each :class:`Stage` declares the earlier stages it reads and the settings it depends on; its key
is the sha256 of those (with the model's checksum and dtype and the manifests' checksums, see
:func:`analysis.stages.stage_key`), and its tables are saved atomically in the
:class:`~analysis.stages.StageStore` of the output folder.  A rerun skips every stage whose saved
key matches, so a run killed at any point and started again recomputes nothing already saved;
figures and the report are rebuilt from the saved tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from .data.documents import load_distribution, subsets
from .data.manifests import load_manifest, role, top_level, unseen_distributions
from .data.samples import calibration_samples, token_batches
from .errors import InputError
from .evaluation import accuracy
from .evaluation import heldout as evaluation
from .importance import ablation
from .importance.metrics import GROUND_TRUTH, check_metrics, get_metric
from .importance.scoring import aggregate_importance, score_distributions, score_windows
from .io import atomic_write_json, provenance, read_table
from .models import loading as models
from .models.adapters import decoder_layers
from .presets import PRESETS, PRIMARY_METRIC, RunSettings, preset
from .report import plots, study_plots
from .report.sections import Results, write_report
from .stages import StageStore, stage_key
from .study import consensus, resolution, stability, validity
from .study.dropsets import UNPRUNED, drop_set_family
from .study.selection import comparison_pairs, consensus_sets, evaluated_sets, pruned_size, regrets, sets_from_table

STABILITY_TABLES = ("agreement", "bootstrap_importance", "bootstrap_pairs", "bootstrap_pair_mean", "split_half", "permutation", "convergence", "convergence_summary")


def top_level_distributions(settings: RunSettings) -> tuple[str, ...]:
    """The distributions a run scores: the settings' own, or every top-level distribution of the manifests."""
    return settings.distributions or tuple(top_level())


def unseen_of(settings: RunSettings) -> tuple[str, ...]:
    """The test-only distributions a run evaluates its sets on: the settings' own, or every test-only manifest."""
    return tuple(unseen_distributions()) if settings.unseen is None else tuple(settings.unseen)


@dataclass(frozen=True)
class Stage:
    """One named step: the earlier stages it reads, the settings it depends on, and how it computes its table(s)."""

    name: str
    reads: tuple[str, ...]
    settings: tuple[str, ...]
    compute: Callable[["Study"], pd.DataFrame | dict]
    tables: tuple[str, ...] = ()
    when: Callable[[RunSettings], bool] = lambda settings: True
    work: Callable[["Study"], float] = lambda study: 0.0

    @property
    def outputs(self) -> tuple[str, ...]:
        """The tables it saves: ``tables``, or one named like the stage."""
        return self.tables or (self.name,)


class Study:
    """One run's model, settings, store and results; stages read earlier results from :attr:`results`."""

    def __init__(self, model, tokenizer, settings: RunSettings, store: StageStore, progress: bool):
        self.model, self.tokenizer, self.settings, self.store, self.progress = model, tokenizer, settings, store, progress
        self.distributions = top_level_distributions(settings)
        self.manifests = {name: load_manifest(name)["_sha256"] for name in self.distributions}
        self.unseen = unseen_of(settings)
        self.unseen_manifests = {name: load_manifest(name)["_sha256"] for name in self.unseen}
        record = store.model_record
        self.base = [record.get("weights_sha256"), record.get("dtype")]
        self.results: dict[str, object] = {}
        self.keys: dict[str, str] = {}
        self.running = ""

    def key(self, stage: Stage) -> str:
        """sha256 of the stage name, the model, the settings it reads, the manifests and the keys of the stages it reads
        (a stage that reads ``unseen`` is keyed by the test-only manifests it evaluates on, the others never are)."""
        fields = {name: getattr(self.settings, name) for name in stage.settings}
        if "unseen" in fields:
            fields["unseen"] = self.unseen_manifests
        return stage_key(stage.name, self.base, fields, self.manifests, {name: self.keys.get(name) for name in stage.reads})

    def part(self, kind: str, name: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """A saved part (``parts/<kind>-<name>``: one distribution, one objective, one drop set) of the running stage,
        keyed by that stage's key and ``name``."""
        return self.store.table(f"parts/{kind}-{name}", stage_key(self.keys[self.running], name), compute)

    def score(self, names, samples: int, seq_len: int, metrics) -> pd.DataFrame:
        """Per-sample scores of ``names``, each distribution a saved part under ``parts/scores``."""
        parts = StageStore(self.store.folder / "parts" / "scores", self.store.model_record, self.store.log)
        return score_distributions(self.model, self.tokenizer, names, n_samples=samples, seq_len=seq_len, batch_size=self.settings.batch_size,
                                   seed=self.settings.seed, metrics=metrics, store=parts, progress=self.progress)

    def proxies(self) -> tuple[str, ...]:
        return tuple(m for m in check_metrics(self.settings.metrics) if get_metric(m).is_proxy)

    def run_stage(self, stage: Stage) -> None:
        """Reuse the stage's saved tables when every one matches its key, else compute and save them."""
        key = self.keys[stage.name] = self.key(stage)
        self.running = stage.name
        computed: dict = {}

        def table(name):
            def compute():
                if not computed:
                    value = stage.compute(self)
                    computed.update(value if isinstance(value, dict) else {stage.name: value})
                return computed[name]
            return self.store.table(name, key, compute)

        tables = {name: table(name) for name in stage.outputs}
        self.results.update(tables)


def stage_scores_proxies(study: Study) -> pd.DataFrame:
    return study.score(study.distributions, study.settings.samples, study.settings.seq_len, study.proxies())


def stage_scores_ablation(study: Study) -> pd.DataFrame:
    return study.score(study.distributions, study.settings.ablation_samples, study.settings.ablation_seq_len, (GROUND_TRUTH,))


def stage_per_sample(study: Study) -> pd.DataFrame:
    return pd.concat([study.results[name] for name in ("scores.proxies", "scores.ablation") if name in study.results], ignore_index=True)


def stage_aggregate(study: Study) -> pd.DataFrame:
    return aggregate_importance(study.results["scores.per_sample"], by=["distribution"])


def subset_names(study: Study) -> list[str]:
    return [s for name in study.distributions for s in subsets(name)]


def stage_subsets(study: Study) -> pd.DataFrame:
    return study.score(subset_names(study), study.settings.subset_samples, study.settings.subset_seq_len, study.proxies())


def stage_subset_agreement(study: Study) -> pd.DataFrame:
    s = study.settings
    return stability.rank_agreement(study.results["subsets.per_sample"], module="attn", k=s.budgets.get("attn", (1,)),
                                    metric=s.primary_metric)


def budgets_union(settings: RunSettings) -> tuple[int, ...]:
    return tuple(sorted({k for values in settings.budgets.values() for k in values}))


def stage_stability(study: Study) -> dict[str, pd.DataFrame]:
    s = study.settings
    return stability.stability_tables(study.results["scores.per_sample"], modules=tuple(s.budgets), k=budgets_union(s), n_boot=s.n_boot,
                                      n_perm=s.n_perm, seed=s.seed, progress=study.progress)


def stage_validity(study: Study) -> pd.DataFrame:
    s = study.settings
    return validity.metric_validity(study.results["scores.per_sample"], modules=tuple(s.budgets), n_boot=s.n_boot, seed=s.seed)


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
    ablation cost (own distribution's; the largest over distributions for robust).
    """
    s = study.settings
    module, k = s.greedy_module, max(s.budgets.get(s.greedy_module, s.transfer_k))
    batches = {name: list(token_batches(calibration_samples(
        load_distribution(name, "calibration"), study.tokenizer, n_samples=s.ablation_samples, seq_len=s.ablation_seq_len,
        seed=s.seed), s.batch_size)) for name in study.distributions}
    prior = stability.importance_matrix(study.results["scores.per_sample"], module, GROUND_TRUTH)
    parts = []
    for objective in [*study.distributions, "robust"]:
        cost = prior.max(axis=1) if objective == "robust" else prior[objective]
        parts.append(study.part("greedy", objective, lambda objective=objective, cost=cost: ablation.greedy_drop_path(
            study.model, batches, module=module, k=k, objective=objective, shortlist=s.greedy_shortlist, prior=cost.to_dict(),
            progress=study.progress)))
    return pd.concat(parts, ignore_index=True)


def stage_pruned(study: Study) -> pd.DataFrame:
    return pruned_size(study.model, evaluated_sets(study.results["scores.per_sample"], study.results.get("greedy"), study.settings))


def stage_heldout(study: Study, names: tuple[str, ...] | None = None, kind: str = "heldout") -> pd.DataFrame:
    """Summed NLL of every held-out window of every distribution (``names``, default the calibration ones) under every
    pruned model (one part per distribution)."""
    s = study.settings
    sets = sets_from_table(study.results["pruned"])

    def windows(name):
        samples = evaluation.heldout_samples(study.tokenizer, [name], n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed)
        return evaluation.window_nll(study.model, samples, sets, batch_size=s.heldout_batch_size, progress=False)

    names = study.distributions if names is None else names
    return pd.concat([study.part(kind, name, lambda name=name: windows(name))
                      for name in tqdm(names, desc="held-out evaluation", unit="dist", disable=not study.progress)],
                     ignore_index=True)


def stage_heldout_unseen(study: Study) -> pd.DataFrame:
    """:func:`stage_heldout` on the test-only distributions (``unseen``): text of kinds no stage calibrated, selected
    or compared on; only :func:`stage_transfer_unseen` and the report read it."""
    return stage_heldout(study, study.unseen, "heldout-unseen")


def stage_transfer_unseen(study: Study) -> pd.DataFrame:
    """Every evaluated set's perplexity ratio on each test-only distribution, and the worst and mean over them."""
    return evaluation.transfer_summary(study.results["heldout_windows_unseen"], n_boot=study.settings.n_boot, seed=study.settings.seed)


def stage_transfer(study: Study) -> pd.DataFrame:
    return evaluation.transfer_summary(study.results["heldout_windows"], n_boot=study.settings.n_boot, seed=study.settings.seed)


def stage_comparisons(study: Study) -> pd.DataFrame:
    s = study.settings
    sets = {label: chosen for label, chosen in sets_from_table(study.results["pruned"]).items() if chosen is not None}
    return evaluation.paired_comparisons(study.results["heldout_windows"], comparison_pairs(sets, study.distributions, s), n_boot=s.n_boot,
                                         seed=s.seed)


def stage_accuracy(study: Study) -> dict[str, pd.DataFrame]:
    """Item-level zero-shot correctness of the unpruned model and of each of ``settings.accuracy_sets`` that was evaluated
    (one saved part per set), and the per-set accuracy table computed from it."""
    s = study.settings
    sets = sets_from_table(study.results["pruned"])
    parts = [study.part("accuracy_items", name.replace(":", "_").replace("/", "_"), lambda name=name: accuracy.items_of_set(
                 study.model, study.tokenizer, name, sets[name], s.tasks, limit=s.task_limit))
             for name in tqdm(s.accuracy_sets, desc="zero-shot accuracy", unit="set", disable=not study.progress) if name in sets]
    if not parts:
        return {"accuracy_items": pd.DataFrame(), "accuracy": pd.DataFrame()}
    items = pd.concat(parts, ignore_index=True).assign(model=study.store.model_record.get("spec"))
    return {"accuracy_items": items, "accuracy": accuracy.accuracy_table(items)}


def accuracy_pairs(study: Study, evaluated) -> list[tuple[str, str, str]]:
    """Every set evaluated for accuracy against the unpruned model, then the held-out stage's overall comparisons
    (:func:`comparison_pairs`) whose two sets were both evaluated for accuracy."""
    sets = {label: chosen for label, chosen in sets_from_table(study.results["pruned"]).items() if chosen is not None}
    versus = [(f"{name} vs unpruned", name, UNPRUNED) for name in evaluated if name != UNPRUNED]
    held = [(comparison, a, b) for comparison, a, b, *only in comparison_pairs(sets, study.distributions, study.settings)
            if not only and a in evaluated and b in evaluated]
    return versus + list(dict.fromkeys(held))


def stage_accuracy_paired(study: Study) -> dict[str, pd.DataFrame]:
    """Paired item-level comparisons on the tasks where the unpruned model is clearly above chance, and per task the
    screen and the items a 3-point difference needs (:func:`analysis.evaluation.accuracy.accuracy_analysis`)."""
    s, items = study.settings, study.results["accuracy_items"]
    if not len(items) or UNPRUNED not in set(items["drop_set"]):
        return {"accuracy_paired": pd.DataFrame(), "accuracy_tasks": pd.DataFrame()}
    paired, tasks = accuracy.accuracy_analysis(items, accuracy_pairs(study, list(dict.fromkeys(items["drop_set"]))), task_limit=s.task_limit,
                                               n_boot=s.n_boot, seed=s.seed)
    return {"accuracy_paired": paired, "accuracy_tasks": tasks}


def stage_check(study: Study) -> pd.DataFrame:
    """Each distribution's held-out windows checked as a user's own texts (:func:`analysis.evaluation.check.check`, the
    primary metric, at ``check_module``'s largest evaluated budget) against its own drop set, and against the borda consensus built without
    it (as a user whose data no calibration distribution covers); one row per distribution and checked set."""
    from .evaluation.check import check, drop_set_record

    s = study.settings
    module, k, metric = s.check_module, max(s.budget(s.check_module)), s.primary_metric
    scores = stability.one_metric(study.results["scores.per_sample"], metric)[0]
    rows = []
    for name in study.distributions:
        windows = evaluation.heldout_samples(study.tokenizer, [name], n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed)[name]
        yours = study.part("check", name, lambda windows=windows, name=name: score_windows(
            study.model, windows, name, batch_size=s.batch_size, metrics=(metric,), progress=False))
        others = scores[scores["distribution"] != name]
        checked = {"own set": (scores, f"own:{name}"), "consensus without it": (others, "borda")}
        for checked_as, (source, method) in checked.items():
            if source.empty:
                continue
            record = drop_set_record(source, module=module, k=k, method=method, metric=metric)
            result = check(study.model, study.tokenizer, record, None, source_scores=source, your_scores=yours, n_perm=s.n_perm,
                           n_boot=s.n_boot, seed=s.seed)
            rows.append(result.summary.assign(distribution=name, checked=checked_as, recommendation=result.recommendation))
    return pd.concat(rows, ignore_index=True)


def routing_families(study: Study, module: str, k: int) -> dict[str, tuple[dict, dict, str]]:
    """The families of per-distribution sets routed between, by family name
    (:func:`analysis.evaluation.routing.family_name`): ``(sets by label, each distribution's set label, metric)``.
    ``""``: each distribution's own set by the primary metric and its borda consensus; ``greedy``: each distribution's greedy set by real calibration loss; ``own``: each distribution's own
    set by the ablation (its k modules of smallest single-drop loss increase).  A family whose sets are missing is left
    out."""
    from .evaluation import routing

    scores, names = study.results["scores.per_sample"], study.distributions
    primary = study.settings.primary_metric
    own_primary = drop_set_family(scores, module=module, k=k, metric=primary, methods=("borda",))
    families = {"": (own_primary, routing.own_sets(own_primary, names), primary)}
    evaluated = {label: spec for label, spec in sets_from_table(study.results["pruned"]).items() if spec is not None}
    greedy = {d: f"{GROUND_TRUTH}/{module}-{k}:greedy:{d}" for d in names}
    if all(label in evaluated for label in greedy.values()):
        families["greedy"] = ({label: evaluated[label] for label in greedy.values()}, greedy, GROUND_TRUTH)
    if GROUND_TRUTH in stability.metrics_in(scores):
        own = drop_set_family(scores, module=module, k=k, metric=GROUND_TRUTH, methods=(), own=True)
        families["own"] = (own, routing.own_sets(own, names), GROUND_TRUTH)
    return families


def routing_static(study: Study, sets: dict, samples: dict, module: str, k: int) -> pd.DataFrame:
    """Window NLL of the unpruned model, of every non-random set the held-out stage evaluated at ``module``-``k`` and of
    ``sets``: read from ``heldout_windows`` by members (:func:`analysis.evaluation.lodo.known_windows`), and evaluated
    only when no evaluated set has the same members."""
    from .evaluation.lodo import known_windows
    from .study.lodo import set_key

    heldout, pruned = study.results["heldout_windows"], study.results["pruned"]
    evaluated = {
        label: spec
        for label, spec in sets_from_table(pruned).items()
        if spec is not None and spec.module == module and spec.k == k and not spec.method.startswith("random")
    }
    known = known_windows(heldout, pruned).set_index("key")
    wanted = {**evaluated, **sets}
    found = [
        known.loc[[set_key(module, spec.indices)]].assign(drop_set=label)
        for label, spec in wanted.items()
        if set_key(module, spec.indices) in known.index
    ]
    missing = {label: spec for label, spec in wanted.items() if set_key(module, spec.indices) not in known.index}
    new = [evaluation.window_nll(study.model, samples, missing, batch_size=study.settings.heldout_batch_size)] if missing else []
    columns = ["drop_set", "distribution", "window", "nll_sum", "n_tokens"]
    return pd.concat(
        [heldout[heldout["drop_set"] == UNPRUNED][columns], *(f[columns] for f in found), *(f[columns] for f in new)],
        ignore_index=True,
    )


def stage_routing(study: Study) -> dict[str, pd.DataFrame]:
    """Routed vs static drop sets on the held-out windows (:mod:`analysis.evaluation.routing`), at ``route_module``'s
    largest evaluated budget, for each family of :func:`routing_families`: a nearest-centroid router per family (at the
    last block before every set of the family) trained on the calibration windows the scores came from picks a
    distribution's set per window.  Static sets' NLL is read from ``heldout_windows`` (:func:`routing_static`), the
    routed models really run; each routed model is paired against its family's sets, the primary metric's borda and the
    best static
    set on the pooled mix."""
    from .evaluation import routing

    s = study.settings
    module, k = s.route_module, max(s.budget(s.route_module))
    families = routing_families(study, module, k)
    samples = evaluation.heldout_samples(
        study.tokenizer, study.distributions, n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed
    )
    static = routing_static(
        study, {label: spec for sets, _, _ in families.values() for label, spec in sets.items()}, samples, module, k
    )
    best = routing.pooled_ratios(static).index[0]
    batches = routing.calibration_batches(
        study.tokenizer,
        study.distributions,
        n_samples=s.samples,
        seq_len=s.seq_len,
        seed=s.seed,
        batch_size=s.batch_size,
    )
    summaries, paired, accuracy = [], [], []
    for family, (sets, own, metric) in families.items():
        try:
            layer = routing.routing_layer(sets)
        except InputError as error:
            summaries.append(pd.DataFrame([{"module": module, "k": k, "note": str(error), "family": family}]))
            continue
        router = routing.fit_router(study.model, batches, layer)
        routes = routing.routed_window_nll(
            routing.RoutedModel(study.model, sets, router, own), samples, batch_size=s.batch_size, seed=s.seed
        )
        versus = list(dict.fromkeys([*sets, f"{s.primary_metric}/{module}-{k}:borda", best]))
        tables = routing.routing_tables(
            static,
            routes,
            own,
            module=module,
            k=k,
            metric=metric,
            layer=layer,
            n_layers=len(decoder_layers(study.model)),
            n_boot=s.n_boot,
            seed=s.seed,
            family=family,
            versus=versus,
        )
        summaries.append(tables["summary"].assign(family=family, best_static=best))
        paired.append(tables["paired"].assign(family=family))
        accuracy.append(tables["accuracy"].assign(family=family))
    summary = pd.concat(summaries, ignore_index=True)
    if "drop_set" in summary:
        summary = summary[~summary.duplicated(["drop_set", "distribution"]) | summary["drop_set"].isna()].reset_index(
            drop=True
        )
    return {
        "routing": summary,
        "routing_paired": pd.concat(paired, ignore_index=True) if paired else pd.DataFrame(),
        "routing_accuracy": pd.concat(accuracy, ignore_index=True) if accuracy else pd.DataFrame(),
    }


def stage_resolution(study: Study) -> dict[str, pd.DataFrame]:
    """Every headline claim marked resolved or not (:mod:`analysis.study.resolution`): the best set of each module kind
    and budget paired against every other on the same held-out windows (``set_groups``), then ``claims``."""
    s, r = study.settings, study.results
    groups = pd.DataFrame()
    if len(r.get("transfer", [])):
        ranked = resolution.candidates(r["transfer"])
        pairs = resolution.versus_best(ranked)
        paired = evaluation.paired_comparisons(r["heldout_windows"], pairs, n_boot=s.n_boot, seed=s.seed)
        groups = resolution.set_groups(ranked, paired, dict(zip(r["pruned"]["drop_set"], r["pruned"]["indices"])))
    names = ("comparisons", "validity", "split_half", "data_or_metric", "bootstrap_pairs", "routing_paired")
    tables = {name: r.get(name) for name in names} | {"set_groups": groups}
    return {"set_groups": groups,
            "claims": resolution.claims_table(tables, truth_tokens=s.ablation_samples * s.ablation_seq_len,
                                              metric=s.primary_metric)}


def _checkable(settings: RunSettings) -> bool:
    """A check needs at least 4 held-out windows per distribution (for its split-half noise floor)."""
    return bool(settings.check_module and settings.transfer_samples >= 4)


def _routable(settings: RunSettings) -> bool:
    return bool(settings.route_module and settings.route_module in settings.transfer_modules)


def lodo_budget(settings: RunSettings) -> tuple[str, int]:
    """The module kind and size of the leave-one-distribution-out sets: ``greedy_module`` at its largest evaluated
    budget."""
    return settings.greedy_module, max(settings.budget(settings.greedy_module))


def stage_lodo_sets(study: Study) -> dict[str, pd.DataFrame]:
    """Every leave-one-distribution-out set (:func:`analysis.study.lodo.lodo_sets`): per left-out d a robust greedy path
    over the other distributions' calibration windows (one saved part per d, the paths sharing their common trials
    through one :class:`~analysis.importance.ablation.TrialCache`) and the nearness of the first ``lodo_probes`` of d's
    held-out windows to each distribution (one scoring pass of the primary metric, one saved part per d)."""
    from .study import lodo

    s = study.settings
    module, k = lodo_budget(s)
    scores = study.results["scores.per_sample"]
    batches = {
        name: list(
            token_batches(
                calibration_samples(
                    load_distribution(name, "calibration"),
                    study.tokenizer,
                    n_samples=s.ablation_samples,
                    seq_len=s.ablation_seq_len,
                    seed=s.seed,
                ),
                s.batch_size,
            )
        )
        for name in study.distributions
    }
    cache = ablation.TrialCache()

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
    from .evaluation import lodo as lodo_evaluation

    s = study.settings
    known = lodo_evaluation.known_windows(study.results["heldout_windows"], study.results["pruned"])
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
    from .evaluation import lodo as lodo_evaluation

    s = study.settings
    known = lodo_evaluation.known_windows(study.results["heldout_windows"], study.results["pruned"])
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
    (requested and really run after sharing), forward passes of the trial cache, and set-distribution pairs needed,
    looked up in the held-out stage's windows or newly evaluated."""
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


def _lodo_on(settings: RunSettings) -> bool:
    """Leave-one-out needs ``lodo``, the ground truth and a greedy module."""
    return bool(settings.lodo and _ground_truth(settings) and settings.greedy_module)


def _ground_truth(settings: RunSettings) -> bool:
    return GROUND_TRUTH in settings.metrics


def _tokens(study: Study, names, samples: int, seq_len: int) -> float:
    return len(names) * samples * seq_len


def work_of(kind: str) -> Callable[[Study], float]:
    """A rough estimate of a stage's work in tokens through the whole model, for the run's ETA: proxies one pass, the
    ablation about half the model per candidate (3 per layer), greedy that per step and shortlisted candidate, held-out
    windows one pass plus about half per evaluated set, accuracy about 400 tokens per item and set, check one pass over the
    held-out windows, routing one pass over them plus the router's prefix (about a tenth of the model) over the calibration windows."""
    def estimate(study: Study) -> float:
        s, distributions = study.settings, study.distributions
        candidates = 3 * study.store.model_record.get("n_layers", 12)
        ablation = _tokens(study, distributions, s.ablation_samples, s.ablation_seq_len)
        n_sets = len(study.results["pruned"]) if "pruned" in study.results else 20
        return {
            "proxies": _tokens(study, distributions, s.samples, s.seq_len),
            "ablation": ablation * (1 + candidates / 2),
            "subsets": _tokens(study, subset_names(study), s.subset_samples, s.subset_seq_len) if s.subsets else 0,
            "greedy": ablation * (len(distributions) + 1) * max(s.transfer_k) * (s.greedy_shortlist or candidates) / 2,
            "heldout": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) * (1 + n_sets / 2),
            "heldout_unseen": _tokens(study, study.unseen, s.transfer_samples, s.transfer_seq_len) * (1 + n_sets / 2),
            "accuracy": len(s.accuracy_sets) * len(s.tasks) * (s.task_limit or 1000) * 400,
            "check": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len),
            "routing": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) + _tokens(study, distributions, s.samples, s.seq_len) / 10,
            "lodo_sets": ablation * (len(distributions) - 1) * max(s.transfer_k) * (s.greedy_shortlist or candidates)
            / 2,
            "lodo_windows": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) * (1 + 4),
        }[kind]
    return estimate


SCORING = ("distributions", "metrics", "batch_size", "seed")
STAGES = (
    Stage("scores.proxies", (), (*SCORING, "samples", "seq_len"), stage_scores_proxies, work=work_of("proxies")),
    Stage("scores.ablation", (), (*SCORING, "ablation_samples", "ablation_seq_len"), stage_scores_ablation, when=_ground_truth, work=work_of("ablation")),
    Stage("scores.per_sample", ("scores.proxies", "scores.ablation"), (), stage_per_sample),
    Stage("scores", ("scores.per_sample",), (), stage_aggregate),
    Stage("subsets.per_sample", (), (*SCORING, "subset_samples", "subset_seq_len"), stage_subsets, when=lambda s: s.subsets, work=work_of("subsets")),
    Stage("stability", ("scores.per_sample",), ("budgets", "n_boot", "n_perm", "seed"), stage_stability, tables=STABILITY_TABLES),
    Stage("subset_agreement", ("subsets.per_sample",), ("budgets", "primary_metric"), stage_subset_agreement, when=lambda s: s.subsets),
    Stage("validity", ("scores.per_sample",), ("budgets", "n_boot", "seed"), stage_validity, when=_ground_truth),
    Stage("decomposition", ("scores.per_sample", "stability"), ("budgets", "n_boot", "seed"), stage_decomposition,
          tables=("decomposition", "data_or_metric")),
    Stage("drop_sets", ("scores.per_sample",), ("budgets",), stage_drop_sets),
    Stage("regret", ("scores.per_sample", "drop_sets"), (), stage_regret),
    Stage("leave_one_out", ("scores.per_sample",), ("budgets",), stage_leave_one_out),
    Stage("greedy", ("scores.per_sample",), ("greedy_module", "greedy_shortlist", "budgets", "transfer_k", "ablation_samples",
                                              "ablation_seq_len", "batch_size"), stage_greedy, when=lambda s: _ground_truth(s) and bool(s.greedy_module),
          work=work_of("greedy")),
    Stage("pruned", ("scores.per_sample", "greedy"), ("transfer_modules", "transfer_k", "budgets", "own_set_metrics", "random_seeds",
                                                  "primary_metric"), stage_pruned),
    Stage("heldout_windows", ("pruned",), ("transfer_samples", "transfer_seq_len", "seed", "heldout_batch_size"), stage_heldout,
          work=work_of("heldout")),
    Stage("transfer", ("heldout_windows",), ("n_boot", "seed"), stage_transfer),
    Stage("heldout_windows_unseen", ("pruned",), ("unseen", "transfer_samples", "transfer_seq_len", "seed", "heldout_batch_size"),
          stage_heldout_unseen,
          when=lambda s: bool(unseen_of(s)), work=work_of("heldout_unseen")),
    Stage("transfer_unseen", ("heldout_windows_unseen",), ("n_boot", "seed"), stage_transfer_unseen, when=lambda s: bool(unseen_of(s))),
    Stage("comparisons", ("heldout_windows", "pruned"), ("n_boot", "seed", "primary_metric"), stage_comparisons),
    Stage("lodo_sets", ("scores.per_sample", "greedy"),
          ("greedy_module", "greedy_shortlist", "budgets", "transfer_k", "ablation_samples", "ablation_seq_len",
           "batch_size", "own_set_metrics", "lodo_probes", "transfer_samples", "transfer_seq_len", "seed", "primary_metric"),
          stage_lodo_sets, tables=("lodo_sets", "lodo_greedy", "lodo_nearest"), when=_lodo_on,
          work=work_of("lodo_sets")),
    Stage("lodo_windows", ("lodo_sets", "pruned", "heldout_windows"), ("transfer_samples", "transfer_seq_len", "seed",
                                                                      "heldout_batch_size"),
          stage_lodo_windows, when=_lodo_on, work=work_of("lodo_windows")),
    Stage("lodo", ("lodo_sets", "lodo_windows", "heldout_windows", "pruned"), ("n_boot", "seed", "primary_metric"), stage_lodo,
          tables=("lodo_choices", "lodo", "lodo_paired", "lodo_cost"), when=_lodo_on),
    Stage("accuracy", ("pruned",), ("tasks", "task_limit", "accuracy_sets"), stage_accuracy, tables=("accuracy_items", "accuracy"),
          when=lambda s: bool(s.tasks and s.accuracy_sets), work=work_of("accuracy")),
    Stage("accuracy_paired", ("accuracy", "pruned"), ("task_limit", "n_boot", "seed"), stage_accuracy_paired,
          tables=("accuracy_paired", "accuracy_tasks"), when=lambda s: bool(s.tasks and s.accuracy_sets)),
    Stage("check", ("scores.per_sample",), ("check_module", "budgets", "transfer_k", "transfer_samples", "transfer_seq_len", "batch_size", "n_perm",
                                            "n_boot", "seed", "primary_metric"), stage_check, when=_checkable,
          work=work_of("check")),
    Stage("routing", ("scores.per_sample", "heldout_windows", "pruned"), ("route_module", "budgets", "transfer_k", "samples", "seq_len", "batch_size",
                                                               "heldout_batch_size", "n_boot", "seed", "primary_metric"), stage_routing, tables=("routing", "routing_paired", "routing_accuracy"),
          when=_routable, work=work_of("routing")),
    Stage("resolution", ("heldout_windows", "transfer", "pruned", "comparisons", "validity", "stability",
                         "decomposition", "routing"), ("n_boot", "seed", "ablation_samples", "ablation_seq_len", "primary_metric"),
          stage_resolution,
          tables=("set_groups", "claims")),
)


def compare_tables(scores: pd.DataFrame, modules, k, n_boot: int, n_perm: int) -> dict[str, pd.DataFrame]:
    """Stability tables plus leave-one-distribution-out regret per module (with three or more distributions), at the largest k that fits."""
    tables = stability.stability_tables(scores, modules=modules, k=k, n_boot=n_boot, n_perm=n_perm)
    if scores["distribution"].nunique() >= 3:
        tables["leave_one_out"] = consensus.leave_one_out_at_budgets(scores, {module: k for module in modules})
    return tables


class ProgressRate:
    """Seconds per unit of estimated work, measured on the stages computed so far (reused ones take no time)."""

    def __init__(self):
        self.work, self.seconds = 0.0, 0.0

    def add(self, work: float, seconds: float) -> None:
        self.work += work
        self.seconds += seconds

    def eta(self, remaining: float) -> str:
        """``", about N min left"`` once some work has been timed, else nothing."""
        if self.work <= 0:
            return ""
        return f", about {remaining * self.seconds / self.work / 60:.0f} min left"


def settings_of(choice: str | RunSettings) -> RunSettings:
    """A preset's settings by name, or the given settings."""
    if isinstance(choice, RunSettings):
        return choice
    try:
        return preset(choice)
    except ValueError as error:
        raise InputError(str(error)) from None


def run(spec: str = models.DEFAULT_MODEL, out: Path = Path("results"), *, preset: str | RunSettings = "default",
        dtype=None, device=None, progress: bool = True, log: Callable[[str], None] = print, figures: bool = True) -> dict:
    """Run the whole study for one model into ``out``: every stage of :data:`STAGES` in order, then figures (unless
    ``figures`` is false: :func:`render_report` draws them later from the tables) and the report."""
    settings = settings_of(preset)
    for name in top_level_distributions(settings):
        if role(load_manifest(name)) == "test":
            raise InputError(f"distribution {name!r} is test-only (role: test in its manifest): no stage may calibrate on it; "
                             "it is evaluated as an unseen distribution (settings.unseen) instead")
    for name in unseen_of(settings):
        load_manifest(name)
    check_metrics(settings.metrics)
    if settings.primary_metric not in settings.metrics or not get_metric(settings.primary_metric).is_proxy:
        raise InputError(f"primary_metric {settings.primary_metric!r} must be one of the run's proxy metrics "
                         f"({', '.join(m for m in settings.metrics if get_metric(m).is_proxy)})")
    out = Path(out)
    started = time.perf_counter()
    model, tokenizer = models.load_model(spec, dtype=dtype, device=device)
    record = models.model_info(model)
    study = Study(model, tokenizer, settings, StageStore(out, record, log), progress)
    timings = {"load model": round(time.perf_counter() - started, 1)}
    stages = [stage for stage in STAGES if stage.when(settings)]
    rate = ProgressRate()
    for number, stage in enumerate(stages, start=1):
        remaining = sum(later.work(study) for later in stages[number - 1:])
        log(f"stage {number} of {len(stages)}: {stage.name} ({(time.perf_counter() - started) / 60:.1f} min elapsed{rate.eta(remaining)})")
        begin = time.perf_counter()
        computed = len(study.store.computed)
        study.run_stage(stage)
        timings[stage.name] = round(time.perf_counter() - begin, 1)
        if len(study.store.computed) > computed:
            rate.add(stage.work(study), timings[stage.name])
    tables = {name: study.results[name] for stage in stages for name in stage.outputs if name not in ("scores", "scores.proxies", "scores.ablation")}
    tables.setdefault("accuracy", pd.DataFrame())
    top = tables.pop("scores.per_sample")
    begin = time.perf_counter()
    drawn = draw_figures(top, tables, out / "figures", max(budgets_union(settings)), settings.primary_metric) if figures else []
    timings["figures"] = round(time.perf_counter() - begin, 1)
    report = write_report(out, Results(record, settings, top, tables, drawn))
    summary = {
        "out": str(out.resolve()),
        "report": [str(p) for p in report],
        "figures": len(drawn),
        "stages_computed": study.store.computed,
        "stages_reused": study.store.reused,
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
    }
    atomic_write_json(out / "run_summary.json", {**summary, "provenance": provenance(kind="run", model=record, settings=asdict(settings))})
    return summary


NOT_REPORTED = ("scores", "scores.proxies", "scores.ablation", "scores.per_sample", "heldout_windows", "heldout_windows_unseen",
                "accuracy_items")


def settings_from_record(record: dict) -> RunSettings:
    """The :class:`RunSettings` a run recorded (``dataclasses.asdict`` in ``run_summary.json``): lists back to tuples,
    fields the record lacks (written before they existed) at their defaults, fields this version lacks ignored."""
    known = {f.name for f in dataclass_fields(RunSettings)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in record.items() if name in known}
    if "budgets" in values:
        values["budgets"] = {module: tuple(sizes) for module, sizes in values["budgets"].items()}
    return RunSettings(**values)


def saved_tables(out: Path, settings: RunSettings) -> dict[str, pd.DataFrame]:
    """The report's tables as a run saved them in ``out`` (each checked against its sidecar's checksum); a table the
    run did not save (a stage it skipped, a table left out of a committed copy) is empty."""
    names = [name for stage in STAGES if stage.when(settings) for name in stage.outputs if name not in NOT_REPORTED]
    tables = {name: read_table(out / f"{name}.parquet") if (out / f"{name}.parquet").is_file() else pd.DataFrame() for name in names}
    tables.setdefault("accuracy", pd.DataFrame())
    return tables


def render_report(out: Path, *, figures: bool = True) -> dict:
    """Rewrite ``report.md``, ``report.html`` and (unless ``figures`` is false) ``figures/`` of a finished run folder from
    its saved tables alone, without the model: the settings and model record come from ``run_summary.json``."""
    out = Path(out)
    summary_path = out / "run_summary.json"
    if not summary_path.is_file():
        raise InputError(f"{out} has no run_summary.json: give the output folder of a finished `calibdrop run`")
    saved = json.loads(summary_path.read_text(encoding="utf-8"))["provenance"]
    settings = settings_from_record(saved["settings"])
    top = read_table(out / "scores.per_sample.parquet")
    tables = saved_tables(out, settings)
    drawn = draw_figures(top, tables, out / "figures", max(budgets_union(settings)), settings.primary_metric) if figures else []
    report = write_report(out, Results(saved["model"], settings, top, tables, drawn))
    return {"report": [str(p) for p in report], "figures": [str(p) for p in drawn]}


def draw_figures(scores, tables, folder: Path, k: int, metric: str = PRIMARY_METRIC) -> list[Path]:
    """Every figure of the report; the single-metric ones (stability, regret, proxy against ablation) of ``metric``."""
    primary, primary_tables = stability.one_metric(scores, metric)[0], stability.tables_of_metric(tables, metric)
    written = plots.stability_figures(primary, primary_tables, folder, k)
    if len(tables.get("transfer", [])):
        written += plots.save_figure(study_plots.transfer_heatmap(tables["transfer"]), folder / "transfer_matrix")
        written += plots.save_figure(study_plots.worst_case_forest(tables["transfer"]), folder / "transfer_worst_case")
    if len(tables.get("regret", [])):
        written += plots.save_figure(study_plots.regret_overview(primary_tables["regret"]), folder / "regret_consensus_vs_single")
    if len(tables.get("validity", [])):
        written += plots.save_figure(study_plots.validity_heatmap(tables["validity"]), folder / "metric_validity")
        written += plots.save_figure(study_plots.proxy_vs_ablation(scores, metric), folder / "proxy_vs_ablation")
    if len(tables.get("decomposition", [])):
        written += plots.save_figure(study_plots.decomposition_bars(tables["decomposition"]), folder / "ranking_decomposition")
    return written


__all__ = ["PRESETS", "STAGES", "RunSettings", "Stage", "Study", "render_report", "run"]
