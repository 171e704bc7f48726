"""The documentation: the site builds strictly (broken links, anchors and API references fail), its CLI
reference is generated from the parser, findings pages and the table across models come from committed reference
folders, every relative link and image of committed Markdown resolves, README stays a short front page, and no
page keeps history ("session") or a paragraph over 80 words."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
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
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, check=False)
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
    assert len(lines) <= 120, len(lines)
    head = "\n".join(lines[:30])
    for command in COMMANDS:
        assert f"```bash\n{command}\n```" in head, command
    assert "<!-- answers: filled from the default run -->" in README.read_text(encoding="utf-8")


def test_readme_python_example_uses_public_names():
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL).group(1)
    imported = {alias.name for node in ast.walk(ast.parse(block)) if isinstance(node, ast.ImportFrom) and node.module == "analysis"
                for alias in node.names}
    assert imported and imported <= set(analysis.__all__), imported - set(analysis.__all__)


# --- Markdown that a reader sees: links, history, paragraph length -------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE_TAG = re.compile(r"<img[^>]*\ssrc=\"([^\"]+)\"")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
LIST_ITEM = re.compile(r"^([*-]|\d+\.)\s")
HISTORY = re.compile(r"session", re.IGNORECASE)
# Pages known to hold a paragraph over 80 words; a strict xfail turns into a failure once fixed, so no mark lingers.
LONG_PARAGRAPHS_KNOWN: dict[str, str] = {}


def committed_markdown() -> list[str]:
    """Every committed Markdown file, relative to the repository root (a fresh tree without git: every one found)."""
    result = subprocess.run(["git", "ls-files", "*.md"], capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode == 0 and result.stdout.strip():
        return sorted(path for path in result.stdout.split() if (ROOT / path).is_file())
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if ".venv" not in p.parts)


def reader_pages() -> list[str]:
    """The pages a user reads: README, the docs, the reference and benchmark listings, the changelog."""
    fixed = ["README.md", "CHANGELOG.md", "reference/README.md", "benchmarks/README.md"]
    return fixed + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))


def relative_targets(markdown: str) -> list[str]:
    """Every relative link and image target of a Markdown text outside code (no scheme, not a bare #anchor), without
    its anchor."""
    text = CODE.sub("", markdown)
    targets = [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in IMAGE_TAG.finditer(text)]
    return [t.split("#")[0] for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def generated_site_paths() -> set[str]:
    """Paths under docs/ that exist only in the built site: what the findings hook generates from reference/."""
    hook = _hook("findings")
    paths = set()
    for model, report in hook.reference_reports(ROOT).items():
        paths.add(f"docs/findings/{model}/index.md")
        paths |= {f"docs/findings/{model}/{a.relative_to(report.parent).as_posix()}" for a in report.parent.rglob("*")
                  if a.is_file() and a.suffix.lower() in hook.ASSETS}
    return paths


def paragraphs(markdown: str) -> list[str]:
    """Prose paragraphs (a list item is one): lines between blank lines, outside code blocks, headings, tables,
    HTML comments and images."""
    found, current, fence = [], [], False
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = not fence
        structural = (fence or stripped.startswith(("```", "#", "|", "<!--", "![")) or not stripped
                      or LIST_ITEM.match(stripped))
        if structural:
            if current:
                found.append(" ".join(current))
            current = [stripped] if LIST_ITEM.match(stripped) and not fence else []
            continue
        current.append(stripped)
    if current:
        found.append(" ".join(current))
    return found


def test_paragraphs_are_split_as_a_reader_sees_them():
    text = "# Title\n\none two\nthree\n\n* item a\n  continued\n* item b\n\n```\ncode line\n```\n| a | b |\n"
    assert paragraphs(text) == ["one two three", "* item a continued", "* item b"]


@pytest.mark.parametrize("path", committed_markdown())
def test_every_relative_link_and_image_resolves(path):
    """On a code host a relative link resolves from the file's folder; a page under docs/ may also name what the site
    generates (each reference study's findings page and its figures), which `mkdocs build --strict` checks there."""
    site_only = generated_site_paths() if path.startswith("docs/") else set()
    folder = (ROOT / path).parent
    broken = [t for t in relative_targets((ROOT / path).read_text(encoding="utf-8"))
              if t and not (folder / t).exists()
              and os.path.normpath((folder / t).relative_to(ROOT).as_posix()) not in site_only]
    assert not broken, f"{path} links files that do not exist: {broken}"


def test_link_check_catches_a_missing_image(tmp_path):
    (tmp_path / "there.png").write_bytes(b"png")
    text = "![a](there.png) [b](missing.md#x) `![c](in-code.png)` [web](https://x.org) [top](#anchor)"
    assert [t for t in relative_targets(text) if not (tmp_path / t).exists()] == ["missing.md"]


@pytest.mark.parametrize("path", reader_pages())
def test_reader_pages_keep_no_history(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    hits = [line for line in text.splitlines() if HISTORY.search(line)]
    assert not hits, f"{path} keeps history (CHANGELOG.md is its home): {hits[:3]}"


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=LONG_PARAGRAPHS_KNOWN[p]))
                                  if p in LONG_PARAGRAPHS_KNOWN else p for p in reader_pages()])
def test_no_paragraph_over_80_words(path):
    long = [(len(p.split()), p[:60]) for p in paragraphs((ROOT / path).read_text(encoding="utf-8")) if len(p.split()) > 80]
    assert not long, f"{path}: {long}"


def test_findings_table_reads_committed_tables_with_extra_columns_and_status(tmp_path):
    """The table across models takes a table's ``status`` where it has one, derives it from ``resolved`` where it
    does not, and ignores columns it does not know."""
    import pandas as pd

    hook = _hook("findings")
    claims = pd.read_parquet(ROOT / "reference" / "smollm2-135m" / "claims.parquet")
    rows = claims[claims["claim"] == "recommended set"]
    derived = {row.module: hook.status(row) for row in rows.itertuples()}
    assert derived == {"attn": "not resolved", "block": "recommended", "joint": "recommended", "mlp": "recommended"}
    newer = rows.assign(status=["equivalent group", "recommended", "recommended", "not resolved"], extra=1)
    assert [hook.status(row) for row in newer.itertuples()] == list(newer["status"])
    assert "**equivalent group**" in hook.answer_cell(newer, "attn")


def test_findings_table_agrees_with_each_committed_report():
    """Every number of a model's row appears in its report.md, which the report code renders from the same tables
    by its own path."""
    hook = _hook("findings")
    for model, report in hook.reference_reports(ROOT).items():
        row = hook.findings_row(report.parent)
        text = report.read_text(encoding="utf-8")
        # ρ is a mean over distributions (the report lists each), and the baselines' format is the report's own.
        shown = " ".join(v for k, v in row.items() if "ρ" not in k and k not in ("model", "baselines (attention)"))
        numbers = re.findall(r"-?\d+\.\d+", shown)
        missing = [n for n in numbers if n not in text and n.lstrip("-") not in text]
        assert not missing, (model, missing)


def test_site_has_the_findings_table_and_the_new_pages(site):
    page = (site / "findings" / "index.html").read_text(encoding="utf-8")
    assert "calibdrop-findings-table" not in page and "smollm2-135m" in page and "generalises best" in page
    for name in ("glossary", "faq"):
        assert (site / name / "index.html").is_file(), name
    assert "2406.15786" in (site / "index.html").read_text(encoding="utf-8")


def test_license_and_citation_are_committed():
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    import yaml

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0" and citation["authors"]
