"""A pruned checkpoint exported by calibdrop: the family's own transformers model with dropped sublayers skipped.

``calibdrop export`` saves this file beside the weights and points the config's ``auto_map`` at
``modeling_calibdrop.Calibdrop<FamilyClass>`` (``CalibdropLlamaForCausalLM`` ...), so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads it with torch and transformers alone (calibdrop need not be installed).  The config's
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
PREFIX = "Calibdrop"


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
    if config.model_type not in BRANCHES:
        raise ValueError(f"modeling_calibdrop has no branch table for model type {config.model_type!r}")
    layers = model.base_model.layers
    for kind, (names, main) in zip(("attn", "mlp"), BRANCHES[config.model_type]):
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
    cls = type(PREFIX + base.__name__, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": doc})
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


def __getattr__(name: str) -> type:
    """``Calibdrop<FamilyClass>`` (for example ``CalibdropLlamaForCausalLM``), built on first use."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in CAUSAL_LM_CLASSES.values():
        cls = pruned_class(getattr(transformers, name[len(PREFIX):]))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def class_name(model_type: str) -> str:
    """The name of the exported class for ``model_type`` (what ``auto_map`` points at)."""
    return PREFIX + CAUSAL_LM_CLASSES[model_type]


__all__ = ["DroppedBranch", "BRANCHES", "CAUSAL_LM_CLASSES", "class_name", "pruned_class", "skip_dropped_sublayers"]
