"""`calibdrop export --format gguf`: the file's layout (synthetic GGUF files), and parity in a real llama.cpp.

The layout tests write a small llama GGUF with gguf-py and read the export back: dropped tensors absent, blocks
renumbered, kept tensors byte-identical, per-layer shapes of llama.cpp's ``deci`` architecture.  The parity tests run
smollm2-135m's exports in llama.cpp (the ``xllamacpp`` wheel, through ``tests/llamacpp_runner.py``) and compare per-token
NLL with calibdrop's own pruned model on the same ids; they skip, with the reason, where the model is not fetched or
llama.cpp is not installed (benchmarks/results/gguf-parity-llama-cpp.json records the full parity run).
"""

import json

import gguf
import llamacpp_runner
import numpy as np
import pytest
import torch

from analysis.cli import main
from analysis.errors import InputError
from analysis.export_gguf import export_gguf, rotary_pairs_order

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYERS, VOCAB = 32, 2, 1, 64, 4, 40
HEAD_DIM = N_EMBD // N_HEAD
LAYER_SHAPES = {"attn_norm": (N_EMBD,), "attn_q": (N_EMBD, N_EMBD), "attn_k": (N_HEAD_KV * HEAD_DIM, N_EMBD),
                "attn_v": (N_HEAD_KV * HEAD_DIM, N_EMBD), "attn_output": (N_EMBD, N_EMBD), "ffn_norm": (N_EMBD,),
                "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF)}


def synthetic_gguf(path, arch="llama", q8=True):
    """A small GGUF of ``arch`` with random weights; 2-D tensors Q8_0 when ``q8`` (rows of 32 values)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(N_LAYERS)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_uint32(f"{arch}.vocab_size", VOCAB)

    def add(name, shape):
        values = rng.standard_normal(shape).astype(np.float32)
        if q8 and len(shape) == 2 and shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    add("token_embd.weight", (VOCAB, N_EMBD))
    for i in range(N_LAYERS):
        for base, shape in LAYER_SHAPES.items():
            add(f"blk.{i}.{base}.weight", shape)
    add("output_norm.weight", (N_EMBD,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_joint_set_uses_deci_with_per_layer_shapes_and_drops_the_tensors(tmp_path):
    source = synthetic_gguf(tmp_path / "src.gguf")
    plan = export_gguf(source, {"module": "joint", "indices": ["attn:0", "mlp:2", "attn:3"]}, tmp_path / "out.gguf")
    fields, tensors = read(tmp_path / "out.gguf")
    _, original = read(source)
    assert plan.arch == fields["general.architecture"] == "deci" and fields["deci.block_count"] == N_LAYERS
    assert fields["deci.attention.head_count"] == [0, N_HEAD, N_HEAD, 0]
    assert fields["deci.attention.head_count_kv"] == [0, N_HEAD_KV, N_HEAD_KV, 0]
    assert fields["deci.feed_forward_length"] == [N_FF, N_FF, 1, N_FF]
    assert not any(k.startswith("llama.") for k in fields)
    assert not [n for n in tensors if n.startswith(("blk.0.attn", "blk.3.attn"))]
    for name in ("blk.2.ffn_gate.weight", "blk.2.ffn_up.weight", "blk.2.ffn_down.weight"):  # zero stand-ins
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32 and not tensors[name].data.any()
    assert sorted(tensors["blk.2.ffn_down.weight"].shape.tolist()) == [1, N_EMBD]
    for name in ("blk.1.attn_q.weight", "blk.1.ffn_up.weight", "blk.2.ffn_norm.weight", "token_embd.weight"):
        assert tensors[name].tensor_type == original[name].tensor_type
        assert np.array_equal(tensors[name].data, original[name].data)  # llama rows need no reordering


def test_block_set_renumbers_and_keeps_the_architecture(tmp_path):
    source = synthetic_gguf(tmp_path / "src.gguf")
    export_gguf(source, {"module": "block", "indices": [1, 2]}, tmp_path / "out.gguf")
    fields, tensors = read(tmp_path / "out.gguf")
    _, original = read(source)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert {n.split(".")[1] for n in tensors if n.startswith("blk.")} == {"0", "1"}
    for base in LAYER_SHAPES:
        assert np.array_equal(tensors[f"blk.1.{base}.weight"].data, original[f"blk.3.{base}.weight"].data)


def test_float16_and_float32_exports_dequantise(tmp_path):
    source = synthetic_gguf(tmp_path / "src.gguf")
    _, original = read(source)
    for dtype, kind in (("float16", gguf.GGMLQuantizationType.F16), ("float32", gguf.GGMLQuantizationType.F32)):
        export_gguf(source, {"module": "mlp", "indices": [0]}, tmp_path / f"{dtype}.gguf", dtype=dtype)
        _, tensors = read(tmp_path / f"{dtype}.gguf")
        q = tensors["blk.1.attn_q.weight"]
        assert q.tensor_type == kind and tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        expected = gguf.quants.dequantize(original["blk.1.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_allclose(q.data.astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_qwen2_rows_are_reordered_for_adjacent_rotary_pairs(tmp_path):
    source = synthetic_gguf(tmp_path / "src.gguf", arch="qwen2", q8=False)
    export_gguf(source, {"module": "attn", "indices": [1]}, tmp_path / "out.gguf")
    _, tensors = read(tmp_path / "out.gguf")
    _, original = read(source)
    for base, heads in (("attn_q", N_HEAD), ("attn_k", N_HEAD_KV)):
        order = rotary_pairs_order(heads, HEAD_DIM)
        assert np.array_equal(tensors[f"blk.0.{base}.weight"].data, original[f"blk.0.{base}.weight"].data[order])
    assert np.array_equal(tensors["blk.0.attn_v.weight"].data, original["blk.0.attn_v.weight"].data)


def rope(x, positions, pairs):
    """Rotary embedding of ``x`` [tokens, head_dim] rotating the index pairs ``pairs`` by frequency index."""
    out = x.copy()
    for f, (a, b) in enumerate(pairs):
        angle = positions * 10000.0 ** (-2 * f / x.shape[1])
        out[:, a] = x[:, a] * np.cos(angle) - x[:, b] * np.sin(angle)
        out[:, b] = x[:, a] * np.sin(angle) + x[:, b] * np.cos(angle)
    return out


def test_rotary_pairs_order_turns_rotated_halves_into_adjacent_pairs():
    """Independent check: rotating halves (j, j + d/2) of projected rows equals rotating adjacent pairs (2j, 2j+1)
    of the reordered rows, reordered: attention scores are unchanged."""
    d, heads, rng = 8, 2, np.random.default_rng(1)
    weight, x, positions = rng.standard_normal((heads * d, 5)), rng.standard_normal((3, 5)), np.arange(3.0)
    order = rotary_pairs_order(heads, d)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        halves = rope(x @ weight[rows].T, positions, [(j, j + d // 2) for j in range(d // 2)])
        adjacent = rope(x @ weight[order][rows].T, positions, [(2 * j, 2 * j + 1) for j in range(d // 2)])
        np.testing.assert_allclose(adjacent, halves[:, order[rows] - h * d], atol=1e-12)


@pytest.mark.parametrize("arch,drop_set", [("gemma3", {"module": "attn", "indices": [1]}),
                                           ("gemma3", {"module": "block", "indices": [1]}),
                                           ("qwen3", {"module": "mlp", "indices": [1]})])
def test_unsupported_architecture_is_one_clear_error(tmp_path, arch, drop_set):
    source = synthetic_gguf(tmp_path / "src.gguf", arch=arch)
    with pytest.raises(InputError, match=f"of a '{arch}' GGUF is not supported"):
        export_gguf(source, drop_set, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_sets_and_specs_are_refused(tmp_path, capsys):
    source = synthetic_gguf(tmp_path / "src.gguf")
    for drop_set, message in (({"module": "attn", "indices": [0, 1, 2, 3]}, "attention of every remaining layer"),
                              ({"module": "attn", "indices": [4]}, r"indices \[4\] are out of range"),
                              ({"module": "joint", "indices": ["mlp:1", "mlp:01"]}, "listed twice")):
        with pytest.raises(InputError, match=message):
            export_gguf(source, drop_set, tmp_path / "out.gguf")
    (tmp_path / "set.json").write_text(json.dumps({"module": "attn", "indices": [1]}))
    (tmp_path / "folder").mkdir()
    for extra, message in ((["--model", str(tmp_path / "folder"), "--out", str(tmp_path / "x.gguf")],
                            "--format gguf reads a GGUF file"),
                           (["--model", str(source)], "--format gguf needs --out FILE.gguf"),
                           (["--model", str(source), "--out", str(tmp_path / "x.gguf"), "--dtype", "bfloat16"],
                            "not a GGUF export type")):
        assert main(["export", "--format", "gguf", "--drop-set", str(tmp_path / "set.json"), *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error


SETS = {"attn-8": {"module": "attn", "indices": [5, 7, 9, 14, 22, 25, 26, 29]},
        "mlp-4": {"module": "mlp", "indices": [13, 14, 16, 17]},
        "block-4": {"module": "block", "indices": [12, 13, 14, 17]}}


@pytest.fixture(scope="module")
def smollm2():
    from analysis.models import loading

    if not loading.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched; run `calibdrop models fetch`")
    reason = llamacpp_runner.available()
    if reason:
        pytest.skip(reason)
    model, tokenizer = loading.load_model("smollm2-135m")
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n" \
           "Layer pruning removes whole attention or MLP sublayers from a trained transformer."
    ids = tokenizer(text).input_ids
    return loading, ids, token_nll(model, ids)


def token_nll(model, ids) -> np.ndarray:
    """NLL of ``ids[1:]`` given their prefixes under a transformers model, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return (torch.logsumexp(logits, -1) - logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).numpy()


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(SETS))
def test_llama_cpp_runs_the_export_with_calibdrops_token_nll(smollm2, tmp_path, name, capsys):
    """F32 export through the CLI, run in llama.cpp: per-token NLL within 1e-3 relative of calibdrop's pruned
    model (measured: ~3e-5), the dropped layers absent from the file llama.cpp loaded."""
    loading, ids, unpruned = smollm2
    from analysis.models.pruning import drop_modules

    (tmp_path / "set.json").write_text(json.dumps(SETS[name]))
    out = tmp_path / f"{name}.gguf"
    assert main(["export", "--format", "gguf", "--model", "smollm2-135m", "--drop-set", str(tmp_path / "set.json"),
                 "--dtype", "float32", "--out", str(out)]) == 0
    assert "llama.cpp architecture" in capsys.readouterr().out
    model, _ = loading.load_model("smollm2-135m")
    module, indices = SETS[name]["module"], SETS[name]["indices"]
    reference = token_nll(drop_modules(model, **{"blocks" if module == "block" else module: indices}), ids)
    with llamacpp_runner.LlamaCpp(out, n_ctx=64) as runner:
        assert runner.n_layer == (26 if module == "block" else 30)
        got = runner.token_nll(ids)
    np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-4)
    assert np.abs(unpruned - reference).max() > 1e-2  # the drop set changes the model: the comparison can fail
