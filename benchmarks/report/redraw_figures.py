"""Redraw a finished run's figures from its saved tables, without re-running the study.

    python benchmarks/report/redraw_figures.py [RUN_FOLDER] [--out FOLDER]

Reads the tables the pipeline wrote (analysis.io.read_table) and calls the pipeline's own
figure step, so the figures match what ``calibdrop run`` would draw from the same tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analysis.io import read_table
from analysis.pipeline import STABILITY_TABLES, draw_figures

OPTIONAL_TABLES = ("validity", "decomposition", "regret", "leave_one_out", "transfer")


def load_tables(run: Path) -> dict:
    """Every table ``draw_figures`` reads that the run folder has."""
    return {name: read_table(run / f"{name}.parquet") for name in (*STABILITY_TABLES, *OPTIONAL_TABLES)
            if (run / f"{name}.parquet").exists()}


def largest_budget(run: Path) -> int:
    """The largest drop-set size of the run's settings (the ``k`` the pipeline passes to the figures)."""
    settings = json.loads((run / "run_summary.json").read_text(encoding="utf-8"))["provenance"]["settings"]
    return max(k for values in settings["budgets"].values() for k in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="results/run-default", help="run folder (default: %(default)s)")
    parser.add_argument("--out", default="/tmp/figs", help="folder for the figures (default: %(default)s)")
    args = parser.parse_args()
    run = Path(args.run)
    started = time.perf_counter()
    written = draw_figures(read_table(run / "scores.per_sample.parquet"), load_tables(run), Path(args.out), largest_budget(run))
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
