"""``calibdrop run --preset reference`` on a built-in model's real weights on one GPU, timed stage by stage.

  run:      python benchmarks/reference/reference_run.py run smollm2-135m --out RESULTS [--device cuda:0]
            [--preset default] [--matmul-precision highest] [--no-lodo]
  summary:  python benchmarks/reference/reference_run.py summary RESULTS --out reference-smollm2-135m-h200.json

``run`` runs :func:`analysis.pipeline.run` with the ``reference`` preset (or another, for a lean run to hold against
the reference), no zero-shot tasks and no figures (``calibdrop report``
draws them later from the tables, off the GPU machine).  Its ``log`` callback, ``paper_preset_run.py``'s
``EventLog`` with call ``reference``, appends each message of the run (``stage N of M: ...``,
``computing <table or part>``) with the wall clock and the peak CUDA memory allocated since the current stage
started to ``<out>/reference_events.jsonl``; ``summary`` turns that file and the run's
``run_summary.json`` into wall seconds and peak memory per stage, with the device and package versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from analysis.io import package_versions
from analysis.pipeline import run
from analysis.presets import MATMUL_PRECISIONS, PRESETS
from benchmarks.runs.paper_preset_run import STAGE_LINE, EventLog, peak_memory

EVENTS = "reference_events.jsonl"


def cmd_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = EventLog(out / EVENTS, call="reference")
    log.write(f"call started on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    settings = dataclasses.replace(PRESETS[args.preset], tasks=())  # no zero-shot data on the GPU machine
    if args.no_lodo:
        settings = dataclasses.replace(settings, lodo=False)
    if args.matmul_precision:
        settings = dataclasses.replace(settings, matmul_precision=args.matmul_precision)
    if args.batch_size:  # how many windows a pass takes: the same windows, the same results, fewer launches on a GPU
        settings = dataclasses.replace(settings, batch_size=args.batch_size, heldout_batch_size=args.batch_size)
    summary = run(args.model, out, preset=settings, dtype="float32", device=args.device, progress=False, log=log,
                  figures=False)
    log.write("run finished", peak_memory())
    print(json.dumps(summary["timings"]))


def stage_rows(events: list[dict]) -> list[dict]:
    """Per stage line of the events: seconds to the next stage line (or the last line), the peak CUDA memory in between
    and the tables and parts it computed (none: reused from the stage store)."""
    starts = [i for i, e in enumerate(events) if STAGE_LINE.match(e["message"])]
    rows = []
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(events) - 1
        inside = events[i + 1 : end + 1]
        rows.append({"stage": events[i]["stage"], "seconds": round(events[end]["time"] - events[i]["time"], 2),
                     "peak_memory_bytes": max((e["peak_memory_bytes_before"] or 0 for e in inside), default=None),
                     "computed": [e["message"].removeprefix("computing ") for e in inside if e["message"].startswith("computing ")]})
    return rows


def cmd_summary(args) -> None:
    folder = Path(args.results)
    events = [json.loads(line) for line in (folder / EVENTS).read_text().splitlines() if line.strip()]
    summary = json.loads((folder / "run_summary.json").read_text())
    record = {
        "what": f"calibdrop run --preset {args.preset} (no zero-shot tasks), real weights (float32, matmul precision "
                f"{summary['provenance']['settings'].get('matmul_precision', 'highest')}), no figures (drawn later by "
                "`calibdrop report`)",
        "model": summary["provenance"]["model"],
        "device": events[0]["message"].removeprefix("call started on "),
        "run_seconds": summary["seconds"],
        "timings": summary["timings"],
        "stages": stage_rows(events),
        "stages_computed": summary["stages_computed"],
        "stages_reused": summary["stages_reused"],
        "settings": summary["provenance"]["settings"],
        "versions": package_versions(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run (or resume) the reference preset on one model")
    go.add_argument("model")
    go.add_argument("--out", required=True)
    go.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    go.add_argument("--preset", default="reference", choices=list(PRESETS),
                    help="the preset (its zero-shot tasks dropped)")
    go.add_argument("--no-lodo", action="store_true",
                    help="without leave-one-distribution-out (resumes a run cut before it)")
    go.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS,
                    help="override the preset's matmul precision")
    go.add_argument("--batch-size", type=int,
                    help="override the preset's batch_size and heldout_batch_size (a lean preset on a GPU)")
    go.set_defaults(func=cmd_run)
    summary = sub.add_parser("summary", help="wall time and peak memory per stage from the events file")
    summary.add_argument("results")
    summary.add_argument("--preset", default="reference", choices=list(PRESETS))
    summary.add_argument("--out", required=True)
    summary.set_defaults(func=cmd_summary)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
