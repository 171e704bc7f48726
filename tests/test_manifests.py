"""analysis.data.manifests: the schema, discovery in data_manifests/ and $CALIBDROP_MANIFESTS, and the top-level set."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from analysis.data import manifests
from analysis.errors import InputError
from analysis.data.fetching import is_fetched
from analysis.io import read_table
from analysis.data.recipes import RECIPES
from analysis.presets import PRESETS

from conftest import cli
from tiny import byte_tokenizer, tiny_model

MANIFESTS = sorted(manifests.manifest_paths().values())
LICENSES = Path("/usr/share/common-licenses")


def local_manifest(name: str, data_files: str, **extra) -> dict:
    """A manifest with one ``local_files`` source."""
    return {
        "name": name,
        "description": f"{name}: local text files",
        "sources": [{"id": "local", "registry": "local", "license": "as the files say", "recipe": "local_files",
                     "options": {"data_files": data_files}}],
        "document": "one line",
        "split": {"rule": "document sha256 order", "heldout_fraction": 0.25},
        "rendering": "plain",
        **extra,
    }


def write_manifests(folder: Path, *records: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['name']}.yaml").write_text(yaml.safe_dump(record))
    return folder


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifests_validate_against_the_schema(path):
    manifest = manifests.load_manifest(path.stem)
    assert manifest["name"] == path.stem
    for source in manifest["sources"]:
        assert source["recipe"] in RECIPES
        assert source["license"]


def test_invalid_manifest_says_where(tmp_path):
    broken = yaml.safe_load(MANIFESTS[0].read_text())
    del broken["sources"][0]["license"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(InputError, match="invalid at sources/0: 'license' is a required property"):
        manifests.load_manifest(path)


def test_unknown_distribution_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown distribution 'poetry'.*code.*general"):
        manifests.load_manifest("poetry")


def test_split_name():
    assert manifests.split_name("code/go") == ("code", "go")
    assert manifests.split_name("code") == ("code", None)


def test_top_level_is_every_manifest_by_order_then_name(tmp_path, monkeypatch):
    loaded = {path.stem: yaml.safe_load(path.read_text()) for path in MANIFESTS}
    shipped = {name: m.get("order") for name, m in loaded.items() if m.get("role", "calibration") == "calibration"}
    test_only = {name: m.get("order") for name, m in loaded.items() if m.get("role") == "test"}
    assert test_only, "the shipped manifests hold test-only distributions"
    assert manifests.top_level() == tuple(sorted(shipped, key=lambda n: (shipped[n] is None, shipped[n] or 0, n)))
    assert manifests.unseen_distributions() == tuple(sorted(test_only, key=lambda n: (test_only[n] is None, test_only[n] or 0, n)))
    extra = write_manifests(tmp_path, local_manifest("zeta", "z.txt"), local_manifest("alpha", "a.txt"),
                            local_manifest("first", "f.txt", order=0))
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(extra))
    assert manifests.top_level() == ("first", *manifests.top_level()[1:-2], "alpha", "zeta")
    assert set(manifests.top_level()) == set(shipped) | {"first", "alpha", "zeta"}


def test_a_broken_manifest_stops_the_top_level_set_in_one_line(tmp_path, monkeypatch):
    record = local_manifest("broken", "b.txt")
    del record["split"]
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(write_manifests(tmp_path, record)))
    with pytest.raises(InputError, match=r"broken.yaml is invalid at top level: 'split' is a required property"):
        manifests.top_level()


SHRUNK_QUICK = dict(  # the quick preset shrunk to what a distribution flows through
    subsets=False, metrics=("cosine",), samples=8, seq_len=64, greedy_module=None, n_boot=20, n_perm=20,
    budgets={"attn": (2,)}, transfer_modules=("attn",), transfer_k=(2,), transfer_samples=2, transfer_seq_len=64,
    random_seeds=(0,), tasks=(), accuracy_sets=(), check_module=None, route_module=None,
)


def test_a_new_manifest_is_scored_by_calibdrop_run_with_no_code_change(tmp_path, monkeypatch):
    """A manifest dropped into $CALIBDROP_MANIFESTS joins `calibdrop run`'s distributions (quick preset shrunk to what a
    distribution flows through: cosine scores, attention drop sets and held-out windows, no figures; every stage runs in
    test_cli)."""
    if not all(is_fetched(manifests.load_manifest(name)) for name in manifests.top_level()):
        pytest.skip("the shipped distributions are not fetched; run `calibdrop data fetch`")
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("Apache-2.0", "BSD", "Artistic", "MPL-2.0"):
        if not (LICENSES / name).is_file():
            pytest.skip(f"{LICENSES / name} is not on this machine")
        shutil.copy(LICENSES / name, texts / f"{name}.txt")
    folder = write_manifests(tmp_path / "manifests", local_manifest("licenses", str(texts / "*.txt")))
    model = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(folder))
    monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(PRESETS["quick"], **SHRUNK_QUICK))
    out = tmp_path / "out"
    result = cli("run", "--model", model, "--preset", "quick", "--out", out, "--no-figures")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = read_table(out / "scores.parquet")
    assert set(scores["distribution"]) == set(manifests.top_level()) | {"licenses"}
    assert scores.loc[scores["distribution"] == "licenses", "importance"].notna().all()
    assert "licenses" in (out / "report.md").read_text()
    heldout = read_table(out / "heldout_windows.parquet")
    assert (heldout.loc[heldout["distribution"] == "licenses", "n_tokens"] == 63).all() and "licenses" in set(heldout["distribution"])

