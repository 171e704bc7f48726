"""A drop set applied to a GGUF file, for llama.cpp: ``calibdrop export --format gguf``.

The tensors are read from the source GGUF (a built-in model's file or a ``.gguf`` path) and written again without
those of the dropped modules; calibdrop's own pruned model is the same source dequantised, so the exported file and
``calibdrop evaluate`` describe one model.

* **Blocks** are removed and the kept ones renumbered (``blk.{i}`` → ``blk.{new i}``, ``block_count`` lowered); the
  file keeps its architecture.
* **Attention or MLP sublayers** need per-layer shapes, which llama.cpp reads for its ``deci`` architecture
  (NVIDIA's Nemotron-NAS, ``src/models/deci.cpp``): ``deci.attention.head_count``, ``head_count_kv`` and
  ``feed_forward_length`` are arrays with one entry per layer.  A layer whose ``head_count`` is 0 is attention-free
  (its input goes straight to the MLP: no norm, no projections, no KV cache).  ``feed_forward_length`` 0 cannot
  stand for a dropped MLP: the llama.cpp of xllamacpp 2026.10.11549 refuses to load such a file (with the FFN tensors
  left out or zero-sized), and ``deci.cpp`` leaves such a layer with ``continue`` before the residual sum, which would
  lose the attention output too.  A dropped MLP is therefore written as
  ``feed_forward_length`` 1 with a zero ``ffn_down`` (``ffn_gate`` and ``ffn_up`` one zero row each, and the
  layer's own ``ffn_norm``): the branch adds exactly 0, at a cost of ``3 * n_embd`` multiply-adds per token.
  ``deci`` is llama's graph (RMSNorm, SiLU-gated MLP, rotary pairs of adjacent values, optional q/k/v biases), so it
  takes ``llama`` GGUF files as they are, and ``qwen2`` files once the rows of ``attn_q``/``attn_k`` (and their
  biases) are reordered from rotary halves to adjacent pairs (llama.cpp's ``LLAMA_ROPE_TYPE_NEOX`` → ``NORM``), a
  permutation of whole rows, so quantised rows move unchanged.  Other architectures (gemma3: post-norms, GELU,
  scaled embeddings; qwen3: q/k norms) have no llama.cpp architecture with per-layer shapes; block drop sets export
  for llama, qwen2, qwen3 and mistral files (not gemma3: llama.cpp picks its sliding-window layers by layer index).

Kept tensors keep the source's type (``--dtype`` unset) or are dequantised and written as ``float32`` or ``float16``
(1-D tensors, the norms and biases, stay float32 as llama.cpp's converter writes them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .errors import InputError
from .export import dropped_modules
from .io import temp_dir

SUBLAYER_TENSORS = {"attn": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"),
                    "mlp": ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
# source architecture -> whether its attn_q/attn_k rows use rotary halves (NEOX) and must be reordered for deci
DECI_SOURCES = {"llama": False, "qwen2": True}
# architectures whose blocks can be removed and renumbered: no per-layer pattern keyed by the layer index
BLOCK_SOURCES = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = {"float32": "F32", "float16": "F16"}
LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def _field(fields: dict, key: str):
    field = fields.get(key)
    return None if field is None else field.contents()


def rotary_pairs_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking a projection whose heads rotate halves (row ``s * head_dim/2 + j`` of a head pairs with
    ``j``) to one rotating adjacent pairs (rows ``2j`` and ``2j + 1``): new row ``h*d + 2j + s`` is old row
    ``h*d + s*d/2 + j``."""
    half = head_dim // 2
    j, s = np.divmod(np.arange(head_dim), 2)
    within = s * half + j
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


class GGUFSource:
    """A GGUF file's metadata and tensors, by name."""

    def __init__(self, path: Path):
        import gguf

        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as error:
            raise InputError(f"{path} is not a readable GGUF file: {error}") from None
        self.path = path
        self.fields = self.reader.fields
        self.arch = _field(self.fields, "general.architecture")
        self.n_layers = _field(self.fields, f"{self.arch}.block_count")
        if not isinstance(self.n_layers, int):
            raise InputError(f"{path}: no {self.arch}.block_count in this GGUF file: is it a causal LM?")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str):
        """The metadata value under ``{arch}.key``."""
        return _field(self.fields, f"{self.arch}.{key}")

    def head_dim(self) -> int:
        """``attention.key_length``, else ``embedding_length / attention.head_count`` (llama.cpp's default)."""
        width = self.value("embedding_length") // self.value("attention.head_count")
        return self.value("attention.key_length") or width


def _tensor_data(tensor, dtype: str | None):
    """``(array, raw_dtype)`` for the writer: the source bytes and type, or float32/float16 values."""
    import gguf

    if dtype is None:
        return tensor.data, tensor.tensor_type
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    if DTYPES[dtype] == "F16" and values.ndim > 1:
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    return values, gguf.GGMLQuantizationType.F32


class GGUFPlan:
    """Which tensors of ``source`` go to the exported file, under which names, and the exported metadata."""

    def __init__(self, source: GGUFSource, dropped: dict[str, list[int]]):
        self.source, self.dropped = source, dropped
        self.keep = [i for i in range(source.n_layers) if i not in dropped["blocks"]]
        if not self.keep:
            raise InputError("dropping every block leaves nothing to run; drop fewer")
        self.new_index = {old: new for new, old in enumerate(self.keep)}
        attn = [i for i in dropped["attn"] if i in self.new_index]
        mlp = [i for i in dropped["mlp"] if i in self.new_index]
        self.sublayers = bool(attn or mlp)
        if all(i in attn and i in mlp for i in self.keep):
            raise InputError("this drops every remaining attention and MLP sublayer; drop fewer")
        if self.sublayers and len(attn) == len(self.keep):
            raise InputError("this drops the attention of every remaining layer: llama.cpp's deci architecture needs "
                             "one layer with attention (its KV cache); keep at least one")
        supported = DECI_SOURCES if self.sublayers else BLOCK_SOURCES
        if source.arch not in supported:
            what = "attention or MLP sublayers" if self.sublayers else "blocks"
            raise InputError(f"{source.path.name}: dropping {what} of a {source.arch!r} GGUF is not supported: "
                             f"llama.cpp reads it for {', '.join(supported)} files; export a block drop set or use "
                             f"--format checkpoint")
        self.arch = "deci" if self.sublayers else source.arch

    def metadata(self) -> dict[str, tuple]:
        """``key -> (value, type, sub_type)`` of the exported file (architecture keys renamed to the target's)."""
        import gguf

        out = {}
        prefix = f"{self.source.arch}."
        for key, field in self.source.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            types = field.types
            sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
            name = f"{self.arch}.{key[len(prefix):]}" if key.startswith(prefix) else key
            out[name] = (field.contents(), types[0], sub)
        u32, array = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.ARRAY
        out[f"{self.arch}.block_count"] = (len(self.keep), u32, None)
        if self.sublayers:
            heads, heads_kv = self.source.value("attention.head_count"), self.source.value("attention.head_count_kv")
            head_dim = self.source.head_dim()
            attn_free = [i in self.dropped["attn"] for i in self.keep]
            mlp_free = [i in self.dropped["mlp"] for i in self.keep]
            n_ff = self.source.value("feed_forward_length")
            out[f"{self.arch}.attention.head_count"] = ([0 if a else heads for a in attn_free], array, u32)
            out[f"{self.arch}.attention.head_count_kv"] = ([0 if a else heads_kv for a in attn_free], array, u32)
            out[f"{self.arch}.feed_forward_length"] = ([1 if m else n_ff for m in mlp_free], array, u32)
            out[f"{self.arch}.attention.key_length"] = (head_dim, u32, None)
            out[f"{self.arch}.attention.value_length"] = (head_dim, u32, None)
            rope = self.source.value("rope.dimension_count") or head_dim
            out[f"{self.arch}.rope.dimension_count"] = (rope, u32, None)
        return out

    def _row_order(self, base: str):
        """The row order of a kept tensor ``base`` in the exported file (``None``: unchanged)."""
        if not (self.sublayers and DECI_SOURCES[self.source.arch] and base in ("attn_q", "attn_k")):
            return None
        heads = self.source.value("attention.head_count" if base == "attn_q" else "attention.head_count_kv")
        return rotary_pairs_order(heads, self.source.head_dim())

    def tensors(self, dtype: str | None):
        """``(name, array, raw_dtype)`` of every exported tensor, in the source's order; a dropped MLP's zero
        stand-ins follow its kept layer's ``ffn_norm``."""
        import gguf

        for name, tensor in self.source.tensors.items():
            match = LAYER_TENSOR.match(name)
            if not match:
                yield (name, *_tensor_data(tensor, dtype))
                continue
            old, base, kind = int(match[1]), match[2], match[3]
            if old not in self.new_index:
                continue
            new_name = f"blk.{self.new_index[old]}.{base}.{kind}"
            if old in self.dropped["attn"] and base in SUBLAYER_TENSORS["attn"]:
                continue
            if old in self.dropped["mlp"] and base in SUBLAYER_TENSORS["mlp"]:
                if base != "ffn_norm":
                    continue
                yield (new_name, *_tensor_data(tensor, dtype))
                n_embd = self.source.value("embedding_length")
                for stand_in in ("ffn_gate", "ffn_up", "ffn_down"):
                    zeros = np.zeros((n_embd, 1) if stand_in == "ffn_down" else (1, n_embd), np.float32)
                    yield f"blk.{self.new_index[old]}.{stand_in}.weight", zeros, gguf.GGMLQuantizationType.F32
                continue
            array, raw_dtype = _tensor_data(tensor, dtype)
            order = self._row_order(base)
            yield new_name, (array if order is None else np.ascontiguousarray(array[order])), raw_dtype


def write_gguf(plan: GGUFPlan, out: Path, dtype: str | None) -> Path:
    """Write the planned file atomically (a temporary file beside ``out`` renamed over it); returns ``out``."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(temp_dir(out.parent, f".{out.name}.")) / out.name
    try:
        writer = gguf.GGUFWriter(staging, plan.arch)
        metadata = plan.metadata()
        if dtype is not None:
            file_type = gguf.LlamaFileType.ALL_F32 if DTYPES[dtype] == "F32" else gguf.LlamaFileType.MOSTLY_F16
            metadata["general.file_type"] = (int(file_type), gguf.GGUFValueType.UINT32, None)
        for key, (value, vtype, sub) in metadata.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, array, raw_dtype in plan.tensors(dtype):
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    finally:
        if staging.exists():
            staging.unlink()
        staging.parent.rmdir()
    return out


def gguf_source(spec: str, drop_set: dict, *, force: bool = False) -> Path:
    """The GGUF file of a model spec: a built-in's (fetched if needed) or a ``.gguf`` path.  Raises
    :class:`InputError` for other specs, and (unless ``force``) when the drop set was made for another model: another
    built-in name, or a ``model_sha256`` other than the file's."""
    from .io import sha256_file
    from .models import loading

    where = drop_set.get("file", "the drop set")
    made_for = drop_set.get("model")
    if spec in loading.BUILTINS:
        if not force and made_for in loading.BUILTINS and made_for != spec:
            raise InputError(f"{where} was made for model {made_for!r}, not {spec!r}: pass --model {made_for}, or "
                             "--force to apply it anyway")
        return loading.fetch_builtin(spec)
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise InputError(f"--format gguf reads a GGUF file: give a built-in name ({', '.join(loading.BUILTINS)}) or "
                         f"a .gguf file, not {spec!r}")
    recorded = drop_set.get("model_sha256")
    if recorded and not force and recorded != sha256_file(path):
        raise InputError(f"{where} was made for a model with checksum {recorded[:12]}..., not {path}: pass --model "
                         "that model, or --force to apply it anyway")
    return path


def export_gguf(source: Path, drop_set: dict, out: Path, *, dtype: str | None = None) -> GGUFPlan:
    """Write ``source`` (a GGUF file) without ``drop_set``'s modules to ``out`` (see the module docstring); returns
    the plan (its ``arch``, ``keep`` ...).  ``dtype``: ``None`` (the source's tensor types), ``"float32"`` or
    ``"float16"``."""
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not a GGUF export type: give float32 or float16, or leave it out to "
                         "keep the source's tensor types")
    source = GGUFSource(Path(source))
    plan = GGUFPlan(source, dropped_modules(drop_set, source.n_layers))
    write_gguf(plan, Path(out), dtype)
    return plan
