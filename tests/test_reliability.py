"""One test per class of failure: bad numbers, bad files and environments, strict drop sets, silent cuts,
caches that prove themselves, artifacts re-checked, model checksums, atomic and readable outputs, escaping."""

import argparse
import json
import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from analysis.cli import commands
from analysis.study import dropsets
from analysis.data import fetching
from analysis.models import loading as models
from analysis.models import pruning
from analysis.data.documents import documents
from analysis.errors import CalibdropWarning, InputError
from analysis.io import atomic_write_bytes, read_cached_table, sha256_file, sidecar_path, write_table
from analysis.data.manifests import load_manifest
from analysis.models.loading import ModelInfo
from analysis.report.sections import markdown_to_html
from analysis.data.samples import tokenize_texts
from analysis.importance.scoring import score_distributions
from analysis.stages import StageStore

from conftest import cli
from fakeapt import PACKAGE, debian_manifest, fake_apt, make_deb, write_manifest
from tiny import byte_tokenizer, tiny_model


def _one_line_exit_2(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def tiny_dir(tmp_path):
    directory = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("args, message", [
    (["score", "--distributions", "general", "--samples", "0"], "argument --samples: must be a positive integer, not 0"),
    (["score", "--distributions", "general", "--seq-len", "0"], "argument --seq-len: must be a positive integer, not 0"),
    (["compare", "nowhere", "--n-boot", "0"], "argument --n-boot: a 95% bootstrap interval needs at least 40 resamples"),
    (["route", "nowhere", "--n-boot", "1"], "needs at least 40 resamples (one in each 2.5% tail), not 1"),
    (["compare", "nowhere", "--k", "0,4"], "expected positive drop-set sizes"),
])
def test_numbers_are_validated_never_replaced_by_defaults(args, message):
    _one_line_exit_2(cli(*args), message)


def test_user_files_and_environment_fail_in_one_line(tmp_path, tiny_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_exit_2(cli("score", "--distributions", "general", "--out", str(blocker / "scores.parquet")),
                     f"cannot write the output {blocker / 'scores.parquet'}")
    latin1 = tmp_path / "texts.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    _one_line_exit_2(cli("score", "--texts", latin1, "--model", tiny_dir, "--out", tmp_path / "s.parquet"),
                     f"{latin1}:2 is not UTF-8 text")
    broken = tmp_path / "set.json"
    broken.write_text('{"module": "attn", "indices": [1, 2')
    _one_line_exit_2(cli("prune", "--model", str(tiny_dir), "--drop-set", str(broken), "--out", str(tmp_path / "p")),
                     f"drop-set file {broken} is not valid JSON")
    _one_line_exit_2(cli("prune", "--model", str(tmp_path), "--drop-set", str(broken), "--out", str(tmp_path / "p")),
                     "is not valid JSON")
    with pytest.raises(InputError, match="is not a model checkpoint: it has no config.json"):
        models.load_model(str(tmp_path))
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InputError, match="is not a complete GGUF file"):
        models.load_model(str(truncated))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="this torch sees no CUDA device"):
            models.load_model(str(tiny_dir), device="cuda")
    corrupt = tmp_path / "results" / "scores.per_sample.parquet"
    write_table(pd.DataFrame({"a": [1]}), corrupt, {"kind": "scores-per-sample"})
    corrupt.write_bytes(corrupt.read_bytes()[:-9] + b"corrupted")
    _one_line_exit_2(cli("compare", str(tmp_path / "results")), "does not have the sha256 its sidecar records")


@pytest.mark.parametrize("indices, message", [
    ("12", "must be a non-empty JSON list"),
    ([6.9, 7], "must be non-negative integers; these are not: [6.9]"),
    ([True], "these are not: [true]"),
    ([1, 1], "lists a module twice"),
])
def test_drop_set_files_are_checked_strictly(tmp_path, indices, message):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"module": "attn", "indices": indices}))
    with pytest.raises(InputError, match=re.escape(message)):
        dropsets.read_drop_set(path)


def test_drop_set_must_fit_the_loaded_model_unless_forced(tmp_path, tiny_dir):
    model, _ = models.load_model(str(tiny_dir))
    with pytest.raises(InputError, match=r"indices \[3\] are out of range"):
        pruning.check_drop_set({"module": "attn", "indices": [3]}, model)
    other = {"module": "joint", "indices": ["attn:1"], "model": "someone-else", "model_sha256": "0" * 64, "file": "x.json"}
    with pytest.raises(InputError, match="x.json was made for model 'someone-else'.*--force"):
        pruning.check_drop_set(other, model)
    pruning.check_drop_set(other, model, force=True)
    pruning.check_drop_set({**other, "model_sha256": model.calibdrop_info.weights_sha256}, model)


def test_cut_texts_and_positions_beyond_the_model_warn():
    with pytest.warns(CalibdropWarning, match=r"1 of 2 texts are longer than max_length=8 tokens and were cut to it \(#1"):
        sequences = tokenize_texts(byte_tokenizer(), ["short", "a much longer text than eight"], max_length=8)
    assert [len(s) for s in sequences] == [5, 8]
    with pytest.warns(CalibdropWarning, match="--seq-len 512 exceeds the 256 positions"):
        commands.warn_beyond_positions(tiny_model("llama"), 512)


def _local_distribution(folder: Path, name: str, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_manifest(folder, {
        "name": name, "description": "test", "document": "one line", "rendering": "plain",
        "sources": [{"id": "local", "registry": "local", "license": "test", "recipe": "local_files", "options": {"data_files": str(jsonl)}}],
        "split": {"rule": "document sha256 order", "heldout_fraction": 0.25},
    })
    return jsonl


def test_caches_prove_themselves_and_are_keyed_by_everything_that_changes_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(tmp_path / "manifests"))
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "cache"))
    alpha = _local_distribution(tmp_path / "manifests", "alpha", [f"alpha document {i} " * 20 for i in range(12)])
    _local_distribution(tmp_path / "manifests", "beta", [f"beta text {i} " * 20 for i in range(12)])
    model = tiny_model("llama")
    model.calibdrop_info = ModelInfo("tiny", "test", "llama", "llama", 3, "f" * 64, "float32", "-")
    cache = tmp_path / "scores"
    kwargs = dict(n_samples=4, seq_len=32, store=StageStore(cache), progress=False)
    first = score_distributions(model, byte_tokenizer(), ["alpha", "beta"], batch_size=2, **kwargs)
    score_distributions(model, byte_tokenizer(), ["alpha"], batch_size=4, **kwargs)
    assert len(list(cache.glob("alpha-*.parquet"))) == 2

    [alpha_path] = [p for p in cache.glob("alpha-*.parquet") if json.loads(sidecar_path(p).read_text())["settings"]["batch_size"] == 2]
    [beta_path] = cache.glob("beta-*.parquet")
    for suffix in (".parquet", ".json"):
        alpha_path.with_suffix(suffix).write_bytes(beta_path.with_suffix(suffix).read_bytes())
    with pytest.warns(CalibdropWarning, match=f"discarding cache entry {alpha_path.name}.*stage_key differ"):
        again = score_distributions(model, byte_tokenizer(), ["alpha"], batch_size=2, **kwargs)
    assert set(again["distribution"]) == {"alpha"}
    assert again["stat_sum"].tolist() == first[first.distribution == "alpha"]["stat_sum"].tolist()

    flipped = bytearray(alpha_path.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    alpha_path.write_bytes(bytes(flipped))
    with pytest.warns(CalibdropWarning, match="does not have the sha256 its sidecar records"):
        assert read_cached_table(alpha_path, {}) is None
    assert not alpha_path.exists()

    before = documents("alpha")
    alpha.write_text("".join(json.dumps({"text": f"edited {i} " * 20}) + "\n" for i in range(8)))
    assert len(documents("alpha")) == 8 != len(before)


def test_tampered_artifacts_and_extracted_files_are_redone(tmp_path, monkeypatch):
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = make_deb(debs, "1.0-1")
    apt = fake_apt(tmp_path, before=[deb], after=[deb])
    monkeypatch.setenv("FAKE_APT", apt["FAKE_APT"])
    monkeypatch.setenv("PATH", apt["PATH_PREFIX"] + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "cache"))
    write_manifest(tmp_path / "manifests", debian_manifest("fakedocs", deb, "1.0-1"))
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(tmp_path / "manifests"))
    source = load_manifest("fakedocs")["sources"][0]
    target = fetching.fetch_source(source)
    document = target / "usr" / "share" / "doc" / PACKAGE / "doc03.txt"
    original = document.read_text()
    document.write_text("tampered")
    monkeypatch.setattr(fetching, "_VERIFIED", set())
    with pytest.warns(CalibdropWarning, match=r"differs from its verified archive .*1 files, e.g. usr/share/doc/.*/doc03.txt"):
        fetching.fetch_source(source)
    assert document.read_text() == original
    fetching.artifact_path(source).write_bytes(b"damaged")
    monkeypatch.setattr(fetching, "_VERIFIED", set())
    with pytest.warns(CalibdropWarning, match="does not have its pinned sha256.*downloading it again"):
        fetching.fetch_source(source)
    assert sha256_file(fetching.artifact_path(source)) == source["sha256"]


def test_model_checksum_covers_config_and_tokenizer_and_a_mismatched_cache_is_rebuilt(tiny_dir, tmp_path, monkeypatch):
    before = models.checkpoint_sha256(tiny_dir)
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    assert models.checkpoint_sha256(tiny_dir) != before
    tokenizer_file = tiny_dir / "tokenizer.json"
    edited = models.checkpoint_sha256(tiny_dir)
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"unk_token"', '"unk_token" ', 1))
    assert models.checkpoint_sha256(tiny_dir) != edited

    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "cache"))
    directory = models.dequantised_dir("smollm2-135m")
    directory.parent.mkdir(parents=True)
    built = []

    def build(name):
        tiny_model("llama").save_pretrained(directory)
        byte_tokenizer().save_pretrained(directory)
        (directory / models.RECORD).write_text(json.dumps({"checkpoint_sha256": models.checkpoint_sha256(directory)}))
        built.append(name)

    monkeypatch.setattr(models, "_build_dequantised_cache", build)
    models.load_model("smollm2-135m")
    (directory / "config.json").write_text((directory / "config.json").read_text().replace("1e-06", "0.5"))
    with pytest.warns(CalibdropWarning, match="does not match the checksum recorded.*rebuilding it"):
        models.load_model("smollm2-135m")
    assert built == ["smollm2-135m", "smollm2-135m"]


def test_outputs_are_atomic_readable_and_escaped(tmp_path, tiny_dir):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "table.bin", b"x")
        assert stat.S_IMODE((tmp_path / "table.bin").stat().st_mode) == 0o644
        model, tokenizer = models.load_model(str(tiny_dir))
        pruning.drop_modules(model, attn=[1])
        out = pruning.save_pruned(model, tmp_path / "pruned", tokenizer)
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
    finally:
        os.umask(old)

    class Failing:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        pruning.save_pruned(model, tmp_path / "killed", Failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "table.bin", "tiny"]
    with pytest.raises(InputError, match="exists and is not a pruned checkpoint"):
        pruning.save_pruned(model, tiny_dir)

    args = argparse.Namespace(drop_sets=None, from_scores=None, model=str(out))
    assert commands.evaluation_drop_sets(args) == {"none": None}
    with pytest.raises(InputError, match="nothing to evaluate"):
        commands.evaluation_drop_sets(argparse.Namespace(drop_sets=None, from_scores=None, model=str(tiny_dir)))

    html = markdown_to_html("Model `<b>spec</b>` and <script>alert(1)</script>\n\n| a |\n|---|\n| <img src=x onerror=y> |")
    assert "<script>" not in html and "<img src=x" not in html and "&lt;script&gt;" in html and "<table>" in html


def test_manifest_fields_that_reach_a_command_line_cannot_be_options(tmp_path):
    deb = make_deb(tmp_path, "1.0-1")
    manifest = debian_manifest("dashed", deb, "1.0-1")
    manifest["sources"][0]["package"] = "--allow-unauthenticated"
    (tmp_path / "dashed.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(InputError, match="invalid at sources/0/package: '--allow-unauthenticated' does not match"):
        load_manifest(tmp_path / "dashed.yaml")
