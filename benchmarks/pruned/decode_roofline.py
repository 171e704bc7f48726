"""Pruned decode as a serving user sees it, beside the memory roofline of each decode step.

For each variant (unpruned, Attn-k, MLP-k, Block-k; the k layers ending two before the last,
removed with :func:`analysis.models.pruning.drop_modules`) and each mode, greedy ``model.generate``
on ``batch`` random prompts of ``prompt`` tokens:

  compiled  ``cache_implementation="static"``: transformers compiles the decode forward itself
            (``CompileConfig(mode=--compile-mode)``; transformers' default ``reduce-overhead`` uses CUDA
            graphs, ``max-autotune`` also tunes the matrix kernels for the decode shapes)
  eager     the default dynamic cache, no compilation (``disable_compile=True``)

``step = (t(new tokens) - t(1 token)) / (new - 1)``: the time of one decode step as
``generate`` runs it (the first call of a mode compiles and is not timed; median of repeats).
A dropped attention layer keeps no KV cache (``kv_sharing_modes`` = ``"reuse"``, a
``DummyLayer`` in transformers' caches, the static cache included): the script checks that the
static cache holds keys only for the kept attention layers.

Roofline of a step = bytes read per step / the card's measured copy bandwidth, with bytes =
every weight except the input embedding table (only ``batch`` rows of it are read) + the keys
and values of every cached layer at the mean cache length over the decode steps
(``prompt + new / 2``).  Copy bandwidth = (bytes read + bytes written) / time of a
``dst.copy_(src)`` of a 4 GiB tensor, median of 20.

  python benchmarks/pruned/decode_roofline.py --config llama-13b --variants unpruned,Attn-8,Attn-20,MLP-8,Block-8
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from benchmarks.pruned.pruned_speed import upper_layers  # noqa: E402
from benchmarks.scoring.scoring import CONFIGS  # noqa: E402

from analysis.io import package_versions  # noqa: E402
from analysis.models.pruning import cached_layers, drop_modules  # noqa: E402

PLAN_KEYS = {"Attn": "attn", "MLP": "mlp", "Block": "blocks"}
MODES = {
    "compiled": dict(cache_implementation="static"),
    "eager": dict(disable_compile=True),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: int = 4, repeats: int = 20) -> float:
    """Bytes per second moved (read + written) by ``dst.copy_(src)`` of a ``gib`` GiB tensor, median."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        dst.copy_(src)
        sync()
        seconds.append(time.perf_counter() - started)
    del src, dst
    return 2 * (gib << 30) / statistics.median(seconds)


def plan_of(name: str, n_layers: int) -> dict:
    """``Attn-8`` -> ``{"attn": [the 8 layers ending two before the last]}``; ``unpruned`` -> ``{}``."""
    if name == "unpruned":
        return {}
    kind, _, k = name.partition("-")
    return {PLAN_KEYS[kind]: upper_layers(n_layers, int(k))}


def build_variant(config: str, name: str, device: str, dtype) -> tuple[torch.nn.Module, dict]:
    """The seeded random model of ``config`` with the variant's modules dropped."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIGS[config]), dtype=dtype).eval()
    plan = plan_of(name, model.config.num_hidden_layers)
    return drop_modules(model, **plan) if plan else model, plan


def step_bytes(model, batch: int, mean_length: float) -> dict:
    """Bytes one decode step reads: weights (less the input embedding table) and the KV cache at ``mean_length``."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * embedding.element_size()
    config = model.config
    modes = getattr(config, "kv_sharing_modes", None) or [None] * config.num_hidden_layers
    kv_layers = sum(mode != "reuse" for mode in modes)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * kv_layers * config.num_key_value_heads * head_dim * embedding.element_size()
    kv = per_token * batch * mean_length
    return {"weights": weights, "kv_cache": kv, "total": weights + kv, "kv_layers": kv_layers}


def generate_seconds(model, ids, new: int, mode: str, compile_mode: str) -> tuple[float, object]:
    """Wall time of one greedy ``generate`` of exactly ``new`` tokens in ``mode``, and its output."""
    options = dict(MODES[mode], **({"compile_config": CompileConfig(mode=compile_mode)} if mode == "compiled" else {}))
    sync()
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, **options)
    sync()
    return time.perf_counter() - started, out


@torch.inference_mode()
def measure_variant(model, args) -> dict:
    """Per mode: median prefill (one-token generate) and decode-step seconds; the static cache's cached layers."""
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(model.device)
    result, tokens = {}, {}
    for mode in args.modes.split(","):
        _, out = generate_seconds(model, ids, args.new, mode, args.compile_mode)
        tokens[mode] = out.sequences[:, args.prompt :].cpu()
        generate_seconds(model, ids, 1, mode, args.compile_mode)
        one, full = [], []
        for _ in range(args.repeats):
            one.append(generate_seconds(model, ids, 1, mode, args.compile_mode)[0])
            full.append(generate_seconds(model, ids, args.new, mode, args.compile_mode)[0])
        step = (statistics.median(full) - statistics.median(one)) / (args.new - 1)
        result[mode] = {"one_token_seconds": statistics.median(one), "generate_seconds": statistics.median(full),
                        "step_seconds": step, "decode_tokens_per_s": args.batch / step,
                        "cache": type(out.past_key_values).__name__, "cached_layers": cached_layers(out.past_key_values)}
        del out
    first = next(iter(tokens.values()))
    for mode, generated in tokens.items():
        result[mode]["tokens_equal_to_first_mode"] = float((generated == first).float().mean())
    return result


def with_speedups(rows: dict) -> dict:
    """Each variant's decode, prefill and roofline speedups against ``unpruned`` (when it was run)."""
    base = rows.get("unpruned")
    if base is None:
        return rows
    for row in rows.values():
        for mode, timing in row["modes"].items():
            timing["decode_speedup"] = base["modes"][mode]["step_seconds"] / timing["step_seconds"]
            timing["prefill_speedup"] = base["modes"][mode]["one_token_seconds"] / timing["one_token_seconds"]
        if "roofline_step_seconds" in row:
            row["roofline_speedup"] = base["roofline_step_seconds"] / row["roofline_step_seconds"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-13b")
    parser.add_argument("--variants", default="unpruned,Attn-8,Attn-20,MLP-8,Block-8")
    parser.add_argument("--modes", default="compiled,eager")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the compiled decode")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64

    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    rows = {}
    for name in args.variants.split(","):
        model, plan = build_variant(args.config, name, args.device, getattr(torch, args.dtype))
        reads = step_bytes(model, args.batch, args.prompt + args.new / 2)
        row = {"dropped": plan, "parameters": sum(p.numel() for p in model.parameters()), "bytes_per_step": reads}
        row["modes"] = measure_variant(model, args)
        if bandwidth:
            row["roofline_step_seconds"] = reads["total"] / bandwidth
            for timing in row["modes"].values():
                timing["step_over_roofline"] = timing["step_seconds"] / row["roofline_step_seconds"]
        rows[name] = row
        print(name, {mode: round(t["step_seconds"] * 1e3, 2) for mode, t in row["modes"].items()}, "ms/step", flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        emit_result(args, bandwidth, with_speedups(rows))


def emit_result(args, bandwidth, rows) -> None:
    """Write the variants measured so far (the file is rewritten after each variant)."""
    result = {
        "model": f"config:{args.config}",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype, "compile_mode": args.compile_mode, "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "step_definition": "(t(generate new tokens) - t(generate 1 token)) / (new - 1), medians",
        "variants": rows,
        "versions": package_versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
