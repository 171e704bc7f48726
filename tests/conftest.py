"""Shared fixtures: the tests folder on the path (tiny models, fake apt), a saved tiny model for pipeline runs, and one
``calibdrop run --preset smoke`` of the real default model per test session (with that model loaded once)."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from analysis.data.fetching import is_fetched  # noqa: E402
from analysis.data.manifests import load_manifest  # noqa: E402
from analysis.models import loading as models  # noqa: E402
from analysis.presets import PRESETS  # noqa: E402
from tiny import byte_tokenizer, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_DISTRIBUTIONS = ("code", "math", "general")
# Tests that share a session-scoped run go to one xdist worker (``--dist loadgroup`` in pyproject), so each run is
# made once per suite, not once per worker.
SHARED_RUNS = {"smoke_run": "smoke", "tiny_run": "tiny"}

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One CPU thread per worker (and per process a test starts): two workers on two cores, not four threads.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Put each test that uses a shared run in that run's xdist group (a no-op without xdist).

    xdist 3.8 tags a grouped test by rewriting ``item._nodeid``, which pytest 9.2 no longer reads (a node's id lives
    in ``item._id``), so without the tag here every test would be its own group and each worker would make each run."""
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        group = mark.args[0] if mark else next((SHARED_RUNS[n] for n in item.fixturenames if n in SHARED_RUNS), None)
        if group is None:
            continue
        if mark is None:
            item.add_marker(pytest.mark.xdist_group(group))
        if config.getoption("loadgroup", False) and hasattr(item, "_id") and "@" not in item.nodeid:
            item._id = type(item._id).parse(f"{item.nodeid}@{group}")


def calibdrop(*args, env=None):
    """``calibdrop ARGS`` in a fresh process from the repository root."""
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def cli(*args) -> subprocess.CompletedProcess:
    """``calibdrop ARGS`` run by ``analysis.cli.main`` in this process from the repository root, its exit code, stdout
    and stderr captured: what :func:`calibdrop` returns without a fresh interpreter's start-up (about 5 s each).  An
    exception that ``main`` does not turn into its one error line propagates, as a traceback would end the process."""
    from analysis.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse's usage errors exit 2 from parse_args
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(["calibdrop", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    for name in PIPELINE_DISTRIBUTIONS:
        if not is_fetched(load_manifest(name)):
            pytest.skip(f"distribution {name} is not fetched; run `calibdrop data fetch`")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def skip_unless_smoke_inputs():
    """Skip unless the default model and the smoke preset's distributions are fetched."""
    if not models.is_fetched(models.DEFAULT_MODEL) or not all(is_fetched(load_manifest(n)) for n in PRESETS["smoke"].distributions):
        pytest.skip("the default model or the distributions are not fetched; run setup.sh")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and its tokenizer, loaded once per session (tests must not change it)."""
    if not models.is_fetched(models.DEFAULT_MODEL):
        pytest.skip("the default model is not fetched; run setup.sh")
    return models.load_model(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_run(tiny_dir, tmp_path_factory):
    """One uninterrupted run of the tiny model with the pipeline tests' settings (test_pipeline.SETTINGS, one test-only
    distribution included), shared by the session: ``(folder, summary, reads)``, where ``reads`` lists every document
    table read during the run as ``(stage, distribution)``."""
    from analysis.data import documents as documents_module
    from analysis.pipeline import RunSettings, Study, run
    from test_pipeline import SETTINGS

    if not is_fetched(load_manifest("legal")):
        pytest.skip("the test-only distribution legal is not fetched; run `calibdrop data fetch legal`")
    reads, current = [], {"stage": None}
    read_documents, run_stage = documents_module.documents, Study.run_stage

    def logged_documents(name):
        reads.append((current["stage"], name))
        return read_documents(name)

    def logged_stage(study, stage):
        current["stage"] = stage.name
        return run_stage(study, stage)

    folder = tmp_path_factory.mktemp("tiny-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(documents_module, "documents", logged_documents)
        patch.setattr(Study, "run_stage", logged_stage)
        summary = run(str(tiny_dir), folder, preset=RunSettings(**SETTINGS), progress=False, log=lambda m: None)
    return folder, summary, reads


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The output folder of one ``calibdrop run --preset smoke`` of the default model (every stage), shared by the session."""
    skip_unless_smoke_inputs()
    out = tmp_path_factory.mktemp("smoke-run")
    result = calibdrop("run", "--preset", "smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out
