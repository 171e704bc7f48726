"""Which drop set to use for *your* texts: a run's leading sets and the baselines, judged by real loss on your texts.

Your texts are split at random, by text, into a choosing half and a confirming half; each text is cut into windows of
``seq_len`` tokens (at most ``max_windows_per_text``; a text shorter than a window is one window of its own length).
Every set's summed next-token NLL on every window (:func:`analysis.evaluation.heldout.window_nll`) gives its
perplexity ratio to the unpruned model on each half, ``exp((sum_w nll_set[w] - sum_w nll_none[w]) / tokens)``.  The
set of lowest ratio on the choosing half is the pick; on the confirming half it is paired with every other set
(:func:`analysis.study.recommend.confirm_groups`): **recommended** when it loses less than each, an **equivalent
group** when every set it does not beat is shown within the margin, else **not resolved** with the windows that would
decide.  The candidates, per module kind and budget of the run: its ``top`` sets by worst-case held-out ratio, every
set of its answer's group, and the baselines (drop the last k, the paper's recipe); never its random sets.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pandas as pd

from ..data.samples import tokenize_texts
from ..errors import InputError
from ..study import recommend
from ..study.dropsets import UNPRUNED
from .check import MIN_TEXTS
from .heldout import window_nll, worst_case_replicates

CHOOSE, CONFIRM = "choose", "confirm"
MIN_WINDOWS = 4  # per half: fewer leave the paired standard error undefined or meaningless


def text_windows(tokenizer, texts, *, seq_len: int, max_windows_per_text: int = 4) -> datasets.Dataset:
    """Windows of ``seq_len`` tokens cut from each text in order (``text``: its index), at most
    ``max_windows_per_text`` per text; a shorter text, or a text's last part of at least 2 tokens when it has no full
    window, is a window of its own length.  A text of fewer than 2 tokens predicts nothing and is skipped with a
    warning."""
    with warnings.catch_warnings():  # a long text gives its first windows by design: no warning that it was cut
        warnings.filterwarnings("ignore", message=".*longer than max_length")
        ids = tokenize_texts(tokenizer, list(texts), max_length=seq_len * max_windows_per_text)
    windows, owners, short = [], [], 0
    for index, tokens in enumerate(ids):
        if len(tokens) < 2:
            short += 1
            continue
        cuts = [tokens[start:start + seq_len] for start in range(0, len(tokens), seq_len)]
        cuts = [cut for cut in cuts if len(cut) == seq_len] or [cuts[0]]
        windows += cuts[:max_windows_per_text]
        owners += [index] * len(cuts[:max_windows_per_text])
    if short:
        warnings.warn(f"{short} text(s) of fewer than 2 tokens predict nothing and were skipped", stacklevel=2)
    return datasets.Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows],
                                       "sample": list(range(len(windows))), "text": owners})


def halves(n_texts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Text indices of the choosing and confirming halves: a seeded random permutation cut in two."""
    order = np.random.default_rng(seed).permutation(n_texts)
    return np.sort(order[: n_texts // 2]), np.sort(order[n_texts // 2:])


def candidate_sets(set_groups: pd.DataFrame, *, top: int = 5) -> pd.DataFrame:
    """The sets a choice weighs, per module kind and budget of a run's ``set_groups``: its ``top`` candidates by rank,
    every candidate of its answer's group and its baselines (the columns of
    :func:`analysis.study.recommend.distinct_sets`)."""
    if "aliases" not in set_groups:
        raise InputError("the run's set_groups table predates member recommendations: rerun `calibdrop run --out "
                         "RUN` with this version to recompute it (only the resolution stage recomputes)")
    chosen = set_groups[(set_groups["role"] == "candidate") & (
        (set_groups["rank"] <= top) | set_groups["in_group"] | set_groups["baselines"].map(len).gt(0))]
    return chosen[["module", "k", "drop_set", "aliases", "members", "role", "baselines"]].reset_index(drop=True)


def choose(model, tokenizer, texts, sets: pd.DataFrame, drop_sets: dict, *, seq_len: int = 128,
           max_windows_per_text: int = 4, margin: float = recommend.MARGIN, alpha: float = recommend.ALPHA,
           n_boot: int = 1000, seed: int = 0, batch_size: int = 4, progress: bool = False) -> dict[str, pd.DataFrame]:
    """The pick per module kind and budget for ``texts`` (module docstring): ``choice`` (the columns of
    :func:`analysis.study.recommend.confirm_groups`) and ``windows`` (every window's NLL under every set, ``half``
    naming its half)."""
    if len(texts) < MIN_TEXTS:
        raise InputError(f"{len(texts)} texts cannot be split into a choosing and a confirming half of at least "
                         f"{MIN_TEXTS // 2} each: give at least {MIN_TEXTS} texts")
    parts = {}
    for name, indices in zip((CHOOSE, CONFIRM), halves(len(texts), seed)):
        parts[name] = text_windows(tokenizer, [texts[i] for i in indices], seq_len=seq_len,
                                   max_windows_per_text=max_windows_per_text)
        if len(parts[name]) < MIN_WINDOWS:
            raise InputError(f"the {name} half of your {len(texts)} texts gives {len(parts[name])} windows of at most "
                             f"{seq_len} tokens; deciding needs at least {MIN_WINDOWS} in each half: give more or "
                             "longer texts, or a smaller --seq-len")
    windows = window_nll(model, parts, {UNPRUNED: None, **drop_sets}, batch_size=batch_size, progress=progress)
    worst = {name: worst_case_replicates(part, n_boot=n_boot, seed=seed)
             for name, part in windows.groupby("distribution", sort=False)}
    choice = recommend.confirm_groups(worst[CHOOSE][0], worst[CONFIRM][0], sets, n_windows=worst[CONFIRM][1],
                                      margin=margin, alpha=alpha)
    return {"choice": choice, "windows": windows.rename(columns={"distribution": "half"})}
