"""analysis.data.samples: calibration windows, chat rendering, and the one padding and batching path."""

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from analysis.models import loading as models
from analysis.data import samples
from analysis.data.documents import SPLITS, load_distribution, subsets
from analysis.errors import InputError
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level

from tiny import byte_tokenizer


def fetched(name):
    if not is_fetched(load_manifest(name)):
        pytest.skip(f"distribution {name} is not fetched; run `calibdrop data fetch {name}`")
    return name


@pytest.fixture(scope="module")
def smollm_tokenizer():
    if not models.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched; run `calibdrop models fetch`")
    return models.load_model("smollm2-135m")[1]


def test_same_seed_same_samples_other_seed_other_samples():
    tokenizer = byte_tokenizer()
    documents = load_distribution(fetched("general"), "calibration")
    first = samples.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=0)
    again = samples.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=0)
    other = samples.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=1)
    assert first["input_ids"] == again["input_ids"]
    assert first["input_ids"] != other["input_ids"]
    assert all(len(ids) == 64 for ids in first["input_ids"])


def test_windows_are_the_documents_joined_with_eos_and_cut():
    tokenizer = byte_tokenizer()
    documents = datasets.Dataset.from_dict({"text": ["abcdef", "ghij"], "doc_id": ["one", "two"]})
    windows = samples.calibration_samples(documents, tokenizer, n_samples=2, seq_len=5, seed=0, max_windows_per_doc=2)
    eos = tokenizer.eos_token_id
    streams = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in ("abcdef", "ghij")]
    joined = [streams[0] + streams[1], streams[1] + streams[0]]
    assert windows["input_ids"] in [[j[:5], j[5:10]] for j in joined]
    assert windows["doc_ids"][0] in (["one"], ["two"]) and windows["doc_ids"][1] == ["one", "two"]
    assert windows["attention_mask"] == [[1] * 5, [1] * 5]


def test_batched_tokenization_gives_the_ids_of_one_call_per_document(smollm_tokenizer):
    """Documents tokenized in chunks (16, 32, 64 ...) come in the given order with the ids of one tokenizer call each."""
    documents = load_distribution(fetched("chat"), "calibration")
    order = np.random.default_rng(3).permutation(len(documents))[:100]
    batched = list(samples._tokenized_in_order(documents, smollm_tokenizer, order))
    rows = [documents[int(i)] for i in order]
    assert [row["doc_id"] for row, _ in batched] == [row["doc_id"] for row in rows]
    assert [ids for _, ids in batched] == [
        smollm_tokenizer(samples.render_document(row, smollm_tokenizer), add_special_tokens=False)["input_ids"] for row in rows]


def test_heldout_samples_never_share_documents_with_calibration_samples():
    tokenizer = byte_tokenizer()
    calibration = samples.calibration_samples(load_distribution(fetched("math"), "calibration"), tokenizer, n_samples=32, seq_len=128)
    heldout = samples.calibration_samples(load_distribution("math", "heldout"), tokenizer, n_samples=32, seq_len=128)
    assert not {d for ds in calibration["doc_ids"] for d in ds} & {d for ds in heldout["doc_ids"] for d in ds}


def test_too_little_text_says_how_much_there_is():
    documents = load_distribution(fetched("general"), "heldout")
    with pytest.raises(InputError, match=r"has 125 documents and \d+ tokens, enough for \d+ samples of 512 tokens .*not 100000"):
        samples.calibration_samples(documents, byte_tokenizer(), n_samples=100000, seq_len=512)


def test_conversations_use_the_chat_template_when_the_tokenizer_has_one(smollm_tokenizer):
    row = load_distribution(fetched("chat"), "calibration")[0]
    assert "<|im_start|>user" in samples.render_document(row, smollm_tokenizer)
    assert samples.render_document(row, byte_tokenizer()).startswith("User: ")


@pytest.mark.parametrize("name", top_level())
def test_default_tokenizer_gets_enough_samples(name, smollm_tokenizer):
    for label, need in [(name, (256, 64))] + [(sub, (64, 16)) for sub in subsets(fetched(name))]:
        for split, n_samples in zip(SPLITS, need):
            windows = samples.calibration_samples(load_distribution(label, split), smollm_tokenizer, n_samples=n_samples, seq_len=512)
            assert len(windows) == n_samples


@pytest.mark.parametrize("side, ids, mask", [
    ("right", [[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]]),
    ("left", [[5, 6, 7], [0, 8, 9]], [[1, 1, 1], [0, 1, 1]]),
])
def test_padding_on_either_side(side, ids, mask):
    [batch] = samples.padded_batches([[5, 6, 7], [8, 9]], 4, pad_id=0, side=side)
    assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long and batch["sample"] == [0, 1]


def test_length_sorted_batches_group_longest_first_and_keep_sample_numbers():
    sequences = [[1], [1, 2, 3], [1, 2], [4, 5, 6]]
    batches = list(samples.length_sorted_batches(sequences, 2, pad_id=9, side="right"))
    assert [b["sample"] for b in batches] == [[1, 3], [2, 0]]
    assert batches[1]["input_ids"].tolist() == [[1, 2], [1, 9]]


def test_token_batches_equal_the_windows_as_torch_tensors():
    windows = datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(5)], "attention_mask": [[1, 1, 1]] * 5,
                                          "sample": list(range(5))})
    as_torch = windows.with_format("torch", columns=["input_ids", "attention_mask"])
    batches = list(samples.token_batches(windows, 2))
    assert [b["sample"] for b in batches] == [[0, 1], [2, 3], [4]]
    for start, batch in zip(range(0, 5, 2), batches):
        expected = as_torch[start : start + 2]
        for key in ("input_ids", "attention_mask"):
            assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key])


@pytest.mark.parametrize("pad, eos, want", [(3, 1, 3), (None, 1, 1), (None, [7, 8], 7), (None, None, 0)])
def test_pad_token_id_falls_back_to_eos_then_zero(pad, eos, want):
    assert samples.pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == want
