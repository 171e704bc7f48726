"""The metric is an axis of the whole study: a newly registered metric made primary flows through own and random sets,
the paired comparisons, the check, routing, the Verdict and every report section, with cosine nowhere in the run."""

import pytest

from analysis.errors import InputError
from analysis.importance.metrics import METRICS, register_metric
from analysis.pipeline import RunSettings, run

from conftest import PIPELINE_DISTRIBUTIONS

METRIC = "alignment"
# Sections that rank by no proxy metric: the greedy paths are by real loss; figures are not drawn here.
METRIC_FREE = ("Greedy drop sets by real calibration loss", "Figures")
SETTINGS = dict(
    distributions=PIPELINE_DISTRIBUTIONS, subsets=False, metrics=(METRIC, "ablation"), primary_metric=METRIC,
    samples=4, seq_len=32, ablation_samples=4, ablation_seq_len=16, greedy_shortlist=2, n_boot=20, n_perm=20,
    budgets={"attn": (2,), "mlp": (1,), "block": (1,), "joint": (2,)}, transfer_modules=("attn", "mlp"),
    transfer_k=(2,), transfer_samples=4, transfer_seq_len=32, random_seeds=(0,), tasks=(), accuracy_sets=(), unseen=(),
    lodo=False,
)


@pytest.fixture(scope="module")
def primary_run(tiny_dir, tmp_path_factory):
    """A tiny run whose only proxy is a metric registered here and made primary: ``cos(X, Y)`` itself, so it ranks
    opposite to cosine's ``1 − cos`` (its drop sets keep block 0, so the router has a prefix to read)."""
    register_metric(METRIC, lambda pair: pair.cos, label="cos(X, Y)", replace=True)
    try:
        out = tmp_path_factory.mktemp("primary-metric")
        run(str(tiny_dir), out, preset=RunSettings(**SETTINGS), progress=False, log=lambda m: None, figures=False)
        yield out
    finally:
        METRICS.pop(METRIC)


def sections(text: str) -> dict[str, str]:
    """The report's ``## `` sections by title."""
    parts = text.split("\n## ")[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


def test_every_report_section_names_the_primary_metric_and_none_names_cosine(primary_run):
    text = (primary_run / "report.md").read_text()
    assert "cosine" not in text.lower() and "1 − cos" not in text
    found = sections(text)
    expected = ("Verdict", "Recommended drop sets", "What this run resolves", "The model, the data or the metric?",
                f"Agreement between distributions and the noise floor ({METRIC})",
                f"Which modules are unimportant everywhere, and which depend on the data ({METRIC})",
                f"Drop sets by proxy regret ({METRIC})",
                f"Does a consensus generalise to an unseen distribution? ({METRIC})",
                "Pruned models on held-out text", "Paired comparisons on the same held-out windows",
                "Does a drop set hold on new data? (`calibdrop check`)",
                "One model, several drop sets: a router per input",
                f"How many samples does a stable ranking need? ({METRIC})", *METRIC_FREE)
    assert set(expected) <= set(found), set(expected) - set(found)
    for title, body in found.items():
        if title not in METRIC_FREE:
            assert METRIC in body, title
    assert f"**{METRIC}** (cos(X, Y))" in text.split("\n## ")[0]
    verdict = found["Verdict"]
    assert f"{METRIC} rankings agree" in verdict and f"is {METRIC} the right metric?" in verdict


def test_the_study_builds_compares_checks_and_routes_on_the_primary_metrics_sets(primary_run):
    from analysis.io import read_table

    pruned = read_table(primary_run / "pruned.parquet")
    labels = set(pruned["drop_set"])
    assert {f"{METRIC}/attn-2:own:{d}" for d in PIPELINE_DISTRIBUTIONS} <= labels
    assert {f"{METRIC}/attn-2:random:0", f"{METRIC}/mlp-1:random:0", f"{METRIC}/attn-2:borda"} <= labels
    comparisons = set(read_table(primary_run / "comparisons.parquet")["comparison"])
    assert f"attn-2: {METRIC} borda vs code's own {METRIC} set" in comparisons
    assert f"attn-2: robust greedy vs {METRIC} borda" in comparisons
    assert f"mlp-1: {METRIC} borda vs random" in comparisons
    check = read_table(primary_run / "check.parquet")
    assert set(check["metric"]) == {METRIC} and len(check) == 2 * len(PIPELINE_DISTRIBUTIONS)
    routing = read_table(primary_run / "routing_paired.parquet")
    primary_family = routing[routing["family"] == ""]
    assert len(primary_family) and primary_family["a"].str.startswith(f"{METRIC}/attn-2:routed").all()
    assert (primary_family["b"] == f"{METRIC}/attn-2:borda").any()
    claims = read_table(primary_run / "claims.parquet")
    agreement = claims[claims["claim"] == "data changes the ranking"]
    assert len(agreement) and agreement["subject"].str.startswith(f"{METRIC}, ").all()


def test_a_primary_metric_outside_the_runs_proxies_is_refused(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="primary_metric 'angular' must be one of the run's proxy metrics"):
        run(str(tiny_dir), tmp_path, preset=RunSettings(**{**SETTINGS, "metrics": ("cosine", "ablation"),
                                                           "primary_metric": "angular"}), progress=False)
    with pytest.raises(InputError, match="primary_metric 'ablation'"):
        run(str(tiny_dir), tmp_path, preset=RunSettings(**{**SETTINGS, "metrics": ("cosine", "ablation"),
                                                           "primary_metric": "ablation"}), progress=False)


def test_accuracy_sets_follow_the_primary_metric_and_cosine_keeps_its_stage_key():
    from dataclasses import replace
    from types import SimpleNamespace

    from analysis.pipeline import STAGES
    from analysis.presets import PRESETS
    from analysis.steps.core import Study

    stage = next(stage for stage in STAGES if stage.name == "accuracy")

    def key(settings):
        study = SimpleNamespace(settings=settings, base=[], manifests={}, unseen_manifests={}, keys={})
        return Study.key(study, stage)

    default = replace(PRESETS["default"], accuracy_sets=("none", "{primary}/attn-8:borda", "{answers}",
                                                         "ablation/attn-8:greedy:robust"))
    spelled = replace(default, accuracy_sets=("none", "cosine/attn-8:borda", "{answers}",
                                              "ablation/attn-8:greedy:robust"))
    assert default.accuracy_labels == spelled.accuracy_sets and key(default) == key(spelled)
    other = replace(default, primary_metric=METRIC)
    assert other.accuracy_labels == ("none", f"{METRIC}/attn-8:borda", "{answers}", "ablation/attn-8:greedy:robust")
    assert key(other) != key(default)
