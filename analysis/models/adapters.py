"""Where each model family's residual stream is read: the one table of architecture differences.

For decoder block ``i`` with input ``resid_pre``:

* ``resid_mid`` is ``resid_pre`` plus everything the attention branch adds to the residual
  stream (for Gemma 3 that includes its ``post_attention_layernorm``);
* ``resid_post`` is the block's output.

Importance (He et al., 2024) is ``S = 1 - cos(X, Y)`` averaged over real tokens, with
attention ``X = resid_pre, Y = resid_mid``; MLP ``X = resid_mid, Y = resid_post``; block
``X = resid_pre, Y = resid_post``.

Parallel residual (GPT-NeoX with ``use_parallel_residual``): both branches read
``resid_pre`` and ``resid_post = resid_pre + attn_out + mlp_out``.  There the attention's
``Y`` is ``resid_pre + attn_out`` (= ``resid_mid`` below), the MLP's ``X`` is ``resid_pre``
and its ``Y`` is ``resid_pre + mlp_out``: each sublayer is scored as if it were alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import CalibdropError


class UnsupportedArchitectureError(CalibdropError, ValueError):
    """The model family has no adapter."""


@dataclass(frozen=True)
class ReadPoint:
    """A tensor read off a submodule of a decoder block.

    ``where="input"``: the submodule's first input is the wanted tensor.
    ``where="output"``: the submodule's output is the branch output; the residual point
    is ``resid_pre + output``.
    """

    module: str
    where: Literal["input", "output"]


@dataclass(frozen=True)
class Adapter:
    """Residual-stream read points and droppable sublayers of one model family.

    ``attn_branch`` / ``mlp_branch_modules``: every submodule whose output reaches the residual
    stream only through that branch (norms included); dropping the branch replaces them.
    """

    family: str
    attn: str
    mlp: str
    resid_mid: ReadPoint
    attn_branch: tuple[str, ...] = ("input_layernorm", "self_attn")
    mlp_branch_modules: tuple[str, ...] = ("post_attention_layernorm", "mlp")
    mlp_branch: ReadPoint | None = None
    parallel_residual: Callable[[object], bool] = staticmethod(lambda config: False)

    def is_parallel(self, config) -> bool:
        """Whether this model's blocks add both branches to ``resid_pre`` (GPT-NeoX style)."""
        return bool(self.parallel_residual(config))


_LLAMA_LIKE = dict(attn="self_attn", mlp="mlp", resid_mid=ReadPoint("post_attention_layernorm", "input"))

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA_LIKE),
    "mistral": Adapter("mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("qwen3", **_LLAMA_LIKE),
    "gemma3_text": Adapter(
        "gemma3",
        attn="self_attn",
        mlp="mlp",
        resid_mid=ReadPoint("pre_feedforward_layernorm", "input"),
        attn_branch=("input_layernorm", "self_attn", "post_attention_layernorm"),
        mlp_branch_modules=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    ),
    "gpt_neox": Adapter(
        "gpt_neox",
        attn="attention",
        mlp="mlp",
        resid_mid=ReadPoint("post_attention_dropout", "output"),
        mlp_branch=ReadPoint("post_mlp_dropout", "output"),
        attn_branch=("input_layernorm", "attention", "post_attention_dropout"),
        mlp_branch_modules=("post_attention_layernorm", "mlp", "post_mlp_dropout"),
        parallel_residual=lambda config: getattr(config, "use_parallel_residual", False),
    ),
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, or an error naming the supported families."""
    return adapter_of_type(getattr(model.config, "model_type", None))


def adapter_of_type(model_type) -> Adapter:
    """The adapter of a config's ``model_type``, or an error naming the supported families."""
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not supported by calibdrop; supported model types: {supported}. "
            "To add a family, add one Adapter row to analysis/models/adapters.py (see README, 'Adding a model family')."
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (``model.<base_model_prefix>.layers``)."""
    base = model.base_model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder block list at {type(base).__name__}.layers"
        )
    return layers


def first_tensor(value) -> torch.Tensor:
    """A module's output tensor: the first element when the module returns a tuple (a decoder layer does)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden-state input (``resid_pre``), given positionally or as ``hidden_states=``."""
    return args[0] if args else kwargs["hidden_states"]


def hook_read_point(layer: nn.Module, point: ReadPoint, fn: Callable[[torch.Tensor, bool], None]):
    """Call ``fn(tensor, is_output)`` on every forward pass at ``point`` of ``layer``: the submodule's first input
    (``is_output`` False) or its output (True; a tuple's first element).  Returns the hook's handle."""
    module = layer.get_submodule(point.module)
    if point.where == "input":
        return module.register_forward_pre_hook(lambda mod, args: fn(args[0], False))
    return module.register_forward_hook(lambda mod, args, out: fn(first_tensor(out), True))
