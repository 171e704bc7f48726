"""Where a reference study's GPU time goes: the ablation unit (one batch, every module dropped alone) timed and
profiled with ``torch.profiler`` on a built-in model's real weights.

Run on the GPU machine once the GGUF is in place (``device_reference_join.py``)::

    python benchmarks/reference/profile_gpu.py smollm2-135m --out $OUT/profile-smollm2-135m

Writes ``<out>.json`` (wall seconds of a full pass, of ``single_drop_increase`` and of a forward restarted from a
middle block, each after a warm-up, per batch size; the top operators by device and host time) and ``<out>.txt``
(the profiler's tables of one ``single_drop_increase`` at the last batch size).  Windows and matmul precision are
the reference preset's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analysis.importance.ablation import (block_inputs, dropped_row_nll, full_row_nll, single_drop_increase,
                                          token_nll)
from analysis.data.samples import token_batches
from analysis.importance.scoring import calibration_windows, score_windows
from analysis.models import attention
from analysis.models.loading import float32_matmul_precision, load_model
from analysis.presets import preset


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int = 3) -> float:
    """Median wall seconds of ``function()`` after one warm-up call, the device synchronised around each."""
    function()
    synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def top_operators(profile, key: str, n: int = 15) -> list[dict]:
    """The ``n`` operators of largest ``key`` (``self_device_time_total`` or ``cpu_time_total``), in seconds."""
    events = sorted(profile.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "count": e.count, "self_device_s": e.self_device_time_total / 1e6,
             "cpu_total_s": e.cpu_time_total / 1e6} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--distribution", default="general")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    settings = preset("reference")
    model, tokenizer = load_model(args.model, device=args.device)
    started = time.perf_counter()
    windows = calibration_windows(args.distribution, tokenizer, n_samples=settings.ablation_samples,
                                  seq_len=settings.ablation_seq_len, seed=settings.seed)
    windows_s = time.perf_counter() - started
    batch = next(token_batches(windows, settings.ablation_samples))
    ids_all, mask_all = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
    n_layers = model.config.num_hidden_layers
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"model": args.model, "device": device, "torch": torch.__version__,
              "attn_implementation": model.config._attn_implementation, "windows": list(ids_all.shape),
              "matmul_precision": settings.matmul_precision, "windows_s": windows_s, "by_batch": {}, "attention": {}}
    nll = {}
    with float32_matmul_precision(settings.matmul_precision), torch.inference_mode():
        for batch in args.batches:
            ids, mask = ids_all[:batch], mask_all[:batch]
            with block_inputs(model) as resid_pre:
                full_row_nll(model, ids, mask)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            result["by_batch"][batch] = {
                "full_pass_s": timed(lambda: full_row_nll(model, ids, mask)),
                "body_s": timed(lambda: model.model(input_ids=ids, attention_mask=mask, use_cache=False)),
                "token_nll_s": timed(lambda: token_nll(logits, ids, mask)),
                "restart_mid_s": timed(lambda: dropped_row_nll(model, [("attn", n_layers // 2)], resid_pre, ids,
                                                               mask)),
                "single_drop_increase_s": timed(lambda: single_drop_increase(model, ids, mask), repeats=1),
            }
            print(batch, result["by_batch"][batch], flush=True)
            del logits
        ids, mask = ids_all[:args.batches[-1]], mask_all[:args.batches[-1]]
        for name in ("sdpa", attention.NAME):
            model.set_attn_implementation(name)
            result["attention"][name] = {
                "body_s": timed(lambda: model.model(input_ids=ids, attention_mask=mask, use_cache=False)),
                "single_drop_increase_s": timed(lambda: single_drop_increase(model, ids, mask), repeats=1)}
            nll[name] = full_row_nll(model, ids, mask)[0]
        result["attention"]["max_relative_nll_difference"] = float(abs(nll["sdpa"] / nll[attention.NAME] - 1).max())
        result["score_windows_ablation_s"] = timed(
            lambda: score_windows(model, windows, args.distribution, batch_size=args.batches[-1],
                                  metrics=("ablation",), progress=False), repeats=1)
        print(result, flush=True)
        ids, mask = ids_all[:args.batches[-1]], mask_all[:args.batches[-1]]
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profile:
            single_drop_increase(model, ids, mask)
            synchronize()
    result["top_by_device"] = top_operators(profile, "self_device_time_total")
    result["top_by_cpu"] = top_operators(profile, "cpu_time_total")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    tables = [profile.key_averages().table(sort_by=key, row_limit=30)
              for key in ("self_cuda_time_total", "cpu_time_total")]
    args.out.with_suffix(".txt").write_text("\n\n".join(tables))
    print("\n\n".join(tables)[:9000])


if __name__ == "__main__":
    main()
