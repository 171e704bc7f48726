"""What one trial cache per run saves: the greedy stage's paths and leave-one-out's, with a cache each or one shared.

On smollm2-135m's real weights (float32, CPU), ablation-sized windows of every calibration distribution (``--samples``
× ``--seq-len``), attention, size ``--k``, the default's shortlist of 4 by single-drop ablation cost.  Runs, in one
process and on the same batches, the paths as the run makes them: each distribution's own path and the robust path
(the greedy stage), then the robust path without each distribution (leave-one-out), once with a new
:class:`~analysis.importance.ablation.TrialCache` per path (before) and once with one cache for all (after: what
``Study.trials`` does).  Records the (candidate, distribution) trials and forward passes run, the wall seconds of each
variant, and whether every path is identical.

    OMP_NUM_THREADS=2 python benchmarks/study/greedy_trial_sharing.py \
        --out benchmarks/results/greedy-trial-sharing-smollm2-135m-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analysis.data.samples import token_batches  # noqa: E402
from analysis.importance import ablation  # noqa: E402
from analysis.importance.scoring import calibration_windows  # noqa: E402
from analysis.io import atomic_write_bytes, package_versions  # noqa: E402
from analysis.models.loading import load_model  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402

DISTRIBUTIONS = ("code", "math", "multilingual", "chat", "general")


def single_drop_cost(model, batches) -> dict[str, dict[int, float]]:
    """Per distribution, each attention sublayer's single-drop ΔNLL per token (the shortlist's prior)."""
    cost = {}
    with torch.inference_mode():
        for name, parts in batches.items():
            increase, tokens = 0.0, 0
            for batch in parts:
                delta, n = ablation.single_drop_increase(model, batch["input_ids"], batch["attention_mask"])
                increase, tokens = increase + delta[:, :, 0].sum(0), tokens + n.sum()
            cost[name] = dict(enumerate(increase / tokens))
    return cost


def paths(model, batches, cost, k: int, caches) -> tuple[list[pd.DataFrame], float]:
    """The greedy stage's paths then leave-one-out's, each with the cache ``caches()`` gives; and their wall seconds."""
    frame = pd.DataFrame(cost)
    started = time.perf_counter()
    out = []
    for objective in [*batches, "robust"]:
        prior = frame.max(axis=1) if objective == "robust" else frame[objective]
        out.append(ablation.greedy_drop_path(model, batches, module="attn", k=k, objective=objective, shortlist=4,
                                             prior=prior.to_dict(), cache=caches()))
    for left in batches:
        others = {d: b for d, b in batches.items() if d != left}
        prior = frame.drop(columns=[left]).max(axis=1)
        out.append(ablation.greedy_drop_path(model, others, module="attn", k=k, objective="robust", shortlist=4,
                                             prior=prior.to_dict(), cache=caches()))
    return out, time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=PRESETS["default"].ablation_samples)
    parser.add_argument("--seq-len", type=int, default=PRESETS["default"].ablation_seq_len)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("smollm2-135m")
    batches = {name: list(token_batches(calibration_windows(name, tokenizer, n_samples=args.samples,
                                                             seq_len=args.seq_len, seed=0), 8))
               for name in DISTRIBUTIONS}
    cost = single_drop_cost(model, batches)
    made: list[ablation.TrialCache] = []

    def fresh():
        made.append(ablation.TrialCache())
        return made[-1]

    before, before_seconds = paths(model, batches, cost, args.k, fresh)
    separate = list(made)
    shared = ablation.TrialCache()
    after, after_seconds = paths(model, batches, cost, args.k, lambda: shared)
    result = {
        "what": __doc__.split("\n\n")[0],
        "model": "smollm2-135m (real weights, float32, CPU)",
        "windows_per_distribution": f"{args.samples} x {args.seq_len}", "k": args.k, "shortlist": 4,
        "paths": len(before),
        "identical_paths": all(a.equals(b) for a, b in zip(before, after)),
        "before": {"trials_requested": sum(c.requested for c in separate),
                   "trials_run": sum(c.trials for c in separate),
                   "passes": sum(c.passes for c in separate), "seconds": round(before_seconds, 1)},
        "after": {"trials_requested": shared.requested, "trials_run": shared.trials, "passes": shared.passes,
                  "seconds": round(after_seconds, 1)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1_5_15": list(os.getloadavg())},
        "versions": package_versions(),
    }
    result["after_over_before_seconds"] = round(after_seconds / before_seconds, 3)
    atomic_write_bytes(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
