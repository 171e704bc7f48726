"""The notebooks run top to bottom on the real default model (as in CI)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis.models import loading as models
from analysis.data.fetching import is_fetched
from analysis.data.manifests import load_manifest, top_level

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    if not models.is_fetched("smollm2-135m") or not all(is_fetched(load_manifest(name)) for name in top_level()):
        pytest.skip("the default model or the distributions are not fetched; run setup.sh")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
