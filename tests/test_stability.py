from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.study import consensus
from analysis.study import stability
from analysis.errors import InputError


def aggregate_table(columns: dict[str, list[float]], module="attn") -> pd.DataFrame:
    rows = [{"distribution": d, "layer": i, "module": module, "importance": v} for d, values in columns.items() for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def per_sample_table(means: dict[str, np.ndarray], n_samples: int, noise: float, seed: int = 0) -> pd.DataFrame:
    """Synthetic per-sample rows: sample s of distribution d has importance means[d] + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, mu in means.items():
        for s in range(n_samples):
            tokens = int(rng.integers(50, 150))
            per_sample = mu + rng.normal(0, noise, size=len(mu))
            for layer, value in enumerate(per_sample):
                rows.append({"distribution": d, "sample": s, "layer": layer, "module": "attn", "stat_sum": tokens * (1 - value), "n_tokens": tokens})
    return pd.DataFrame(rows)


HAND = {"A": [0.1, 0.2, 0.3, 0.4], "B": [0.2, 0.1, 0.4, 0.3], "C": [0.4, 0.3, 0.1, 0.2]}


def test_identical_rankings_agree_perfectly_and_reversed_disagree():
    values = [0.05, 0.3, 0.1, 0.2, 0.4, 0.15, 0.25, 0.35]
    same = stability.rank_agreement(aggregate_table({"a": values, "b": [2 * v for v in values]}), k=(2, 4)).iloc[0]
    assert same[["spearman", "kendall_tau_b", "weighted_tau", "jaccard@2", "jaccard@4"]].tolist() == pytest.approx([1, 1, 1, 1, 1])
    reversed_ = stability.rank_agreement(aggregate_table({"a": values, "b": [-v for v in values]}), k=(4,)).iloc[0]
    assert reversed_[["spearman", "kendall_tau_b", "weighted_tau"]].tolist() == pytest.approx([-1, -1, -1])
    assert reversed_["jaccard@4"] == 0


def test_agreement_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.random(12), rng.random(12)
    row = stability.rank_agreement(aggregate_table({"a": list(a), "b": list(b)}), k=(3,)).iloc[0]
    assert row["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert row["kendall_tau_b"] == pytest.approx(stats.kendalltau(a, b).statistic)
    assert row["weighted_tau"] == pytest.approx(stats.weightedtau(-a, -b).statistic)
    x, y = rng.random((5, 12)), rng.random((5, 12))
    np.testing.assert_allclose(stability.rowwise_spearman(x, y), [stats.spearmanr(p, q).statistic for p, q in zip(x, y)])


def test_weighted_tau_weighs_the_least_important_most():
    base = list(range(1, 11))
    swap_bottom = [2, 1, *base[2:]]
    swap_top = [*base[:8], 10, 9]
    table = aggregate_table({"base": base, "bottom": swap_bottom, "top": swap_top})
    rows = stability.rank_agreement(table, k=(2,)).set_index(["a", "b"])
    assert rows.loc[("base", "bottom"), "weighted_tau"] < rows.loc[("base", "top"), "weighted_tau"]
    assert rows.loc[("base", "bottom"), "spearman"] == pytest.approx(rows.loc[("base", "top"), "spearman"])


def test_hand_worked_consensus_sets():
    table = aggregate_table(HAND)
    # mean ranks (1 = least important): 2.33, 2.00, 2.67, 3.00 -> {0, 1}
    assert sorted(consensus.consensus_drop_set(table, k=2, method="borda")) == [0, 1]
    # median ranks: 2, 2, 3, 3 -> {0, 1}
    assert sorted(consensus.consensus_drop_set(table, k=2, method="median")) == [0, 1]
    # mean min-max normalised importance: 4/9, 1/3, 5/9, 2/3 -> {0, 1}
    assert sorted(consensus.consensus_drop_set(table, k=2, method="mean")) == [0, 1]
    # worst regrets: {0,1} .4, {0,2} .3, {0,3} .3, {1,2} .2, {1,3} .3, {2,3} .4 -> {1, 2}
    assert sorted(consensus.consensus_drop_set(table, k=2, method="minimax")) == [1, 2]


def test_regret_table_on_the_hand_table():
    table = aggregate_table(HAND)
    regrets = consensus.regret_table(table, {"x": [1, 2]}).set_index(["drop_set", "distribution"])["regret"]
    assert regrets.loc[("x", "A")] == pytest.approx(0.2)
    assert regrets.loc[("x", "C")] == pytest.approx(0.1)
    assert regrets.loc[("random", "A")] == pytest.approx(2 * 0.25 - 0.3)


@pytest.mark.parametrize("seed", range(8))
def test_minimax_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = 9, 3
    table = aggregate_table({f"d{j}": list(rng.random(n)) for j in range(4)})
    matrix = stability.importance_matrix(table, "attn")

    def worst(chosen):
        return max(consensus.regret(matrix, list(chosen), d) for d in matrix.columns)

    best = min(worst(c) for c in combinations(range(n), k))
    assert worst(consensus.consensus_drop_set(table, k=k, method="minimax")) == pytest.approx(best)


def test_joint_candidates_are_tagged():
    rows = pd.concat([aggregate_table(HAND, "attn"), aggregate_table({d: [v + 0.05 for v in vs] for d, vs in HAND.items()}, "mlp")])
    chosen = consensus.consensus_drop_set(rows, module="joint", k=3, method="borda")
    assert all(c.split(":")[0] in ("attn", "mlp") for c in chosen) and len(chosen) == 3
    assert len(stability.importance_matrix(rows, "joint")) == 8


def test_bootstrap_intervals_shrink_as_samples_grow():
    mu = np.linspace(0.05, 0.5, 10)
    widths = []
    for n in (16, 64, 256):
        table = per_sample_table({"a": mu, "b": mu[::-1]}, n, noise=0.1, seed=n)
        imp = stability.bootstrap(table, k=(3,), n_boot=300)["importance"]
        widths.append((imp["ci_high"] - imp["ci_low"]).mean())
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.3)


def test_bootstrap_drop_probabilities_and_pair_intervals():
    mu = np.linspace(0.05, 0.5, 10)
    result = stability.bootstrap(per_sample_table({"a": mu, "b": mu}, 64, noise=0.01), k=(3,), n_boot=200)
    p = result["importance"].set_index(["distribution", "candidate"])["p_drop@3"]
    assert p.loc[("a", 0)] == 1 and p.loc[("a", 9)] == 0
    assert np.allclose(result["importance"].groupby("distribution")["p_drop@3"].sum(), 3)
    pair = result["pairs"].iloc[0]
    assert pair["spearman_ci_low"] - 1e-12 <= pair["spearman"] <= pair["spearman_ci_high"] + 1e-12


def test_permutation_p_values_are_roughly_uniform_under_the_null():
    mu = np.linspace(0.1, 0.3, 12)
    p_values = []
    for seed in range(40):
        pool = per_sample_table({"pool": mu}, 60, noise=0.15, seed=seed)
        halves = np.random.default_rng(seed).permutation(60)
        pool["distribution"] = np.where(pool["sample"].isin(halves[:30]), "a", "b")
        p_values.append(stability.permutation_test(pool, k=(3,), n_perm=200, seed=seed)["p_spearman"].iloc[0])
    p_values = np.array(p_values)
    assert 0.3 < p_values.mean() < 0.7
    assert (p_values < 0.05).mean() <= 0.15
    assert stats.kstest(p_values, "uniform").pvalue > 0.01


def test_permutation_p_value_is_tiny_for_different_rankings():
    mu = np.linspace(0.1, 0.5, 12)
    table = per_sample_table({"a": mu, "b": np.roll(mu, -3)}, 40, noise=0.05)
    result = stability.permutation_test(table, k=(3,), n_perm=500).iloc[0]
    assert result["p_spearman"] < 0.01 and result["p_jaccard@3"] < 0.01


def test_split_half_reliability_is_high_for_clean_and_low_for_noisy_data():
    mu = np.linspace(0.1, 0.5, 12)
    clean = stability.split_half_reliability(per_sample_table({"a": mu, "b": mu}, 64, noise=0.01), k=(3,), n_splits=50)
    noisy = stability.split_half_reliability(per_sample_table({"a": mu, "b": mu}, 8, noise=1.0), k=(3,), n_splits=50)
    assert clean["reliability"].min() > 0.95
    assert noisy["reliability"].max() < clean["reliability"].min()


def test_convergence_is_measured_against_an_independent_half():
    mu = np.linspace(0.1, 0.5, 12)
    curve, summary = stability.convergence(per_sample_table({"a": mu, "b": mu}, 64, noise=0.2), k=3, repeats=10)
    assert set(curve["n"]) == {4, 8, 16, 32} and curve["reference_n"].eq(32).all()
    last = curve.groupby("distribution")["spearman_mean"].last()
    assert (last < 1).all() and (last > 0.9).all()
    assert curve.groupby("distribution")["spearman_mean"].is_monotonic_increasing.all()
    assert summary["n_required"].between(4, 32).all()


def test_convergence_says_at_most_the_smallest_n_and_more_than_all():
    table = per_sample_table({"clean": np.linspace(0.1, 0.5, 12), "noise only": np.full(12, 0.3)}, 16, noise=0.001)
    noisy = per_sample_table({"noise only": np.full(12, 0.3)}, 16, noise=0.2)
    table = pd.concat([table[table["distribution"] == "clean"], noisy], ignore_index=True)
    labels = stability.convergence(table, k=3, repeats=5)[1].set_index("distribution")["n_required_label"]
    assert labels.to_dict() == {"clean": "≤ 4", "noise only": "> 8"}


def test_leave_one_out_on_a_hand_table():
    """k = 2 on three distributions, worked by hand for held-out A (B and C by the same steps):

    own sets: B {1, 2}, C {0, 2}; A's best pair {2, 3} costs 5, so their regrets on A are 6+3-5 = 4 and 8+3-5 = 6;
    random: 2 * 23/5 - 5 = 4.2.  Borda (= median with two distributions) ranks B 4,1,2,5,3 and C 1,5,2,4,3, means
    2.5,3,2,4.5,3 -> {0, 2}, regret 6.  Mean of min-max scaled importances 7/8+0, 0+1, 5/8+2/5, 1+4/5, 6/8+3/5 -> {0, 1},
    regret 8+6-5 = 9.  Minimax: B's best is 7, C's 8; the worst regret over B and C is 3 for {0, 1} (2 and 3), at least
    5 for every other pair -> {0, 1}, regret 9."""
    table = aggregate_table({"A": [8, 6, 3, 2, 4], "B": [8, 1, 6, 9, 7], "C": [3, 8, 5, 7, 6]})
    result = consensus.leave_one_out(table, k=2).set_index(["held_out", "method"])
    want = {  # held out: (consensus regret per method, own sets' regrets mean / best / worst, random regret, sets per method)
        "A": ({"borda": 6, "median": 6, "mean": 9, "minimax": 9}, (5, 4, 6), 4.2,
              {"borda": [0, 2], "median": [0, 2], "mean": [0, 1], "minimax": [0, 1]}),
        "B": ({"borda": 8, "median": 8, "mean": 8, "minimax": 6}, (7.5, 7, 8), 5.4,
              {"borda": [2, 3], "median": [2, 3], "mean": [2, 3], "minimax": [2, 4]}),
        "C": ({"borda": 5, "median": 5, "mean": 5, "minimax": 7}, (4.5, 4, 5), 3.6,
              {"borda": [1, 2], "median": [1, 2], "mean": [1, 2], "minimax": [1, 3]}),
    }
    assert len(result) == 3 * len(consensus.METHODS)
    for held, (regrets, (mean, best, worst), random, sets) in want.items():
        for method, value in regrets.items():
            row = result.loc[(held, method)]
            assert row["consensus_regret"] == pytest.approx(value) and sorted(row["drop_set"]) == sets[method], (held, method)
            assert (row["single_mean_regret"], row["single_best_regret"], row["single_worst_regret"]) == pytest.approx((mean, best, worst))
            assert row["random_regret"] == pytest.approx(random)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: stability.rank_agreement(t[t.distribution == "A"]), "at least two distributions"),
        (lambda t: stability.rank_agreement(t.assign(model=np.where(t.distribution == "A", "m1", "m2"))), "mixes models"),
        (lambda t: stability.rank_agreement(t, k=(9,)), "k=9 is outside 1..4"),
        (lambda t: consensus.consensus_drop_set(t, k=2, method="vote"), "unknown consensus method 'vote'"),
        (lambda t: consensus.consensus_drop_set(t, module="heads"), "module must be one of"),
        (lambda t: stability.bootstrap(t), "missing columns: n_tokens, sample, stat_sum"),
    ],
)
def test_wrong_input_is_a_clear_error(call, message):
    with pytest.raises(InputError, match=message):
        call(aggregate_table(HAND))


def test_rowwise_kendall_equals_scipy_with_ties_and_constant_rows():
    from analysis.study.validity import rowwise_kendall

    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, size=(40, 12)).astype(float)
    b = a + rng.integers(0, 3, size=(40, 12))
    b[0] = 1.0
    expected = np.array([stats.kendalltau(x, y, variant="b").statistic for x, y in zip(a, b)])
    assert np.array_equal(rowwise_kendall(a, b), expected, equal_nan=True)
    assert np.isnan(expected[0])
