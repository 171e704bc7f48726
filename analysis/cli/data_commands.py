"""The ``calibdrop models`` and ``calibdrop data`` commands: built-in models and calibration distributions.

Like every command they import the heavy modules when they run."""

from __future__ import annotations

import sys

from ..presets import DEFAULT_MODEL
from .commands import print_json, print_table


def cmd_models_list(args) -> None:
    import pandas as pd

    from ..models import loading as models

    status = pd.DataFrame(models.builtin_status())
    if args.json:
        print_json(status)
        return
    print_table(status if args.wide else status[["name", "family", "layers", "fetched", "license"]], args.wide)
    print(f"\ncache: {models.cache_dir() / 'models'}   (--wide: requirements and descriptions; --json: everything)")


def cmd_models_fetch(args) -> None:
    from ..models import loading as models

    for name in args.names or [DEFAULT_MODEL]:
        path = models.fetch_builtin(name)
        print(f"{name}: {path} (sha256 verified)")
        if args.dequantise:
            model, _ = models.load_model(name)
            print(f"{name}: float32 cache ready at {model.calibdrop_info.path}")


def cmd_data_fetch(args) -> None:
    from tqdm.auto import tqdm

    from ..data.documents import fetch_distribution
    from ..data.manifests import top_level, unseen_distributions

    names = args.names or [*top_level(), *unseen_distributions()]
    for name in tqdm(names, desc="distributions", unit="dist", disable=not sys.stderr.isatty()):
        frame = fetch_distribution(name)
        print(f"{name}: {len(frame)} documents, checksums verified")


def describe_sources(sources: list[dict]) -> str:
    """``package=version`` of each fetched source, with the pin where a newer Debian revision replaced it."""
    return ", ".join(
        f"{s['package']}={s['version']}" + (
            f" (pinned {s['pinned_version']}, sha256 {s['sha256']})" if s.get("pinned_version") else "")
        for s in sources if s.get("package")
    )


def cmd_data_list(args) -> None:
    from ..data.documents import distribution_summary

    summary = distribution_summary()
    if args.json:
        print_json(summary)
        return
    if args.wide:
        print_table(summary.assign(sources=summary["sources"].map(describe_sources)), wide=True)
        return
    narrow = summary.rename(columns={"calibration_documents": "calib docs", "heldout_documents": "held-out docs"})
    print_table(narrow[["name", "role", "fetched", "calib docs",
                        "held-out docs"]].assign(license=summary["license"].str.slice(0, 30)))
    print("\n(--wide: characters, sources and pinned versions; --json: everything)")
