"""``calibdrop run --preset paper`` for real on a config-built 7B shape, one GPU, resumable across device calls.

A device call lasts at most 10 minutes, so the run is spread over several calls: each call
rebuilds the same checkpoint, runs :func:`analysis.pipeline.run` on the results folder that the
last call left (its :class:`~analysis.stages.StageStore` reuses every saved stage and part) and
is stopped by ``timeout`` before the call's limit; the results folder travels between calls as
one tar file.  Per call this script appends to ``<out>/paper_preset_events.jsonl`` one line per
log message of the run (``stage N of M: ...``, ``computing <table or part>``) with the wall
clock and the peak CUDA memory allocated since the current stage started; ``summary`` turns the lines of every call into wall time and peak memory per stage.

  build + run:  python benchmarks/runs/paper_preset_run.py run --config llama-7b --tokenizer TOKENIZER_DIR \\
                    --checkpoint /tmp/llama7b --out RESULTS [--no-tasks]
  summary:      python benchmarks/runs/paper_preset_run.py summary RESULTS --out R.json

The checkpoint is the seeded random model of :func:`multi_gpu_scaling.build` (bf16, vocabulary
sized to the tokenizer, which is saved beside it), so every call writes the same files and the
run's model checksum, and with it every stage key, stays the same.  ``--no-tasks`` leaves out the
zero-shot accuracy stage (lm-evaluation-harness needs its task data, which is not on the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from benchmarks.gpus.multi_gpu_scaling import build  # noqa: E402
from benchmarks.scoring.scoring import CONFIGS, emit  # noqa: E402

from analysis.io import package_versions  # noqa: E402
from analysis.pipeline import run  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402

EVENTS = "paper_preset_events.jsonl"
STAGE_LINE = re.compile(r"stage (\d+) of (\d+): (\S+)")


def save_checkpoint(config: str, tokenizer_dir: str, folder: Path, device: str) -> dict:
    """Build the seeded bf16 model of ``config`` on ``device`` and ``save_pretrained`` it with the tokenizer; seconds taken."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build(config, len(tokenizer), device)
    built = time.perf_counter()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"build_seconds": built - started, "save_seconds": time.perf_counter() - built}


def peak_memory() -> int | None:
    """CUDA ``max_memory_allocated`` since the last reset (None without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


class EventLog:
    """The run's ``log`` callback: prints each message and appends it, timed, to the events file; a ``stage`` line
    resets the CUDA peak-memory counter after recording the peak of the stage before."""

    def __init__(self, path: Path, call: str):
        self.path, self.call = path, call
        self.stage = None

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        peak = peak_memory()
        match = STAGE_LINE.match(message)
        if match:
            self.stage = match.group(3)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        self.write(message, peak)

    def write(self, message: str, peak: int | None = None) -> None:
        record = {"call": self.call, "time": time.time(), "stage": self.stage, "message": message, "peak_memory_bytes_before": peak}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def cmd_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = EventLog(out / EVENTS, args.call)
    log.write(f"call started on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    folder = Path(args.checkpoint)
    if not (folder / "config.json").is_file():
        timing = save_checkpoint(args.config, args.tokenizer, folder, "cuda:0" if torch.cuda.is_available() else "cpu")
        log.write(f"checkpoint built in {timing['build_seconds']:.1f} s, saved in {timing['save_seconds']:.1f} s")
    settings = dataclasses.replace(PRESETS[args.preset], tasks=()) if args.no_tasks else PRESETS[args.preset]
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    summary = run(str(folder), out, preset=settings, dtype="bfloat16", device=device, progress=False, log=log)
    log.write("run finished", peak_memory())
    emit(summary, None)


def stage_table(events: list[dict]) -> list[dict]:
    """Per call and stage: seconds from its ``stage`` line to the call's next line that starts a stage (or its last
    line: ``run finished``, or the timeout's ``stopped``), the peak CUDA memory in between, the tables and parts it
    computed (each saved when the next line was written; the last of a stopped stage was not saved), and whether it finished."""
    rows = []
    for call in dict.fromkeys(e["call"] for e in events):
        mine = [e for e in events if e["call"] == call]
        starts = [i for i, e in enumerate(mine) if STAGE_LINE.match(e["message"])]
        if starts:
            rows.append({"call": call, "stage": "start-up (checkpoint, load model)", "seconds": mine[starts[0]]["time"] - mine[0]["time"],
                         "peak_memory_bytes": None, "computed": [], "finished": True})
        for n, i in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(mine) - 1
            inside = mine[i + 1 : end + 1]
            rows.append({
                "call": call, "stage": mine[i]["stage"], "seconds": mine[end]["time"] - mine[i]["time"],
                "peak_memory_bytes": max((e["peak_memory_bytes_before"] or 0 for e in inside), default=None),
                "computed": [e["message"].removeprefix("computing ") for e in inside if e["message"].startswith("computing ")],
                "finished": n + 1 < len(starts) or mine[end]["message"] == "run finished",
            })
    return rows


def cmd_summary(args) -> None:
    events = [json.loads(line) for line in (Path(args.results) / EVENTS).read_text().splitlines() if line.strip()]
    emit({"events": len(events), "calls": list(dict.fromkeys(e["call"] for e in events)), "stages": stage_table(events),
          "versions": package_versions()}, args.out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="build the checkpoint if missing, then run (or resume) the paper preset")
    go.add_argument("--config", choices=sorted(CONFIGS), default="llama-7b")
    go.add_argument("--tokenizer", required=True)
    go.add_argument("--checkpoint", required=True, help="folder for the config-built checkpoint (reused when it has a config.json)")
    go.add_argument("--out", required=True, help="the run's results folder (resumed when it holds saved stages)")
    go.add_argument("--call", default=time.strftime("%H:%M:%S"), help="label of this call in the events file")
    go.add_argument("--no-tasks", action="store_true", help="leave out zero-shot accuracy")
    go.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="paper (quick: a smoke test of this script)")
    go.set_defaults(func=cmd_run)
    summary = sub.add_parser("summary", help="wall time and peak memory per stage and call, from the events file")
    summary.add_argument("results")
    summary.add_argument("--out")
    summary.set_defaults(func=cmd_summary)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
