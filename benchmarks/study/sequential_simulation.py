"""How often the sequential held-out evaluation errs, and how many windows it spends, by simulation
(analysis/evaluation/sequential.py).

Windows are simulated as ``tests/test_recommend.py`` does (three distributions, a shared window difficulty, each set's
true log ratio per token with math the worst case, per set and window Student-t noise with 3 degrees of freedom:
heavy-tailed, as code's windows are), ``--noise`` per token (0.1: about the spread of smollm2-135m's worst-case
window ratios in its default run).  The rule runs exactly as the run's held-out stage does
(:func:`~analysis.evaluation.sequential.sequential_windows` with the default's looks 8, 32, 128, budget
``--budget`` set-windows per distribution, alpha 0.05, margin 2%, ``--n-boot`` resamples), reading each round's
windows from a simulated table of 128 windows.

* ``null K``: K sets of the same true loss; any *recommended* answer is wrong (acceptance: at most 5%).
* ``spread``: a best set and others 5%, 10%, 30% and 200% worse; against the fixed design on 32 windows (what
  the default evaluated before) and on 128: how often each reaches the right answer (the best *recommended*), and the
  set-windows per distribution each spends.

Each rate has its Clopper-Pearson 95% interval.  Writes a JSON file with the rates and this command.

    python benchmarks/study/sequential_simulation.py --out benchmarks/results/sequential-simulation.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from analysis.evaluation.heldout import worst_case_replicates  # noqa: E402
from analysis.evaluation.sequential import LOOKS  # noqa: E402
from analysis.io import atomic_write_json, package_versions  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402
from analysis.study import recommend  # noqa: E402

spec = importlib.util.spec_from_file_location("test_sequential", ROOT / "tests" / "test_sequential.py")
simulation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simulation)
WORST = simulation.WORST_ON_MATH


def clopper_pearson(hits: int, n: int, level: float = 0.95) -> list[float]:
    """The exact binomial interval of ``hits / n``."""
    from scipy import stats

    low = stats.beta.ppf((1 - level) / 2, hits, n - hits + 1) if hits else 0.0
    high = stats.beta.ppf((1 + level) / 2, hits + 1, n - hits) if hits < n else 1.0
    return [round(float(low), 4), round(float(high), 4)]


def truth_of(offsets) -> dict:
    """Sets ``s0, s1, ...`` whose true log ratios are the worst case's plus ``log(offset)``."""
    return {f"s{i}": tuple(x + math.log(o) for x in WORST) for i, o in enumerate(offsets)}


def one(args) -> dict:
    """One repetition: the sequential answer and its spend, and the fixed designs' answers on 32 and 128 windows."""
    offsets, seed, n_boot, noise, budget, fixed = args
    truth = truth_of(offsets)
    windows, looks, groups, _, full = simulation.run_rounds(truth, seed=seed, looks=LOOKS, n_boot=n_boot, noise=noise,
                                                            budget=budget)
    row = {"status": groups["status"].iloc[0], "best": groups["drop_set"].iloc[0],
           "spent": int(looks["spent"].iloc[-1]), "looks": len(looks)}
    sets = simulation.sets_table(list(truth))
    for n in fixed:
        worst, count = worst_case_replicates(full[full["window"] < n], n_boot=n_boot, seed=seed)
        fixed_groups = recommend.set_groups(worst, sets, n_windows=count)
        row[f"fixed_{n}"] = fixed_groups["status"].iloc[0]
        row[f"fixed_{n}_best"] = fixed_groups["drop_set"].iloc[0]
    return row


def scenario(name: str, offsets, repetitions: int, n_boot: int, noise: float, budget: int, workers: int,
             fixed=()) -> dict:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(one, [(offsets, seed, n_boot, noise, budget, fixed) for seed in range(repetitions)]))
    result = {"scenario": name, "true_ratios_to_best": list(offsets), "repetitions": repetitions,
              "seconds": round(time.perf_counter() - started, 1)}
    right = {"sequential": [(r["status"], r["best"]) for r in rows],
             **{f"fixed {n}": [(r[f"fixed_{n}"], r[f"fixed_{n}_best"]) for r in rows] for n in fixed}}
    for design, answers in right.items():
        recommended = sum(status == recommend.RECOMMENDED for status, _ in answers)
        correct = sum(status == recommend.RECOMMENDED and best == "s0" for status, best in answers)
        wrong = recommended - correct if len(set(offsets)) > 1 else recommended
        result[design] = {"recommended": recommended, "recommended_rate": round(recommended / repetitions, 4),
                          "wrong_recommendations": wrong, "wrong_rate": round(wrong / repetitions, 4),
                          "wrong_rate_ci": clopper_pearson(wrong, repetitions)}
    unique = len(offsets)
    result["sequential"]["mean_set_windows_per_distribution"] = round(sum(r["spent"] for r in rows) / repetitions, 1)
    for n in fixed:
        result[f"fixed {n}"]["set_windows_per_distribution"] = unique * n
    print(json.dumps(result), flush=True)
    return result


SCENARIOS = {  # name: (true ratios to the best, share of --repetitions, fixed designs compared)
    "null 2": ([1.0] * 2, 1, ()),
    "null 5": ([1.0] * 5, 1, ()),
    "null 18": ([1.0] * 18, 1 / 3, ()),
    "spread": ([1.0, 1.05, 1.1, 1.3, 3.0], 1 / 3, (32, 128)),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=600)
    parser.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples (the default preset's)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--budget", type=int, default=PRESETS["default"].heldout_budget,
                        help="set-windows per distribution (the default preset's heldout_budget)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sequential-simulation.json")
    args = parser.parse_args(argv)
    common = {"n_boot": args.n_boot, "noise": args.noise, "budget": args.budget, "workers": args.workers}
    runs = [scenario(name, offsets, max(round(args.repetitions * share), 1), fixed=fixed, **common)
            for name, (offsets, share, fixed) in SCENARIOS.items() if name in args.scenarios]
    atomic_write_json(args.out, {
        "what": "error rates and windows spent of analysis/evaluation/sequential.py on simulated heavy-tailed "
                "held-out windows",
        "command": "python benchmarks/study/sequential_simulation.py " + " ".join(argv or sys.argv[1:]),
        "looks": list(LOOKS), "budget": args.budget, "alpha": recommend.ALPHA, "margin": recommend.MARGIN,
        "distributions": 3,
        "n_boot": args.n_boot, "noise": f"Student t, 3 degrees of freedom, scale {args.noise} per token",
        "scenarios": runs, "versions": package_versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
