"""Where the ablation ground truth's and the greedy paths' time goes, and what resuming the greedy trials saves.

On smollm2-135m's real weights (float32, CPU) and the default preset's ablation windows (``ablation_samples`` x
``ablation_seq_len`` per calibration distribution, batches of ``batch_size``), in one process:

* the ablation ground truth (:func:`~analysis.importance.ablation.single_drop_increase`, the ``scores.ablation``
  stage's work) of every distribution, timed, with the first distribution's run under the torch profiler (the share of
  each operator) and the decoder blocks and LM-head passes it runs counted;
* the greedy stage's paths (each distribution's own and the robust one, attention, size 8, the default's shortlist of 4
  by single-drop cost, one shared trial cache as ``Study.trials``) twice: as they ran before (``exhaustive_path``: every
  shortlisted candidate on every distribution, per dropped set a full forward pass with the set removed whose block
  inputs the trials re-run from: ``FullPassTrials``) and as :func:`~analysis.importance.ablation.greedy_drop_path` runs
  them now (a candidate left once beaten on one distribution; block inputs kept by the drops before them, passes resumed
  at the nearest kept layer, no LM head for the dropped set alone).  Records both variants' seconds, decoder blocks and
  LM-head passes run, whether the paths are identical (``DataFrame.equals``: every choice and every recorded increase)
  and whether every trial sum both computed is equal (float ``==``).

    OMP_NUM_THREADS=1 python benchmarks/profile/ablation_greedy_cost.py \
        --out benchmarks/results/ablation-greedy-cost-smollm2-135m-cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.data.samples import token_batches
from analysis.importance import ablation
from analysis.importance.scoring import calibration_windows
from analysis.io import atomic_write_bytes, package_versions
from analysis.models.adapters import decoder_layers
from analysis.models.loading import load_model
from analysis.presets import PRESETS

# the test's independent computation of the trials as the cache ran them before (a full pass per batch)
spec = importlib.util.spec_from_file_location("test_trial_cache", ROOT / "tests" / "test_trial_cache.py")
sys.path.insert(0, str(ROOT / "tests"))
trial_cache_tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trial_cache_tests)
DISTRIBUTIONS = ("code", "math", "multilingual", "chat", "general")


class FullPassTrials(ablation.TrialCache):
    """The trials as the cache ran them before: per (distribution, dropped set) and batch, one full forward pass with
    the set removed (LM head included) for its block inputs, then each trial re-run from its layer."""

    def missing_trials(self, model, batches, distribution, dropped, missing):
        self.passes += 1
        return trial_cache_tests.full_pass_trials(model, batches, dropped, missing)


def exhaustive_path(model, batches, objective: str, prior: dict, cache: FullPassTrials, k: int = 8,
                    shortlist: int = 4) -> pd.DataFrame:
    """An attention greedy path as ``greedy_drop_path`` computed it before: every shortlisted candidate tried on every
    distribution of the objective, the smallest largest increase chosen (ties to the earlier candidate)."""
    names = list(batches) if objective == "robust" else [objective]
    candidates = ablation.candidates_of("attn", len(decoder_layers(model)))
    with torch.inference_mode():
        base = {d: cache.base_nll(model, batches[d], d) for d in names}
    chosen, rows = [], []
    for step in range(1, k + 1):
        remaining = [c for c in candidates if c not in chosen]
        remaining = sorted(remaining, key=lambda c: (prior[c], remaining.index(c)))[:shortlist]
        remaining.sort(key=list(candidates).index)
        trials = {c: candidates[c] for c in remaining}
        increase = {c: {} for c in remaining}
        with torch.inference_mode():
            for d in names:
                tried = cache.trial_nll(model, batches[d], d, [candidates[c] for c in chosen], trials)
                for c in remaining:
                    increase[c][d] = (tried[c] - base[d][0]) / base[d][1]
        value = {c: max(increase[c].values()) for c in remaining}
        best = min(remaining, key=lambda c: value[c])
        chosen.append(best)
        rows.append({"objective": objective, "module": "attn", "step": step, "candidate": str(best),
                     "objective_increase": value[best], **{f"increase:{d}": increase[best][d] for d in names}})
    return pd.DataFrame(rows)


class Counted:
    """Counts the decoder blocks and LM-head passes run inside the ``with``."""

    def __init__(self, model):
        self.model, self.blocks, self.heads = model, 0, 0

    def __enter__(self):
        def block(*_):
            self.blocks += 1

        def head(*_):
            self.heads += 1

        self.handles = [layer.register_forward_pre_hook(block) for layer in decoder_layers(self.model)]
        self.handles.append(self.model.get_output_embeddings().register_forward_pre_hook(head))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def ablation_cost(model, batches) -> tuple[dict, dict]:
    """Per distribution the single-drop attention cost per token (the shortlist's prior), and the timings, counts and
    profiled operator shares of the ablation ground truth."""
    cost, seconds, shares, counts = {}, {}, {}, {}
    with torch.inference_mode():
        for index, (name, parts) in enumerate(batches.items()):
            increase, tokens = 0.0, 0
            started = time.perf_counter()
            with Counted(model) as counted:
                if index == 0:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        runs = [ablation.single_drop_increase(model, b["input_ids"], b["attention_mask"])
                                for b in parts]
                    events = prof.key_averages()
                    total = sum(e.self_cpu_time_total for e in events)
                    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
                    shares = {e.key: round(e.self_cpu_time_total / total, 4) for e in top}
                else:
                    runs = [ablation.single_drop_increase(model, b["input_ids"], b["attention_mask"]) for b in parts]
            seconds[name] = round(time.perf_counter() - started, 2)
            counts = {"decoder_blocks": counted.blocks, "lm_head_passes": counted.heads}
            for delta, n in runs:
                increase, tokens = increase + delta[:, :, 0].sum(0), tokens + n.sum()
            cost[name] = dict(enumerate(increase / tokens))
    config = model.config
    block_flops = 2 * sum(p.numel() for p in decoder_layers(model)[0].parameters() if p.dim() == 2)
    head_flops = 2 * config.hidden_size * config.vocab_size
    return cost, {"seconds_per_distribution": seconds,
                  "note": "the first distribution's seconds include the torch profiler's overhead",
                  "per_distribution_batch_counts": counts,
                  "profiled_self_cpu_share_top_ops": shares,
                  "lm_head_share_of_matmul_flops": round(counts["lm_head_passes"] * head_flops / (
                      counts["lm_head_passes"] * head_flops + counts["decoder_blocks"] * block_flops), 3)}


def greedy_stage(model, batches, cost, cache) -> tuple[list[pd.DataFrame], dict]:
    """The greedy stage's paths with one shared ``cache`` (before: a :class:`FullPassTrials` and
    :func:`exhaustive_path`; after: a ``TrialCache`` and ``greedy_drop_path``), and their seconds, blocks and LM-head
    passes."""
    frame = pd.DataFrame(cost)
    paths = []
    started = time.perf_counter()
    with Counted(model) as counted:
        for objective in [*batches, "robust"]:
            prior = (frame.max(axis=1) if objective == "robust" else frame[objective]).to_dict()
            if isinstance(cache, FullPassTrials):
                paths.append(exhaustive_path(model, batches, objective, prior, cache))
            else:
                paths.append(ablation.greedy_drop_path(model, batches, module="attn", k=8, objective=objective,
                                                       shortlist=4, prior=prior, cache=cache))
    return paths, {"seconds": round(time.perf_counter() - started, 2), "decoder_blocks": counted.blocks,
                   "lm_head_passes": counted.heads, "trials_requested": cache.requested, "trials_run": cache.trials,
                   "passes": cache.passes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    load_before = list(os.getloadavg())
    settings = PRESETS["default"]
    model, tokenizer = load_model("smollm2-135m")
    batches = {name: list(token_batches(calibration_windows(name, tokenizer, n_samples=settings.ablation_samples,
                                                             seq_len=settings.ablation_seq_len, seed=settings.seed),
                                         settings.batch_size))
               for name in DISTRIBUTIONS}
    cost, truth = ablation_cost(model, batches)
    before_cache, after_cache = FullPassTrials(), ablation.TrialCache()
    before, before_record = greedy_stage(model, batches, cost, before_cache)
    after, after_record = greedy_stage(model, batches, cost, after_cache)
    common = set(before_cache.tried) & set(after_cache.tried)
    kept = after_cache.kept_bytes
    result = {
        "what": __doc__.split("\n\n")[0],
        "command": "OMP_NUM_THREADS=1 python benchmarks/profile/ablation_greedy_cost.py "
                   f"--out {args.out} (machine shared with another agent's jobs: read the ratios, not the seconds)",
        "model": "smollm2-135m (real weights, float32, CPU)",
        "windows_per_distribution": f"{settings.ablation_samples} x {settings.ablation_seq_len}",
        "batch_size": settings.batch_size,
        "ablation_ground_truth": truth,
        "greedy": {
            "paths": len(before), "module": "attn", "k": 8, "shortlist": 4,
            "identical_paths": all(a.equals(b) for a, b in zip(before, after)),
            "trial_sums_compared": len(common),
            "identical_trial_sums": all(before_cache.tried[key] == after_cache.tried[key] for key in common),
            "identical_base_sums": before_cache.base == after_cache.base,
            "before_full_pass_trials": before_record, "after_resumed_trials": after_record,
            "after_over_before_seconds": round(after_record["seconds"] / before_record["seconds"], 3),
            "after_over_before_blocks": round(after_record["decoder_blocks"] / before_record["decoder_blocks"], 3),
            "after_over_before_lm_head_passes": round(after_record["lm_head_passes"] / before_record["lm_head_passes"],
                                                      3),
            "block_inputs_kept_bytes": kept,
            "passes_note": "before: full forward passes with a dropped set removed (all batches); after: resumed "
                           "passes of one batch to one block input",
        },
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": list(os.getloadavg())},
        "versions": package_versions(),
    }
    atomic_write_bytes(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
