"""A first-order estimate of the ground truth: every module's ΔNLL from one forward and one backward pass.

Dropping module ``m`` (:func:`analysis.models.pruning.drop_modules` semantics) removes its branch
output ``b_m`` from the residual stream at the point ``h`` right after ``m``'s residual add, so to
first order (attribution patching)::

    ΔNLL_m[s] ≈ taylor_m[s] = sum_t ∇_{h_t} NLL[s] · (−b_{m,t})

with ``NLL[s]`` the summed next-token NLL of sample ``s`` (:func:`analysis.importance.ablation.row_nll`),
per token a dot product in float32 (float64 for a float64 model), float64 sums, and, per family (read points in
:mod:`analysis.models.adapters`):

* sequential blocks: ``attn``: ``b = resid_mid − resid_pre``, ``h = resid_mid``; ``mlp``:
  ``b = resid_post − resid_mid``, ``h = resid_post``; ``block``: ``b = resid_post − resid_pre``, ``h = resid_post``;
* parallel residual (GPT-NeoX ``use_parallel_residual``): both branches are added at ``resid_post``,
  so ``h = resid_post`` for all three, ``b`` = the attention output, the MLP output, and their sum.

``∇_h NLL`` is the total derivative (through every later use of ``h``) of the batch's summed NLL
from one backward pass; rows do not interact, so row ``s``'s share is ``∇_h NLL[s]``.  The
importance is the token-weighted mean ``sum_s taylor_m[s] / sum_s n_predicted[s]`` (the ``taylor``
metric of :mod:`analysis.importance.metrics`), in nats per token like ``ablation``.  It is exact for
a module whose branch is zero and is the directional derivative of ``ΔNLL`` along ``−b_m``; the
curvature it ignores is measured against the exact ablation in
``benchmarks/importance/taylor_vs_reference.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..models.adapters import adapter_for, decoder_layers, first_tensor, hook_read_point, layer_input
from .ablation import position_ids_from_mask, token_nll


@contextmanager
def _branch_points(model: torch.nn.Module) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per block, filled during a forward pass: ``pre`` (its input), ``mid`` (the tensor read at the adapter's
    ``resid_mid`` point: ``resid_mid`` itself, or the attention output when read off an output), ``mlp`` (the
    MLP output, parallel residual only) and ``post`` (its output)."""
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    points: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    handles = []

    def keep(i, name):
        return lambda tensor, is_output: points[i].__setitem__(name, tensor)

    reads = [("mid", adapter.resid_mid)]
    if adapter.is_parallel(model.config):
        reads.append(("mlp", adapter.mlp_branch))
    for i, layer in enumerate(layers):
        pre, post = keep(i, "pre"), keep(i, "post")
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, pre=pre: pre(layer_input(args, kwargs), False), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda module, args, out, post=post: post(first_tensor(out), True)))
        handles += [hook_read_point(layer, point, keep(i, name)) for name, point in reads]
    try:
        yield points
    finally:
        for handle in handles:
            handle.remove()


def _branches(points: dict[str, torch.Tensor], mid_is_input: bool, parallel: bool):
    """``(b, h)`` of attn, mlp and block (in the order of :data:`analysis.presets.SCORED_MODULES`) from one block's
    points."""
    pre, mid, post = points["pre"], points["mid"], points["post"]
    if parallel:
        attn = mid - pre if mid_is_input else mid
        return [(attn, post), (points["mlp"], post), (post - pre, post)]
    resid_mid = mid if mid_is_input else pre + mid
    return [(resid_mid - pre, mid), (post - resid_mid, post), (post - pre, post)]


def taylor_increase(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """First-order ``ΔNLL`` sums of dropping each module alone, ``(rows, layers, 3)`` in the order of
    :data:`analysis.presets.SCORED_MODULES`, and the predicted tokens per row (as
    :func:`analysis.importance.ablation.single_drop_increase`).

    Runs with gradients on whatever mode the caller is in; no parameter gradient is computed or kept.
    """
    adapter = adapter_for(model)
    mid_is_input = adapter.resid_mid.where == "input"
    parallel = adapter.is_parallel(model.config)
    with torch.inference_mode(False), torch.enable_grad(), _branch_points(model) as points:
        input_ids, attention_mask = input_ids.clone(), attention_mask.clone()
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
        losses, valid = token_nll(logits, input_ids, attention_mask)
        pairs = [_branches(block, mid_is_input, parallel) for block in points]
        heads = list({id(h): h for block in pairs for _, h in block}.values())
        grads = dict(zip(map(id, heads), torch.autograd.grad(losses.sum(), heads)))
        real = attention_mask.bool()
        dtype = torch.promote_types(embeds.dtype, torch.float32)
        increase = torch.stack([torch.stack([
            torch.where(real, -torch.linalg.vecdot(grads[id(h)].to(dtype), b.detach().to(dtype)), 0.0).sum(
                -1, dtype=torch.float64) for b, h in block]) for block in pairs])
    return increase.permute(2, 0, 1).cpu().numpy(), valid.sum(-1).cpu().numpy()
