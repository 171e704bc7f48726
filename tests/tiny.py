"""Tiny random models of every supported family, built from configs, and an offline tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 300
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
)
_GQA = dict(num_key_value_heads=2, head_dim=16)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, **_GQA),
    "mistral": lambda: MistralConfig(**_COMMON, **_GQA, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**_COMMON, **_GQA),
    "qwen3": lambda: Qwen3Config(**_COMMON, **_GQA),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, **_GQA, sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"]
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, use_parallel_residual=True),
    "gpt_neox_sequential": lambda: GPTNeoXConfig(**_COMMON, use_parallel_residual=False),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, n_layers: int | None = None):
    """A randomly initialised causal LM of ``family`` in eval mode (``n_layers`` blocks instead of 3 if given)."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    if n_layers is not None:
        config.num_hidden_layers = n_layers
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(n_layers)]
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def byte_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad/eos), built offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side=padding_side
    )
