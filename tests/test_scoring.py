import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from analysis import adapter_for, aggregate_importance, score_texts, score_token_batches
from analysis.models.adapters import UnsupportedArchitectureError
from analysis.errors import InputError, NonFiniteActivationError
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest
from analysis.models.loading import ModelInfo
from analysis.data.samples import tokenize_texts
from analysis.importance.scoring import score_distributions
from analysis.stages import StageStore

from reference import reference_importance
from tiny import CONFIGS, byte_tokenizer, tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2",
    "Ein kurzer Satz.",
    "x",
    "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants in mathematics.",
]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scores_match_independent_reconstruction(family):
    model, tokenizer = tiny_model(family), byte_tokenizer()
    adapter = adapter_for(model)
    got = score_texts(model, tokenizer, TEXTS, batch_size=2, max_length=64, progress=False)
    sequences = tokenize_texts(tokenizer, TEXTS, 64)
    want = reference_importance(model, sequences, adapter.attn, adapter.mlp, adapter.is_parallel(model.config))
    merged = got.merge(want, on=["layer", "module"], suffixes=("", "_ref"))
    assert len(merged) == 3 * model.config.num_hidden_layers
    np.testing.assert_allclose(merged["importance"], merged["importance_ref"], atol=1e-5)
    assert (got["n_tokens"] == sum(len(s) for s in sequences)).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_text_alone_equals_text_padded_in_a_batch(family, side):
    model, tokenizer = tiny_model(family), byte_tokenizer(padding_side=side)
    alone = score_texts(model, tokenizer, ["x"], progress=False)
    batch = score_texts(model, tokenizer, TEXTS, batch_size=len(TEXTS), per_sample=True, progress=False)
    padded = batch[batch["sample"] == TEXTS.index("x")].reset_index(drop=True)
    np.testing.assert_allclose(padded["importance"], alone["importance"], atol=1e-6)


def test_batch_size_does_not_change_scores():
    model, tokenizer = tiny_model("qwen3"), byte_tokenizer()
    results = [score_texts(model, tokenizer, TEXTS, batch_size=b, progress=False) for b in (1, 2, 5)]
    for other in results[1:]:
        np.testing.assert_allclose(other["importance"], results[0]["importance"], atol=1e-6)


def test_per_sample_rows_reaggregate_exactly():
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    rows = score_texts(model, tokenizer, TEXTS, per_sample=True, progress=False)
    assert set(rows["sample"]) == set(range(len(TEXTS)))
    assert {"metric", "sample", "layer", "module", "stat_sum", "n_tokens", "importance"} <= set(rows.columns)
    direct = score_texts(model, tokenizer, TEXTS, progress=False)
    pd.testing.assert_frame_equal(aggregate_importance(rows), direct)
    one = rows[rows["sample"] == 0]
    np.testing.assert_allclose(one["importance"], 1 - one["stat_sum"] / one["n_tokens"])


class Reverse(torch.nn.Module):
    """An MLP returning ``-scale`` times its (normalised) input: with the norm's weight 1 it sends the stream to ``-c X``."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, hidden):
        return -self.scale * hidden


def test_known_answers_for_a_zeroed_and_a_reversing_branch():
    """Layer 0's attention and layer 1's MLP add zero (``o_proj``/``down_proj`` weights 0): their cosine, angular,
    relative-update and ablation importances are 0, and the block equals its other branch.  Layer 2's MLP adds
    ``-1e4 X / rms(X)``, which reverses the stream: ``cos = -1``, so cosine importance 2 and angular 1 (dropping it changes
    little: the final norm undoes the scale, so this is no claim about its ablation)."""
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.o_proj.weight.zero_()
        layers[1].mlp.down_proj.weight.zero_()
        layers[2].post_attention_layernorm.weight.fill_(1.0)
    layers[2].mlp = Reverse(1e4)
    scores = score_texts(model, tokenizer, TEXTS, metrics=("cosine", "angular", "relative_update", "ablation"), progress=False)
    value = scores.set_index(["metric", "layer", "module"])["importance"]
    for metric in ("cosine", "angular", "relative_update", "ablation"):
        assert value[metric, 0, "attn"] == pytest.approx(0, abs=2e-4 if metric == "angular" else 1e-6), metric
        assert value[metric, 1, "mlp"] == pytest.approx(0, abs=2e-4 if metric == "angular" else 1e-6), metric
        assert value[metric, 0, "block"] == pytest.approx(value[metric, 0, "mlp"], rel=1e-6, abs=1e-9), metric
        assert value[metric, 1, "block"] == pytest.approx(value[metric, 1, "attn"], rel=1e-6, abs=1e-9), metric
    assert value["cosine", 2, "mlp"] == pytest.approx(2, abs=1e-5)
    assert value["angular", 2, "mlp"] == pytest.approx(1, abs=1e-3)
    assert value["cosine", 1, "attn"] > 1e-3 and value["relative_update", 0, "mlp"] > 1e-3  # the other branches do add something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_are_finite_and_close_to_float32(dtype):
    tokenizer = byte_tokenizer()
    full = score_texts(tiny_model("llama"), tokenizer, TEXTS, progress=False)
    half = score_texts(tiny_model("llama", dtype=dtype), tokenizer, TEXTS, progress=False)
    assert np.isfinite(half["importance"]).all()
    np.testing.assert_allclose(half["importance"], full["importance"], atol=0.02)


def test_token_batch_entry_point_matches_texts():
    model, tokenizer = tiny_model("mistral"), byte_tokenizer()
    sequences = tokenize_texts(tokenizer, TEXTS[:2], 64)
    width = max(map(len, sequences))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    rows = score_token_batches(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    np.testing.assert_allclose(
        aggregate_importance(rows)["importance"],
        score_texts(model, tokenizer, TEXTS[:2], progress=False)["importance"],
        atol=1e-6,
    )


def test_non_finite_activation_names_the_layer():
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteActivationError, match="layer 1 \\(resid_post\\)"):
        score_texts(model, tokenizer, TEXTS, progress=False)


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ([], {}, "empty"),
        (["fine", ""], {}, "text #1 .* zero tokens"),
        (["fine"], {"max_length": 1}, "max_length must be an integer of at least 2"),
        ("a string", {}, "not one string"),
        (["fine"], {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_is_a_clear_error(texts, kwargs, message):
    with pytest.raises(InputError, match=message):
        score_texts(tiny_model("llama"), byte_tokenizer(), texts, progress=False, **kwargs)


def test_unsupported_family_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama.*qwen3"):
        score_texts(model, byte_tokenizer(), ["hello"], progress=False)


def test_scores_per_distribution_are_cached_and_reused(tmp_path, monkeypatch):
    if not all(is_fetched(load_manifest(name)) for name in ("general", "math")):
        pytest.skip("distributions general and math are not fetched; run `calibdrop data fetch general math`")
    model = tiny_model("llama")
    model.calibdrop_info = ModelInfo("tiny", "test", "llama", "llama", 3, "f" * 64, "float32", "-")
    kwargs = dict(n_samples=4, seq_len=32, batch_size=2, store=StageStore(tmp_path), progress=False)
    first = score_distributions(model, byte_tokenizer(), ["general", "math"], **kwargs)
    assert set(first["distribution"]) == {"general", "math"} and len(list(tmp_path.glob("*.parquet"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached distribution")

    monkeypatch.setattr("analysis.importance.scoring.score_token_batches", fail)
    again = score_distributions(model, byte_tokenizer(), ["general", "math"], **kwargs)
    np.testing.assert_array_equal(again["stat_sum"], first["stat_sum"])
