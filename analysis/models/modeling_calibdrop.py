"""A pruned checkpoint exported by calibdrop: the family's own transformers model with dropped sublayers skipped.

``calibdrop export`` saves this file beside the weights, writes the config's ``model_type`` as
``calibdrop_<family type>`` (``calibdrop_llama`` ...), which transformers does not know, and points its ``auto_map``
at ``modeling_calibdrop.Calibdrop<FamilyConfig>`` and ``modeling_calibdrop.Calibdrop<FamilyClass>``
(``CalibdropLlamaConfig``, ``CalibdropLlamaForCausalLM`` ...), so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads it with torch and transformers alone (calibdrop need not be installed), and the same call without
``trust_remote_code=True`` fails with transformers' error asking for it, instead of building the family's plain
model with the dropped weights freshly initialised.  The config's
``calibdrop_pruning`` lists the dropped sublayers by their index in the saved layer list
(``{"attn": [...], "mlp": [...]}``).  For each one, every submodule that feeds only that branch
(its norms, as in calibdrop's ``analysis/models/adapters.py``) is replaced before the weights load:
the branch's main module by a :class:`DroppedBranch` that adds a zero to the residual stream, the
others by ``nn.Identity``.  So block ``i`` computes ``h + 0`` where the branch was, the checkpoint
holds no weights for it, and the dropped attention keeps no KV cache: its ``kv_sharing_modes``
entry is ``"reuse"``, which transformers' caches turn into a ``DummyLayer`` that stores nothing.

This file imports only torch and transformers; it is the same file for every supported family.
"""

import transformers
from torch import nn

# model_type -> (attention branch modules, its main module), (MLP branch modules, its main module)
BRANCHES = {
    "llama": ((("input_layernorm", "self_attn"), "self_attn"), (("post_attention_layernorm", "mlp"), "mlp")),
    "mistral": ((("input_layernorm", "self_attn"), "self_attn"), (("post_attention_layernorm", "mlp"), "mlp")),
    "qwen2": ((("input_layernorm", "self_attn"), "self_attn"), (("post_attention_layernorm", "mlp"), "mlp")),
    "qwen3": ((("input_layernorm", "self_attn"), "self_attn"), (("post_attention_layernorm", "mlp"), "mlp")),
    "gemma3_text": (
        (("input_layernorm", "self_attn", "post_attention_layernorm"), "self_attn"),
        (("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"), "mlp"),
    ),
    "gpt_neox": (
        (("input_layernorm", "attention", "post_attention_dropout"), "attention"),
        (("post_attention_layernorm", "mlp", "post_mlp_dropout"), "mlp"),
    ),
}
# model_type -> the transformers causal-LM class the exported class extends
CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
# model_type -> the transformers config class the exported config class extends
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma3_text": "Gemma3TextConfig",
    "gpt_neox": "GPTNeoXConfig",
}
PREFIX = "Calibdrop"
TYPE_PREFIX = "calibdrop_"


def exported_type(model_type: str) -> str:
    """The ``model_type`` an exported checkpoint's config.json carries for a family's ``model_type``."""
    return TYPE_PREFIX + model_type


def family_type(model_type: str) -> str:
    """The family's ``model_type`` of an exported one (``calibdrop_llama`` -> ``llama``); others unchanged."""
    return model_type.removeprefix(TYPE_PREFIX)


class DroppedBranch(nn.Module):
    """Stands where a dropped attention or MLP was: adds a zero scalar to the residual stream."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        zero = hidden.new_zeros(())
        return (zero, None) if self.returns_tuple else zero


def dropped_sublayers(config) -> dict:
    """``{"attn": [...], "mlp": [...]}``: the dropped sublayers recorded in ``config.calibdrop_pruning``."""
    record = getattr(config, "calibdrop_pruning", None) or {}
    return {kind: sorted(int(i) for i in record.get(kind, ())) for kind in ("attn", "mlp")}


def no_cache_for_dropped_attention(config) -> None:
    """Mark each dropped attention layer ``"reuse"`` in ``config.kv_sharing_modes`` (its cache layer stores nothing)."""
    dropped = dropped_sublayers(config)["attn"]
    if not dropped:
        return
    modes = list(getattr(config, "kv_sharing_modes", None) or [None] * config.num_hidden_layers)
    for i in dropped:
        modes[i] = "reuse"
    config.kv_sharing_modes = modes


def skip_dropped_sublayers(model: nn.Module) -> nn.Module:
    """Replace the modules of every dropped branch of ``model`` (see the module docstring); returns ``model``."""
    config = model.config
    model_type = family_type(config.model_type)
    if model_type not in BRANCHES:
        raise ValueError(f"modeling_calibdrop has no branch table for model type {config.model_type!r}")
    layers = model.base_model.layers
    for kind, (names, main) in zip(("attn", "mlp"), BRANCHES[model_type]):
        for i in dropped_sublayers(config)[kind]:
            if not 0 <= i < len(layers):
                raise ValueError(f"calibdrop_pruning drops {kind} of layer {i}; the model has layers "
                                 f"0..{len(layers) - 1}")
            for name in names:
                setattr(layers[i], name, DroppedBranch(kind == "attn") if name == main else nn.Identity())
    return model


def pruned_class(base: type) -> type:
    """``base`` (a transformers causal LM) whose constructor skips the sublayers its config drops."""

    def __init__(self, config, *args, **kwargs):
        no_cache_for_dropped_attention(config)
        base.__init__(self, config, *args, **kwargs)
        skip_dropped_sublayers(self)

    doc = f"{base.__name__} skipping the sublayers dropped by calibdrop."
    config_class = exported_class(PREFIX + base.config_class.__name__)
    cls = type(PREFIX + base.__name__, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": doc,
                                                 "config_class": config_class})
    share_weight_renames(cls, base)
    return cls


def share_weight_renames(cls: type, base: type) -> None:
    """Give ``cls`` the checkpoint key renames transformers applies to ``base`` (GPT-NeoX's ``embed_out`` is its
    ``lm_head``), which transformers 5 withholds from classes defined outside it unless registered (a transformers
    without ``conversion_mapping`` renames nothing).  Tested with transformers 5.23."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping as renames_of
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    except ImportError:
        return
    renames = renames_of(base.__name__) or renames_of(base.config_class.model_type)
    if renames:
        register_checkpoint_conversion_mapping(cls.__name__, renames, overwrite=True)


def pruned_config_class(base: type) -> type:
    """``base`` (a transformers config class) under the ``model_type`` ``calibdrop_<its type>``."""
    doc = f"{base.__name__} of a checkpoint exported by calibdrop (model type {exported_type(base.model_type)!r})."
    return type(PREFIX + base.__name__, (base,), {"model_type": exported_type(base.model_type),
                                                  "__module__": __name__, "__doc__": doc})


def exported_class(name: str) -> type:
    """``Calibdrop<FamilyClass>`` or ``Calibdrop<FamilyConfig>`` (for example ``CalibdropLlamaForCausalLM``,
    ``CalibdropLlamaConfig``), built on first use, then this module's attribute."""
    if name in globals():
        return globals()[name]
    base = name[len(PREFIX):]
    if name.startswith(PREFIX) and base in CAUSAL_LM_CLASSES.values():
        cls = pruned_class(getattr(transformers, base))
    elif name.startswith(PREFIX) and base in CONFIG_CLASSES.values():
        cls = pruned_config_class(getattr(transformers, base))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls


__getattr__ = exported_class


def class_name(model_type: str) -> str:
    """The name of the exported class for ``model_type`` (what ``auto_map`` points at)."""
    return PREFIX + CAUSAL_LM_CLASSES[model_type]


def auto_map(model_type: str) -> dict:
    """The ``auto_map`` of an exported config of family ``model_type``: config and model classes in this file."""
    module = __name__.rpartition(".")[2]
    return {"AutoConfig": f"{module}.{PREFIX}{CONFIG_CLASSES[model_type]}",
            "AutoModelForCausalLM": f"{module}.{class_name(model_type)}"}


__all__ = ["BRANCHES", "CAUSAL_LM_CLASSES", "CONFIG_CLASSES", "DroppedBranch", "auto_map", "class_name",
           "exported_type", "family_type", "pruned_class", "pruned_config_class", "skip_dropped_sublayers"]
