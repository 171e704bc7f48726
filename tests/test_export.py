"""`calibdrop export`: checkpoints that stock transformers loads without calibdrop, and the paper code's drop lists.

Every supported family's tiny model is exported with an attention, an MLP, a block and a joint drop
set; one Python whose ``sys.path`` holds the project venv's packages but not calibdrop (a fresh venv
whose .pth file points at a copy of site-packages without calibdrop's entries) loads each checkpoint
with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``, runs a forward pass and
a greedy generation, and reports its logits, tokens, KV cache and load report; it also loads each one
without the flag, which must fail with transformers' error naming ``trust_remote_code`` where sublayers
are dropped and give the same logits where only blocks are.  They must equal
calibdrop's own pruned model (``drop_modules``) in this process.
"""

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from analysis import ADAPTERS, export_checkpoint
from analysis.cli import main
from analysis.errors import InputError
from analysis.models import modeling_calibdrop
from analysis.export import MODELING_FILE, model_layer_count, paper_drop_lists
from analysis.models.pruning import drop_modules

from tiny import CONFIGS, byte_tokenizer, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12]])
NEW_TOKENS = 8
SETS = {
    "attn": {"module": "attn", "indices": [2, 0]},
    "mlp": {"module": "mlp", "indices": [1]},
    "block": {"module": "block", "indices": [1]},
    "joint": {"module": "joint", "indices": ["attn:1", "mlp:0", "mlp:2"]},
}
CALIBDROP_ENTRIES = ("analysis", "calibdrop", "__editable__", "__editable___calibdrop")

LOADER = r'''
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM

try:
    import analysis
    sys.exit(f"calibdrop is importable from {analysis.__file__}")
except ImportError:
    pass
cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
ids = torch.tensor(cases.pop("ids"))
for name, folder in cases.items():
    try:  # the ordinary way, without trust_remote_code
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            plain_result = plain(ids).logits
    except ValueError as error:
        plain_result = str(error)
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=%d, do_sample=False, pad_token_id=0,
                                   return_dict_in_generate=True)
    cache = generated.past_key_values
    cache = cache if cache is not None else type("NoCache", (), {"layers": []})
    torch.save({
        "logits": logits,
        "tokens": generated.sequences,
        "cache_types": [type(layer).__name__ for layer in cache.layers],
        "cached": [isinstance(layer.keys, torch.Tensor) and layer.keys.numel() > 0 for layer in cache.layers],
        "class": type(model).__name__,
        "module": type(model).__module__,
        "n_layers": len(model.base_model.layers),
        "load_report": {key: sorted(map(str, value)) for key, value in info.items()},
        "without_flag": plain_result,
    }, out / f"{name}.pt")
''' % NEW_TOKENS


def calibdrop_free_site_packages(target: Path) -> Path:
    """A folder of links to every entry of this interpreter's site-packages folders (venv, system, user) but
    calibdrop's."""
    target.mkdir()
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    folders = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(), *user]
    for folder in dict.fromkeys(f for f in folders if Path(f).is_dir()):
        for entry in Path(folder).iterdir():
            if entry.name.startswith(CALIBDROP_ENTRIES) or entry.suffix == ".pth" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """A venv's python that sees this venv's packages (torch, transformers ...) but cannot import calibdrop."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "project_packages.pth").write_text(f"{calibdrop_free_site_packages(root / 'packages')}\n")
    return python


def run_bare(python: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run the bare python isolated (-I: no PYTHONPATH, no script folder, no user site) with a private HF home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([python, "-I", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def test_bare_python_cannot_import_calibdrop_but_has_transformers(bare_python, tmp_path):
    result = run_bare(bare_python, "-c", "import transformers, torch; import analysis", cwd=tmp_path)
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'analysis'" in result.stderr


@pytest.fixture(scope="module")
def exported(bare_python, tmp_path_factory):
    """name -> (calibdrop's pruned model, its checkpoint, what the bare python computed from the checkpoint)."""
    root = tmp_path_factory.mktemp("exported")
    models, folders = {}, {}
    for family in CONFIGS:
        for case, drop_set in SETS.items():
            name = f"{family}-{case}"
            models[name] = tiny_model(family)
            folders[name] = export_checkpoint(models[name], byte_tokenizer(), drop_set, root / name)
    models["no-attention"] = tiny_model("llama")
    folders["no-attention"] = export_checkpoint(models["no-attention"], byte_tokenizer(),
                                                {"module": "attn", "indices": [0, 1, 2]}, root / "no-attention")
    drop_set_file = root / "joint.json"
    drop_set_file.write_text(json.dumps(SETS["joint"]))
    tiny_model("qwen3").save_pretrained(root / "qwen3-full")
    byte_tokenizer().save_pretrained(root / "qwen3-full")
    cli = ["export", "--model", str(root / "qwen3-full"), "--drop-set", str(drop_set_file), "--out", str(root / "cli")]
    assert main(cli) == 0
    models["cli"], folders["cli"] = drop_modules(tiny_model("qwen3"), joint=SETS["joint"]["indices"]), root / "cli"
    (root / "cases.json").write_text(json.dumps({"ids": IDS.tolist(), **{k: str(v) for k, v in folders.items()}}))
    (root / "loader.py").write_text(LOADER)
    (root / "out").mkdir()
    result = run_bare(bare_python, root / "loader.py", root / "cases.json", root / "out", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: (models[name], folders[name], torch.load(root / "out" / f"{name}.pt")) for name in folders}


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


@pytest.mark.parametrize("case", sorted(SETS))
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_checkpoint_loads_without_calibdrop_and_equals_pruned_model(exported, family, case):
    pruned, folder, loaded = exported[f"{family}-{case}"]
    with torch.no_grad():
        logits, out = pruned(IDS).logits, greedy(pruned, IDS)
    assert loaded["load_report"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    torch.testing.assert_close(loaded["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded["tokens"], out.sequences)
    record = pruned.config.calibdrop_pruning
    kept = len(pruned.base_model.layers)
    assert loaded["n_layers"] == kept == 3 - (case == "block")
    assert loaded["cached"] == [i not in record["attn"] for i in range(kept)]
    own_cache = [type(layer).__name__ for layer in out.past_key_values.layers]
    assert loaded["cache_types"] == ["DummyLayer" if i in record["attn"] else own_cache[i] for i in range(kept)]
    with_code = case != "block"
    if with_code:  # the plain family model would load with the dropped weights freshly initialised: refused
        assert isinstance(loaded["without_flag"], str) and "trust_remote_code=True" in loaded["without_flag"]
    else:
        torch.testing.assert_close(loaded["without_flag"], logits, atol=1e-5, rtol=1e-5)
    assert (folder / MODELING_FILE).is_file() == with_code
    assert loaded["module"].startswith("transformers_modules.") == with_code
    assert loaded["class"] == ("Calibdrop" if with_code else "") + type(pruned).__name__


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_dropped_weights_are_not_saved(exported, family):
    pruned, folder, _ = exported[f"{family}-joint"]
    attn, mlp = (ADAPTERS[pruned.config.model_type].attn_branch, ADAPTERS[pruned.config.model_type].mlp_branch_modules)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    layer = [k for k in keys if ".layers.1." in k]
    assert layer and not [k for k in layer if k.split(".layers.1.")[1].split(".")[0] in attn]
    assert not [k for k in keys if ".layers.0." in k and k.split(".layers.0.")[1].split(".")[0] in mlp]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": f"modeling_calibdrop.Calibdrop{type(pruned.config).__name__}",
                                  "AutoModelForCausalLM": f"modeling_calibdrop.Calibdrop{type(pruned).__name__}"}
    assert config["model_type"] == "calibdrop_" + pruned.config.model_type


def test_checkpoint_without_any_attention_generates_without_calibdrop(exported):
    """Every attention dropped: no layer has keys to cache, so the checkpoint says use_cache false and transformers'
    generate runs (it failed with "get_seq_length can only be called on Attention layers" before)."""
    pruned, folder, loaded = exported["no-attention"]
    with torch.no_grad():
        logits, out = pruned(IDS).logits, greedy(pruned, IDS)
    torch.testing.assert_close(loaded["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded["tokens"], out.sequences) and loaded["tokens"].shape[1] == IDS.shape[1] + NEW_TOKENS
    assert json.loads((folder / "config.json").read_text())["use_cache"] is False
    assert json.loads((folder / "generation_config.json").read_text())["use_cache"] is False


def test_cli_export_equals_api_export(exported):
    pruned, folder, loaded = exported["cli"]
    torch.testing.assert_close(loaded["logits"], pruned(IDS).logits.detach(), atol=1e-5, rtol=1e-5)
    assert (folder / "tokenizer.json").is_file() and loaded["cached"] == [True, False, True]


def test_modeling_file_branch_table_is_the_adapters():
    assert set(modeling_calibdrop.BRANCHES) == set(ADAPTERS) == set(modeling_calibdrop.CAUSAL_LM_CLASSES)
    for model_type, adapter in ADAPTERS.items():
        want = ((adapter.attn_branch, adapter.attn), (adapter.mlp_branch_modules, adapter.mlp))
        assert modeling_calibdrop.BRANCHES[model_type] == want


def test_paper_lists_of_a_joint_and_a_block_set():
    joint = {"module": "joint", "indices": ["mlp:5", "attn:3", "attn:0", "mlp:3"]}
    assert paper_drop_lists(joint, 6) == {"drop_attn_list": [0, 3], "drop_mlp_list": [3, 5]}
    block = {"module": "block", "indices": [4, 1]}
    assert paper_drop_lists(block, 6) == {"drop_attn_list": [1, 4], "drop_mlp_list": [1, 4]}
    assert paper_drop_lists({"module": "mlp", "indices": [2]}, 3) == {"drop_attn_list": [], "drop_mlp_list": [2]}


def test_paper_lists_refuse_an_index_listed_twice(tmp_path, capsys):
    """``attn:05`` is layer 5: the joint set ["attn:5", "attn:05"] lists it twice, as the checkpoint export says."""
    with pytest.raises(InputError, match=r"attn index \[5\] is listed twice"):
        paper_drop_lists({"module": "joint", "indices": ["attn:5", "attn:05"]}, 30)
    drop_set = tmp_path / "set.json"
    drop_set.write_text(json.dumps({"module": "joint", "indices": ["attn:5", "attn:05"]}))
    assert main(["export", "--format", "paper", "--model", "smollm2-135m", "--drop-set", str(drop_set)]) == 2
    error = capsys.readouterr()
    assert error.err.count("\n") == 1 and "listed twice" in error.err and "drop_attn_list" not in error.out
    assert paper_drop_lists({"module": "joint", "indices": ["attn:05", "mlp:5"]}, 30) == {
        "drop_attn_list": [5], "drop_mlp_list": [5]}


def test_prune_of_an_exported_checkpoint_copies_its_modeling_file(exported, tmp_path, capsys):
    """`calibdrop prune --model <exported checkpoint>` saves what its config's auto_map names, and the result is the
    exported model with the new set dropped too."""
    from analysis import load_model

    _, folder, _ = exported["llama-attn"]  # attention of layers 0 and 2 dropped
    drop_set = tmp_path / "mlp.json"
    drop_set.write_text(json.dumps({"module": "mlp", "indices": [1]}))
    assert main(["prune", "--model", str(folder), "--drop-set", str(drop_set), "--out", str(tmp_path / "again")]) == 0
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (tmp_path / "again" / MODELING_FILE).is_file()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_calibdrop.CalibdropLlamaForCausalLM"
    assert config["model_type"] == "calibdrop_llama" and config["calibdrop_pruning"]["mlp"] == [1]
    reloaded, _ = load_model(str(tmp_path / "again"))
    expected = drop_modules(tiny_model("llama"), attn=[0, 2], mlp=[1])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected(IDS).logits, atol=1e-6, rtol=1e-6)


def test_paper_list_index_out_of_range_is_refused():
    with pytest.raises(InputError, match=r"indices \[30\] are out of range: the model has 30 layers \(0..29\)"):
        paper_drop_lists({"module": "attn", "indices": [3, 30]}, 30)


def test_paper_format_from_a_config_and_a_builtin(tmp_path, capsys):
    tiny_model("llama").config.save_pretrained(tmp_path / "model")
    drop_set = tmp_path / "set.json"
    drop_set.write_text(json.dumps({"module": "joint", "indices": ["attn:2", "mlp:0"]}))
    code = main(["export", "--format", "paper", "--model", str(tmp_path / "model" / "config.json"),
                 "--drop-set", str(drop_set), "--out", str(tmp_path / "lists.json")])
    assert code == 0
    assert json.loads((tmp_path / "lists.json").read_text()) == {"drop_attn_list": [2], "drop_mlp_list": [0]}
    assert model_layer_count(str(tmp_path / "model")) == 3 and model_layer_count("smollm2-135m") == 30
    capsys.readouterr()
    drop_set.write_text(json.dumps({"module": "block", "indices": [1, 3], "model": str(tmp_path / "model")}))
    assert main(["export", "--format", "paper", "--drop-set", str(drop_set)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "indices [3] are out of range: the model has 3 layers (0..2)" in error


def test_export_of_a_pruned_checkpoint_or_without_out_is_refused(exported, tmp_path, capsys):
    drop_set = tmp_path / "set.json"
    drop_set.write_text(json.dumps(SETS["mlp"]))
    _, folder, _ = exported["llama-attn"]
    assert main(["export", "--format", "paper", "--model", str(folder), "--drop-set", str(drop_set)]) == 2
    assert "pruned checkpoint's config" in capsys.readouterr().err
    assert main(["export", "--model", str(folder), "--drop-set", str(drop_set)]) == 2
    assert "needs --out FOLDER" in capsys.readouterr().err


def test_export_help_answers(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    assert stop.value.code == 0 and "trust_remote_code=True" in capsys.readouterr().out


@pytest.mark.real_model
def test_real_model_checkpoint_loads_without_calibdrop_and_equals_pruned_model(bare_python, tmp_path):
    """smollm2-135m (real weights) with the README's borda attention-8 set plus two MLPs, through the bare python."""
    from analysis.models import loading

    if not loading.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched; run `calibdrop models fetch`")
    model, tokenizer = loading.load_model("smollm2-135m")
    drop_set = {"module": "joint", "indices": [f"attn:{i}" for i in (25, 26, 28, 29, 5, 6, 7, 9)] + ["mlp:27", "mlp:3"]}
    folder = export_checkpoint(model, tokenizer, drop_set, tmp_path / "smollm2")
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    (tmp_path / "cases.json").write_text(json.dumps({"ids": ids.tolist(), "smollm2": str(folder)}))
    (tmp_path / "loader.py").write_text(LOADER)
    result = run_bare(bare_python, tmp_path / "loader.py", tmp_path / "cases.json", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "smollm2.pt")
    with torch.no_grad():
        logits, out = model(ids).logits, greedy(model, ids)
    assert loaded["load_report"]["missing_keys"] == loaded["load_report"]["unexpected_keys"] == []
    torch.testing.assert_close(loaded["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded["tokens"], out.sequences)
    assert sum(loaded["cached"]) == 30 - 8 and loaded["class"] == "CalibdropLlamaForCausalLM"


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
def test_calibdrop_loads_an_exported_checkpoint(exported, family):
    from analysis import load_model

    pruned, folder, _ = exported[f"{family}-joint"]
    reloaded, _ = load_model(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, pruned(IDS).logits, atol=0, rtol=0)
    assert type(reloaded) is type(pruned)
