"""Data-parallel scoring throughput, 1 -> N GPUs, and the per-sample tables it gives.

Run once per GPU count, then compare (``benchmarks/gpus/device_scaling.sh`` does 1, 2 and 4 GPUs for
the 7B and 13B shapes in one device call)::

  A="--config llama-7b --distributions general,math --tokenizer TOKENIZER_DIR"
  CUDA_VISIBLE_DEVICES=0 python benchmarks/gpus/multi_gpu_scaling.py run $A --out R/gpu1
  torchrun --nproc_per_node 2 benchmarks/gpus/multi_gpu_scaling.py run $A --out R/gpu2
  torchrun --nproc_per_node 4 benchmarks/gpus/multi_gpu_scaling.py run $A --out R/gpu4
  python benchmarks/gpus/multi_gpu_scaling.py compare R/gpu1 R/gpu2 R/gpu4 --out R/scaling.json

(On the device the documents travel as ``$CALIBDROP_CACHE/data/documents/<name>-<key>.parquet``
with its JSON sidecar, copied from the local cache; the results name the machine.)

Each process builds the same seeded random model of a config shape on ``cuda:LOCAL_RANK``
(bf16; CPU and gloo without CUDA, for a smoke run with ``--config llama-tiny``) and scores the
same batches with :func:`analysis.score_token_batches`, which under torch.distributed gives
process r the batches r, r + W, ... and all-gathers the rows.  The batches are the paper
preset's calibration windows of real text (``--distributions`` with ``--tokenizer``:
:func:`analysis.data.samples.calibration_samples`, run in every process) or seeded random token ids.
Times, each the slowest process's, after one warm-up pass (CUDA kernels, the compiled metric kernel):

  tokenise   cutting the first distribution's windows
  compute    from the start of scoring them until this process enters the gather
  gather     ``all_gather_object`` of the per-sample sums (includes waiting for the slowest process)
  score      the ``score_token_batches`` call (compute + gather + building the table)
  library    end to end: :func:`analysis.score_distributions` on every distribution (it cuts the
             next distribution's windows while the current one is scored); ``library_gather`` its gathers

``throughput = samples x seq_len / (tokenise + score)`` for the first distribution, and
``distributions x samples x seq_len / library``; scaling is the ratio to one GPU.  The ground
truth (ablation, ``--ablation-samples`` x ``--ablation-seq-len`` of the first distribution) is
scored and timed the same way.  The saved per-sample table (library rows + ablation rows) is what
``compare`` checks against one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.<group>

from benchmarks.scoring.scoring import CONFIGS, emit  # noqa: E402

from analysis import read_table, score_distributions, score_token_batches  # noqa: E402
from analysis.data.documents import load_distribution  # noqa: E402
from analysis.data.samples import calibration_samples, token_batches  # noqa: E402
from analysis.io import package_versions, provenance, write_table  # noqa: E402


PROXIES = ("cosine", "angular", "relative_update")


class GatherClock:
    """Wraps ``torch.distributed.all_gather_object``: when this process entered it and how long it took."""

    def __init__(self):
        self.entered, self.seconds = None, 0.0
        self._original = dist.all_gather_object

    def __enter__(self):
        def timed(*args, **kwargs):
            device_sync()
            self.entered = time.perf_counter()
            value = self._original(*args, **kwargs)
            self.seconds += time.perf_counter() - self.entered
            return value

        dist.all_gather_object = timed
        return self

    def __exit__(self, *exc):
        dist.all_gather_object = self._original


def setup() -> tuple[int, int, str]:
    """Join the group that torchrun describes (NCCL on GPUs, gloo on CPU); rank, world size and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(config: str, vocab_size: int | None, device: str) -> torch.nn.Module:
    """A random bf16 model of the config's shape, the same weights in every process (seed 0)."""
    shape = dict(CONFIGS[config], **({"vocab_size": vocab_size} if vocab_size else {}))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    return model.eval()


def random_batches(n: int, seq_len: int, batch_size: int, vocab_size: int, seed: int) -> list[dict]:
    """Seeded random token batches, every token real."""
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])} for i in range(0, n, batch_size)]


def real_batches(name: str, tokenizer, n: int, seq_len: int, batch_size: int) -> list[dict]:
    """The distribution's calibration windows, cut exactly as ``score_distributions`` cuts them."""
    samples = calibration_samples(load_distribution(name), tokenizer, n_samples=n, seq_len=seq_len, seed=0)
    return list(token_batches(samples, batch_size))


def synced() -> float:
    """Wall time after every queued kernel and every process has reached this point."""
    device_sync()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter()


def timed_score(model, makers: dict, metrics) -> tuple[pd.DataFrame, dict]:
    """Rows of ``score_token_batches`` for each batch maker, one after another (as ``score_distributions``
    did before it overlapped tokenising and scoring), and this process's tokenise/compute/gather/score seconds."""
    times = dict.fromkeys(("tokenise", "score", "compute", "gather"), 0.0)
    parts = []
    for name, make_batches in makers.items():
        start = synced()
        batches = make_batches()
        tokenised = synced()
        with GatherClock() as clock:
            parts.append(score_token_batches(model, batches, metrics=metrics, progress=False).assign(distribution=name))
            end = synced()
        times["tokenise"] += tokenised - start
        times["score"] += end - tokenised
        times["compute"] += (clock.entered or end) - tokenised
        times["gather"] += clock.seconds
    return pd.concat(parts, ignore_index=True), times


def timed_library(model, tokenizer, names, args, metrics) -> tuple[pd.DataFrame, float]:
    """Rows of :func:`analysis.score_distributions` (no stage store: nothing is read from or written to disk) and its seconds."""
    start = synced()
    rows = score_distributions(model, tokenizer, names, n_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                               metrics=metrics, progress=False)
    return rows, synced() - start


def slowest(times: dict) -> dict:
    """Each timing's maximum over processes."""
    if not dist.is_initialized():
        return times
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, times)
    return {key: max(t[key] for t in every) for key in times}


def cmd_run(args) -> None:
    rank, world, device = setup()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    model = build(args.config, len(tokenizer) if tokenizer else None, device)
    vocab = model.config.vocab_size

    names = args.distributions.split(",") if args.distributions else ["random"]

    def makers(n, seq_len, seed, batch_size=args.batch_size, chosen=names[:1]):
        if args.distributions:
            return {name: (lambda name=name: real_batches(name, tokenizer, n, seq_len, batch_size)) for name in chosen}
        return {"random": lambda: random_batches(n, seq_len, batch_size, vocab, seed)}

    timed_score(model, makers(world * args.batch_size, args.seq_len, 1), PROXIES)
    proxies, proxy_times = timed_score(model, makers(args.samples, args.seq_len, 0), PROXIES)
    truth, truth_times = timed_score(model, makers(args.ablation_samples, args.ablation_seq_len, 2, args.ablation_batch_size), ("ablation",))
    if args.distributions:
        with GatherClock() as clock:
            library, library_seconds = timed_library(model, tokenizer, names, args, PROXIES)
        proxy_times.update(library=library_seconds, library_gather=clock.seconds)
        same_as_library = library[library["distribution"] == names[0]].reset_index(drop=True).equals(proxies)
        proxies = library
    peak = torch.cuda.max_memory_allocated() if device != "cpu" else None
    proxy_times, truth_times = slowest(proxy_times), slowest(truth_times)
    if rank != 0:
        dist.destroy_process_group()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {"config": args.config, "processes": world, "device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "dtype": "bfloat16",
               "text": f"{args.distributions} (real, calibration_samples)" if args.distributions else "random token ids",
               "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "ablation_samples": args.ablation_samples, "ablation_seq_len": args.ablation_seq_len, "ablation_batch_size": args.ablation_batch_size}
    write_table(pd.concat([proxies, truth], ignore_index=True), out / "per_sample.parquet", provenance(kind="scaling-per-sample", settings=setting))
    tokens = args.samples * args.seq_len
    result = {**setting, "seconds": proxy_times, "ablation_seconds": truth_times,
              "tokens_per_second": tokens / (proxy_times["tokenise"] + proxy_times["score"]),
              "tokens_per_second_scoring_only": tokens / proxy_times["score"],
              "tokens_per_second_library": len(names) * tokens / proxy_times["library"] if args.distributions else None,
              "library_table_equals_serial": same_as_library if args.distributions else None,
              "peak_memory_bytes_rank0": peak, "versions": package_versions()}
    emit(result, str(out / "timing.json"))
    if dist.is_initialized():
        dist.destroy_process_group()


def cmd_compare(args) -> None:
    runs = [json.loads((Path(folder) / "timing.json").read_text()) for folder in args.runs]
    tables = [read_table(Path(folder) / "per_sample.parquet") for folder in args.runs]
    base, base_table = runs[0], tables[0]
    rows = []
    for run, table in zip(runs, tables):
        same_shape = table.shape == base_table.shape and table[["metric", "sample", "layer", "module"]].equals(base_table[["metric", "sample", "layer", "module"]])
        difference = np.abs(table["stat_sum"].to_numpy() - base_table["stat_sum"].to_numpy()) if same_shape else np.array([np.inf])
        rows.append({
            "processes": run["processes"],
            "seconds": run["seconds"],
            "ablation_seconds": run["ablation_seconds"],
            "tokens_per_second": run["tokens_per_second"],
            "speedup": run["tokens_per_second"] / base["tokens_per_second"],
            "speedup_scoring_only": run["tokens_per_second_scoring_only"] / base["tokens_per_second_scoring_only"],
            "tokens_per_second_library": run["tokens_per_second_library"],
            "speedup_library": run["tokens_per_second_library"] / base["tokens_per_second_library"] if base["tokens_per_second_library"] else None,
            "library_table_equals_serial": run["library_table_equals_serial"],
            "speedup_ablation": base["ablation_seconds"]["score"] / run["ablation_seconds"]["score"],
            "table_rows": len(table),
            "same_rows_as_one_gpu": bool(same_shape),
            "max_abs_stat_sum_difference": float(difference.max()),
            "bitwise_identical": bool(same_shape and table.equals(base_table)),
        })
    keep = ("config", "device", "dtype", "text", "samples", "seq_len", "batch_size", "ablation_samples", "ablation_seq_len", "versions")
    emit({**{key: base[key] for key in keep}, "runs": rows}, args.out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="score under this process group and save the table and times")
    run.add_argument("--config", choices=sorted(CONFIGS), default="llama-7b")
    run.add_argument("--samples", type=int, default=256)
    run.add_argument("--seq-len", type=int, default=2048)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--ablation-samples", type=int, default=16)
    run.add_argument("--ablation-seq-len", type=int, default=512)
    run.add_argument("--ablation-batch-size", type=int, default=4, help="4: 16 ablation windows make one batch per process on 4 GPUs")
    run.add_argument("--distributions", help="comma-separated: score their real calibration text (needs --tokenizer)")
    run.add_argument("--tokenizer", help="tokenizer folder; the model's vocabulary is sized to it")
    run.add_argument("--out", required=True)
    run.set_defaults(func=cmd_run)
    compare = sub.add_parser("compare", help="speedups and table differences against the first run")
    compare.add_argument("runs", nargs="+")
    compare.add_argument("--out")
    compare.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    if args.command == "run" and bool(args.distributions) != bool(args.tokenizer):
        parser.error("--distributions and --tokenizer go together")
    args.func(args)


if __name__ == "__main__":
    main()
