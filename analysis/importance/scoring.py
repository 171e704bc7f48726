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

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

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
from ..errors import InputError
from ..models.distributed import gather_shards, rank_and_world
from ..models.loading import model_info
from ..stages import StageStore, stage_key
from .ablation import SingleDrops, position_ids_from_mask, single_drop_increase
from .metrics import (
    GROUND_TRUTH,
    TAYLOR,
    check_metrics,
    get_metric,
    importance_column,
    importance_from_sums,
)
from .recorder import MODULES, PROXY_DEFAULT, ResidualRecorder
from .taylor import taylor_increase


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
    order = {name: i for i, name in enumerate(per_sample["metric"].unique())}
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


def _score_batch(model, recorder, ids, mask, own_pass: Sequence[str], keep: SingleDrops | None = None):
    """Stream sums ``(rows, layers, 3, stream metrics)`` from one forward pass (the ablation's, if asked; none when
    neither is: ``recorder`` is ``None``) and, per metric of ``own_pass``, its ΔNLL sums ``(rows, layers, 3)`` and
    predicted tokens; ``keep`` is handed the ablation's rows (:func:`single_drop_increase`)."""
    sums, truth = None, {}
    if recorder is not None:
        recorder.begin_batch(mask)
        with torch.inference_mode():
            if GROUND_TRUTH in own_pass:
                truth[GROUND_TRUTH] = single_drop_increase(model, ids, mask, keep)
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
    keep: SingleDrops | None = None,
) -> pd.DataFrame:
    """Per-sample score rows (``metric, sample, layer, module, stat_sum, n_tokens, importance``) for
    token batches (``input_ids``, ``attention_mask``, optional ``sample``).

    One forward pass per batch gives every proxy metric of ``X`` and ``Y`` (the base model, no LM head, when no
    ground truth is asked; no KV cache); ``ablation`` adds the re-runs of
    :func:`analysis.importance.ablation.single_drop_increase` from that pass's block inputs, ``taylor`` a forward
    and backward pass of its own (:func:`analysis.importance.taylor.taylor_increase`).  Positions are
    counted over real tokens so left and right padding give the same result.  Under
    torch.distributed (``torchrun``, ``accelerate launch``) process r scores batches
    r, r + W, r + 2W, ... and every process returns all rows, gathered.  ``keep`` is handed each batch's ablation rows
    (:meth:`analysis.importance.ablation.TrialCache.single_drops`).
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
            sums, truth = _score_batch(model, recorder, batch["input_ids"].to(device), mask, own_pass, keep)
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
    order = {name: i for i, name in enumerate(frame["metric"].unique())}
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
                  progress: bool = True, keep: SingleDrops | None = None) -> pd.DataFrame:
    """Per-sample score rows of ``model`` on one distribution's token windows, with a ``distribution`` column
    ``name``."""
    return score_token_batches(
        model, token_batches(samples, batch_size), metrics=metrics, total=-(-len(samples) // batch_size),
        progress=progress, keep=keep
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
    keep: SingleDrops | None = None,
) -> pd.DataFrame:
    """Per-sample score rows of ``model`` on each distribution under each metric, with a ``distribution`` column.

    With a ``store`` (:class:`analysis.stages.StageStore`) each distribution's table is a stage
    keyed by the model's checksum and dtype, the distribution's documents key and the settings
    (batch size included), so a rerun or an interrupted run recomputes nothing already saved.
    Models without a checksum are not stored.  The windows of the distributions still to score
    are cut in a background thread, each while the one before it is scored, so tokenisation
    (repeated in every process under torch.distributed) overlaps the model's work.  ``keep`` is handed the ablation's
    rows of each batch computed here (none of a saved table's).
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
                                     progress=progress, keep=keep)

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
