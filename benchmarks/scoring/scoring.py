"""Cost of scoring against a plain forward pass, on the same batches, in one process.

Variants, interleaved over repeats (median time reported):
  forward          model(input_ids, attention_mask)   the plain causal-LM forward, no hooks
  decoder_forward  model.base_model(...)               the decoder stack alone, no hooks
  score            analysis.score_token_batches(...)   decoder stack + calibdrop's hooks, all three proxy
                                                       metrics (cosine, angular, relative_update) in one pass

Peak memory: CUDA ``max_memory_allocated``; CPU the process's peak RSS sampled every 0.5 ms
during the call.  Token ids are random (content does not change the cost); every token is real.

  python benchmarks/scoring/scoring.py --model smollm2-135m --texts 64 --seq-len 512
  python benchmarks/scoring/scoring.py --config llama-7b --device cuda --dtype bfloat16 --texts 8 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from analysis import load_model, score_token_batches
from analysis.io import package_versions
from analysis.data.samples import padded_batches

CONFIGS = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs."""

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)


def build_model(args):
    dtype = getattr(torch, args.dtype)
    if args.config:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIGS[args.config]), dtype=dtype)
        return model.eval(), f"config:{args.config}"
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    return model, args.model


def batches(args, vocab_size):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (args.texts, args.seq_len), generator=generator)
    return list(padded_batches(ids.tolist(), args.batch_size))


def run_variant(name, model, data, device):
    @torch.inference_mode()
    def plain(call):
        for batch in data:
            call(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)

    if name == "forward":
        plain(model)
    elif name == "decoder_forward":
        plain(model.base_model)
    else:
        score_token_batches(model, data, metrics=("cosine", "angular", "relative_update"), progress=False)


def measure(name, model, data, device):
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        started = time.perf_counter()
        run_variant(name, model, data, device)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return seconds, peak


def batch_benchmark_parser(description: str, *, texts: int, seq_len: int, batch_size: int) -> argparse.ArgumentParser:
    """Options shared by the benchmarks that time variants on the same random token batches."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="build a random model of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--texts", type=int, default=texts)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON file for the results")
    return parser


def rotated(variants: list[str], repeat: int) -> list[str]:
    """The variants in the order of one repeat: each repeat starts one later, so none always runs first."""
    shift = repeat % len(variants)
    return variants[shift:] + variants[:shift]


def batch_setting(args, label: str) -> dict:
    """What a batch benchmark ran: model, device, dtype and batch shape."""
    return {
        "model": label,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "texts": args.texts,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
    }


def main(argv=None):
    args = batch_benchmark_parser(__doc__, texts=64, seq_len=512, batch_size=8).parse_args(argv)

    model, label = build_model(args)
    data = batches(args, model.config.vocab_size)
    variants = ["forward", "decoder_forward", "score"]
    for name in variants:
        measure(name, model, data[:1], args.device)
    times = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    for repeat in range(args.repeats):
        for name in rotated(variants, repeat):
            seconds, peak = measure(name, model, data, args.device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        **batch_setting(args, label),
        "seconds_median": median,
        "seconds_all": times,
        "peak_memory_bytes": peaks,
        "memory_kind": "cuda max_memory_allocated" if args.device.startswith("cuda") else "process peak RSS",
        "time_ratio_score_vs_forward": median["score"] / median["forward"],
        "time_ratio_score_vs_decoder_forward": median["score"] / median["decoder_forward"],
        "memory_ratio_score_vs_forward": peaks["score"] / peaks["forward"],
        "memory_ratio_score_vs_decoder_forward": peaks["score"] / peaks["decoder_forward"],
        "tokens_per_second_score": args.texts * args.seq_len / median["score"],
        "versions": package_versions(),
    }
    emit(result, args.out)
    return 0


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
