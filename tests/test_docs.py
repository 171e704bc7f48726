"""The documentation: the site builds strictly (broken links, anchors and API references fail), its CLI
reference is generated from the parser, findings pages come from committed reference folders, and README
stays a short front page."""

from __future__ import annotations

import ast
import importlib.util
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
from analysis.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ("bash setup.sh && .venv/bin/calibdrop run", ".venv/bin/python -m pytest -q")


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(out)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_site_builds_strictly_with_every_page(site):
    for page in ("index.html", "getting-started/index.html", "methods/index.html", "reliability/index.html",
                 "findings/index.html", "api/importance/index.html", "reference/cli/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "importance" / "index.html").read_text(encoding="utf-8")
    assert 'id="analysis.importance.scoring.score_texts"' in api


def test_cli_reference_has_every_command_with_its_help(site):
    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    hook = _hook("cli_reference")
    names = [name for name, _ in hook.subcommands(build_parser(), "calibdrop")]
    assert {"calibdrop score", "calibdrop models fetch", "calibdrop data list"} <= set(names)
    for name in names:
        assert f"<code>{name}</code>" in page, name
    assert "--loss-samples" in page and "--device-map" in page


def test_findings_pages_list_committed_reports_or_say_how_to_make_them(tmp_path):
    hook = _hook("findings")
    assert hook.reference_reports(tmp_path) == {}
    folder = tmp_path / "reference" / "tiny-model"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "a.png").write_bytes(b"png")
    (folder / "report.md").write_text("# r\n\n![a](figures/a.png) ![b](figures/b.png) [web](https://x.org/y)\n")
    assert hook.reference_reports(tmp_path) == {"tiny-model": folder / "report.md"}
    text = hook.committed_links_only((folder / "report.md").read_text(), folder)
    assert "![a](figures/a.png)" in text and "[web](https://x.org/y)" in text
    assert "![b]" not in text and "`figures/b.png`, not committed" in text
    assert "calibdrop report reference/<model>" in hook.NONE_YET


def test_readme_is_a_short_front_page_with_both_commands_first():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, len(lines)
    head = "\n".join(lines[:30])
    for command in COMMANDS:
        assert command in head, command


def test_readme_python_example_uses_public_names():
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    imported = {alias.name for node in ast.walk(ast.parse(block)) if isinstance(node, ast.ImportFrom) and node.module == "analysis"
                for alias in node.names}
    assert imported and imported <= set(analysis.__all__), imported - set(analysis.__all__)
