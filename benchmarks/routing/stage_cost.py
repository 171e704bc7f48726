"""Cost of the ``routing`` stage before and after it computed each window's routing features once and read the routed
NLL from the static table (commit "routing stage: routing features computed once per window..."), on a finished run's
tables, in one process on one machine.

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/routing/stage_cost.py /tmp/preset-run-default \
      --out benchmarks/results/routing-stage-cost-smollm2-135m-cpu.json

The run folder must hold ``scores.per_sample``, ``heldout_windows`` and ``pruned`` of a run of ``--model`` with
``--preset``'s settings (``--samples`` overrides the calibration windows per distribution the routers train on).
``before`` is the stage as it was (its routing part kept verbatim below): per family,
:func:`~analysis.evaluation.routing.fit_router` runs every calibration window up to the family's routing block and
the routed model (:class:`~analysis.evaluation.routing.RoutedModel`) really runs every held-out window.  ``after`` is
:func:`analysis.steps.routing.stage_routing`.  Both start from the same data already loaded once (untimed), run
one after the other (``before`` first), and their tables (``routing``, ``routing_paired``, ``routing_accuracy``) are
compared: per float column the largest absolute and relative difference, other columns equal or not.  Then
``static``: :func:`~analysis.steps.routing.routing_static` alone, the part both share (the held-out NLL of every set
routed between, read from ``heldout_windows`` or, for sets the held-out stage did not evaluate, evaluated), so
``(before - static) / (after - static)`` is the ratio on the work this change touches.  The machine is shared: the
JSON records the load average around each timing; read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analysis.errors import InputError  # noqa: E402
from analysis.evaluation import heldout as evaluation  # noqa: E402
from analysis.evaluation import routing  # noqa: E402
from analysis.evaluation.lodo import known_windows  # noqa: E402
from analysis.io import read_table  # noqa: E402
from analysis.models import loading as models  # noqa: E402
from analysis.models.adapters import decoder_layers  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402
from analysis.steps.core import top_level_distributions  # noqa: E402
from analysis.steps.routing import (family_tables, routing_families, routing_inputs, routing_result,  # noqa: E402
                                    routing_static, stage_routing)
from analysis.study.lodo import set_key  # noqa: E402


def stage_routing_before(study) -> dict[str, pd.DataFrame]:
    """The routing stage before the change: per family a router fitted on its own pass over the calibration windows
    and the routed model really run on the held-out windows (as it was, verbatim); the inputs and the tables built
    from them by the same functions as the stage (:func:`routing_inputs`, :func:`family_tables`,
    :func:`routing_result`)."""
    s = study.settings
    module, k, families, samples, static, best = routing_inputs(study)
    batches = routing.calibration_batches(study.tokenizer, study.distributions, n_samples=s.samples,
                                          seq_len=s.seq_len, seed=s.seed, batch_size=s.batch_size)
    tables = []
    for family, (sets, own, metric) in families.items():
        try:
            layer = routing.routing_layer(sets)
        except InputError as error:
            tables.append({"summary": pd.DataFrame([{"module": module, "k": k, "note": str(error), "family": family}])})
            continue
        router = routing.fit_router(study.model, batches, layer)
        routes = routing.routed_window_nll(
            routing.RoutedModel(study.model, sets, router, own), samples, batch_size=s.batch_size, seed=s.seed
        )
        tables.append(family_tables(study, family, sets, own, metric, layer, static, routes, best))
    return routing_result(tables)


def compare(before: pd.DataFrame, after: pd.DataFrame) -> dict:
    """Same columns and rows (in the stage's order); per float column the largest absolute and relative difference,
    the other columns' unequal cells."""
    if list(before.columns) != list(after.columns) or len(before) != len(after):
        return {"same_shape": False, "columns": [list(before.columns), list(after.columns)],
                "rows": [len(before), len(after)]}
    out = {"same_shape": True, "float_columns": {}, "unequal_other_cells": {}}
    for column in before.columns:
        a, b = before[column], after[column]
        if a.dtype.kind == "f":
            both = a.notna() & b.notna()
            diff = (a[both] - b[both]).abs()
            scale = np.maximum(a[both].abs(), b[both].abs()).replace(0, np.nan)
            out["float_columns"][column] = {
                "max_abs": float(diff.max()) if len(diff) else 0.0,
                "max_rel": float((diff / scale).max()) if len(diff) and scale.notna().any() else 0.0,
                "unequal_cells": int((diff != 0).sum() + (a.isna() != b.isna()).sum())}
        else:
            unequal = ~((a.astype(str) == b.astype(str)) | (a.isna() & b.isna()))
            if unequal.any():
                out["unequal_other_cells"][column] = int(unequal.sum())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder of --model with --preset's settings")
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="the run's preset (default: %(default)s)")
    parser.add_argument("--samples", type=int, help="calibration windows per distribution (default: the preset's)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args()

    settings = PRESETS[args.preset]
    if args.samples is not None:
        settings = dataclasses.replace(settings, samples=args.samples)
    model, tokenizer = models.load_model(args.model)
    study = SimpleNamespace(model=model, tokenizer=tokenizer, settings=settings,
                            distributions=top_level_distributions(settings),
                            results={name: read_table(args.run / f"{name}.parquet")
                                     for name in ("scores.per_sample", "heldout_windows", "pruned")})
    s = settings
    routing.calibration_batches(tokenizer, study.distributions, n_samples=s.samples, seq_len=s.seq_len, seed=s.seed,
                                batch_size=s.batch_size)  # documents loaded and tokenised once, untimed
    evaluation.heldout_samples(tokenizer, study.distributions, n_samples=s.transfer_samples,
                               seq_len=s.transfer_seq_len, seed=s.seed)
    def static(study):
        module, k = s.route_module, max(s.budget(s.route_module))
        families = routing_families(study, module, k)
        samples = evaluation.heldout_samples(tokenizer, study.distributions, n_samples=s.transfer_samples,
                                             seq_len=s.transfer_seq_len, seed=s.seed)
        wanted = {label: spec for sets, _, _ in families.values() for label, spec in sets.items()}
        return routing_static(study, wanted, samples, module, k)

    timings, tables = {}, {}
    for name, stage in (("before", stage_routing_before), ("after", stage_routing), ("static", static)):
        load = os.getloadavg()
        start = time.perf_counter()
        tables[name] = stage(study)
        timings[name] = {"seconds": time.perf_counter() - start, "load_average_1_5_15_at_start": load,
                         "load_average_1_5_15_at_end": os.getloadavg()}
        print(f"{name}: {timings[name]['seconds']:.1f} s", flush=True)
    known = set(known_windows(study.results["heldout_windows"], study.results["pruned"])["key"])
    module, k = s.route_module, max(s.budget(s.route_module))
    evaluated = [label for sets, _, _ in routing_families(study, module, k).values() for label, spec in sets.items()
                 if set_key(module, spec.indices) not in known]
    layers = tables["after"]["routing"].groupby("family")["layer"].first().to_dict()
    record = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model, "preset": args.preset, "run_folder": str(args.run),
        "settings": {"samples": s.samples, "seq_len": s.seq_len, "transfer_samples": s.transfer_samples,
                     "transfer_seq_len": s.transfer_seq_len, "batch_size": s.batch_size, "n_boot": s.n_boot,
                     "distributions": list(study.distributions), "route_module": s.route_module},
        "routing_layer_by_family": {str(k): int(v) for k, v in layers.items()},
        "n_layers": len(decoder_layers(model)),
        "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "torch_threads": torch.get_num_threads()},
        "timings": timings,
        "ratio_before_over_after": timings["before"]["seconds"] / timings["after"]["seconds"],
        "sets_routing_static_evaluates": evaluated,
        "ratio_before_over_after_without_static": (timings["before"]["seconds"] - timings["static"]["seconds"])
        / (timings["after"]["seconds"] - timings["static"]["seconds"]),
        "tables": {name: compare(tables["before"][name], tables["after"][name]) for name in tables["before"]},
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("ratio_before_over_after", "ratio_before_over_after_without_static",
                                             "sets_routing_static_evaluates", "tables")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
