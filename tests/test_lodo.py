"""Leave one distribution out on real held-out loss: every set built without d equals the set built from the tables
with d removed (plain loops), no set is evaluated twice, and the report's numbers equal a direct computation from the
windows.
"""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis.data.documents import load_distribution
from analysis.data.samples import calibration_samples, token_batches
from analysis.evaluation.heldout import heldout_samples
from analysis.evaluation.lodo import known_windows, missing_pairs, new_windows
from analysis.importance import ablation
from analysis.importance.metrics import GROUND_TRUTH
from analysis.io import read_table
from analysis.models.loading import load_model
from analysis.pipeline import RunSettings, run
from analysis.study.dropsets import UNPRUNED, drop_set_family, make_drop_set
from analysis.study.lodo import set_key
from analysis.study.stability import importance_matrix

from test_pipeline import SETTINGS
from tiny import tiny_model

LODO = {**SETTINGS, "lodo": True, "lodo_probes": 3}
MODULE, K = "attn", 2


def synthetic_batches(seed: int, n: int = 2, length: int = 12) -> list[dict]:
    ids = torch.tensor(np.random.default_rng(seed).integers(2, 250, size=(n, length)))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_a_shared_trial_cache_keeps_every_greedy_path_and_saves_trials():
    model = tiny_model("qwen2")
    batches = {name: synthetic_batches(seed) for seed, name in enumerate(("a", "b", "c"))}
    cache = ablation.TrialCache()
    for left in batches:
        others = {d: b for d, b in batches.items() if d != left}
        shared = ablation.greedy_drop_path(model, others, module="joint", k=3, objective="robust", cache=cache)
        alone = ablation.greedy_drop_path(model, others, module="joint", k=3, objective="robust")
        pd.testing.assert_frame_equal(shared, alone)
    # at most the 3 x 2 x (6 + 5 + 4) trials the robust paths try (fewer: a candidate already beaten is left)
    assert cache.requested <= 3 * 2 * (6 + 5 + 4) and cache.trials < cache.requested


@pytest.fixture(scope="module")
def lodo_run(tiny_dir, tiny_run, tmp_path_factory):
    """The session's tiny run (conftest ``tiny_run``) rerun in a copy of its folder with leave-one-distribution-out on
    (other settings: ``force``): the stages it had are reused, only the lodo stages are computed (the report is
    rewritten, without figures)."""
    out = tmp_path_factory.mktemp("lodo") / "run"
    shutil.copytree(tiny_run[0], out)
    summary = run(str(tiny_dir), out, preset=RunSettings(**LODO), progress=False, log=lambda m: None, figures=False,
                  force=True)
    assert [stage for stage in summary["stages_computed"] if "lodo" not in stage] == []
    tables = {p.stem: read_table(p) for p in out.glob("*.parquet")}
    return out, summary, tables


def test_the_stages_run_and_save_one_part_per_left_out_distribution(lodo_run):
    out, summary, tables = lodo_run
    assert {"lodo_sets", "lodo_windows", "lodo"} <= set(summary["timings"])
    names = LODO["distributions"]
    assert {f"lodo_greedy-{d}" for d in names} | {f"lodo_probe-{d}" for d in names} <= {
        p.stem for p in (out / "parts").glob("*.parquet")
    }
    assert set(tables["lodo_choices"]["held_out"]) == set(names)


def test_consensus_and_own_sets_without_d_equal_those_of_the_table_without_d(lodo_run):
    _, _, tables = lodo_run
    scores, sets = tables["scores.per_sample"], tables["lodo_sets"]
    for held_out in LODO["distributions"]:
        rest = scores[scores["distribution"] != held_out]
        mine = sets[(sets["held_out"] == held_out) & (sets["variant"] == "without")].set_index("name")["key"]
        for metric in RunSettings(**LODO).metrics:
            methods = ("borda",) if metric == GROUND_TRUTH else ("borda", "minimax")
            family = drop_set_family(rest, module=MODULE, k=K, metric=metric, methods=methods, own=metric == "cosine")
            for chosen in family.values():
                name = f"{metric} {chosen.method}"
                assert mine[name] == set_key(MODULE, chosen.indices), (held_out, name)


def test_robust_greedy_without_d_equals_a_fresh_path_on_the_other_distributions(lodo_run, tiny_dir):
    _, _, tables = lodo_run
    model, tokenizer = load_model(str(tiny_dir))
    s = RunSettings(**LODO)
    batches = {
        name: list(
            token_batches(
                calibration_samples(
                    load_distribution(name, "calibration"),
                    tokenizer,
                    n_samples=s.ablation_samples,
                    seq_len=s.ablation_seq_len,
                    seed=s.seed,
                ),
                s.batch_size,
            )
        )
        for name in s.distributions
    }
    scores, sets = tables["scores.per_sample"], tables["lodo_sets"]
    for held_out in s.distributions:
        rest = scores[scores["distribution"] != held_out]
        prior = importance_matrix(rest, MODULE, GROUND_TRUTH).max(axis=1).to_dict()
        path = ablation.greedy_drop_path(
            model,
            {d: b for d, b in batches.items() if d != held_out},
            module=MODULE,
            k=K,
            objective="robust",
            shortlist=s.greedy_shortlist,
            prior=prior,
        )
        mine = sets[(sets["held_out"] == held_out) & (sets["variant"] == "without") & (sets["name"] == "robust greedy")]
        assert mine["key"].item() == set_key(MODULE, path["candidate"]), held_out


def test_nearest_greedy_is_the_greedy_set_of_the_best_agreeing_other_distribution(lodo_run):
    out, _, tables = lodo_run
    scores, sets, greedy = tables["scores.per_sample"], tables["lodo_sets"], tables["greedy"]
    cosine = importance_matrix(scores, MODULE, "cosine")
    for held_out in LODO["distributions"]:
        probe = read_table(out / "parts" / f"lodo_probe-{held_out}.parquet")
        assert probe["sample"].nunique() == LODO["lodo_probes"]
        mine = importance_matrix(probe, MODULE, "cosine")[held_out]
        others = [d for d in cosine.columns if d != held_out]
        rho = [stats.spearmanr(mine.to_numpy(), cosine.loc[mine.index, d].to_numpy()).statistic for d in others]
        nearest = others[int(np.argmax(rho))]
        path = greedy[greedy["objective"] == nearest].sort_values("step")["candidate"].iloc[:K]
        row = sets[(sets["held_out"] == held_out) & (sets["variant"] == "without") & (sets["name"] == "nearest greedy")]
        assert row["key"].item() == set_key(MODULE, path) and nearest in row["note"].item()


def windows_of(tables) -> pd.DataFrame:
    return pd.concat(
        [known_windows(tables["heldout_windows"], tables["pruned"], LODO["transfer_samples"]),
         tables["lodo_windows"]], ignore_index=True
    )


def ratio(windows: pd.DataFrame, key: str, distribution: str) -> float:
    """exp((sum nll_set - sum nll_none) / tokens) by a plain loop over the window rows."""
    nll = {UNPRUNED: 0.0, key: 0.0}
    tokens = 0
    for row in windows.itertuples():
        if row.distribution == distribution and row.key in nll:
            nll[row.key] += row.nll_sum
            tokens += row.n_tokens if row.key == UNPRUNED else 0
    return math.exp((nll[key] - nll[UNPRUNED]) / tokens)


def test_no_pair_is_evaluated_twice_and_a_looked_up_pair_equals_a_fresh_evaluation(lodo_run, tiny_dir):
    _, _, tables = lodo_run
    known = known_windows(tables["heldout_windows"], tables["pruned"], LODO["transfer_samples"])
    new = tables["lodo_windows"]
    assert not set(zip(new["key"], new["distribution"])) & set(zip(known["key"], known["distribution"]))
    cost = tables["lodo_cost"].iloc[0]
    assert cost["pairs_looked_up"] + cost["pairs_evaluated"] == cost["pairs_needed"]
    model, tokenizer = load_model(str(tiny_dir))
    s = RunSettings(**LODO)
    name = s.distributions[0]
    samples = heldout_samples(tokenizer, [name], n_samples=s.transfer_samples, seq_len=s.transfer_seq_len, seed=s.seed)
    chosen = tables["lodo_sets"].drop_duplicates("key").iloc[0]
    fresh = new_windows(
        model, samples, {name: {chosen["key"]: make_drop_set(MODULE, chosen["indices"], "lodo")}}
    ).sort_values("window")
    saved = windows_of(tables)
    saved = saved[(saved["key"] == chosen["key"]) & (saved["distribution"] == name)].sort_values("window")
    assert len(fresh) == len(saved) == s.transfer_samples and np.allclose(
        fresh["nll_sum"].to_numpy(), saved["nll_sum"].to_numpy(), rtol=1e-6
    )


def test_selections_and_report_numbers_equal_a_direct_computation(lodo_run):
    out, _, tables = lodo_run
    windows, sets, chosen, summary = windows_of(tables), tables["lodo_sets"], tables["lodo_choices"], tables["lodo"]
    names = list(LODO["distributions"])
    for held_out in names:
        part = sets[(sets["held_out"] == held_out) & (sets["variant"] == "without")]
        judged = [d for d in names if d != held_out]
        worst = {key: max(ratio(windows, key, d) for d in judged) for key in part["key"]}
        own = part[part["name"].str.contains(" own:")]
        mine = chosen[(chosen["held_out"] == held_out) & (chosen["variant"] == "without")].set_index("procedure")
        assert worst[mine.loc["best own set", "key"]] == pytest.approx(min(worst[k] for k in own["key"]), rel=1e-12)
        assert worst[mine.loc["pick best", "key"]] == pytest.approx(min(worst.values()), rel=1e-12)
    report = (out / "report.md").read_text()
    assert "## Does the method generalise to a distribution it never saw?" in report
    for procedure, part in chosen[chosen["variant"] == "without"].groupby("procedure"):
        per = [ratio(windows, row.key, row.held_out) for row in part.itertuples()]
        row = summary[(summary["procedure"] == procedure) & (summary["variant"] == "without")].set_index("distribution")
        assert row.loc["mean", "ppl_ratio"] == pytest.approx(np.mean(per), rel=1e-9)
        assert row.loc["worst", "ppl_ratio"] == pytest.approx(max(per), rel=1e-9)
        assert f"| {procedure} " in report and f"{np.mean(per):.3f} [" in report and f"{max(per):.3f} [" in report
    means = summary[(summary["variant"] == "without") & (summary["distribution"] == "mean")].set_index("procedure")
    best = means["ppl_ratio"].idxmin()
    paired = tables["lodo_paired"]
    against = paired[paired["comparison"].str.startswith("lowest mean: ") & (paired["distribution"] == "mean")]
    assert sorted(against["comparison"]) == sorted(f"lowest mean: {best} vs {p}" for p in means.index if p != best)
    for row in against.itertuples():
        other = row.comparison.split(" vs ")[-1]
        expected = means.loc[best, "ppl_ratio"] / means.loc[other, "ppl_ratio"]
        assert row.ratio == pytest.approx(expected, rel=1e-9) and row.ci_low <= row.ratio <= row.ci_high
    group = [row.comparison.split(" vs ")[-1] for row in against.itertuples() if row.ci_low <= 1 <= row.ci_high]
    if group:
        assert f"**{best}** has the lowest mean ratio" in report
        named = report.split("which generalises best is **not resolved**")[0].rsplit("cannot be separated from", 1)[1]
        assert all(p in named for p in group)
    else:
        assert f"**{best}** generalises best (**resolved**" in report


def test_missing_pairs_are_exactly_the_sets_not_yet_evaluated_on_each_distribution(lodo_run):
    _, _, tables = lodo_run
    known = known_windows(tables["heldout_windows"], tables["pruned"], LODO["transfer_samples"])
    sets = tables["lodo_sets"]
    key = sets["key"].iloc[0]
    names = list(LODO["distributions"])
    assert not any(missing_pairs(sets, windows_of(tables), names).values())
    dropped = known[~((known["key"] == key) & (known["distribution"] == names[1]))]
    missing = missing_pairs(sets, dropped, names)
    assert {name: list(found) for name, found in missing.items()} == {
        name: [key] if name == names[1] else [] for name in names
    }
    assert missing[names[1]][key].candidates() == [(MODULE, int(i)) for i in sets["indices"].iloc[0]]


def test_the_greedy_stages_paths_seed_the_leave_one_out_paths():
    """As one run computes them (``study.trials``): each distribution's own path and the robust path, then the robust
    paths without each distribution, all through one cache; every path equals the one computed alone, and the
    leave-one-out paths run fewer trials than with a cache of their own."""
    model = tiny_model("llama")
    batches = {name: synthetic_batches(seed) for seed, name in enumerate(("a", "b", "c"))}
    shared, lodo_only = ablation.TrialCache(), ablation.TrialCache()
    for objective in [*batches, "robust"]:
        pd.testing.assert_frame_equal(
            ablation.greedy_drop_path(model, batches, module="attn", k=2, objective=objective, cache=shared),
            ablation.greedy_drop_path(model, batches, module="attn", k=2, objective=objective))
    before = shared.trials
    for left in batches:
        others = {d: b for d, b in batches.items() if d != left}
        pd.testing.assert_frame_equal(
            ablation.greedy_drop_path(model, others, module="attn", k=2, objective="robust", cache=shared),
            ablation.greedy_drop_path(model, others, module="attn", k=2, objective="robust", cache=lodo_only))
    assert shared.trials - before < lodo_only.trials
