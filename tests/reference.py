"""An independent importance computation: no calibdrop hooks, one text at a time, float64 cosines.

``resid_pre``/``resid_post`` of block i come from ``output_hidden_states`` (final norm
replaced by an identity); ``resid_mid`` is the output of block i when its MLP is replaced
by a module returning zeros; for a parallel residual the MLP's ``Y`` is the output of block
i when its attention is replaced instead.
"""

from __future__ import annotations

import contextlib

import pandas as pd
import torch
from torch import nn


class ZeroBranch(nn.Module):
    """Stands in for a sublayer and adds nothing to the residual stream."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        zeros = torch.zeros_like(hidden)
        return (zeros, None) if self.returns_tuple else zeros


@contextlib.contextmanager
def replaced(parent: nn.Module, name: str, module: nn.Module):
    original = getattr(parent, name)
    setattr(parent, name, module)
    try:
        yield
    finally:
        setattr(parent, name, original)


def hidden_states(model, ids) -> tuple[torch.Tensor, ...]:
    with replaced(model.base_model, "norm" if hasattr(model.base_model, "norm") else "final_layer_norm", nn.Identity()):
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def cosine_sum(x, y) -> float:
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum().item()


@torch.no_grad()
def reference_importance(model, sequences, attn_name: str, mlp_name: str, parallel: bool) -> pd.DataFrame:
    """Token-weighted ``1 - mean cos`` per (layer, module), computed without hooks."""
    layers = model.base_model.layers
    sums: dict[tuple[int, str], float] = {}
    n_tokens = 0
    for seq in sequences:
        ids = torch.tensor([seq])
        n_tokens += len(seq)
        states = hidden_states(model, ids)
        for i, layer in enumerate(layers):
            pre, post = states[i][0], states[i + 1][0]
            with replaced(layer, mlp_name, ZeroBranch(returns_tuple=False)):
                mid = hidden_states(model, ids)[i + 1][0]
            if parallel:
                with replaced(layer, attn_name, ZeroBranch(returns_tuple=True)):
                    mlp_x, mlp_y = pre, hidden_states(model, ids)[i + 1][0]
            else:
                mlp_x, mlp_y = mid, post
            for module, (x, y) in {"attn": (pre, mid), "mlp": (mlp_x, mlp_y), "block": (pre, post)}.items():
                sums[(i, module)] = sums.get((i, module), 0.0) + cosine_sum(x, y)
    rows = [{"layer": i, "module": m, "importance": 1 - s / n_tokens} for (i, m), s in sums.items()]
    return pd.DataFrame(rows)
