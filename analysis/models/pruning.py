"""Drop attention sublayers, MLP sublayers and whole blocks for real, save and reload the result.

* A dropped attention or MLP sublayer is removed with everything that only feeds its branch
  (its norms, per the adapter): the branch adds nothing to the residual stream and costs no
  matrix work.  A dropped attention layer keeps no KV cache: its entry in the config's
  ``kv_sharing_modes`` is ``"reuse"``, which transformers' caches turn into a ``DummyLayer``
  that stores nothing and that sequence-length and mask look-ups skip.
* A dropped block is deleted from the layer list; the kept blocks, their attention
  ``layer_idx`` (the cache index) and the per-layer config lists (``layer_types`` ...) are
  re-indexed, so a block-dropped checkpoint loads with plain ``from_pretrained``.

Indices are those of the model as passed in.  What was dropped is recorded in
``config.calibdrop_pruning``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..io import read_json_file, temp_dir
from ..kinds import joint_to_lists
from .adapters import adapter_for, decoder_layers, layer_input
from .modeling_calibdrop import DroppedBranch  # the one class: exported checkpoints ship that file

PER_LAYER_CONFIG_LISTS = ("layer_types", "kv_sharing_modes")


def _indices(name: str, values: Iterable, n_layers: int) -> list[int]:
    values = [int(v) for v in values]
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise InputError(f"{name} index {duplicates} is listed twice: each module can be dropped once")
    bad = [v for v in values if not 0 <= v < n_layers]
    if bad:
        raise InputError(f"{name} indices {bad} are out of range: the model has layers 0..{n_layers - 1}")
    return sorted(values)


def pruning_record(model) -> dict:
    """What has been dropped from ``model`` so far (current indices for sublayers)."""
    return dict(getattr(model.config, "calibdrop_pruning",
                        None) or {"attn": [], "mlp": [], "blocks_removed": [], "drop_sets": []})


def _drop_branch(layer: nn.Module, names: tuple[str, ...], main: str, returns_tuple: bool) -> None:
    for name in names:
        setattr(layer, name, DroppedBranch(returns_tuple) if name == main else nn.Identity())


class SkippedBlock(nn.Module):
    """Stands where a temporarily dropped block was: returns its input unchanged."""

    def forward(self, *args, **kwargs):
        return layer_input(args, kwargs)


def _branch(adapter, kind: str) -> tuple[tuple[str, ...], str, bool]:
    """The submodule names of a branch, its main module and whether that module returns a tuple."""
    if kind == "attn":
        return adapter.attn_branch, adapter.attn, True
    return adapter.mlp_branch_modules, adapter.mlp, False


@contextmanager
def modules_dropped(model: nn.Module, candidates: Iterable[tuple[str, int]]) -> Iterator[nn.Module]:
    """``model`` with the given ``(kind, layer)`` modules dropped (``kind`` in attn, mlp, block), restored on exit.

    The forward pass equals :func:`drop_modules`'s without a KV cache (a dropped block is an
    identity instead of being deleted), without copying the model: the ground truth and the
    held-out evaluation try many drop sets on one set of weights this way.
    """
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for kind, i in candidates:
            if kind == "block":
                saved.append((layers, str(i), layers[i]))
                layers[i] = SkippedBlock()
                continue
            names, main, returns_tuple = _branch(adapter, kind)
            saved.extend((layers[i], name, getattr(layers[i], name)) for name in names)
            _drop_branch(layers[i], names, main, returns_tuple)
        yield model
    finally:
        for parent, name, module in reversed(saved):
            if isinstance(parent, nn.ModuleList):
                parent[int(name)] = module
            else:
                setattr(parent, name, module)


def _reindex_config_lists(config, keep: list[int]) -> None:
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) > max(keep, default=-1):
            setattr(config, name, [values[i] for i in keep])


def drop_modules(model: nn.Module, *, attn=(), mlp=(), blocks=(), joint=(), drop_set: dict | None = None) -> nn.Module:
    """Remove the given attention sublayers, MLP sublayers and blocks from ``model`` in place.

    ``joint`` takes a joint drop set (``"attn:i"`` / ``"mlp:i"``).  Errors: an index out of
    range, a module listed twice or already dropped, or nothing left to run.
    """
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    n_layers = len(layers)
    extra_attn, extra_mlp = joint_to_lists(joint)
    attn = _indices("attention", [*attn, *extra_attn], n_layers)
    mlp = _indices("MLP", [*mlp, *extra_mlp], n_layers)
    blocks = _indices("block", blocks, n_layers)
    record = pruning_record(model)
    for name, chosen, done in (("attention", attn, record["attn"]), ("MLP", mlp, record["mlp"])):
        again = sorted(set(chosen) & set(done))
        if again:
            raise InputError(f"{name} of layers {again} is already dropped")
        overlap = sorted(set(chosen) & set(blocks))
        if overlap:
            raise InputError(f"{name} of layers {overlap} is dropped twice: its whole block is dropped too")
    if len(blocks) == n_layers:
        raise InputError("dropping every block leaves nothing to run; drop fewer")
    keep = [i for i in range(n_layers) if i not in blocks]
    all_attn, all_mlp = set(attn) | set(record["attn"]), set(mlp) | set(record["mlp"])
    if all(i in all_attn and i in all_mlp for i in keep):
        raise InputError("this drops every remaining attention and MLP sublayer; drop fewer")

    for kind, chosen in (("attn", attn), ("mlp", mlp)):
        for i in chosen:
            _drop_branch(layers[i], *_branch(adapter, kind))
    config = model.config
    n_config_layers = config.num_hidden_layers
    modes = list(getattr(config, "kv_sharing_modes", None) or [None] * n_config_layers)
    for i in attn:
        modes[i] = "reuse"
    config.kv_sharing_modes = modes

    if blocks:
        model.base_model.layers = nn.ModuleList([layers[i] for i in keep])
        for new, layer in enumerate(model.base_model.layers):
            attention = getattr(layer, adapter.attn)
            if hasattr(attention, "layer_idx"):
                attention.layer_idx = new
        _reindex_config_lists(config, keep)
        config.num_hidden_layers = len(keep)
    position = {old: new for new, old in enumerate(keep)}
    record = {
        "attn": sorted(position[i] for i in all_attn if i in position),
        "mlp": sorted(position[i] for i in all_mlp if i in position),
        "blocks_removed": record["blocks_removed"] + [blocks],
        "drop_sets": record["drop_sets"] + ([drop_set] if drop_set else []),
    }
    if not any(m == "reuse" for m in config.kv_sharing_modes):
        del config.kv_sharing_modes
    config.calibdrop_pruning = record
    return model


def check_drop_set(drop_set: dict, model, *, force: bool = False) -> None:
    """Raise :class:`InputError` when a drop set's indices are out of the model's range, or (unless ``force``)
    it records a model checksum other than the loaded model's."""
    where = drop_set.get("file", "the drop set")
    n_layers = len(decoder_layers(model))
    numbers = [int(str(v).partition(":")[2]) if isinstance(v, str) else v for v in drop_set["indices"]]
    bad = [v for v in numbers if v >= n_layers]
    if bad:
        raise InputError(f"{where}: indices {bad} are out of range: the model has layers 0..{n_layers - 1}")
    recorded = drop_set.get("model_sha256")
    loaded = getattr(getattr(model, "calibdrop_info", None), "weights_sha256", None)
    if recorded and recorded != loaded and not force:
        raise InputError(
            f"{where} was made for model {drop_set.get('model')!r} with checksum {recorded[:12]}..., not the loaded "
            f"model ({loaded and loaded[:12]}...): pass --model that model, or --force to apply it anyway"
        )


def is_pruned_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder saved by :func:`save_pruned` (its config records the drops)."""
    config = Path(path) / "config.json"
    try:
        record = read_json_file(config, "config", "") if config.is_file() else None
    except InputError:
        return False
    return isinstance(record, dict) and "calibdrop_pruning" in record


def save_pruned(model: nn.Module, directory: Path, tokenizer=None) -> Path:
    """Save a pruned model atomically: safetensors without the dropped weights and the config recording what
    was dropped go to a temporary folder beside ``directory``, which then replaces it (``directory`` must be
    new, empty, or a pruned checkpoint saved before)."""
    directory = Path(directory)
    if directory.exists() and not (
        directory.is_dir() and (is_pruned_checkpoint(directory) or not any(directory.iterdir()))):
        raise InputError(
            f"{directory} exists and is not a pruned checkpoint: choose a new or empty folder, so nothing of yours is "
            f"replaced")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(directory.parent, f".{directory.name}.")
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def restore_dropped_sublayers(model: nn.Module) -> nn.Module:
    """Re-apply the sublayer drops recorded in a loaded pruned checkpoint's config."""
    record = pruning_record(model)
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    for kind in ("attn", "mlp"):
        for i in record[kind]:
            _drop_branch(layers[i], *_branch(adapter, kind))
    return model


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cached_layers(cache) -> int:
    """How many cache layers hold keys."""
    return sum(isinstance(getattr(layer, "keys", None),
                          torch.Tensor) and layer.keys.numel() > 0 for layer in cache.layers)
