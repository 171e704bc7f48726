"""Ground truth: what dropping modules really costs in next-token loss, without re-running the prefix.

For token windows with real tokens ``t`` (targets are the next real token)::

    nll(model)[s]  = sum_t -log p(x_{t+1} | x_<=t)                       (per sample s)
    ΔNLL(D)[s]     = nll(model with the modules D dropped)[s] - nll(model)[s]

Dropping follows :func:`analysis.models.pruning.drop_modules` exactly (applied temporarily by
:func:`analysis.models.pruning.modules_dropped`).  Blocks before the first dropped layer ``i`` compute
what they compute in the unablated model, so each batch runs the unablated model once, keeps the
residual stream at every block boundary (``resid_pre`` of each block) and re-runs only blocks
``i, i+1, ...`` (and the LM head) from ``resid_pre[i]``: about half a forward pass per module.

* :func:`single_drop_increase`: ``ΔNLL({m})`` of every attention, MLP and block alone (the
  ``ablation`` metric of :mod:`analysis.importance.metrics`).
* :func:`greedy_drop_path`: iterative dropping by real loss (as BlockPruner and SLEB do): each
  step drops the candidate whose removal, given those already dropped, raises the objective
  least; the objective is one distribution's mean ΔNLL per token (``own``) or the largest
  over distributions (``robust``).  A trial re-runs from its own layer, from a block input kept by the drops
  before it (:class:`TrialCache`), and a candidate is left once beaten on one distribution: the path is that of
  trying every candidate on every distribution, bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.adapters import decoder_layers, first_tensor, layer_input
from ..models.pruning import PER_LAYER_CONFIG_LISTS, modules_dropped
from ..presets import SCORED_MODULES

KINDS = SCORED_MODULES
# what a single-drop pass hands on: (input_ids, attention_mask, unpruned row NLL, predicted tokens per row, block inputs
# by layer, each single drop's row NLL by (kind, layer))
SingleDrops = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, dict, dict], None]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (``cumsum(mask) - 1``, 0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log p(x_{t+1} | x_<=t) = logsumexp_v z_{t,v} - z_{t,x_{t+1}}`` per position ``(rows, seq - 1)`` (float32 at
    least, 0 where not predicted) and where it is predicted: positions whose token and next token are real.

    Read along the vocabulary axis as the logits lie in memory (:func:`logsumexp_by_position`)."""
    valid = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    target_logits = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logsumexp_by_position(logits) - target_logits).masked_fill(~valid, 0.0), valid


def logsumexp_by_position(logits: torch.Tensor, positions: int = 32) -> torch.Tensor:
    """``log sum_v exp z_{r,t,v}`` of ``(rows, seq, vocab)`` logits.  On a CPU it runs ``positions`` positions at a
    time, so that the max, shift, exponent and sum of a chunk read it from cache: the same bits, 2.5x faster than one
    call over a 49k vocabulary (one call reads the logits from memory four times; ``cross_entropy`` over the
    ``(rows, vocab, seq)`` view costs more still).  No positions (a one-token window has no next token) give
    ``(rows, 0)``."""
    if logits.device.type != "cpu" or logits.shape[1] == 0:
        return torch.logsumexp(logits, -1)
    return torch.stack([torch.cat([torch.logsumexp(row[start:start + positions], -1)
                                   for start in range(0, row.shape[0], positions)]) for row in logits])


def row_nll(logits: torch.Tensor, input_ids: torch.Tensor,
            attention_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``sum_t -log p(x_{t+1} | x_<=t)`` over positions whose token and next token are real
    (float64), and how many such predicted tokens there are (:func:`token_nll`)."""
    losses, valid = token_nll(logits, input_ids, attention_mask)
    return losses.sum(-1, dtype=torch.float64).cpu().numpy(), valid.sum(-1).cpu().numpy()


@contextmanager
def layer_slice(model: torch.nn.Module, start: int = 0, stop: int | None = None) -> Iterator[torch.nn.Module]:
    """``model`` whose decoder runs only blocks ``start .. stop - 1`` (per-layer config lists sliced alike)."""
    base = model.base_model
    config = model.config
    layers = base.layers
    saved = {name: getattr(config,
                           name) for name in PER_LAYER_CONFIG_LISTS if isinstance(getattr(config, name, None), list)}
    n_layers = config.num_hidden_layers
    kept = slice(start, stop)
    try:
        base.layers = torch.nn.ModuleList(list(layers)[kept])
        for name, values in saved.items():
            setattr(config, name, values[kept])
        config.num_hidden_layers = len(base.layers)
        yield model
    finally:
        base.layers = layers
        for name, values in saved.items():
            setattr(config, name, values)
        config.num_hidden_layers = n_layers


def stack_from(model: torch.nn.Module, start: int):
    """``model`` whose decoder runs only blocks ``start, start+1, ...`` (:func:`layer_slice`)."""
    return layer_slice(model, start)


@contextmanager
def block_inputs(model: torch.nn.Module, layers=None) -> Iterator[dict[int, torch.Tensor]]:
    """A dict filled, during each forward pass, with the input (``resid_pre``) of each block of ``layers`` (default
    every block) by layer index."""
    inputs: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)

    def keep(i):
        def hook(module, args, kwargs):
            inputs[i] = layer_input(args, kwargs)

        return hook

    handles = [blocks[i].register_forward_pre_hook(keep(i), with_kwargs=True)
               for i in (range(len(blocks)) if layers is None else layers)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def resumed_block_inputs(model: torch.nn.Module, start_input: torch.Tensor, start: int, layers,
                         attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """The block inputs at ``layers`` (each at least ``start``) of a forward pass resumed at block ``start`` from its
    input ``start_input``: blocks ``start .. max(layers) - 1`` run (:func:`layer_slice`), no later block and no LM head.
    The input at ``max(layers)`` is the output of the block before it, the tensor the decoder hands on."""
    stop = max(layers)
    inputs = {layer: start_input for layer in layers if layer == start}
    if stop == start:
        return inputs

    def keep_output(module, args, output):
        inputs[stop] = first_tensor(output)

    handle = decoder_layers(model)[stop - 1].register_forward_hook(keep_output)
    try:
        with block_inputs(model, [i for i in layers if start < i < stop]) as kept, layer_slice(model, start, stop):
            model.base_model(inputs_embeds=start_input, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        handle.remove()
    return {**inputs, **kept}


def _on_device(model, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's ``input_ids`` and ``attention_mask`` on the device of the token embeddings."""
    device = model.get_input_embeddings().weight.device
    for batch in batches:
        yield batch["input_ids"].to(device), batch["attention_mask"].to(device)


def full_row_nll(model, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """:func:`row_nll` of one full forward pass (no KV cache, positions over real tokens)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return row_nll(logits, input_ids, attention_mask)


def dropped_row_nll(model, dropped: Sequence[tuple[str, int]], resid_pre: Mapping[int, torch.Tensor], input_ids,
                    attention_mask) -> np.ndarray:
    """Per-row NLL with ``dropped`` removed, re-running only the blocks from the first dropped layer on.

    ``resid_pre`` holds the block inputs of a pass in which every block before that layer ran as
    it runs here (the unablated model, or one with only later modules dropped).
    """
    start = min(layer for _, layer in dropped)
    with modules_dropped(model, dropped), stack_from(model, start):
        logits = model(inputs_embeds=resid_pre[start], attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return row_nll(logits, input_ids, attention_mask)[0]


def single_drop_increase(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         keep: SingleDrops | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``ΔNLL`` sums of dropping each module alone, ``(rows, layers, 3)`` in the order of :data:`KINDS`,
    and the predicted tokens per row.  ``keep`` (:meth:`TrialCache.single_drops`) is handed the pass's rows: the
    unpruned NLL, the predicted tokens, the block inputs and each single drop's NLL by ``(kind, layer)``."""
    n_layers = len(decoder_layers(model))
    with block_inputs(model) as resid_pre:
        base, n_predicted = full_row_nll(model, input_ids, attention_mask)
    dropped = {(kind, i): dropped_row_nll(model, [(kind, i)], resid_pre, input_ids, attention_mask)
               for i in range(n_layers) for kind in KINDS}
    if keep is not None:
        keep(input_ids, attention_mask, base, n_predicted, resid_pre, dropped)
    increase = np.zeros((len(base), n_layers, len(KINDS)))
    for (kind, i), nll in dropped.items():
        increase[:, i, KINDS.index(kind)] = nll - base
    return increase, n_predicted


# ---------------------------------------------------------------- greedy drop sets


def candidates_of(module: str, n_layers: int) -> dict:
    """Candidate label → the ``(kind, layer)`` it drops: layers for attn/mlp/block, ``attn:i``/``mlp:i`` for joint."""
    if module == "joint":
        return {f"{kind}:{i}": (kind, i) for kind in ("attn", "mlp") for i in range(n_layers)}
    if module not in KINDS:
        raise InputError(f"module must be one of attn, mlp, block, joint, not {module!r}")
    return {i: (module, i) for i in range(n_layers)}


def greedy_drop_path(
    model,
    batches_by_distribution: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    *,
    module: str = "attn",
    k: int = 8,
    objective: str = "robust",
    shortlist: int | None = None,
    prior: Mapping | None = None,
    progress: bool = False,
    cache: TrialCache | None = None,
) -> pd.DataFrame:
    """Greedy drop set by real loss, one row per step.

    At step j every remaining candidate c is tried on top of the j modules already dropped; the
    step drops ``argmin_c J(dropped + c)`` with ``J = ΔNLL_d`` (mean per predicted token, relative
    to the unpruned model) for ``objective = d``, or ``J = max_d ΔNLL_d`` for ``"robust"``.  Ties
    go to the earlier candidate.  ``shortlist`` (with ``prior``, candidate → single-drop cost)
    tries only the ``shortlist`` remaining candidates of smallest prior cost at each step.  A ``cache``
    (:class:`TrialCache`) shared by paths over the same batches computes each (distribution, dropped set, candidate)
    once; the path is the same with or without it.

    Columns: ``objective, module, step, candidate, objective_increase`` and
    ``increase:<distribution>`` for every distribution used.
    """
    names = list(batches_by_distribution) if objective == "robust" else [objective]
    if objective != "robust" and objective not in batches_by_distribution:
        raise InputError(f"objective {objective!r} is neither 'robust' nor one of {', '.join(batches_by_distribution)}")
    candidates = candidates_of(module, len(decoder_layers(model)))
    if not 1 <= k < len(candidates):
        raise InputError(f"k={k} is outside 1..{len(candidates) - 1} for {module}")
    if shortlist is not None and prior is None:
        raise InputError("a shortlist needs a prior: the single-drop cost of each candidate")
    cache = TrialCache() if cache is None else cache
    with torch.inference_mode():
        base = {d: cache.base_nll(model, batches_by_distribution[d], d) for d in names}
    chosen: list = []
    rows = []
    for step in tqdm(range(1, k + 1), desc=f"greedy {module} ({objective})", unit="step", disable=not progress):
        remaining = [c for c in candidates if c not in chosen]
        if shortlist is not None:
            remaining = sorted(remaining, key=lambda c: (prior[c], remaining.index(c)))[:shortlist]
            remaining.sort(key=list(candidates).index)
        dropped = [candidates[c] for c in chosen]
        order = sorted(remaining, key=lambda c: (prior[c], remaining.index(c))) if prior is not None else remaining

        def increase(c, d, dropped=dropped):
            tried = cache.trial_nll(model, batches_by_distribution[d], d, dropped, {c: candidates[c]})[c]
            return (tried - base[d][0]) / base[d][1]

        with torch.inference_mode():
            best, best_increase = _smallest_largest_increase(order, names, remaining.index, increase)
        chosen.append(best)
        rows.append({"objective": objective, "module": module, "step": step, "candidate": str(best),
                     "objective_increase": max(best_increase.values()),
                     **{f"increase:{d}": best_increase[d] for d in names}})
    return pd.DataFrame(rows)


def _smallest_largest_increase(order, names, rank, increase) -> tuple:
    """The candidate of smallest ``J(c) = max_d increase(c, d)`` (on a tie the one of smaller ``rank``) and its
    increase on every distribution of ``names``; candidates are tried in ``order``.

    A candidate is left once its largest increase on the distributions tried so far is above the best
    ``J`` found (or equal to it and its rank is larger): its ``J`` can only be as large, so it cannot be chosen.  The
    choice and the chosen candidate's increases are those of trying every candidate on every distribution.  Each
    candidate tries first the distributions where the best found so far rose most.
    """
    best, best_increase = None, None
    for c in order:
        tried: dict = {}
        for d in names if best is None else sorted(names, key=lambda d: -best_increase[d]):
            tried[d] = increase(c, d)
            if best is not None and (tried[d], rank(c)) > (max(best_increase.values()), rank(best)):
                break
        else:
            if best is None or (max(tried.values()), rank(c)) < (max(best_increase.values()), rank(best)):
                best, best_increase = c, {d: tried[d] for d in names}
    return best, best_increase


class TrialCache:
    """Summed NLL of one distribution's batches unpruned, and with a set of modules ``D`` dropped and each trial
    candidate dropped on top of it, kept by ``(distribution, D, candidate)`` so greedy paths over the same batches share
    their common work.

    A trial at layer ``L`` re-runs blocks ``L, L+1, ...`` and the LM head (:func:`dropped_row_nll`) from the block input
    at ``L`` with ``D`` removed.  That input depends only on the modules of ``D`` before ``L`` (``D_<L``), so it is kept
    by ``(distribution, batch, D_<L, L)`` and found again by later steps and paths: after a step drops ``c`` at layer
    ``l``, every trial at or before ``l`` finds its input kept and one after it resumes at ``l``.  A missing input comes
    from a pass of blocks ``M .. L - 1`` (:func:`resumed_block_inputs`, ``D_<L`` removed) from the kept input at the
    largest ``M <= L`` whose ``(D_<M, M)`` is kept (layer 0's, the embeddings, always is).  No pass runs the LM head for
    ``D`` alone: its NLL is not needed.  Kept inputs beyond layer 0 stay within ``max_bytes``, the least recently used
    dropped first (a dropped input is recomputed when asked for again: same bits, more time).

    ``passes``: resumed passes run (one batch each); ``trials``: (candidate, distribution) trial evaluations run;
    ``requested``: those asked for (run or found here).
    """

    def __init__(self, max_bytes: int = 2 ** 31):
        self.base: dict = {}
        self.first_inputs: dict = {}
        self.inputs: OrderedDict = OrderedDict()
        self.max_bytes, self.kept_bytes = max_bytes, 0
        self.tried: dict = {}
        self.passes = self.trials = self.requested = 0

    def base_nll(self, model, batches, distribution: str) -> tuple[float, int]:
        """Summed NLL of the unpruned model on ``distribution``'s ``batches`` (:func:`full_row_nll`, summed batch by
        batch) and its predicted tokens; keeps each batch's first block input."""
        if distribution not in self.base:
            total, tokens = 0.0, 0
            for index, (ids, mask) in enumerate(_on_device(model, batches)):
                with block_inputs(model) as resid_pre:
                    nll, n_predicted = full_row_nll(model, ids, mask)
                self.first_inputs[(distribution, index)] = resid_pre[0]
                total += float(nll.sum())
                tokens += int(n_predicted.sum())
            self.base[distribution] = (total, tokens)
        return self.base[distribution]

    def single_drops(self, batches_by_distribution: Mapping[str, Sequence], candidates: Mapping) -> SingleDrops:
        """A :data:`SingleDrops` that keeps what a single-drop pass (:func:`single_drop_increase`) of one of the
        ``batches_by_distribution`` batches (matched by its tokens and mask) computed: its first block input and its
        block inputs with nothing dropped, and, once every batch of a distribution has run, the distribution's
        unpruned NLL and each of ``candidates`` (label → ``(kind, layer)``) dropped alone, summed batch by batch as
        :meth:`base_nll` and :meth:`trial_nll` sum them (so a greedy path's first step finds its trials here)."""
        rows: dict = {}

        def keep(input_ids, attention_mask, base, n_predicted, resid_pre, dropped) -> None:
            for distribution, batches in batches_by_distribution.items():
                for index, batch in enumerate(batches):
                    if (torch.equal(batch["input_ids"].to(input_ids.device), input_ids)
                            and torch.equal(batch["attention_mask"].to(attention_mask.device), attention_mask)):
                        self._keep_inputs((distribution, index), resid_pre)
                        rows.setdefault(distribution, {})[index] = (base, n_predicted, dropped)
                        if len(rows[distribution]) == len(batches):
                            done = rows.pop(distribution)
                            if distribution not in self.base:
                                self._keep_sums(distribution, [done[i] for i in range(len(batches))], candidates)
                        return

        return keep

    def _keep_inputs(self, batch_key, resid_pre: Mapping[int, torch.Tensor]) -> None:
        self.first_inputs[batch_key] = resid_pre[0]
        for layer, found in resid_pre.items():
            if layer and (*batch_key, frozenset(), layer) not in self.inputs:
                self._store((*batch_key, frozenset(), layer), found)

    def _keep_sums(self, distribution: str, batches: list, candidates: Mapping) -> None:
        self.base[distribution] = (sum(float(base.sum()) for base, _, _ in batches),
                                   sum(int(n_predicted.sum()) for _, n_predicted, _ in batches))
        key = (distribution, frozenset())
        for label, spec in candidates.items():
            self.tried[(key, label)] = sum(float(dropped[spec].sum()) for _, _, dropped in batches)

    def trial_nll(self, model, batches, distribution: str, dropped, trials: Mapping) -> dict:
        """Summed NLL of ``distribution``'s ``batches`` with ``dropped`` and each trial ``label -> (kind, layer)``
        removed (batch sums added in batch order), running only the trials not yet kept."""
        self.base_nll(model, batches, distribution)
        key = (distribution, frozenset(dropped))
        missing = {label: spec for label, spec in trials.items() if (key, label) not in self.tried}
        self.requested += len(trials)
        if missing:
            tried = self.missing_trials(model, batches, distribution, dropped, missing)
            self.tried.update({(key, label): value for label, value in tried.items()})
            self.trials += len(missing)
        return {label: self.tried[(key, label)] for label in trials}

    def missing_trials(self, model, batches, distribution: str, dropped, missing: Mapping) -> dict:
        """The summed NLL of each of ``missing`` (label → ``(kind, layer)``) on top of ``dropped``, each trial re-run
        from its layer from the kept block input there (:meth:`_input_at`)."""
        tried = {label: 0.0 for label in missing}
        layers = sorted({layer for _, layer in missing.values()})
        for index, (ids, mask) in enumerate(_on_device(model, batches)):
            inputs = {layer: self._input_at(model, (distribution, index), dropped, layer, mask) for layer in layers}
            with modules_dropped(model, dropped):
                for label, spec in missing.items():
                    tried[label] += float(dropped_row_nll(model, [spec], inputs, ids, mask).sum())
        return tried

    def _kept(self, batch_key, dropped, layer: int) -> torch.Tensor | None:
        """The kept block input at ``layer`` with the modules of ``dropped`` before it removed, or ``None``."""
        if layer == 0:
            return self.first_inputs[batch_key]
        key = (*batch_key, frozenset(spec for spec in dropped if spec[1] < layer), layer)
        if key in self.inputs:
            self.inputs.move_to_end(key)
        return self.inputs.get(key)

    def _input_at(self, model, batch_key, dropped, layer: int, mask) -> torch.Tensor:
        """The block input at ``layer`` with ``dropped`` removed: kept, or resumed from the nearest kept one below."""
        found = self._kept(batch_key, dropped, layer)
        if found is not None:
            return found
        start = next(m for m in range(layer - 1, -1, -1) if self._kept(batch_key, dropped, m) is not None)
        before = [spec for spec in dropped if spec[1] < layer]
        with modules_dropped(model, before):
            found = resumed_block_inputs(model, self._kept(batch_key, dropped, start), start, {layer}, mask)[layer]
        self.passes += 1
        self._store((*batch_key, frozenset(before), layer), found)
        return found

    def _store(self, key, found: torch.Tensor) -> None:
        """Keep one block input, the least recently used dropped beyond ``max_bytes``."""
        self.inputs[key] = found
        self.kept_bytes += found.numel() * found.element_size()
        while self.kept_bytes > self.max_bytes and self.inputs:
            _, evicted = self.inputs.popitem(last=False)
            self.kept_bytes -= evicted.numel() * evicted.element_size()


def greedy_set(path: pd.DataFrame, k: int) -> list[str]:
    """The size-k greedy drop set: the candidates of the first k steps of a path."""
    steps = path.sort_values("step")
    if k > len(steps):
        raise InputError(f"the greedy path has {len(steps)} steps; it cannot give a size-{k} set")
    return list(steps["candidate"].iloc[:k])
