"""What each ``calibdrop`` command does, given its parsed arguments.

Every command imports torch, transformers and the study's modules when it runs (not at start-up),
and prints where it wrote, in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from ..errors import CalibdropWarning, InputError
from ..presets import PAPER_TASKS, PRESETS, PRIMARY_METRIC, RESULTS_DIR


def parse_ints(text: str) -> tuple[int, ...]:
    """``"4,8"`` → ``(4, 8)``: comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise InputError(f"expected positive drop-set sizes, got {text!r}")
    return values


def distinct(values, what: str) -> list:
    """``values`` in order with repeats removed; a repeat is warned about (it would be computed and written twice)."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        warnings.warn(f"{what} {', '.join(map(str, repeated))} given more than once: using each once", CalibdropWarning)
    return unique


def writable_output(path: Path, *, folder: bool) -> Path:
    """Check before any work that ``path`` (a file, or with ``folder`` a folder) can be written: its folder
    is created and a temporary file is written and removed there; else an :class:`InputError`.  Returns it absolute."""
    from ..io import temp_file

    path = Path(path).resolve()
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = temp_file(target, ".calibdrop-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(
            f"cannot write the output {path}: {error.strerror} ({error.filename}); choose a writable --out") from None
    return path


def warn_beyond_positions(model, seq_len: int) -> None:
    """Warn when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        warnings.warn(f"--seq-len {seq_len} exceeds the {limit} positions the model was trained for: its scores "
                      "there are extrapolation", CalibdropWarning)


def print_table(frame, wide: bool = False) -> None:
    """A table for a terminal: its columns cut to fit 100 columns unless ``wide``."""
    text = frame.to_string(index=False, max_colwidth=None if wide else 40)
    print(text)


def print_json(frame) -> None:
    """A table as plain UTF-8 JSON records (no escaped slashes or non-ASCII letters)."""
    print(json.dumps(frame.to_dict(orient="records"), ensure_ascii=False, indent=2, default=str))


def per_sample_file(results: str) -> Path:
    """The ``*.per_sample.parquet`` of a results folder, of an aggregate's path, or the path itself."""
    path = Path(results)
    for candidate in (path / "scores.per_sample.parquet", path.with_suffix(".per_sample.parquet"), path):
        if candidate.is_file() and candidate.name.endswith(".per_sample.parquet"):
            return candidate
    raise InputError(
        f"no per-sample scores at {results}: give the folder or the .per_sample.parquet that `calibdrop score` wrote")


def read_per_sample(results: str):
    """Per-sample scores from a results folder, a ``*.per_sample.parquet`` or its aggregate's path, checked as the
    ``scores.per_sample`` table (:func:`analysis.artifacts.read_result_table`)."""
    from ..artifacts import read_result_table

    return read_result_table(per_sample_file(results), "scores.per_sample")


def metric_of(scores, requested: str | None) -> str:
    """The metric a command ranks by: the one asked for, else cosine when present, else the table's only one."""
    from ..study.tables import metrics_in, one_metric

    return requested or (PRIMARY_METRIC if PRIMARY_METRIC in metrics_in(scores) else one_metric(scores, None)[1])


def expand_distributions(spec: str) -> list[str]:
    """``"code,math"`` → names; ``"all"`` → every top-level distribution and its sub-distributions."""
    from ..data.documents import subsets
    from ..data.manifests import top_level

    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return [n for top in top_level() for n in [top, *subsets(top)]]
    return distinct(names, "distribution")


def cmd_score(args) -> None:
    from ..data.manifests import load_manifest
    from ..importance.metrics import check_metrics
    from ..importance.scoring import aggregate_importance, score_distributions
    from ..io import provenance, write_table
    from ..models import loading as models
    from ..models.distributed import is_main_process, process_device
    from ..outputs import claim_file, identity_of
    from ..stages import StageStore
    from ..study.stability import least_and_most_important

    args.device = process_device(args.device)
    if bool(args.texts) == bool(args.distributions):
        raise InputError("give either --texts FILE.jsonl or --distributions NAMES (for example code,math,chat)")
    out = writable_output(Path(args.out), folder=False)
    metrics = check_metrics(args.metrics)
    owner = claim_file(out, "score", identity_of(args), force=args.force)
    if not args.texts:
        claim_file(out.with_suffix(".per_sample.parquet"), "score", identity_of(args), force=args.force)
    if args.texts:
        table = score_jsonl(args, out, metrics, owner)
    else:
        settings = PRESETS[args.preset]
        n_samples = settings.samples if args.samples is None else args.samples
        seq_len = settings.seq_len if args.seq_len is None else args.seq_len
        names = expand_distributions(args.distributions)
        for name in names:
            load_manifest(name)
        model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device,
                                             device_map=args.device_map)
        warn_beyond_positions(model, seq_len)
        store = StageStore(models.cache_dir() / "scores", models.model_info(model), lambda line: None,
                           writable=is_main_process())
        rows = score_distributions(model, tokenizer, names, n_samples=n_samples, seq_len=seq_len,
                                   batch_size=args.batch_size, seed=args.seed,
                                   metrics=metrics, store=store, progress=sys.stderr.isatty())
        record = provenance(
            kind="scores",
            model=models.model_info(model),
            distributions={name: load_manifest(name)["_sha256"] for name in names},
            settings={"n_samples": n_samples, "seq_len": seq_len, "seed": args.seed, "batch_size": args.batch_size,
                      "metrics": list(metrics)},
            output=owner,
        )
        per_sample = out.with_suffix(".per_sample.parquet")
        if not is_main_process():
            return
        write_table(rows.assign(model=args.model), per_sample, {**record, "kind": "scores-per-sample"})
        table = aggregate_importance(rows, by=["distribution"]).assign(model=args.model)
        write_table(table, out, record)
        print(f"wrote {per_sample} (per sample)")
    if not is_main_process():
        return
    print(f"wrote {out} and its provenance {out.with_suffix('.json')}\n")
    if "importance" in table and "layer" in table:
        print("least and most important modules (mean over distributions):")
        print_table(least_and_most_important(table))


def score_jsonl(args, out: Path, metrics, owner: dict):
    """Score the texts of a JSONL file (each text one sample) and write the table, its provenance recording ``owner``
    (:func:`analysis.outputs.claim_file`); returns it."""
    import hashlib

    from ..importance.scoring import score_texts
    from ..io import provenance, read_jsonl_texts, write_table
    from ..models import loading as models
    from ..models.distributed import is_main_process

    texts_path = Path(args.texts)
    texts = read_jsonl_texts(texts_path)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    max_length = PRESETS[args.preset].seq_len if args.seq_len is None else args.seq_len
    warn_beyond_positions(model, max_length)
    table = score_texts(model, tokenizer, texts, max_length=max_length, batch_size=args.batch_size,
                        per_sample=args.per_sample, metrics=metrics, progress=sys.stderr.isatty())
    record = provenance(
        kind="scores-per-sample" if args.per_sample else "scores",
        model=models.model_info(model),
        texts={"path": str(texts_path), "sha256": hashlib.sha256(texts_path.read_bytes()).hexdigest(),
               "n_texts": len(texts)},
        settings={"max_length": max_length, "batch_size": args.batch_size, "per_sample": args.per_sample},
        output=owner,
    )
    table = table.assign(model=args.model)
    if is_main_process():
        write_table(table, out, record)
    return table


def cmd_compare(args) -> None:
    from ..io import provenance, write_table
    from ..outputs import claim_folder, identity_of
    from ..pipeline import compare_tables
    from ..report import plots
    from ..study.tables import metrics_in, one_metric, tables_of_metric

    k = parse_ints(args.k)
    scores = read_per_sample(args.results)
    results = Path(args.results)
    out = writable_output(Path(args.out) if args.out else (results if results.is_dir() else results.parent) / "compare",
                          folder=True)
    claim_folder(out, "compare", identity_of(args), force=args.force)
    modules = distinct([m.strip() for m in args.modules.split(",")], "module kind")
    tables = compare_tables(scores, modules, k, args.n_boot, args.n_perm)
    source = scores.attrs.get("provenance", {})
    for name, table in tables.items():
        record = provenance(kind=name, scores=source,
                            settings={"modules": modules, "k": k, "n_boot": args.n_boot, "n_perm": args.n_perm})
        write_table(table, out / f"{name}.parquet", record)
    figures = []
    for metric in metrics_in(scores):
        chosen = tables_of_metric(tables, metric)
        figures += plots.stability_figures(one_metric(scores, metric)[0], chosen, out / "figures" / metric, max(k))
    attn = tables["agreement"][tables["agreement"]["module"] == "attn"]
    if len(attn):
        print(attn.drop(columns="module").round(3).to_string(index=False))
    print(f"wrote {len(tables)} tables to {out} and {len(figures)} figure files to {out / 'figures'}")


def cmd_consensus(args) -> None:
    import pandas as pd

    from ..evaluation.check import source_pointer
    from ..io import atomic_write_json, provenance
    from ..outputs import claim_file, identity_of
    from ..study.dropsets import drop_set_family

    scores = read_per_sample(args.results)
    metric = metric_of(scores, args.metric)
    out = writable_output(
        Path(args.out or Path(RESULTS_DIR) / "drop_sets" / f"{metric}-{args.module}-{args.k}-{args.method}.json"),
        folder=False)
    owner = claim_file(out, "consensus", identity_of(args), force=args.force)
    [chosen] = drop_set_family(scores, module=args.module, k=args.k, metric=metric, methods=(args.method,),
                               own=False).values()
    source = scores.attrs.get("provenance", {})
    record = {
        **chosen.record(),
        "model": source.get("model", {}).get("spec") or scores.get("model", pd.Series([None])).iloc[0],
        "model_sha256": source.get("model", {}).get("weights_sha256"),
        "scores": source_pointer(per_sample_file(args.results)),
        "provenance": provenance(kind="drop-set", scores=source, output=owner),
    }
    atomic_write_json(out, record)
    print(f"{chosen.label}: {chosen.sorted_indices()}\nwrote {out}")


def cmd_prune(args) -> None:
    from ..export import save_exported
    from ..models import loading as models
    from ..models import pruning
    from ..outputs import check_checkpoint, identity_of, record_checkpoint
    from ..study.dropsets import as_drop_set, read_drop_set

    record = read_drop_set(Path(args.drop_set))
    out = writable_output(Path(args.out), folder=True)
    identity = identity_of(args)
    check_checkpoint(out, "prune", identity, force=args.force)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype)
    pruning.check_drop_set(record, model, force=args.force)
    chosen = as_drop_set(record)
    before = sum(p.numel() for p in model.parameters())
    pruning.drop_modules(model, **chosen.drop_kwargs(), drop_set=record)
    out = save_exported(model, out, tokenizer)  # with modeling_calibdrop.py when the config's auto_map names it
    record_checkpoint(out, "prune", identity)
    after = sum(p.numel() for p in model.parameters())
    print(f"dropped {chosen.module} {chosen.sorted_indices()}: {before:,} -> {after:,} parameters; saved to {out}")


def drop_set_files(paths) -> dict[str, Path]:
    """``{name: path}`` of the ``--drop-sets`` files, each named by its file name without ``.json``; a file given
    twice is used once (with a warning); a file named like the unpruned model (``none.json``), or two files of the same
    name in different folders, is an :class:`InputError`: a set's name is its key in every table."""
    from ..study.dropsets import UNPRUNED

    files: dict[str, Path] = {}
    for path in distinct([Path(p).resolve() for p in paths], "drop-set file"):
        name = path.stem
        if name == UNPRUNED:
            raise InputError(f"drop-set file {path} would be named {UNPRUNED!r}, the name of the unpruned model in "
                             "every table: rename the file")
        if name in files:
            raise InputError(f"drop-set files {files[name]} and {path} would both be named {name!r}: rename one")
        files[name] = path
    return files


def evaluation_drop_sets(args) -> dict:
    """Named drop sets: from JSON files, and/or the family built from per-sample scores
    (:func:`~analysis.study.dropsets.drop_set_family`)."""
    from ..models import pruning
    from ..study.dropsets import UNPRUNED, drop_set_family, read_drop_set

    sets: dict = {UNPRUNED: None}
    for name, path in drop_set_files(args.drop_sets or []).items():
        sets[name] = read_drop_set(path)
    if args.from_scores:
        scores = read_per_sample(args.from_scores)
        metric = metric_of(scores, args.metric)
        for k in parse_ints(args.k):  # a set's label holds a "/", so it never equals a file's name
            sets.update(drop_set_family(scores, module=args.module, k=k, methods=args.methods.split(","), metric=metric,
                                        random_seeds=(0, 1, 2)))
    if len(sets) == 1 and not pruning.is_pruned_checkpoint(Path(args.model)):
        raise InputError(
            "nothing to evaluate: give --drop-sets FILES and/or --from-scores RESULTS, or --model a pruned checkpoint")
    return sets


def cmd_evaluate(args) -> None:
    from ..evaluation import heldout as evaluation
    from ..io import provenance, write_table
    from ..models import loading as models
    from ..models import pruning
    from ..outputs import claim_folder, identity_of
    from ..study.dropsets import as_drop_set

    sets = evaluation_drop_sets(args)
    tasks = distinct([t for t in (args.tasks or "").split(",") if t], "task")
    unknown = [t for t in tasks if t not in PAPER_TASKS]
    if unknown:
        raise InputError(f"--tasks: unknown task {unknown[0]!r}; tasks: {', '.join(PAPER_TASKS)}")
    out = writable_output(Path(args.out), folder=True)
    claim_folder(out, "evaluate", identity_of(args), force=args.force)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    for record in sets.values():
        if isinstance(record, dict):
            pruning.check_drop_set(record, model, force=args.force)
    warn_beyond_positions(model, args.seq_len)
    sets = {name: as_drop_set(value) for name, value in sets.items()}
    record = provenance(kind="evaluation", model=models.model_info(model),
                        drop_sets={n: s and s.record() for n, s in sets.items()},
                        settings={"samples": args.samples, "seq_len": args.seq_len, "limit": args.limit})
    distributions = expand_distributions(args.distributions) if args.distributions else []
    progress = sys.stderr.isatty()
    if distributions:
        transfer = evaluation.transfer_matrix(model, tokenizer, sets, distributions, n_samples=args.samples,
                                              seq_len=args.seq_len, progress=progress)
        write_table(transfer, out / "transfer.parquet", record)
        print("held-out perplexity / unpruned perplexity (lower is better):")
        print(transfer.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio",
                                   sort=False).round(3).to_string())
    if tasks:
        write_accuracy(model, tokenizer, sets, tasks, args.limit, out, record, progress)
    print(f"wrote results to {out}")


def write_accuracy(model, tokenizer, sets: dict, tasks, limit, out: Path, record: dict, progress: bool) -> None:
    """Item-level zero-shot correctness of every set, the accuracy table, and every set paired with the unpruned model
    on
    the same items (:func:`analysis.evaluation.accuracy.accuracy_analysis`); writes the tables and prints the paired
    differences."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..evaluation import accuracy
    from ..io import write_table
    from ..study.dropsets import UNPRUNED

    kept = accuracy.KeptInputs.for_sets(sets.values())
    items = pd.concat([accuracy.items_of_set(model, tokenizer, name, chosen, tasks, limit=limit, kept=kept)
                       for name, chosen in tqdm(sets.items(), desc="accuracy", unit="set", disable=not progress)],
                       ignore_index=True)
    table = accuracy.accuracy_table(items)
    paired, screened = accuracy.accuracy_analysis(items, [(f"{name} vs unpruned", name,
                                                           UNPRUNED) for name in sets if name != UNPRUNED],
                                                  task_limit=limit)
    for name, frame in {"accuracy_items": items, "accuracy": table, "accuracy_paired": paired,
                        "accuracy_tasks": screened}.items():
        write_table(frame, out / f"{name}.parquet", record)
    summary = accuracy.headline_rows(table.rename(columns={"metric": "measure"}))
    print("zero-shot accuracy (higher is better):")
    print(summary.pivot_table(index="drop_set", columns="task", values="value", sort=False).round(3).to_string())
    if len(paired):
        print(
            "paired on the same items, against the unpruned model (difference in points, 95% bootstrap CI, exact "
            "McNemar p):")
        shown = paired.assign(points=(100 * paired["difference"]).round(1),
                              ci=[f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" for lo, hi in
                                                                           zip(paired["ci_low"], paired["ci_high"])])
        print(shown[["comparison", "task", "measure", "n", "points", "ci",
                     "p_mcnemar"]].round(4).to_string(index=False))
    for row in screened[~screened["included"]].itertuples():
        print(f"not compared: the unpruned model is not clearly above chance on {row.task} ({row.measure})")


def cmd_run(args) -> None:
    from ..pipeline import run

    out = writable_output(Path(args.out), folder=True)
    settings = PRESETS[args.preset]
    if args.matmul_precision:
        settings = dataclasses.replace(settings, matmul_precision=args.matmul_precision)
    summary = run(args.model, out, preset=settings, dtype=args.dtype, device=args.device,
                  progress=sys.stderr.isatty(),
                  figures=not args.no_figures, force=args.force)
    print(f"\ndone in {summary['seconds']} s: report {summary['report'][0]} and {summary['report'][1]}, "
          f"{summary['figures']} figure files in {out / 'figures'}")
    print(f"computed: {', '.join(summary['stages_computed']) or 'nothing (all reused)'}")
    print(f"reused:   {', '.join(summary['stages_reused']) or 'nothing'}")


def cmd_report(args) -> None:
    """``calibdrop report``: the report and figures of a run folder redrawn from its tables
    (:func:`analysis.pipeline.render_report`)."""
    from ..pipeline import render_report

    folder = Path(args.results)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give the output folder of a finished `calibdrop run`")
    written = render_report(writable_output(folder, folder=True), figures=not args.no_figures)
    print(f"report {written['report'][0]} and {written['report'][1]}, {len(written['figures'])} figure files")


def cmd_summary(args) -> None:
    from ..outputs import claim_folder, identity_of
    from ..report.summary import write_summary

    out = writable_output(Path(args.out), folder=True)
    claim_folder(out, "summary", identity_of(args), force=args.force)
    written = write_summary(args.results, out)
    print(f"{len(written['tables'])} tables and {len(written['figures'])} figure files in {out}")
    for path in written["tables"]:
        print(f"  {path}")
