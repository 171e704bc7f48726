"""MkDocs hook: the findings, built from the committed reference studies.

Every folder ``reference/<model>/`` at the repository root that holds a ``report.md`` becomes the page
``findings/<model>/index.md`` (the report's text, its committed figures and tables copied beside it; a link to a
file that is not committed becomes plain text). On the page that holds them, ``<!-- calibdrop-findings -->``
becomes the list of those pages, and ``<!-- calibdrop-findings-table -->`` one table across models with each
model's figures, read from the committed tables at build time (:func:`findings_table`).

The tables may carry columns this page does not read; a ``status`` column (``recommended``, ``equivalent group``,
``not resolved``) is used where present, else derived from ``resolved``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

from mkdocs.structure.files import File

MARKER = "<!-- calibdrop-findings -->"
TABLE_MARKER = "<!-- calibdrop-findings-table -->"
SECTION = "Findings"
ASSETS = {".png", ".svg", ".jpg", ".jpeg", ".csv", ".json", ".parquet"}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
NONE_YET = ("No reference study is committed yet. Each one is a folder `reference/<model>/` holding the "
            "result tables of a study and its `report.md`; `calibdrop report reference/<model>` re-renders the "
            "report from the committed tables, and this site then shows it here.")
BUDGETS = (("attn", "attention"), ("mlp", "MLP"), ("block", "block"), ("joint", "attention + MLP"))
# Baselines by the method part of a drop-set label (after "<metric>/<kind>-<k>:"), matched by prefix.
BASELINES = {"drop the last k": ("last",), "paper recipe": ("own:general",)}
FIGURES = (("metric_validity", "each proxy's ρ with the ablation ground truth"),
           ("transfer_worst_case", "every evaluated set by its worst-case held-out ratio"))
WIDE_FIGURE = "transfer_worst_case"  # four panels side by side: one per line, not in a table


def reference_reports(root: Path) -> dict[str, Path]:
    """``{model: report.md}`` for every ``reference/<model>/report.md`` under ``root``, by model name."""
    return {path.parent.name: path for path in sorted((root / "reference").glob("*/report.md"))}


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_config(config):
    """Put the repository root on ``sys.path`` (the table reads the tables with this checkout's code) and add a nav
    entry per reference study under the Findings section."""
    root = _root(config)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    models = reference_reports(root)
    for entry in config.nav or []:
        if isinstance(entry, dict) and SECTION in entry:
            section = entry[SECTION]
            pages = section if isinstance(section, list) else [{"Overview": section}]
            pages += [{model: f"findings/{model}/index.md"} for model in models]
            entry[SECTION] = pages
    return config


def committed_links_only(markdown: str, folder: Path) -> str:
    """The report's text with links to files missing from ``folder`` turned into plain text."""
    def keep_or_flatten(match):
        _, text, target = match.groups()
        if "://" in target or target.startswith("#") or (folder / target.split("#")[0]).exists():
            return match.group(0)
        return f"{text} (`{target}`, not committed)"
    return LINK.sub(keep_or_flatten, markdown)


def on_files(files, config):
    """Generate the findings pages and copy their committed figures and tables."""
    for model, report in reference_reports(_root(config)).items():
        text = committed_links_only(report.read_text(encoding="utf-8"), report.parent)
        note = (f"\n\n---\n\nGenerated at build time from the committed `reference/{model}/report.md`; "
                f"`calibdrop report reference/{model}` re-renders it from the committed tables.\n")
        files.append(File.generated(config, f"findings/{model}/index.md", content=text + note))
        for asset in sorted(report.parent.rglob("*")):
            if asset.is_file() and asset.suffix.lower() in ASSETS:
                relative = asset.relative_to(report.parent).as_posix()
                files.append(File.generated(config, f"findings/{model}/{relative}", abs_src_path=str(asset)))
    return files


def status(row) -> str:
    """A claim's status: its ``status`` column where the table has one, else ``recommended`` / ``not resolved`` from
    ``resolved``."""
    value = getattr(row, "status", None)
    if isinstance(value, str) and value:
        return value
    return "recommended" if bool(row.resolved) else "not resolved"


def short_name(label: str) -> str:
    """``cosine/attn-8:own:general`` -> ``cosine own:general``."""
    metric, _, rest = label.partition("/")
    return f"{metric} {rest.partition(':')[2]}" if rest else label


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def data_or_metric_cell(claims) -> str:
    """Attention: mean ρ across proxies minus across distributions with its CI, and which moves the ranking more."""
    rows = claims[(claims["claim"] == "data or metric") & (claims["module"] == "attn")]
    if not len(rows):
        return "not in these tables"
    row = next(rows.itertuples())
    mover = "data" if row.estimate > 0 else "metric"
    verdict = f"**{mover}**" if row.resolved else "not resolved"
    return f"{verdict}, {_ci(row.estimate, row.ci_low, row.ci_high)}"


def cosine_truth_cell(validity) -> str:
    """Attention: Spearman ρ of the cosine ranking with the ablation ranking, mean and range over distributions."""
    rows = validity[(validity["metric"] == "cosine") & (validity["module"] == "attn")]["spearman"]
    return f"{rows.mean():.2f} ({rows.min():.2f}–{rows.max():.2f})" if len(rows) else "not in these tables"


def answer_cell(claims, module: str) -> str:
    """The recommendation of a module kind at its budget: set, worst-case ratio with CI, status."""
    rows = claims[(claims["claim"] == "recommended set") & (claims["module"] == module)]
    if not len(rows):
        return "not evaluated"
    row = next(rows.itertuples())
    return f"{short_name(row.subject)}, {_ci(row.estimate, row.ci_low, row.ci_high)}×, **{status(row)}**"


def generalisation_cell(folder: Path) -> str:
    """Leaving each distribution out: the procedure of lowest mean ratio on the left-out distribution, resolved only
    when its paired CI separates it from every other procedure (the report's own rule)."""
    import pandas as pd

    from analysis.report.sections.heldout import lodo_not_separated, lodo_ranking

    def table(name: str):
        path = folder / f"{name}.parquet"
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame()

    results = SimpleNamespace(table=table, metric="cosine")
    ranking = lodo_ranking(results)
    if not len(ranking):
        return "not in these tables"
    best = ranking.iloc[0]
    group = lodo_not_separated(results, best["procedure"])
    if group is None:
        verdict = f"not resolved (not paired; next {ranking.iloc[1]['procedure']} {ranking.iloc[1]['mean']:.3f}×)"
    elif group:
        verdict = f"not resolved against {', '.join(group)}"
    else:
        verdict = "**resolved**"
    return f"{best['procedure']}, {best['mean']:.3f}×, {verdict}"


def baselines_cell(set_groups) -> str:
    """Each baseline's worst-case ratio at the attention budget, beside the best set's, where the tables have it."""
    attention = set_groups[set_groups["module"] == "attn"]
    cells = []
    for name, prefixes in BASELINES.items():
        methods = attention["drop_set"].str.partition(":")[2]
        rows = attention[methods.str.startswith(prefixes)]
        if len(rows):
            row = next(rows.itertuples())
            cells.append(f"{name} {row.ppl_ratio:.2f}×")
    return "; ".join(cells) if cells else "not in these tables"


def findings_row(folder: Path) -> dict[str, str]:
    """One model's row of the findings table, from the committed tables of its reference folder."""
    import pandas as pd

    claims = pd.read_parquet(folder / "claims.parquet")
    row = {"model": f"[{folder.name}]({folder.name}/index.md)",
           "data or metric (attention)": data_or_metric_cell(claims),
           "cosine–truth ρ (attention)": cosine_truth_cell(pd.read_parquet(folder / "validity.parquet"))}
    for module, name in BUDGETS:
        k = claims[(claims["claim"] == "recommended set") & (claims["module"] == module)]["k"]
        row[f"{name}{'-' + str(int(k.iloc[0])) if len(k) else ''}"] = answer_cell(claims, module)
    row["generalises best (left-out distribution)"] = generalisation_cell(folder)
    row["baselines (attention)"] = baselines_cell(pd.read_parquet(folder / "set_groups.parquet"))
    return row


def findings_table(root: Path) -> str:
    """The table across models (one row each) and a table of their figures, as Markdown."""
    folders = [report.parent for report in reference_reports(root).values()]
    if not folders:
        return NONE_YET
    rows = [findings_row(folder) for folder in folders]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(column, "") for column in columns) + " |" for row in rows]
    figures = []
    for stem, caption in FIGURES:
        cells = [f"![{folder.name}: {stem}]({folder.name}/figures/{stem}.png)" if (folder / "figures" / f"{stem}.png")
                 .is_file() else "not committed" for folder in folders]
        if stem == WIDE_FIGURE:
            figures += [f"**{caption.capitalize()}**, per model:", ""]
            figures += [f"{folder.name}\n\n{cell}\n" for folder, cell in zip(folders, cells)]
        else:
            figures += [f"**{caption.capitalize()}**:", "", "| " + " | ".join(f.name for f in folders) + " |",
                        "|" + "---|" * len(folders), "| " + " | ".join(cells) + " |", ""]
    return "\n".join(lines + [""] + figures)


def on_page_markdown(markdown, page, config, files):
    """Replace the markers with the list of findings pages and the table across models."""
    root = _root(config)
    if MARKER in markdown:
        models = reference_reports(root)
        listing = "\n".join(f"* [{model}]({model}/index.md): `reference/{model}/`" for model in models) or NONE_YET
        markdown = markdown.replace(MARKER, listing)
    if TABLE_MARKER in markdown:
        markdown = markdown.replace(TABLE_MARKER, findings_table(root))
    return markdown
