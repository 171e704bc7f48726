"""The validity stage with the vectorised Kendall τ-b against the per-replicate ``scipy.stats.kendalltau`` loop it replaced.

  python benchmarks/study/validity_speed.py reference/smollm2-135m \
      --out benchmarks/results/validity-speed-smollm2-reference-cpu.json

Both run :func:`analysis.study.validity.metric_validity` on the same committed per-sample scores (the reference preset's,
1000 bootstrap replicates) in one process, one after the other; the tables must be identical.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from analysis.io import package_versions, read_table
from analysis.presets import PRESETS
from analysis.study import validity


def scipy_loop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The replaced implementation: one ``scipy.stats.kendalltau`` call per bootstrap replicate."""
    return np.array([stats.kendalltau(x, y, variant="b").statistic for x, y in zip(a, b)])


def timed(scores, settings) -> tuple[float, object]:
    started = time.perf_counter()
    table = validity.metric_validity(scores, modules=tuple(settings.budgets), n_boot=settings.n_boot, seed=settings.seed)
    return time.perf_counter() - started, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    scores, settings = read_table(Path(args.results) / "scores.per_sample.parquet"), PRESETS["reference"]
    vectorised_seconds, vectorised = timed(scores, settings)
    validity.rowwise_kendall, vectorised_kendall = scipy_loop, validity.rowwise_kendall
    loop_seconds, loop = timed(scores, settings)
    validity.rowwise_kendall = vectorised_kendall
    record = {"what": "metric_validity on the reference per-sample scores, vectorised Kendall vs scipy loop, one process",
              "results": args.results, "n_boot": settings.n_boot, "rows": len(vectorised), "identical": bool(vectorised.equals(loop)),
              "seconds_scipy_loop": round(loop_seconds, 2), "seconds_vectorised": round(vectorised_seconds, 2),
              "speedup": round(loop_seconds / vectorised_seconds, 1), "versions": package_versions()}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
