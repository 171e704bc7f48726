"""Recompute a committed reference study's table-only stages with this version's statistics, without the model.

The reference studies ran on a GPU machine; the stages that read only the per-sample score table (stability, validity,
decomposition) can be recomputed here from the committed ``scores.per_sample`` when their statistics change (basic
bootstrap intervals, the data-or-metric test), so the committed tables and report never mix two versions' rules.
The stages that need the model (greedy, held-out evaluation) are kept as the GPU run wrote them; the resolution stage
(set groups and claims) reads only tables, and is recomputed with ``--stages resolution`` where the folder keeps its
per-window held-out table (``heldout_windows``).  Each rewritten table's sidecar says it was rederived, from what, and
with which versions.

  python benchmarks/reference/reference_rederive.py reference/smollm2-135m && calibdrop report reference/smollm2-135m
  python benchmarks/reference/reference_rederive.py RUN --stages resolution
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.io import provenance, read_table, sha256_file, write_table
from analysis.pipeline import STAGES, saved_tables, settings_from_record

REDERIVED = ("stability", "validity", "decomposition")


class TablesOnly:
    """What a table-only stage reads of a study: its settings and earlier results."""

    def __init__(self, settings, results: dict):
        self.settings, self.results, self.progress = settings, results, False


def rederive(folder: Path, stages=REDERIVED) -> list[Path]:
    """Recompute ``stages`` (default :data:`REDERIVED`) in ``folder`` from its saved tables; the rewritten tables'
    paths."""
    saved = json.loads((folder / "run_summary.json").read_text(encoding="utf-8"))["provenance"]
    settings = settings_from_record(saved["settings"])
    per_sample = folder / "scores.per_sample.parquet"
    windows = {"heldout_windows": read_table(folder / "heldout_windows.parquet")} if "resolution" in stages else {}
    study = TablesOnly(settings, {"scores.per_sample": read_table(per_sample), **saved_tables(folder, settings),
                                  **windows})
    written = []
    for stage in (s for s in STAGES if s.name in stages):
        value = stage.compute(study)
        tables = value if isinstance(value, dict) else {stage.name: value}
        study.results.update(tables)
        record = provenance(kind="rederived", stage=stage.name, model=saved["model"], settings=saved["settings"],
                            source={"table": per_sample.name, "sha256": sha256_file(per_sample)})
        written += [write_table(frame, folder / f"{name}.parquet", record) for name, frame in tables.items()]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="reference/<model> folders")
    parser.add_argument("--stages", default=",".join(REDERIVED),
                        help=f"table-only stages to recompute (default {','.join(REDERIVED)}; also: resolution)")
    args = parser.parse_args()
    for folder in args.folders:
        for path in rederive(folder, tuple(args.stages.split(","))):
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()
