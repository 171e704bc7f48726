"""The main job as a list of named stages: score, measure stability, choose drop sets, prune, evaluate, report.

Each :class:`Stage` declares the earlier stages it reads and the settings it depends on; its key
is the sha256 of those (with the model's checksum and dtype and the manifests' checksums, see
:func:`analysis.stages.stage_key`), and its tables are saved atomically in the
:class:`~analysis.stages.StageStore` of the output folder.  A rerun skips every stage whose saved
key matches, so a run killed at any point and started again recomputes nothing already saved;
figures and the report are rebuilt from the saved tables.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable

import pandas as pd

from .data.manifests import load_manifest, role
from .errors import InputError
from .importance.metrics import GROUND_TRUTH, check_metrics, get_metric
from .artifacts import left_out_tables, read_result_table, read_run_summary, warn_left_out
from .io import atomic_write_json, provenance
from .models import loading as models
from .outputs import check_run_settings, check_run_tables
from .presets import PRESETS, PRIMARY_METRIC, RunSettings, preset
from .report import plots, study_plots
from .report.sections import Results, write_report
from .stages import StageStore
from .study import consensus, stability
from .steps.calibration import (stage_aggregate, stage_decomposition, stage_drop_sets, stage_greedy,
                                stage_leave_one_out,
                                stage_per_sample, stage_regret, stage_scores_ablation, stage_scores_proxies,
                                stage_stability,
                                stage_subset_agreement, stage_subsets, stage_validity)
from .steps.core import STABILITY_TABLES, Stage, Study, budgets_union, subset_names, top_level_distributions, unseen_of
from .steps.heldout import (stage_accuracy, stage_accuracy_paired, stage_comparisons, stage_heldout,
                            stage_heldout_unseen,
                            stage_pruned, stage_resolution, stage_transfer, stage_transfer_unseen)
from .steps.lodo import stage_lodo, stage_lodo_sets, stage_lodo_windows
from .steps.routing import stage_check, stage_routing


def _checkable(settings: RunSettings) -> bool:
    """A check needs at least 4 held-out windows per distribution (for its split-half noise floor)."""
    return bool(settings.check_module and settings.transfer_samples >= 4)


def _routable(settings: RunSettings) -> bool:
    return bool(settings.route_module and settings.route_module in settings.transfer_modules)


def _lodo_on(settings: RunSettings) -> bool:
    """Leave-one-out needs ``lodo``, the ground truth and a greedy module."""
    return bool(settings.lodo and _ground_truth(settings) and settings.greedy_module)


def _ground_truth(settings: RunSettings) -> bool:
    return GROUND_TRUTH in settings.metrics


def _tokens(study: Study, names, samples: int, seq_len: int) -> float:
    return len(names) * samples * seq_len


def work_of(kind: str) -> Callable[[Study], float]:
    """A rough estimate of a stage's work in tokens through the whole model, for the run's ETA: proxies one pass, the
    ablation about half the model per candidate (3 per layer), greedy that per step and shortlisted candidate, held-out
    windows one pass plus about half per evaluated set, accuracy about 400 tokens per item and set, check one pass over
    the
    held-out windows, routing the routers' prefix (about a tenth of the model) over the held-out and calibration
    windows plus about half a pass per set the held-out stage did not evaluate (the ablation's own sets)."""
    def estimate(study: Study) -> float:
        s, distributions = study.settings, study.distributions
        if kind == "subsets":  # the one estimate that reads documents (for the subset names): only when asked for
            return _tokens(study, subset_names(study), s.subset_samples, s.subset_seq_len) if s.subsets else 0
        candidates = 3 * study.store.model_record.get("n_layers", 12)
        ablation = _tokens(study, distributions, s.ablation_samples, s.ablation_seq_len)
        n_sets = len(study.results["pruned"]) if "pruned" in study.results else 20
        return {
            "proxies": _tokens(study, distributions, s.samples, s.seq_len),
            "ablation": ablation * (1 + candidates / 2),
            "greedy": ablation * (len(distributions) + 1) * max(s.transfer_k) * (s.greedy_shortlist or candidates) / 2,
            "heldout": _tokens(study, distributions, s.heldout_budget, s.transfer_seq_len) / 2 if s.heldout_budget
            else _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) * (1 + n_sets / 2),
            "heldout_unseen": _tokens(study, study.unseen, s.unseen_windows, s.transfer_seq_len) * (1 + n_sets / 2),
            "accuracy": len(s.accuracy_sets) * len(s.tasks) * (s.task_limit or 1000) * 400,
            "check": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len),
            "routing": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) * (
                0.1 + (len(distributions) / 2 if GROUND_TRUTH in s.metrics else 0))
            + _tokens(study, distributions, s.samples, s.seq_len) / 10,
            "lodo_sets": ablation * (len(distributions) - 1) * max(s.transfer_k) * (s.greedy_shortlist or candidates)
            / 2,
            "lodo_windows": _tokens(study, distributions, s.transfer_samples, s.transfer_seq_len) * (1 + 4),
        }[kind]
    return estimate


SCORING = ("distributions", "metrics", "batch_size", "seed")
STAGES = (
    Stage("scores.proxies", (), (*SCORING, "samples", "seq_len"), stage_scores_proxies, work=work_of("proxies")),
    Stage("scores.ablation", (), (*SCORING, "ablation_samples", "ablation_seq_len"), stage_scores_ablation,
          when=_ground_truth, work=work_of("ablation")),
    Stage("scores.per_sample", ("scores.proxies", "scores.ablation"), (), stage_per_sample),
    Stage("scores", ("scores.per_sample",), (), stage_aggregate),
    Stage("subsets.per_sample", (), (*SCORING, "subset_samples", "subset_seq_len"), stage_subsets,
          when=lambda s: s.subsets, work=work_of("subsets")),
    Stage("stability", ("scores.per_sample",), ("budgets", "n_boot", "n_perm", "seed"), stage_stability,
          tables=STABILITY_TABLES),
    Stage("subset_agreement", ("subsets.per_sample",), ("budgets", "primary_metric"), stage_subset_agreement,
          when=lambda s: s.subsets),
    Stage("validity", ("scores.per_sample",), ("budgets", "n_boot", "seed"), stage_validity, when=_ground_truth),
    Stage("decomposition", ("scores.per_sample", "stability"), ("budgets", "n_boot", "seed"), stage_decomposition,
          tables=("decomposition", "data_or_metric")),
    Stage("drop_sets", ("scores.per_sample",), ("budgets",), stage_drop_sets),
    Stage("regret", ("scores.per_sample", "drop_sets"), (), stage_regret),
    Stage("leave_one_out", ("scores.per_sample",), ("budgets",), stage_leave_one_out),
    Stage("greedy", ("scores.per_sample",), ("greedy_module", "greedy_shortlist", "budgets", "transfer_k",
                                             "ablation_samples",
                                              "ablation_seq_len", "batch_size"), stage_greedy,
                                              when=lambda s: _ground_truth(s) and bool(s.greedy_module),
          work=work_of("greedy")),
    Stage("pruned", ("scores.per_sample", "greedy"), ("transfer_modules", "transfer_k", "budgets", "own_set_metrics",
                                                      "random_seeds",
                                                  "primary_metric"), stage_pruned),
    Stage("heldout_windows", ("pruned",), ("transfer_samples", "transfer_seq_len", "seed", "heldout_batch_size",
                                           "heldout_budget", "heldout_looks", "equivalence_margin", "n_boot",
                                           "primary_metric"),
          stage_heldout, tables=("heldout_windows", "heldout_looks"),
          work=work_of("heldout")),
    Stage("transfer", ("heldout_windows",), ("n_boot", "seed"), stage_transfer),
    Stage("heldout_windows_unseen", ("pruned", "heldout_windows"),
          ("unseen", "transfer_samples", "unseen_samples", "transfer_seq_len", "seed", "heldout_batch_size",
           "heldout_budget", "heldout_looks", "equivalence_margin", "n_boot", "primary_metric"),
          stage_heldout_unseen,
          when=lambda s: bool(unseen_of(s)), work=work_of("heldout_unseen")),
    Stage("transfer_unseen", ("heldout_windows_unseen",), ("n_boot", "seed"), stage_transfer_unseen,
          when=lambda s: bool(unseen_of(s))),
    Stage("comparisons", ("heldout_windows", "pruned"), ("n_boot", "seed", "primary_metric"), stage_comparisons),
    Stage("lodo_sets", ("scores.per_sample", "greedy"),
          ("greedy_module", "greedy_shortlist", "budgets", "transfer_k", "ablation_samples", "ablation_seq_len",
           "batch_size", "own_set_metrics", "lodo_probes", "transfer_samples", "transfer_seq_len", "seed",
           "primary_metric"),
          stage_lodo_sets, tables=("lodo_sets", "lodo_greedy", "lodo_nearest"), when=_lodo_on,
          work=work_of("lodo_sets")),
    Stage("lodo_windows", ("lodo_sets", "pruned", "heldout_windows"), ("transfer_samples", "transfer_seq_len", "seed",
                                                                      "heldout_batch_size"),
          stage_lodo_windows, when=_lodo_on, work=work_of("lodo_windows")),
    Stage("lodo", ("lodo_sets", "lodo_windows", "heldout_windows", "pruned"), ("n_boot", "seed", "primary_metric"),
          stage_lodo,
          tables=("lodo_choices", "lodo", "lodo_paired", "lodo_cost"), when=_lodo_on),
    Stage("accuracy", ("pruned", "heldout_windows"),
          ("tasks", "task_limit", "accuracy_sets", "heldout_budget", "heldout_looks", "equivalence_margin", "n_boot",
           "seed", "primary_metric"), stage_accuracy,
          tables=("accuracy_items", "accuracy"),
          when=lambda s: bool(s.tasks and s.accuracy_sets), work=work_of("accuracy")),
    Stage("accuracy_paired", ("accuracy", "pruned"), ("task_limit", "n_boot", "seed"), stage_accuracy_paired,
          tables=("accuracy_paired", "accuracy_tasks"), when=lambda s: bool(s.tasks and s.accuracy_sets)),
    Stage("check", ("scores.per_sample",), ("check_module", "budgets", "transfer_k", "transfer_samples",
                                            "transfer_seq_len", "batch_size", "n_perm",
                                            "n_boot", "seed", "primary_metric"), stage_check, when=_checkable,
          work=work_of("check")),
    Stage("routing", ("scores.per_sample", "heldout_windows", "pruned"),
          ("route_module", "budgets", "transfer_k", "samples", "seq_len", "batch_size", "heldout_batch_size", "n_boot",
           "seed", "primary_metric", "route_truth_own"),
          stage_routing, tables=("routing", "routing_paired", "routing_accuracy"), when=_routable,
          work=work_of("routing")),
    Stage("resolution", ("heldout_windows", "transfer", "pruned", "comparisons", "validity", "stability",
                         "decomposition", "routing"), ("n_boot", "seed", "ablation_samples", "ablation_seq_len",
                                                       "primary_metric", "equivalence_margin", "heldout_budget",
                                                       "heldout_looks"),
          stage_resolution,
          tables=("set_groups", "claims")),
)


def compare_tables(scores: pd.DataFrame, modules, k, n_boot: int, n_perm: int) -> dict[str, pd.DataFrame]:
    """Stability tables plus leave-one-distribution-out regret per module (with three or more distributions), at the
    largest k that fits."""
    tables = stability.stability_tables(scores, modules=modules, k=k, n_boot=n_boot, n_perm=n_perm)
    if scores["distribution"].nunique() >= 3:
        tables["leave_one_out"] = consensus.leave_one_out_at_budgets(scores, {module: k for module in modules})
    return tables


class ProgressRate:
    """Seconds per unit of estimated work, measured on the stages computed so far (reused ones take no time)."""

    def __init__(self):
        self.work, self.seconds = 0.0, 0.0

    def add(self, work: float, seconds: float) -> None:
        self.work += work
        self.seconds += seconds

    def eta(self, remaining: float) -> str:
        """``", about N min left"`` once some work has been timed, else nothing."""
        if self.work <= 0:
            return ""
        return f", about {remaining * self.seconds / self.work / 60:.0f} min left"


def settings_of(choice: str | RunSettings) -> RunSettings:
    """A preset's settings by name, or the given settings."""
    if isinstance(choice, RunSettings):
        return choice
    try:
        return preset(choice)
    except ValueError as error:
        raise InputError(str(error)) from None


def run(spec: str = models.DEFAULT_MODEL, out: Path = Path("results"), *, preset: str | RunSettings = "default",
        dtype=None, device=None, progress: bool = True, log: Callable[[str], None] = print,
        figures: bool = True, force: bool = False) -> dict:
    """Run the whole study for one model into ``out``: every stage of :data:`STAGES` in order, then figures (unless
    ``figures`` is false: :func:`render_report` draws them later from the tables) and the report.  A folder holding
    another run or another command's output is refused before any work unless ``force``
    (:mod:`analysis.outputs`); the same run resumes."""
    settings = settings_of(preset)
    for name in top_level_distributions(settings):
        if role(load_manifest(name)) == "test":
            raise InputError(
                f"distribution {name!r} is test-only (role: test in its manifest): no stage may calibrate on it; "
                             "it is evaluated as an unseen distribution (settings.unseen) instead")
    for name in unseen_of(settings):
        load_manifest(name)
    check_metrics(settings.metrics)
    if settings.primary_metric not in settings.metrics or not get_metric(settings.primary_metric).is_proxy:
        raise InputError(f"primary_metric {settings.primary_metric!r} must be one of the run's proxy metrics "
                         f"({', '.join(m for m in settings.metrics if get_metric(m).is_proxy)})")
    check_run_settings(out, asdict(settings), force=force)
    with models.float32_matmul_precision(settings.matmul_precision):
        return _run(spec, Path(out), settings, dtype=dtype, device=device, progress=progress, log=log, figures=figures,
                    force=force)


def planned_keys(study: Study, stages) -> dict[str, str]:
    """``{table: stage key}`` of every table ``stages`` save, as :meth:`Study.run_stage` will key them."""
    keys = {}
    for stage in stages:
        study.keys[stage.name] = study.key(stage)
        keys.update(dict.fromkeys(stage.outputs, study.keys[stage.name]))
    return keys


def _run(spec: str, out: Path, settings: RunSettings, *, dtype, device, progress: bool, log: Callable[[str], None],
         figures: bool, force: bool) -> dict:
    """:func:`run` once its settings are checked, at their matmul precision."""
    started = time.perf_counter()
    model, tokenizer = models.load_model(spec, dtype=dtype, device=device)
    record = models.model_info(model)
    study = Study(model, tokenizer, settings, StageStore(out, record, log), progress)
    timings = {"load model": round(time.perf_counter() - started, 1)}
    stages = [stage for stage in STAGES if stage.when(settings)]
    check_run_tables(out, record, planned_keys(study, stages), force=force)
    rate = ProgressRate()
    for number, stage in enumerate(stages, start=1):
        remaining = sum(later.work(study) for later in stages[number - 1:])
        log(
            f"stage {number} of {len(stages)}: {stage.name} ({(time.perf_counter() - started) / 60:.1f} min "
            f"elapsed{rate.eta(remaining)})")
        begin = time.perf_counter()
        computed = len(study.store.computed)
        study.run_stage(stage)
        timings[stage.name] = round(time.perf_counter() - begin, 1)
        if len(study.store.computed) > computed:
            rate.add(stage.work(study), timings[stage.name])
    tables = {
        name: study.results[
            name] for stage in stages for name in stage.outputs if name not in (
                "scores", "scores.proxies", "scores.ablation")}
    tables.setdefault("accuracy", pd.DataFrame())
    top = tables.pop("scores.per_sample")
    begin = time.perf_counter()
    drawn = draw_figures(top, tables, out / "figures", max(budgets_union(settings)),
                         settings.primary_metric) if figures else []
    timings["figures"] = round(time.perf_counter() - begin, 1)
    report = write_report(out, Results(record, settings, top, tables, drawn))
    summary = {
        "out": str(out.resolve()),
        "report": [str(p) for p in report],
        "figures": len(drawn),
        "stages_computed": study.store.computed,
        "stages_reused": study.store.reused,
        "stage_keys": {name: study.keys[stage.name] for stage in stages for name in stage.outputs},
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
    }
    atomic_write_json(out / "run_summary.json", {**summary,
                                                 "provenance": provenance(
                                                     kind="run", model=record, settings=asdict(settings))})
    return summary


NOT_REPORTED = ("scores", "scores.proxies", "scores.ablation", "scores.per_sample", "subsets.per_sample",
                "heldout_windows", "heldout_windows_unseen", "lodo_windows", "accuracy_items")


def settings_from_record(record: dict) -> RunSettings:
    """The :class:`RunSettings` a run recorded (``dataclasses.asdict`` in ``run_summary.json``): lists back to tuples,
    fields the record lacks (written before they existed) at their defaults, fields this version lacks ignored."""
    known = {f.name for f in dataclass_fields(RunSettings)}
    values = {name: tuple(value) if isinstance(value, list) else value for name,
              value in record.items() if name in known}
    if "budgets" in values:
        values["budgets"] = {module: tuple(sizes) for module, sizes in values["budgets"].items()}
    return RunSettings(**values)


def saved_tables(out: Path, settings: RunSettings, record: dict) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The report's tables as the run in ``out`` saved them, each read and checked by
    :func:`~analysis.artifacts.read_result_table` (a damaged one is an :class:`InputError`), and those left out with
    why (:func:`left_out_tables`); a table left out, or one of a stage the run skipped, is empty."""
    names = [name for stage in STAGES if stage.when(settings) for name in stage.outputs if name not in NOT_REPORTED]
    saved = {name: read_result_table(out / f"{name}.parquet") for name in names if (out / f"{name}.parquet").is_file()}
    left_out = left_out_tables(names, saved, record)
    tables = {name: pd.DataFrame() if name in left_out else saved.get(name, pd.DataFrame()) for name in names}
    tables.setdefault("accuracy", pd.DataFrame())
    return tables, left_out


def render_report(out: Path, *, figures: bool = True) -> dict:
    """Rewrite ``report.md``, ``report.html`` and (unless ``figures`` is false) ``figures/`` of a finished run folder
    from its saved tables alone, without the model: the settings and model record come from ``run_summary.json``
    (:func:`~analysis.artifacts.read_run_summary`).  A table the run lists but that is missing or stale is left out with
    a warning and a note in the report (:func:`left_out_tables`)."""
    out = Path(out)
    record = read_run_summary(out)
    saved = record["provenance"]
    settings = settings_from_record(saved["settings"])
    top = read_result_table(out / "scores.per_sample.parquet")
    tables, left_out = saved_tables(out, settings, record)
    warn_left_out(out, left_out, "the report leaves out what they hold")
    drawn = draw_figures(top, tables, out / "figures", max(budgets_union(settings)),
                         settings.primary_metric) if figures else []
    report = write_report(out, Results(saved["model"], settings, top, tables, drawn, left_out))
    return {"report": [str(p) for p in report], "figures": [str(p) for p in drawn]}


def draw_figures(scores, tables, folder: Path, k: int, metric: str = PRIMARY_METRIC) -> list[Path]:
    """Every figure of the report; the single-metric ones (stability, regret, proxy against ablation) of ``metric``."""
    primary, primary_tables = stability.one_metric(scores, metric)[0], stability.tables_of_metric(tables, metric)
    written = plots.stability_figures(primary, primary_tables, folder, k)
    if len(tables.get("transfer", [])):
        written += plots.save_figure(study_plots.transfer_heatmap(tables["transfer"]), folder / "transfer_matrix")
        written += plots.save_figure(study_plots.worst_case_forest(tables["transfer"]), folder / "transfer_worst_case")
    if len(tables.get("regret", [])):
        written += plots.save_figure(study_plots.regret_overview(primary_tables["regret"]),
                                     folder / "regret_consensus_vs_single")
    if len(tables.get("validity", [])):
        written += plots.save_figure(study_plots.validity_heatmap(tables["validity"]), folder / "metric_validity")
        written += plots.save_figure(study_plots.proxy_vs_ablation(scores, metric), folder / "proxy_vs_ablation")
    if len(tables.get("decomposition", [])):
        written += plots.save_figure(study_plots.decomposition_bars(tables["decomposition"]),
                                     folder / "ranking_decomposition")
    return written


__all__ = ["PRESETS", "STAGES", "RunSettings", "Stage", "Study", "render_report", "run"]
