"""Forward hooks that reduce the residual stream around every module to per-sample metric sums.

For block ``i`` the hooks read ``resid_pre`` (the block's input), ``resid_mid`` (after the attention add; for a parallel
block the attention branch added to ``resid_pre``) and ``resid_post`` (the block's output), at the points the family's
adapter names (:mod:`analysis.models.adapters`), and reduce each module's pair ``(X, Y)`` to
``sum_t f(X_t, Y_t)`` over real tokens for every proxy metric ``f`` (:mod:`analysis.importance.statistics`) inside the
hook, so no hidden state outlives its block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import NonFiniteActivationError
from ..models.adapters import Adapter, adapter_for, decoder_layers, first_tensor, hook_read_point, layer_input
from ..presets import PRIMARY_METRIC, SCORED_MODULES
from .metrics import get_metric
from .statistics import masked_statistic_sums

MODULES = SCORED_MODULES
PROXY_DEFAULT = (PRIMARY_METRIC,)
READ_POINT_OF_Y = {"attn": "resid_mid", "mlp": "resid_post", "block": "resid_post"}


class ResidualRecorder:
    """Forward hooks reducing each block's ``resid_pre/resid_mid/resid_post`` to per-sample metric sums.

    Use as a context manager; call :meth:`begin_batch` with the attention mask before each
    forward pass and :meth:`end_batch` after it to get ``stat_sum`` of shape
    ``(batch, n_layers, 3, n_metrics)`` (modules in the order of :data:`MODULES`, metrics in
    the order given, each a proxy metric of :mod:`analysis.importance.metrics`).
    """

    def __init__(self, model: torch.nn.Module, metrics: Sequence[str] = PROXY_DEFAULT, adapter: Adapter | None = None):
        self.metrics = tuple(get_metric(name) for name in metrics)
        self.adapter = adapter or adapter_for(model)
        self.layers = decoder_layers(model)
        self.parallel = self.adapter.is_parallel(model.config)
        self._handles: list = []
        self._mask_by_device: dict = {}
        self._sums: list[torch.Tensor | None] = []
        self._resid_pre: dict[int, torch.Tensor] = {}
        self._resid_mid: dict[int, torch.Tensor] = {}
        self._mlp_y: dict[int, torch.Tensor] = {}
        self._pairs = ((0, 1), (0, 3) if self.parallel else (1, 2), (0, 2))
        self._recorded = 0

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(hook_read_point(layer, self.adapter.resid_mid, self._mid_hook(i)))
            if self.parallel:
                self._handles.append(hook_read_point(layer, self.adapter.mlp_branch, self._parallel_mlp_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._resid_pre.clear()
        self._resid_mid.clear()
        self._mlp_y.clear()

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """Set the mask of real tokens (``(batch, seq)``, nonzero = real) for the next forward pass.

        Only that pass is recorded: the ground truth's partial re-runs after it are ignored.
        """
        self._mask_by_device = {attention_mask.device: attention_mask.bool()}
        self._sums = [None] * len(self.layers)
        self._recorded = 0

    @property
    def _complete(self) -> bool:
        return self._recorded == len(self.layers)

    def _mask_on(self, device) -> torch.Tensor:
        if device not in self._mask_by_device:
            self._mask_by_device[device] = next(iter(self._mask_by_device.values())).to(device)
        return self._mask_by_device[device]

    def _pre_hook(self, i):
        def hook(module, args, kwargs):
            if not self._complete:
                self._resid_pre[i] = layer_input(args, kwargs)

        return hook

    def _mid_hook(self, i):
        def hook(tensor, is_output):  # an output read is the attention branch, added to resid_pre
            if not self._complete:
                self._resid_mid[i] = self._resid_pre[i] + tensor if is_output else tensor

        return hook

    def _parallel_mlp_hook(self, i):
        def hook(tensor, is_output):  # the MLP branch's output
            if not self._complete:
                self._mlp_y[i] = self._resid_pre[i] + tensor

        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            if self._complete:
                return
            post = first_tensor(output)
            points = [self._resid_pre.pop(i), self._resid_mid.pop(i), post]
            if self.parallel:
                points.append(self._mlp_y.pop(i))
            points = [point.to(post.device, non_blocking=True) for point in points]
            mask = self._mask_on(post.device)
            if self.metrics:
                self._sums[i] = masked_statistic_sums(points, self._pairs, mask, self.metrics)
            else:
                self._sums[i] = torch.zeros((0, len(self._pairs), mask.shape[0]), dtype=torch.float64)
            self._recorded += 1

        return hook

    def end_batch(self) -> np.ndarray:
        """``stat_sum`` of the last batch, ``(batch, n_layers, 3, n_metrics)`` float64; raises on NaN or inf."""
        missing = [i for i, sums in enumerate(self._sums) if sums is None]
        if missing:
            raise RuntimeError(f"blocks {missing} did not run in the forward pass")
        sums = torch.stack([s.cpu() for s in self._sums]).numpy().transpose(3, 0, 2, 1)
        bad = np.argwhere(~np.isfinite(sums))
        if len(bad):
            row, layer, module, _ = bad[np.lexsort((bad[:, 2], bad[:, 0], bad[:, 1]))][0]
            raise NonFiniteActivationError(
                f"NaN or inf in the residual stream at layer {layer} ({READ_POINT_OF_Y[MODULES[module]]}) "
                f"for batch row {row}: the activations overflowed or the weights are broken. "
                "Score in float32 or bfloat16 (dtype=torch.float32) or check the checkpoint."
            )
        return sums
