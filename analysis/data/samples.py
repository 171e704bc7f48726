"""Model inputs: documents rendered and tokenized, cut into calibration windows, and padded into batches.

:func:`padded_batches` is the one padding and batching path: scoring texts, scoring
calibration windows, held-out perplexity and the benchmarks all batch through it.  A batch is
``{"input_ids": (rows, width) long, "attention_mask": (rows, width) long, 1 = real token,
"sample": row numbers}``, each row padded with the pad id on one side to the batch's longest.
"""

from __future__ import annotations

import json
import warnings
from typing import Iterator, Sequence

import datasets
import numpy as np
import torch

from ..errors import CalibdropWarning, InputError


def render_document(row: dict, tokenizer) -> str:
    """A document's text; conversations go through the tokenizer's chat template when it has one."""
    if row.get("messages") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False)
    return row["text"]


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts every text with BOS by default (Gemma), else ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _tokenized_in_order(dataset: datasets.Dataset, tokenizer, order, first_chunk: int = 16, largest_chunk: int = 256):
    """``(row, token ids)`` of the documents in ``order``, each tokenized without special tokens.

    Documents are tokenized a chunk at a time with one batched tokenizer call (a fast tokenizer
    spreads it over the CPU cores and releases the GIL); chunks double from ``first_chunk`` to
    ``largest_chunk`` so a caller that stops early tokenized at most one chunk too many.  The ids
    equal those of one call per document.
    """
    start, size = 0, first_chunk
    while start < len(order):
        chosen = [int(i) for i in order[start : start + size]]
        rows = dataset.select(chosen).to_list()
        encoded = tokenizer([render_document(row, tokenizer) for row in rows], add_special_tokens=False)["input_ids"]
        yield from zip(rows, encoded)
        start, size = start + size, min(2 * size, largest_chunk)


def calibration_samples(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    max_windows_per_doc: int = 2,
) -> datasets.Dataset:
    """``n_samples`` windows of exactly ``seq_len`` tokens cut from the documents, as the paper does.

    Documents are taken in a seeded random order and tokenized without special tokens; a
    document longer than ``max_windows_per_doc * seq_len`` tokens contributes a span of that
    length from a seeded random offset (so no file's licence header dominates); documents are
    joined with EOS and the stream is cut into consecutive windows.  A tokenizer that starts
    texts with BOS gets BOS as each window's first token.  Columns: ``input_ids``,
    ``attention_mask``, ``sample``, ``doc_ids``.
    """
    if n_samples < 1 or seq_len < 2:
        raise InputError(f"need n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    rng = np.random.default_rng(seed)
    prefix = _bos_prefix(tokenizer)
    width = seq_len - len(prefix)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = max_windows_per_doc * width
    stream: list[int] = []
    owners: list[str] = []
    windows, window_docs = [], []
    total_tokens = 0
    for row, ids in _tokenized_in_order(dataset, tokenizer, rng.permutation(len(dataset))):
        total_tokens += len(ids)
        if len(ids) > budget:
            start = int(rng.integers(0, len(ids) - budget + 1))
            ids = ids[start : start + budget]
        stream += ids + eos
        owners += [row["doc_id"]] * (len(ids) + len(eos))
        while len(stream) >= width and len(windows) < n_samples:
            windows.append(prefix + stream[:width])
            window_docs.append(sorted(set(owners[:width])))
            stream, owners = stream[width:], owners[width:]
        if len(windows) == n_samples:
            break
    if len(windows) < n_samples:
        raise InputError(
            f"{dataset.info.description or 'this dataset'} has {len(dataset)} documents and {total_tokens} tokens, "
            f"enough for {len(windows)} samples of {seq_len} tokens (at most {max_windows_per_doc} windows per "
            f"document), not {n_samples}: ask for fewer samples or a shorter seq_len"
        )
    return datasets.Dataset.from_dict(
        {
            "input_ids": windows,
            "attention_mask": [[1] * seq_len for _ in windows],
            "sample": list(range(len(windows))),
            "doc_ids": window_docs,
        }
    )


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, ``tokenizer(text, truncation=True, max_length=max_length)``; warns when a text is cut."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string: wrap it as [text]")
    if len(texts) == 0:
        raise InputError("the list of texts is empty: give at least one text to score")
    if not isinstance(max_length, int) or max_length < 2:
        raise InputError(f"max_length must be an integer of at least 2 (got {max_length!r})")
    encoded, cut = [], []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text #{index} is a {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InputError(f"text #{index} holds {ascii(text[error.start:error.end])}, half of a UTF-16 surrogate "
                             "pair, not Unicode text: remove it or give the whole character") from None
        ids = tokenizer(text)["input_ids"]
        if len(ids) > max_length:
            cut.append(f"#{index} ({len(ids)} tokens)")
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) == 0:
            raise InputError(f"text #{index} ({text[:40]!r}) tokenizes to zero tokens: remove it or give it content")
        encoded.append(list(ids))
    if cut:
        warnings.warn(
            f"{len(cut)} of {len(texts)} texts are longer than max_length={max_length} tokens and were cut to it "
                      f"({', '.join(cut[:3])}{' ...' if len(cut) > 3 else ''}): raise the length or split them",
                      CalibdropWarning)
    return encoded


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, list) else candidate)
    return 0


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for sequences padded to the longest on ``side``."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, *, pad_id: int = 0, side: str = "right",
    order: Sequence[int] | None = None
) -> Iterator[dict]:
    """Batches of ``batch_size`` sequences taken in ``order`` (default: as given), each padded on ``side`` to its
    longest with ``pad_id`` (:func:`pad_sequences`); ``sample`` holds the chosen sequences' indices."""
    order = list(range(len(sequences))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield {**pad_sequences([sequences[i] for i in chosen], pad_id, side), "sample": chosen}


def length_sorted_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                          side: str) -> Iterator[dict]:
    """:func:`padded_batches` of sequences grouped by length, longest first (ties in the given order)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return padded_batches(sequences, batch_size, pad_id=pad_id, side=side, order=order)


def token_batches(samples: datasets.Dataset, batch_size: int) -> Iterator[dict]:
    """:func:`padded_batches` of token windows, ``sample`` their numbers.  Calibration windows are all one length, so
    nothing is padded; windows that carry an ``attention_mask`` keep only their real tokens (then padded on the
    right)."""
    numbers = samples["sample"]
    sequences = samples["input_ids"]
    if "attention_mask" in samples.column_names:
        sequences = [[token for token, real in zip(ids, mask) if real] for ids,
                     mask in zip(sequences, samples["attention_mask"])]
    for batch in padded_batches(sequences, batch_size):
        yield {**batch, "sample": [numbers[i] for i in batch["sample"]]}
