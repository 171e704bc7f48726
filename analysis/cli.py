"""The ``calibdrop`` command line (also ``python -m analysis``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import consensus, data, evaluation, models, plots, pruning, stability
from .check import source_pointer
from .errors import CalibdropError, CalibdropWarning, InputError
from .io import atomic_write_json, provenance, read_table, temp_file, write_table
from .metrics import check_metrics, metric_names
from .scoring import aggregate_importance, is_main_process, score_distributions, score_texts

PRESETS = {"default": {"samples": 128, "seq_len": 512}, "quick": {"samples": 32, "seq_len": 256}, "paper": {"samples": 256, "seq_len": 2048}}


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file {path} does not exist")
    texts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = decode_line(path, number, raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number} is not valid JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number} has no string field 'text'; each line must look like {{\"text\": \"...\"}}")
        texts.append(record["text"])
    return texts


def decode_line(path: Path, number: int, raw: bytes) -> str:
    """Line ``number`` of ``path`` as text; not UTF-8 is an :class:`InputError` naming the file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}:{number} is not UTF-8 text (byte {error.start + 1} of the line): save the file as UTF-8") from None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (0 is refused, never replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def writable_output(path: Path, *, folder: bool) -> Path:
    """Check before any work that ``path`` (a file, or with ``folder`` a folder) can be written: its folder
    is created and a temporary file is written and removed there; else an :class:`InputError`."""
    path = Path(path)
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = temp_file(target, ".calibdrop-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"cannot write the output {path}: {error.strerror} ({error.filename}); choose a writable --out") from None
    return path


def warn_beyond_positions(model, seq_len: int) -> None:
    """Warn when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        warnings.warn(f"--seq-len {seq_len} exceeds the {limit} positions the model was trained for: its scores "
                      "there are extrapolation", CalibdropWarning)


def _print_table(frame: pd.DataFrame) -> None:
    print(frame.to_string(index=False))


def cmd_models_list(args) -> None:
    status = pd.DataFrame(models.builtin_status())
    if args.json:
        print(status.to_json(orient="records", indent=2))
    else:
        _print_table(status[["name", "family", "layers", "fetched", "requirements", "license"]])
        print(f"\ncache: {models.cache_dir() / 'models'}")


def cmd_models_fetch(args) -> None:
    for name in args.names or [models.DEFAULT_MODEL]:
        path = models.fetch_builtin(name)
        print(f"{name}: {path} (sha256 verified)")
        if args.dequantise:
            model, _ = models.load_model(name)
            print(f"{name}: float32 cache ready at {model.calibdrop_info.path}")


def expand_distributions(spec: str) -> list[str]:
    """``"code,math"`` → names; ``"all"`` → every top-level distribution and its sub-distributions."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return [n for top in data.TOP_LEVEL for n in [top, *data.subsets(top)]]
    return names


def default_device(device):
    """The requested device, or under torch.distributed on GPUs this process's ``cuda:LOCAL_RANK``."""
    import torch

    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def cmd_score(args) -> None:
    args.device = default_device(args.device)
    if bool(args.texts) == bool(args.distributions):
        raise InputError("give either --texts FILE.jsonl or --distributions NAMES (for example code,math,chat)")
    out = writable_output(Path(args.out), folder=False)
    if args.texts:
        score_jsonl(args, out)
        return
    metrics = check_metrics(args.metrics)
    preset = PRESETS[args.preset]
    n_samples = preset["samples"] if args.samples is None else args.samples
    seq_len = preset["seq_len"] if args.seq_len is None else args.seq_len
    names = expand_distributions(args.distributions)
    for name in names:
        data.load_manifest(name)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    warn_beyond_positions(model, seq_len)
    rows = score_distributions(
        model, tokenizer, names, n_samples=n_samples, seq_len=seq_len, batch_size=args.batch_size, seed=args.seed, metrics=metrics
    )
    record = provenance(
        kind="scores",
        model=models.model_info(model),
        distributions={name: data.load_manifest(name)["_sha256"] for name in names},
        settings={"n_samples": n_samples, "seq_len": seq_len, "seed": args.seed, "batch_size": args.batch_size, "metrics": list(metrics)},
    )
    per_sample = out.with_suffix(".per_sample.parquet")
    if not is_main_process():
        return
    write_table(rows.assign(model=args.model), per_sample, {**record, "kind": "scores-per-sample"})
    write_table(aggregate_importance(rows, by=["distribution"]).assign(model=args.model), out, record)
    print(f"wrote {out} (per distribution) and {per_sample} (per sample), each with a .json provenance sidecar")


def score_jsonl(args, out: Path) -> None:
    texts_path = Path(args.texts)
    texts = read_jsonl_texts(texts_path)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    max_length = 512 if args.seq_len is None else args.seq_len
    warn_beyond_positions(model, max_length)
    table = score_texts(model, tokenizer, texts, max_length=max_length, batch_size=args.batch_size, per_sample=args.per_sample,
                        metrics=check_metrics(args.metrics))
    record = provenance(
        kind="scores-per-sample" if args.per_sample else "scores",
        model=models.model_info(model),
        texts={"path": str(texts_path), "sha256": hashlib.sha256(texts_path.read_bytes()).hexdigest(), "n_texts": len(texts)},
        settings={"max_length": max_length, "batch_size": args.batch_size, "per_sample": args.per_sample},
    )
    if not is_main_process():
        return
    write_table(table.assign(model=args.model), out, record)
    print(f"wrote {out} and {out.with_suffix('.json').name}")


def cmd_data_fetch(args) -> None:
    names = args.names or list(data.TOP_LEVEL)
    for name in tqdm(names, desc="distributions", unit="dist"):
        frame = data.fetch_distribution(name)
        print(f"{name}: {len(frame)} documents, checksums verified")


def describe_sources(sources: list[dict]) -> str:
    """``package=version`` of each fetched source, with the pin where a newer Debian revision replaced it."""
    return ", ".join(
        f"{s['package']}={s['version']}" + (f" (pinned {s['pinned_version']}, sha256 {s['sha256']})" if s.get("pinned_version") else "")
        for s in sources if s.get("package")
    )


def cmd_data_list(args) -> None:
    summary = data.distribution_summary()
    if args.json:
        print(summary.to_json(orient="records", indent=2))
    else:
        _print_table(summary.drop(columns=["description"]).assign(sources=summary["sources"].map(describe_sources)))


def read_per_sample(results: str) -> pd.DataFrame:
    """Per-sample scores from a results folder, a ``*.per_sample.parquet`` or its aggregate's path."""
    return read_table(per_sample_file(results))


def per_sample_file(results: str) -> Path:
    """The ``*.per_sample.parquet`` of a results folder, of an aggregate's path, or the path itself."""
    path = Path(results)
    candidates = [path / "scores.per_sample.parquet", path.with_suffix(".per_sample.parquet"), path]
    for candidate in candidates:
        if candidate.is_file() and candidate.name.endswith(".per_sample.parquet"):
            return candidate
    raise InputError(f"no per-sample scores at {results}: give the folder or the .per_sample.parquet that `calibdrop score` wrote")


def parse_ints(text: str) -> tuple[int, ...]:
    """``"4,8"`` → ``(4, 8)``: comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise InputError(f"expected positive drop-set sizes, got {text!r}")
    return values


def compare_tables(scores: pd.DataFrame, modules, k, n_boot: int, n_perm: int) -> dict[str, pd.DataFrame]:
    """Stability tables plus leave-one-distribution-out regret per module, at the largest k that fits."""
    tables = stability.stability_tables(scores, modules=modules, k=k, n_boot=n_boot, n_perm=n_perm)
    if scores["distribution"].nunique() >= 3:
        tables["leave_one_out"] = consensus.leave_one_out_at_budgets(scores, {module: k for module in modules})
    return tables


def cmd_compare(args) -> None:
    k = parse_ints(args.k)
    scores = read_per_sample(args.results)
    results = Path(args.results)
    out = writable_output(Path(args.out) if args.out else (results if results.is_dir() else results.parent) / "compare", folder=True)
    modules = [m.strip() for m in args.modules.split(",")]
    tables = compare_tables(scores, modules, k, args.n_boot, args.n_perm)
    source = scores.attrs.get("provenance", {})
    for name, table in tables.items():
        record = provenance(kind=name, scores=source, settings={"modules": modules, "k": k, "n_boot": args.n_boot, "n_perm": args.n_perm})
        write_table(table, out / f"{name}.parquet", record)
    figures = []
    for metric in stability.metrics_in(scores):
        chosen = stability.tables_of_metric(tables, metric)
        figures += plots.stability_figures(stability.one_metric(scores, metric)[0], chosen, out / "figures" / metric, max(k))
    attn = tables["agreement"][tables["agreement"]["module"] == "attn"]
    if len(attn):
        print(attn.drop(columns="module").round(3).to_string(index=False))
    print(f"wrote {len(tables)} tables to {out} and {len(figures)} figure files to {out / 'figures'}")


def cmd_consensus(args) -> None:
    out = writable_output(Path(args.out or f"drop_set_{args.module}_k{args.k}_{args.method}.json"), folder=False)
    scores = read_per_sample(args.results)
    metric = args.metric or ("cosine" if "cosine" in stability.metrics_in(scores) else None)
    chosen = consensus.consensus_drop_set(scores, module=args.module, k=args.k, method=args.method, metric=metric)
    source = scores.attrs.get("provenance", {})
    record = {
        "metric": stability.one_metric(scores, metric)[1],
        "model": source.get("model", {}).get("spec") or scores.get("model", pd.Series([None])).iloc[0],
        "model_sha256": source.get("model", {}).get("weights_sha256"),
        "module": args.module,
        "k": args.k,
        "indices": [c if isinstance(c, str) else int(c) for c in chosen],
        "method": args.method,
        "distributions": list(dict.fromkeys(scores["distribution"])),
        "scores": source_pointer(per_sample_file(args.results)),
        "provenance": provenance(kind="drop-set", scores=source),
    }
    atomic_write_json(out, record)
    print(f"{args.method} {args.module} drop set (k={args.k}): {record['indices']} -> {out}")


def cmd_prune(args) -> None:
    drop_set = pruning.read_drop_set(Path(args.drop_set))
    out = writable_output(Path(args.out), folder=True)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype)
    pruning.check_drop_set(drop_set, model, force=args.force)
    before = sum(p.numel() for p in model.parameters())
    pruning.drop_modules(model, **pruning.drop_set_kwargs(drop_set), drop_set={**drop_set, "file": str(args.drop_set)})
    out = pruning.save_pruned(model, out, tokenizer)
    after = sum(p.numel() for p in model.parameters())
    print(f"dropped {drop_set['module']} {drop_set['indices']}: {before:,} -> {after:,} parameters; saved to {out}")


def evaluation_drop_sets(args) -> dict:
    """Named drop sets: from JSON files, and/or the standard family built from per-sample scores."""
    sets: dict = {"none": None}
    for path in args.drop_sets or []:
        sets[Path(path).stem] = {**pruning.read_drop_set(Path(path)), "file": str(path)}
    if args.from_scores:
        scores = read_per_sample(args.from_scores)
        metric = args.metric or ("cosine" if "cosine" in stability.metrics_in(scores) else None)
        for k in parse_ints(args.k):
            sets.update(evaluation.drop_sets_for_transfer(scores, module=args.module, k=k, methods=args.methods.split(","), metric=metric))
    if len(sets) == 1 and not pruning.is_pruned_checkpoint(Path(args.model)):
        raise InputError("nothing to evaluate: give --drop-sets FILES and/or --from-scores RESULTS, or --model a pruned checkpoint")
    return sets


def cmd_evaluate(args) -> None:
    sets = evaluation_drop_sets(args)
    out = writable_output(Path(args.out), folder=True)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    for record in sets.values():
        if isinstance(record, dict) and "file" in record:
            pruning.check_drop_set(record, model, force=args.force)
    warn_beyond_positions(model, args.seq_len)
    records = {name: spec.record() if hasattr(spec, "record") else spec for name, spec in sets.items()}
    record = provenance(kind="evaluation", model=models.model_info(model), drop_sets=records,
                        settings={"samples": args.samples, "seq_len": args.seq_len, "limit": args.limit})
    distributions = expand_distributions(args.distributions) if args.distributions else []
    if distributions:
        transfer = evaluation.transfer_matrix(model, tokenizer, sets, distributions, n_samples=args.samples, seq_len=args.seq_len)
        write_table(transfer, out / "transfer.parquet", record)
        print(transfer.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio", sort=False).round(3).to_string())
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if tasks:
        rows = []
        for name, spec in tqdm(sets.items(), desc="accuracy", unit="set"):
            table = evaluation.zero_shot_accuracy(evaluation.pruned_copy(model, spec), tokenizer, tasks, limit=args.limit)
            rows.append(table.assign(drop_set=name))
        accuracy = pd.concat(rows, ignore_index=True)
        write_table(accuracy, out / "accuracy.parquet", record)
        summary = accuracy[accuracy.metric.eq("acc_norm") | ~accuracy.task.isin(accuracy[accuracy.metric == "acc_norm"].task)]
        print(summary.pivot_table(index="drop_set", columns="task", values="value", sort=False).round(3).to_string())
    print(f"wrote results to {out}")


def cmd_check(args) -> None:
    """`calibdrop check`: does a drop set still hold on the user's texts (analysis.check.check)."""
    from .check import check

    drop_set = {**pruning.read_drop_set(Path(args.drop_set)), "file": str(args.drop_set)}
    texts = read_jsonl_texts(Path(args.texts))
    out = writable_output(Path(args.out), folder=True)
    source = read_per_sample(args.scores) if args.scores else None
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    pruning.check_drop_set(drop_set, model, force=args.force)
    warn_beyond_positions(model, args.max_length)
    result = check(model, tokenizer, drop_set, texts, source_scores=source, metric=args.metric, consensus_method=args.consensus_method,
                   max_length=args.max_length, batch_size=args.batch_size, loss_samples=args.loss_samples, alpha=args.alpha,
                   regret_tolerance=args.tolerance, n_perm=args.n_perm, seed=args.seed, progress=True)
    record = provenance(kind="check", model=models.model_info(model), drop_set=drop_set,
                        texts={"path": str(args.texts), "sha256": hashlib.sha256(Path(args.texts).read_bytes()).hexdigest(), "n_texts": len(texts)},
                        settings={key: getattr(args, key) for key in ("metric", "consensus_method", "max_length", "loss_samples", "alpha",
                                                                       "tolerance", "n_perm", "seed")})
    if not is_main_process():
        return
    for name, table in result.tables().items():
        write_table(table, out / f"{name}.parquet", record)
    _print_table(result.summary.drop(columns=["drop_set", "sources"]).T.reset_index().set_axis(["", "value"], axis=1))
    print(f"\n{result.recommendation}\nwrote {len(result.tables())} tables to {out}")


def cmd_run(args) -> None:
    from .pipeline import run

    writable_output(Path(args.out), folder=True)
    summary = run(args.model, Path(args.out), preset=args.preset, dtype=args.dtype, device=args.device)
    print(f"\ndone in {summary['seconds']} s: report {summary['report'][0]} and {summary['report'][1]}, "
          f"{summary['figures']} figure files in {Path(args.out) / 'figures'}")
    print(f"computed: {', '.join(summary['stages_computed']) or 'nothing (all reused)'}")
    print(f"reused:   {', '.join(summary['stages_reused']) or 'nothing'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibdrop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    models_parser = commands.add_parser("models", help="list or fetch the built-in models")
    models_parser.add_argument("--json", action="store_true", help="print the list as JSON")
    models_parser.set_defaults(func=cmd_models_list)
    models_commands = models_parser.add_subparsers(dest="models_command")
    models_commands.add_parser("list", help="built-ins and whether each is fetched").set_defaults(func=cmd_models_list, json=False)
    fetch = models_commands.add_parser("fetch", help="download, join and verify built-in GGUF models")
    fetch.add_argument("names", nargs="*", help=f"built-in names (default {models.DEFAULT_MODEL})")
    fetch.add_argument("--dequantise", action="store_true", help="also build the float32 safetensors cache")
    fetch.set_defaults(func=cmd_models_fetch)

    score = commands.add_parser("score", help="importance of every attention, MLP and block for a JSONL of texts")
    score.add_argument("--model", default=models.DEFAULT_MODEL, help="built-in name, checkpoint dir, .gguf file or Hub id")
    score.add_argument("--texts", help="JSONL file, one {\"text\": ...} object per line; each text is one sample")
    score.add_argument("--distributions", help="comma-separated distributions (code,math,code/go ...) or 'all'")
    score.add_argument("--out", default="scores.parquet", help="Parquet file to write (a .json sidecar goes beside it)")
    score.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help="samples x tokens per distribution: default 128x512, quick 32x256, paper 256x2048")
    score.add_argument("--samples", type=positive_int, help="samples per distribution (overrides the preset)")
    score.add_argument("--seq-len", type=positive_int, help="tokens per sample (overrides the preset; --texts: max length, default 512)")
    score.add_argument("--seed", type=int, default=0, help="seed of the sample windows")
    score.add_argument("--batch-size", type=positive_int, default=8)
    score.add_argument("--per-sample", action="store_true", help="one row per text and module instead of the aggregate")
    score.add_argument("--metrics", default="cosine,angular,relative_update",
                       help=f"comma-separated importance metrics (registered: {','.join(metric_names())}); the proxies share one "
                            "forward pass, ablation (the ground truth) re-runs blocks per module (default: %(default)s)")
    score.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    score.add_argument("--device-map", default=None, help="shard the model over devices with accelerate, e.g. auto")
    score.set_defaults(func=cmd_score)

    run = commands.add_parser("run", help="the whole study: score, compare, choose drop sets, prune, evaluate, report")
    run.add_argument("--model", default=models.DEFAULT_MODEL)
    run.add_argument("--out", default="results")
    run.add_argument("--preset", default="default", choices=["default", "quick", "paper"])
    run.add_argument("--dtype", default=None)
    run.add_argument("--device", default=None)
    run.set_defaults(func=cmd_run)

    compare = commands.add_parser("compare", help="stability tables and figures from per-sample scores")
    compare.add_argument("results", help="folder or .per_sample.parquet written by `calibdrop score --distributions`")
    compare.add_argument("--out", help="output folder (default: beside the results)")
    compare.add_argument("--modules", default="attn,mlp,block,joint")
    compare.add_argument("--k", default="4,8", help="drop-set sizes, comma-separated")
    compare.add_argument("--n-boot", type=positive_int, default=1000)
    compare.add_argument("--n-perm", type=positive_int, default=1000)
    compare.set_defaults(func=cmd_compare)

    agree = commands.add_parser("consensus", help="a drop set agreed across distributions, as JSON")
    agree.add_argument("results", help="folder or .per_sample.parquet written by `calibdrop score --distributions`")
    agree.add_argument("--module", default="attn", choices=stability.MODULE_KINDS)
    agree.add_argument("--k", type=positive_int, default=8)
    agree.add_argument("--method", default="borda", choices=consensus.METHODS)
    agree.add_argument("--metric", help="importance metric of the ranking (default: cosine, or the table's only metric)")
    agree.add_argument("--out", help="JSON file to write")
    agree.set_defaults(func=cmd_consensus)

    prune = commands.add_parser("prune", help="drop the modules of a drop set and save the pruned model")
    prune.add_argument("--model", default=models.DEFAULT_MODEL)
    prune.add_argument("--drop-set", required=True, help="drop-set JSON from `calibdrop consensus`")
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--dtype", default=None)
    prune.add_argument("--force", action="store_true", help="apply a drop set made for a model with another checksum")
    prune.set_defaults(func=cmd_prune)

    evaluate = commands.add_parser("evaluate", help="held-out perplexity and zero-shot accuracy of drop sets")
    evaluate.add_argument("--model", default=models.DEFAULT_MODEL)
    evaluate.add_argument("--drop-sets", nargs="*", help="drop-set JSON files")
    evaluate.add_argument("--from-scores", help="per-sample scores: evaluate each distribution's own set, consensus and random sets")
    evaluate.add_argument("--module", default="attn", choices=stability.MODULE_KINDS)
    evaluate.add_argument("--k", default="4,8", help="drop-set sizes for --from-scores")
    evaluate.add_argument("--methods", default="borda,minimax", help="consensus methods for --from-scores")
    evaluate.add_argument("--metric", help="importance metric for --from-scores (default: cosine, or the table's only metric)")
    evaluate.add_argument("--distributions", help="held-out perplexity on these distributions (comma-separated, or 'all')")
    evaluate.add_argument("--tasks", help=f"zero-shot tasks: {','.join(evaluation.PAPER_TASKS)}")
    evaluate.add_argument("--limit", type=positive_int, help="examples per task (per MMLU subject)")
    evaluate.add_argument("--samples", type=positive_int, default=32, help="held-out windows per distribution")
    evaluate.add_argument("--seq-len", type=positive_int, default=512)
    evaluate.add_argument("--out", default="evaluation")
    evaluate.add_argument("--dtype", default=None)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--force", action="store_true", help="apply drop sets made for a model with another checksum")
    evaluate.set_defaults(func=cmd_evaluate)

    checker = commands.add_parser("check", help="does a drop set still hold on your texts? drift, regret and a recommendation")
    checker.add_argument("--model", default=models.DEFAULT_MODEL, help="built-in name, checkpoint dir, .gguf file or Hub id (default: %(default)s)")
    checker.add_argument("--drop-set", required=True, help="drop-set JSON from `calibdrop consensus` (it names its source scores)")
    checker.add_argument("--texts", required=True, help="your JSONL file, one {\"text\": ...} object per line; each text is one sample")
    checker.add_argument("--scores", help="per-sample scores the drop set was built from, for drop sets that do not name them "
                                          "(default: the drop set's 'scores' entry)")
    checker.add_argument("--metric", help=f"importance metric ({','.join(metric_names())}; default: the drop set's)")
    checker.add_argument("--consensus-method", default="borda", choices=consensus.METHODS,
                         help="consensus set offered as the alternative (default: %(default)s)")
    checker.add_argument("--loss-samples", type=int, default=0,
                         help="measure the real perplexity of the sets on this many of your texts, at most half (default: %(default)s, off)")
    checker.add_argument("--max-length", type=positive_int, default=512, help="tokens per text, longer ones are cut (default: %(default)s)")
    checker.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass (default: %(default)s)")
    checker.add_argument("--alpha", type=float, default=0.05, help="significance level of the drift and loss tests (default: %(default)s)")
    checker.add_argument("--tolerance", type=float, default=0.1,
                         help="largest acceptable excess importance over your best set, as a fraction (default: %(default)s)")
    checker.add_argument("--n-perm", type=positive_int, default=1000, help="permutations of the drift test (default: %(default)s)")
    checker.add_argument("--seed", type=int, default=0, help="seed of the resampling and the loss subsample (default: %(default)s)")
    checker.add_argument("--out", default="check", help="folder for the tables (default: %(default)s)")
    checker.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    checker.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the model's)")
    checker.add_argument("--force", action="store_true", help="apply a drop set made for a model with another checksum")
    checker.set_defaults(func=cmd_check)

    data_parser = commands.add_parser("data", help="fetch or list the calibration distributions")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True)
    data_fetch = data_commands.add_parser("fetch", help="download, verify and extract distributions")
    data_fetch.add_argument("names", nargs="*", help="distributions (default: all top-level ones)")
    data_fetch.set_defaults(func=cmd_data_fetch)
    data_list = data_commands.add_parser("list", help="distributions with licenses and sizes per split")
    data_list.add_argument("--json", action="store_true")
    data_list.set_defaults(func=cmd_data_list)
    return parser


def init_distributed() -> None:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment (NCCL on GPUs, gloo on CPU)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, CalibdropWarning):
        return f"calibdrop: warning: {message}\n"
    return _default_warning_format(message, category, filename, lineno, line)


_default_warning_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    """Run a command. The error boundary: calibdrop's own errors and failures of the user's files or
    environment (OSError) print one line and exit 2; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    init_distributed()
    warnings.formatwarning = _warning_line
    try:
        args.func(args)
    except CalibdropError as error:
        print(f"calibdrop: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error).splitlines()[0]
        print(f"calibdrop: error:{where}: {reason}; check that the path exists and that you may read or write it", file=sys.stderr)
        return 2
    return 0
