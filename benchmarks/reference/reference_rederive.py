"""Recompute a committed reference study's table-only stages with this version's statistics, without the model.

The reference studies ran on a GPU machine; the stages that read only the per-sample score table (stability, validity,
decomposition) can be recomputed here from the committed ``scores.per_sample`` when their statistics change (basic
bootstrap intervals, the data-or-metric test), so the committed tables and report never mix two versions' rules.
The stages that need the model or the held-out windows (greedy, held-out evaluation, comparisons, set groups) are kept
as the GPU run wrote them.  Each rewritten table's sidecar says it was rederived, from what, and with which versions.

  python benchmarks/reference/reference_rederive.py reference/smollm2-135m && calibdrop report reference/smollm2-135m
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


def rederive(folder: Path) -> list[Path]:
    """Recompute :data:`REDERIVED` in ``folder`` from its ``scores.per_sample``; the rewritten tables' paths."""
    saved = json.loads((folder / "run_summary.json").read_text(encoding="utf-8"))["provenance"]
    settings = settings_from_record(saved["settings"])
    per_sample = folder / "scores.per_sample.parquet"
    study = TablesOnly(settings, {"scores.per_sample": read_table(per_sample), **saved_tables(folder, settings)})
    written = []
    for stage in (s for s in STAGES if s.name in REDERIVED):
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
    for folder in parser.parse_args().folders:
        for path in rederive(folder):
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()
