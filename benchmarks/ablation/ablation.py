"""Cost of the ablation ground truth against the naive loop and against one scoring pass, in one process.

Variants on the same batches, interleaved over repeats (median time reported):
  naive     for every module (3 per layer): drop it (analysis.models.pruning.modules_dropped) and run one full
            forward pass, plus one unablated pass
  ablation  analysis.importance.ablation.single_drop_increase: one unablated pass keeping every block's input,
            then each module re-runs only the blocks from its layer on
  score     analysis.score_token_batches with the three proxies (one pass, no LM head)

Both ablation variants give the same ΔNLL (checked here, max difference reported).

  python benchmarks/ablation/ablation.py --model smollm2-135m --texts 4 --seq-len 256
  python benchmarks/ablation/ablation.py --config llama-7b --device cuda --dtype bfloat16 --texts 8 --seq-len 2048
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from analysis import score_token_batches  # noqa: E402
from analysis.importance.ablation import KINDS, full_row_nll, single_drop_increase  # noqa: E402
from analysis.models.adapters import decoder_layers  # noqa: E402
from analysis.io import package_versions  # noqa: E402
from analysis.models.pruning import modules_dropped  # noqa: E402
from benchmarks.scoring.scoring import batch_benchmark_parser, batch_setting, batches, build_model, emit, rotated


@torch.inference_mode()
def naive_increase(model, ids, mask) -> np.ndarray:
    """ΔNLL sums of each module dropped alone, one full forward pass per module."""
    base, _ = full_row_nll(model, ids, mask)
    n_layers = len(decoder_layers(model))
    increase = np.zeros((len(base), n_layers, len(KINDS)))
    for i in range(n_layers):
        for m, kind in enumerate(KINDS):
            with modules_dropped(model, [(kind, i)]):
                increase[:, i, m] = full_row_nll(model, ids, mask)[0] - base
    return increase


def run_variant(name, model, data, device):
    outputs = []
    with torch.inference_mode():
        for batch in data:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if name == "naive":
                outputs.append(naive_increase(model, ids, mask))
            elif name == "ablation":
                outputs.append(single_drop_increase(model, ids, mask)[0])
    if name == "score":
        score_token_batches(model, data, metrics=("cosine", "angular", "relative_update"), progress=False)
    return outputs


def timed(name, model, data, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = run_variant(name, model, data, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, outputs


def main(argv=None):
    args = batch_benchmark_parser(__doc__, texts=4, seq_len=256, batch_size=4).parse_args(argv)

    model, label = build_model(args)
    data = batches(args, model.config.vocab_size)
    variants = ["naive", "ablation", "score"]
    timed("score", model, data[:1], args.device)
    times = {name: [] for name in variants}
    outputs = {}
    for repeat in range(args.repeats):
        for name in rotated(variants, repeat):
            seconds, outputs[name] = timed(name, model, data, args.device)
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    difference = max(float(np.abs(a - b).max()) for a, b in zip(outputs["naive"], outputs["ablation"]))
    result = {
        **batch_setting(args, label),
        "modules": 3 * len(decoder_layers(model)),
        "seconds_median": median,
        "seconds_all": times,
        "time_ratio_ablation_vs_naive": median["ablation"] / median["naive"],
        "time_ratio_ablation_vs_score": median["ablation"] / median["score"],
        "max_abs_difference_naive_vs_ablation_nll_sum": difference,
        "versions": package_versions(),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
