"""A real ``calibdrop run --preset P`` on the CPU, timed stage by stage from the run's own log and summary.

Runs ``python -m analysis run --model MODEL --preset P --out OUT`` in a fresh process (into a fresh folder, so
every stage is computed, none reused), stamps each line the run prints (``stage N of M: NAME``, ``computing ...``)
with the wall clock as it arrives, and afterwards reads the run's ``run_summary.json``: its ``timings`` are the
run's own seconds per stage (``load model``, every stage of :data:`analysis.pipeline.STAGES` that ran, ``figures``).
Writes ``benchmarks/results/preset-run-<preset>-<model>-cpu.json`` with both, the preset's settings, the
machine (CPU count, ``OMP_NUM_THREADS``, load average before and after: a loaded machine stretches wall time)
and the package versions.  The test suite runs only the ``smoke`` preset (tests/test_cli.py); the quick,
default and reference presets are measured here.

  python benchmarks/runs/preset_runs.py quick [--model smollm2-135m] [--out /tmp/preset-run-quick]

Two commits side by side (a worktree of the older one, each run on one thread, at the same time):

  git worktree add /tmp/old OLD_COMMIT
  OMP_NUM_THREADS=1 python benchmarks/runs/preset_runs.py default --source /tmp/old --out /tmp/run-old \
      --name preset-run-default-smollm2-135m-cpu-old.json &
  OMP_NUM_THREADS=1 python benchmarks/runs/preset_runs.py default --out /tmp/run-new \
      --name preset-run-default-smollm2-135m-cpu-new.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.io import package_versions  # noqa: E402
from analysis.presets import DEFAULT_MODEL, PRESETS  # noqa: E402

STAGE_LINE = re.compile(r"stage (\d+) of (\d+): (\S+)")


def timed_lines(command: list[str], env: dict, cwd: Path = ROOT) -> tuple[int, list[dict]]:
    """Run ``command`` in ``cwd``, echo its output and return its exit code and every line with seconds since the
    start."""
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                          env=env) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append({"seconds": round(time.perf_counter() - started, 2), "line": line.rstrip("\n")})
    return process.returncode, lines


def stage_walls(lines: list[dict], end: float) -> dict[str, float]:
    """Wall seconds per stage: from its ``stage N of M`` line to the next one (the last to ``end``: figures and report too)."""
    starts = [(m.group(3), line["seconds"]) for line in lines if (m := STAGE_LINE.match(line["line"]))]
    bounds = [t for _, t in starts[1:]] + [end]
    return {name: round(stop - start, 1) for (name, start), stop in zip(starts, bounds)}


def machine() -> dict:
    """What bounds the timings: CPUs, thread settings and the load average now."""
    return {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=list(PRESETS))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", help="the run's folder (default: /tmp/preset-run-PRESET); emptied first")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the results JSON")
    parser.add_argument("--source", default=str(ROOT),
                        help="the checkout whose calibdrop runs (default this one): another commit's worktree, to time "
                             "two commits side by side")
    parser.add_argument("--name", help="the results file's name (default preset-run-PRESET-MODEL-cpu.json)")
    args = parser.parse_args(argv)
    source = Path(args.source).resolve()
    out = Path(args.out or f"/tmp/preset-run-{args.preset}")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "analysis", "run", "--model", args.model, "--preset", args.preset, "--out", str(out)]
    before = machine()
    started = time.perf_counter()
    code, lines = timed_lines(command, {**os.environ, "PYTHONPATH": str(source)}, source)
    wall = round(time.perf_counter() - started, 1)
    if code != 0:
        print(f"preset_runs: the run exited with {code}; nothing written", file=sys.stderr)
        return 1
    summary = json.loads((out / "run_summary.json").read_text())
    result = {
        "preset": args.preset,
        "model": args.model,
        "device": "cpu",
        "command": " ".join(["python -m analysis run", "--model", args.model, "--preset", args.preset, "--out", str(out)]),
        "source_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                                        text=True).stdout.strip(),
        "settings": summary.get("provenance", {}).get("settings") or dataclasses.asdict(PRESETS[args.preset]),
        "machine_before": before,
        "machine_after": machine(),
        "wall_seconds": wall,
        "run_seconds": summary["seconds"],
        "stage_seconds": summary["timings"],
        "stage_wall_seconds_from_log": stage_walls(lines, wall),
        "stages_reused": summary["stages_reused"],
        "figures": summary["figures"],
        "packages": package_versions(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    name = args.name or f"preset-run-{args.preset}-{args.model.replace('/', '--')}-cpu.json"
    target = Path(args.results) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}: {wall / 60:.1f} min wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
