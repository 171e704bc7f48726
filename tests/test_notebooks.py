"""The notebooks run top to bottom on the real default model, at the smoke size (as in CI).

``CALIBDROP_SMOKE=1`` shrinks their windows to 4 x 32 tokens (it shows that every cell runs, nothing about the numbers);
notebook 04 reads the session's smoke run (``CALIBDROP_RUNS``) instead of running its own."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import skip_unless_smoke_inputs
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# A notebook that reads the session's smoke run runs on the xdist worker that made it (see conftest.SHARED_RUNS).
PARAMS = [pytest.param(p, marks=pytest.mark.xdist_group("smoke")) if "CALIBDROP_RUNS" in p.read_text() else p
          for p in NOTEBOOKS]


@pytest.mark.real_model
@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, request):
    skip_unless_smoke_inputs()
    if not all(is_fetched(load_manifest(name)) for name in top_level()):
        pytest.skip("the distributions are not fetched; run setup.sh")
    monkeypatch.setenv("CALIBDROP_SMOKE", "1")
    if "CALIBDROP_RUNS" in path.read_text():
        monkeypatch.setenv("CALIBDROP_RUNS", str(request.getfixturevalue("smoke_run")))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
