"""The per-token statistics of every proxy metric summed over real tokens, for every pair of residual points:
one eager, chunked path (float32 temporaries whatever the model's dtype) and one ``torch.compile``d pass on CUDA."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .metrics import TokenPair

_CHUNK_ELEMENTS = 1 << 23


_COMPILED: dict[tuple, object] = {}


def _pair_statistic_sums(points, pairs, mask, metrics):
    """``(len(metrics), len(pairs), rows)`` float64: per row, ``sum_t mask_t * f(points[a]_t, points[b]_t)``.

    Points are upcast to float32 once and their norms shared by the pairs and metrics that use them.
    """
    vectors = [point.float() for point in points]
    norms = [torch.linalg.vector_norm(vector, dim=-1) for vector in vectors]
    pair_views = [TokenPair(vectors[a], vectors[b], norms[a], norms[b]) for a, b in pairs]
    statistics = torch.stack([torch.stack([metric.token_statistic(pair) for pair in pair_views]) for metric in metrics])
    return torch.where(mask, statistics, torch.zeros_like(statistics)).sum(dim=-1, dtype=torch.float64)


def _fused_kernel(device: torch.device, metrics: tuple):
    """``torch.compile``d :func:`_pair_statistic_sums` on CUDA (one pass over the points), else ``None``.

    Set ``CALIBDROP_COMPILE=0`` to always use the eager, chunked path.
    """
    if device.type != "cuda" or os.environ.get("CALIBDROP_COMPILE", "1") == "0":
        return None
    key = tuple(metric.name for metric in metrics)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_pair_statistic_sums, dynamic=True)
    return _COMPILED[key]


def masked_statistic_sums(points: Sequence[torch.Tensor], pairs, mask: torch.Tensor, metrics: Sequence) -> torch.Tensor:
    """For each metric, each pair ``(a, b)`` of point indices and each batch row: the sum over real
    tokens of ``f(points[a]_t, points[b]_t)``, computed in float32, float64 ``(metrics, pairs, rows)``.

    Each point is upcast once per chunk of rows, so the float32 temporaries stay small whatever
    the model's dtype.
    """
    metrics = tuple(metrics)
    fused = _fused_kernel(points[0].device, metrics)
    if fused is not None:
        return fused(points, tuple(pairs), mask, metrics)
    batch, seq, hidden = points[0].shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, seq * hidden))
    chunks = [
        _pair_statistic_sums([point[start : start + rows_per_chunk] for point in points], pairs,
                             mask[start : start + rows_per_chunk], metrics)
        for start in range(0, batch, rows_per_chunk)
    ]
    return torch.cat(chunks, dim=-1)
