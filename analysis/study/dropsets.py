"""Drop sets: one type, one label rule, one family builder, one JSON format.

A drop set names the modules to remove: ``module`` (``attn``, ``mlp``, ``block`` or ``joint``),
its ``indices`` (layers; ``"attn:i"``/``"mlp:i"`` for ``joint``), how it was chosen (``method``:
a consensus method, ``own:<distribution>``, ``greedy:<objective>``, ``random:<seed>``), from
which importance ``metric`` and which ``sources`` (distributions).  Its label is
``<metric>/<module>-<k>:<method>`` (``none`` for the unpruned model); :func:`parse_label` reads
it back.  :func:`drop_set_family` builds the sets a study compares; :func:`read_drop_set` and
:meth:`DropSet.record` are the JSON that ``calibdrop consensus`` writes and ``prune`` reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import read_json_file
from ..kinds import joint_to_lists
from ..presets import CONSENSUS_METHODS, MODULE_KINDS, PRIMARY_METRIC
from .consensus import consensus_from_matrix
from .tables import drop_set, importance_matrix, one_metric

UNPRUNED = "none"
LAST = "last"  # the method of the drop-the-last-k baseline (reverse-order removal)
DEPTH = "depth"  # its metric: chosen by position alone
PAPER_DISTRIBUTION = "general"  # the paper's recipe: its one calibration set is general text
DROP_MODULES_ARGUMENT = {"attn": "attn", "mlp": "mlp", "block": "blocks", "joint": "joint"}


def joint_sort_key(entry: str) -> tuple[int, str]:
    """Order joint entries by layer, then attention before MLP (``attn:3, mlp:3, attn:7``); a plain layer (``"5"``)
    by its number."""
    kind, _, index = str(entry).rpartition(":")
    return int(index), kind


@dataclass(frozen=True)
class DropSet:
    """A set of modules to drop and how it was chosen."""

    module: str
    indices: tuple
    method: str
    metric: str = PRIMARY_METRIC
    sources: tuple[str, ...] = field(default=())

    @property
    def k(self) -> int:
        return len(self.indices)

    @property
    def label(self) -> str:
        """``<metric>/<module>-<k>:<method>``."""
        return f"{self.metric}/{self.module}-{self.k}:{self.method}"

    def candidates(self) -> list[tuple[str, int]]:
        """The ``(kind, layer)`` pairs dropped (kind in attn, mlp, block)."""
        if self.module == "joint":
            attn, mlp = joint_to_lists(self.indices)
            return [("attn", i) for i in attn] + [("mlp", i) for i in mlp]
        return [(self.module, int(i)) for i in self.indices]

    def drop_kwargs(self) -> dict:
        """The keyword arguments of :func:`analysis.models.pruning.drop_modules` that drop this set."""
        return {DROP_MODULES_ARGUMENT[self.module]: list(self.indices)}

    def sorted_indices(self) -> list:
        """The indices in layer order (joint: by layer, attention before MLP), as printed for people."""
        return sorted(self.indices, key=joint_sort_key) if self.module == "joint" else sorted(self.indices)

    def record(self) -> dict:
        """The JSON record ``calibdrop consensus`` writes and :func:`read_drop_set` reads (``module``, ``indices``
        ...)."""
        return {"module": self.module, "k": self.k, "indices": list(self.indices), "method": self.method,
                "metric": self.metric,
                "distributions": list(self.sources)}


def make_drop_set(module: str, indices, method: str, metric: str = PRIMARY_METRIC, sources=()) -> DropSet:
    """A :class:`DropSet` with indices normalised (ints for layers, ``"attn:i"`` strings for joint), kept in the order
    given (a ranking's order: least important first); :meth:`DropSet.sorted_indices` gives layer order."""
    if module == "joint":
        return DropSet(module, tuple(str(i) for i in indices), method, metric, tuple(sources))
    return DropSet(module, tuple(int(i) for i in indices), method, metric, tuple(sources))


def as_drop_set(value) -> DropSet | None:
    """A :class:`DropSet` from itself, a JSON record (``module``, ``indices``, optional ``method``/``metric``) or
    ``None``."""
    if value is None or isinstance(value, DropSet):
        return value
    return make_drop_set(value["module"], value["indices"], value.get("method") or "file",
                         value.get("metric") or PRIMARY_METRIC, value.get("distributions") or ())


def parse_label(label: str) -> dict:
    """``"cosine/attn-8:own:code"`` → ``{"metric": "cosine", "module": "attn", "k": 8, "method": "own:code"}``."""
    if label == UNPRUNED:
        return {"metric": None, "module": None, "k": 0, "method": UNPRUNED}
    try:
        metric, rest = label.split("/", 1)
        head, method = rest.split(":", 1)
        module, k = head.rsplit("-", 1)
        return {"metric": metric, "module": module, "k": int(k), "method": method}
    except ValueError:
        raise InputError(f"{label!r} is not a drop-set label of the form <metric>/<module>-<k>:<method>") from None


def method_family(method: str) -> str:
    """The kind of a method: ``own:code`` → ``own``, ``random:1`` → ``random``, ``greedy:robust`` → ``greedy``,
    ``borda`` → ``borda``."""
    return method.split(":", 1)[0]


def method_kind(method: str) -> str:
    """What a method is, as the summary tables name it: ``consensus`` (borda, minimax, mean, median), ``single``
    (``own:d``), ``greedy`` (``greedy:d``), ``robust greedy`` (``greedy:robust``), ``random``, ``last k``."""
    if method == "greedy:robust":
        return "robust greedy"
    return {"own": "single", "greedy": "greedy", "random": "random", LAST: "last k"}.get(method_family(method),
                                                                                       "consensus")


def last_k_set(candidates, module: str, k: int) -> DropSet:
    """The simplest published alternative (reverse-order removal; Lu et al., "Reassessing layer pruning in LLMs"):
    the ``k`` deepest of ``candidates`` (layers; joint entries in forward order, attention before MLP), labelled
    ``depth/<module>-<k>:last``."""
    ordered = sorted(candidates, key=joint_sort_key) if module == "joint" else sorted(int(c) for c in candidates)
    return make_drop_set(module, ordered[len(ordered) - k:], LAST, DEPTH)


def paper_recipe_label(module: str, k: int, metric: str = "cosine") -> str:
    """The label of the paper's recipe (He et al., 2024): the ``k`` least important modules by ``metric`` on the one
    general-text distribution, ``<metric>/<module>-<k>:own:general``."""
    return f"{metric}/{module}-{k}:own:{PAPER_DISTRIBUTION}"


def baseline_labels(module: str, k: int, metric: str = "cosine") -> dict[str, str]:
    """The baselines a recommendation is weighed against, by name: ``last k`` (:func:`last_k_set`) and ``paper
    recipe`` (:func:`paper_recipe_label`)."""
    return {"last k": f"{DEPTH}/{module}-{k}:{LAST}", "paper recipe": paper_recipe_label(module, k, metric)}


def random_drop_set(matrix: pd.DataFrame, module: str, k: int, seed: int, metric: str = PRIMARY_METRIC) -> DropSet:
    """A uniformly random size-k drop set over the candidates (rows) of an importance matrix."""
    labels = list(matrix.index)
    chosen = np.random.default_rng(seed).choice(len(labels), size=k, replace=False)
    return make_drop_set(module, [labels[i] for i in sorted(chosen)], f"random:{seed}", metric)


def drop_set_family(scores: pd.DataFrame, *, module: str, k: int, metric: str | None = None, methods=CONSENSUS_METHODS,
                    own: bool = True, random_seeds=()) -> dict[str, DropSet]:
    """The drop sets a study compares at one budget, by label: each consensus ``method``'s set (built
    over every distribution), each distribution's own set (with ``own``: its k least important
    modules) and a uniformly random set per seed."""
    scores, metric = one_metric(scores, metric)
    matrix = importance_matrix(scores, module)
    everyone = tuple(matrix.columns)
    sets = [make_drop_set(module, consensus_from_matrix(matrix, k, method), method, metric,
                          everyone) for method in methods]
    if own:
        sets += [make_drop_set(module, drop_set(matrix[name], k), f"own:{name}", metric,
                               (name,)) for name in matrix.columns]
    sets += [random_drop_set(matrix, module, k, seed, metric) for seed in random_seeds]
    return {s.label: s for s in sets}


def _check_indices(path: Path, module, indices) -> None:
    """Raise :class:`InputError` unless ``indices`` is a list of distinct candidates of ``module``: integers
    (``attn``, ``mlp``, ``block``) or ``"attn:i"``/``"mlp:i"`` strings (``joint``)."""
    if module not in MODULE_KINDS:
        raise InputError(f"{path}: 'module' is {module!r}; it must be attn, mlp, block or joint")
    if not isinstance(indices, list) or not indices:
        raise InputError(f"{path}: 'indices' must be a non-empty JSON list, not {json.dumps(indices)}")
    if module == "joint":
        bad = [v for v in indices if not isinstance(v, str) or not re.fullmatch(r"(attn|mlp):[0-9]+", v)]
        kind = "'attn:i' or 'mlp:i' strings"
    else:
        bad = [v for v in indices if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        kind = "non-negative integers"
    if bad:
        raise InputError(f"{path}: 'indices' of a {module} drop set must be {kind}; these are not: {json.dumps(bad)}")
    if len(set(indices)) != len(indices):
        raise InputError(f"{path}: 'indices' lists a module twice: {json.dumps(indices)}")


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_OPTIONAL_FIELDS = {  # field of a drop-set file: (test of its value, what it must be)
    **{key: (lambda v: isinstance(v, str), "a string") for key in ("method", "metric", "model", "model_sha256")},
    "distributions": (_strings, "a list of strings"),
    "scores": (lambda v: isinstance(v, dict) and isinstance(v.get("path"), str)
               and isinstance(v.get("sha256", ""), (str, type(None))), 'an object {"path": "...", "sha256": "..."}'),
}


def read_drop_set(path: Path) -> dict:
    """A drop-set JSON written by ``calibdrop consensus``, checked strictly: an object with ``module`` and
    ``indices`` (a list of distinct candidates); ranges are checked against the model by
    :func:`analysis.models.pruning.check_drop_set`.  The record gains ``file``: where it was read."""
    path = Path(path)
    record = read_json_file(path, "drop-set file", "give the JSON file that `calibdrop consensus` wrote")
    if not isinstance(record, dict) or not {"module", "indices"} <= set(record):
        raise InputError(f"{path} is not a drop set: it needs 'module' and 'indices'")
    _check_indices(path, record["module"], record["indices"])
    wrong = [f"'{key}' must be {what}" for key, (usable, what) in _OPTIONAL_FIELDS.items()
             if record.get(key) is not None and not usable(record[key])]
    if wrong:
        raise InputError(f"{path}: {'; '.join(wrong)} (or be left out); give the JSON file that "
                         "`calibdrop consensus` wrote")
    return {**record, "file": str(path)}
