"""`calibdrop summary` on small fake run folders whose answers are known by construction."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.artifacts import TABLE_COLUMNS
from analysis.report import summary as cross
from analysis.cli import main
from analysis.study.dropsets import parse_label
from analysis.errors import InputError
from analysis.io import provenance, read_table, write_table

DISTRIBUTIONS = ["d1", "d2", "d3"]


PLACEHOLDERS = {"str": "x", "int": 0, "float": 0.0, "finite": 0.0, "bool": False, "list": []}


def _write(folder, name, frame, model):
    """The table with every column its stage writes that this test does not set at a placeholder of its kind
    (:data:`analysis.artifacts.TABLE_COLUMNS`: the reader checks them), and its sidecar."""
    missing = {column: PLACEHOLDERS[kind.rstrip("?")] for column, kind in TABLE_COLUMNS[name].items()
               if column not in frame}
    frame = frame.assign(**{column: [value] * len(frame) for column, value in missing.items()})
    write_table(frame, folder / f"{name}.parquet", provenance(kind=name, model=model))


def _scores(n_layers):
    """Cosine importance ``(layer + 1) * (1 + distribution index)`` for attn and mlp, ablation for attn."""
    rows = [{"metric": metric, "distribution": d, "module": module, "layer": layer, "importance": (layer + 1) * (1 + i)}
            for metric, modules in (("cosine", ("attn", "mlp")), ("ablation", ("attn",)))
            for i, d in enumerate(DISTRIBUTIONS) for module in modules for layer in range(n_layers)]
    return pd.DataFrame(rows)


def _pairs():
    """Three pairs: ρ 0.9 [0.85, 0.93], 0.5 [0.4, 0.6], 0.7 [0.6, 0.82]; Jaccard@2 1, 0, 1/3."""
    return pd.DataFrame({
        "metric": "cosine", "module": "attn", "a": ["d1", "d1", "d2"], "b": ["d2", "d3", "d3"],
        "spearman": [0.9, 0.5, 0.7], "spearman_ci_low": [0.85, 0.4, 0.6], "spearman_ci_high": [0.93, 0.6, 0.82],
        "jaccard@2": [1.0, 0.0, 1 / 3], "jaccard@2_ci_low": [1.0, 0.0, 0.0], "jaccard@2_ci_high": [1.0, 0.2, 0.5],
    })


def _split_half():
    """Noise floors: cosine reliability 0.95, 0.80, 0.99, Jaccard@2 1, 0.5, 1; ablation reliability 0.6, 0.7, 0.8."""
    cosine = pd.DataFrame({"metric": "cosine", "distribution": DISTRIBUTIONS, "module": "attn", "reliability": [0.95, 0.80, 0.99],
                           "split_half_jaccard@2": [1.0, 0.5, 1.0]})
    truth = pd.DataFrame({"metric": "ablation", "distribution": DISTRIBUTIONS, "module": "attn", "reliability": [0.6, 0.7, 0.8],
                          "split_half_jaccard@2": [1.0, 1.0, 1.0]})
    return pd.concat([cosine, truth], ignore_index=True)


def _drop_sets():
    """Own attn sets of size 2: d1 {1, 2}, d2 {2, 3}, d3 {2, 1}; a Borda set; joint own sets {attn:2, mlp:0} and {attn:2, mlp:1}."""
    rows = [{"metric": "cosine", "module": "attn", "k": 2, "drop_set": f"own:{d}", "indices": members}
            for d, members in zip(DISTRIBUTIONS, (["1", "2"], ["2", "3"], ["2", "1"]))]
    rows.append({"metric": "cosine", "module": "attn", "k": 2, "drop_set": "borda", "indices": ["1", "2"]})
    rows += [{"metric": "cosine", "module": "joint", "k": 2, "drop_set": f"own:{d}", "indices": members}
             for d, members in zip(DISTRIBUTIONS[:2], (["attn:2", "mlp:0"], ["attn:2", "mlp:1"]))]
    return pd.DataFrame(rows)


def _validity():
    return pd.DataFrame({"distribution": DISTRIBUTIONS, "module": "attn", "metric": "cosine", "spearman": [0.3, 0.6, 0.9],
                         "spearman_ci_low": [0.1, 0.5, 0.8], "spearman_ci_high": [0.5, 0.7, 0.95]})


def _transfer():
    labels = ["none", "cosine/attn-2:borda", "cosine/attn-2:own:d1", "ablation/attn-2:greedy:robust", "cosine/attn-2:random:0",
              "cosine/attn-2:minimax"]
    ratios = [1.0, 1.5, 2.0, 1.2, 50.0, 1.5]
    worst = pd.DataFrame({"drop_set": labels, "distribution": "worst", "ppl_ratio": ratios, "ci_low": [r * 0.9 for r in ratios],
                          "ci_high": [r * 1.1 for r in ratios]})
    other = worst.assign(distribution="d1", ppl_ratio=1.0)
    table = pd.concat([worst, other], ignore_index=True)
    parts = pd.DataFrame([parse_label(label) for label in table["drop_set"]])
    return pd.concat([table, parts], axis=1)


def _comparisons():
    return pd.DataFrame({
        "comparison": ["borda vs d1's own", "borda vs d1's own", "robust vs borda"],
        "a": ["cosine/attn-2:borda", "cosine/attn-2:borda", "ablation/attn-2:greedy:robust"],
        "b": ["cosine/attn-2:own:d1", "cosine/attn-2:own:d1", "cosine/attn-2:borda"],
        "distribution": ["worst", "d1", "worst"], "effect": [math.log(0.75), 0.0, math.log(1.3)],
        "ratio": [0.75, 1.0, 1.3], "ci_low": [0.6, 0.9, 1.1], "ci_high": [0.9, 1.1, 1.5], "p_value": [0.001, 0.9, 0.01],
    })


def fake_run(folder, spec, n_layers, *, finished=True):
    """A run folder of model ``spec``; ``finished=False`` leaves out what a run writes after the drop sets."""
    folder.mkdir(parents=True)
    model = {"spec": spec, "family": "llama", "n_layers": n_layers, "weights_sha256": f"sha-{spec}"}
    for name, frame in (("scores", _scores(n_layers)), ("bootstrap_pairs", _pairs()), ("split_half", _split_half()), ("drop_sets", _drop_sets())):
        _write(folder, name, frame, model)
    if finished:
        for name, frame in (("validity", _validity()), ("transfer", _transfer()), ("comparisons", _comparisons())):
            _write(folder, name, frame, model)
    return folder


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "big", "model-a", 5), fake_run(tmp_path / "small", "model-b", 3, finished=False)]


def test_agreement_against_noise_floor(runs):
    table = cross.summary(runs)["agreement"].set_index(["model", "statistic"])
    rho = table.loc[("model-a", "spearman")]
    assert rho["mean"] == pytest.approx(0.7)
    assert (rho["min"], rho["min_pair"], rho["min_ci_low"], rho["min_ci_high"]) == (0.5, "d1–d3", 0.4, 0.6)
    assert rho["floor_mean"] == pytest.approx((0.95 + 0.80 + 0.99) / 3)
    assert rho["floor_min"] == 0.80
    # ceilings sqrt(floor_a floor_b): d1–d2 0.872 (CI up to 0.93: within noise), d1–d3 0.970 (0.6: beyond),
    # d2–d3 0.890 (0.82: beyond)
    assert rho["beyond_noise"] == 2
    jac = table.loc[("model-a", "jaccard@2")]
    assert jac["mean"] == pytest.approx(4 / 9)
    # d1–d3: 0.2 < sqrt(1 · 1); d2–d3: 0.5 < sqrt(0.5 · 1) = 0.707; d1–d2: 1.0 is not below 0.707
    assert jac["beyond_noise"] == 2
    assert set(table.index.get_level_values("model")) == {"model-a", "model-b"}


def test_unimportant_on_every_distribution_with_relative_depth(runs):
    table = cross.summary(runs)["unimportant"]
    attn = table[(table["model"] == "model-a") & (table["module"] == "attn")].set_index("layer")
    assert attn["n_sets"].to_dict() == {1: 2, 2: 3, 3: 1}
    assert attn.loc[2, "every_distribution"] and not attn.loc[1, "every_distribution"]
    assert attn.loc[2, "relative_depth"] == pytest.approx(2 / 4)
    small = table[(table["model"] == "model-b") & (table["module"] == "attn")].set_index("layer")
    assert small.loc[2, "relative_depth"] == pytest.approx(1.0)
    joint = table[(table["model"] == "model-a") & (table["module"] == "joint")].set_index("candidate")
    assert joint.loc["attn:2", "every_distribution"] and joint.loc["attn:2", "layer"] == 2
    assert joint.loc["mlp:1", "n_sets"] == 1 and joint.loc["mlp:1", "n_distributions"] == 2


def test_importance_on_relative_depth(runs):
    table = cross.summary(runs)["importance"]
    row = table[(table["model"] == "model-b") & (table["module"] == "attn") & (table["distribution"] == "d3") & (table["metric"] == "cosine")]
    assert row["relative_depth"].tolist() == [0.0, 0.5, 1.0]
    assert row["importance"].tolist() == [3, 6, 9]


def test_validity_and_ground_truth_reliability(runs):
    table = cross.summary(runs)["validity"]
    assert table["model"].tolist() == ["model-a"]  # the unfinished run has no validity table
    row = table.iloc[0]
    assert row["mean_spearman"] == pytest.approx(0.6)
    assert (row["min_spearman"], row["min_distribution"], row["min_ci_low"]) == (0.3, "d1", 0.1)
    assert (row["max_spearman"], row["max_distribution"], row["max_ci_high"]) == (0.9, "d3", 0.95)
    assert row["ground_truth_reliability"] == pytest.approx(0.7)


def test_heldout_ranks_methods_without_random_sets(runs):
    table = cross.summary(runs)["heldout"].set_index("drop_set")
    assert set(table["model"]) == {"model-a"}
    assert "none" not in table.index
    assert table.loc["ablation/attn-2:greedy:robust", "rank"] == 1
    assert table.loc["ablation/attn-2:greedy:robust", "kind"] == "robust greedy"
    assert table.loc["cosine/attn-2:borda", "rank"] == table.loc["cosine/attn-2:minimax", "rank"] == 2
    assert table.loc["cosine/attn-2:own:d1", "rank"] == 4
    assert pd.isna(table.loc["cosine/attn-2:random:0", "rank"])


def test_comparison_winner_beyond_noise(runs):
    table = cross.summary(runs)["comparisons"]
    assert table["winner"].tolist() == ["a", "neither", "b"]
    assert table[["a_kind", "b_kind"]].iloc[0].tolist() == ["consensus", "single"]


def test_same_model_twice_is_labelled_by_folder(tmp_path):
    first = fake_run(tmp_path / "seed0", "model-a", 4)
    second = fake_run(tmp_path / "seed1", "model-a", 4, finished=False)
    assert cross.summary([first, second])["models"]["model"].tolist() == ["model-a (seed0)", "model-a (seed1)"]


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scores.parquet"):
        cross.summary([tmp_path / "empty"])
    with pytest.raises(InputError, match="is not a folder"):
        cross.summary([tmp_path / "missing"])


def test_cli_writes_tables_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "summary"
    assert main(["summary", *map(str, runs), "--out", str(out)]) == 0
    agreement = read_table(out / "summary_agreement.parquet")
    assert agreement.attrs["provenance"]["results"] == [str(r) for r in runs]
    assert np.isclose(agreement.query("model == 'model-a' and statistic == 'spearman'")["mean"].item(), 0.7)
    for figure in ("summary_importance_attn", "summary_consensus_vs_single"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 0
    assert main(["summary", str(tmp_path / "nowhere"), "--out", str(tmp_path / "other")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_forest_needs_comparisons(runs):
    tables = cross.summary(runs[1:])
    assert tables["comparisons"].empty
    with pytest.raises(InputError, match="no consensus-vs-single"):
        cross.consensus_forest(pd.DataFrame(columns=["model", "a", "b", "a_kind", "b_kind", "distribution", "ratio", "ci_low", "ci_high"]))


def test_claims_of_every_run_that_has_them(tmp_path):
    folder = fake_run(tmp_path / "a", "model-a", 5)
    claims = pd.DataFrame({"claim": ["recommended set"], "module": ["attn"], "k": [2], "subject": ["cosine/attn-2:borda"],
                           "finding": ["no single best"], "resolved": [False], "needs": ["about 90 held-out windows"]})
    _write(folder, "claims", claims, {"spec": "model-a", "n_layers": 5})
    table = cross.summary([folder, fake_run(tmp_path / "b", "model-b", 3)])["claims"]
    assert table["model"].tolist() == ["model-a"] and table.columns[0] == "model" and not table["resolved"].any()
