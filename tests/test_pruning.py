import contextlib
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis import adapter_for, decoder_layers, load_model
from analysis.errors import InputError
from analysis.models.pruning import cached_layers, drop_modules, save_pruned

from tiny import CONFIGS, byte_tokenizer, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12]])
CASES = {"attn": dict(attn=[0, 2]), "mlp": dict(mlp=[1]), "blocks": dict(blocks=[1]), "joint": dict(joint=["attn:1", "mlp:0", "mlp:2"])}


@contextlib.contextmanager
def zeroed_branches(model, attn=(), mlp=(), blocks=(), joint=()):
    """The unpruned model with the dropped branches' outputs zeroed (blocks made identities) by hooks."""
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    attn = [*attn, *(int(e.split(":")[1]) for e in joint if e.startswith("attn"))]
    mlp = [*mlp, *(int(e.split(":")[1]) for e in joint if e.startswith("mlp"))]
    handles = [getattr(layers[i], adapter.attn).register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:])) for i in attn]
    handles += [getattr(layers[i], adapter.mlp).register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for i in mlp]
    handles += [layers[i].register_forward_hook(lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True) for i in blocks]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def greedy(model, ids, n=8):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_pruned_model_equals_zeroed_reference(family, case):
    drop = CASES[case]
    reference = tiny_model(family)
    with torch.no_grad(), zeroed_branches(reference, **drop):
        want_logits = reference(IDS).logits
        want_tokens = greedy(reference, IDS).sequences
    pruned = drop_modules(tiny_model(family), **drop)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, want_logits, atol=1e-5, rtol=0)
        out = greedy(pruned, IDS)
    assert torch.equal(out.sequences, want_tokens)
    attn_dropped = len(drop.get("attn", [])) + sum(e.startswith("attn") for e in drop.get("joint", []))
    assert cached_layers(out.past_key_values) == 3 - attn_dropped - len(drop.get("blocks", []))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_save_reload_gives_identical_logits(family, tmp_path):
    model = drop_modules(tiny_model(family), attn=[1], mlp=[2], blocks=[0])
    save_pruned(model, tmp_path, byte_tokenizer())
    reloaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert not [k for k in reloaded.state_dict() if re.search(r"layers\.0\.(self_attn|attention)\.", k)]
    assert reloaded.config.calibdrop_pruning["attn"] == [0]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_block_dropped_checkpoint_loads_with_plain_transformers(family, tmp_path):
    model = drop_modules(tiny_model(family), blocks=[0, 2])
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.num_hidden_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    if family == "gemma3":
        assert plain.config.layer_types == ["sliding_attention"]


def test_dropped_weights_are_gone():
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    drop_modules(model, attn=[0])
    layer = model.model.layers[0]
    assert sum(p.numel() for p in model.parameters()) == before - sum(
        p.numel() for p in tiny_model("llama").model.layers[0].self_attn.parameters()) - layer.post_attention_layernorm.weight.numel() * 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(blocks=[0, 1, 2]), "dropping every block"),
        (dict(attn=[0, 1, 2], mlp=[0, 1, 2]), "every remaining attention and MLP"),
        (dict(attn=[3]), r"out of range: the model has layers 0..2"),
        (dict(attn=[1, 1]), "listed twice"),
        (dict(mlp=[1], blocks=[1]), "dropped twice"),
        (dict(joint=["head:1"]), "not of the form"),
    ],
)
def test_bad_drop_is_a_clear_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        drop_modules(tiny_model("llama"), **kwargs)


def test_dropping_the_same_attention_again_is_refused():
    model = drop_modules(tiny_model("llama"), attn=[1])
    with pytest.raises(InputError, match="already dropped"):
        drop_modules(model, attn=[1])
