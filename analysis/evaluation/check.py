"""Does a drop set still hold on your data?  One scoring pass over your texts, then the numbers.

The drop set's *reference ranking* is its metric's importance pooled token-weighted over the
samples of its source distributions (its ``distributions``; one for an ``own:<d>`` set, all of
them for a consensus set): ``I_ref[m] = g(sum_s stat_sum[s, m] / sum_s n_tokens[s])`` over
those samples, and ``I_you[m]`` the same over your texts.  :func:`check` reports

* ``ρ = spearman(I_ref, I_you)`` beside your texts' split-half noise floor (Spearman-Brown
  corrected ρ between random halves of your texts, :func:`analysis.study.stability.split_half_reliability`);
* a permutation test of the difference: the statistic ``1 - ρ``, the null shuffling samples
  between your texts and the calibration samples (:func:`analysis.study.stability.permutation_test`);
  ``drift`` is ``p < alpha``;
* regret on your data by the proxy, ``regret(D) = sum_{m in D} I_you[m] - min_{|D'|=k} sum_{m in D'} I_you[m]``
  (:func:`analysis.study.consensus.regret_table`), for the drop set, the consensus set of all the
  scored distributions and your own k least important modules ("recalibrated"), each also as
  a fraction of a random set's expected regret;
* with ``loss_samples = n``: the real held-out cost of each of those sets on n of your texts,
  the perplexity ratio to the unpruned model ``exp((sum nll_D - sum nll_none) / tokens)`` with
  bootstrap CIs over texts (:func:`analysis.evaluation.heldout.window_nll`,
  :func:`analysis.evaluation.heldout.transfer_summary`);
* one recommendation: ``keep`` when there is no drift or the drop set's regret is at most
  ``regret_tolerance`` of a random set's; otherwise ``consensus`` when the consensus set costs
  no more than recalibrating (by the real loss when measured, else by a proxy regret within the
  tolerance), else ``recalibrate``.

A drop-set JSON names its per-sample source scores under ``scores`` (``path`` and ``sha256``,
written by ``calibdrop consensus`` and :func:`drop_set_record`); older files without it need
``source_scores``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from ..artifacts import read_result_table
from ..data.samples import pad_token_id, tokenize_texts
from ..errors import CalibdropWarning, InputError
from ..importance.scoring import score_texts
from ..io import sha256_file
from ..presets import PRIMARY_METRIC
from ..study.consensus import consensus_from_matrix, regret_table
from ..study.dropsets import UNPRUNED, make_drop_set
from ..study.resolution import p_text
from ..study.stability import permutation_test, rank_agreement, split_half_reliability
from ..study.tables import drop_set, importance_matrix, one_metric
from .heldout import paired_comparisons, transfer_summary, window_nll

YOURS = "yours"
CALIBRATION = "calibration"
VERDICTS = {
    "keep": "keep the drop set",
    "consensus": "use the consensus set",
    "recalibrate": "recalibrate on your data",
}


MIN_TEXTS = 4  # `calibdrop check` refuses fewer texts: split-half reliability needs two in each half


def source_pointer(per_sample_path: Path) -> dict:
    """The ``scores`` entry of a drop-set JSON: the per-sample scores' absolute path and sha256."""
    path = Path(per_sample_path).resolve()
    return {"path": str(path), "sha256": sha256_file(path)}


def drop_set_record(scores: pd.DataFrame, *, module: str = "attn", k: int = 8, method: str = "borda",
                    metric: str | None = None,
                    per_sample_path: Path | None = None) -> dict:
    """A drop-set JSON record (as ``calibdrop consensus`` writes) for a consensus method or ``own:<distribution>``,
    naming its source distributions and, with ``per_sample_path``, pointing to its per-sample scores."""
    scores, metric = one_metric(scores, metric)
    matrix = importance_matrix(scores, module, metric)
    if method.startswith("own:"):
        source = method.removeprefix("own:")
        if source not in matrix.columns:
            raise InputError(
                f"{method}: the scores have no distribution {source!r}; they have {', '.join(matrix.columns)}")
        chosen, sources = drop_set(matrix[source], k), [source]
    else:
        chosen, sources = consensus_from_matrix(matrix, k, method), list(matrix.columns)
    record = make_drop_set(module, chosen, method, metric).record()
    record["distributions"] = sources
    if per_sample_path is not None:
        record["scores"] = source_pointer(per_sample_path)
    return record


def load_source_scores(drop_set_record_: dict, source_scores: pd.DataFrame | Path | None = None) -> pd.DataFrame:
    """The per-sample scores behind a drop set: ``source_scores`` (a table or a file), else the file its ``scores``
    entry names, whose sha256 must match."""
    if isinstance(source_scores, pd.DataFrame):
        return source_scores
    if source_scores is not None:
        return read_result_table(Path(source_scores), "scores.per_sample")
    pointer = drop_set_record_.get("scores")
    if not pointer:
        raise InputError("the drop set does not name its source scores (made before `calibdrop check` existed): "
                         "pass the per-sample scores it was built from (--scores RESULTS)")
    path = Path(pointer["path"])
    if not path.is_file():
        raise InputError(
            f"the drop set's source scores {path} are gone: pass the per-sample scores it was built from (--scores "
            f"RESULTS)")
    if pointer.get("sha256") and sha256_file(path) != pointer["sha256"]:
        raise InputError(
            f"{path} changed since the drop set was made (sha256 differs): pass the scores it was built from (--scores "
            f"RESULTS)")
    return read_result_table(path, "scores.per_sample")


def _pooled(rows: pd.DataFrame, label: str) -> pd.DataFrame:
    """Per-sample rows relabelled as one distribution ``label``, with sample ids made unique across the old
    distributions."""
    keys = rows[["distribution", "sample"]].astype(str).agg("/".join,
                                                            axis=1) if "distribution" in rows else rows[
                                                                "sample"].astype(str)
    codes = pd.factorize(keys)[0]
    return rows.assign(distribution=label, sample=codes)


@dataclass
class CheckResult:
    """What :func:`check` found: the recommendation line, its verdict, the drift flag and the tables behind them."""

    verdict: str
    recommendation: str
    drift: bool
    summary: pd.DataFrame
    regret: pd.DataFrame
    loss: pd.DataFrame | None = None
    recalibrated: list = field(default_factory=list)
    paired: pd.DataFrame | None = None

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name (``loss`` and ``paired`` only when the loss was measured)."""
        out = {"check_summary": self.summary, "check_regret": self.regret}
        return out | ({"check_loss": self.loss, "check_paired": self.paired} if self.loss is not None else {})


def _text_windows(tokenizer, texts, n: int, max_length: int, seed: int) -> datasets.Dataset:
    """``n`` of the texts that have a next token to predict (two tokens or more; a seeded random subsample of them) as
    right-padded windows for :func:`analysis.evaluation.heldout.window_nll`.  Shorter texts are skipped with a
    warning; fewer than ``n`` long enough is an :class:`InputError`."""
    lengths = [len(s) for s in tokenize_texts(tokenizer, texts, max_length)]
    usable = np.flatnonzero(np.asarray(lengths) >= 2)
    if len(usable) < n:
        raise InputError(f"loss_samples={n}: only {len(usable)} of your {len(texts)} texts have two tokens or more "
                         f"(a next token whose loss can be measured); give longer texts or a smaller --loss-samples")
    if len(usable) < len(texts):
        warnings.warn(f"{len(texts) - len(usable)} of your texts have fewer than two tokens: the loss is measured on "
                      f"{n} of the other {len(usable)}", CalibdropWarning)
    chosen = np.sort(usable[np.random.default_rng(seed).choice(len(usable), size=n, replace=False)])
    sequences = tokenize_texts(tokenizer, [texts[i] for i in chosen], max_length)
    width = max(len(s) for s in sequences)
    pad = pad_token_id(tokenizer)
    return datasets.Dataset.from_dict({
        "input_ids": [s + [pad] * (width - len(s)) for s in sequences],
        "attention_mask": [[1] * len(s) + [0] * (width - len(s)) for s in sequences],
        "sample": [int(i) for i in chosen],
    })


def _verdict(drift: bool, acceptable: dict, has_consensus: bool) -> str:
    """keep / consensus / recalibrate from the drift flag and whether the drop set and the consensus set are
    acceptable."""
    if not drift or acceptable["drop_set"]:
        return "keep"
    return "consensus" if has_consensus and acceptable["consensus"] else "recalibrate"


def _loss_pairs(labels: dict) -> list:
    """Paired comparisons on your texts: the drop set and the consensus set against the recalibrated set."""
    return [(f"{role} vs recalibrated", labels[role], labels["recalibrated"]) for role in ("drop_set", "consensus")]


def check(model, tokenizer, drop_set_record_: dict, texts, *, source_scores: pd.DataFrame | Path | None = None,
          metric: str | None = None,
          consensus_method: str = "borda", max_length: int = 512, batch_size: int = 8, loss_samples: int = 0,
          alpha: float = 0.05,
          regret_tolerance: float = 0.1, n_perm: int = 1000, n_splits: int = 200, n_boot: int = 1000, seed: int = 0,
          your_scores: pd.DataFrame | None = None, progress: bool = False) -> CheckResult:
    """Check a drop set (a record as ``calibdrop consensus`` writes) against ``texts``; see the module docstring.

    ``your_scores`` (per-sample rows of the texts) skips the scoring pass when already computed.
    """
    module, k = drop_set_record_["module"], len(drop_set_record_["indices"])
    metric = metric or drop_set_record_.get("metric") or PRIMARY_METRIC
    source, metric = one_metric(load_source_scores(drop_set_record_, source_scores), metric)
    names = drop_set_record_.get("distributions") or list(source["distribution"].unique())
    unknown = set(names) - set(source["distribution"])
    if unknown:
        raise InputError(f"the source scores lack the drop set's distributions {sorted(unknown)}")
    if loss_samples and not 1 <= loss_samples <= len(texts) // 2:
        raise InputError(
            f"loss_samples={loss_samples}: give at most half of your {len(texts)} texts, so that the recalibrated set "
                         "compared on them is chosen on the other half")
    yours = your_scores if your_scores is not None else score_texts(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, metrics=[metric], per_sample=True,
        progress=progress)
    yours = one_metric(yours, metric)[0].assign(distribution=YOURS)
    columns = ["metric", "distribution", "sample", "layer", "module", "stat_sum", "n_tokens"]
    pair = pd.concat([_pooled(source[source["distribution"].isin(names)], CALIBRATION)[columns], yours[columns]],
                     ignore_index=True)
    agreement = rank_agreement(pair, module=module, k=(k,), metric=metric).iloc[0]
    floor = split_half_reliability(pair, module=module, k=(k,), n_splits=n_splits, seed=seed,
                                   metric=metric).set_index("distribution")
    p_value = float(permutation_test(pair, module=module, k=(k,), n_perm=n_perm, seed=seed,
                                     metric=metric)["p_spearman"].iloc[0])

    everything = pd.concat([source[columns], yours[columns]], ignore_index=True)
    matrix = importance_matrix(everything, module, metric)
    indices = [str(i) if module == "joint" else int(i) for i in drop_set_record_["indices"]]
    consensus = consensus_from_matrix(matrix.drop(columns=YOURS), k, consensus_method)
    recalibrated = drop_set(matrix[YOURS], k)
    sets = {"drop_set": indices, "consensus": consensus, "recalibrated": recalibrated}
    regret = regret_table(everything, sets, module=module, metric=metric)
    regret = regret[regret["distribution"] == YOURS].reset_index(drop=True)
    regret["excess"] = regret["regret"] / regret["best_importance"].where(regret["best_importance"] > 0)
    excess = dict(zip(regret["drop_set"], regret["excess"]))
    has_consensus = sorted(map(str, consensus)) != sorted(map(str, indices))
    acceptable = {role: bool(excess[role] <= regret_tolerance) for role in ("drop_set", "consensus")}

    loss = paired = None
    if loss_samples:
        loss, paired, labels = _measure(model, tokenizer, texts, yours, sets, module=module, k=k, metric=metric,
                                        consensus_method=consensus_method,
                                        n=loss_samples, max_length=max_length, batch_size=batch_size, n_boot=n_boot,
                                        seed=seed)
        worse = dict(zip(paired["a"], (paired["ratio"] > 1) & (paired["p_value"] < alpha)))
        acceptable = {role: not worse[labels[role]] for role in ("drop_set", "consensus")}

    drift = p_value < alpha
    verdict = _verdict(drift, acceptable, has_consensus)
    summary = pd.DataFrame([{
        "metric": metric, "module": module, "k": k, "drop_set": str(indices), "sources": ",".join(names),
        "n_texts": int(yours["sample"].nunique()),
        "spearman": float(agreement["spearman"]), f"jaccard@{k}": float(agreement[f"jaccard@{k}"]),
        "noise_floor": float(floor.loc[YOURS, "reliability"]),
        "noise_floor_ci_low": float(floor.loc[YOURS, "reliability_ci_low"]),
        "noise_floor_ci_high": float(floor.loc[YOURS, "reliability_ci_high"]),
        "calibration_noise_floor": float(floor.loc[CALIBRATION, "reliability"]),
        "p_permutation": p_value, "p_floor": 1 / (n_perm + 1), "drift": drift, "regret": float(regret.loc[0, "regret"]),
        "excess": excess["drop_set"],
        "consensus_excess": excess["consensus"], "verdict": verdict,
    }])
    line = recommendation_line(summary.iloc[0], excess, consensus, recalibrated, consensus_method, loss, paired)
    return CheckResult(verdict, line, drift, summary, regret, loss, recalibrated, paired)


def _measure(model, tokenizer, texts, yours, sets, *, module, k, metric, consensus_method, n, max_length, batch_size,
             n_boot, seed):
    """The real loss of the drop set, the consensus set and a recalibrated set on ``n`` of the texts; the recalibrated
    set
    is chosen on the other texts, so it is judged out of sample.  Returns the loss table, the paired comparisons and
    the labels."""
    windows = _text_windows(tokenizer, texts, n, max_length, seed)
    others = yours[~yours["sample"].isin(windows["sample"])]
    recalibrated = drop_set(importance_matrix(others, module, metric)[YOURS], k)
    methods = {"drop_set": "checked", "consensus": consensus_method, "recalibrated": "recalibrated"}
    chosen = {role: make_drop_set(module, {**sets, "recalibrated": recalibrated}[role], method, metric) for role,
              method in methods.items()}
    labels = {role: spec.label for role, spec in chosen.items()}
    nll = window_nll(model, {YOURS: windows}, {UNPRUNED: None,
                                               **{spec.label: spec.record() for spec in chosen.values()}},
                                               batch_size=batch_size)
    loss = transfer_summary(nll, n_boot=n_boot, seed=seed)
    loss = loss[loss["distribution"] == YOURS].reset_index(drop=True)
    loss["role"] = loss["drop_set"].map({label: role for role, label in labels.items()}).fillna(UNPRUNED)
    paired = paired_comparisons(nll, _loss_pairs(labels), n_boot=n_boot, seed=seed)
    return loss, paired[paired["distribution"] == YOURS].reset_index(drop=True), labels


def recommendation_line(row: pd.Series, excess: dict, consensus: list, recalibrated: list, consensus_method: str,
                        loss: pd.DataFrame | None, paired: pd.DataFrame | None) -> str:
    """The one-line recommendation with the numbers behind it."""
    words = (
        f"{VERDICTS[row['verdict']]}: on your {row['n_texts']} texts the {row['metric']} ranking agrees with the drop "
        f"set's "
             f"calibration ranking at rho = {row['spearman']:.3f} against your split-half noise floor "
             f"{row['noise_floor']:.3f} [{row['noise_floor_ci_low']:.3f}, {row['noise_floor_ci_high']:.3f}] "
             f"(permutation {p_text(row['p_permutation'], row['p_floor'])}, "
             f"{'drift' if row['drift'] else 'no drift'}); the drop set drops {excess['drop_set']:.0%} more "
             f"{row['metric']} importance than your own best {row['k']}, the {consensus_method} consensus "
             f"{sorted(consensus, key=str)} {excess['consensus']:.0%}")
    if loss is not None:
        ratio = {role: (value, low, high) for role, value, low,
                 high in zip(loss["role"], loss["ppl_ratio"], loss["ci_low"], loss["ci_high"])}
        words += f"; perplexity ratio to the unpruned model on {loss['n_windows'].iloc[0]} of your texts: " + ", ".join(
            f"{role} {value:.3f} [{low:.3f}, {high:.3f}]" for role,
            (value, low, high) in ratio.items() if role != UNPRUNED)
        words += " (recalibrated on the other texts; paired " + ", ".join(
            f"{c.split(' vs ')[0]}/recalibrated {r:.3f}, {p_text(p, f)}"
            for c, r, p, f in zip(paired["comparison"], paired["ratio"], paired["p_value"], paired["p_floor"])) + ")"
    return words + f"; your own {len(recalibrated)} least important: {sorted(recalibrated, key=str)}"
