"""The package's folders follow the flow, and imports only run down it: data -> models -> importance -> study ->
evaluation -> report -> the run (pipeline, its stage functions in steps/, export) -> cli, with errors, io, artifacts,
outputs, presets, kinds and stages below all."""

import re
from pathlib import Path

import analysis

ROOT = Path(analysis.__file__).parent
FLOW = ("data", "models", "importance", "study", "evaluation", "report", "run", "cli")
BASE = {"__init__", "errors", "io", "artifacts", "outputs", "presets", "kinds", "stages"}
RUN = {"pipeline", "export", "export_gguf", "steps"}
ENTRY = {"__main__"}  # `python -m analysis`: the command line


def layer(module: str) -> int:
    """Position of a module (dotted, under ``analysis``) in the flow; the base modules are -1."""
    head = module.split(".")[0]
    if head in BASE:
        return -1
    return FLOW.index("run") if head in RUN else FLOW.index("cli") if head in ENTRY else FLOW.index(head)


def imported(path: Path) -> list[tuple[str, str]]:
    """``(module, imported module)`` for every relative import of one file, resolved to dotted names."""
    module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
    package = module.rsplit(".", 1)[0].split(".") if "." in module else []
    pairs = []
    for match in re.finditer(r"^\s*from (\.+)([\w.]*) import ([\w, ]+)", path.read_text(), re.M):
        dots, name = len(match.group(1)), match.group(2)
        base = package[: len(package) - (dots - 1)]
        targets = [".".join([*base, name])] if name else [".".join([*base, n.split(" as ")[0].strip()])
                                                            for n in match.group(3).split(",")]
        pairs += [(module, target) for target in targets if target]
    return pairs


def test_every_module_lives_in_a_folder_of_the_flow():
    loose = {p.stem for p in ROOT.glob("*.py")} - BASE - RUN - ENTRY
    assert not loose, f"modules outside the flow's folders: {sorted(loose)}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FLOW) - {"run"} | {"steps"}


def test_imports_only_run_down_the_flow():
    upward = [(m, t) for path in ROOT.rglob("*.py") for m, t in imported(path) if layer(t) > layer(m)]
    assert not upward, f"imports that run up the flow: {upward}"
    assert imported(ROOT / "models" / "pruning.py"), "the import scan found nothing: the pattern is broken"
