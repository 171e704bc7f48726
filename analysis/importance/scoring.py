"""Importance of every attention sublayer, MLP sublayer and block, in one streaming pass.

For module ``m`` of block ``i``, sample ``s`` with real (unpadded) tokens ``t`` and metric
``f`` of :mod:`analysis.importance.metrics`::

    stat_sum[s, i, m] = sum_t f(X_t, Y_t)          (float32 per token, float64 sums)
    n_tokens[s]       = number of real tokens of s
    importance[i, m]  = g(sum_s stat_sum[s, i, m] / sum_s n_tokens[s])

with ``attn: X = resid_pre, Y = resid_mid``; ``mlp: X = resid_mid, Y = resid_post``;
``block: X = resid_pre, Y = resid_post`` (read points per family in :mod:`analysis.models.adapters`).
For ``cosine`` (He et al., 2024) ``f = cos`` and ``g(m) = 1 - m``.  The mean is token-weighted
over all samples.  Every proxy metric of ``X`` and ``Y`` is reduced inside the same forward hooks, so no hidden
state outlives its block; the ``ablation`` ground truth (:mod:`analysis.importance.ablation`) reuses the
same pass's block inputs; ``taylor`` (:mod:`analysis.importance.taylor`) adds one forward and backward pass.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.documents import documents_key, load_distribution
from ..data.fetching import sources_used
from ..data.manifests import load_manifest
from ..data.samples import (
    calibration_samples,
    length_sorted_batches,
    pad_token_id,
    token_batches,
    tokenize_texts,
)
from ..errors import InputError, NonFiniteActivationError
from ..models.adapters import Adapter, adapter_for, decoder_layers
from ..models.distributed import gather_shards, rank_and_world
from ..models.loading import model_info
from ..presets import PRIMARY_METRIC, SCORED_MODULES
from ..stages import StageStore, stage_key
from .ablation import position_ids_from_mask, single_drop_increase
from .metrics import (
    GROUND_TRUTH,
    TAYLOR,
    check_metrics,
    get_metric,
    importance_column,
    importance_from_sums,
)
from .statistics import masked_statistic_sums
from .taylor import taylor_increase

MODULES = SCORED_MODULES
PROXY_DEFAULT = (PRIMARY_METRIC,)
READ_POINT_OF_Y = {"attn": "resid_mid", "mlp": "resid_post", "block": "resid_post"}


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


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
            self._handles.append(self._register(layer, self.adapter.resid_mid, self._mid_hook(i)))
            if self.parallel:
                self._handles.append(self._register(layer, self.adapter.mlp_branch, self._parallel_mlp_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._resid_pre.clear()
        self._resid_mid.clear()
        self._mlp_y.clear()

    @staticmethod
    def _register(layer, point, fn):
        module = layer.get_submodule(point.module)
        if point.where == "input":
            return module.register_forward_pre_hook(lambda mod, args: fn(args[0]))
        return module.register_forward_hook(lambda mod, args, out: fn(_first_tensor(out), branch=True))

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
                self._resid_pre[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _mid_hook(self, i):
        def hook(tensor, branch=False):
            if not self._complete:
                self._resid_mid[i] = self._resid_pre[i] + tensor if branch else tensor

        return hook

    def _parallel_mlp_hook(self, i):
        def hook(tensor, branch=True):
            if not self._complete:
                self._mlp_y[i] = self._resid_pre[i] + tensor

        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            if self._complete:
                return
            post = _first_tensor(output)
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


def input_device(model: torch.nn.Module) -> torch.device:
    """Device of the token embeddings, where input ids must go."""
    return model.get_input_embeddings().weight.device


def per_sample_frame(stat_sum: np.ndarray, n_tokens: np.ndarray, samples: Sequence, metric: str) -> pd.DataFrame:
    """Tidy per-sample rows of one metric from ``stat_sum (samples, layers, 3)`` and ``n_tokens (samples,)``."""
    n_samples, n_layers, n_modules = stat_sum.shape
    frame = pd.DataFrame(
        {
            "metric": metric,
            "sample": np.repeat(np.asarray(samples), n_layers * n_modules),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_modules), n_samples),
            "module": np.tile(np.array(MODULES), n_samples * n_layers),
            "stat_sum": stat_sum.reshape(-1),
            "n_tokens": np.repeat(np.asarray(n_tokens, dtype=np.int64), n_layers * n_modules),
        }
    )
    frame["importance"] = importance_from_sums(metric, frame["stat_sum"], frame["n_tokens"])
    return frame


def aggregate_importance(per_sample: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Token-weighted importance per metric and module: ``g(sum(stat_sum) / sum(n_tokens))`` over samples.

    ``by`` adds grouping columns (for example ``["distribution"]``).
    """
    keys = ["metric", *by, "layer", "module"]
    grouped = per_sample.groupby(keys, sort=False, observed=True).agg(
        stat_sum=("stat_sum", "sum"), n_tokens=("n_tokens", "sum"), n_samples=("sample", "nunique")
    ).reset_index()
    grouped["importance"] = importance_column(grouped)
    order = {name: i for i, name in enumerate(dict.fromkeys(per_sample["metric"]))}
    out = grouped.assign(_metric=grouped["metric"].map(order),
                         module=pd.Categorical(grouped["module"], categories=MODULES))
    out = out.sort_values(["_metric", *by, "layer", "module"],
                          kind="stable").drop(columns="_metric").reset_index(drop=True)
    return out.assign(module=out["module"].astype(str))


def _split_metrics(metrics) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The metrics of ``X`` and ``Y`` among ``metrics`` (one pass of the stream hooks), and the others
    (``taylor``, ``ablation``: each a pass of its own), in the order given."""
    names = check_metrics(metrics)
    stream = tuple(n for n in names if get_metric(n).token_statistic is not None)
    return stream, tuple(n for n in names if n not in stream)


def _score_batch(model, recorder, ids, mask, own_pass: Sequence[str]):
    """Stream sums ``(rows, layers, 3, stream metrics)`` from one forward pass (the ablation's, if asked; none when
    neither is: ``recorder`` is ``None``) and, per metric of ``own_pass``, its ΔNLL sums ``(rows, layers, 3)`` and
    predicted tokens."""
    sums, truth = None, {}
    if recorder is not None:
        recorder.begin_batch(mask)
        with torch.inference_mode():
            if GROUND_TRUTH in own_pass:
                truth[GROUND_TRUTH] = single_drop_increase(model, ids, mask)
            else:
                model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                 use_cache=False)
            sums = recorder.end_batch()
    if TAYLOR in own_pass:
        truth[TAYLOR] = taylor_increase(model, ids, mask)
    return sums, truth


def score_token_batches(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    metrics: Sequence[str] | str = PROXY_DEFAULT,
    total: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-sample score rows (``metric, sample, layer, module, stat_sum, n_tokens, importance``) for
    token batches (``input_ids``, ``attention_mask``, optional ``sample``).

    One forward pass per batch gives every proxy metric of ``X`` and ``Y`` (the base model, no LM head, when no
    ground truth is asked; no KV cache); ``ablation`` adds the re-runs of
    :func:`analysis.importance.ablation.single_drop_increase` from that pass's block inputs, ``taylor`` a forward
    and backward pass of its own (:func:`analysis.importance.taylor.taylor_increase`).  Positions are
    counted over real tokens so left and right padding give the same result.  Under
    torch.distributed (``torchrun``, ``accelerate launch``) process r scores batches
    r, r + W, r + 2W, ... and every process returns all rows, gathered.
    """
    proxies, own_pass = _split_metrics(metrics)
    device = input_device(model)
    rank, world = rank_and_world()
    proxy_sums, n_tokens, samples = [], [], []
    truth_sums, n_predicted = [[] for _ in own_pass], [[] for _ in own_pass]
    next_sample = 0
    stream = proxies or GROUND_TRUTH in own_pass
    with ResidualRecorder(model, proxies) if stream else nullcontext() as recorder:
        for index, batch in enumerate(tqdm(batches, total=total, desc="scoring", unit="batch",
                                           disable=not progress or rank > 0)):
            rows = batch["input_ids"].shape[0]
            batch_samples = list(batch.get("sample", range(next_sample, next_sample + rows)))
            next_sample += rows
            if index % world != rank:
                continue
            mask = batch["attention_mask"].to(device)
            sums, truth = _score_batch(model, recorder, batch["input_ids"].to(device), mask, own_pass)
            proxy_sums.append(sums)
            for j, name in enumerate(own_pass):
                truth_sums[j].append(truth[name][0])
                n_predicted[j].append(truth[name][1])
            n_tokens.append(mask.sum(-1).cpu().numpy())
            samples.extend(int(s) for s in batch_samples)
    proxy_sums, n_tokens, samples, *own = gather_shards((proxy_sums, n_tokens, samples, *truth_sums, *n_predicted))
    truth_sums, n_predicted = own[:len(own_pass)], own[len(own_pass):]
    if not n_tokens:
        raise InputError("no batches to score: give at least one sample")
    parts = []
    if proxies:
        stacked = np.concatenate(proxy_sums)
        parts += [per_sample_frame(stacked[..., j], np.concatenate(n_tokens), samples, name) for j,
                  name in enumerate(proxies)]
    parts += [per_sample_frame(np.concatenate(truth_sums[j]), np.concatenate(n_predicted[j]), samples, name)
              for j, name in enumerate(own_pass)]
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["metric", "sample", "layer"], kind="stable",
                             key=_metric_order_key(frame)).reset_index(drop=True)


def _metric_order_key(frame: pd.DataFrame):
    """Sort key keeping metrics in the order they appear (for ``sort_values(key=...)``)."""
    order = {name: i for i, name in enumerate(dict.fromkeys(frame["metric"]))}
    return lambda column: column.map(order) if column.name == "metric" else column


def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    metrics: Sequence[str] | str = PROXY_DEFAULT,
    per_sample: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Importance of every attention, MLP and block of ``model`` under each metric
    (default ``S = 1 - mean_t cos(X_t, Y_t)``, He et al. 2024; see :mod:`analysis.importance.metrics`).

    Each text is one sample, tokenized with ``tokenizer(text, truncation=True,
    max_length=max_length)``; the mean runs over all real tokens of all texts.  Returns one
    row per ``(metric, layer, module)`` with ``importance``, ``stat_sum``, ``n_tokens`` and
    ``n_samples``, or with ``per_sample=True`` one row per ``(metric, sample, layer, module)``
    from which :func:`aggregate_importance` recomputes the aggregate exactly.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (got {batch_size!r})")
    sequences = tokenize_texts(tokenizer, texts, max_length)
    batches = length_sorted_batches(sequences, batch_size, pad_token_id(tokenizer), tokenizer.padding_side)
    rows = score_token_batches(model, batches, metrics=metrics, total=-(-len(sequences) // batch_size),
                               progress=progress)
    return rows if per_sample else aggregate_importance(rows)


SCORING_VERSION = 2


def distribution_key(model_record: dict, manifest: dict, name: str, settings: dict) -> str:
    """The stage key of one (model checksum, dtype, distribution, its documents' key, settings incl. batch size) score
    table."""
    return stage_key("scores", [model_record.get("weights_sha256"), model_record.get("dtype")], name,
                     documents_key(manifest), settings,
                     SCORING_VERSION)


def calibration_windows(name: str, tokenizer, *, n_samples: int, seq_len: int, seed: int, split: str = "calibration"):
    """``n_samples`` windows of ``seq_len`` tokens of one distribution's ``split``
    (:func:`analysis.data.samples.calibration_samples`)."""
    return calibration_samples(load_distribution(name, split), tokenizer, n_samples=n_samples, seq_len=seq_len,
                               seed=seed)


def score_windows(model: torch.nn.Module, samples, name: str, *, batch_size: int,
                  metrics: Sequence[str] | str = PROXY_DEFAULT,
                  progress: bool = True) -> pd.DataFrame:
    """Per-sample score rows of ``model`` on one distribution's token windows, with a ``distribution`` column
    ``name``."""
    return score_token_batches(
        model, token_batches(samples, batch_size), metrics=metrics, total=-(-len(samples) // batch_size),
        progress=progress
    ).assign(distribution=name)


def score_distributions(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "calibration",
    metrics: Sequence[str] | str = PROXY_DEFAULT,
    store: StageStore | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-sample score rows of ``model`` on each distribution under each metric, with a ``distribution`` column.

    With a ``store`` (:class:`analysis.stages.StageStore`) each distribution's table is a stage
    keyed by the model's checksum and dtype, the distribution's documents key and the settings
    (batch size included), so a rerun or an interrupted run recomputes nothing already saved.
    Models without a checksum are not stored.  The windows of the distributions still to score
    are cut in a background thread, each while the one before it is scored, so tokenisation
    (repeated in every process under torch.distributed) overlaps the model's work.
    """
    settings = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed, "split": split, "batch_size": batch_size,
                "metrics": list(check_metrics(metrics))}
    record = model_info(model)
    tables, keys, saved = [], {}, {}
    for name in names:
        if store is not None and record.get("weights_sha256"):
            manifest = load_manifest(name)
            keys[name] = (manifest, distribution_key(record, manifest, name, settings))
            saved[name] = store.cached(_entry(name, keys[name][1]), keys[name][1])
    pending = [name for name in names if saved.get(name) is None]
    pool = ThreadPoolExecutor(max_workers=1)
    windows = {name: pool.submit(calibration_windows, name, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                 split=split)
               for name in pending}
    try:
        for name in tqdm(list(names), desc="distributions", unit="dist", disable=not progress):
            def compute(name=name):
                return score_windows(model, windows[name].result(), name, batch_size=batch_size, metrics=metrics,
                                     progress=progress)

            if saved.get(name) is not None:
                tables.append(saved[name])
                continue
            if name not in keys:
                tables.append(compute())
                continue
            manifest, key = keys[name]
            where = {"name": name, "manifest": manifest["_path"], "manifest_sha256": manifest["_sha256"],
                     "sources": sources_used(manifest)}
            tables.append(store.table(_entry(name, key), key, compute, distribution=where, settings=settings))
    finally:
        pool.shutdown(cancel_futures=True)
    return pd.concat(tables, ignore_index=True)


def _entry(name: str, key: str) -> str:
    """A distribution's score table's name in a store: the name (``/`` as ``--``) and the key's first 20 digits."""
    return f"{name.replace('/', '--')}-{key[:20]}"
