"""Paired, item-level zero-shot accuracy of attention drop sets on the default model, and the items a 3-point difference needs.

On smollm2-135m, CPU (about 1.3 s per item and drop set on 2 shared cores):

  nice -n 10 python benchmarks/accuracy/paired_accuracy.py --results results/run-default --limit 150

1. reads the attention-8 drop sets of a finished ``calibdrop run`` folder (``--results``): cosine's Borda
   consensus, the ``--own`` distribution's own cosine set and, when the run has the greedy paths, the
   robust greedy set by real loss;
2. evaluates the unpruned model and each set item by item (:func:`analysis.evaluation.accuracy.items_of_set`,
   lm-eval zero-shot, the first ``--limit`` items of each task), each set's items saved under
   ``--cache`` and reused on a rerun with the same settings;
3. :func:`analysis.evaluation.accuracy.accuracy_analysis`: which tasks the unpruned model is clearly above chance on,
   every set against the unpruned model and the consensus-vs-own / greedy-vs-consensus pairs (paired
   bootstrap CI over items, exact McNemar p, discordant counts), and per task the items needed to
   resolve a ``--delta`` difference at the observed discordance.

Writes ``--out``/accuracy-<name>-paired.csv, accuracy-<name>-paired-tasks.csv and accuracy-<name>-paired.json
(settings, provenance, the timing).  Measured here: 27 minutes for the four sets at ``--limit 150`` (300 items a set).
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from analysis.evaluation import accuracy
from analysis.models import loading as models
from analysis.importance.ablation import greedy_set
from analysis.study.dropsets import UNPRUNED, make_drop_set
from analysis.io import atomic_write_json, provenance, read_table
from analysis.presets import DEFAULT_MODEL
from analysis.stages import StageStore, stage_key

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default: %(default)s)")
parser.add_argument("--results", default="results/run-default", help="a finished run folder of that model (default: %(default)s)")
parser.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated tasks (default: %(default)s)")
parser.add_argument("--limit", type=int, default=150, help="first items of each task (default: %(default)s)")
parser.add_argument("--own", default="code", help="distribution whose own cosine set is evaluated (default: %(default)s)")
parser.add_argument("--k", type=int, default=8, help="attention drop-set size (default: %(default)s)")
parser.add_argument("--delta", type=float, default=0.03, help="accuracy difference to resolve (default: %(default)s)")
parser.add_argument("--alpha", type=float, default=0.05, help="level of every test (default: %(default)s)")
parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates over items (default: %(default)s)")
parser.add_argument("--cache", default="results/paired-accuracy", help="folder for each set's item table (default: %(default)s)")
parser.add_argument("--out", default="benchmarks/results", help="folder for the CSVs and JSON (default: %(default)s)")
parser.add_argument("--name", default="smollm2", help="model name in the output files (default: %(default)s)")
args = parser.parse_args()
tasks = tuple(args.tasks.split(","))


def attention_sets(folder: Path, k: int, own: str) -> dict:
    """The run's cosine Borda and own:``own`` attention-k sets and its robust greedy set (when present), by label."""
    table = read_table(folder / "drop_sets.parquet")
    chosen = table[(table["metric"] == "cosine") & (table["module"] == "attn") & (table["k"] == k)].set_index("drop_set")["indices"]
    sets = {UNPRUNED: None}
    for method in ("borda", f"own:{own}"):
        drop_set = make_drop_set("attn", chosen[method], method, "cosine")
        sets[drop_set.label] = drop_set
    greedy = folder / "parts" / "greedy-robust.parquet"
    if greedy.is_file():
        drop_set = make_drop_set("attn", greedy_set(read_table(greedy), k), "greedy:robust", "ablation")
        sets[drop_set.label] = drop_set
    return sets


def comparisons(sets: dict, own: str, k: int) -> list[tuple[str, str, str]]:
    """Every set against the unpruned model, consensus against the own set, robust greedy against consensus."""
    borda, own_set, greedy = f"cosine/attn-{k}:borda", f"cosine/attn-{k}:own:{own}", f"ablation/attn-{k}:greedy:robust"
    pairs = [(f"{name} vs unpruned", name, UNPRUNED) for name in sets if name != UNPRUNED]
    pairs.append((f"attn-{k}: cosine borda vs {own}'s own cosine set", borda, own_set))
    if greedy in sets:
        pairs.append((f"attn-{k}: robust greedy vs cosine borda", greedy, borda))
    return pairs


started = time.perf_counter()
sets = attention_sets(Path(args.results), args.k, args.own)
model, tokenizer = models.load_model(args.model)
record = models.model_info(model)
store = StageStore(Path(args.cache), record)
items = []
for name, drop_set in sets.items():
    key = stage_key("paired_accuracy", record.get("weights_sha256"), name, None if drop_set is None else drop_set.record(), tasks, args.limit)
    begin = time.perf_counter()
    items.append(store.table(f"items-{name.replace('/', '_').replace(':', '_')}", key,
                             lambda name=name, drop_set=drop_set: accuracy.items_of_set(model, tokenizer, name, drop_set, tasks, limit=args.limit)))
    print(f"{name}: {time.perf_counter() - begin:.0f} s", flush=True)
items = pd.concat(items, ignore_index=True)
paired, screen = accuracy.accuracy_analysis(items, comparisons(sets, args.own, args.k), task_limit=args.limit, delta=args.delta,
                                            alpha=args.alpha, n_boot=args.n_boot)
out = Path(args.out)
stem = f"accuracy-{args.name}-paired"
paired.to_csv(out / f"{stem}.csv", index=False)
screen.to_csv(out / f"{stem}-tasks.csv", index=False)
settings = {**vars(args), "sets": {name: None if s is None else s.record() for name, s in sets.items()}}
atomic_write_json(out / f"{stem}.json", {**provenance(kind="paired_accuracy", model=record, settings=settings),
                                                "seconds": round(time.perf_counter() - started), "computed": store.computed, "reused": store.reused})
with pd.option_context("display.width", 200, "display.max_columns", 30):
    print(screen.to_string(index=False))
    print(paired.to_string(index=False))
print(json.dumps({"paired": str(out / f"{stem}.csv"), "tasks": str(out / f"{stem}-tasks.csv")}))
