"""Does ``calibdrop choose`` pick, for text no stage saw, a set within the margin of the best of every set the run
evaluated?

For each test-only distribution (legal, science): ``--texts`` of its held-out documents are split into halves as
``choose`` splits them; :func:`analysis.evaluation.choose.choose` picks a set per module kind and budget on the first
half from the run's leading sets, its answer's group and the baselines, and judges it on the second.  Then *every*
distinct set the run evaluated (random sets too) is evaluated on the second half, and the pick's perplexity ratio is
set against the lowest of them: the pick is within the margin when ``ratio(pick) / min ratio <= 1 + margin``, with the
paired interval of that quotient at 95% (bootstrap over the confirming windows).  Writes a JSON file and a Markdown
table with this command.

    python benchmarks/study/choose_unseen.py RUN --out benchmarks/results/choose-unseen-smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.data.documents import load_distribution  # noqa: E402
from analysis.evaluation import choose as choosing  # noqa: E402
from analysis.evaluation.heldout import window_nll, worst_case_replicates  # noqa: E402
from analysis.io import atomic_write_json, package_versions, read_table  # noqa: E402
from analysis.models import loading  # noqa: E402
from analysis.study import recommend  # noqa: E402
from analysis.study.dropsets import UNPRUNED  # noqa: E402
from analysis.study.selection import sets_from_table  # noqa: E402


def one_distribution(model, tokenizer, run: Path, name: str, n_texts: int, seq_len: int, n_boot: int,
                     margin: float) -> list[dict]:
    """The pick per module kind and budget on ``name``'s held-out texts against every evaluated set."""
    texts = load_distribution(name, "heldout")["text"][:n_texts]
    groups, pruned = read_table(run / "set_groups.parquet"), sets_from_table(read_table(run / "pruned.parquet"))
    candidates = choosing.candidate_sets(groups)
    started = time.perf_counter()
    choice = choosing.choose(model, tokenizer, texts, candidates, {n: pruned[n] for n in candidates["drop_set"]},
                             seq_len=seq_len, n_boot=n_boot, margin=margin)["choice"]
    chose = time.perf_counter() - started
    confirm = choosing.text_windows(tokenizer, [texts[i] for i in choosing.halves(len(texts), 0)[1]], seq_len=seq_len)
    every = groups["drop_set"].tolist()
    windows = window_nll(model, {name: confirm}, {UNPRUNED: None, **{n: pruned[n] for n in every}})
    worst, n_windows = worst_case_replicates(windows, n_boot=n_boot, seed=0)
    rows = []
    for (module, k), part in choice.groupby(["module", "k"], sort=False):
        pick = part["drop_set"].iloc[0]
        names = groups.loc[(groups["module"] == module) & (groups["k"] == k), "drop_set"]
        best = min(names, key=lambda n: worst[n].iloc[0])
        quotient = worst[pick] - worst[best]
        low, high = np.quantile(quotient[1:], [0.025, 0.975])
        rows.append({"distribution": name, "module": module, "k": int(k), "pick": pick,
                     "status": part["status"].iloc[0], "pick_ratio": round(math.exp(worst[pick].iloc[0]), 4),
                     "best_of_every_set": best, "best_ratio": round(math.exp(worst[best].iloc[0]), 4),
                     "pick_over_best": round(math.exp(quotient.iloc[0]), 4),
                     "pick_over_best_ci": [round(math.exp(low), 4), round(math.exp(high), 4)],
                     "within_margin": bool(math.exp(quotient.iloc[0]) <= 1 + margin),
                     "sets_compared": len(names), "candidates_weighed": len(part), "confirm_windows": n_windows,
                     "choose_seconds": round(chose, 1)})
        print(f"{name} {module}-{k}: pick {pick} {rows[-1]['pick_ratio']}x, best {best} {rows[-1]['best_ratio']}x, "
              f"pick / best {rows[-1]['pick_over_best']}", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# `calibdrop choose` on text no stage saw: {result['model']}", "", f"Command: `{result['command']}`", "",
             f"Run: `{result['run']}`; {result['n_texts']} held-out texts per distribution, windows of "
             f"{result['seq_len']} tokens, halves by text; margin {result['margin']:.0%}.", "",
             "| distribution | set | pick (status) | pick ratio | best of every set | best ratio | pick / best "
             "[95% CI] | within margin |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['distribution']} | {r['module']}-{r['k']} | {r['pick']} ({r['status']}) | "
                     f"{r['pick_ratio']} | {r['best_of_every_set']} | {r['best_ratio']} | {r['pick_over_best']} "
                     f"[{r['pick_over_best_ci'][0]}, {r['pick_over_best_ci'][1]}] | {r['within_margin']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (its set_groups and pruned tables)")
    parser.add_argument("--distributions", default="legal,science")
    parser.add_argument("--texts", type=int, default=48, help="held-out texts per distribution")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--margin", type=float, default=recommend.MARGIN)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    record = json.loads((args.run / "run_summary.json").read_text(encoding="utf-8"))["provenance"]["model"]
    model, tokenizer = loading.load_model(record["spec"])
    rows = [row for name in args.distributions.split(",") for row in one_distribution(
        model, tokenizer, args.run, name, args.texts, args.seq_len, args.n_boot, args.margin)]
    result = {"model": record["spec"], "run": str(args.run), "n_texts": args.texts, "seq_len": args.seq_len,
              "margin": args.margin, "rows": rows,
              "command": "python benchmarks/study/choose_unseen.py " + " ".join(argv or sys.argv[1:]),
              "versions": package_versions()}
    atomic_write_json(Path(f"{args.out}.json"), result)
    Path(f"{args.out}.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
