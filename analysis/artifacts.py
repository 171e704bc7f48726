"""A run folder's files read and checked before anything uses them: ``run_summary.json`` and every table's JSON
sidecar against a JSON schema, every Parquet table's columns, dtypes and missing values against what its stage
writes (:data:`TABLE_COLUMNS`).

Every reader of a run folder goes through here (``calibdrop report`` and ``summary``, the per-sample scores that
``check``, ``route``, ``compare`` and ``consensus`` read, the notebooks through :mod:`analysis.report.summary`, and the
stage store when it reuses a table), so a damaged file is one :class:`~analysis.errors.InputError` line that names
it, says what is wrong and what to do, never a traceback.

A table's columns are written ``"name:kind"``, kinds ``str``, ``int``, ``bool``, ``list``, ``float`` (numbers, NaN
included: a correlation of a constant ranking, a reliability below zero corrected) and ``finite`` (numbers never
NaN: what a stage computes from measured losses and scores, which are finite or stop the run); a trailing ``?``
lets a column of another kind hold missing values.  Only the columns every run writes are listed: a table may have
more (``jaccard@k`` per budget, a column added later), and an empty table is checked for its columns alone.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd

from .errors import CalibdropError, CalibdropWarning, InputError
from .io import read_json_file, read_table
from .presets import MATMUL_PRECISIONS, MODULE_KINDS, RunSettings

RUN_SUMMARY = "run_summary.json"
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

# How ``RunSettings``' annotations are recorded by ``dataclasses.asdict`` in run_summary.json.
_ANNOTATIONS = {
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "int | None": {"type": ["integer", "null"]},
    "str | None": {"type": ["string", "null"]},
    "tuple[str, ...]": {"type": "array", "items": {"type": "string"}},
    "tuple[int, ...]": {"type": "array", "items": {"type": "integer"}},
    "tuple[str, ...] | None": {"type": ["array", "null"], "items": {"type": "string"}},
    "dict": {"type": "object", "minProperties": 1,
             "additionalProperties": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}}},
}
# The settings every run_summary.json has recorded; later fields may be absent (read at their defaults).
_RECORDED_SETTINGS = (
    "distributions", "subsets", "metrics", "samples", "seq_len", "ablation_samples", "ablation_seq_len",
    "greedy_module", "greedy_shortlist", "subset_samples", "subset_seq_len", "batch_size", "heldout_batch_size", "seed",
    "n_boot", "n_perm", "budgets", "transfer_modules", "transfer_k", "own_set_metrics", "transfer_samples",
    "transfer_seq_len", "random_seeds", "tasks", "task_limit", "accuracy_sets", "check_module", "route_module",
    "unseen", "lodo", "lodo_probes")

MODEL_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {"type": "string"}, "source": {"type": ["string", "null"]}, "family": {"type": ["string", "null"]},
        "model_type": {"type": ["string", "null"]}, "n_layers": {"type": ["integer", "null"], "minimum": 1},
        "weights_sha256": {"type": ["string", "null"]}, "dtype": {"type": ["string", "null"]},
    },
}


_KIND = {"enum": list(MODULE_KINDS)}
_KIND_OR_NONE = {"type": ["string", "null"], "enum": [*MODULE_KINDS, None]}  # greedy_module is None in some runs
# Settings whose values are names from a fixed list (metrics are not: a user may register one).
_CHOICES = {
    "budgets": {"propertyNames": _KIND}, "transfer_modules": {"items": _KIND}, "greedy_module": _KIND_OR_NONE,
    "check_module": _KIND_OR_NONE, "route_module": _KIND_OR_NONE, "matmul_precision": {"enum": list(MATMUL_PRECISIONS)},
}


def settings_schema() -> dict:
    """JSON schema of a run's recorded :class:`~analysis.presets.RunSettings`, from the dataclass's annotations (and
    the names some settings must be one of)."""
    return {"type": "object", "required": list(_RECORDED_SETTINGS),
            "properties": {f.name: {**_ANNOTATIONS.get(str(f.type), {}), **_CHOICES.get(f.name, {})}
                           for f in fields(RunSettings)}}


RUN_SUMMARY_SCHEMA = {
    "type": "object",
    "required": ["provenance"],
    "properties": {
        "stages_computed": {"type": "array", "items": {"type": "string"}},
        "stages_reused": {"type": "array", "items": {"type": "string"}},
        "stage_keys": {"type": "object", "additionalProperties": _SHA256},
        "provenance": {"type": "object", "required": ["model", "settings"],
                       "properties": {"model": MODEL_SCHEMA, "settings": settings_schema()}},
    },
}

SIDECAR_SCHEMA = {
    "type": "object",
    "properties": {"kind": {"type": "string"}, "stage_key": _SHA256, "content_sha256": _SHA256,
                   "model": MODEL_SCHEMA},
}


def _columns(specs: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"table": "a:str b:int? ..."}`` → ``{"table": {"a": "str", "b": "int?"}}``."""
    return {table: dict(column.rsplit(":", 1) for column in spec.split()) for table, spec in specs.items()}


_SCORES = "metric:str sample:int layer:int module:str stat_sum:finite n_tokens:int importance:finite distribution:str"
_HELDOUT = "drop_set:str distribution:str window:int nll_sum:finite n_tokens:int"
_RATIOS = "drop_set:str distribution:str ppl:float ppl_unpruned:float ppl_ratio:finite ci_low:finite ci_high:finite"
_PAIRED = ("comparison:str a:str b:str distribution:str effect:finite ratio:finite ci_low:finite ci_high:finite "
           "p_value:finite p_floor:finite se:finite n_windows:int")
_PAIRS = "metric:str module:str a:str b:str spearman:float"
_GREEDY = "objective:str module:str step:int candidate:str objective_increase:finite"

# The columns each stage's table has in every run: those of the reference runs of three models, the smoke run and
# the tiny-model run the tests make (tests/test_artifacts.py checks every table of the last two against them).
TABLE_COLUMNS = _columns({
    "scores.proxies": _SCORES, "scores.ablation": _SCORES, "scores.per_sample": _SCORES,
    "subsets.per_sample": _SCORES,
    "scores": "metric:str distribution:str layer:int module:str stat_sum:finite n_tokens:int n_samples:int "
              "importance:finite",
    "agreement": f"{_PAIRS} kendall_tau_b:float weighted_tau:float",
    "subset_agreement": f"{_PAIRS} kendall_tau_b:float weighted_tau:float",
    "bootstrap_importance": "metric:str distribution:str candidate:str importance:finite ci_low:finite ci_high:finite "
                            "module:str",
    "bootstrap_pair_mean": "metric:str module:str n_pairs:int spearman:float spearman_min:float spearman_ci_low:float "
                           "spearman_ci_high:float",
    "bootstrap_pairs": f"{_PAIRS} spearman_ci_low:float spearman_ci_high:float",
    "split_half": "metric:str distribution:str module:str n_samples:int split_half_spearman:float reliability:float "
                  "reliability_ci_low:float reliability_ci_high:float",
    "permutation": f"{_PAIRS} p_spearman:float",
    "convergence": "metric:str distribution:str module:str n:int reference_n:int spearman_mean:float "
                   "spearman_std:float",
    "convergence_summary": "metric:str distribution:str module:str n_available:int target_spearman:float "
                           "n_required:float n_required_label:str",
    "validity": "distribution:str module:str metric:str spearman:float kendall:float spearman_ci_low:float "
                "spearman_ci_high:float kendall_ci_low:float kendall_ci_high:float",
    "decomposition": "module:str axis:str held:str mean_spearman:float min_spearman:float mean_corrected:float "
                     "n_pairs:int",
    "data_or_metric": "module:str across_distributions:float across_metrics:float difference:float ci_low:float "
                      "ci_high:float se:float n_samples:int n_proxies:int n_distributions:int",
    "drop_sets": "metric:str module:str k:int drop_set:str indices:list",
    "regret": "drop_set:str distribution:str k:int dropped_importance:finite best_importance:finite regret:finite "
              "metric:str module:str",
    "leave_one_out": "held_out:str metric:str module:str k:int single_mean_regret:finite single_best_regret:finite "
                     "single_worst_regret:finite random_regret:finite method:str consensus_regret:finite drop_set:list",
    "greedy": _GREEDY,
    "pruned": "drop_set:str module:str? k:int method:str metric:str? indices:list sources:list parameters:int "
              "parameters_removed:finite",
    "heldout_windows": _HELDOUT, "heldout_windows_unseen": _HELDOUT,
    "heldout_looks": "look:int windows:int sets:int set_windows:int spent:int open:float ended:str",
    "transfer": f"{_RATIOS} n_windows:int metric:str? module:str? k:int method:str",
    "transfer_unseen": f"{_RATIOS} n_windows:int metric:str? module:str? k:int method:str",
    "comparisons": _PAIRED,
    "lodo_sets": "held_out:str variant:str name:str role:str module:str k:int metric:str indices:list key:str "
                 "note:str",
    "lodo_greedy": f"{_GREEDY} held_out:str trials_computed:int trials_requested:int passes:int",
    "lodo_nearest": "held_out:str candidate:str spearman:float nearest:bool variant:str",
    "lodo_choices": "held_out:str variant:str procedure:str key:str module:str k:int metric:str indices:list "
                    "judged_on:str judged_worst:float note:str",
    "lodo_windows": "key:str distribution:str window:int nll_sum:finite n_tokens:int",
    "lodo": f"{_RATIOS} n_windows:int procedure:str? module:str? k:int variant:str",
    "lodo_paired": _PAIRED,
    "lodo_cost": "greedy_paths:int greedy_trials_requested:int greedy_trials_run:int greedy_passes:int "
                 "greedy_stage_trials:int pairs_needed:int pairs_looked_up:int pairs_evaluated:int "
                 "heldout_stage_pairs:int",
    "accuracy_items": "task:str subtask:str item:str correct:finite correct_norm:finite subtask_items:int drop_set:str",
    "accuracy": "task:str metric:str value:finite n:int stderr:float chance:float drop_set:str",
    "accuracy_paired": "comparison:str measure:str task:str a:str b:str",
    "accuracy_tasks": "task:str measure:str accuracy:float chance:float n_items:int n_available:int "
                      "p_above_chance:float alpha:float included:bool discordant_min:float discordant_max:float "
                      "items_needed_min:float items_needed_max:float limit_suffices:bool task_suffices:bool "
                      "delta:float power:float",
    "check": "metric:str module:str k:int drop_set:str sources:str n_texts:int spearman:float noise_floor:float "
             "noise_floor_ci_low:float noise_floor_ci_high:float calibration_noise_floor:float p_permutation:float "
             "p_floor:float drift:bool regret:float excess:float consensus_excess:float verdict:str "
             "distribution:str checked:str recommendation:str",
    "routing": "drop_set:str? distribution:str? ppl:float ppl_unpruned:float ppl_ratio:float ci_low:float "
               "ci_high:float n_windows:float metric:str? module:str k:int method:str? layer:float n_layers:float "
               "layer_ratio:float max_abs_static_difference:float family:str best_static:str?",
    "routing_paired": f"{_PAIRED} family:str",
    "routing_accuracy": "distribution:str n_windows:int correct:int accuracy:finite ci_low:finite ci_high:finite "
                        "family:str",
    "set_groups": "module:str k:int drop_set:str rank:int ppl_ratio:finite ci_low:finite ci_high:finite "
                  "same_as_best:bool ratio_to_best:float pair_ci_low:float pair_ci_high:float p_value:float "
                  "separated:bool in_group:bool windows_needed:float n_windows:float resolved:bool",
    "claims": "claim:str module:str? k:int? subject:str finding:str estimate:float ci_low:float ci_high:float "
              "resolved:bool needs:str windows_needed:float tokens_needed:float samples_needed:float",
})


def schema_problem(value, schema: dict) -> str | None:
    """What makes ``value`` fail ``schema`` (where and why, in a few words), or ``None``."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return f"{'at ' + where if where else 'at its top level'}: {message}"


def rerun_hint(folder: Path) -> str:
    """What to do about a damaged or missing table of the run folder ``folder``."""
    return (f"rerun `calibdrop run --out {folder}` with the model and preset it was made with: it recomputes only "
            f"what is missing or damaged")


def read_run_summary(folder: Path) -> dict:
    """``run_summary.json`` of a run folder, checked against :data:`RUN_SUMMARY_SCHEMA`; an :class:`InputError` naming
    it when it is missing, not JSON or not the record ``calibdrop run`` writes."""
    path = Path(folder) / RUN_SUMMARY
    if not path.is_file():
        raise InputError(f"{folder} has no {RUN_SUMMARY}: give the output folder of a finished `calibdrop run`")
    record = read_json_file(path, "run record", rerun_hint(folder))
    problem = schema_problem(record, RUN_SUMMARY_SCHEMA)
    if problem:
        raise InputError(f"run record {path} is not what `calibdrop run` writes ({problem}): {rerun_hint(folder)}")
    return record


def _kind_of(column: pd.Series) -> str:
    """The kind of a column's values (``str``, ``int``, ``float``, ``bool``, ``list`` or ``other``)."""
    if pd.api.types.is_bool_dtype(column):
        return "bool"
    if pd.api.types.is_integer_dtype(column):
        return "int"
    if pd.api.types.is_float_dtype(column):
        return "float"
    inferred = pd.api.types.infer_dtype(column, skipna=True)
    kinds = {"string": "str", "empty": "empty", "boolean": "bool"}
    if inferred in kinds:
        return kinds[inferred]
    return "list" if all(isinstance(value, (list, tuple, np.ndarray)) for value in column.dropna()) else inferred


def per_budget_columns(frame: pd.DataFrame, name: str) -> dict[str, str]:
    """The columns of a stage's table named by a budget or a distribution (``jaccard@8``, ``p_drop@4``,
    ``increase:code``): numbers, NaN included."""
    if name not in TABLE_COLUMNS:
        return {}
    named = [str(column) for column in frame.columns]
    return {column: "float" for column in named if "@" in column or column.startswith("increase:")}


def column_problem(frame: pd.DataFrame, name: str) -> str | None:
    """What makes ``frame`` not the table ``name`` its stage writes (:data:`TABLE_COLUMNS` and
    :func:`per_budget_columns`), or ``None``: a column missing, of another kind, or holding missing values where its
    stage writes none."""
    expected = TABLE_COLUMNS.get(name, {})
    missing = [column for column in expected if column not in frame.columns]
    if missing:
        return f"has no column {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    if not len(frame):
        return None
    for column, spec in {**expected, **per_budget_columns(frame, name)}.items():
        kind = {"finite": "float"}.get(spec.rstrip("?"), spec.rstrip("?"))
        nullable = spec.endswith("?") or spec == "float"
        values = frame[column]
        found = _kind_of(values)
        # numbers may be integers; an int column with missing values may come back as float
        accepted = {kind, "empty", *(["int"] if kind == "float" else []), *(["float"] if spec == "int?" else [])}
        if found not in accepted:
            return f"has column {column} of {found} values, where its stage writes {kind}"
        gaps = int(values.isna().sum())
        if gaps and not nullable:
            return f"has {gaps} missing (NaN) values in column {column}, where its stage writes none"
    return None


def read_result_table(path: Path, name: str | None = None, remedy: str | None = None) -> pd.DataFrame:
    """The table at ``path`` (:func:`~analysis.io.read_table`: it and its sidecar exist, the checksum matches, the
    Parquet parses), its sidecar checked against :data:`SIDECAR_SCHEMA` and its columns against the stage's
    (``name``, by default the file's name without ``.parquet``); anything else is an :class:`InputError` naming the
    file and ending with ``remedy`` (by default: rerun the run, when the folder holds one, else compute it again)."""
    path = Path(path)
    name = name or path.name.removesuffix(".parquet")
    if remedy is None:
        remedy = (rerun_hint(path.parent) if (path.parent / RUN_SUMMARY).is_file() else
                  "delete it and its sidecar and compute it again with the command that wrote it")
    try:
        frame = read_table(path, remedy=remedy)
    except CalibdropError as error:
        raise InputError(str(error)) from None
    problem = schema_problem(frame.attrs["provenance"], SIDECAR_SCHEMA)
    if problem:
        raise InputError(f"the provenance sidecar {path.with_suffix('.json')} is not what calibdrop writes "
                         f"({problem}): {remedy}")
    problem = column_problem(frame, name)
    if problem:
        raise InputError(f"{path} {problem}: it is not the {name} table calibdrop writes; {remedy}")
    return frame


def left_out_tables(names, saved: dict[str, pd.DataFrame], record: dict) -> dict[str, str]:
    """Of the tables ``names`` that a report or summary reads, those the run's record (its ``run_summary.json``) lists
    but that cannot be used, with why: ``missing`` (no file) or ``stale`` (saved under another stage key than the
    run recorded in ``stage_keys``: written by another command or run since).  ``saved`` holds the tables found."""
    keys = record.get("stage_keys", {})
    listed = {*keys, *record.get("stages_computed", []), *record.get("stages_reused", [])}
    left_out = {}
    for name in names:
        if name not in saved:
            if name in listed:
                left_out[name] = "missing"
        elif name in keys and saved[name].attrs["provenance"].get("stage_key") != keys[name]:
            left_out[name] = "stale"
    return left_out


def left_out_line(left_out: dict[str, str]) -> str:
    """``transfer.parquet is missing, claims.parquet is stale (...)``: the tables of :func:`left_out_tables`."""
    why = {"missing": "is missing", "stale": "is stale (saved under another stage key than the run recorded)"}
    return ", ".join(f"{name}.parquet {why[reason]}" for name, reason in left_out.items())


def warn_left_out(folder: Path, left_out: dict[str, str], consequence: str) -> None:
    """One :class:`CalibdropWarning` line for the tables of ``folder`` left out (:func:`left_out_tables`): which, what
    that costs (``consequence``) and how to recompute them."""
    if left_out:
        warnings.warn(f"{folder}: {left_out_line(left_out)}; {consequence}; {rerun_hint(folder)}", CalibdropWarning)
