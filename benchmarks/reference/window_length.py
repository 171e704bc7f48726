"""Does a paired comparison of two drop sets depend on the held-out window length, or on which windows were drawn?

A lean run and a reference can resolve the same comparison (the same two sets, by their members) in opposite
directions: gemma3-270m's default run found ``relative_update/attn-8:borda`` losing less than ``ablation/attn-8:borda``
on code (32 windows x 128 tokens), its reference the opposite (64 x 512).  This evaluates both sets, taken from a run
folder's ``pruned`` table, on one distribution's held-out text at each window length, with more windows than either
run, and pairs them as the runs do (:func:`analysis.evaluation.heldout.paired_comparisons`).  If the ratio's side
follows the length, the two runs measured different things; if both lengths agree with one run, the other's
resolved claim was a draw of its windows.

    python benchmarks/reference/window_length.py gemma3-270m benchmarks/results/lean/gemma3-270m-default \\
        relative_update/attn-8:borda ablation/attn-8:borda --distribution code \\
        --out benchmarks/results/window-length-gemma3-270m-code
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from analysis.evaluation import heldout as evaluation
from analysis.io import read_table
from analysis.models.loading import load_model
from analysis.study.selection import sets_from_table
from benchmarks.reference.results_file import write_comparison


def compare_lengths(model_spec: str, run: Path, a: str, b: str, distribution: str, windows: int, lengths, seed: int,
                    n_boot: int, batch_size: int) -> dict:
    """Per window length: both sets' perplexity ratios to the unpruned model and their paired ratio, with 95% CIs."""
    sets = sets_from_table(read_table(run / "pruned.parquet"))
    chosen = {"none": None, a: sets[a], b: sets[b]}
    model, tokenizer = load_model(model_spec)
    rows = []
    for length in lengths:
        started = time.perf_counter()
        samples = evaluation.heldout_samples(tokenizer, [distribution], n_samples=windows, seq_len=length, seed=seed)
        with torch.inference_mode():
            nll = evaluation.window_nll(model, samples, chosen, batch_size=batch_size)
        ratios = evaluation.transfer_summary(nll, n_boot=n_boot, seed=seed)
        ratios = ratios[ratios["distribution"] == distribution].set_index("drop_set")
        paired = evaluation.paired_comparisons(nll, [("a vs b", a, b)], n_boot=n_boot, seed=seed)
        pair = paired[paired["distribution"] == distribution].iloc[0]
        rows.append({"seq_len": length, "windows": int(nll["window"].nunique()),
                     "tokens_per_window": float(nll["n_tokens"].mean()),
                     **{f"ratio_{side}": [float(ratios.loc[name, c]) for c in ("ppl_ratio", "ci_low", "ci_high")]
                        for side, name in (("a", a), ("b", b))},
                     "paired": [float(pair[c]) for c in ("ratio", "ci_low", "ci_high")],
                     "seconds": round(time.perf_counter() - started, 1)})
    return {"model": model_spec, "run": str(run), "a": a, "b": b, "members": {a: sets[a].indices, b: sets[b].indices},
            "distribution": distribution, "seed": seed, "n_boot": n_boot, "lengths": rows}


def markdown(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"# {result['model']}: `{a}` against `{b}` on {result['distribution']}'s held-out text, by window length",
             "", f"Command: `{result['command']}`", "",
             f"Members: `{a}` {sorted(result['members'][a])}, `{b}` {sorted(result['members'][b])}.", "",
             "| window (tokens) | windows | ratio a [95% CI] | ratio b [95% CI] | a / b (paired) [95% CI] | loses less |",
             "|---|---|---|---|---|---|"]
    for row in result["lengths"]:
        ratio, low, high = row["paired"]
        side = "a" if high < 1 else "b" if low > 1 else "not separated"
        cells = [f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in (row["ratio_a"], row["ratio_b"], row["paired"])]
        lines.append(f"| {row['seq_len']} | {row['windows']} | {' | '.join(cells)} | {side} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("run", type=Path, help="a run folder whose pruned table holds both sets")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--distribution", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = compare_lengths(args.model, args.run, args.a, args.b, args.distribution, args.windows, args.lengths,
                             args.seed, args.n_boot, args.batch_size)
    write_comparison(args.out, result, markdown, "benchmarks/reference/window_length.py", argv or sys.argv[1:])
    print(markdown({**result, "command": ""}))


if __name__ == "__main__":
    main()
