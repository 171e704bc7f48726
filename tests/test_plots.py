"""Figures: every plot function draws from small synthetic tables; scales fit the data; every point is labelled."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis.study import consensus
from analysis.report import plots
from analysis.study import stability
from analysis.report import study_plots
from analysis.study import validity
from analysis.study.dropsets import drop_set_family
from analysis.report.captions import CAPTIONS

DISTRIBUTIONS = ("code", "math", "chat")
LAYERS = 6


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def per_sample() -> pd.DataFrame:
    """Per-sample rows of a 6-layer model for cosine and ablation on three distributions.

    Layer 0 dominates (as in real models) and the distributions disagree on the small layers.
    """
    rng = np.random.default_rng(0)
    base = np.array([0.6, 0.05, 0.02, 0.03, 0.01, 0.2])
    shift = {"code": np.ones(LAYERS), "math": np.array([1, 1.5, 0.5, 1, 2, 1]), "chat": np.array([1, 0.7, 1.4, 0.6, 1, 1.1])}
    rows = []
    for d in DISTRIBUTIONS:
        for module in ("attn", "mlp", "block"):
            for s in range(8):
                tokens = int(rng.integers(50, 150))
                cosine = base * shift[d] * rng.uniform(0.9, 1.1, LAYERS)
                ablation = 3 * cosine + rng.normal(0, 0.01, LAYERS)
                for layer in range(LAYERS):
                    rows.append({"metric": "cosine", "distribution": d, "sample": s, "layer": layer, "module": module,
                                 "stat_sum": tokens * (1 - cosine[layer]), "n_tokens": tokens})
                    rows.append({"metric": "ablation", "distribution": d, "sample": s, "layer": layer, "module": module,
                                 "stat_sum": tokens * ablation[layer], "n_tokens": tokens})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tables(per_sample) -> dict:
    """The pipeline's tables for the cosine metric, computed by the analysis functions on the synthetic rows."""
    cosine = stability.one_metric(per_sample, "cosine")[0]
    result = stability.stability_tables(cosine, modules=("attn", "mlp", "joint"), k=(2, 3), n_boot=30, n_perm=30, n_splits=10)
    result["leave_one_out"] = consensus.leave_one_out_at_budgets(cosine, {"attn": (2,), "joint": (3,)})
    result["regret"] = pd.concat([consensus.regret_table(cosine, {s.method: list(s.indices) for s in drop_set_family(cosine, module=m, k=k).values()}, module=m).assign(k=k)
                                  for m, k in (("attn", 2), ("attn", 3), ("mlp", 2))], ignore_index=True)
    result["validity"] = validity.metric_validity(per_sample, modules=("attn", "mlp", "block"), n_boot=30)
    result["decomposition"] = validity.ranking_decomposition(per_sample, modules=("attn", "mlp"))
    return result


@pytest.fixture(scope="module")
def transfer() -> pd.DataFrame:
    """Held-out perplexity ratios of three drop sets and two random ones (far worse) on two distributions, the worst and the mean."""
    sets = {"cosine/attn-2:borda": [1.2, 1.4], "cosine/attn-2:own:code": [1.1, 1.9], "ablation/attn-2:minimax": [1.3, 1.3],
            "cosine/attn-2:random:0": [40.0, 300.0], "cosine/attn-2:random:1": [20.0, 25.0]}
    rows = [{"drop_set": "none", "distribution": d, "ppl_ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0, "metric": None, "module": None, "k": 0, "method": "none"}
            for d in ("code", "chat", "worst", "mean")]
    for name, (code, chat) in sets.items():
        metric, rest = name.split("/")
        method = rest.split(":", 1)[1]
        for d, value in (("code", code), ("chat", chat), ("worst", max(code, chat)), ("mean", (code + chat) / 2)):
            rows.append({"drop_set": name, "distribution": d, "ppl_ratio": value, "ci_low": 0.95 * value, "ci_high": 1.05 * value,
                         "metric": metric, "module": "attn", "k": 2, "method": method})
    return pd.DataFrame(rows)


def colour_limits(ax) -> tuple[float, float]:
    return ax.collections[0].norm.vmin, ax.collections[0].norm.vmax


def test_fitted_limits_known_answers():
    assert plots.fitted_limits([0.63, 0.93, 0.994]) == pytest.approx((0.6, 1.0))
    assert plots.fitted_limits([0.21, 0.5], step=0.1) == pytest.approx((0.2, 0.5))
    assert plots.fitted_limits([-0.32, 0.4]) == pytest.approx((-0.35, 0.4))
    assert plots.fitted_limits([1.0, 1.0]) == pytest.approx((0.95, 1.0))


def test_relative_importance_is_log2_ratio_to_the_row_geometric_mean():
    matrix = pd.DataFrame({"a": [1.0, 0.1], "b": [2.0, 0.1], "c": [4.0, 0.1]})
    expected = pd.DataFrame({"a": [-1.0, 0.0], "b": [0.0, 0.0], "c": [1.0, 0.0]})
    pd.testing.assert_frame_equal(plots.relative_importance(matrix), expected)
    geometric = np.exp(np.log(matrix.to_numpy()).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(plots.relative_importance(matrix).to_numpy(), np.log2(matrix.to_numpy() / geometric), atol=1e-12)


def test_ratio_ticks_lie_in_the_range():
    assert plots.ratio_ticks(1.02, 3.2) == [1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
    assert plots.ratio_ticks(20, 800) == [20.0, 50.0, 100.0, 200.0, 500.0]
    assert plots.ratio_ticks(1.5, 800) == [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
    assert plots.ratio_ticks(5, 1e5) == [10.0, 100.0, 1000.0, 10000.0, 100000.0]


def test_similarity_heatmap_scale_fits_the_data_and_marks_the_noise_floor(tables):
    attn = {name: table[table["module"] == "attn"] for name, table in tables.items() if "module" in table.columns}
    fig = plots.similarity_stability_heatmap(attn["agreement"], attn["split_half"], attn["bootstrap_pairs"])
    ax = fig.axes[0]
    values = np.concatenate([attn["agreement"]["spearman"], attn["split_half"]["reliability"]])
    low, high = colour_limits(ax)
    assert values.min() - 0.05 <= low <= values.min()
    assert low > -1, "the old −1..1 scale would make 0.6 and 0.9 look alike"
    assert high <= 1
    floor = attn["split_half"]["reliability"].min()
    colorbar_lines = [line.get_ydata()[0] for line in ax.collections[0].colorbar.ax.lines]
    assert colorbar_lines == pytest.approx([floor])
    for k_stat in ("jaccard@2", "jaccard@3"):
        fig = plots.similarity_stability_heatmap(attn["agreement"], attn["split_half"], attn["bootstrap_pairs"], statistic=k_stat)
        jaccards = np.concatenate([attn["agreement"][k_stat], attn["split_half"][f"split_half_{k_stat}"]])
        assert colour_limits(fig.axes[0])[0] == pytest.approx(plots.fitted_limits(jaccards)[0])


def test_importance_heatmap_shows_raw_on_log_scale_and_relative_per_layer(per_sample):
    cosine = stability.one_metric(per_sample, "cosine")[0]
    fig = plots.importance_heatmap(cosine, "attn")
    raw_ax, rel_ax = [ax for ax in fig.axes if ax.get_title()]
    assert isinstance(raw_ax.collections[0].norm, LogNorm)
    matrix = stability.importance_matrix(cosine, "attn")
    shown = np.asarray(rel_ax.collections[0].get_array()).reshape(matrix.shape)
    np.testing.assert_allclose(shown, plots.relative_importance(matrix).to_numpy())
    norm = rel_ax.collections[0].norm
    assert norm.vcenter == 0 and norm.vmax == pytest.approx(np.abs(shown).max())
    for ax in (raw_ax, rel_ax):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [str(c) for c in matrix.index]
        assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())


@pytest.mark.parametrize("module, candidates", [("attn", list(range(30))), ("joint", [f"{kind}:{i}" for kind in ("attn", "mlp") for i in range(30)])])
def test_membership_ticks_are_every_candidate_and_horizontal(module, candidates):
    """A 30-layer model: seaborn would thin the labels and turn them vertical, into the axis label."""
    rng = np.random.default_rng(1)
    boot = pd.DataFrame([{"module": module, "distribution": d, "candidate": c, "p_drop@8": rng.uniform()}
                         for d in DISTRIBUTIONS for c in candidates])
    fig = plots.membership_heatmap(boot, 8)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in candidates]
    assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())
    boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert all(a.y0 >= b.y1 or b.y0 >= a.y1 for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
    assert max(box.x1 for box in boxes) <= ax.get_window_extent().x0
    assert ax.yaxis.label.get_window_extent().x1 <= min(box.x0 for box in boxes), "axis label crowded by the ticks"


def test_regret_overview_labels_every_point(tables):
    regret = tables["regret"]
    fig = study_plots.regret_overview(regret)
    worst = regret.groupby(["module", "k", "drop_set"])["regret"].max()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.collections]
    assert len(panels) == worst.reset_index()[["module", "k"]].drop_duplicates().shape[0]
    labels = {round(pos): text.get_text() for pos, text in zip(panels[0].get_yticks(), panels[0].get_yticklabels())}
    for ax in panels:
        module_name, k = ax.get_title().rsplit(", k = ", 1)
        module = {name: key for key, name in plots.MODULE_NAMES.items()}[module_name]
        expected = worst.loc[(module, int(k))]
        points = ax.collections[0].get_offsets()
        assert len(points) == len(expected)
        named = {labels[round(y)]: x for x, y in points}
        assert set(named) == set(expected.index)
        for name, value in expected.items():
            assert named[name] == pytest.approx(value)


def test_regret_bars_legend_outside_and_log_axis(tables):
    loo = tables["leave_one_out"]
    fig = plots.regret_bars(loo[loo["module"] == "attn"])
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    fig.canvas.draw()
    legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= frame.x1, "the legend must not cover the bars"


def test_transfer_scale_is_robust_to_the_random_sets(transfer):
    ax = study_plots.transfer_heatmap(transfer).axes[0]
    low, high = colour_limits(ax)
    assert high == pytest.approx(1.9) and low == pytest.approx(1.1)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[-2:] == ["cosine/attn-2:random:1", "cosine/attn-2:random:0"]
    assert rows[:3] == ["ablation/attn-2:minimax", "cosine/attn-2:borda", "cosine/attn-2:own:code"]


def test_worst_case_forest_has_a_legend_of_metrics(transfer):
    fig = study_plots.worst_case_forest(transfer)
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["ablation", "cosine"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["cosine own:code", "cosine borda", "ablation minimax"]


def test_worst_case_forest_one_panel_per_kind_and_budget_with_distinct_labels(transfer):
    """Block-4 and MLP-4 share k = 4 but get a panel each (they once shared one, so "cosine borda" read twice); two
    sets of one panel with the same metric and method are told apart by their names."""
    rows = []
    for name, value in {"cosine/mlp-4:borda": 1.5, "ablation/mlp-4:borda": 1.4, "cosine/block-4:borda": 1.7,
                        "ablation/block-4:borda": 1.6, "ablation/block-4:greedy:code": 1.2,
                        "ablation/block-4:greedy:math": 1.3}.items():
        metric, rest = name.split("/")
        module, method = rest.split("-", 1)[0], rest.split(":", 1)[1]
        rows.append({"drop_set": name, "distribution": "worst", "ppl_ratio": value, "ci_low": 0.9 * value,
                     "ci_high": 1.1 * value, "metric": metric, "module": module, "k": 4,
                     "method": "greedy" if method.startswith("greedy") else method})
    fig = study_plots.worst_case_forest(pd.DataFrame(rows))
    titles = [ax.get_title() for ax in fig.axes]
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert len(titles) == 2 and titles[0].startswith("MLP") and titles[1].startswith("block")
    assert labels[0] == ["cosine borda", "ablation borda"]
    assert labels[1] == ["cosine borda", "ablation borda", "ablation greedy (ablation/block-4:greedy:math)",
                         "ablation greedy (ablation/block-4:greedy:code)"]


def test_validity_scale_fits_the_data(tables):
    fig = study_plots.validity_heatmap(tables["validity"])
    low, high = colour_limits(fig.axes[0])
    assert (low, high) == pytest.approx(plots.fitted_limits(tables["validity"]["spearman"], step=0.1))


def test_every_figure_function_returns_a_figure_and_has_a_caption(per_sample, tables, transfer, tmp_path):
    cosine = stability.one_metric(per_sample, "cosine")[0]
    written = plots.stability_figures(cosine, tables, tmp_path, 3)
    stems = {path.stem for path in written}
    assert {"similarity_attn_spearman", "similarity_attn_jaccard3", "importance_joint", "membership_mlp", "regret_attn", "regret_joint"} <= stems
    figures = {
        "transfer_matrix": study_plots.transfer_heatmap(transfer),
        "transfer_worst_case": study_plots.worst_case_forest(transfer),
        "regret_consensus_vs_single": study_plots.regret_overview(tables["regret"]),
        "metric_validity": study_plots.validity_heatmap(tables["validity"]),
        "proxy_vs_ablation": study_plots.proxy_vs_ablation(per_sample),
        "ranking_decomposition": study_plots.decomposition_bars(tables["decomposition"]),
        "profile_joint": plots.importance_profiles(tables["bootstrap_importance"][tables["bootstrap_importance"]["module"] == "joint"]),
        "convergence_attn": plots.convergence_plot(tables["convergence"][tables["convergence"]["module"] == "attn"],
                                                   tables["convergence_summary"]),
    }
    assert all(isinstance(fig, Figure) for fig in figures.values())
    for stem in stems | set(figures):
        assert len(CAPTIONS[stem]) > 80, stem


def test_linear_threshold_known_answers():
    assert plots.linear_threshold(pd.Series([0.0, 0.0042, 0.2])) == pytest.approx(1e-3)
    assert plots.linear_threshold(pd.Series([0.0, 1e-7, 0.5])) == pytest.approx(1e-4)
    assert plots.linear_threshold(pd.Series([0.0, 0.0])) == pytest.approx(1e-3)
    assert plots.linear_threshold(pd.Series([-0.02, 0.5])) == pytest.approx(1e-2)


def test_proxy_vs_ablation_uses_log_unless_a_drop_lowers_the_loss(per_sample):
    assert [ax.get_yscale() for ax in study_plots.proxy_vs_ablation(per_sample).axes[:3]] == ["log"] * 3
    lowered = per_sample.copy()
    mask = (lowered["metric"] == "ablation") & (lowered["module"] == "mlp") & (lowered["layer"] == 4)
    lowered.loc[mask, "stat_sum"] = -lowered.loc[mask, "n_tokens"] * 0.01
    assert [ax.get_yscale() for ax in study_plots.proxy_vs_ablation(lowered).axes[:3]] == ["log", "symlog", "log"]


def test_regret_bars_mark_zero_regret(tables):
    loo = tables["leave_one_out"].copy()
    loo.loc[loo.index[0], "consensus_regret"] = 0.0
    ax = plots.regret_bars(loo[loo["module"] == loo["module"].iloc[0]]).axes[0]
    assert [t.get_text() for t in ax.texts].count("0") == (loo[loo["module"] == loo["module"].iloc[0]]["consensus_regret"] == 0).sum()


def test_non_cosine_metric_is_labelled_and_drawn_where_values_can_be_negative(per_sample):
    ablation = stability.one_metric(per_sample, "ablation")[0].copy()
    mask = (ablation["layer"] == 4) & (ablation["distribution"] == "chat")
    ablation.loc[mask, "stat_sum"] = -ablation.loc[mask, "n_tokens"] * 0.01
    fig = plots.importance_heatmap(ablation, "attn")
    raw_ax, rel_ax = [ax for ax in fig.axes if ax.get_title()]
    label = raw_ax.collections[0].colorbar.ax.get_ylabel()
    assert "ΔNLL" in label and "linear" in label
    assert "blank" in rel_ax.get_title()
    boot = stability.stability_tables(ablation, modules=("attn",), k=(2,), n_boot=20, n_perm=20, n_splits=5)["bootstrap_importance"]
    ax = plots.importance_profiles(boot).axes[0]
    assert ax.get_yscale() == "symlog" and "ΔNLL" in ax.get_ylabel()
