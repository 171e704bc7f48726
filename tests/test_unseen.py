"""Test-only distributions: fetched and verified like the others, evaluated as held-out columns, read by no stage that
calibrates, selects or compares."""

import pytest

from analysis.data import documents as documents_module
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level, unseen_distributions
from analysis.errors import InputError
from analysis.pipeline import RunSettings, Study, run

from test_pipeline import SETTINGS

UNSEEN = ("legal", "science")


def test_roles_split_the_manifests():
    assert set(UNSEEN) <= set(unseen_distributions())
    assert not set(UNSEEN) & set(top_level())
    assert all(load_manifest(name).get("role", "calibration") == "calibration" for name in top_level())


@pytest.mark.parametrize("name", UNSEEN)
def test_test_only_documents_are_real_and_split(name):
    if not is_fetched(load_manifest(name)):
        pytest.skip(f"{name} is not fetched; run `calibdrop data fetch {name}`")
    frame = documents_module.documents(name)
    assert frame["doc_id"].is_unique and frame["text"].str.len().min() >= (2000 if name == "legal" else 200)
    assert set(frame["split"]) == {"calibration", "heldout"} and (frame["split"] == "heldout").mean() == pytest.approx(0.8, abs=0.01)


def test_unseen_windows_reach_no_calibration_or_selection_stage(tiny_dir, tmp_path, monkeypatch):
    if not is_fetched(load_manifest("legal")):
        pytest.skip("legal is not fetched; run `calibdrop data fetch legal`")
    reads, current = [], {"stage": None}
    read_documents, run_stage = documents_module.documents, Study.run_stage

    def logged_documents(name):
        reads.append((current["stage"], name))
        return read_documents(name)

    def logged_stage(study, stage):
        current["stage"] = stage.name
        return run_stage(study, stage)

    monkeypatch.setattr(documents_module, "documents", logged_documents)
    monkeypatch.setattr(Study, "run_stage", logged_stage)
    settings = RunSettings(**{**SETTINGS, "unseen": ("legal",), "tasks": ()})
    summary = run(str(tiny_dir), tmp_path, preset=settings, progress=False, log=lambda m: None)
    stages_reading_legal = {stage for stage, name in reads if name.split("/")[0] == "legal"}
    assert stages_reading_legal == {"heldout_windows_unseen"}
    assert {"heldout_windows_unseen", "transfer_unseen"} <= set(summary["stages_computed"])
    report = (tmp_path / "report.md").read_text()
    assert "## On text no stage saw" in report and "legal" in report


def test_a_test_only_distribution_cannot_be_calibrated_on(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="test-only"):
        run(str(tiny_dir), tmp_path, preset=RunSettings(**{**SETTINGS, "distributions": ("code", "legal")}), progress=False,
            log=lambda m: None)
