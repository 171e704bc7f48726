"""Speed and memory of pruned models against the unpruned one, in the same process.

Per variant (unpruned, Attn-k, MLP-k, Block-k): parameter count; prefill tokens/s (one
forward over ``batch x prompt`` tokens with a KV cache); decode tokens/s (``new`` greedy
single-token steps on that cache, ``batch`` sequences); KV-cache bytes after decoding.
Variants are timed in rotating order over ``repeats`` and the median is reported.  Which
layers are dropped changes these numbers little; by default the k layers ending two before
the last (the paper's drop sets sit in the upper half).

  python benchmarks/pruned/pruned_speed.py --model smollm2-135m --k 8
  python benchmarks/pruned/pruned_speed.py --config llama-13b --device cuda --dtype bfloat16 --attn-only 8,20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from benchmarks.scoring.scoring import CONFIGS, build_model, emit  # noqa: E402

from analysis.io import package_versions  # noqa: E402
from analysis.models.pruning import drop_modules, kv_cache_bytes  # noqa: E402


def upper_layers(n_layers: int, k: int) -> list[int]:
    """The k layers ending two before the last."""
    return list(range(n_layers - 1 - k, n_layers - 1))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(model, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=generator).to(args.device)
    sync(args.device)
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync(args.device)
    prefill = time.perf_counter() - started
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(args.new):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(args.device)
    decode = time.perf_counter() - started
    return {"prefill_seconds": prefill, "decode_seconds": decode, "kv_cache_bytes": kv_cache_bytes(cache)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", type=int, default=8, help="modules dropped in Attn-k, MLP-k and Block-k")
    parser.add_argument("--attn-only", help="comma-separated k values: only Attn-k variants (the paper's GPU table)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    base, label = build_model(args)
    n_layers = base.config.num_hidden_layers
    if args.attn_only:
        plans = {f"Attn-{k}": dict(attn=upper_layers(n_layers, int(k))) for k in args.attn_only.split(",")}
    else:
        plans = {f"{kind}-{args.k}": {key: upper_layers(n_layers, args.k)} for kind, key in (("Attn", "attn"), ("MLP", "mlp"), ("Block", "blocks"))}
    variants = {"unpruned": base}
    for name, plan in plans.items():
        variants[name] = drop_modules(copy.deepcopy(base), **plan)
    for model in variants.values():
        measure(model, argparse.Namespace(**{**vars(args), "new": 2, "prompt": min(args.prompt, 64)}))
    runs = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            runs[name].append(measure(variants[name], args))
    rows = {}
    for name, results in runs.items():
        prefill = statistics.median(r["prefill_seconds"] for r in results)
        decode = statistics.median(r["decode_seconds"] for r in results)
        rows[name] = {
            "parameters": sum(p.numel() for p in variants[name].parameters()),
            "prefill_tokens_per_s": args.batch * args.prompt / prefill,
            "decode_tokens_per_s": args.batch * args.new / decode,
            "kv_cache_bytes": results[-1]["kv_cache_bytes"],
            "dropped": plans.get(name, {}),
        }
    for name, row in rows.items():
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / rows["unpruned"]["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / rows["unpruned"]["decode_tokens_per_s"]
    result = {
        "model": label,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "variants": rows,
        "versions": package_versions(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
