"""Input-adaptive drop sets: routed inference equals the pruned models, an oracle router equals the own sets."""

import copy

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from analysis.dropsets import make_drop_set
from analysis.errors import InputError
from analysis.evaluation import pruned_copy, window_nll
from analysis.routing import RoutedModel, Router, check_routing_layer, fit_router, prefix, routed_window_nll, router_accuracy, routing_layer

from tiny import _COMMON, _GQA

SETS = {
    "a": make_drop_set("attn", [3, 5, 7], "own:a"),
    "b": make_drop_set("attn", [4, 6, 9], "own:b"),
    "c": make_drop_set("mlp", [8, 10], "own:c"),
}


def deep_llama(layers: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "num_hidden_layers": layers}, **_GQA)
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def windows(seed: int, n: int, low: int, high: int, length: int = 24) -> datasets.Dataset:
    """``n`` token windows of ids in ``[low, high)``, the last few padded out on the right."""
    rng = np.random.default_rng(seed)
    lengths = [length if i % 3 else length - 5 for i in range(n)]
    ids = [list(rng.integers(low, high, size=m)) + [0] * (length - m) for m in lengths]
    mask = [[1] * m + [0] * (length - m) for m in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "sample": list(range(n))})


SPANS = {"a": (2, 6), "b": (150, 154), "c": (290, 294)}
SAMPLES = {name: windows(i + 1, 6, *span) for i, (name, span) in enumerate(SPANS.items())}


class FixedRouter(Router):
    """Routes row i to ``routes[i % len(routes)]``."""

    def __init__(self, layer, routes):
        super().__init__(layer, None, tuple(SETS))
        self.routes = routes

    def predict(self, features):
        return [self.routes[i % len(self.routes)] for i in range(len(features))]


def test_routing_layer_precedes_every_dropped_module():
    assert routing_layer(SETS) == 2
    check_routing_layer(2, SETS)
    with pytest.raises(InputError, match="does not precede"):
        check_routing_layer(3, SETS)
    with pytest.raises(InputError, match="block 0"):
        routing_layer({**SETS, "d": make_drop_set("attn", [0, 5], "own:d")})


def test_routed_logits_equal_the_pruned_models():
    model = deep_llama()
    routed = RoutedModel(model, SETS, FixedRouter(2, ["b", "a", "c", "a"]), {name: name for name in SETS})
    batch = next(iter(SAMPLES["a"].with_format("torch").iter(batch_size=6)))
    logits, routes = routed.forward(batch["input_ids"], batch["attention_mask"])
    assert routes == ["b", "a", "c", "a", "b", "a"]
    for row, route in enumerate(routes):
        pruned = pruned_copy(copy.deepcopy(model), SETS[route])
        ids, mask = batch["input_ids"][row : row + 1], batch["attention_mask"][row : row + 1]
        want = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = mask[0].bool()
        torch.testing.assert_close(logits[row : row + 1, real], want[:, real], rtol=1e-5, atol=1e-5)
    # the weights were never copied or changed: the unpruned model still gives its own logits
    assert all(type(m).__name__ != "DroppedBranch" for m in model.modules())


def test_oracle_router_reproduces_each_own_sets_heldout_nll():
    model = deep_llama()
    routed = RoutedModel(model, SETS, FixedRouter(2, ["a"]), {name: name for name in SETS})
    oracle = routed_window_nll(routed, SAMPLES, batch_size=4, oracle=True)
    static = window_nll(model, SAMPLES, dict(SETS), batch_size=4)
    for name in SETS:
        want = static[(static["drop_set"] == name) & (static["distribution"] == name)].set_index("window")["nll_sum"]
        got = oracle[oracle["distribution"] == name].set_index("window")["nll_sum"].loc[want.index]
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
        ppl = lambda frame: np.exp(frame["nll_sum"].sum() / frame["n_tokens"].sum())
        np.testing.assert_allclose(ppl(oracle[oracle["distribution"] == name]),
                                   ppl(static[(static["drop_set"] == name) & (static["distribution"] == name)]), rtol=1e-6)
    assert (oracle["route"] == oracle["distribution"]).all()


def test_router_learns_separable_sources_and_reports_accuracy():
    model = deep_llama()
    train = {name: list(windows(10 + i, 12, *span).with_format("torch").iter(batch_size=4))
             for i, (name, span) in enumerate(SPANS.items())}
    router = fit_router(model, train, 2)
    _, features = prefix(model, *[next(iter(SAMPLES["b"].with_format("torch").iter(batch_size=6)))[key] for key in ("input_ids", "attention_mask")], 2)
    assert router.predict(features) == ["b"] * 6
    routed = RoutedModel(model, SETS, router, {name: name for name in SETS})
    table = router_accuracy(routed_window_nll(routed, SAMPLES, batch_size=5))
    overall = table.set_index("distribution").loc["all"]
    assert overall["accuracy"] == 1.0 and overall["n_windows"] == 18 and overall["ci_low"] < 1.0
    with pytest.raises(InputError, match="unknown router classifier"):
        fit_router(model, train, 2, classifier="tree")
