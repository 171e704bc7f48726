"""Hand a drop set to code without calibdrop: a checkpoint stock transformers loads, or the paper code's config keys.

* :func:`export_checkpoint` drops the set's modules with :func:`~analysis.models.pruning.drop_modules`
  and saves the result with :func:`~analysis.models.pruning.save_pruned`.  When attention or MLP
  sublayers are dropped it also saves ``modeling_calibdrop.py`` (torch and transformers only), names
  the config's model type ``calibdrop_<family>`` and points its ``auto_map`` at that file's classes, so
  ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds the family's own
  model with those sublayers skipped (their weights are not in the checkpoint) and no KV cache for
  the dropped attention, and the same call without the flag fails with transformers' error asking for
  it.  A checkpoint that only drops blocks has fewer layers and needs no code.
* ``analysis.export_gguf`` writes a drop set applied to a GGUF file, for llama.cpp.
* :func:`paper_drop_lists` writes a drop set as ``drop_attn_list`` / ``drop_mlp_list``, the
  ``config.json`` keys of the code of He et al. (2024), "What Matters in Transformers? Not All
  Attention is Needed": layer indices of the unpruned model; a dropped block is in both lists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import InputError
from .io import atomic_write_json
from .kinds import joint_to_lists
from .models import modeling_calibdrop
from .models.pruning import check_drop_set, drop_modules, pruning_record, save_pruned
from .study.dropsets import as_drop_set

MODELING_FILE = Path(modeling_calibdrop.__file__).name
PAPER_KEYS = ("drop_attn_list", "drop_mlp_list")


def dropped_modules(drop_set: dict, n_layers: int) -> dict[str, list[int]]:
    """``{"attn": [...], "mlp": [...], "blocks": [...]}`` of a drop-set record (``"attn:05"`` is layer 5), sorted.
    Raises :class:`InputError` when an index is not a layer of an ``n_layers``-layer model or a module is listed
    twice."""
    chosen = as_drop_set(drop_set)
    lists = {"attn": [], "mlp": [], "blocks": []}
    if chosen.module == "joint":
        lists["attn"], lists["mlp"] = joint_to_lists(chosen.indices)
    else:
        lists["blocks" if chosen.module == "block" else chosen.module] = [int(i) for i in chosen.indices]
    where = drop_set.get("file", "the drop set")
    bad = sorted({i for values in lists.values() for i in values if not 0 <= i < n_layers})
    if bad:
        raise InputError(f"{where}: indices {bad} are out of range: the model has {n_layers} layers "
                         f"(0..{n_layers - 1}); give the --model the drop set was made for")
    for kind, values in lists.items():
        twice = sorted({i for i in values if values.count(i) > 1})
        if twice:
            raise InputError(f"{where}: {kind} index {twice} is listed twice (each module can be dropped once); "
                             "remove the repeated entry")
    return {kind: sorted(values) for kind, values in lists.items()}


def paper_drop_lists(drop_set: dict, n_layers: int) -> dict[str, list[int]]:
    """``{"drop_attn_list": [...], "drop_mlp_list": [...]}`` of a drop-set record, indices sorted.

    ``attn``/``mlp`` sets fill one list, a ``block`` set both, a ``joint`` set each entry's own
    list.  Errors (:class:`InputError`) as :func:`dropped_modules` raises them.
    """
    dropped = dropped_modules(drop_set, n_layers)
    return {"drop_attn_list": sorted(dropped["attn"] + dropped["blocks"]),
            "drop_mlp_list": sorted(dropped["mlp"] + dropped["blocks"])}


def _layers_in_config(config: dict, where) -> int:
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    if not isinstance(config.get("num_hidden_layers"), int):
        raise InputError(f"{where} has no integer 'num_hidden_layers': it is not a causal LM's config")
    return config["num_hidden_layers"]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a JSON config: {error}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a model config: it is not a JSON object")
    if "calibdrop_pruning" in config:
        raise InputError(f"{path} is a pruned checkpoint's config: drop-set indices refer to the unpruned model; "
                         "give that model as --model")
    return config


def _gguf_layers(path: Path) -> int:
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        return int(fields[f"{arch}.block_count"].parts[-1][0])
    except (ValueError, IndexError, KeyError) as error:
        raise InputError(f"{path}: no block count in this GGUF file ({error}); is it a complete causal LM?") from None


def model_layer_count(spec: str) -> int:
    """The number of decoder layers of a model spec, read from its config only (no weights are loaded): a built-in
    name, a checkpoint folder, its ``config.json``, a ``.gguf`` file or a Hugging Face id (local cache first)."""
    from .models.loading import BUILTINS

    if spec in BUILTINS:
        return BUILTINS[spec].n_layers
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_layers(path)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise InputError(f"{path.parent} has no config.json: give a checkpoint folder, its config.json "
                             "or a built-in name")
    if path.is_file():
        return _layers_in_config(_read_config(path), path)
    if path.exists() or spec.count("/") != 1:
        raise InputError(f"unknown model spec {spec!r}: give a built-in name ({', '.join(BUILTINS)}), a checkpoint "
                         "folder, its config.json, a .gguf file or a Hugging Face id")
    return _hub_layer_count(spec)


def _hub_layer_count(spec: str) -> int:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(spec, "config.json")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise InputError(f"could not read the config of {spec!r} from the local Hugging Face cache or the Hub: "
                         f"{str(error).splitlines()[0]}") from None
    return _layers_in_config(_read_config(Path(path)), spec)


def save_exported(model, directory: Path, tokenizer=None) -> Path:
    """Save a model pruned by :func:`drop_modules` so that stock transformers loads it.  With sublayers dropped,
    ``modeling_calibdrop.py`` is saved beside the weights and config.json names the model type
    ``calibdrop_<family>`` (unknown to transformers, so loading without ``trust_remote_code=True`` fails with
    transformers' error asking for it) with an ``auto_map`` to that file's classes; a block-only model stays a plain
    checkpoint of its family.  With every attention dropped, no layer has keys to cache, and transformers' caches
    refuse to report a length (``generate`` fails): the config and generation config say ``use_cache: false``."""
    model_type = modeling_calibdrop.family_type(model.config.model_type)
    record = pruning_record(model)
    custom = bool(record["attn"] or record["mlp"])
    if custom:
        if model_type not in modeling_calibdrop.CAUSAL_LM_CLASSES:
            raise InputError(f"model type {model_type!r} has no class in {MODELING_FILE}; export a block drop set, "
                             "or add the family there")
        model.config.auto_map = modeling_calibdrop.auto_map(model_type)
        if len(record["attn"]) == model.config.num_hidden_layers:  # no layer keeps keys: transformers' caches fail
            model.config.use_cache = model.generation_config.use_cache = False
    elif hasattr(model.config, "auto_map"):
        del model.config.auto_map
    directory = save_pruned(model, directory, tokenizer)
    if custom:
        shutil.copyfile(modeling_calibdrop.__file__, Path(directory) / MODELING_FILE)
        config_file = Path(directory) / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        atomic_write_json(config_file, {**config, "model_type": modeling_calibdrop.exported_type(model_type)})
    return directory


def export_checkpoint(model, tokenizer, drop_set: dict, directory: Path, *, force: bool = False) -> Path:
    """Drop ``drop_set``'s modules from ``model`` (in place) and save it where stock transformers loads it with
    ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``; returns the folder.

    Errors (:class:`InputError`) as :func:`check_drop_set` and :func:`drop_modules` raise them.
    """
    check_drop_set(drop_set, model, force=force)
    drop_modules(model, **as_drop_set(drop_set).drop_kwargs(), drop_set=drop_set)
    return save_exported(model, directory, tokenizer)
