"""``calibdrop export``: a drop set as a pruned checkpoint that stock transformers loads, as the paper's drop lists,
or as a GGUF file that llama.cpp runs.  It imports the heavy modules when it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from ..presets import DEFAULT_MODEL
from .commands import writable_output


def cmd_export(args) -> None:
    from .. import export
    from ..io import atomic_write_json
    from ..outputs import check_checkpoint, claim_file, identity_of, record_checkpoint
    from ..study.dropsets import read_drop_set

    record = read_drop_set(Path(args.drop_set))
    spec = args.model or record.get("model") or DEFAULT_MODEL
    if args.format == "paper":
        n_layers = export.model_layer_count(spec)
        lists = export.paper_drop_lists(record, n_layers)
        if args.out:
            out = writable_output(Path(args.out), folder=False)
            if not (out.is_file() and out.read_bytes() == json.dumps(lists, indent=2).encode()):
                claim_file(out, "export", identity_of(args), force=args.force)
            atomic_write_json(out, lists)
        print(json.dumps(lists))
        print(f"for {spec} ({n_layers} layers): put these keys in its config.json for the paper's code"
              + (f"; wrote {out}" if args.out else ""), file=sys.stderr)
        return
    if args.format == "gguf":
        return _export_gguf(args, record, spec)
    if not args.out:
        raise InputError("--format checkpoint needs --out FOLDER: where to write the pruned checkpoint")
    from ..models import loading as models

    out = writable_output(Path(args.out), folder=True)
    identity = identity_of(args)
    check_checkpoint(out, "export", identity, force=args.force)
    model, tokenizer = models.load_model(spec, dtype=args.dtype)
    out = export.export_checkpoint(model, tokenizer, record, out, force=args.force)
    record_checkpoint(out, "export", identity)
    code = (out / export.MODELING_FILE).is_file()
    print(f"saved to {out}; load it without calibdrop with AutoModelForCausalLM.from_pretrained({str(out)!r}"
          f"{', trust_remote_code=True' if code else ''})")


def _export_gguf(args, record: dict, spec: str) -> None:
    from .. import export_gguf

    if not args.out:
        raise InputError("--format gguf needs --out FILE.gguf: where to write the pruned model")
    out = writable_output(Path(args.out), folder=False)
    if out.exists() and not args.force:
        raise InputError(f"{out} exists: give another --out, or add --force to replace it")
    source = export_gguf.gguf_source(spec, record, force=args.force)
    plan = export_gguf.export_gguf(source, record, out, dtype=args.dtype)
    print(f"wrote {out}: llama.cpp architecture {plan.arch!r}, {len(plan.keep)} of {plan.source.n_layers} layers, "
          f"tensors {args.dtype or 'as in ' + source.name}; run it with llama.cpp, e.g. llama-cli -m {out}")
