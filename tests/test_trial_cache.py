"""The greedy trials' resumed passes give the same bits as the passes they replace.

A :class:`~analysis.importance.ablation.TrialCache` trial re-runs blocks from the trial's layer, from a block input that
is the unpruned model's (kept per batch) or a pass resumed at the first dropped layer.  Two independent computations of
the same sums: the full forward pass with the dropped set removed whose block inputs the trial re-runs from (what the
cache did before), and a plain full forward of a copy with the modules deleted for real (``drop_modules``).  Both must
equal the cache's sums exactly (float ``==``), on every tiny family, for every kind of module, with padding.
"""

import copy

import numpy as np
import pytest
import torch

from analysis.data.samples import length_sorted_batches, pad_token_id, tokenize_texts
from analysis.importance import ablation
from analysis.models.pruning import drop_modules, modules_dropped

from tiny import CONFIGS, byte_tokenizer, tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2",
    "Ein kurzer Satz.",
    "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants in mathematics.",
    "A fifth text, longer than most of the others, so that the batches carry padding.",
]


def batches_of(tokenizer):
    sequences = tokenize_texts(tokenizer, TEXTS, 64)
    return list(length_sorted_batches(sequences, 2, pad_token_id(tokenizer), tokenizer.padding_side))


def full_pass_trials(model, batches, dropped, trials) -> dict:
    """The trials as the cache ran them before: per batch one full forward pass with ``dropped`` removed (its block
    inputs), then each trial re-run from its layer; batch sums added in batch order."""
    tried = {label: 0.0 for label in trials}
    with torch.inference_mode(), modules_dropped(model, dropped):
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with ablation.block_inputs(model) as resid_pre:
                ablation.full_row_nll(model, ids, mask)
            for label, spec in trials.items():
                tried[label] += float(ablation.dropped_row_nll(model, [spec], resid_pre, ids, mask).sum())
    return tried


def copied_model_trials(model, batches, dropped, trials) -> dict:
    """Each trial as a plain full forward pass of a deep copy with ``dropped`` and the trial deleted (``drop_modules``)."""
    tried = {}
    for label, spec in trials.items():
        lists = {"attn": [], "mlp": [], "blocks": []}
        for kind, layer in [*dropped, spec]:
            lists["blocks" if kind == "block" else kind].append(layer)
        pruned = drop_modules(copy.deepcopy(model), **lists)
        with torch.inference_mode():
            tried[label] = sum(float(ablation.full_row_nll(pruned, b["input_ids"], b["attention_mask"])[0].sum())
                               for b in batches)
    return tried


CASES = [  # dropped set, then the trials: before, at and after the first dropped layer, and past a dropped block
    ("attn", [("attn", 2)], [("attn", 0), ("attn", 1), ("attn", 3)]),
    ("mlp", [("mlp", 3), ("mlp", 1)], [("mlp", 0), ("mlp", 2)]),
    ("block", [("block", 1)], [("block", 0), ("block", 2), ("block", 3)]),
    ("joint", [("attn", 1), ("mlp", 2)], [("mlp", 1), ("attn", 0), ("attn", 3), ("mlp", 3)]),
]


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("module,dropped,specs", CASES, ids=[case[0] for case in CASES])
def test_trial_sums_equal_a_full_pass_and_a_pruned_copy_bit_for_bit(family, module, dropped, specs):
    model, tokenizer = tiny_model(family, n_layers=4), byte_tokenizer()
    batches = batches_of(tokenizer)
    trials = {f"{kind}:{layer}": (kind, layer) for kind, layer in specs}
    cache = ablation.TrialCache()
    with torch.inference_mode():
        base, tokens = cache.base_nll(model, batches, "d")
        got = cache.trial_nll(model, batches, "d", dropped, trials)
        empty = cache.trial_nll(model, batches, "d", [], trials)
    assert got == full_pass_trials(model, batches, dropped, trials)
    assert empty == full_pass_trials(model, batches, [], trials)
    assert got == copied_model_trials(model, batches, dropped, trials)
    with torch.inference_mode():
        whole = [ablation.full_row_nll(model, b["input_ids"], b["attention_mask"]) for b in batches]
    assert base == sum(float(nll.sum()) for nll, _ in whole) and tokens == sum(int(n.sum()) for _, n in whole)


def test_resumed_block_inputs_equal_the_full_pass_and_keep_nothing_after_the_last_layer():
    model, tokenizer = tiny_model("llama", n_layers=6), byte_tokenizer()
    batch = batches_of(tokenizer)[-1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        with ablation.block_inputs(model) as full:
            ablation.full_row_nll(model, ids, mask)
        full = dict(full)
        ran = []
        handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
                   for i, layer in enumerate(model.model.layers)]
        got = ablation.resumed_block_inputs(model, full[1], 1, {1, 3, 4}, mask)
        for handle in handles:
            handle.remove()
    assert sorted(got) == [1, 3, 4] and ran == [1, 2, 3]
    assert all(torch.equal(got[i], full[i]) for i in got)


def test_the_cache_runs_each_trial_once_and_keeps_only_the_unpruned_inputs_asked_for():
    model, tokenizer = tiny_model("qwen2", n_layers=4), byte_tokenizer()
    batches = batches_of(tokenizer)
    cache = ablation.TrialCache()
    trials = {0: ("attn", 0), 3: ("attn", 3)}
    with torch.inference_mode():
        first = cache.trial_nll(model, batches, "d", [("attn", 2)], trials)
        again = cache.trial_nll(model, batches, "d", [("attn", 2)], {3: ("attn", 3)})
    assert again == {3: first[3]} and cache.trials == 2 and cache.requested == 3 and cache.passes == 1
    assert {layer for kept in cache.unpruned.values() for layer in kept} == {0, 2}
    assert np.isfinite(list(first.values())).all()
