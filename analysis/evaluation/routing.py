"""Input-adaptive drop sets: one copy of the weights, several drop sets, a router choosing one per input.

Every drop set ``D`` (one per calibration distribution, plus the consensus) names modules of
layers ``>= first(D)``.  The router reads the residual stream at ``resid_post`` of block
``L = min_D first(D) - 1``: that block and every block before it run identically under every drop
set, so the prefix is computed once per input and shared.  The feature of an input is the
mean over its real tokens of ``resid_post[L]``; a classifier (``centroid``: nearest centroid
after per-feature standardisation; ``logistic``: multinomial logistic regression), trained on
calibration windows labelled by their distribution, maps it to a distribution, and that
distribution's drop set is used.  Inputs routed to the same drop set are batched together and
continue from ``resid_post[L]`` with the set's modules skipped (``L = -1`` when a set drops a module of block 0: the
router then reads the mean token embedding, the input of block 0)
(:func:`analysis.models.pruning.modules_dropped`), without copying any weight; the logits equal those
of ``drop_modules`` on a copy of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data.documents import load_distribution
from ..data.samples import calibration_samples, token_batches
from ..errors import InputError
from ..importance.ablation import full_row_nll, layer_slice, position_ids_from_mask, row_nll, stack_from
from ..importance.scoring import input_device
from ..models.adapters import decoder_layers, layer_input
from ..models.pruning import modules_dropped
from ..presets import GROUND_TRUTH, PRIMARY_METRIC
from ..study.dropsets import drop_set_family
from .heldout import dropped_candidates


def family_name(family: str, metric: str = PRIMARY_METRIC) -> str:
    """What a routing family routes between, as the report names it: ``""`` (``metric``'s own sets, and tables written
    before families existed), ``greedy`` (greedy sets by real loss), ``own`` (the ablation's own sets)."""
    names = {"": f"{metric} own sets", "greedy": "greedy sets (real loss)", "own": f"{GROUND_TRUTH} own sets"}
    return names.get(family, family)

CLASSIFIERS: dict[str, Callable] = {
    "centroid": lambda: make_pipeline(StandardScaler(), NearestCentroid()),
    "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
}


EMBEDDINGS = -1  # a routing "block" before block 0: the router reads the token embeddings (resid_pre of block 0)


def routing_layer(drop_sets: Mapping[str, object]) -> int:
    """``min over drop sets of the first dropped layer - 1``: the last block that runs alike under every set;
    :data:`EMBEDDINGS` (-1) when a set drops a module of block 0, so that only the embeddings precede every dropped
    module (the router then reads the mean token embedding, ``resid_pre`` of block 0)."""
    firsts = [min(layer for _, layer in dropped_candidates(spec)) for spec in drop_sets.values()
              if dropped_candidates(spec)]
    if not firsts:
        raise InputError("no drop set drops anything: there is nothing to route between")
    return min(firsts) - 1


def check_routing_layer(layer: int, drop_sets: Mapping[str, object]) -> None:
    """Raise :class:`InputError` unless ``resid_post`` of ``layer`` (-1: the embeddings) precedes every module every
    drop set drops."""
    allowed = routing_layer(drop_sets)
    if not EMBEDDINGS <= layer <= allowed:
        raise InputError(f"routing layer {layer} does not precede every dropped module: use a layer in "
                         f"{EMBEDDINGS}..{allowed} (-1: the token embeddings)")


@torch.inference_mode()
def resid_post(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """``resid_post`` of every block in ``layers``, from one pass that runs blocks ``0..max(layers)`` only; layer -1
    (:data:`EMBEDDINGS`) is ``resid_pre`` of block 0, the input block 0 receives (block 0 runs for it)."""
    captured = {}
    blocks = decoder_layers(model)

    def keep(layer):
        def hook(module, args, output):
            captured.setdefault(layer, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def keep_input(module, args, kwargs):
        captured.setdefault(EMBEDDINGS, layer_input(args, kwargs))

    wanted = sorted(set(layers))
    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in wanted if layer != EMBEDDINGS]
    if EMBEDDINGS in wanted:
        handles.append(blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True))
    try:
        with layer_slice(model, 0, max(max(layers), 0) + 1):
            model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """The routing feature of each row: ``mean over real tokens t of hidden_t`` in float32, ``(rows, hidden)``."""
    mask = attention_mask.to(hidden.device).unsqueeze(-1).float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu().numpy()


def prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> tuple[torch.Tensor, np.ndarray]:
    """``resid_post`` of block ``layer`` (running blocks ``0..layer`` only) and the routing feature of each row
    (:func:`pooled`)."""
    hidden = resid_post(model, input_ids, attention_mask, [layer])[layer]
    return hidden, pooled(hidden, attention_mask)


def prefix_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers) -> dict[int, np.ndarray]:
    """The routing feature of each row at every block in ``layers``, from one pass to the deepest: the same blocks run
    on the same inputs as :func:`prefix` at each layer, so the features are the same bit for bit (tested)."""
    return {layer: pooled(hidden, attention_mask)
            for layer, hidden in resid_post(model, input_ids, attention_mask, layers).items()}


@torch.inference_mode()
def continue_logits(model, dropped, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the model from block ``start`` on, given its input ``hidden``, with ``dropped`` modules skipped."""
    with modules_dropped(model, dropped), stack_from(model, start):
        return model(inputs_embeds=hidden, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


@dataclass
class Router:
    """A trained router: the block whose ``resid_post`` it reads, the classifier and its classes (distributions)."""

    layer: int
    classifier: object
    classes: tuple[str, ...]

    def predict(self, features: np.ndarray) -> list[str]:
        """The distribution chosen for each feature row."""
        return [str(c) for c in self.classifier.predict(features)]


def _check_router_inputs(classifier: str, distributions) -> None:
    """Raise :class:`InputError` for an unknown classifier or fewer than two distributions."""
    if classifier not in CLASSIFIERS:
        raise InputError(f"unknown router classifier {classifier!r}; classifiers: {', '.join(CLASSIFIERS)}")
    if len(distributions) < 2:
        raise InputError("a router needs calibration windows of at least two distributions")


@torch.inference_mode()
def calibration_features(model, batches_by_distribution: Mapping[str, list],
                         layers) -> dict[int, dict[str, np.ndarray]]:
    """Per block in ``layers``, per distribution: the routing features of its calibration batches (dicts of
    ``input_ids``, ``attention_mask``), ``(windows, hidden)``, from one pass per batch to the deepest block
    (:func:`prefix_features`)."""
    device = input_device(model)
    per_batch = {name: [prefix_features(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        layers) for batch in batches]
                 for name, batches in batches_by_distribution.items()}
    return {layer: {name: np.concatenate([features[layer] for features in batches])
                    for name, batches in per_batch.items()}
            for layer in sorted(set(layers))}


def router_from_features(features_by_distribution: Mapping[str, np.ndarray], layer: int, *,
                         classifier: str = "centroid") -> Router:
    """A router reading block ``layer``, trained on calibration features labelled by their distribution
    (:func:`calibration_features` at that layer)."""
    _check_router_inputs(classifier, features_by_distribution)
    labels = np.array([name for name, features in features_by_distribution.items() for _ in range(len(features))])
    fitted = CLASSIFIERS[classifier]().fit(np.concatenate(list(features_by_distribution.values())), labels)
    return Router(layer, fitted, tuple(features_by_distribution))


def fit_router(model, batches_by_distribution: Mapping[str, list], layer: int, *,
               classifier: str = "centroid") -> Router:
    """Train a router on calibration batches labelled by their distribution (``batches``: dicts of ``input_ids``,
    ``attention_mask``): :func:`router_from_features` of :func:`calibration_features` at ``layer``."""
    _check_router_inputs(classifier, batches_by_distribution)
    features = calibration_features(model, batches_by_distribution, [layer])[layer]
    return router_from_features(features, layer, classifier=classifier)


class RoutedModel:
    """One model, several drop sets (name → DropSet or record), and a router mapping an input to a distribution.

    ``set_of`` maps each router class (distribution) to the name of the drop set it uses.
    """

    def __init__(self, model, drop_sets: Mapping[str, object], router: Router, set_of: Mapping[str, str]):
        check_routing_layer(router.layer, drop_sets)
        missing = set(router.classes) - set(set_of)
        if missing or not set(set_of.values()) <= set(drop_sets):
            raise InputError(
                f"every router class needs a drop set: classes {sorted(missing)} have none, or a named set is unknown")
        self.model, self.router, self.set_of = model, router, dict(set_of)
        self.dropped = {name: dropped_candidates(spec) for name, spec in drop_sets.items()}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                routes: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
        """Logits of every row under its routed drop set and the distribution each row was routed to.

        ``routes`` overrides the router (an oracle).  The prefix runs once for the batch; rows that share
        a drop set continue together.
        """
        device = input_device(self.model)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden, features = prefix(self.model, input_ids, attention_mask, self.router.layer)
        routes = list(routes) if routes is not None else self.router.predict(features)
        logits = None
        for name in dict.fromkeys(self.set_of[r] for r in routes):
            rows = torch.tensor([i for i, r in enumerate(routes) if self.set_of[r] == name], device=device)
            part = continue_logits(self.model, self.dropped[name], self.router.layer + 1, hidden[rows],
                                   attention_mask[rows])
            logits = part.new_empty((len(routes), *part.shape[1:])) if logits is None else logits
            logits[rows] = part
        return logits, routes


def mixed_batches(samples: Mapping[str, object], batch_size: int,
                  seed: int) -> Iterator[tuple[list, torch.Tensor, torch.Tensor]]:
    """The held-out windows of every distribution in one seeded random order, in batches of ``batch_size``: each
    batch's ``(distribution, window)`` per row, its ``input_ids`` and ``attention_mask`` (windows as stored, not
    re-padded), so a batch holds inputs of several sources."""
    items = [(name, int(window), row) for name, windows in samples.items() for window,
             row in zip(windows["sample"], windows.with_format("torch", columns=["input_ids", "attention_mask"]))]
    order = np.random.default_rng(seed).permutation(len(items))
    for start in range(0, len(order), batch_size):
        chosen = [items[i] for i in order[start : start + batch_size]]
        yield ([(name, window) for name, window, _ in chosen], torch.stack([row["input_ids"] for _, _, row in chosen]),
               torch.stack([row["attention_mask"] for _, _, row in chosen]))


def routed_window_nll(routed: RoutedModel, samples: Mapping[str, object], *, batch_size: int = 8, oracle: bool = False,
                      seed: int = 0) -> pd.DataFrame:
    """Per held-out window: summed next-token NLL under its routed drop set, really run by ``routed``
    (:meth:`RoutedModel.forward`), its true source and the route chosen.

    The windows are batched by :func:`mixed_batches`.  ``oracle`` routes each window to its true source.
    """
    out = []
    for chosen, ids, mask in mixed_batches(samples, batch_size, seed):
        logits, routes = routed.forward(ids, mask, [name for name, _ in chosen] if oracle else None)
        device = logits.device
        nll, n_predicted = row_nll(logits, ids.to(device), mask.to(device))
        out += [{"distribution": name, "window": window, "route": route, "nll_sum": float(v), "n_tokens": int(n)}
                for (name, window), route, v, n in zip(chosen, routes, nll, n_predicted)]
    return pd.DataFrame(out)


def window_features(model, samples: Mapping[str, object], layers, *, batch_size: int = 8,
                    seed: int = 0) -> list[tuple[list, dict[int, np.ndarray]]]:
    """Per batch of :func:`mixed_batches`: its ``(distribution, window)`` rows and their routing features at every
    block in ``layers`` (:func:`prefix_features`), the features :class:`RoutedModel` computes on the same batches."""
    device = input_device(model)
    return [(chosen, prefix_features(model, ids.to(device), mask.to(device), layers))
            for chosen, ids, mask in mixed_batches(samples, batch_size, seed)]


def window_routes(features: list[tuple[list, dict[int, np.ndarray]]], router: Router) -> pd.DataFrame:
    """Each window's route, ``router``'s prediction batch by batch from :func:`window_features` at its layer, as
    :meth:`RoutedModel.forward` predicts: columns ``distribution, window, route``."""
    return pd.DataFrame([{"distribution": name, "window": window, "route": route}
                         for chosen, by_layer in features
                         for (name, window), route in zip(chosen, router.predict(by_layer[router.layer]))])


def routed_from_static(static: pd.DataFrame, routes: pd.DataFrame, set_of: Mapping[str, str]) -> pd.DataFrame:
    """:func:`routed_window_nll`'s table without running the routed model: each window's ``nll_sum`` and ``n_tokens``
    read from ``static`` (window NLL by ``drop_set``, :func:`analysis.evaluation.heldout.window_nll`) for the set its
    route uses, ``set_of[route]``.  Routed inference gives the chosen set's logits (:class:`RoutedModel`), so this
    equals really running it up to float summation order (tested within 1e-4 relative per window)."""
    lookup = static.set_index(["drop_set", "distribution", "window"])[["nll_sum", "n_tokens"]]
    keys = list(zip(routes["route"].map(set_of), routes["distribution"], routes["window"]))
    return routes.assign(**{column: lookup.loc[keys, column].to_numpy() for column in ("nll_sum", "n_tokens")})


def calibration_batches(tokenizer, distributions, *, n_samples: int, seq_len: int, seed: int,
                        batch_size: int) -> dict[str, list]:
    """Per distribution, batches of its calibration windows (the windows its scores come from with the same
    settings)."""
    return {name: list(token_batches(calibration_samples(load_distribution(name, "calibration"), tokenizer,
                                                         n_samples=n_samples, seq_len=seq_len, seed=seed), batch_size))
            for name in distributions}


def router_accuracy(routes: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Fraction of windows routed to their true source, overall and per source, with Clopper-Pearson CIs."""
    rows = []
    for where, part in [("all", routes), *routes.groupby("distribution", sort=False)]:
        hits = int((part["route"] == part["distribution"]).sum())
        interval = stats.binomtest(hits, len(part)).proportion_ci(level)
        rows.append({"distribution": where, "n_windows": len(part), "correct": hits, "accuracy": hits / len(part),
                     "ci_low": interval.low, "ci_high": interval.high})
    return pd.DataFrame(rows)


def _median_seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@torch.inference_mode()
def routing_cost(model, router: Router, batch: Mapping[str, torch.Tensor], *, repeats: int = 5) -> dict:
    """Wall-clock cost of routing one batch as a ratio of one full forward pass of the unpruned model.

    ``prefix_ratio``: computing the feature alone (blocks ``0..L``) over a forward pass;
    ``classifier_ratio``: the classifier's prediction over a forward pass; ``layer_ratio = (L + 1) / n_layers``,
    the share of decoder blocks the prefix runs.  In :class:`RoutedModel` the prefix is reused by the pruned
    continuation, so only the classifier is extra.
    """
    device = input_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    full = _median_seconds(lambda: full_row_nll(model, ids, mask), repeats)
    head = _median_seconds(lambda: prefix(model, ids, mask, router.layer), repeats)
    features = prefix(model, ids, mask, router.layer)[1]
    classify = _median_seconds(lambda: router.predict(features), repeats)
    n_layers = len(decoder_layers(model))
    return {"layer": router.layer, "n_layers": n_layers, "rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "forward_s": full,
            "prefix_s": head, "classifier_s": classify, "prefix_ratio": head / full,
            "classifier_ratio": classify / full,
            "layer_ratio": (router.layer + 1) / n_layers}


def pooled_mix(windows: pd.DataFrame) -> pd.DataFrame:
    """Window rows of several distributions relabelled as one distribution ``mix`` (window ids made unique)."""
    codes = pd.factorize(windows["distribution"].astype(str) + "/" + windows["window"].astype(str))[0]
    return windows.assign(distribution="mix", window=codes)


def evaluate_routing(model, tokenizer, scores: pd.DataFrame, *, module: str = "attn", k: int = 8,
                     metric: str = PRIMARY_METRIC,
                     consensus_methods=("borda", "minimax"), classifier: str = "centroid",
                     calibration_samples: int = 32,
                     calibration_seq_len: int = 512, heldout_samples: int = 24, heldout_seq_len: int = 256,
                     batch_size: int = 8,
                     n_boot: int = 1000, seed: int = 0, progress: bool = False) -> dict[str, pd.DataFrame]:
    """Routed vs static drop sets on a held-out mix of every scored distribution, at one budget.

    Drop sets: each distribution's own set and each consensus method's, from ``scores``; the router
    (``classifier``) is trained on the calibration windows the scores were computed on
    (``calibration_samples`` × ``calibration_seq_len``, ``seed``).  Returns ``windows`` (NLL of every
    held-out window under every static set, ``routed`` and ``oracle``), ``routes``, ``summary``
    (perplexity ratio per distribution, worst, mean and on the pooled ``mix``, with bootstrap CIs),
    ``paired`` (routed against every static set and the oracle, paired over windows), ``accuracy``
    and ``cost``.
    """
    from ..study.dropsets import UNPRUNED
    from .heldout import heldout_samples as heldout
    from .heldout import window_nll

    sets = drop_set_family(scores, module=module, k=k, metric=metric, methods=tuple(consensus_methods))
    distributions = list(scores["distribution"].unique())
    own = own_sets(sets, distributions)
    router = fit_router(model, calibration_batches(tokenizer, distributions, n_samples=calibration_samples,
                                                   seq_len=calibration_seq_len,
                                                   seed=seed, batch_size=batch_size), routing_layer(sets),
                                                   classifier=classifier)
    samples = heldout(tokenizer, distributions, n_samples=heldout_samples, seq_len=heldout_seq_len, seed=seed)
    static = window_nll(model, samples, {UNPRUNED: None, **sets}, batch_size=batch_size, progress=progress)
    routes = routed_window_nll(RoutedModel(model, sets, router, own), samples, batch_size=batch_size, seed=seed)
    tables = routing_tables(static, routes, own, module=module, k=k, metric=metric, layer=router.layer,
                            n_layers=len(decoder_layers(model)), n_boot=n_boot, seed=seed)
    first = next(token_batches(samples[distributions[0]], batch_size))
    tables["cost"] = pd.DataFrame([routing_cost(model, router, first)]).assign(
        max_abs_nll_difference_routed_vs_static=tables["routes"]["static_difference"].abs().max())
    return tables


def own_sets(sets: Mapping[str, object], distributions) -> dict[str, str]:
    """``{distribution: label of its own set}`` among ``sets`` (labels as
    :func:`analysis.study.dropsets.drop_set_family` makes them)."""
    method = {label: (spec.method if hasattr(spec, "method") else spec["method"]) for label, spec in sets.items()}
    own = {d: next((label for label, m in method.items() if m == f"own:{d}"), None) for d in distributions}
    missing = [d for d, label in own.items() if label is None]
    if missing:
        raise InputError(f"no own drop set for {', '.join(missing)}: routing needs one per distribution")
    return own


def routing_tables(static: pd.DataFrame, routes: pd.DataFrame, own: Mapping[str, str], *, module: str, k: int,
                   metric: str, layer: int,
                   n_layers: int, n_boot: int = 1000, seed: int = 0, family: str = "",
                   versus=None) -> dict[str, pd.DataFrame]:
    """Routed vs static drop sets from the static sets' window NLL (:func:`analysis.evaluation.heldout.window_nll`) and
    the routed rows (:func:`routed_window_nll`, or :func:`routed_from_static`) on the same windows.
    The ``oracle`` rows are each window's own-set rows; ``routes`` gains the chosen set, its static NLL on the window
    and ``static_difference`` (routed minus static, 0 when routed inference equals the pruned model).  Returns
    ``windows``, ``routes``, ``summary`` (perplexity ratio per distribution, worst, mean and on the pooled ``mix``, with
    bootstrap CIs), ``paired`` (routed / each static set and / the oracle, paired over windows, per distribution and on
    the mix) and ``accuracy`` (router accuracy, :func:`router_accuracy`).  The summary also names the budget
    (``module``, ``k``), the routing block ``layer`` with ``layer_ratio = (layer + 1) / n_layers`` and
    ``max_abs_static_difference``.  ``family`` (for example ``greedy``) names the routed and oracle sets
    ``<metric>/<module>-<k>:routed:<family>``; ``versus`` lists the static sets routing is paired against (default:
    every static set of ``metric``)."""
    from .heldout import paired_comparisons, transfer_summary

    prefix_label = f"{metric}/{module}-{k}:"
    chosen = routes.assign(chosen=routes["route"].map(own))
    lookup = static.set_index(["drop_set", "distribution", "window"])["nll_sum"]
    chosen["static_nll"] = lookup.loc[list(zip(chosen["chosen"], chosen["distribution"], chosen["window"]))].to_numpy()
    chosen["static_difference"] = chosen["nll_sum"] - chosen["static_nll"]
    suffix = f":{family}" if family else ""
    routed_label, oracle_label = prefix_label + "routed" + suffix, prefix_label + "oracle" + suffix
    oracle = static[static["drop_set"] == static["distribution"].map(own)].assign(drop_set=oracle_label)
    windows = pd.concat([static, routes.assign(drop_set=routed_label)[static.columns], oracle], ignore_index=True)
    mix = transfer_summary(pooled_mix(windows), n_boot=n_boot, seed=seed)
    summary = pd.concat([transfer_summary(windows, n_boot=n_boot, seed=seed), mix[mix["distribution"] == "mix"]],
                        ignore_index=True)
    summary = summary.assign(module=module, k=k, layer=layer, n_layers=n_layers, layer_ratio=(layer + 1) / n_layers,
                             max_abs_static_difference=float(chosen["static_difference"].abs().max()))
    static_sets = ([label for label in static["drop_set"].unique() if label.startswith(prefix_label)]
                   if versus is None else list(versus))
    pairs = [(f"routed{suffix} vs {label.removeprefix(prefix_label)}", routed_label, label)
             for label in [*static_sets, oracle_label]]
    mix_paired = paired_comparisons(pooled_mix(windows), pairs, n_boot=n_boot, seed=seed)
    paired = pd.concat([paired_comparisons(windows, pairs, n_boot=n_boot, seed=seed),
                        mix_paired[mix_paired["distribution"] == "mix"]],
                       ignore_index=True)
    return {"windows": windows, "routes": chosen, "summary": summary, "paired": paired,
            "accuracy": router_accuracy(routes)}


def pooled_ratios(static: pd.DataFrame) -> pd.Series:
    """Each static set's perplexity ratio to the unpruned model on the pooled mix of every distribution's windows,
    ``exp((sum_w nll_set[w] - sum_w nll_none[w]) / sum_w n_tokens[w])``, lowest first."""
    from ..study.dropsets import UNPRUNED

    totals = static.groupby("drop_set")[["nll_sum", "n_tokens"]].sum()
    ratio = np.exp((totals["nll_sum"] - totals.loc[UNPRUNED, "nll_sum"]) / totals.loc[UNPRUNED, "n_tokens"])
    return ratio.drop(UNPRUNED).sort_values(kind="stable")
