"""Every guide's examples run, at smoke size, and print what the guide says they print.

A guide marks an example with ``<!-- example -->`` before a ```` ```bash ```` or ```` ```python ```` block, and its
output with ``<!-- output -->`` before the ```` ```text ```` block that follows. The examples of one guide run in
order in one folder, where ``results/`` is a copy of the suite's smoke run (``calibdrop run --preset smoke --out
results``, conftest ``smoke_run``): what a reader gets after that command. A ``calibdrop ...`` line runs in this
process (``analysis.cli.main``); another shell line (``python -c ...``) runs in bash; a Python block runs with
``exec``. The printed text must match the guide's output line by line: numbers within the precision they are
printed at (or 2%); a line ``...`` stands for any lines, and a line with `` ...`` in it for any line that begins with
the text before it (a timing, say).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
EXAMPLE, OUTPUT = "<!-- example -->", "<!-- output -->"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
# Guides without an example, and why.
NO_EXAMPLE = {
    "gpus.md": "every command there needs a CUDA GPU",
    "llama-cpp.md": "written by the export work; mark its example to have it run here",
}


def examples(markdown: str) -> list[tuple[str, str, str]]:
    """``(language, code, expected output)`` of every marked example, in page order."""
    found = []
    for part in markdown.split(EXAMPLE)[1:]:
        code = FENCE.search(part)
        if code is None or OUTPUT not in part:
            raise AssertionError("an <!-- example --> without a code block and an <!-- output --> after it")
        output = FENCE.search(part, part.index(OUTPUT))
        found.append((code.group(1), code.group(2), output.group(2)))
    return found


def numbers_match(expected: str, actual: str) -> bool:
    """Same text between the numbers; each number within half a unit of its last printed digit, or 2%."""
    if NUMBER.split(expected) != NUMBER.split(actual):
        return False
    for want, got in zip(NUMBER.findall(expected), NUMBER.findall(actual)):
        digits = len(want.split(".")[1].split("e")[0]) if "." in want else 0
        tolerance = max(10.0 ** -digits * 1.5 if digits else 0.0, 0.02 * abs(float(want)))
        if abs(float(want) - float(got)) > tolerance:
            return False
    return True


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line with :func:`numbers_match`; an expected line ``...`` matches any run of lines (none included), one
    with `` ...`` in it any line that begins with the text before it."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(output_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    if not actual:
        return False
    want, got = expected[0].rstrip(), actual[0].rstrip()
    head = want.split(" ...", 1)[0] if " ..." in want else None
    same = got.startswith(head) if head is not None else numbers_match(want, got)
    return same and output_matches(expected[1:], actual[1:])


def shell_lines(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def run_bash(code: str, folder: Path) -> str:
    from analysis.cli import main

    printed = []
    for line in shell_lines(code):
        words = shlex.split(line, comments=True)
        if words[0] == "calibdrop":
            out = io.StringIO()
            with contextlib.chdir(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                code_ = main(words[1:])
            assert code_ in (0, None), f"`{line}` exited {code_}"
            printed.append(out.getvalue())
        else:
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "PYTHONPATH": str(ROOT)}
            result = subprocess.run(["bash", "-c", line], cwd=folder, capture_output=True, text=True, env=env, check=False)
            assert result.returncode == 0, f"`{line}` exited {result.returncode}: {result.stderr[-2000:]}"
            printed.append(result.stdout)
    return "".join(printed)


def run_python(code: str, folder: Path) -> str:
    out = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(out):
        exec(compile(code, "<guide example>", "exec"), {"__name__": "__guide__"})  # noqa: S102 (the guide's own code)
    return out.getvalue()


def test_output_matching_rules():
    assert numbers_match("ratio 1.52 [1.50, 1.55]", "ratio 1.53 [1.50, 1.55]")
    assert not numbers_match("ratio 1.52", "ratio 1.56")
    assert not numbers_match("layers [25, 26]", "layers [25, 27]")
    assert not numbers_match("keep", "recalibrate")
    assert output_matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert output_matches(["a", "...", "b"], ["a", "b"])
    assert not output_matches(["a", "c"], ["a", "b", "c"])
    assert output_matches(["cost: prefix is ... (timed)"], ["cost: prefix is 60.9% of a pass"])
    assert not output_matches(["cost: prefix is ... (timed)"], ["cost: suffix is 60.9%"])


def test_every_guide_has_a_marked_example():
    missing = [p.name for p in sorted(GUIDES.glob("*.md")) if EXAMPLE not in p.read_text(encoding="utf-8")
               and p.name not in NO_EXAMPLE]
    assert not missing, f"guides without an <!-- example -->: {missing}"


@pytest.mark.parametrize("guide", sorted(p.name for p in GUIDES.glob("*.md") if p.name not in NO_EXAMPLE))
def test_guide_examples_run_and_print_what_the_guide_shows(guide, smoke_run, tmp_path):
    shutil.copytree(smoke_run, tmp_path / "results")
    for number, (language, code, expected) in enumerate(examples((GUIDES / guide).read_text(encoding="utf-8")), 1):
        printed = run_python(code, tmp_path) if language == "python" else run_bash(code, tmp_path)
        actual = printed.replace(str(tmp_path) + os.sep, "").replace(str(tmp_path), ".").rstrip("\n").splitlines()
        assert output_matches(expected.rstrip("\n").splitlines(), actual), (
            f"{guide}, example {number} printed:\n" + "\n".join(actual))


def test_readme_example_prints_what_readme_shows(tmp_path):
    from conftest import skip_unless_smoke_inputs

    skip_unless_smoke_inputs()
    ((language, code, expected),) = examples((ROOT / "README.md").read_text(encoding="utf-8"))
    actual = run_python(code, tmp_path).rstrip("\n").splitlines()
    assert language == "python" and output_matches(expected.rstrip("\n").splitlines(), actual), "\n".join(actual)
