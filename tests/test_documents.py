"""analysis.data.documents: splits by document, sub-distributions, the hub alternative and user manifests."""

import json
from pathlib import Path

import pytest
import yaml

from analysis.data import documents
from analysis.errors import InputError
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, manifest_paths, top_level


def fetched(name):
    if not is_fetched(load_manifest(name)):
        pytest.skip(f"distribution {name} is not fetched; run `calibdrop data fetch {name}`")
    return name


@pytest.mark.parametrize("name", top_level())
def test_splits_are_disjoint_stable_and_hold_out_a_fifth(name):
    frame = documents.documents(fetched(name))
    calibration = set(zip(frame[frame.split == "calibration"].source, frame[frame.split == "calibration"].doc_id))
    heldout = set(zip(frame[frame.split == "heldout"].source, frame[frame.split == "heldout"].doc_id))
    assert calibration and heldout and not calibration & heldout
    again = documents.assign_splits(frame.drop(columns="split"), name, 0.25)
    assert (again == frame["split"]).all()
    for _, group in frame.groupby(["source", "language"], dropna=False):
        assert (group["split"] == "heldout").mean() >= 0.2


def test_split_of_a_document_does_not_depend_on_the_others():
    keys = [f"general:brown:c{i}" for i in range(200)]
    full = dict(zip(keys, documents.heldout_mask(keys, 0.25)))
    assert sum(full.values()) == 50
    shuffled = list(reversed(keys))
    assert dict(zip(shuffled, documents.heldout_mask(shuffled, 0.25))) == full


def test_sub_distribution_is_the_documents_of_one_language():
    table = documents.load_distribution(fetched("multilingual") + "/ja", "calibration")
    assert set(table["language"]) == {"ja"}
    assert any("\u3002" in text for text in table["text"][:20])
    with pytest.raises(InputError, match="no subset 'tlh'"):
        documents.load_distribution("multilingual/tlh")


def test_unknown_split_is_one_clear_line():
    with pytest.raises(InputError, match=r"split must be one of \('calibration', 'heldout'\), not 'test'"):
        documents.load_distribution("general", "test")


def brown_jsonl(path: Path, n: int) -> Path:
    frame = documents.documents(fetched("general")).head(n)
    path.write_text("".join(json.dumps({"text": t, "genre": d[:2]}) + "\n" for t, d in zip(frame.text, frame.doc_id)))
    return path


def test_hub_alternative_path_on_a_local_file_standing_in_for_the_hub(tmp_path):
    manifest = yaml.safe_load((manifest_paths()["general"]).read_text())
    manifest["hub_alternative"] = {"path": "json", "split": "train", "data_files": str(brown_jsonl(tmp_path / "hub.jsonl", 40)), "text_field": "text"}
    path = tmp_path / "general_hub.yaml"
    path.write_text(yaml.safe_dump(manifest))
    calibration = documents.load_distribution(path, "calibration", hub=True)
    heldout = documents.load_distribution(path, "heldout", hub=True)
    assert len(calibration) == 30 and len(heldout) == 10
    assert set(calibration["source"]) == {"hub"} and not set(calibration["doc_id"]) & set(heldout["doc_id"])


def test_user_manifest_over_local_jsonl(tmp_path, monkeypatch):
    jsonl = brown_jsonl(tmp_path / "mine.jsonl", 20)
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
    table = documents.load_distribution("mine", "calibration")
    assert len(table) + len(documents.load_distribution("mine", "heldout")) == 20
    assert "mine/ca" in documents.subsets("mine")
    summary = documents.distribution_summary(["mine"]).set_index("name")
    assert summary.loc["mine", "calibration_documents"] + summary.loc["mine", "heldout_documents"] == 20
    assert summary.loc["mine", "fetched"]
