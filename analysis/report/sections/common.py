"""What every section reads (:class:`Results`) and the formatting and tables several sections share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import markdown
import pandas as pd

from ...study import resolution
from ...study.dropsets import method_family, parse_label
from ...study.tables import tables_of_metric


@dataclass
class Results:
    """What the report reads: the model record, the settings, the per-sample scores, the tables, the figure files and
    the tables the run lists but that were left out, with why (``missing`` or ``stale``)."""

    model: dict
    settings: object
    scores: pd.DataFrame
    tables: dict
    figures: list[Path]
    left_out: dict = field(default_factory=dict)

    def table(self, name: str, metric: str | None = None) -> pd.DataFrame:
        """Table ``name`` (empty when absent), restricted to ``metric`` when given and the table has that column."""
        frame = self.tables.get(name)
        if frame is None or not len(frame):
            return pd.DataFrame()
        return tables_of_metric({name: frame}, metric)[name] if metric else frame

    @property
    def metric(self) -> str:
        """The primary metric (``settings.primary_metric``), which the single-metric sections rank by."""
        return self.settings.primary_metric

    @property
    def modules(self) -> list[str]:
        return list(self.settings.budgets)

    def k(self, module: str) -> int:
        return max(self.settings.budgets[module])


def markdown_to_html(text: str) -> str:
    """HTML of the report's Markdown (tables, a table of contents at ``[TOC]``, section anchors), with any raw HTML
    in it (a model spec, a distribution name) escaped as text."""
    converter = markdown.Markdown(extensions=["tables", "toc"], extension_configs={"toc": {"toc_depth": "2-3"}})
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.round(digits).to_markdown(index=False)


def _names(values) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _numeric_order(values) -> list:
    """Candidates in numeric order (``2, 10, attn:3, mlp:3``), never as text (``10`` before ``2``)."""
    def key(value):
        kind, _, index = str(value).rpartition(":")
        return (kind, int(index)) if index.isdigit() else (kind, 10**9)
    return sorted(values, key=key)


def ranked_sets(results: Results) -> pd.DataFrame:
    """Every evaluated drop set by worst-case held-out perplexity ratio (best first, per module and budget), with
    its median and mean over distributions (the median is robust where one distribution dominates)."""
    transfer = results.table("transfer")
    if not len(transfer):
        return pd.DataFrame()
    per = transfer[~transfer["distribution"].isin(["worst", "mean"])]
    median = per.groupby("drop_set")["ppl_ratio"].median()
    mean = transfer[transfer["distribution"] == "mean"].set_index("drop_set")["ppl_ratio"]
    worst = resolution.worst_case(transfer).copy()
    worst["family"] = worst["method"].map(method_family)
    worst["worst ratio [95% CI]"] = [_ci(r.ppl_ratio, r.ci_low, r.ci_high) for r in worst.itertuples()]
    worst["median ratio"] = worst["drop_set"].map(median)
    worst["mean ratio"] = worst["drop_set"].map(mean)
    return worst


def _resolved(flag: bool) -> str:
    return "**resolved**" if flag else "**not resolved**"


def claims(results: Results) -> pd.DataFrame:
    """The run's ``claims`` table, or the claims its other tables support (a run saved before the resolution stage)."""
    table = results.table("claims")
    if len(table):
        return table
    s = results.settings
    return resolution.claims_table(results.tables, truth_tokens=s.truth_tokens,
                                   heldout_windows=s.transfer_samples, metric=results.metric)


def _set_name(label: str) -> str:
    """``cosine/attn-8:borda`` → ``cosine borda``."""
    parts = parse_label(label)
    return f"{parts['metric']} {parts['method']}"


def _claim_line(claim) -> str:
    """``"**resolved**"`` or ``"**not resolved** at this run's budget; what would resolve it: <needs>"``."""
    if claim.resolved:
        return _resolved(True)
    return f"{_resolved(False)} at this run's budget; what would resolve it: {claim.needs}"
