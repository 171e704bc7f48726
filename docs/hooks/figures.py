"""MkDocs hook: the committed figures of ``figures/`` at the repository root, served under ``figures/``.

Pages link them as ``figures/<name>.png`` (relative to the docs root), so the images are never copied
into ``docs/`` and the site always shows the committed ones.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    """Add every committed PNG figure as a site file."""
    folder = Path(config.config_file_path).resolve().parent / "figures"
    for figure in sorted(folder.glob("*.png")):
        files.append(File.generated(config, f"figures/{figure.name}", abs_src_path=str(figure)))
    return files
