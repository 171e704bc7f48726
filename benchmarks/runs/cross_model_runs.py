"""The study on several built-in models, one after another, each with settings meant to fit about an hour on 2 free CPU cores.

Every run is the default preset without sub-distributions and zero-shot accuracy (as
``second_model_run.py``), with per-model sample counts chosen by the model's cost: a decoder
pass of qwen2.5-coder-0.5b costs about twice one of gemma3-270m (whose run took 42 minutes at
32 x 512 proxy tokens, 4 x 128 ablation tokens and 16 held-out windows per distribution), and
qwen2.5-coder-1.5b about three times more again. ``--paper`` gives every model the paper
preset instead (for a GPU); ``--proxies-only`` leaves out the ablation ground truth and the greedy paths
(into OUT/<model>-proxies). Runs are resumable: run the same command again after a kill. Each
finished model appends its wall time and stage timings to OUT/wall_times.jsonl.

qwen2.5-coder-0.5b ran in full (its ablation took 2.7 minutes per distribution once it had the 2 cores,
18-35 minutes at nice 19 beside other jobs); qwen2.5-coder-1.5b in full took 55.8 minutes (ablation 28.4).

  nice -n 19 python benchmarks/runs/cross_model_runs.py --models qwen2.5-coder-0.5b --out results/cross-model
  nice -n 19 python benchmarks/runs/cross_model_runs.py --models qwen2.5-coder-1.5b --out results/cross-model
  calibdrop summary results/run-default results/run-gemma3-270m results/cross-model/qwen2.5-coder-0.5b \
      results/cross-model/qwen2.5-coder-1.5b --out results/summary
"""

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from analysis.presets import PRESETS, RunSettings

LEAN = replace(PRESETS["default"], subsets=False, tasks=(), accuracy_sets=())

SETTINGS: dict[str, RunSettings] = {
    # The lean preset of second_model_run.py: README's smollm2 run used the full default preset.
    "smollm2-135m": replace(LEAN, transfer_samples=32),
    "gemma3-270m": replace(LEAN, transfer_samples=16),
    # About 2x gemma3-270m per token, on a machine shared with other jobs: half the proxy samples,
    # 4 x 32 ablation tokens, no greedy paths, 8 held-out windows of 96 tokens for attention and block sets, one random set.
    "qwen2.5-coder-0.5b": replace(LEAN, samples=16, ablation_samples=4, ablation_seq_len=32, greedy_module=None, transfer_samples=8,
                                  transfer_seq_len=96, random_seeds=(0,), transfer_modules=("attn", "block")),
    # About 6x gemma3-270m per token: a quarter of the proxy samples, 4 x 32 ablation tokens,
    # no greedy paths, 8 held-out windows of 96 tokens for attention and block sets, one random set.
    "qwen2.5-coder-1.5b": replace(LEAN, samples=8, ablation_samples=4, ablation_seq_len=32, greedy_module=None, transfer_samples=8,
                                  transfer_seq_len=96, random_seeds=(0,), transfer_modules=("attn", "block")),
}


def settings_for(model: str, paper: bool) -> RunSettings:
    """The settings of ``model``'s run: the paper preset with ``paper``, else the per-model lean settings."""
    if paper:
        return PRESETS["paper"]
    if model not in SETTINGS:
        raise SystemExit(f"no lean settings for {model!r}; models with settings: {', '.join(SETTINGS)} (or pass --paper)")
    return SETTINGS[model]


def main() -> None:
    from analysis.pipeline import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"], help="built-in models, run in this order")
    parser.add_argument("--out", type=Path, default=Path("results/cross-model"), help="parent folder; each model's run goes to OUT/<model>")
    parser.add_argument("--paper", action="store_true", help="the paper preset for every model (for a GPU) instead of the lean settings")
    parser.add_argument("--proxies-only", action="store_true",
                        help="no ablation ground truth and no greedy paths, into OUT/<model>-proxies (a first answer when CPU time is short)")
    args = parser.parse_args()
    for model in args.models:
        settings = settings_for(model, args.paper)
        folder = args.out / model
        if args.proxies_only:
            settings = replace(settings, metrics=tuple(m for m in settings.metrics if m != "ablation"), greedy_module=None)
            folder = args.out / f"{model}-proxies"
        started = time.time()
        summary = run(model, folder, preset=settings)
        record = {"model": model, "wall_seconds": round(time.time() - started, 1), "run_seconds": summary["seconds"],
                  "timings": summary["timings"], "settings": asdict(settings)}
        print(json.dumps(record, default=str), flush=True)
        with open(args.out / "wall_times.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    main()
