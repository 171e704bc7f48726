"""The ``calibdrop`` command line (also ``python -m analysis``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

from . import models
from .errors import CalibdropError, InputError
from .io import provenance, write_table
from .scoring import score_texts


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file {path} does not exist")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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


def cmd_score(args) -> None:
    texts_path = Path(args.texts)
    texts = read_jsonl_texts(texts_path)
    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    table = score_texts(
        model, tokenizer, texts, max_length=args.max_length, batch_size=args.batch_size, per_sample=args.per_sample
    )
    record = provenance(
        kind="scores-per-sample" if args.per_sample else "scores",
        model=models.model_info(model),
        texts={"path": str(texts_path), "sha256": hashlib.sha256(texts_path.read_bytes()).hexdigest(), "n_texts": len(texts)},
        settings={"max_length": args.max_length, "batch_size": args.batch_size, "per_sample": args.per_sample},
    )
    out = write_table(table.assign(model=args.model), Path(args.out), record)
    print(f"wrote {out} and {out.with_suffix('.json').name}")


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
    score.add_argument("--texts", required=True, help="JSONL file, one {\"text\": ...} object per line")
    score.add_argument("--out", default="scores.parquet", help="Parquet file to write (a .json sidecar goes beside it)")
    score.add_argument("--max-length", type=int, default=512)
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--per-sample", action="store_true", help="one row per text and module instead of the aggregate")
    score.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    score.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CalibdropError as error:
        print(f"calibdrop: error: {error}", file=sys.stderr)
        return 2
    return 0
