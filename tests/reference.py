"""An independent importance computation: no calibdrop hooks, one text at a time, float64 cosines.

``resid_pre``/``resid_post`` of block i come from ``output_hidden_states`` of the decoder (final norm
replaced by an identity); ``resid_mid`` is the output of block i when its MLP is replaced
by a module returning zeros; for a parallel residual the MLP's ``Y`` is the output of block
i when its attention is replaced instead.  Those two run the decoder's first i + 1 blocks only (the
blocks above and the LM head cannot change block i's output).
"""

from __future__ import annotations

import contextlib
import copy
import math

import pandas as pd
import torch
from torch import nn

from analysis.models.pruning import drop_modules


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


def hidden_states(model, ids, n_blocks: int | None = None) -> tuple[torch.Tensor, ...]:
    """The residual stream entering each block and leaving the last: the decoder without its LM head, final norm
    replaced by an identity, running its first ``n_blocks`` blocks (all by default)."""
    decoder = model.base_model
    blocks = decoder.layers if n_blocks is None else decoder.layers[:n_blocks]
    norm = "norm" if hasattr(decoder, "norm") else "final_layer_norm"
    with replaced(decoder, norm, nn.Identity()), replaced(decoder, "layers", blocks):
        return decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _cos(x, y):
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)


TOKEN_STATISTICS = {
    "cosine": (_cos, lambda mean: 1 - mean),
    "angular": (lambda x, y: torch.arccos(_cos(x, y).clamp(-1, 1)) / math.pi, lambda mean: mean),
    "relative_update": (lambda x, y: (y.double() - x.double()).norm(dim=-1) / x.double().norm(dim=-1), lambda mean: mean),
}


@torch.no_grad()
def reference_importance(model, sequences, attn_name: str, mlp_name: str, parallel: bool, metric: str = "cosine") -> pd.DataFrame:
    """Token-weighted importance of a proxy metric per (layer, module), computed without hooks in float64."""
    statistic, importance = TOKEN_STATISTICS[metric]
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
                mid = hidden_states(model, ids, i + 1)[i + 1][0]
            if parallel:
                with replaced(layer, attn_name, ZeroBranch(returns_tuple=True)):
                    mlp_x, mlp_y = pre, hidden_states(model, ids, i + 1)[i + 1][0]
            else:
                mlp_x, mlp_y = mid, post
            for module, (x, y) in {"attn": (pre, mid), "mlp": (mlp_x, mlp_y), "block": (pre, post)}.items():
                sums[(i, module)] = sums.get((i, module), 0.0) + statistic(x, y).sum().item()
    rows = [{"layer": i, "module": m, "importance": importance(s / n_tokens)} for (i, m), s in sums.items()]
    return pd.DataFrame(rows)


@torch.no_grad()
def sequence_nll(model, sequences) -> tuple[float, int]:
    """Summed next-token NLL over sequences, one at a time, and the number of predicted tokens."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([seq])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(seq) - 1
    return total, count


def slow_ablation(model, sequences) -> pd.DataFrame:
    """Mean ΔNLL per predicted token of each module dropped alone, with ``drop_modules`` on a deep copy."""
    base, count = sequence_nll(model, sequences)
    rows = []
    for i in range(model.config.num_hidden_layers):
        for module, argument in (("attn", "attn"), ("mlp", "mlp"), ("block", "blocks")):
            pruned = drop_modules(copy.deepcopy(model), **{argument: [i]})
            rows.append({"layer": i, "module": module, "importance": (sequence_nll(pruned, sequences)[0] - base) / count})
    return pd.DataFrame(rows)


def slow_greedy(model, sequences_by_distribution, module: str, k: int, objective: str, shortlist: int | None = None,
                prior: dict | None = None) -> list:
    """Greedy drop set, every step trying every remaining candidate with ``drop_modules`` on a copy; with ``shortlist``,
    only the ``shortlist`` remaining candidates of smallest ``prior`` cost (ties to the earlier candidate)."""
    names = list(sequences_by_distribution) if objective == "robust" else [objective]
    base = {d: sequence_nll(model, sequences_by_distribution[d]) for d in names}
    n_layers = model.config.num_hidden_layers
    labels = [f"{kind}:{i}" for kind in ("attn", "mlp") for i in range(n_layers)] if module == "joint" else list(range(n_layers))
    chosen = []
    for _ in range(k):
        costs = {}
        remaining = [label for label in labels if label not in chosen]
        tried = set(sorted(remaining, key=lambda c: prior[c])[:shortlist]) if shortlist else set(remaining)
        for label in remaining:
            if label not in tried:
                continue
            trial = [*chosen, label]
            kwargs = {"joint": trial} if module == "joint" else {{"block": "blocks"}.get(module, module): trial}
            pruned = drop_modules(copy.deepcopy(model), **kwargs)
            costs[label] = max((sequence_nll(pruned, sequences_by_distribution[d])[0] - base[d][0]) / base[d][1] for d in names)
        chosen.append(min(costs, key=costs.get))
    return chosen
