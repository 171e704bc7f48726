"""Attention that keeps float32 grouped-query models off PyTorch's slowest kernel on a GPU.

With no padding, transformers' ``sdpa`` passes grouped-query attention (fewer key/value heads than query heads) to
``scaled_dot_product_attention(..., enable_gqa=True)``.  On CUDA in float32 the flash kernel does not apply and the
memory-efficient one does not take ``enable_gqa``, so every layer falls back to the math kernel, which writes the
whole ``(batch, heads, seq, seq)`` score tensor: on one H200 that was 42% of the ablation's device time for
smollm2-135m (``benchmarks/reference/profile_gpu.py``).  :func:`sdpa_repeated_kv` repeats the key/value heads first
(``K_h = K_{h // groups}``, exactly what ``enable_gqa`` means), so the memory-efficient kernel runs.  Elsewhere (a
CPU, half precision) it is transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "calibdrop_sdpa"


def needs_repeated_kv(query: torch.Tensor, key: torch.Tensor, attention_mask) -> bool:
    """True where transformers would send grouped-query attention to the math kernel: CUDA, float32, no mask."""
    return query.is_cuda and query.dtype == torch.float32 and attention_mask is None and query.shape[1] != key.shape[1]


def sdpa_repeated_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                     **kwargs):
    """``softmax(Q K^T * scaling + causal mask) V`` per head, as transformers' ``sdpa_attention_forward``, with the
    key/value heads repeated to the query heads first where :func:`needs_repeated_kv`."""
    if not needs_repeated_kv(query, key, attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    causal = query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    output = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), dropout_p=dropout, scale=scaling, is_causal=causal)
    return output.transpose(1, 2).contiguous(), None


def use_repeated_kv_attention(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with :func:`sdpa_repeated_kv` in place of ``sdpa`` (any other implementation is left as it is)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
    return model


AttentionInterface.register(NAME, sdpa_repeated_kv)
AttentionMaskInterface.register(NAME, sdpa_mask)
