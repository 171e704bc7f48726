"""Parity and speed of `calibdrop export --format gguf` in a real llama.cpp (the PyPI wheel xllamacpp, CPU).

For each model and drop set (smollm2-135m: attn-8 {5, 7, 9, 14, 22, 25, 26, 29}, MLP-4 {13, 14, 16, 17}, block-4
{12, 13, 14, 17}; qwen2.5-coder-0.5b: the cosine Borda sets of reference/qwen2.5-coder-0.5b/drop_sets.parquet,
attn-8 {11, 13, 18, 19, 20, 21, 22, 23}, MLP-4 {10, 12, 13, 21}, block-4 {10, 12, 13, 18}), the built-in GGUF is exported three ways (float32, float16, the
source's tensor types) and each file is run in llama.cpp on fixed windows (WINDOWS windows of TOKENS tokens cut from
this repository's README.md and analysis/export_gguf.py, the same ids for both sides).  The reference is calibdrop's
pruned model (the dequantised built-in, `drop_modules`, float32) on the same ids.  Per file: mean NLL on both sides,
the relative difference of the means, the largest per-token absolute and relative NLL differences.

Speed: greedy decoding in llama.cpp on 1 and 2 threads (`--threads`), the same prompt, of the unpruned source GGUF and
of each pruned GGUF in the source's tensor types, runs interleaved (unpruned, attn-8, MLP-4, block-4, unpruned, ...)
`--repeats` times; medians of prompt and decode tokens per second, and the median over rounds of each pruned run's
decode speed divided by the unpruned run's of the same round.  The machine is shared with other jobs (load
average about 11 on its 2 cores when the committed files were made): the figures are indicative, the ratios within
one interleaved series less so.  OpenMP's default spin-waiting makes 2 threads on an oversubscribed machine about 30
times slower than 1 (each graph node's barrier waits for the other thread to be scheduled), so the script sets
OMP_WAIT_POLICY=PASSIVE (unless set).

    PYTHONPATH=. python benchmarks/export/gguf_parity.py --model smollm2-135m \
        --out benchmarks/results/gguf-parity-smollm2-135m-cpu.json
    PYTHONPATH=. python benchmarks/export/gguf_parity.py --model qwen2.5-coder-0.5b \
        --out benchmarks/results/gguf-parity-qwen2.5-coder-0.5b-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's OpenMP threads sleep, not spin, at barriers
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llamacpp_runner import LlamaCpp  # tests/llamacpp_runner.py

from analysis.export_gguf import export_gguf
from analysis.models import loading
from analysis.models.pruning import drop_modules

SETS = {  # smollm2-135m: the sets of issue 35; qwen2.5-coder-0.5b: its reference study's cosine Borda sets
    "smollm2-135m": {"attn-8": ("attn", [5, 7, 9, 14, 22, 25, 26, 29]), "mlp-4": ("mlp", [13, 14, 16, 17]),
                     "block-4": ("block", [12, 13, 14, 17])},
    "qwen2.5-coder-0.5b": {"attn-8": ("attn", [11, 13, 18, 19, 20, 21, 22, 23]), "mlp-4": ("mlp", [10, 12, 13, 21]),
                           "block-4": ("block", [10, 12, 13, 18])},
}
DTYPES = ("float32", "float16", None)
TOKENS, WINDOWS = 128, 4


def windows(tokenizer) -> list[list[int]]:
    """WINDOWS windows of TOKENS ids from two fixed files of this repository."""
    ids = []
    for name in ("README.md", "analysis/export_gguf.py"):
        ids += tokenizer((ROOT / name).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return [ids[i * TOKENS:(i + 1) * TOKENS] for i in range(WINDOWS)]


def reference_nll(model, window) -> np.ndarray:
    ids = torch.tensor([window])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    return (torch.logsumexp(logits, -1) - logits.gather(1, ids[0, 1:, None])[:, 0]).numpy()


def compare(reference: list[np.ndarray], path: Path, ids: list[list[int]]) -> dict:
    """llama.cpp's per-token NLL of ``path`` on the windows ``ids`` against ``reference`` (calibdrop's)."""
    with LlamaCpp(path, n_ctx=TOKENS) as model:
        got = [model.token_nll(w) for w in ids]
    ref, out = np.concatenate(reference), np.concatenate(got)
    return {"mean_nll_calibdrop": float(ref.mean()), "mean_nll_llama_cpp": float(out.mean()),
            "relative_difference_of_mean": float(abs(out.mean() - ref.mean()) / ref.mean()),
            "max_token_abs_difference": float(np.abs(out - ref).max()),
            "max_token_relative_difference": float((np.abs(out - ref) / np.maximum(ref, 1e-12)).max()),
            "median_token_relative_difference": float(np.median(np.abs(out - ref) / np.maximum(ref, 1e-12))),
            "file_mb": round(path.stat().st_size / 2**20, 1)}


def speed(source: Path, pruned: dict[str, Path], prompt, threads: int, repeats: int, new_tokens: int) -> dict:
    """Interleaved greedy runs: per variant, the median prompt and decode tokens per second."""
    variants = {"unpruned": source, **pruned}
    runs = {name: [] for name in variants}
    loaded = {name: LlamaCpp(path, threads=threads, n_ctx=len(prompt) + new_tokens + 1, kv_type="f16")
              for name, path in variants.items()}
    try:
        for name, model in loaded.items():  # warm-up
            model.greedy_speed(prompt, 4)
        for _ in range(repeats):
            for name, model in loaded.items():
                runs[name].append(model.greedy_speed(prompt, new_tokens))
    finally:
        for model in loaded.values():
            model.close()
    out = {}
    for name, results in runs.items():
        out[name] = {key: round(statistics.median(r[key] for r in results), 1)
                     for key in ("prompt_tokens_per_s", "decode_tokens_per_s")}
        out[name]["decode_runs"] = [round(r["decode_tokens_per_s"], 1) for r in results]
    for name in pruned:  # paired: each pruned run against the unpruned run of its own round
        ratios = [r["decode_tokens_per_s"] / u["decode_tokens_per_s"] for r, u in zip(runs[name], runs["unpruned"])]
        out[name]["decode_ratio_runs"] = [round(x, 3) for x in ratios]
        out[name]["decode_speedup_median_of_pairs"] = round(statistics.median(ratios), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SETS))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts of the speed runs")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import xllamacpp

    record = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
              "llama_cpp": f"xllamacpp {xllamacpp.__version__} (PyPI wheel, llama.cpp's C API through ctypes)",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs", "windows": WINDOWS,
              "tokens_per_window": TOKENS, "kv_cache_for_parity": "f32, flash attention off", "model": args.model}
    work = Path(tempfile.mkdtemp(prefix="gguf-parity-"))
    name = args.model
    source = loading.fetch_builtin(name)
    model, tokenizer = loading.load_model(name)
    ids = windows(tokenizer)
    result = {"source": source.name, "sets": {}}
    reference = [reference_nll(model, w) for w in ids]
    result["unpruned_source_types"] = compare(reference, source, ids)
    pruned_source_types = {}
    for label, (module, indices) in SETS[name].items():
        drop_set = {"module": module, "indices": indices}
        pruned, _ = loading.load_model(name)
        drop_modules(pruned, **{"blocks" if module == "block" else module: indices})
        reference = [reference_nll(pruned, w) for w in ids]
        del pruned
        result["sets"][label] = {"indices": indices}
        for dtype in DTYPES:
            path = work / f"{name}-{label}-{dtype or 'source'}.gguf"
            plan = export_gguf(source, drop_set, path, dtype=dtype)
            result["sets"][label]["arch"] = plan.arch
            result["sets"][label][dtype or "source_types"] = compare(reference, path, ids)
            if dtype is None:
                pruned_source_types[label] = path
            else:
                path.unlink()
        print(name, label, json.dumps(result["sets"][label]), flush=True)
    prompt = ids[0][:64]
    result["speed"] = {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "kv_cache": "f16 (llama.cpp's default), flash attention off",
                       "by_threads": {threads: speed(source, pruned_source_types, prompt, int(threads), args.repeats,
                                                     args.new_tokens) for threads in args.threads.split(",")}}
    print(name, json.dumps(result["speed"]), flush=True)
    for path in pruned_source_types.values():
        path.unlink()
    work.rmdir()
    record.update(result)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
