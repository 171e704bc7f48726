"""The built-in GGUF models, scored against the hook-free reference.

CI fetches the default model; the others run where `calibdrop models fetch NAME` was run.
"""

import numpy as np
import pytest

from analysis import adapter_for, load_model, score_texts
from analysis.models import loading as models
from analysis.models.loading import BUILTINS, is_fetched
from analysis.data.samples import tokenize_texts

from reference import reference_importance

TEXTS = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "for (int i = 0; i < n; ++i) { total += values[i]; }",
    "Die Katze schläft auf dem Sofa.",
    "2 + 2 = 4",
]


def _loaded(name, request):
    """The built-in ``name``, the default model from the session's one load (tests/conftest.py ``smollm2``)."""
    if not is_fetched(name):
        pytest.skip(f"built-in {name} is not fetched; run `calibdrop models fetch {name}` to include this test")
    return request.getfixturevalue("smollm2") if name == models.DEFAULT_MODEL else load_model(name)


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(BUILTINS))
def test_real_model_scores_match_reference(name, request):
    model, tokenizer = _loaded(name, request)
    adapter = adapter_for(model)
    assert adapter.family == BUILTINS[name].family
    assert model.config.num_hidden_layers == BUILTINS[name].n_layers
    got = score_texts(model, tokenizer, TEXTS, batch_size=3, max_length=64, progress=False)
    want = reference_importance(
        model, tokenize_texts(tokenizer, TEXTS, 64), adapter.attn, adapter.mlp, adapter.is_parallel(model.config)
    )
    merged = got.merge(want, on=["layer", "module"], suffixes=("", "_ref"))
    assert len(merged) == 3 * BUILTINS[name].n_layers
    np.testing.assert_allclose(merged["importance"], merged["importance_ref"], atol=1e-5)


@pytest.mark.real_model
@pytest.mark.parametrize("side", ["left", "right"])
def test_default_model_padding_invariance(side, request):
    model, tokenizer = _loaded("smollm2-135m", request)
    before, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        alone = score_texts(model, tokenizer, [TEXTS[3]], progress=False)
        batch = score_texts(model, tokenizer, TEXTS, per_sample=True, progress=False)
    finally:
        tokenizer.padding_side = before
    padded = batch[batch["sample"] == 3].reset_index(drop=True)
    np.testing.assert_allclose(padded["importance"], alone["importance"], atol=1e-5)


@pytest.mark.real_model
def test_qwen_coder_1_5b_loads_offline_with_checksums(monkeypatch):
    """The fourth built-in: its joined GGUF has the pinned sha256, and it loads with no download and no Hub."""
    name = "qwen2.5-coder-1.5b"
    if not is_fetched(name):
        pytest.skip(f"built-in {name} is not fetched; run `calibdrop models fetch {name}` to include this test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError(f"{name} tried to run {args[0]!r} after it was fetched")

    monkeypatch.setattr(models.subprocess, "run", no_download)
    if models.gguf_path(name).exists():
        assert models.fetch_builtin(name) == models.gguf_path(name)
        assert models.sha256_file(models.gguf_path(name)) == BUILTINS[name].sha256
    model, _ = load_model(name)
    info = model.calibdrop_info
    assert (info.source, info.family, info.n_layers, model.config.hidden_size) == ("builtin", "qwen2", 28, 1536)
    assert info.weights_sha256 == models.checkpoint_sha256(models.dequantised_dir(name))
