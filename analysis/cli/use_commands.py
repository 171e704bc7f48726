"""The commands that use a drop set on your own texts: ``calibdrop check`` and ``calibdrop route``.

Like every command they import the heavy modules when they run."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError
from .commands import metric_of, print_table, read_per_sample, warn_beyond_positions, writable_output


def cmd_check(args) -> None:
    """``calibdrop check``: does a drop set still hold on the user's texts (:func:`analysis.evaluation.check.check`)."""
    import hashlib

    from ..evaluation.check import MIN_TEXTS, check
    from ..io import provenance, read_jsonl_texts, write_table
    from ..models import loading as models
    from ..models import pruning
    from ..models.distributed import is_main_process
    from ..outputs import claim_folder, identity_of
    from ..study.dropsets import read_drop_set

    drop_set = read_drop_set(Path(args.drop_set))
    texts = read_jsonl_texts(Path(args.texts))
    if len(texts) < MIN_TEXTS:
        raise InputError(f"texts file {args.texts} holds {len(texts)} texts; `calibdrop check` needs at least "
                         f"{MIN_TEXTS}, as it compares random halves of them")
    out = writable_output(Path(args.out), folder=True)
    claim_folder(out, "check", identity_of(args), force=args.force)
    source = read_per_sample(args.scores) if args.scores else None
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    pruning.check_drop_set(drop_set, model, force=args.force)
    warn_beyond_positions(model, args.max_length)
    result = check(model, tokenizer, drop_set, texts, source_scores=source, metric=args.metric,
                   consensus_method=args.consensus_method,
                   max_length=args.max_length, batch_size=args.batch_size, loss_samples=args.loss_samples,
                   alpha=args.alpha,
                   regret_tolerance=args.tolerance, n_perm=args.n_perm, seed=args.seed, progress=sys.stderr.isatty())
    record = provenance(kind="check", model=models.model_info(model), drop_set=drop_set,
                        texts={"path": str(args.texts),
                               "sha256": hashlib.sha256(Path(args.texts).read_bytes()).hexdigest(),
                               "n_texts": len(texts)},
                        settings={key: getattr(args,
                                               key) for key in (
                                                   "metric", "consensus_method", "max_length", "loss_samples", "alpha",
                                                                       "tolerance", "n_perm", "seed")})
    if not is_main_process():
        return
    for name, table in result.tables().items():
        write_table(table, out / f"{name}.parquet", record)
    print_table(result.summary.drop(columns=["drop_set", "sources"]).T.reset_index().set_axis(["", "value"], axis=1))
    print(f"\n{result.recommendation}\nwrote {len(result.tables())} tables to {out}")


def cmd_route(args) -> None:
    """``calibdrop route``: routed vs static drop sets on a held-out mix
    (:func:`analysis.evaluation.routing.evaluate_routing`)."""
    from ..evaluation.routing import evaluate_routing
    from ..io import provenance, write_table
    from ..models import loading as models
    from ..outputs import claim_folder, identity_of
    from ..presets import RunSettings
    from ..report import sections as report

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise InputError(f"--methods {args.methods!r} names no consensus method: give one or more, for example "
                         f"borda,minimax")
    scores = read_per_sample(args.results)
    results = Path(args.results)
    out = writable_output(Path(args.out) if args.out else (results if results.is_dir() else results.parent) / "routing",
                          folder=True)
    claim_folder(out, "route", identity_of(args), force=args.force)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    warn_beyond_positions(model, max(args.seq_len, args.calibration_seq_len))
    tables = evaluate_routing(model, tokenizer, scores, module=args.module, k=args.k,
                              metric=metric_of(scores, args.metric),
                              consensus_methods=methods, classifier=args.classifier,
                              calibration_samples=args.calibration_samples,
                              calibration_seq_len=args.calibration_seq_len, heldout_samples=args.samples,
                              heldout_seq_len=args.seq_len,
                              batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed,
                              progress=sys.stderr.isatty())
    record = provenance(kind="routing", model=models.model_info(model), scores=scores.attrs.get("provenance", {}),
                        settings={key: getattr(args, key) for key in (
                            "module", "k", "metric", "methods", "classifier", "calibration_samples",
                            "calibration_seq_len", "samples", "seq_len", "n_boot", "seed")})
    for name, table in tables.items():
        write_table(table, out / f"routing_{name}.parquet", record)
    shown = report.Results({}, RunSettings(), scores, {"routing": tables["summary"], "routing_paired": tables["paired"],
                                                        "routing_accuracy": tables["accuracy"]}, [])
    print("\n".join(report.section_routing(shown)[2:]))
    print(
        f"routing cost: the router's prefix is {tables['cost']['prefix_ratio'].iloc[0]:.1%} of a forward pass (reused "
        f"by the "
          f"continuation), its classifier {tables['cost']['classifier_ratio'].iloc[0]:.3%}\nwrote {len(tables)} tables "
          f"to {out}")
