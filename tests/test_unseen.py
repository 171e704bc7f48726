"""Test-only distributions: fetched and verified like the others, evaluated as held-out columns, read by no stage that
calibrates, selects or compares."""

import shutil

import pytest

from analysis.data import documents as documents_module
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level, unseen_distributions
from analysis.errors import InputError
from analysis.pipeline import RunSettings, run

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


def test_unseen_windows_reach_no_calibration_or_selection_stage(tiny_run):
    """The session's tiny run evaluates on legal; every document read is logged with the stage that read it."""
    folder, summary, reads = tiny_run
    assert SETTINGS["unseen"] == ("legal",)
    stages_reading_legal = {stage for stage, name in reads if name.split("/")[0] == "legal"}
    assert stages_reading_legal == {"heldout_windows_unseen"}
    assert {stage for stage, _ in reads} > {"heldout_windows_unseen"}, "the log saw no other stage: the patch missed"
    assert {"heldout_windows_unseen", "transfer_unseen"} <= set(summary["stages_computed"])
    report = (folder / "report.md").read_text()
    assert "## On text no stage saw" in report and "legal" in report


def test_a_test_only_distribution_cannot_be_calibrated_on(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="test-only"):
        run(str(tiny_dir), tmp_path, preset=RunSettings(**{**SETTINGS, "distributions": ("code", "legal")}), progress=False,
            log=lambda m: None)


def test_unseen_samples_sets_the_test_only_windows_and_nothing_else(tiny_run, tiny_dir, tmp_path):
    """A copy of the tiny run rerun (``force``) with half the test-only windows recomputes only the test-only stages."""
    from analysis.io import read_table

    folder, _, _ = tiny_run
    shutil.copytree(folder, tmp_path / "run")
    fewer = SETTINGS["transfer_samples"] // 2
    summary = run(str(tiny_dir), tmp_path / "run", preset=RunSettings(**{**SETTINGS, "unseen_samples": fewer}),
                  progress=False, log=lambda m: None, figures=False, force=True)
    windows = read_table(tmp_path / "run" / "heldout_windows_unseen.parquet")
    assert windows.groupby(["drop_set", "distribution"]).size().eq(fewer).all()
    assert read_table(tmp_path / "run" / "transfer_unseen.parquet")["n_windows"].eq(fewer).all()
    assert {"heldout_windows_unseen", "transfer_unseen"} <= set(summary["stages_computed"])
    assert not {"heldout_windows", "greedy", "scores.ablation"} & set(summary["stages_computed"])
