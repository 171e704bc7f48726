"""The GPU stages of ``calibdrop run --preset paper`` timed on one distribution, and the whole preset extrapolated.

A full paper-preset run on a 7B model does not fit one 10-minute device call, so this script
times one unit of each GPU stage on one distribution's real text (the same library calls the
run makes, :mod:`analysis.pipeline`), with a config-built random model (bf16, one GPU), and
scales each unit to the preset's sizes (:data:`analysis.presets.PRESETS` ``["paper"]``):

  score proxies          256 x 2048 windows, three proxies, one pass        x distributions
  score ablation         ``--ablation-samples`` x 2048 windows               x (preset / measured) x distributions
  score sub-distributions  (no own measurement) proxy time per window      x subsets x 64 windows
  greedy drop sets       one exact greedy step (every attention candidate    per candidate trial (shortlisted ones) on one distribution's
                         tried once) on ``--ablation-samples`` windows        windows x (preset / measured) x all trials
  held-out evaluation    ``window_nll`` of the unpruned model and 4 random    per (set, window) x sets x preset windows
                         attn-8 sets on ``--heldout-samples`` windows         x distributions

Extrapolation is linear in windows and trials: ``extrapolated_seconds`` are estimates, not
measurements.  Greedy trials are counted as the run makes them: per distribution's objective
``sum_{j=1..k} min(shortlist, n - j + 1)`` trials on its own windows, and the robust objective the same number
on every distribution's windows; each trial is costed at step 1's mean (later steps re-run from
the earliest dropped layer, so they can cost more or less).  Held-out sets are counted for attention
only (the run also evaluates MLP, block and joint sets: 60 in all in the measured paper run,
``paper_preset_run.py``, which times every stage for real).  Not measured here: zero-shot accuracy
(lm-evaluation-harness needs its task data, not on the device), the CPU stages (stability with
1000 bootstrap and permutation draws, figures, report).  Peak memory: CUDA
``max_memory_allocated`` during each measured unit.

  python benchmarks/runs/paper_preset_stages.py --config llama-7b --distribution general --tokenizer TOKENIZER_DIR \
      --out R.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from benchmarks.gpus.multi_gpu_scaling import PROXIES, build  # noqa: E402
from benchmarks.scoring.scoring import CONFIGS, emit  # noqa: E402

from analysis import score_token_batches  # noqa: E402
from analysis.data.documents import load_distribution  # noqa: E402
from analysis.data.manifests import top_level  # noqa: E402
from analysis.data.samples import calibration_samples, token_batches  # noqa: E402
from analysis.evaluation.heldout import window_nll  # noqa: E402
from analysis.importance import ablation  # noqa: E402
from analysis.io import package_versions  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402


def timed(fn) -> tuple[object, float, int | None]:
    """``fn()``, its wall seconds (after the GPU finishes) and the peak CUDA memory it allocated (None on CPU)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    return value, time.perf_counter() - started, torch.cuda.max_memory_allocated() if cuda else None


def windows(name: str, tokenizer, n: int, seq_len: int, split: str = "calibration"):
    return calibration_samples(load_distribution(name, split), tokenizer, n_samples=n, seq_len=seq_len, seed=0)


def greedy_trials(n_candidates: int, k: int, n_distributions: int, shortlist: int | None = None) -> int:
    """Candidate trials times distributions evaluated by the greedy paths of a run: each distribution's objective
    tries ``sum_{j=1..k} min(shortlist, n - j + 1)`` candidates on its own windows (all remaining ones without a
    shortlist), the robust objective on all."""
    per_path = sum(min(shortlist or n_candidates, n_candidates - j + 1) for j in range(1, k + 1))
    return per_path * n_distributions + per_path * n_distributions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-7b")
    parser.add_argument("--distribution", default="general")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--ablation-samples", type=int, default=8)
    parser.add_argument("--heldout-samples", type=int, default=16)
    parser.add_argument("--subsets", type=int, default=16,
                        help="sub-distributions in the paper preset (16: analysis.data.documents.subsets of the five distributions, counted where all are fetched)")
    parser.add_argument("--samples", type=int, help="proxy windows to time (default: the preset's 256)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    paper = PRESETS["paper"]
    name, seq_len = args.distribution, paper.seq_len
    n_dist, n_subsets = len(paper.distributions or top_level()), args.subsets
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model, build_seconds, _ = timed(lambda: build(args.config, len(tokenizer), device))
    n_layers = model.config.num_hidden_layers
    score_token_batches(model, token_batches(windows(name, tokenizer, paper.batch_size, seq_len), paper.batch_size), metrics=PROXIES, progress=False)

    stages = {}
    samples = args.samples or paper.samples
    calibration, seconds, _ = timed(lambda: windows(name, tokenizer, samples, seq_len))
    stages["tokenise (calibration windows)"] = dict(measured=f"{samples} x {seq_len}", seconds=seconds, peak_memory_bytes=None,
                                                   extrapolated_seconds=seconds * paper.samples / samples * n_dist)
    _, seconds, peak = timed(lambda: score_token_batches(model, token_batches(calibration, paper.batch_size), metrics=PROXIES, progress=False))
    per_window = seconds / samples
    stages["score proxies"] = dict(measured=f"{samples} x {seq_len}", seconds=seconds, peak_memory_bytes=peak,
                                   extrapolated_seconds=per_window * paper.samples * n_dist)
    stages["score sub-distributions"] = dict(measured="none (proxy time per window)", seconds=None, peak_memory_bytes=None,
                                             extrapolated_seconds=per_window * paper.subset_samples * n_subsets)
    truth_windows = windows(name, tokenizer, args.ablation_samples, seq_len)
    truth_batches = list(token_batches(truth_windows, paper.batch_size))
    _, seconds, peak = timed(lambda: score_token_batches(model, truth_batches, metrics=("ablation",), progress=False))
    stages["score ablation"] = dict(measured=f"{args.ablation_samples} x {seq_len}", seconds=seconds, peak_memory_bytes=peak,
                                    extrapolated_seconds=seconds * paper.ablation_samples / args.ablation_samples * n_dist)
    path, seconds, peak = timed(lambda: ablation.greedy_drop_path(model, {name: truth_batches}, module="attn", k=1, objective=name))
    per_trial = seconds / (n_layers + 1)
    k = min(max(paper.budgets.get("attn", paper.transfer_k)), n_layers - 1)
    trials = greedy_trials(n_layers, k, n_dist, paper.greedy_shortlist)
    stages["greedy drop sets"] = dict(measured=f"one step, {n_layers} trials + the unpruned pass, {args.ablation_samples} x {seq_len}",
                                      seconds=seconds, peak_memory_bytes=peak, trials_in_run=trials,
                                      extrapolated_seconds=per_trial * paper.ablation_samples / args.ablation_samples * trials)
    heldout = {name: windows(name, tokenizer, args.heldout_samples, seq_len, "heldout")}
    rng = np.random.default_rng(0)
    sets = {"none": None, **{f"random-{i}": {"module": "attn", "indices": sorted(rng.choice(n_layers, min(8, n_layers - 1), replace=False).tolist())} for i in range(4)}}
    _, seconds, peak = timed(lambda: window_nll(model, heldout, sets))
    n_sets = 1 + len(paper.transfer_k) * (4 * 2 + n_dist + len(paper.random_seeds) + n_dist + 1)
    stages["held-out evaluation"] = dict(measured=f"{len(sets)} sets x {args.heldout_samples} x {seq_len}", seconds=seconds,
                                         peak_memory_bytes=peak, sets_in_run=n_sets,
                                         extrapolated_seconds=seconds / len(sets) * n_sets * paper.transfer_samples / args.heldout_samples * n_dist)
    total = sum(stage["extrapolated_seconds"] for stage in stages.values())
    emit({
        "model": f"config:{args.config}", "device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "dtype": "bfloat16", "distribution": name,
        "text": "real (calibration_samples of the distribution's documents)", "model_build_seconds": build_seconds,
        "preset": {"distributions": n_dist, "subsets": n_subsets, "samples": paper.samples, "seq_len": seq_len,
                   "ablation_samples": paper.ablation_samples, "greedy_k": k, "transfer_samples": paper.transfer_samples},
        "stages": stages,
        "extrapolated_total_gpu_seconds": total,
        "extrapolated_share": {stage: round(value["extrapolated_seconds"] / total, 3) for stage, value in stages.items()},
        "not_measured": ["zero-shot accuracy (lm-evaluation-harness task data not on the device)",
                         "CPU stages: stability (1000 bootstrap / permutation draws), validity, figures, report"],
        "versions": package_versions(),
    }, args.out)


if __name__ == "__main__":
    main()
