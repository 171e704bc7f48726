"""A run's pick against a reference's best, by their members, on the same held-out windows.

A run (for example the default preset on a CPU) picks, per module kind and budget, the set of lowest worst-case
held-out perplexity ratio among its own candidates.  The reference study of the same model may have found a better
set that the run never built.  This script evaluates both member sets, and the unpruned model, on the first
``--windows`` held-out windows of every calibration distribution of the run, windows of ``--seq-len`` tokens cut as
the pipeline cuts them (:func:`analysis.evaluation.heldout.heldout_samples`, seed 0: with the reference's length and
count these are the reference's own windows), and pairs them: the worst-case ratio of each set over the distributions
and the paired ratio reference's best / pick with its 95% percentile interval from a paired bootstrap over windows
(:func:`analysis.evaluation.heldout.replicates_of`, 1000 replicates).  The pick lies within the margin when that
interval lies inside ``[1/(1+margin), 1+margin]``; it is worse beyond the margin when the interval lies below
``1/(1+margin)``.

  OMP_NUM_THREADS=2 python benchmarks/reference/pick_vs_reference_best.py /tmp/run reference/smollm2-135m \\
      --module joint --k 8 --windows 64 --seq-len 512 --pick cosine/joint-8:borda
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.evaluation import heldout as ev  # noqa: E402
from analysis.io import read_table  # noqa: E402
from analysis.models.loading import load_model  # noqa: E402
from analysis.study.dropsets import UNPRUNED  # noqa: E402
from analysis.study.selection import sets_from_table  # noqa: E402
from benchmarks.reference.results_file import write_comparison  # noqa: E402


def best_of(folder: Path, module: str, k: int) -> str:
    """The rank-1 set of ``module`` and ``k`` in a folder's ``set_groups`` table."""
    groups = read_table(folder / "set_groups.parquet")
    return str(groups[(groups["module"] == module) & (groups["k"] == k) & (groups["rank"] == 1)]["drop_set"].iloc[0])


def members(spec) -> list[str]:
    return sorted(f"{kind}:{layer}" for kind, layer in ev.removed_modules(spec))


def compare(run: Path, reference: Path, module: str, k: int, windows: int, seq_len: int, margin: float,
            pick: str | None, model_spec: str) -> dict:
    run_sets, ref_sets = sets_from_table(read_table(run / "pruned.parquet")), sets_from_table(
        read_table(reference / "pruned.parquet"))
    pick = pick or best_of(run, module, k)
    ref_best = best_of(reference, module, k)
    distributions = sorted(read_table(run / "heldout_windows.parquet")["distribution"].unique())
    model, tokenizer = load_model(model_spec)
    samples = ev.heldout_samples(tokenizer, distributions, n_samples=windows, seq_len=seq_len, seed=0)
    sets = {UNPRUNED: None, f"run:{pick}": run_sets[pick], f"reference:{ref_best}": ref_sets[ref_best]}
    started = time.perf_counter()
    table = ev.window_nll(model, samples, sets, batch_size=4)
    seconds = time.perf_counter() - started
    replicates, n = ev.replicates_of(table, n_boot=1000, seed=0)([f"run:{pick}", f"reference:{ref_best}"])
    ratio = replicates[f"reference:{ref_best}"] - replicates[f"run:{pick}"]
    low, high = np.exp(np.percentile(ratio.iloc[1:], [2.5, 97.5]))
    within = 1 / (1 + margin) < low and high < 1 + margin
    worse = high < 1 / (1 + margin)
    return {"model": model_spec, "run": str(run), "reference": str(reference), "module": module, "k": k,
            "windows_per_distribution": int(n), "seq_len": seq_len, "distributions": distributions,
            "pick": pick, "pick_members": members(run_sets[pick]),
            "reference_best": ref_best, "reference_best_members": members(ref_sets[ref_best]),
            "worst_case_ratio": {"pick": math.exp(replicates[f"run:{pick}"].iloc[0]),
                                 "reference_best": math.exp(replicates[f"reference:{ref_best}"].iloc[0])},
            "reference_best_over_pick": float(math.exp(ratio.iloc[0])), "ci95": [float(low), float(high)],
            "margin": margin,
            "verdict": ("within the margin" if within else
                        f"the pick loses more than {margin:.0%}" if worse else "not decided at the margin"),
            "seconds": round(seconds, 1), "device": "cpu", "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}


def markdown(result: dict) -> str:
    low, high = result["ci95"]
    return "\n".join([
        f"# {result['model']}, {result['module']}-{result['k']}: the run's pick against the reference's best", "",
        f"Command: `{result['command']}`", "",
        f"{result['windows_per_distribution']} held-out windows x {result['seq_len']} tokens per distribution "
        f"({', '.join(result['distributions'])}), both sets evaluated here ({result['device']}).", "",
        "| set | members | worst-case ppl ratio |", "|---|---|---|",
        f"| run's pick {result['pick']} | {', '.join(result['pick_members'])} | "
        f"{result['worst_case_ratio']['pick']:.3f} |",
        f"| reference's best {result['reference_best']} | {', '.join(result['reference_best_members'])} | "
        f"{result['worst_case_ratio']['reference_best']:.3f} |", "",
        f"Reference's best / pick: {result['reference_best_over_pick']:.3f} [{low:.3f}, {high:.3f}] "
        f"(paired bootstrap over windows, 95%): {result['verdict']} ({result['margin']:.0%}).", ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--module", required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--model", default="smollm2-135m", help="the model both folders studied")
    parser.add_argument("--pick", help="the run's set to judge (default: its rank-1 set)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    result = compare(args.run, args.reference, args.module, args.k, args.windows, args.seq_len, args.margin,
                     args.pick, args.model)
    written = write_comparison(args.out, result, markdown, "benchmarks/reference/pick_vs_reference_best.py",
                               list(argv if argv is not None else sys.argv[1:]))
    print(markdown(written))


if __name__ == "__main__":
    main()
