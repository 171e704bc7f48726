"""The stages that use the drop sets as a user would: the check of each distribution's held-out windows and
routing between per-distribution sets."""

from __future__ import annotations


import pandas as pd

from ..errors import InputError
from ..evaluation import heldout as evaluation
from ..importance.metrics import GROUND_TRUTH
from ..importance.scoring import score_windows
from ..models.adapters import decoder_layers
from ..study import stability
from ..study.dropsets import UNPRUNED, drop_set_family
from ..study.selection import sets_from_table

from .core import Study


def stage_check(study: Study) -> pd.DataFrame:
    """Each distribution's held-out windows checked as a user's own texts (:func:`analysis.evaluation.check.check`, the
    primary metric, at ``check_module``'s largest evaluated budget) against its own drop set, and against the borda
    consensus built without
    it (as a user whose data no calibration distribution covers); one row per distribution and checked set."""
    from ..evaluation.check import check, drop_set_record

    s = study.settings
    module, k, metric = s.check_module, max(s.budget(s.check_module)), s.primary_metric
    scores = stability.one_metric(study.results["scores.per_sample"], metric)[0]
    rows = []
    for name in study.distributions:
        windows = evaluation.heldout_samples(study.tokenizer, [name], n_samples=s.transfer_samples,
                                             seq_len=s.transfer_seq_len, seed=s.seed)[name]
        yours = study.part("check", name, lambda windows=windows, name=name: score_windows(
            study.model, windows, name, batch_size=s.batch_size, metrics=(metric,), progress=False))
        others = scores[scores["distribution"] != name]
        checked = {"own set": (scores, f"own:{name}"), "consensus without it": (others, "borda")}
        for checked_as, (source, method) in checked.items():
            if source.empty:
                continue
            record = drop_set_record(source, module=module, k=k, method=method, metric=metric)
            result = check(study.model, study.tokenizer, record, None, source_scores=source, your_scores=yours,
                           n_perm=s.n_perm,
                           n_boot=s.n_boot, seed=s.seed)
            rows.append(result.summary.assign(distribution=name, checked=checked_as,
                                              recommendation=result.recommendation))
    return pd.concat(rows, ignore_index=True)


def routing_families(study: Study, module: str, k: int) -> dict[str, tuple[dict, dict, str]]:
    """The families of per-distribution sets routed between, by family name
    (:func:`analysis.evaluation.routing.family_name`): ``(sets by label, each distribution's set label, metric)``.
    ``""``: each distribution's own set by the primary metric and its borda consensus; ``greedy``: each distribution's
    greedy set by real calibration loss; ``own``: each distribution's own
    set by the ablation (its k modules of smallest single-drop loss increase), when ``route_truth_own``.  A family whose
    sets are missing is left out."""
    from ..evaluation import routing

    scores, names = study.results["scores.per_sample"], study.distributions
    primary = study.settings.primary_metric
    own_primary = drop_set_family(scores, module=module, k=k, metric=primary, methods=("borda",))
    families = {"": (own_primary, routing.own_sets(own_primary, names), primary)}
    evaluated = {label: spec for label, spec in sets_from_table(study.results["pruned"]).items() if spec is not None}
    greedy = {d: f"{GROUND_TRUTH}/{module}-{k}:greedy:{d}" for d in names}
    if all(label in evaluated for label in greedy.values()):
        families["greedy"] = ({label: evaluated[label] for label in greedy.values()}, greedy, GROUND_TRUTH)
    if study.settings.route_truth_own and GROUND_TRUTH in stability.metrics_in(scores):
        own = drop_set_family(scores, module=module, k=k, metric=GROUND_TRUTH, methods=(), own=True)
        families["own"] = (own, routing.own_sets(own, names), GROUND_TRUTH)
    return families


def routing_static(study: Study, sets: dict, samples: dict, module: str, k: int) -> pd.DataFrame:
    """Window NLL of the unpruned model, of every non-random set the held-out stage evaluated at ``module``-``k`` and of
    ``sets``: read from ``heldout_windows`` by members (:func:`analysis.evaluation.lodo.known_windows`, on its first
    ``transfer_samples`` windows), and evaluated only when no evaluated set has the same members."""
    from ..evaluation.lodo import known_windows
    from ..study.lodo import set_key

    heldout, pruned = study.results["heldout_windows"], study.results["pruned"]
    evaluated = {
        label: spec
        for label, spec in sets_from_table(pruned).items()
        if spec is not None and spec.module == module and spec.k == k and not spec.method.startswith("random")
    }
    n_windows = study.settings.transfer_samples
    known = known_windows(heldout, pruned, n_windows).set_index("key")
    heldout = heldout[heldout["window"] < n_windows]
    # a set the sequential held-out evaluation stopped early is not routed against (it is out of the race)
    evaluated = {label: spec for label, spec in evaluated.items() if set_key(module, spec.indices) in known.index}
    wanted = {**evaluated, **sets}
    found = [
        known.loc[[set_key(module, spec.indices)]].assign(drop_set=label)
        for label, spec in wanted.items()
        if set_key(module, spec.indices) in known.index
    ]
    missing = {label: spec for label, spec in wanted.items() if set_key(module, spec.indices) not in known.index}
    new = [evaluation.window_nll(study.model, samples, missing,
                                 batch_size=study.settings.heldout_batch_size)] if missing else []
    columns = ["drop_set", "distribution", "window", "nll_sum", "n_tokens"]
    return pd.concat(
        [heldout[heldout["drop_set"] == UNPRUNED][columns], *(f[columns] for f in found), *(f[columns] for f in new)],
        ignore_index=True,
    )


def stage_routing(study: Study) -> dict[str, pd.DataFrame]:
    """Routed vs static drop sets on the held-out windows (:mod:`analysis.evaluation.routing`), at ``route_module``'s
    largest evaluated budget, for each family of :func:`routing_families`: a nearest-centroid router per family (at the
    last block before every set of the family) trained on the calibration windows the scores came from picks a
    distribution's set per window.  The routing features (mean ``resid_post``) of every calibration and held-out
    window are computed once, at every family's routing block, in one pass to the deepest
    (:func:`~analysis.evaluation.routing.calibration_features`, :func:`~analysis.evaluation.routing.window_features`,
    the held-out windows batched as the routed model batches them); each family's router is fitted on its block's
    features and routes each held-out window.  Static sets' NLL is read from ``heldout_windows``
    (:func:`routing_static`); the routed NLL of a window is the static NLL of the set it is routed to
    (:func:`~analysis.evaluation.routing.routed_from_static`): the routed model gives that set's logits, so this equals
    really running it (:class:`~analysis.evaluation.routing.RoutedModel`) up to float summation order over other batch
    shapes (tested within 1e-4 relative per window on tiny models of three families), and ``max_abs_static_difference``
    is 0 here.  Each routed model is paired against its family's sets, the primary metric's borda and the best static
    set on the pooled mix."""
    from ..evaluation import routing

    s = study.settings
    module, k, families, samples, static, best = routing_inputs(study)
    layers, notes = {}, {}
    for family, (sets, _, _) in families.items():
        try:
            layers[family] = routing.routing_layer(sets)
        except InputError as error:
            notes[family] = str(error)
    needed = sorted(set(layers.values()))
    if needed:
        batches = routing.calibration_batches(study.tokenizer, study.distributions, n_samples=s.samples,
                                              seq_len=s.seq_len, seed=s.seed, batch_size=s.batch_size)
        calibration = routing.calibration_features(study.model, batches, needed)
        heldout = routing.window_features(study.model, samples, needed, batch_size=s.batch_size, seed=s.seed)
    tables = []
    for family, (sets, own, metric) in families.items():
        if family in notes:
            tables.append({"summary": pd.DataFrame([{"module": module, "k": k, "note": notes[family],
                                                     "family": family}])})
            continue
        router = routing.router_from_features(calibration[layers[family]], layers[family])
        routes = routing.routed_from_static(static, routing.window_routes(heldout, router), own)
        tables.append(family_tables(study, family, sets, own, metric, layers[family], static, routes, best))
    return routing_result(tables)


def routing_inputs(study: Study) -> tuple:
    """What every routing family is judged on: ``(module, k, families, samples, static, best)``, the routed kind and
    budget, :func:`routing_families`, the held-out windows, the static sets' window NLL (:func:`routing_static`) and
    the static set with the lowest pooled ratio."""
    from ..evaluation import routing

    s = study.settings
    module, k = s.route_module, max(s.budget(s.route_module))
    families = routing_families(study, module, k)
    samples = evaluation.heldout_samples(
        study.tokenizer, study.distributions, n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed
    )
    static = routing_static(
        study, {label: spec for sets, _, _ in families.values() for label, spec in sets.items()}, samples, module, k
    )
    return module, k, families, samples, static, routing.pooled_ratios(static).index[0]


def family_tables(study: Study, family: str, sets: dict, own: dict, metric: str, layer: int, static: pd.DataFrame,
                  routes: pd.DataFrame, best: str) -> dict[str, pd.DataFrame]:
    """One family's routing tables (:func:`analysis.evaluation.routing.routing_tables`), its routed model paired against
    its sets, the primary metric's borda and the best static set, each table tagged with the family."""
    from ..evaluation import routing

    s = study.settings
    module, k = s.route_module, max(s.budget(s.route_module))
    versus = list(dict.fromkeys([*sets, f"{s.primary_metric}/{module}-{k}:borda", best]))
    tables = routing.routing_tables(static, routes, own, module=module, k=k, metric=metric, layer=layer,
                                    n_layers=len(decoder_layers(study.model)), n_boot=s.n_boot, seed=s.seed,
                                    family=family, versus=versus)
    return {"summary": tables["summary"].assign(family=family, best_static=best),
            "paired": tables["paired"].assign(family=family), "accuracy": tables["accuracy"].assign(family=family)}


def routing_result(tables: list[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """The stage's three tables from every family's (:func:`family_tables`, or a ``summary`` note alone): a static set
    routed in several families is summarised once."""
    summary = pd.concat([t["summary"] for t in tables], ignore_index=True)
    if "drop_set" in summary:
        summary = summary[~summary.duplicated(["drop_set", "distribution"]) | summary["drop_set"].isna()].reset_index(
            drop=True
        )
    paired = [t["paired"] for t in tables if "paired" in t]
    accuracy = [t["accuracy"] for t in tables if "accuracy" in t]
    return {
        "routing": summary,
        "routing_paired": pd.concat(paired, ignore_index=True) if paired else pd.DataFrame(),
        "routing_accuracy": pd.concat(accuracy, ignore_index=True) if accuracy else pd.DataFrame(),
    }
