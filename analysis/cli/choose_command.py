"""``calibdrop choose``: which of a run's drop sets to use for your texts, by real loss on them
(:mod:`analysis.evaluation.choose`).  It imports the heavy modules when it runs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..errors import InputError
from .commands import print_table, warn_beyond_positions, writable_output


def same_model(record: dict, model) -> None:
    """Refuse a model other than the run's (by the weights' checksum where both have one)."""
    from ..models import loading as models

    ran, given = record.get("weights_sha256"), models.model_info(model).get("weights_sha256")
    if ran and given and ran != given:
        raise InputError(f"the run was made with {record.get('spec')} (weights sha256 {ran[:12]}...), not with this "
                         f"model ({given[:12]}...): give the run's model, or leave --model out")


def cmd_choose(args) -> None:
    """``calibdrop choose RUN --texts FILE``: the drop set to use for the texts, per module kind and budget."""
    from ..artifacts import read_result_table, read_run_summary
    from ..evaluation.choose import candidate_sets, choose
    from ..io import provenance, read_jsonl_texts, write_table
    from ..models import loading as models
    from ..outputs import claim_folder, identity_of
    from ..study import recommend
    from ..study.selection import sets_from_table

    folder = Path(args.run)
    record = read_run_summary(folder)["provenance"]
    texts = read_jsonl_texts(Path(args.texts))
    every = read_result_table(folder / "set_groups.parquet")
    groups = every[every["module"] == args.module] if args.module else every
    if args.module and not len(groups):
        kinds = ", ".join(sorted(set(every["module"])))
        raise InputError(f"the run evaluated no {args.module} drop sets; it has {kinds}")
    sets = candidate_sets(groups, top=args.top)
    pruned = sets_from_table(read_result_table(folder / "pruned.parquet"))
    out = writable_output(Path(args.out), folder=True) if args.out else None
    if out is not None:
        claim_folder(out, "choose", identity_of(args), force=args.force)
    model, tokenizer = models.load_model(args.model or record["model"].get("spec"), dtype=args.dtype,
                                         device=args.device)
    same_model(record["model"], model)
    warn_beyond_positions(model, args.seq_len)
    tables = choose(model, tokenizer, texts, sets, {name: pruned[name] for name in sets["drop_set"]},
                    seq_len=args.seq_len, margin=args.margin, alpha=args.alpha, n_boot=args.n_boot, seed=args.seed,
                    batch_size=args.batch_size, progress=sys.stderr.isatty())
    choice = tables["choice"]
    for (module, k), part in choice.groupby(["module", "k"], sort=False):
        best = part.iloc[0]
        print(f"{module}-{k}: {best['status']}: {recommend.finding(part)}; on the confirming texts "
              f"{best['ppl_ratio']:.3f}x the unpruned perplexity (chosen at {best['chosen_ratio']:.3f}x)")
    shown = choice[["module", "k", "drop_set", "chosen_ratio", "ppl_ratio", "ratio_to_best", "pair_ci_low",
                    "pair_ci_high", "separated", "equivalent"]]
    print_table(shown.rename(columns={"chosen_ratio": "ratio (choosing half)", "ppl_ratio": "ratio (confirming half)"}))
    if out is None:
        return
    info = provenance(kind="choose", model=models.model_info(model), run=str(folder.resolve()),
                      texts={"path": str(args.texts), "n_texts": len(texts),
                             "sha256": hashlib.sha256(Path(args.texts).read_bytes()).hexdigest()},
                      settings={key: getattr(args, key) for key in ("module", "top", "seq_len", "margin", "alpha",
                                                                   "n_boot", "seed")})
    for name, table in tables.items():
        write_table(table, out / f"choose_{name}.parquet", info)
    print(f"wrote {len(tables)} tables to {out}")
