"""Many drop sets on one batch, each re-running only the blocks where it differs from a set run before it.

Blocks ``0 .. d - 1`` compute the same bits under two member sets ``S`` and ``T`` that drop the same modules below
layer ``d``: the first layer where they differ is

    d(S, T) = min { layer of m : m in S △ T }        (d(S, ()) = the first layer of S: the unpruned model)

So the sets are run in the order of their members by layer; each resumes at ``d`` from the block input of the earlier
set (or the unpruned model) of largest ``d`` (:func:`resume_plan`), which keeps its block input there.  Sets built
from one ranking share most members, so this runs fewer blocks than resuming every set from the unpruned model; the
LM head still runs once per set.  The NLL equals a whole pass of each set's pruned model
(:func:`analysis.importance.ablation.full_row_nll` of ``drop_modules(copy)``), bit for bit.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..models.pruning import modules_dropped
from .ablation import block_inputs, full_row_nll, position_ids_from_mask, row_nll, stack_from


def by_layer(members) -> tuple:
    """A member set's ``(kind, layer)`` pairs ordered by layer, then kind."""
    return tuple(sorted(members, key=lambda member: (member[1], member[0])))


def first_difference(a, b) -> int:
    """``d(a, b)``: the lowest layer of a member in one set and not the other (module docstring)."""
    return min(layer for _, layer in set(a) ^ set(b))


def resume_plan(member_sets) -> list[tuple[tuple, tuple, int]]:
    """``(set, parent, layer)`` for each distinct non-empty member set, in the order of :func:`by_layer`: the set run
    before it (``()``: the unpruned model) whose block input at ``layer = d(set, parent)`` it resumes from, the one of
    largest ``d`` (the earliest on a tie).  A parent's wanted layer is never below its own start: if ``d(T, S) <``
    ``d(S, P)`` then ``d(T, P) >= d(T, S)`` and ``P``, earlier, is taken."""
    plan, done = [], [()]
    for members in sorted({by_layer(m) for m in member_sets if m}):
        parent = max(done, key=lambda earlier: first_difference(members, earlier))
        plan.append((members, parent, first_difference(members, parent)))
        done.append(members)
    return plan


@torch.inference_mode()
def shared_prefix_row_nll(model, member_sets, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[dict, np.ndarray]:
    """Per-row NLL (:func:`~analysis.importance.ablation.row_nll`) of the unpruned model (key ``()``) and of each of
    ``member_sets`` (keys: the sets as given) on one batch, and the predicted tokens per row; each set runs from its
    :func:`resume_plan` layer."""
    plan = resume_plan(member_sets)
    wanted = defaultdict(set)
    for _, parent, layer in plan:
        wanted[parent].add(layer)
    with block_inputs(model, sorted(wanted[()])) as kept_base:
        base, n_predicted = full_row_nll(model, input_ids, attention_mask)
    kept, nll = {(): kept_base}, {(): base}
    positions = position_ids_from_mask(attention_mask)
    for members, parent, layer in plan:
        with modules_dropped(model, members), block_inputs(model, sorted(wanted[members])) as inputs, \
                stack_from(model, layer):
            logits = model(inputs_embeds=kept[parent][layer], attention_mask=attention_mask, position_ids=positions,
                           use_cache=False).logits
        nll[members] = row_nll(logits, input_ids, attention_mask)[0]
        kept[members] = inputs
    return {members: nll[by_layer(members)] for members in {(), *member_sets}}, n_predicted
