"""Evaluation: held-out NLL with prefix reuse equals a pruned copy's, and the ratios, CIs and paired effects equal a plain recomputation."""

import copy
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from analysis.evaluation import heldout as evaluation
from analysis.study.dropsets import make_drop_set
from analysis.models.pruning import drop_modules
from reference import sequence_nll
from tiny import tiny_model

SETS = {"none": None, "a": make_drop_set("attn", [1], "own:x"), "m": make_drop_set("mlp", [0, 2], "borda"),
        "b": make_drop_set("block", [1], "borda"), "j": make_drop_set("joint", ["attn:2", "mlp:1"], "borda")}


def windows(n: int, length: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({"input_ids": rng.integers(2, 200, size=(n, length)).tolist(), "sample": list(range(n))})


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_window_nll_equals_each_pruned_copy_sequence_by_sequence(family):
    model = tiny_model(family)
    samples = {"d": windows(5, 24, 0)}
    table = evaluation.window_nll(model, samples, SETS, batch_size=2)
    for name, chosen in SETS.items():
        pruned = model if chosen is None else drop_modules(copy.deepcopy(model), **chosen.drop_kwargs())
        expected = [sequence_nll(pruned, [seq])[0] for seq in samples["d"]["input_ids"]]
        got = table[table["drop_set"] == name].sort_values("window")["nll_sum"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (table["n_tokens"] == 23).all()


def test_token_nll_equals_cross_entropy_position_by_position_across_chunks_and_padding():
    from analysis.importance.ablation import token_nll
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 75, 301, generator=generator) * 4
    ids = torch.randint(0, 301, (3, 75), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    losses, valid = token_nll(logits, ids, mask)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    assert valid.sum() == 2 * 74 + 39 and (losses[~valid] == 0).all()
    np.testing.assert_allclose(losses[valid].numpy(), expected[valid].numpy(), rtol=1e-6, atol=1e-5)


def synthetic_windows(seed: int = 0) -> pd.DataFrame:
    """NLL sums of three sets on two distributions' windows (unequal token counts)."""
    rng = np.random.default_rng(seed)
    rows = []
    for distribution, shift in (("p", 0.1), ("q", 0.4)):
        for w in range(12):
            tokens = int(rng.integers(50, 120))
            base = tokens * rng.uniform(2, 3)
            for name, extra in (("none", 0.0), ("cosine/attn-2:borda", shift), ("cosine/attn-2:own:p", 2 * shift)):
                rows.append({"drop_set": name, "distribution": distribution, "window": w, "nll_sum": base + tokens * (extra + rng.normal(0, 0.05)),
                             "n_tokens": tokens})
    return pd.DataFrame(rows)


def test_transfer_ratios_are_token_weighted_and_the_worst_row_is_the_largest():
    table = synthetic_windows()
    summary = evaluation.transfer_summary(table, n_boot=200)
    for (name, distribution), part in table.groupby(["drop_set", "distribution"]):
        none = table[(table["drop_set"] == "none") & (table["distribution"] == distribution)]
        expected = math.exp((part["nll_sum"].sum() - none["nll_sum"].sum()) / none["n_tokens"].sum())
        row = summary[(summary["drop_set"] == name) & (summary["distribution"] == distribution)].iloc[0]
        assert row["ppl_ratio"] == pytest.approx(expected)
        assert row["ci_low"] <= row["ppl_ratio"] <= row["ci_high"] or name == "none"
    per = summary[~summary["distribution"].isin(["worst", "mean"])]
    worst = summary[summary["distribution"] == "worst"].set_index("drop_set")["ppl_ratio"]
    pd.testing.assert_series_equal(per.groupby("drop_set")["ppl_ratio"].max().loc[worst.index], worst, check_names=False)


def test_paired_comparison_effect_is_the_log_ratio_and_its_ci_excludes_a_clear_difference():
    table = synthetic_windows()
    pairs = [("borda vs own", "cosine/attn-2:borda", "cosine/attn-2:own:p")]
    result = evaluation.paired_comparisons(table, pairs, n_boot=400)
    summary = evaluation.transfer_summary(table, n_boot=10).set_index(["drop_set", "distribution"])["ppl_ratio"]
    p = result[result["distribution"] == "p"].iloc[0]
    assert p["ratio"] == pytest.approx(summary[("cosine/attn-2:borda", "p")] / summary[("cosine/attn-2:own:p", "p")])
    assert p["ci_high"] < 1 and p["p_value"] <= 0.01
    assert set(result["distribution"]) == {"p", "q", "worst", "mean"}


def test_pruned_copy_drops_from_a_copy_and_none_is_the_model_itself():
    model = tiny_model("llama")
    assert evaluation.pruned_copy(model, None) is model
    pruned = evaluation.pruned_copy(model, {"module": "attn", "indices": [1]})
    assert pruned is not model and type(pruned.model.layers[1].self_attn).__name__ == "DroppedBranch"
    assert type(model.model.layers[1].self_attn).__name__ != "DroppedBranch"
    with torch.no_grad():
        assert not torch.equal(pruned(torch.tensor([[3, 4, 5]])).logits, model(torch.tensor([[3, 4, 5]])).logits)
