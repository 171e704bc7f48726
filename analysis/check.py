"""Does a drop set still hold on your data?  One scoring pass over your texts, then the numbers.

The drop set's *reference ranking* is its metric's importance pooled token-weighted over the
samples of its source distributions (its ``distributions``; one for an ``own:<d>`` set, all of
them for a consensus set): ``I_ref[m] = g(sum_s stat_sum[s, m] / sum_s n_tokens[s])`` over
those samples, and ``I_you[m]`` the same over your texts.  :func:`check` reports

* ``ρ = spearman(I_ref, I_you)`` beside your texts' split-half noise floor (Spearman-Brown
  corrected ρ between random halves of your texts, :func:`analysis.stability.split_half_reliability`);
* a permutation test of the difference: the statistic ``1 - ρ``, the null shuffling samples
  between your texts and the calibration samples (:func:`analysis.stability.permutation_test`);
  ``drift`` is ``p < alpha``;
* regret on your data by the proxy, ``regret(D) = sum_{m in D} I_you[m] - min_{|D'|=k} sum_{m in D'} I_you[m]``
  (:func:`analysis.consensus.regret_table`), for the drop set, the consensus set of all the
  scored distributions and your own k least important modules ("recalibrated"), each also as
  a fraction of a random set's expected regret;
* with ``loss_samples = n``: the real held-out cost of each of those sets on n of your texts,
  the perplexity ratio to the unpruned model ``exp((sum nll_D - sum nll_none) / tokens)`` with
  bootstrap CIs over texts (:func:`analysis.evaluation.window_nll`, :func:`analysis.evaluation.transfer_summary`);
* one recommendation: ``keep`` when there is no drift or the drop set's regret is at most
  ``regret_tolerance`` of a random set's; otherwise ``consensus`` when the consensus set costs
  no more than recalibrating (by the real loss when measured, else by a proxy regret within the
  tolerance), else ``recalibrate``.

A drop-set JSON names its per-sample source scores under ``scores`` (``path`` and ``sha256``,
written by ``calibdrop consensus`` and :func:`drop_set_record`); older files without it need
``source_scores``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from .consensus import consensus_from_matrix, regret_table
from .dropsets import UNPRUNED, make_drop_set
from .errors import InputError
from .evaluation import transfer_summary, window_nll
from .io import read_table
from .scoring import pad_token_id, score_texts, tokenize_texts
from .stability import drop_set, importance_matrix, one_metric, permutation_test, rank_agreement, split_half_reliability

YOURS = "yours"
CALIBRATION = "calibration"
VERDICTS = {
    "keep": "keep the drop set",
    "consensus": "use the consensus set",
    "recalibrate": "recalibrate on your data",
}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_pointer(per_sample_path: Path) -> dict:
    """The ``scores`` entry of a drop-set JSON: the per-sample scores' absolute path and sha256."""
    path = Path(per_sample_path).resolve()
    return {"path": str(path), "sha256": file_sha256(path)}


def drop_set_record(scores: pd.DataFrame, *, module: str = "attn", k: int = 8, method: str = "borda", metric: str | None = None,
                    per_sample_path: Path | None = None) -> dict:
    """A drop-set JSON record (as ``calibdrop consensus`` writes) for a consensus method or ``own:<distribution>``,
    naming its source distributions and, with ``per_sample_path``, pointing to its per-sample scores."""
    scores, metric = one_metric(scores, metric)
    matrix = importance_matrix(scores, module, metric)
    if method.startswith("own:"):
        source = method.removeprefix("own:")
        if source not in matrix.columns:
            raise InputError(f"{method}: the scores have no distribution {source!r}; they have {', '.join(matrix.columns)}")
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
        return read_table(Path(source_scores))
    pointer = drop_set_record_.get("scores")
    if not pointer:
        raise InputError("the drop set does not name its source scores (made before `calibdrop check` existed): "
                         "pass the per-sample scores it was built from (--scores RESULTS)")
    path = Path(pointer["path"])
    if not path.is_file():
        raise InputError(f"the drop set's source scores {path} are gone: pass the per-sample scores it was built from (--scores RESULTS)")
    if pointer.get("sha256") and file_sha256(path) != pointer["sha256"]:
        raise InputError(f"{path} changed since the drop set was made (sha256 differs): pass the scores it was built from (--scores RESULTS)")
    return read_table(path)


def _pooled(rows: pd.DataFrame, label: str) -> pd.DataFrame:
    """Per-sample rows relabelled as one distribution ``label``, with sample ids made unique across the old distributions."""
    keys = rows[["distribution", "sample"]].astype(str).agg("/".join, axis=1) if "distribution" in rows else rows["sample"].astype(str)
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

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name (``loss`` only when measured)."""
        out = {"check_summary": self.summary, "check_regret": self.regret}
        return out | ({"check_loss": self.loss} if self.loss is not None else {})


def _text_windows(tokenizer, texts, n: int, max_length: int, seed: int) -> datasets.Dataset:
    """``n`` of the texts (a seeded random subsample) as right-padded windows for :func:`analysis.evaluation.window_nll`."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)), replace=False))
    sequences = tokenize_texts(tokenizer, [texts[i] for i in chosen], max_length)
    width = max(len(s) for s in sequences)
    pad = pad_token_id(tokenizer)
    return datasets.Dataset.from_dict({
        "input_ids": [s + [pad] * (width - len(s)) for s in sequences],
        "attention_mask": [[1] * len(s) + [0] * (width - len(s)) for s in sequences],
        "sample": [int(i) for i in chosen],
    })


def measured_loss(model, tokenizer, texts, sets: dict, *, n: int, max_length: int, batch_size: int, n_boot: int, seed: int) -> pd.DataFrame:
    """Perplexity ratio to the unpruned model of each drop set (label → record) on ``n`` of the texts, with bootstrap CIs."""
    windows = window_nll(model, {YOURS: _text_windows(tokenizer, texts, n, max_length, seed)}, {UNPRUNED: None, **sets}, batch_size=batch_size)
    summary = transfer_summary(windows, n_boot=n_boot, seed=seed)
    return summary[summary["distribution"] == YOURS].reset_index(drop=True)


def _verdict(drift: bool, fraction: dict, cost: dict, tolerance: float, has_consensus: bool) -> str:
    """keep / consensus / recalibrate from the drift flag, regret fractions and the costs used to choose."""
    if not drift or fraction["drop_set"] <= tolerance:
        return "keep"
    if has_consensus and cost["consensus"] <= cost["recalibrated"]:
        return "consensus"
    return "recalibrate"


def check(model, tokenizer, drop_set_record_: dict, texts, *, source_scores: pd.DataFrame | Path | None = None, metric: str | None = None,
          consensus_method: str = "borda", max_length: int = 512, batch_size: int = 8, loss_samples: int = 0, alpha: float = 0.05,
          regret_tolerance: float = 0.1, n_perm: int = 1000, n_splits: int = 200, n_boot: int = 1000, seed: int = 0,
          your_scores: pd.DataFrame | None = None, progress: bool = False) -> CheckResult:
    """Check a drop set (a record as ``calibdrop consensus`` writes) against ``texts``; see the module docstring.

    ``your_scores`` (per-sample rows of the texts) skips the scoring pass when already computed.
    """
    module, k = drop_set_record_["module"], len(drop_set_record_["indices"])
    metric = metric or drop_set_record_.get("metric") or "cosine"
    source, metric = one_metric(load_source_scores(drop_set_record_, source_scores), metric)
    names = drop_set_record_.get("distributions") or list(dict.fromkeys(source["distribution"]))
    unknown = set(names) - set(source["distribution"])
    if unknown:
        raise InputError(f"the source scores lack the drop set's distributions {sorted(unknown)}")
    yours = your_scores if your_scores is not None else score_texts(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, metrics=[metric], per_sample=True, progress=progress)
    yours = one_metric(yours, metric)[0].assign(distribution=YOURS)
    columns = ["metric", "distribution", "sample", "layer", "module", "stat_sum", "n_tokens"]
    pair = pd.concat([_pooled(source[source["distribution"].isin(names)], CALIBRATION)[columns], yours[columns]], ignore_index=True)
    agreement = rank_agreement(pair, module=module, k=(k,), metric=metric).iloc[0]
    floor = split_half_reliability(pair, module=module, k=(k,), n_splits=n_splits, seed=seed, metric=metric).set_index("distribution")
    p_value = float(permutation_test(pair, module=module, k=(k,), n_perm=n_perm, seed=seed, metric=metric)["p_spearman"].iloc[0])

    everything = pd.concat([source[columns], yours[columns]], ignore_index=True)
    matrix = importance_matrix(everything, module, metric)
    indices = [str(i) if module == "joint" else int(i) for i in drop_set_record_["indices"]]
    consensus = consensus_from_matrix(matrix.drop(columns=YOURS), k, consensus_method)
    recalibrated = drop_set(matrix[YOURS], k)
    sets = {"drop_set": indices, "consensus": consensus, "recalibrated": recalibrated}
    regret = regret_table(everything, sets, module=module, metric=metric)
    regret = regret[regret["distribution"] == YOURS].reset_index(drop=True)
    random_regret = float(regret.loc[regret["drop_set"] == "random", "regret"].iloc[0])
    regret["fraction_of_random"] = regret["regret"] / random_regret if random_regret > 0 else np.nan
    fraction = dict(zip(regret["drop_set"], regret["fraction_of_random"]))
    has_consensus = sorted(map(str, consensus)) != sorted(map(str, indices))
    cost = {"consensus": fraction["consensus"], "recalibrated": regret_tolerance}

    loss = None
    if loss_samples:
        methods = {"drop_set": "checked", "consensus": consensus_method, "recalibrated": "recalibrated"}
        chosen_sets = {role: make_drop_set(module, sets[role], method, metric) for role, method in methods.items()}
        labels = {role: spec.label for role, spec in chosen_sets.items()}
        records = {spec.label: spec.record() for spec in chosen_sets.values()}
        loss = measured_loss(model, tokenizer, texts, records, n=loss_samples, max_length=max_length, batch_size=batch_size, n_boot=n_boot, seed=seed)
        loss["role"] = loss["drop_set"].map({label: role for role, label in labels.items()}).fillna(UNPRUNED)
        ratio = dict(zip(loss["role"], loss["ppl_ratio"]))
        cost = {"consensus": ratio["consensus"], "recalibrated": ratio["recalibrated"]}

    drift = p_value < alpha
    verdict = _verdict(drift, fraction, cost, regret_tolerance, has_consensus)
    summary = pd.DataFrame([{
        "metric": metric, "module": module, "k": k, "drop_set": str(indices), "sources": ",".join(names), "n_texts": int(yours["sample"].nunique()),
        "spearman": float(agreement["spearman"]), f"jaccard@{k}": float(agreement[f"jaccard@{k}"]),
        "noise_floor": float(floor.loc[YOURS, "reliability"]), "noise_floor_ci_low": float(floor.loc[YOURS, "reliability_ci_low"]),
        "noise_floor_ci_high": float(floor.loc[YOURS, "reliability_ci_high"]), "calibration_noise_floor": float(floor.loc[CALIBRATION, "reliability"]),
        "p_permutation": p_value, "drift": drift, "regret": float(fraction["drop_set"] * random_regret) if random_regret > 0 else np.nan,
        "regret_fraction_of_random": fraction["drop_set"], "consensus_regret_fraction": fraction["consensus"], "verdict": verdict,
    }])
    line = recommendation_line(summary.iloc[0], fraction, consensus, recalibrated, consensus_method, loss)
    return CheckResult(verdict, line, drift, summary, regret, loss, recalibrated)


def recommendation_line(row: pd.Series, fraction: dict, consensus: list, recalibrated: list, consensus_method: str,
                        loss: pd.DataFrame | None) -> str:
    """The one-line recommendation with the numbers behind it."""
    words = (f"{VERDICTS[row['verdict']]}: on your {row['n_texts']} texts the {row['metric']} ranking agrees with the drop set's "
             f"calibration ranking at rho = {row['spearman']:.3f} against your split-half noise floor {row['noise_floor']:.3f} "
             f"[{row['noise_floor_ci_low']:.3f}, {row['noise_floor_ci_high']:.3f}] (permutation p = {row['p_permutation']:.3g}, "
             f"{'drift' if row['drift'] else 'no drift'}); proxy regret of the drop set {fraction['drop_set']:.0%} of a random set's, "
             f"{consensus_method} consensus {sorted(consensus, key=str)} {fraction['consensus']:.0%}")
    if loss is not None:
        ratio = dict(zip(loss["role"], zip(loss["ppl_ratio"], loss["ci_low"], loss["ci_high"])))
        words += "; perplexity ratio on your texts: " + ", ".join(
            f"{role} {value:.3f} [{low:.3f}, {high:.3f}]" for role, (value, low, high) in ratio.items() if role != UNPRUNED)
    return words + f"; your own {len(recalibrated)} least important: {sorted(recalibrated, key=str)}"

