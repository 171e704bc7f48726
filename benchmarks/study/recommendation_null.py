"""How often the recommendation rule errs, by simulation (analysis/study/recommend.py).

Held-out windows are simulated as ``tests/test_recommend.py`` does: three distributions of ``--windows`` windows, a
shared window difficulty, each set's true log ratio per token (math the worst case) and per set and window Student-t
noise with 3 degrees of freedom (heavy-tailed, as code's windows are).  Each scenario is repeated ``--repetitions``
times with a fresh seed, and the rule runs as the run's resolution stage does (``worst_case_replicates`` then
``set_groups``, ``--n-boot`` paired resamples, alpha 0.05, margin 2%):

* ``null K``: K sets of the same true loss; any *recommended* answer is wrong (the issue's acceptance: at most 5%).
* ``null K, uncorrected``: the same with the one-sided level alpha instead of alpha / K (what the correction buys).
* ``beyond margin``: two sets, the second truly 3% worse; an *equivalent group* answer is wrong.
* ``equal and quiet``: three sets of the same loss with little noise; the rate of *equivalent group* answers is the
  rule's power to find them.

Each rate comes with its Clopper-Pearson 95% interval.  Writes a JSON file with the rates and this command.

    python benchmarks/study/recommendation_null.py --out benchmarks/results/recommendation-null-simulation.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.io import atomic_write_json, package_versions  # noqa: E402
from analysis.study import recommend  # noqa: E402

spec = importlib.util.spec_from_file_location("test_recommend", ROOT / "tests" / "test_recommend.py")
simulation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simulation)


def clopper_pearson(hits: int, n: int, level: float = 0.95) -> list[float]:
    """The exact binomial interval of ``hits / n``."""
    low = stats.beta.ppf((1 - level) / 2, hits, n - hits + 1) if hits else 0.0
    high = stats.beta.ppf((1 + level) / 2, hits + 1, n - hits) if hits < n else 1.0
    return [round(float(low), 4), round(float(high), 4)]


def scenario(name: str, truth: dict, wrong: str, repetitions: int, n_boot: int, windows: int, **options) -> dict:
    """The rate of answer ``wrong`` over ``repetitions`` simulated runs of one scenario."""
    started = time.perf_counter()
    statuses = simulation.answers(truth, repetitions, n_boot=n_boot, n=windows, **options)
    hits = statuses.count(wrong)
    print(f"{name}: {wrong} in {hits} of {repetitions} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"scenario": name, "sets": len(truth), "answer_counted": wrong, "rate": round(hits / repetitions, 4),
            "ci": clopper_pearson(hits, repetitions), "hits": hits, "repetitions": repetitions,
            "options": {key: value for key, value in options.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=1000)
    parser.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples (the default preset's)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows per distribution (the default's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "recommendation-null-simulation.json")
    args = parser.parse_args(argv)
    worst = simulation.WORST_ON_MATH
    runs = [scenario(f"null {k}", {f"s{i}": worst for i in range(k)}, recommend.RECOMMENDED, args.repetitions,
                     args.n_boot, args.windows) for k in (2, 5, 10, 20)]
    runs.append(scenario("null 2, uncorrected", {"a": worst, "b": worst}, recommend.RECOMMENDED, args.repetitions,
                         args.n_boot, args.windows, alpha=0.05 * 2))
    worse = tuple(x + math.log(1.03) for x in worst)
    runs.append(scenario("beyond margin (3% worse)", {"a": worst, "b": worse}, recommend.EQUIVALENT,
                         args.repetitions, args.n_boot, args.windows, noise=0.12))
    runs.append(scenario("equal and quiet", {"a": worst, "b": worst, "c": worst}, recommend.EQUIVALENT,
                         args.repetitions // 4, args.n_boot, args.windows, noise=0.01))
    atomic_write_json(args.out, {
        "what": "rates of wrong answers of analysis/study/recommend.py on simulated heavy-tailed held-out windows",
        "command": "python benchmarks/study/recommendation_null.py " + " ".join(argv or sys.argv[1:]),
        "alpha": recommend.ALPHA, "margin": recommend.MARGIN, "windows_per_distribution": args.windows,
        "distributions": 3, "n_boot": args.n_boot, "noise": "Student t, 3 degrees of freedom, scale 0.05 per token "
        "unless the scenario says otherwise", "scenarios": runs, "versions": package_versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
