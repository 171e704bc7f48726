"""The greedy trials' resumed passes give the same bits as the passes they replace.

A :class:`~analysis.importance.ablation.TrialCache` trial re-runs blocks from the trial's layer, from a block input that
is the unpruned model's (kept per batch) or a pass resumed at the first dropped layer.  Two independent computations of
the same sums: the full forward pass with the dropped set removed whose block inputs the trial re-runs from (what the
cache did before), and a plain full forward of a copy with the modules deleted for real (``drop_modules``).  Both must
equal the cache's sums exactly (float ``==``), on every tiny family, for every kind of module, with padding.
"""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import CONFIGS, byte_tokenizer, tiny_model

from analysis.data.samples import length_sorted_batches, pad_token_id, tokenize_texts
from analysis.importance import ablation
from analysis.models.pruning import drop_modules, modules_dropped

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2",
    "Ein kurzer Satz.",
    "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants in mathematics.",
    "A fifth text, longer than most of the others, so that the batches carry padding.",
]


def batches_of(tokenizer):
    sequences = tokenize_texts(tokenizer, TEXTS, 96)
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


def blocks_run(model):
    """A list filled with the index of every decoder block run, and the hooks' handles."""
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(model.model.layers)]
    return ran, handles


def test_a_later_step_resumes_at_the_layer_the_step_before_dropped_and_runs_each_trial_once():
    model, tokenizer = tiny_model("qwen2", n_layers=6), byte_tokenizer()
    batch = batches_of(tokenizer)[-1:]
    cache = ablation.TrialCache()
    with torch.inference_mode():
        cache.base_nll(model, batch, "d")
        ran, handles = blocks_run(model)
        first = cache.trial_nll(model, batch, "d", [("attn", 2)], {3: ("attn", 3), 5: ("attn", 5)})
        resumed, ran[:] = list(ran), []
        cache.trial_nll(model, batch, "d", [("attn", 2), ("attn", 3)], {4: ("attn", 4), 5: ("attn", 5)})
        again = cache.trial_nll(model, batch, "d", [("attn", 2)], {5: ("attn", 5)})
        for handle in handles:
            handle.remove()
    # step 1: inputs at 3 (blocks 0-2) and 5 (resumed at 3: blocks 3-4), then the trials (blocks 3-5 and 5)
    assert resumed == [0, 1, 2, 3, 4, 3, 4, 5, 5]
    # step 2: the input at 4 resumes at 3, kept by step 1 (no module of the new set before it); 5 resumes at 4
    assert ran == [3, 4, 4, 5, 5] and again == {5: first[5]}
    assert cache.trials == 4 and cache.requested == 5 and cache.passes == 4


def test_a_cache_that_keeps_no_inputs_gives_the_same_sums():
    model, tokenizer = tiny_model("gemma3", n_layers=5), byte_tokenizer()
    batches = batches_of(tokenizer)
    trials = {f"mlp:{i}": ("mlp", i) for i in range(5) if i != 2}
    with torch.inference_mode():
        kept, none = ablation.TrialCache(), ablation.TrialCache(max_bytes=0)
        for dropped in ([], [("mlp", 2)], [("mlp", 2), ("attn", 1)]):
            assert kept.trial_nll(model, batches, "d", dropped, trials) == none.trial_nll(model, batches, "d",
                                                                                      dropped, trials)
    assert not none.inputs and none.kept_bytes == 0 and kept.inputs and none.passes > kept.passes
    assert np.isfinite(list(kept.tried.values())).all()


def exhaustive_greedy(model, batches_by_distribution, module, k, objective, shortlist=None, prior=None):
    """The greedy path as it was computed before: every shortlisted candidate on every distribution of the objective
    (:func:`full_pass_trials`), the smallest largest increase chosen, ties to the earlier candidate."""
    names = list(batches_by_distribution) if objective == "robust" else [objective]
    candidates = ablation.candidates_of(module, model.config.num_hidden_layers)
    base = {}
    with torch.inference_mode():
        for d in names:
            whole = [ablation.full_row_nll(model, b["input_ids"], b["attention_mask"]) for b in batches_by_distribution[d]]
            base[d] = (sum(float(nll.sum()) for nll, _ in whole), sum(int(n.sum()) for _, n in whole))
    chosen, rows = [], []
    for step in range(1, k + 1):
        remaining = [c for c in candidates if c not in chosen]
        if shortlist is not None:
            remaining = sorted(remaining, key=lambda c: (prior[c], remaining.index(c)))[:shortlist]
            remaining.sort(key=list(candidates).index)
        trials = {c: candidates[c] for c in remaining}
        increase = {c: {} for c in remaining}
        for d in names:
            tried = full_pass_trials(model, batches_by_distribution[d], [candidates[c] for c in chosen], trials)
            for c in remaining:
                increase[c][d] = (tried[c] - base[d][0]) / base[d][1]
        value = {c: max(increase[c].values()) for c in remaining}
        best = min(remaining, key=lambda c: value[c])
        chosen.append(best)
        rows.append({"objective": objective, "module": module, "step": step, "candidate": str(best),
                     "objective_increase": value[best], **{f"increase:{d}": increase[best][d] for d in names}})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("family,module,shortlist", [("llama", "attn", None), ("gemma3", "block", 3),
                                                     ("gpt_neox", "joint", 4), ("qwen3", "mlp", None),
                                                     ("mistral", "attn", 3)])
def test_greedy_paths_equal_the_exhaustive_search_bit_for_bit(family, module, shortlist):
    """Paths with a candidate left once beaten on one distribution, trials resumed and shared through one cache: every
    row (choice and increases) equals trying every candidate on every distribution with full passes."""
    model, tokenizer = tiny_model(family, n_layers=5), byte_tokenizer()
    sequences = tokenize_texts(tokenizer, TEXTS, 96)
    batches = {}
    for d, rows in (("a", [0, 1]), ("b", [2, 3]), ("c", [4, 1])):
        batches[d] = list(length_sorted_batches([sequences[i] for i in rows], 1, pad_token_id(tokenizer), "right"))
    candidates = ablation.candidates_of(module, 5)
    prior = {c: float(np.random.default_rng(len(str(c))).random()) + i / 100 for i, c in enumerate(candidates)}
    cache = ablation.TrialCache()
    for objective in ("a", "robust"):
        before = cache.requested
        got = ablation.greedy_drop_path(model, batches, module=module, k=3, objective=objective, shortlist=shortlist,
                                        prior=prior, cache=cache)
        want = exhaustive_greedy(model, batches, module, 3, objective, shortlist, prior)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        tries = sum(min(shortlist or len(candidates), len(candidates) - j) for j in range(3))
        assert cache.requested - before == tries if objective == "a" else cache.requested - before < 3 * tries


@pytest.mark.parametrize("family,module", [("llama", "attn"), ("qwen2", "joint"), ("gemma3", "block")])
def test_a_cache_seeded_by_the_ablation_gives_the_same_paths_and_runs_no_first_step_trial(family, module):
    """The ablation's single-drop passes kept in the cache (``single_drops``) are the greedy paths' first step and
    unpruned NLL: the paths equal those of an empty cache bit for bit, the ablation table is unchanged, and the
    first step runs no trial of its own."""
    from analysis.importance.scoring import score_token_batches

    model, tokenizer = tiny_model(family, n_layers=5), byte_tokenizer()
    sequences = tokenize_texts(tokenizer, TEXTS, 96)
    batches = {d: list(length_sorted_batches([sequences[i] for i in rows], 2, pad_token_id(tokenizer), "right"))
               for d, rows in (("a", [0, 1, 2]), ("b", [3, 4]))}
    candidates = ablation.candidates_of(module, 5)
    prior = {c: float(i % 3) + i / 100 for i, c in enumerate(candidates)}
    seeded, empty = ablation.TrialCache(), ablation.TrialCache()
    keep = seeded.single_drops(batches, candidates)
    for d, parts in batches.items():
        with_keep = score_token_batches(model, parts, metrics="ablation", progress=False, keep=keep)
        pd.testing.assert_frame_equal(with_keep, score_token_batches(model, parts, metrics="ablation", progress=False),
                                      check_exact=True)
    assert set(seeded.base) == {"a", "b"} and seeded.trials == 0
    for objective in ("a", "robust"):
        got = ablation.greedy_drop_path(model, batches, module=module, k=3, objective=objective, shortlist=3,
                                        prior=prior, cache=seeded)
        want = ablation.greedy_drop_path(model, batches, module=module, k=3, objective=objective, shortlist=3,
                                         prior=prior, cache=empty)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert seeded.trials < empty.trials and seeded.passes < empty.passes
    first = {key for key in empty.tried if not key[0][1]}
    assert first and first <= set(seeded.tried) and all(seeded.tried[key] == empty.tried[key] for key in first)
