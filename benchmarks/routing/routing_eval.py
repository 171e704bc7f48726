"""Routed vs static drop sets on a held-out mix of every distribution, and two real `calibdrop check` examples.

On the default model (smollm2-135m), CPU, about 15 minutes on 2 free cores:

  nice -n 10 python benchmarks/routing/routing_eval.py --out results/routing

1. scores the five distributions (cosine, ``--samples`` × ``--seq-len`` calibration windows; cached);
2. :func:`analysis.evaluation.routing.evaluate_routing` at ``--module``-``--k``: each distribution's own set, the
   ``--consensus`` sets, the router (trained on the same calibration windows) and the
   oracle, on ``--heldout-samples`` × ``--heldout-seq-len`` held-out windows per distribution;
3. writes the own-general drop set as JSON (pointing to the per-sample scores) and, as JSONL, the first
   tokens of held-out ``code`` and ``general`` documents and ``--seq-len``-token windows of held-out
   ``general`` documents (decoded), and checks the drop set against each with
   :func:`analysis.evaluation.check.check` (``calibdrop check`` gives the same answer on those files).

Tables go to ``--out`` (Parquet + JSON sidecars); ``summary.json`` holds the printed numbers.
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis.models import loading as models
from analysis.data.documents import load_distribution
from analysis.data.manifests import top_level
from analysis.presets import DEFAULT_MODEL
from analysis.evaluation.check import check, drop_set_record
from analysis.evaluation.heldout import heldout_samples
from analysis.io import atomic_write_json, provenance, write_table
from analysis.evaluation.routing import evaluate_routing
from analysis.importance.scoring import score_distributions

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default: %(default)s)")
parser.add_argument("--out", default="results/routing", help="output folder (default: %(default)s)")
parser.add_argument("--module", default="attn", help="module kind of the drop sets (default: %(default)s)")
parser.add_argument("--k", type=int, default=8, help="drop-set size (default: %(default)s)")
parser.add_argument("--samples", type=int, default=32, help="calibration windows per distribution (default: %(default)s)")
parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
parser.add_argument("--consensus", default="borda", help="consensus methods, comma-separated (default: %(default)s)")
parser.add_argument("--heldout-samples", type=int, default=16, help="held-out windows per distribution (default: %(default)s)")
parser.add_argument("--heldout-seq-len", type=int, default=256, help="tokens per held-out window (default: %(default)s)")
parser.add_argument("--classifier", default="centroid", help="router classifier: centroid or logistic (default: %(default)s)")
parser.add_argument("--check-texts", type=int, default=24, help="held-out texts per check example (default: %(default)s)")
parser.add_argument("--loss-samples", type=int, default=8, help="texts of each check example whose real loss is measured (default: %(default)s)")
args = parser.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
model, tokenizer = models.load_model(args.model)
names = list(top_level())
scores = score_distributions(model, tokenizer, names, n_samples=args.samples, seq_len=args.seq_len, metrics=("cosine",), progress=False)
record = provenance(kind="routing-evaluation", model=models.model_info(model), settings=vars(args))
write_table(scores.assign(model=args.model), out / "scores.per_sample.parquet", {**record, "kind": "scores-per-sample"})

tables = evaluate_routing(model, tokenizer, scores, module=args.module, k=args.k, classifier=args.classifier,
                          consensus_methods=tuple(args.consensus.split(",")),
                          calibration_samples=args.samples, calibration_seq_len=args.seq_len, heldout_samples=args.heldout_samples,
                          heldout_seq_len=args.heldout_seq_len, progress=True)
for name, table in tables.items():
    write_table(table, out / f"routing_{name}.parquet", record)

summary = tables["summary"]
show = summary[summary["distribution"].isin(["mix", "mean", "worst"])]
pd.set_option("display.width", 200)
print(show.pivot_table(index="method", columns="distribution", values=["ppl_ratio", "ci_low", "ci_high"], sort=False).round(4).to_string())
print(tables["paired"][tables["paired"]["distribution"].isin(["mix", "worst", "mean"])].round(4).to_string(index=False))
print(tables["accuracy"].round(3).to_string(index=False))
print(pd.crosstab(tables["routes"]["distribution"], tables["routes"]["route"]).to_string())
print(tables["cost"].round(4).to_string(index=False))

drop_set = {**drop_set_record(scores, module=args.module, k=args.k, method="own:general", metric="cosine",
                              per_sample_path=out / "scores.per_sample.parquet"), "model": args.model}
atomic_write_json(out / "drop_set_own_general.json", drop_set)
windows = heldout_samples(tokenizer, ["general"], n_samples=args.check_texts, seq_len=args.seq_len, seed=0)["general"]
examples = {name: ([t for t in load_distribution(name, "heldout")["text"] if t.strip()][: args.check_texts], args.heldout_seq_len)
            for name in ("code", "general")}
examples["general_windows512"] = ([tokenizer.decode(ids) for ids in windows["input_ids"]], args.seq_len)
checks = {}
for name, (texts, max_length) in examples.items():
    (out / f"texts_{name}_heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    result = check(model, tokenizer, drop_set, texts, max_length=max_length, loss_samples=args.loss_samples)
    for table_name, table in result.tables().items():
        write_table(table, out / f"{table_name}_{name}.parquet", record)
    checks[name] = {"verdict": result.verdict, "drift": result.drift, "recommendation": result.recommendation}
    print(f"\ncheck own:general against {name} held-out texts:\n{result.recommendation}")
atomic_write_json(out / "summary.json", {"checks": checks, "accuracy": tables["accuracy"].to_dict("records"),
                                         "cost": tables["cost"].to_dict("records"), "settings": vars(args)})
