"""The grouped-query attention that avoids PyTorch's math kernel on a GPU equals transformers' sdpa."""

import pytest
import torch

from analysis.models import attention
from tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_repeated_key_value_heads_give_the_logits_of_sdpa(family, monkeypatch):
    model = tiny_model(family)
    assert model.config.num_attention_heads != model.config.num_key_value_heads
    ids = torch.randint(2, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        attention.use_repeated_kv_attention(model)
        assert model.config._attn_implementation == attention.NAME
        repeated = []

        def on_any_device(query, key, attention_mask):
            assert not real(query, key, attention_mask)  # on a CPU transformers' sdpa runs unchanged
            repeated.append(attention_mask is None and query.shape[1] != key.shape[1])
            return repeated[-1]

        real = attention.needs_repeated_kv
        monkeypatch.setattr(attention, "needs_repeated_kv", on_any_device)
        got = model(input_ids=ids).logits
    assert len(repeated) == model.config.num_hidden_layers and any(repeated)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_other_attention_implementations_are_left_alone():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert attention.use_repeated_kv_attention(model).config._attn_implementation == "eager"
