"""Importance metrics: one registry, so the metric is an axis of the study beside the distribution.

A metric turns the residual stream around one module into an importance.  Proxy metrics are a
per-token statistic ``f(X_t, Y_t)`` of the module's input ``X`` and its output after the
residual add ``Y`` (``attn``: ``resid_pre → resid_mid``, ``mlp``: ``resid_mid → resid_post``,
``block``: ``resid_pre → resid_post``).  For sample ``s``::

    stat_sum[s]  = sum over real tokens t of f(X_t, Y_t)       (float32 per token, float64 sums)
    importance   = g(sum_s stat_sum[s] / sum_s n_tokens[s])    (token-weighted mean, then g)

Built in:

* ``cosine`` (He et al., 2024): ``f = cos(X, Y)``, ``g(m) = 1 - m``;
* ``angular`` (Gromov et al., 2024): ``f = arccos(cos(X, Y)) / π``, ``g(m) = m``;
* ``relative_update``: ``f = ‖Y − X‖ / ‖X‖`` (the branch's update relative to the stream), ``g(m) = m``;
* ``taylor`` (a proxy of the ground truth, first order): ``stat_sum[s] = sum_t ∇_{h_t} NLL[s] · (−b_t)``, the
  branch output ``b`` of the module against the gradient of sample ``s``'s summed next-token NLL at the residual
  point ``h`` right after its add, from one forward and backward pass for every module
  (:mod:`analysis.importance.taylor`); ``n_tokens[s]`` its predicted tokens, ``g(m) = m``: estimated ΔNLL per token;
* ``ablation`` (the ground truth): ``stat_sum[s]`` is the increase of the summed next-token NLL of
  sample ``s`` when that module alone is dropped (:func:`analysis.models.pruning.drop_modules`
  semantics), ``n_tokens[s]`` its predicted tokens, ``g(m) = m``: mean ΔNLL per token.

Higher importance always means "costlier to drop"; the size-k drop set is the k least important.
Register your own with :func:`register_metric` (a per-token function of a :class:`TokenPair`);
it flows through scoring, stability, consensus, plots and the report unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..presets import GROUND_TRUTH

TAYLOR = "taylor"


class TokenPair:
    """The residual points ``X`` and ``Y`` of one module for a chunk of rows, float32 ``(rows, seq, hidden)``.

    Per-token quantities are computed once and shared by every metric that reads them; the
    norms of a point are shared across the pairs that use it (``norms`` is the per-point cache).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_norm: torch.Tensor, y_norm: torch.Tensor):
        self.x, self.y, self.x_norm, self.y_norm = x, y, x_norm, y_norm

    @cached_property
    def cos(self) -> torch.Tensor:
        """``x·y / (‖x‖ ‖y‖)`` per token."""
        return torch.linalg.vecdot(self.x, self.y) / (self.x_norm * self.y_norm).clamp_min(1e-8)

    @cached_property
    def update_norm(self) -> torch.Tensor:
        """``‖y − x‖`` per token."""
        return torch.linalg.vector_norm(self.y - self.x, dim=-1)


@dataclass(frozen=True)
class MetricSpec:
    """A named importance metric.

    ``token_statistic`` maps a :class:`TokenPair` to the per-token statistic ``f`` (``None`` for
    ``taylor`` and the ablation ground truth, which are not functions of ``X`` and ``Y``); ``importance`` maps
    token-weighted means of ``f`` (a numpy array) to importances ``g``.  ``gradient`` marks ``taylor``, the proxy
    computed by its own forward and backward pass instead of the stream hooks.
    """

    name: str
    label: str
    token_statistic: Callable[[TokenPair], torch.Tensor] | None
    importance: Callable[[np.ndarray], np.ndarray]
    gradient: bool = False

    @property
    def is_proxy(self) -> bool:
        """Whether it estimates importance cheaply (judged against the ground truth), not the ground truth itself."""
        return self.token_statistic is not None or self.gradient


METRICS: dict[str, MetricSpec] = {}


def _identity(mean):
    return mean


def register_metric(name: str, token_statistic: Callable[[TokenPair], torch.Tensor] | None, *,
                    importance: Callable[[np.ndarray], np.ndarray] = _identity, label: str | None = None,
                    replace: bool = False) -> MetricSpec:
    """Add a metric to the registry and return it.

    ``token_statistic(pair)`` returns one value per token (shape ``pair.cos.shape``), larger for
    modules that change the stream more; ``importance`` maps its token-weighted mean to the
    importance (default: the mean itself).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"metric name must be an identifier such as 'my_metric' (got {name!r})")
    if name in METRICS and not replace:
        raise InputError(f"metric {name!r} is already registered; pass replace=True to redefine it")
    if not callable(token_statistic) and not (token_statistic is None and name == GROUND_TRUTH):
        # only the built-in ground truth has no per-token statistic (taylor is set apart, see below)
        raise InputError(f"the statistic of metric {name!r} must be a function of a TokenPair")
    spec = MetricSpec(name, label or name, token_statistic, importance)
    METRICS[name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    """The registered metric ``name``; a clear error listing the registry otherwise."""
    if name not in METRICS:
        raise InputError(f"unknown metric {name!r}; registered metrics: {', '.join(metric_names())}")
    return METRICS[name]


def metric_names() -> list[str]:
    """Every registered metric, in registration order."""
    return list(METRICS)


def check_metrics(names) -> tuple[str, ...]:
    """``names`` (a comma-separated string or a sequence) validated against the registry, deduplicated."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    names = [n for n in names if n]
    if not names:
        raise InputError(f"give at least one metric; registered metrics: {', '.join(metric_names())}")
    for name in names:
        get_metric(name)
    return tuple(dict.fromkeys(names))


def importance_from_sums(metric: str, stat_sum, n_tokens):
    """``g(sum stat_sum / sum n_tokens)`` elementwise for arrays of per-group sums."""
    return get_metric(metric).importance(np.asarray(stat_sum, dtype=float) / np.asarray(n_tokens, dtype=float))


def importance_column(frame) -> np.ndarray:
    """Importance of each row of a table with ``metric``, ``stat_sum`` and ``n_tokens`` (rows may mix metrics)."""
    values = np.full(len(frame), np.nan)
    for metric, rows in frame.groupby("metric", sort=False).indices.items():
        values[rows] = importance_from_sums(metric, frame["stat_sum"].to_numpy()[rows],
                                            frame["n_tokens"].to_numpy()[rows])
    return values


register_metric("cosine", lambda pair: pair.cos, importance=lambda mean: 1.0 - mean, label="1 − cos(X, Y)")
register_metric("angular", lambda pair: torch.arccos(pair.cos.clamp(-1.0, 1.0)) / math.pi,
                label="arccos(cos(X, Y)) / π")
register_metric("relative_update", lambda pair: pair.update_norm / pair.x_norm.clamp_min(1e-8), label="‖Y − X‖ / ‖X‖")
METRICS[TAYLOR] = MetricSpec(TAYLOR, "first-order ΔNLL estimate (nats/token)", None, _identity, gradient=True)
register_metric(GROUND_TRUTH, None, label="ΔNLL when dropped (nats/token)")
