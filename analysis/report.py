"""The report of ``calibdrop run``: ``report.md`` and a self-contained ``report.html``.

Everything in it is computed from the saved tables (no timestamps, no timings), so a rerun
over the same saved results writes the same report.
"""

from __future__ import annotations

import base64
from pathlib import Path

import markdown
import pandas as pd

from .io import atomic_write_bytes
from .plots import pair_matrix
from .stability import drop_set, importance_matrix


def markdown_to_html(text: str) -> str:
    """HTML of the report's Markdown, with any raw HTML in it (a model spec, a distribution name) escaped as text."""
    converter = markdown.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.round(digits).to_markdown(index=False)


def _names(values) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def headline(tables: dict, module: str, k: int) -> list[str]:
    """The answer in a few sentences, from the agreement, noise-floor, permutation and LOO tables."""
    agreement = tables["agreement"][tables["agreement"]["module"] == module]
    floor = tables["split_half"][tables["split_half"]["module"] == module]
    permutation = tables["permutation"][tables["permutation"]["module"] == module]
    beyond = int((permutation["p_spearman"] < 0.05).sum())
    lines = [
        f"- **Ranking agreement ({module})**: Spearman ρ between distributions averages {agreement['spearman'].mean():.3f} "
        f"(range {agreement['spearman'].min():.3f} to {agreement['spearman'].max():.3f}); the drop sets of size {k} overlap by "
        f"Jaccard {agreement[f'jaccard@{k}'].mean():.2f} on average (range {agreement[f'jaccard@{k}'].min():.2f} to {agreement[f'jaccard@{k}'].max():.2f}).",
        f"- **Noise floor**: within one distribution, two independent halves of the samples agree with Spearman-Brown corrected ρ ≥ "
        f"{floor['reliability'].min():.3f}; {beyond} of {len(permutation)} pairs of distributions disagree beyond resampling noise "
        f"(permutation p < 0.05).",
    ]
    loo = tables["leave_one_out"]
    for kind, part_kind in loo.groupby("module", sort=False):
        results = []
        for method in ("borda", "minimax"):
            part = part_kind[part_kind["method"] == method]
            wins = int((part["consensus_regret"] < part["single_mean_regret"]).sum())
            results.append(f"{method} {wins} of {len(part)} (mean regret {part['consensus_regret'].mean():.4f})")
        lines.append(
            f"- **Consensus on an unseen distribution ({kind}, k = {part_kind['k'].iloc[0]})**: built without the held-out "
            f"distribution, its regret there was below the mean regret of the other distributions' own sets in: "
            f"{'; '.join(results)}; the own sets' mean regret {part_kind['single_mean_regret'].mean():.4f}, a random set's "
            f"{part_kind['random_regret'].mean():.4f}."
        )
    return lines


def stable_and_unstable(scores: pd.DataFrame, tables: dict, module: str, k: int) -> tuple[list[str], pd.DataFrame]:
    """Candidates in every distribution's size-k drop set, and those in some but not all of them."""
    matrix = importance_matrix(scores, module)
    own = {d: set(drop_set(matrix[d], k)) for d in matrix.columns}
    everywhere = sorted(set.intersection(*own.values()), key=str)
    somewhere = sorted(set.union(*own.values()) - set(everywhere), key=str)
    boot = tables["bootstrap_importance"]
    boot = boot[boot["module"] == module]
    rows = []
    for candidate in somewhere:
        probabilities = boot[boot["candidate"] == str(candidate)].set_index("distribution")[f"p_drop@{k}"]
        rows.append({"candidate": candidate, "in the drop set of": _names([d for d in matrix.columns if candidate in own[d]]),
                     "not of": _names([d for d in matrix.columns if candidate not in own[d]]),
                     "P(drop) range over distributions": f"{probabilities.min():.2f} to {probabilities.max():.2f}"})
    return everywhere, pd.DataFrame(rows)


def recommended(tables: dict, sets: pd.DataFrame) -> pd.DataFrame:
    """Per module and budget: minimax and borda sets with their worst-case regret, beside the single sets'."""
    regret = tables["regret"]
    worst = regret.groupby(["module", "k", "drop_set"], sort=False)["regret"].max()
    rows = []
    for (module, k), group in sets.groupby(["module", "k"], sort=False):
        singles = worst.loc[module, k][[n for n in worst.loc[module, k].index if n.startswith("own:")]]
        for method in ("minimax", "borda"):
            chosen = group[group["drop_set"] == method]["indices"].iloc[0]
            rows.append({"module": module, "k": k, "method": method, "drop set": _names(list(chosen)),
                         "worst-case regret": worst.loc[module, k, method], "best single set's worst regret": singles.min(),
                         "mean single set's worst regret": singles.mean(), "random (expected) worst regret": worst.loc[module, k, "random"]})
    return pd.DataFrame(rows)


def figure_list(figures: list[Path]) -> list[Path]:
    return sorted(p for p in figures if p.suffix == ".png")


def write_report(out: Path, model_record: dict, settings, scores: pd.DataFrame, tables: dict, sets: pd.DataFrame, figures: list[Path]) -> list[Path]:
    """Write ``report.md`` and ``report.html`` (figures embedded) into ``out``."""
    out = Path(out)
    module, k = "attn", max(settings.budgets.get("attn", (8,)))
    everywhere, unstable = stable_and_unstable(scores, tables, module, k)
    floor = tables["split_half"][tables["split_half"]["module"] == module].set_index("distribution")
    agreement = tables["agreement"][tables["agreement"]["module"] == module]
    permutation = tables["permutation"][tables["permutation"]["module"] == module]
    convergence = tables["convergence_summary"]
    lines = [
        f"# calibdrop report: {model_record.get('spec')}",
        "",
        f"Model `{model_record.get('spec')}` ({model_record.get('family')}, {model_record.get('n_layers')} layers, {model_record.get('dtype')}), "
        f"weights sha256 `{model_record.get('weights_sha256')}`. Distributions: {_names(settings.distributions)}; "
        f"{settings.samples} samples × {settings.seq_len} tokens each (seed {settings.seed}); bootstrap {settings.n_boot} resamples, "
        f"permutation test {settings.n_perm} shuffles. Importance S = 1 − cos(X, Y) over real tokens (He et al., 2024).",
        "",
        "## The answer",
        "",
        *headline(tables, module, k),
        "",
        f"## Modules unimportant on every distribution ({module}, k = {k})",
        "",
        f"In the size-{k} drop set of every distribution: **{_names(everywhere)}**. These are safe to drop whatever the calibration data.",
        "",
        "## Modules whose importance depends on the distribution",
        "",
        "In some distributions' drop sets but not all (bootstrap probability of being in the drop set, lowest to highest over distributions):",
        "",
        _table(unstable) if len(unstable) else "None: every distribution picks the same set.",
        "",
        "## Agreement between distributions and the noise floor",
        "",
        f"Spearman ρ of {module} importance between distributions; the diagonal is the split-half noise floor (Spearman-Brown corrected).",
        "",
        _table(pair_matrix(agreement, "spearman", floor["reliability"]).reset_index(names="distribution")),
        "",
        f"Jaccard@{k} of drop sets; the diagonal is the Jaccard@{k} of two random halves of one distribution's samples.",
        "",
        _table(pair_matrix(agreement, f"jaccard@{k}", floor[f"split_half_jaccard@{k}"]).reset_index(names="distribution")),
        "",
        "Pairs whose disagreement is beyond resampling noise (permutation test on sample labels):",
        "",
        _table(permutation[["a", "b", "spearman", "p_spearman", f"p_jaccard@{k}"]]),
        "",
        "## Recommended drop sets",
        "",
        "Worst-case regret is the most importance (summed 1 − cos) a set drops beyond the best set of its size, over all distributions.",
        "",
        _table(recommended(tables, sets), 4),
        "",
        "## Does consensus generalise to an unseen distribution?",
        "",
        "Leave one distribution out, build the consensus from the rest, and measure its regret on the one left out, beside the other "
        "distributions' own sets (mean, best, worst) and a random set (expected).",
        "",
        _table(tables["leave_one_out"].drop(columns=["drop_set"]), 4),
        "",
    ]
    transfer = tables.get("transfer")
    if transfer is not None and len(transfer):
        pivot = transfer.pivot_table(index="drop_set", columns="distribution", values="ppl_ratio", sort=False).reset_index()
        lines += [
            "## Pruned models on held-out text",
            "",
            f"Perplexity on each distribution's held-out documents ({settings.transfer_samples} windows × {settings.transfer_seq_len} tokens), "
            "as a ratio to the unpruned model (1.00 = no loss). `random` is the mean over seeds.",
            "",
            _table(pivot),
            "",
            _transfer_verdict(transfer),
            "",
        ]
    accuracy = tables.get("accuracy")
    if accuracy is not None and len(accuracy):
        chosen = accuracy[(accuracy["metric"] == "acc_norm") | ~accuracy["task"].isin(accuracy.loc[accuracy["metric"] == "acc_norm", "task"])]
        pivot = chosen.pivot_table(index="drop_set", columns="task", values="value", sort=False).reset_index()
        limit = f"first {settings.task_limit} examples per task" if settings.task_limit else "all examples"
        lines += ["## Zero-shot accuracy", "", f"lm-evaluation-harness, 0-shot, {limit} (acc_norm where the task defines it, else acc); "
                  f"standard error about ±{chosen['stderr'].max():.2f}.", "", _table(pivot), ""]
    lines += [
        "## How many samples does a stable ranking need?",
        "",
        _table(convergence[["distribution", "module", "n_available", "target_spearman", "n_required"]]),
        "",
        "## Figures",
        "",
    ]
    pngs = figure_list(figures)
    lines += [f"![{p.stem}](figures/{p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, text.encode())
    html_body = markdown_to_html(text)
    for p in pngs:
        html_body = html_body.replace(f'src="figures/{p.name}"', f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"')
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    atomic_write_bytes(html_path, f"<!doctype html><html><head><meta charset='utf-8'><title>calibdrop report</title><style>{style}</style></head><body>{html_body}</body></html>".encode())
    return [md_path, html_path]


def _transfer_verdict(transfer: pd.DataFrame) -> str:
    """Whether consensus sets lose less perplexity on held-out distributions than single-distribution sets."""
    lines = []
    for prefix in sorted({d.split(":")[0] for d in transfer["drop_set"] if ":" in d}):
        part = transfer[transfer["drop_set"].str.startswith(prefix + ":")]
        singles = part[part["drop_set"].str.contains(":own:")]
        other = singles[singles.apply(lambda r: r["drop_set"].split(":own:")[1] != r["distribution"], axis=1)]
        for method in ("borda", "minimax"):
            chosen = part[part["drop_set"] == f"{prefix}:{method}"]
            if len(chosen) and len(other):
                lines.append(f"{prefix} {method}: mean perplexity ratio {chosen['ppl_ratio'].mean():.3f}, worst {chosen['ppl_ratio'].max():.3f}; "
                             f"single-distribution sets on the other distributions: mean {other['ppl_ratio'].mean():.3f}, worst {other['ppl_ratio'].max():.3f}.")
    return "  \n".join(lines)

