"""Leave one distribution out: the drop set each procedure builds without a distribution's calibration data.

For every calibration distribution d (the one left out) and every procedure, a set is built from the
other distributions' data only (``variant = without``) and, for comparison, from every distribution's
(``variant = with``), at one module kind and budget k:

* ``<metric> borda`` / ``<metric> minimax`` for every proxy metric, ``ablation borda``:
  :func:`analysis.study.consensus.consensus_from_matrix` of the importance matrix ``I[m, d']`` with d's column removed;
* ``robust greedy``: the greedy path by real loss whose objective is the worst ΔNLL per token over the
  other distributions' calibration windows (:func:`analysis.importance.ablation.greedy_drop_path`);
* ``nearest greedy``: the per-distribution greedy set of the distribution d' whose calibration ranking agrees best
  (Spearman ρ of the primary metric's importance) with the ranking from a few of d's held-out windows, one scoring pass
  over them;
* candidates for the selection procedures resolved on held-out loss (:mod:`analysis.evaluation.lodo`): every other
  distribution's own set (``<metric> own:<d'>``) and greedy set (``greedy:<d'>``).

Everything here is pure over score tables and greedy paths; the greedy paths are computed by the pipeline.
"""

from __future__ import annotations

import pandas as pd

from ..importance import ablation
from ..importance.metrics import GROUND_TRUTH
from ..presets import PRIMARY_METRIC
from .consensus import consensus_from_matrix
from .tables import drop_set, importance_matrix, metrics_in

WITHOUT, WITH = "without", "with"


def baseline(metric: str = PRIMARY_METRIC) -> str:
    """The procedure every other is paired against: ``"<metric> borda"`` of the primary metric."""
    return f"{metric} borda"


def set_key(module: str, indices) -> str:
    """``attn:3,5,7``: a drop set by its module kind and members (sorted), whatever procedure chose it."""
    return f"{module}:" + ",".join(sorted(map(str, indices), key=lambda v: (len(v), v)))


def consensus_procedures(scores: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(procedure, metric, method)``: every proxy metric's borda and minimax, and the ablation's borda."""
    proxies = [m for m in metrics_in(scores) if m != GROUND_TRUTH]
    found = [(f"{metric} {method}", metric, method) for metric in proxies for method in ("borda", "minimax")]
    return found + ([(f"{GROUND_TRUTH} borda", GROUND_TRUTH, "borda")] if GROUND_TRUTH in metrics_in(scores) else [])


def consensus_without(
    scores: pd.DataFrame, held_out: str | None, *, module: str, k: int, metric: str, method: str
) -> list:
    """The ``method`` consensus of ``metric`` at size k over every distribution but ``held_out`` (``None``: all)."""
    matrix = importance_matrix(scores, module, metric)
    return consensus_from_matrix(matrix.drop(columns=[held_out] if held_out else []), k, method)


def robust_prior(scores: pd.DataFrame, module: str, held_out: str | None) -> dict:
    """Each candidate's largest single-drop ablation cost over the distributions but ``held_out``: the robust greedy
    path's shortlist order, as the pipeline's greedy stage uses it."""
    matrix = importance_matrix(scores, module, GROUND_TRUTH)
    return matrix.drop(columns=[held_out] if held_out else []).max(axis=1).to_dict()


def nearness(
    probe: pd.DataFrame,
    scores: pd.DataFrame,
    held_out: str,
    *,
    module: str,
    metric: str = PRIMARY_METRIC,
    include_held_out: bool = False,
) -> pd.DataFrame:
    """Spearman ρ between the ``metric`` ranking of ``probe`` (per-sample scores of a few of ``held_out``'s texts)
    and each calibration distribution's ranking (d's own only with ``include_held_out``), best first (ties in
    calibration order); ``nearest`` marks the first."""
    rows = probe[probe["metric"] == metric] if "metric" in probe else probe
    mine = importance_matrix(rows.assign(distribution="probe"), module, metric)["probe"]
    matrix = importance_matrix(scores, module, metric)
    names = [d for d in matrix.columns if include_held_out or d != held_out]
    rho = [float(mine.corr(matrix.loc[mine.index, d], method="spearman")) for d in names]
    table = pd.DataFrame({"held_out": held_out, "candidate": names, "spearman": rho}).sort_values(
        "spearman", ascending=False, kind="stable"
    )
    return table.assign(
        nearest=[True] + [False] * (len(table) - 1), variant=WITH if include_held_out else WITHOUT
    ).reset_index(drop=True)


def _row(held_out, variant, name, role, module, metric, indices, note="") -> dict:
    return {
        "held_out": held_out,
        "variant": variant,
        "name": name,
        "role": role,
        "module": module,
        "k": len(indices),
        "metric": metric,
        "indices": [str(i) for i in indices],
        "key": set_key(module, indices),
        "note": note,
    }


def lodo_sets(
    scores: pd.DataFrame,
    greedy: pd.DataFrame,
    robust_without: dict,
    nearest: pd.DataFrame,
    *,
    module: str,
    k: int,
    own_metrics=(PRIMARY_METRIC,),
) -> pd.DataFrame:
    """Every set of the leave-one-out study, one row per (held_out, variant, name).

    ``greedy``: the greedy stage's paths (objectives: each distribution, ``robust``); ``robust_without``: per
    left-out d the robust path over the others; ``nearest``: :func:`nearness` tables of both variants.  ``role`` is
    ``procedure`` for a set a procedure returns directly and ``candidate`` for a single distribution's set the
    selection procedures choose among.
    Columns: ``held_out, variant, name, role, module, k, metric, indices, key, note``.
    """
    names = list(importance_matrix(scores, module, metrics_in(scores)[0]).columns)
    paths = {objective: ablation.greedy_set(path, k) for objective, path in greedy.groupby("objective", sort=False)}
    rows = []
    for held_out in names:
        for variant in (WITHOUT, WITH):
            left = held_out if variant == WITHOUT else None
            others = [d for d in names if d != left]
            for procedure, metric, method in consensus_procedures(scores):
                chosen = consensus_without(scores, left, module=module, k=k, metric=metric, method=method)
                rows.append(_row(held_out, variant, procedure, "procedure", module, metric, chosen))
            robust = ablation.greedy_set(robust_without[held_out], k) if variant == WITHOUT else paths["robust"]
            rows.append(_row(held_out, variant, "robust greedy", "procedure", module, GROUND_TRUTH, robust))
            near = nearest[(nearest["held_out"] == held_out) & (nearest["variant"] == variant)].iloc[0]
            rows.append(
                _row(
                    held_out,
                    variant,
                    "nearest greedy",
                    "procedure",
                    module,
                    GROUND_TRUTH,
                    paths[near["candidate"]],
                    f"greedy set of {near['candidate']} (ρ = {near['spearman']:.3f})",
                )
            )
            for metric in (m for m in own_metrics if m in metrics_in(scores)):
                matrix = importance_matrix(scores, module, metric)
                rows += [
                    _row(held_out, variant, f"{metric} own:{d}", "candidate", module, metric, drop_set(matrix[d], k))
                    for d in others
                ]
            rows += [
                _row(held_out, variant, f"greedy:{d}", "candidate", module, GROUND_TRUTH, paths[d]) for d in others
            ]
    return pd.DataFrame(rows)
