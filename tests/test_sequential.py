"""The sequential held-out evaluation (analysis/evaluation/sequential.py) on simulated windows: a set that is out
stops, a contested one goes on, random sets stop after the first look, the budget ends the rounds, a resumed
evaluation equals an uninterrupted one, the error rate stays at most alpha when every set is equal, and tables whose
sets have different windows pair each two sets on the windows both have."""

import numpy as np
import pandas as pd
import pytest

from analysis.evaluation.heldout import (paired_comparisons, replicates_of, shared_windows, transfer_summary,
                                         worst_case_replicates)
from analysis.evaluation.sequential import equal_spending, sequential_windows, windows_per_set
from analysis.study import recommend
from analysis.study.dropsets import UNPRUNED

from test_recommend import WORST_ON_MATH, sets_table, simulated_windows

LOOKS = (8, 16, 32)


def simulated_rounds(full: pd.DataFrame):
    """The :data:`~analysis.evaluation.sequential.Evaluate` of a simulated table: each wanted set's rows (and the
    unpruned model's) on the windows from its last one to its look, and the count of calls."""
    calls = []

    def evaluate(wanted, have):
        calls.append(dict(wanted))
        parts = [full[(full["drop_set"] == name) & (full["window"] >= have.get(name, 0)) & (full["window"] < target)]
                 for name, target in wanted.items()]
        top = max(wanted.values())
        parts.append(full[(full["drop_set"] == UNPRUNED) & (full["window"] < top)])
        return pd.concat(parts, ignore_index=True)

    return evaluate, calls


def run_rounds(truth: dict, *, seed: int = 0, budget: int = 10_000, looks=LOOKS, random=(), n_boot: int = 200,
               saved=None, **noise):
    full = simulated_windows(truth, n=looks[-1], seed=seed, **noise)
    sets = sets_table(list(truth), random=random)
    evaluate, calls = simulated_rounds(full)
    members = {name: tuple(row) for name, row in zip(sets["drop_set"], sets["members"])}
    windows, looks_table = sequential_windows(evaluate, members, sets, looks=looks, budget=budget, n_boot=n_boot,
                                              seed=seed, saved=saved)
    groups = recommend.set_groups(replicates_of(windows, n_boot=n_boot, seed=seed), sets,
                                  spending=equal_spending(looks))
    return windows, looks_table, groups, calls, full


def test_a_set_out_of_the_race_stops_and_random_sets_stop_after_the_first_look():
    truth = {"a": WORST_ON_MATH, "close": tuple(x + 0.03 for x in WORST_ON_MATH),
             "far": tuple(x + 1.0 for x in WORST_ON_MATH), "rand": tuple(x + 3.0 for x in WORST_ON_MATH)}
    windows, looks_table, groups, _, _ = run_rounds(truth, random=("rand",), noise=0.05)
    have = windows_per_set(windows)
    assert have["rand"] == have["far"] == LOOKS[0]
    assert have["a"] == have["close"] > LOOKS[0]
    assert have[UNPRUNED] == max(have.values())
    # what the rounds spent: every set at the first look, then only the contested ones, never more than needed
    assert looks_table["spent"].iloc[-1] == sum(have[name] for name in truth)
    far = groups.set_index("drop_set").loc["far"]
    assert far["separated"] and far["n_windows"] == LOOKS[0]


def test_a_decided_answer_ends_the_rounds_and_a_budget_ends_them_early():
    truth = {"a": WORST_ON_MATH, "b": tuple(x + 0.5 for x in WORST_ON_MATH)}
    _, looks_table, groups, calls, _ = run_rounds(truth, noise=0.05)
    assert groups["status"].iloc[0] == recommend.RECOMMENDED and len(calls) == 1
    assert looks_table["ended"].iloc[-1] == "every module kind and budget decided"
    close = {"a": WORST_ON_MATH, "b": tuple(x + 0.02 for x in WORST_ON_MATH)}
    windows, looks_table, _, calls, _ = run_rounds(close, budget=2 * LOOKS[0] + 5, noise=0.1)
    assert len(calls) == 1 and looks_table["ended"].iloc[-1].startswith("budget")
    assert set(windows_per_set(windows).values()) == {LOOKS[0]}


def test_a_budget_too_small_for_every_open_answer_goes_to_the_one_nearest_a_decision():
    # two module kinds: in attn the runner-up is 10% worse (a few more windows decide it), in mlp 1% (hundreds would);
    # after the first look the budget holds one more look for one kind only, and it goes to attn
    truth = {"a": WORST_ON_MATH, "b": tuple(x + 0.1 for x in WORST_ON_MATH),
             "c": WORST_ON_MATH, "d": tuple(x + 0.01 for x in WORST_ON_MATH)}
    full = simulated_windows(truth, n=LOOKS[-1], seed=3, noise=0.1)
    sets = pd.concat([sets_table(["a", "b"]), sets_table(["c", "d"]).assign(module="mlp")], ignore_index=True)
    sets["members"] = [[str(i)] for i in range(4)]
    evaluate, calls = simulated_rounds(full)
    members = {name: tuple(row) for name, row in zip(sets["drop_set"], sets["members"])}
    windows, looks_table = sequential_windows(evaluate, members, sets, looks=LOOKS, budget=4 * LOOKS[0] + 2 * 8,
                                              n_boot=200, seed=3)
    have = windows_per_set(windows)
    assert have["a"] == have["b"] == LOOKS[1] and have["c"] == have["d"] == LOOKS[0]
    assert looks_table["set_windows"].tolist() == [4 * LOOKS[0], 2 * 8]
    assert looks_table["ended"].iloc[-1].startswith("budget")


def test_a_resumed_evaluation_equals_an_uninterrupted_one():
    truth = {"a": WORST_ON_MATH, "b": tuple(x + 0.03 for x in WORST_ON_MATH), "c": tuple(x + 1 for x in WORST_ON_MATH)}
    store = {}

    def saved(look, compute):
        if look not in store:
            store[look] = compute()
        return store[look]

    first, looks_first, *_ = run_rounds(truth, saved=saved)
    again, looks_again, _, calls, _ = run_rounds(truth, saved=saved)
    assert not calls  # every round read back
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(looks_first, looks_again)


def test_equal_sets_are_recommended_at_most_five_percent_of_the_time_under_peeking():
    # ten sets of the same true loss, heavy-tailed windows, three looks: any recommendation is wrong.
    # benchmarks/study/sequential_simulation.py runs it at length, with five looks and the default's spread
    truth = {f"s{i}": WORST_ON_MATH for i in range(10)}
    statuses = [run_rounds(truth, seed=seed, n_boot=100)[2]["status"].iloc[0] for seed in range(30)]
    assert statuses.count(recommend.RECOMMENDED) / len(statuses) <= 0.05


# ---------------------------------------------------------------- tables whose sets have different windows


@pytest.fixture
def ragged():
    full = simulated_windows({"a": WORST_ON_MATH, "b": (0.2, 0.6, 0.3)}, n=16, seed=4)
    return full[~((full["drop_set"] == "b") & (full["window"] >= 8))].reset_index(drop=True), full


def test_shared_windows_are_the_windows_every_named_set_has(ragged):
    windows, _ = ragged
    both = shared_windows(windows, ["a", "b"])
    assert set(both["window"]) == set(range(8)) and set(both["drop_set"]) == {"a", "b", UNPRUNED}
    assert set(shared_windows(windows, ["a"])["window"]) == set(range(16))


def test_a_ragged_table_gives_each_set_its_own_windows_and_each_pair_the_shared_ones(ragged):
    windows, full = ragged
    table = transfer_summary(windows, n_boot=100, seed=1).set_index(["drop_set", "distribution"])
    alone = transfer_summary(full[full["drop_set"] != "b"], n_boot=100, seed=1).set_index(["drop_set", "distribution"])
    short = transfer_summary(full[full["window"] < 8], n_boot=100, seed=1).set_index(["drop_set", "distribution"])
    pd.testing.assert_series_equal(table.loc["a", "ppl_ratio"], alone.loc["a", "ppl_ratio"])
    pd.testing.assert_series_equal(table.loc["b", "ppl_ratio"], short.loc["b", "ppl_ratio"])
    assert table.loc[("b", "code"), "n_windows"] == 8 and table.loc[("a", "code"), "n_windows"] == 16
    pair = paired_comparisons(windows, [("a vs b", "a", "b")], n_boot=100, seed=1)
    expected = paired_comparisons(full[full["window"] < 8], [("a vs b", "a", "b")], n_boot=100, seed=1)
    pd.testing.assert_frame_equal(pair, expected)


def test_pairing_on_shared_windows_equals_one_table_of_replicates_when_every_set_has_every_window():
    windows = simulated_windows({"a": WORST_ON_MATH, "b": (0.2, 0.6, 0.3), "c": 0.4}, seed=2)
    sets = sets_table(["a", "b", "c"])
    worst, n = worst_case_replicates(windows, n_boot=200, seed=5)
    one_table = recommend.set_groups(worst, sets, n_windows=n)
    per_pair = recommend.set_groups(replicates_of(windows, n_boot=200, seed=5), sets)
    pd.testing.assert_frame_equal(one_table, per_pair)
    assert np.array_equal(one_table["level"], np.full(3, 0.05 / 3))


# ---------------------------------------------------------------- in a run


def test_a_run_with_a_budget_spends_it_look_by_look_and_says_so(tiny_dir, tiny_run, tmp_path):
    # the suite's shared tiny run again with a budget: only the held-out stage and what reads it recompute
    import shutil

    from analysis.io import read_table
    from analysis.pipeline import RunSettings, run

    from test_pipeline import SETTINGS

    folder = tmp_path / "run"
    shutil.copytree(tiny_run[0], folder)
    settings = {**SETTINGS, "heldout_budget": 10_000, "heldout_looks": (2, 4, 8)}
    summary = run(str(tiny_dir), folder, preset=RunSettings(**settings), progress=False, log=lambda m: None,
                  figures=False, force=True)
    assert "scores.proxies" in summary["stages_reused"] and "heldout_windows" in summary["stages_computed"]
    looks, groups = read_table(folder / "heldout_looks.parquet"), read_table(folder / "set_groups.parquet")
    windows = read_table(folder / "heldout_windows.parquet")
    unseen = read_table(folder / "heldout_windows_unseen.parquet")
    have = windows_per_set(windows)
    assert looks["look"].tolist() == list(range(1, len(looks) + 1)) and looks["ended"].iloc[-1]
    assert looks["spent"].iloc[-1] == looks["set_windows"].sum()
    # every set's windows are its set_groups row's, random sets stop after the first look
    assert all(have[row.drop_set] == row.set_windows for row in groups.itertuples())
    assert all(have[name] == 2 for name in groups.loc[groups["role"] == "random", "drop_set"])
    # the test-only distribution evaluates only the sets still in the race and the baselines
    kept = groups[(groups["in_group"] & (groups["role"] == "candidate")) | groups["baselines"].map(len).gt(0)]
    names = {name for aliases in kept["aliases"] for name in aliases}
    assert set(unseen["drop_set"]) - {UNPRUNED} == names
    report = (folder / "report.md").read_text()
    assert "### How the held-out windows were spent" in report and looks["ended"].iloc[-1] in report
