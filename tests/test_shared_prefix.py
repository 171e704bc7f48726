"""Drop sets resumed from the sets run before them: the plan against a brute-force search, the NLL against a whole
pass of each pruned copy, bit for bit."""

import copy
import itertools

import numpy as np
import pytest
import torch

from analysis.importance.ablation import full_row_nll
from analysis.importance.shared_prefix import by_layer, first_difference, resume_plan, shared_prefix_row_nll
from analysis.models.pruning import drop_modules
from tiny import tiny_model


def random_sets(n_sets: int, n_layers: int, seed: int) -> list[tuple]:
    """Overlapping member sets, as sets built from similar rankings are: a shared core plus a few members each."""
    rng = np.random.default_rng(seed)
    modules = [(kind, layer) for kind in ("attn", "mlp", "block") for layer in range(n_layers)]
    core = [modules[i] for i in rng.choice(len(modules), 2, replace=False)]
    sets = []
    for _ in range(n_sets):
        extra = [modules[i] for i in rng.choice(len(modules), rng.integers(0, 3), replace=False)]
        members = {*core[:rng.integers(0, 3)], *extra}
        blocks = {layer for kind, layer in members if kind == "block"}
        sets.append(tuple(sorted(m for m in members if m[0] == "block" or m[1] not in blocks)))
    return sets


@pytest.mark.parametrize("seed", range(5))
def test_each_set_resumes_where_it_first_differs_from_the_best_earlier_set(seed):
    sets = [s for s in random_sets(12, 6, seed) if s]
    plan = resume_plan(sets)
    assert [members for members, _, _ in plan] == sorted({by_layer(s) for s in sets})
    starts = {(): 0}
    for index, (members, parent, layer) in enumerate(plan):
        earlier = [(), *[m for m, _, _ in plan[:index]]]
        assert parent in earlier
        # brute force: the members below `layer` agree with the parent's, and no earlier set agrees further
        assert {m for m in members if m[1] < layer} == {m for m in parent if m[1] < layer}
        assert layer == max(min(l for _, l in set(members) ^ set(e)) for e in earlier)
        assert earlier.index(parent) == min(i for i, e in enumerate(earlier) if first_difference(members, e) == layer)
        assert layer >= starts[parent]  # the parent's pass reached that layer
        starts[members] = layer


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_shared_prefix_nll_equals_a_whole_pass_of_each_pruned_copy_bit_for_bit(family):
    model = tiny_model(family)
    n_layers = model.config.num_hidden_layers
    sets = random_sets(10, n_layers, 3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 200, (3, 19), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    nll, n_predicted = shared_prefix_row_nll(model, sets, ids, mask)
    assert set(nll) == {(), *sets}
    for members in itertools.chain([()], sets):
        kinds = {kind: [layer for k, layer in members if k == kind] for kind in ("attn", "mlp", "block")}
        pruned = drop_modules(copy.deepcopy(model), attn=kinds["attn"], mlp=kinds["mlp"], blocks=kinds["block"]) \
            if members else model
        with torch.inference_mode():
            whole, predicted = full_row_nll(pruned, ids, mask)
        assert np.array_equal(nll[members], whole), members
        assert np.array_equal(n_predicted, predicted)
