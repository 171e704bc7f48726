"""Shared fixtures: the tests folder on the path (tiny models, fake apt) and a saved tiny model for pipeline runs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from analysis.data.fetching import is_fetched  # noqa: E402
from analysis.data.manifests import load_manifest  # noqa: E402
from tiny import byte_tokenizer, tiny_model  # noqa: E402

PIPELINE_DISTRIBUTIONS = ("code", "math", "general")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    for name in PIPELINE_DISTRIBUTIONS:
        if not is_fetched(load_manifest(name)):
            pytest.skip(f"distribution {name} is not fetched; run `calibdrop data fetch`")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


