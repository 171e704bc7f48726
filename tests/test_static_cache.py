"""A pruned model decodes with transformers' static KV cache (the cache a compiled decode step needs):
dropped attention layers get no cache, and the tokens equal those of the dynamic cache."""

import pytest
import torch

from analysis.models.pruning import cached_layers, drop_modules, kv_cache_bytes

from tiny import tiny_model


def _generate(model, cache_implementation):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, cache_implementation=cache_implementation)


@pytest.mark.parametrize("plan, cached", [({"attn": [0, 2]}, 1), ({"mlp": [1]}, 3), ({"blocks": [1]}, 2)])
def test_static_cache_of_a_pruned_model_holds_only_kept_attention_and_decodes_like_the_dynamic_cache(plan, cached):
    model = drop_modules(tiny_model("llama"), **plan)
    static, dynamic = _generate(model, "static"), _generate(model, "dynamic")
    assert type(static.past_key_values).__name__ == "StaticCache"
    assert cached_layers(static.past_key_values) == cached_layers(dynamic.past_key_values) == cached
    positions = 12 + 6 - 1  # prompt + new tokens, less the last one, which is never fed back
    layer_bytes = 2 * 2 * positions * model.config.num_key_value_heads * model.config.head_dim * 4  # k and v, rows, fp32
    assert kv_cache_bytes(static.past_key_values) == cached * layer_bytes
    assert torch.equal(static.sequences, dynamic.sequences)
