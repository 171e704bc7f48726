"""The report: a verdict with CIs, the recommended set by held-out loss, every module kind, flags, numeric order, a linked HTML."""

import numpy as np
import pandas as pd
import pytest

from analysis.report import sections as report
from analysis.evaluation.accuracy import accuracy_analysis, accuracy_table
from analysis.io import read_table
from analysis.pipeline import RunSettings


@pytest.fixture(scope="module")
def tiny_run(tiny_run):
    """The output folder of the session's tiny run (conftest ``tiny_run``)."""
    return tiny_run[0]


def test_recommended_set_is_the_lowest_worst_case_held_out_ratio_of_every_evaluated_kind(tiny_run):
    transfer = read_table(tiny_run / "transfer.parquet")
    worst = transfer[(transfer["distribution"] == "worst") & (transfer["drop_set"] != "none") & ~transfer["method"].str.startswith("random")]
    expected = worst.loc[worst.groupby(["module", "k"])["ppl_ratio"].idxmin()]
    text = (tiny_run / "report.md").read_text()
    section = text.split("## Recommended drop sets")[1].split("\n## ")[0]
    assert set(expected["module"]) == {"attn", "mlp", "block", "joint"}
    for row in expected.itertuples():
        assert f"| {row.module} " in section and f"{row.metric} {row.method}" in section and f"{row.ppl_ratio:.2f} [" in section
    claims = read_table(tiny_run / "claims.parquet")
    kinds = {"recommended set", "proxy vs ground truth", "data or metric", "data changes the ranking"}
    assert kinds <= set(claims["claim"])
    recommended = claims[claims["claim"] == "recommended set"]
    assert len(recommended) == 4 and section.count("resolved**") == 4
    assert (recommended["needs"] == "").tolist() == recommended["resolved"].tolist()


def test_the_verdict_carries_cis_and_every_module_kind_has_its_section(tiny_run):
    text = (tiny_run / "report.md").read_text()
    verdict = text.split("## Verdict")[1].split("\n## ")[0]
    assert verdict.count("[") >= 8 and "noise floor" in verdict
    for module in ("attn", "mlp", "block", "joint"):
        assert f"### {module}, k = " in text and f"**{module}**" in verdict


def test_html_has_a_table_of_contents_linking_sections_and_captioned_figures(tiny_run):
    html = (tiny_run / "report.html").read_text()
    assert 'class="toc"' in html and 'href="#verdict"' in html and 'id="verdict"' in html
    assert "data:image/png;base64," in html and 'src="figures/' not in html
    assert report.CAPTIONS["transfer_matrix"].split(".")[0] in html


def test_candidates_are_ordered_as_numbers():
    assert report._numeric_order(["10", "2", "attn:10", "attn:3", "mlp:1"]) == ["2", "10", "attn:3", "attn:10", "mlp:1"]


def routing_results(ci_low: float, ci_high: float) -> report.Results:
    """A routing stage's tables with routed / borda on the mix at ratio 0.97 and the given CI."""
    summary = pd.DataFrame([
        {"drop_set": label, "distribution": where, "ppl_ratio": 1.2, "ci_low": 1.1, "ci_high": 1.3, "module": "attn", "k": 8, "layer": 2,
         "n_layers": 30, "layer_ratio": 0.1, "max_abs_static_difference": 0.0}
        for label in ("none", "cosine/attn-8:borda", "cosine/attn-8:own:code", "cosine/attn-8:routed", "cosine/attn-8:oracle")
        for where in ("code", "worst", "mean", "mix")])
    paired = pd.DataFrame([{"comparison": f"routed vs {b}", "a": "cosine/attn-8:routed", "b": f"cosine/attn-8:{b}", "distribution": "mix",
                            "effect": -0.03, "ratio": 0.97, "ci_low": ci_low, "ci_high": ci_high, "p_value": 0.01} for b in ("borda", "own:code")])
    accuracy = pd.DataFrame([{"distribution": "all", "n_windows": 20, "correct": 15, "accuracy": 0.75, "ci_low": 0.51, "ci_high": 0.91},
                             {"distribution": "code", "n_windows": 20, "correct": 15, "accuracy": 0.75, "ci_low": 0.51, "ci_high": 0.91}])
    return report.Results({}, RunSettings(), pd.DataFrame(), {"routing": summary, "routing_paired": paired, "routing_accuracy": accuracy}, [])


@pytest.mark.parametrize("ci, verdict", [((0.95, 0.99), "beats"), ((0.94, 1.01), "does not beat"), ((1.01, 1.02), "loses to")])
def test_routing_verdict_follows_the_paired_ci_against_the_consensus(ci, verdict):
    text = "\n".join(report.section_routing(routing_results(*ci)))
    ratio = f"0.970 [{ci[0]:.3f}, {ci[1]:.3f}] (p = 0.01"
    assert f"**Routing {verdict} the consensus set**: routed / borda on the pooled mix {ratio}" in text
    assert "| own:code " in text and "| oracle " in text and "Router accuracy 75% [51%, 91%] over 20 windows" in text


def test_a_drop_set_touching_block_0_gives_no_router_and_says_why():
    summary = pd.DataFrame([{"module": "attn", "k": 8, "note": "drop set 'x' drops a module of block 0"}])
    results = report.Results({}, RunSettings(), pd.DataFrame(), {"routing": summary}, [])
    assert "No router at attn-8: drop set 'x' drops a module of block 0." in report.section_routing(results)


def test_check_section_counts_the_kept_sets_per_role():
    rows = [{"distribution": d, "checked": role, "metric": "cosine", "module": "attn", "k": 8, "n_texts": 32, "spearman": 0.9, "noise_floor": 0.95,
             "noise_floor_ci_low": 0.9, "noise_floor_ci_high": 0.98, "p_permutation": 0.2, "drift": False, "excess": 0.05, "verdict": verdict}
            for d, role, verdict in [("code", "own set", "keep"), ("math", "own set", "keep"), ("code", "consensus without it", "recalibrate"),
                                     ("math", "consensus without it", "keep")]]
    results = report.Results({}, RunSettings(), pd.DataFrame(), {"check": pd.DataFrame(rows)}, [])
    lines = report.section_check(results)
    assert "- **own set**: kept on 2 of 2 distributions." in lines
    assert "- **consensus without it**: kept on 1 of 2 distributions; code: recalibrate." in lines


def test_a_baseline_not_clearly_above_chance_is_excluded():
    # boolq: 96 of 200 against chance 0.5 (excluded); arc_easy: 120 of 200 against 0.25 (kept)
    items = pd.DataFrame([{"drop_set": "none", "task": task, "subtask": task, "item": f"{task}:{i}", "correct": float(i < right),
                           "correct_norm": float("nan"), "subtask_items": 200} for task, right in (("boolq", 96), ("arc_easy", 120))
                          for i in range(200)])
    paired, tasks = accuracy_analysis(items, [], task_limit=200)
    tables = {"accuracy": accuracy_table(items), "accuracy_paired": paired, "accuracy_tasks": tasks}
    results = report.Results({}, RunSettings(task_limit=200), pd.DataFrame(), tables, [])
    excluded = [line for line in report.section_accuracy(results) if line.startswith("- **Excluded**")]
    assert len(excluded) == 1 and "boolq" in excluded[0] and "0.480 on 200 items" in excluded[0]


def resolution_results(minimax_gap: float, noise: float) -> report.Results:
    """Held-out tables of one budget from constructed windows: borda, minimax ``minimax_gap`` worse per token, the
    last-8 baseline and a random set far worse, per-window noise ``noise``."""
    from analysis.evaluation.heldout import transfer_summary, worst_case_replicates
    from analysis.study import recommend
    from analysis.study.dropsets import parse_label

    borda, minimax, last, random = ("cosine/attn-8:borda", "cosine/attn-8:minimax", "depth/attn-8:last",
                                    "cosine/attn-8:random:0")
    effects = {"none": 0.0, borda: 0.10, minimax: 0.10 + minimax_gap, last: 0.5, random: 1.0}
    rng = np.random.default_rng(0)
    base = 300 + rng.normal(0, 20, 32)
    windows = pd.DataFrame([{"drop_set": label, "distribution": d, "window": w, "n_tokens": 100,
                             "nll_sum": base[w] + 100 * (effect + (noise * rng.standard_normal() if effect else 0))}
                            for d in ("code", "math") for label, effect in effects.items() for w in range(32)])
    members = [[], list(range(8)), list(range(1, 9)), list(range(22, 30)), list(range(2, 10))]
    pruned = pd.DataFrame([{"drop_set": label, "indices": m, **parse_label(label)} for label, m in zip(effects, members)])
    transfer = transfer_summary(windows, n_boot=200)
    worst, n = worst_case_replicates(windows, n_boot=200)
    groups = recommend.set_groups(worst, recommend.distinct_sets(pruned), n_windows=n)
    tables = {"transfer": transfer, "pruned": pruned, "set_groups": groups}
    return report.Results({}, RunSettings(budgets={"attn": (8,)}), pd.DataFrame(), tables, [])


def test_the_verdict_recommends_a_set_only_when_it_is_separated_and_weighs_it_against_the_baselines():
    verdict = "\n".join(report.section_verdict(resolution_results(0.05, 0.01)))
    assert "- **attn-8 on held-out text: recommended**. drop 0, 1, 2, 3, 4, 5, 6, 7 (cosine borda)" in verdict
    assert "Against dropping the last 8: loses less (resolved)" in verdict
    verdict = "\n".join(report.section_verdict(resolution_results(0.001, 0.05)))
    assert "not resolved**" in verdict and "held-out windows per distribution (now 32)" in verdict
    verdict = "\n".join(report.section_verdict(resolution_results(0.0, 0.002)))
    assert "equivalent group**" in verdict and "2 sets within 2% of the best" in verdict
    table = "\n".join(report.section_resolution(resolution_results(0.001, 0.05)))
    assert "| recommended set    | attn-8: cosine/attn-8:" in table and "**not resolved**" in table
    assert "| answer vs baseline | attn-8: last k: depth/attn-8:last " in table


def test_p_values_at_the_bootstrap_floor_print_as_a_bound():
    comparisons = pd.DataFrame([{"comparison": "attn-8: a vs b", "a": "cosine/attn-8:borda", "b": "cosine/attn-8:minimax",
                                 "distribution": "worst", "effect": -0.1, "ratio": 0.905, "ci_low": 0.85, "ci_high": 0.95,
                                 "p_value": 0.001, "p_floor": 0.001, "se": 0.02, "n_windows": 32}])
    results = report.Results({}, RunSettings(), pd.DataFrame(), {"comparisons": comparisons}, [])
    text = "\n".join(report.section_comparisons(results))
    assert "p ≤ 0.001" in text and "p = 0.001" not in text and "**resolved**" in text
