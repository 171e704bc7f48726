"""The study on a second built-in model within about 40 minutes on 2 CPU cores.

The default preset without sub-distributions and zero-shot accuracy, and with 16 instead of 32
held-out windows per distribution (Gemma 3's 262k-token LM head makes every re-run of the
ground truth and every held-out window about twice as costly as on smollm2):

  python benchmarks/runs/second_model_run.py --model gemma3-270m --out results/run-gemma3-270m
"""

import argparse
from dataclasses import replace
from pathlib import Path

from analysis.presets import PRESETS
from analysis.pipeline import run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="gemma3-270m")
parser.add_argument("--out", default="results/run-gemma3-270m")
args = parser.parse_args()
settings = replace(PRESETS["default"], subsets=False, transfer_samples=16, tasks=(), accuracy_sets=())
summary = run(args.model, Path(args.out), preset=settings)
print(f"done in {summary['seconds']} s: {summary['report'][0]}")
