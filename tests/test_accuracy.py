"""Paired accuracy comparisons: exact McNemar, items needed, against hand computations and simulation."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.evaluation.accuracy import accuracy_analysis, accuracy_table, above_chance, items_needed, mcnemar_exact, paired_accuracy
from analysis.errors import InputError


def test_mcnemar_exact_by_hand():
    # b = 10, c = 2: p = 2 P(X <= 2), X ~ Binomial(12, 1/2) = 2 (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(InputError):
        mcnemar_exact(-1, 2)


def test_items_needed_formula_and_power_by_simulation():
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    want = math.ceil((z_a * math.sqrt(0.15) + z_b * math.sqrt(0.15 - 0.03**2)) ** 2 / 0.03**2)
    n = items_needed(0.15, 0.03)
    assert n == want
    # simulate paired items at that size: discordant ~ Binomial(n, 0.15), a's share of them gives a 3-point lead
    rng = np.random.default_rng(0)
    discordant = rng.binomial(n, 0.15, size=1500)
    a_only = rng.binomial(discordant, (0.15 + 0.03) / (2 * 0.15))
    power = np.mean([mcnemar_exact(b, d - b) < 0.05 for b, d in zip(a_only, discordant)])
    assert 0.75 < power < 0.85
    with pytest.raises(InputError):
        items_needed(0.0005, 0.03)


def test_above_chance():
    # 7 of 8 right against chance 1/2: P(X >= 7) = (8 + 1) / 256
    assert above_chance(7, 8, 0.5) == pytest.approx(9 / 256)


def test_paired_accuracy_known_counts():
    # task t: 10 items; a right on 0-7, b right on 0-4 and 8: a_only = {5, 6, 7}, b_only = {8}
    a = [1] * 8 + [0, 0]
    b = [1] * 5 + [0, 0, 0, 1, 0]
    items = pd.DataFrame({"drop_set": ["A"] * 10 + ["B"] * 10, "task": "t", "item": list(range(10)) * 2, "correct": a + b})
    row = paired_accuracy(items, "A", "B", n_boot=500).iloc[0]
    assert (row["n"], row["a_only"], row["b_only"]) == (10, 3, 1)
    assert (row["acc_a"], row["acc_b"], row["difference"]) == pytest.approx((0.8, 0.6, 0.2))
    assert row["p_mcnemar"] == pytest.approx(2 * 5 / 16)
    assert row["ci_low"] <= 0.2 <= row["ci_high"]
    assert row["items_for_delta"] == items_needed(0.4, 0.03)
    with pytest.raises(InputError, match="no items of drop set"):
        paired_accuracy(items, "A", "C")
    with pytest.raises(InputError, match="same items"):
        paired_accuracy(items[~((items["drop_set"] == "B") & (items["item"] == 9))], "A", "B")


def fake_items(tasks: dict, sizes: dict | None = None) -> pd.DataFrame:
    """Items from ``{task: {drop_set: [0/1, ...]}}``; ``correct_norm`` equals ``correct`` for arc_easy, NaN elsewhere."""
    rows = []
    for task, sets in tasks.items():
        for name, correct in sets.items():
            rows += [{"drop_set": name, "task": task, "subtask": task, "item": f"{task}:{i}", "correct": float(c),
                      "correct_norm": float(c) if task == "arc_easy" else np.nan, "subtask_items": (sizes or {}).get(task, len(correct))}
                     for i, c in enumerate(correct)]
    return pd.DataFrame(rows)


def test_identical_set_differs_by_nothing():
    base = [1] * 60 + [0] * 40
    items = fake_items({"arc_easy": {"none": base, "same": base}})
    row = paired_accuracy(items, "same", "none", n_boot=200).iloc[0]
    assert (row["difference"], row["a_only"], row["b_only"], row["p_mcnemar"]) == (0, 0, 0, 1.0)
    assert row["ci_low"] == row["ci_high"] == 0
    assert np.isnan(row["items_for_delta"])


def test_analysis_screens_tasks_and_pairs_on_the_rest():
    # arc_easy (chance 0.25): unpruned right on 60 of 100; "pruned" loses 10 items and gains 2 -> 52 of 100
    base = [1] * 60 + [0] * 40
    pruned = [1] * 50 + [0] * 10 + [1] * 2 + [0] * 38
    # boolq (chance 0.5): unpruned right on 52 of 100, one-sided p = P(X >= 52) > 0.05: excluded
    weak = [1] * 52 + [0] * 48
    items = fake_items({"arc_easy": {"none": base, "pruned": pruned}, "boolq": {"none": weak, "pruned": weak}}, sizes={"arc_easy": 570})
    paired, tasks = accuracy_analysis(items, [("pruned vs unpruned", "pruned", "none")], task_limit=100, n_boot=500)

    assert set(paired["task"]) == {"arc_easy"} and set(paired["measure"]) == {"acc", "acc_norm"}
    row = paired[paired["measure"] == "acc"].iloc[0]
    assert (row["n"], row["a_only"], row["b_only"]) == (100, 2, 10)
    assert row["difference"] == pytest.approx(-0.08)
    assert row["p_mcnemar"] == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue)
    assert row["ci_low"] < -0.08 < row["ci_high"] < 0
    assert row["items_for_delta"] == items_needed(0.12, 0.03)
    assert row["q_bh"] == pytest.approx(row["p_mcnemar"])  # one comparison per measure: nothing to adjust

    screen = tasks.set_index(["task", "measure"])
    assert screen.loc[("boolq", "acc"), "p_above_chance"] == pytest.approx(stats.binom.sf(51, 100, 0.5))
    assert not screen.loc[("boolq", "acc"), "included"] and screen.loc[("arc_easy", "acc"), "included"]
    assert ("boolq", "acc_norm") not in screen.index
    arc = screen.loc[("arc_easy", "acc")]
    assert (arc["n_items"], arc["n_available"], arc["accuracy"], arc["chance"]) == (100, 570, 0.6, 0.25)
    assert arc["items_needed_max"] == items_needed(0.12, 0.03) > 570
    assert not arc["limit_suffices"] and not arc["task_suffices"]
    assert np.isnan(screen.loc[("boolq", "acc"), "items_needed_max"]) and not screen.loc[("boolq", "acc"), "limit_suffices"]


def test_items_needed_against_the_limit_and_the_task():
    # 30 of 400 items discordant (7.5%): about 630 items for 3 points; the limit 400 does not reach it, the task's 1000 do
    base = [1] * 300 + [0] * 100
    pruned = [1] * 280 + [0] * 20 + [1] * 10 + [0] * 90
    items = fake_items({"arc_easy": {"none": base, "pruned": pruned}}, sizes={"arc_easy": 1000})
    _, tasks = accuracy_analysis(items, [("p", "pruned", "none")], task_limit=400, n_boot=100)
    arc = tasks.set_index("measure").loc["acc"]
    assert arc["items_needed_max"] == items_needed(30 / 400, 0.03)
    assert 400 < arc["items_needed_max"] <= 1000 and not arc["limit_suffices"] and arc["task_suffices"]
    _, whole = accuracy_analysis(items, [("p", "pruned", "none")], task_limit=None, n_boot=100)
    assert whole.set_index("measure").loc["acc", "limit_suffices"]  # no limit: the whole task, which suffices


def test_accuracy_table_is_the_item_mean():
    items = fake_items({"arc_easy": {"none": [1, 1, 0, 0, 1]}, "boolq": {"none": [1, 0]}})
    table = accuracy_table(items).set_index(["task", "metric"])
    assert set(table.index) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("boolq", "acc")}
    assert table.loc[("arc_easy", "acc"), "value"] == pytest.approx(0.6)
    assert table.loc[("arc_easy", "acc"), "stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert (table.loc[("boolq", "acc"), "n"], table.loc[("boolq", "acc"), "chance"]) == (2, 0.5)


def test_paired_stage_pairs_every_set_with_unpruned_and_the_held_out_comparisons():
    from types import SimpleNamespace

    from analysis.pipeline import stage_accuracy_paired
    from analysis.presets import RunSettings

    def row(label, module, method, metric, indices):
        return {"drop_set": label, "module": module, "k": len(indices), "method": method, "metric": metric, "indices": indices, "sources": []}

    pruned = pd.DataFrame([row("none", None, "none", None, []), row("cosine/attn-2:borda", "attn", "borda", "cosine", ["1", "2"]),
                           row("cosine/attn-2:own:code", "attn", "own:code", "cosine", ["1", "3"]),
                           row("ablation/attn-2:greedy:robust", "attn", "greedy:robust", "ablation", ["2", "3"])])
    base = [1] * 70 + [0] * 30
    items = fake_items({"arc_easy": {"none": base, "cosine/attn-2:borda": base[::-1], "ablation/attn-2:greedy:robust": base}})
    settings = RunSettings(distributions=("code",), transfer_modules=("attn",), transfer_k=(2,), task_limit=100, n_boot=100)
    study = SimpleNamespace(settings=settings, distributions=("code",), results={"accuracy_items": items, "pruned": pruned})
    tables = stage_accuracy_paired(study)
    assert list(dict.fromkeys(tables["accuracy_paired"]["comparison"])) == [
        "cosine/attn-2:borda vs unpruned", "ablation/attn-2:greedy:robust vs unpruned", "attn-2: robust greedy vs cosine borda"]
    assert tables["accuracy_tasks"].set_index("measure").loc["acc", "included"]


def lm_eval_warnings(call) -> dict:
    """``call()``'s result and every lm-eval log record of level WARNING or above it let through, with lm-eval's
    logger back at its fresh state first (an earlier call in this process leaves it at ERROR)."""
    import logging

    records, handler, logger = [], logging.Handler(logging.WARNING), logging.getLogger("lm_eval")
    handler.emit = lambda record: records.append(record.getMessage())
    logger.setLevel(logging.NOTSET)
    logger.addHandler(handler)
    try:
        return {"result": call(), "records": records}
    finally:
        logger.removeHandler(handler)


def test_item_correctness_averages_to_lm_evals_accuracy():
    from tiny import byte_tokenizer, tiny_model

    from analysis.evaluation.accuracy import item_correctness
    from analysis.evaluation.heldout import zero_shot_accuracy
    from analysis.data.fetching import is_fetched
    from analysis.data.manifests import load_manifest

    if not is_fetched(load_manifest("math")):
        pytest.skip("the benchmark copies (math manifest) are not fetched; run `calibdrop data fetch`")
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    warnings = lm_eval_warnings(lambda: item_correctness(model, tokenizer, ["arc_easy", "piqa"], limit=6))
    items = warnings.pop("result")
    assert warnings["records"] == [], "lm-eval's start-up warnings reach the user's console"
    assert len(items) == 12 and set(items["correct"]) <= {0, 1} and items["correct_norm"].notna().all()
    assert items.groupby("task")["subtask_items"].first().to_dict() == {"arc_easy": 570, "piqa": 1838}
    ours = accuracy_table(items.assign(drop_set="none")).set_index(["task", "metric"])
    theirs = zero_shot_accuracy(model, tokenizer, ["arc_easy", "piqa"], limit=6).set_index(["task", "metric"])
    assert ours["value"].to_dict() == pytest.approx(theirs["value"].loc[ours.index].to_dict())
    assert len(ours) == len(theirs)


def test_report_section_shows_pairs_exclusions_and_items_needed():
    from types import SimpleNamespace

    from analysis.report.sections import Results, section_accuracy

    base, pruned = [1] * 60 + [0] * 40, [1] * 50 + [0] * 10 + [1] * 2 + [0] * 38
    items = fake_items({"arc_easy": {"none": base, "pruned": pruned}, "boolq": {"none": [1] * 52 + [0] * 48, "pruned": base}},
                       sizes={"arc_easy": 570, "boolq": 3270})
    paired, tasks = accuracy_analysis(items, [("pruned vs unpruned", "pruned", "none")], task_limit=100, n_boot=200)
    tables = {"accuracy": accuracy_table(items), "accuracy_paired": paired, "accuracy_tasks": tasks}
    text = "\n".join(section_accuracy(Results({}, SimpleNamespace(task_limit=100, accuracy_labels=("none", "{answers}")), pd.DataFrame(), tables, [])))
    assert "### Paired on the same items" in text
    assert re.search(r"\| pruned vs unpruned +\| arc_easy +\| acc_norm +\| +100 \| -8.0 \[-1\d.\d, -\d.\d\] +\| 2 / 10 ", text)
    assert "**Excluded**: boolq (acc): the unpruned model scores 0.520 on 100 items" in text
    needed = items_needed(0.12, 0.03)
    assert f"(12% of items) takes {needed:,} items; the run evaluated 100 (task_limit 100) of the task's 570: that does not suffice, nor does the whole task" in text


def test_benjamini_hochberg_over_the_pairs_of_a_measure():
    # two pairs on arc_easy: p1 from 2 vs 10 discordant, p2 = 1 (identical); BH: q1 = min(p1 * 2 / 1, q2), q2 = p2 = 1
    base, pruned = [1] * 60 + [0] * 40, [1] * 50 + [0] * 10 + [1] * 2 + [0] * 38
    items = fake_items({"arc_easy": {"none": base, "pruned": pruned, "same": base}})
    paired, _ = accuracy_analysis(items, [("p", "pruned", "none"), ("s", "same", "none")], task_limit=None, n_boot=100)
    acc = paired[paired["measure"] == "acc"].set_index("comparison")
    p1 = stats.binomtest(2, 12, 0.5).pvalue
    assert acc.loc["p", "q_bh"] == pytest.approx(min(1.0, 2 * p1)) and acc.loc["s", "q_bh"] == pytest.approx(1.0)


def test_no_task_above_chance_gives_an_empty_paired_table():
    weak = [1] * 26 + [0] * 74
    items = fake_items({"arc_easy": {"none": weak, "pruned": weak[::-1]}})
    paired, tasks = accuracy_analysis(items, [("p", "pruned", "none")], task_limit=100, n_boot=100)
    assert paired.empty and not tasks["included"].any() and tasks["items_needed_max"].isna().all() and not tasks["limit_suffices"].any()


def test_cli_evaluate_writes_items_and_pairs_every_set_with_the_unpruned_model(tmp_path, capsys):
    from tiny import byte_tokenizer, tiny_model

    from analysis.cli import main
    from analysis.data.fetching import is_fetched
    from analysis.io import read_table
    from analysis.data.manifests import load_manifest

    if not is_fetched(load_manifest("math")):
        pytest.skip("the benchmark copies (math manifest) are not fetched; run `calibdrop data fetch`")
    tiny_model("llama").save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "set.json").write_text(json.dumps({"module": "attn", "indices": [1, 2], "method": "borda", "metric": "cosine"}))
    args = ["evaluate", "--model", str(tmp_path / "model"), "--drop-sets", str(tmp_path / "set.json"), "--tasks", "arc_easy,piqa",
            "--limit", "8", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    items, table = read_table(tmp_path / "out" / "accuracy_items.parquet"), read_table(tmp_path / "out" / "accuracy.parquet")
    screened = read_table(tmp_path / "out" / "accuracy_tasks.parquet")
    paired = read_table(tmp_path / "out" / "accuracy_paired.parquet")
    assert len(items) == 2 * 2 * 8 and set(items["drop_set"]) == {"none", "set"}
    acc = table[table["metric"] == "acc"].set_index(["drop_set", "task"])["value"]
    assert acc.to_dict() == pytest.approx(items.groupby(["drop_set", "task"])["correct"].mean().to_dict())
    included = screened[screened["included"]]
    assert set(zip(paired["task"], paired["measure"])) == set(zip(included["task"], included["measure"]))
    for row in screened[~screened["included"]].itertuples():
        assert f"not compared: the unpruned model is not clearly above chance on {row.task} ({row.measure})" in printed


def test_a_set_removing_the_same_modules_as_an_earlier_one_takes_its_items(monkeypatch):
    """The joint-8 set of attention layers only is the attention-8 set: the accuracy stage evaluates it once."""
    from types import SimpleNamespace

    import pandas as pd

    from analysis.presets import RunSettings
    from analysis.steps import heldout as stage
    from analysis.study.dropsets import make_drop_set
    from analysis.study.selection import pruned_size
    from tiny import tiny_model

    model = tiny_model("llama")
    sets = {"cosine/attn-2:borda": make_drop_set("attn", [0, 2], "borda", "cosine"),
            "cosine/joint-2:borda": make_drop_set("joint", ["attn:2", "attn:0"], "borda", "cosine"),
            "cosine/mlp-1:borda": make_drop_set("mlp", [1], "borda", "cosine")}
    calls = []

    def items(model, tokenizer, name, drop_set, tasks, limit=None, kept=None):
        calls.append(name)
        return pd.DataFrame({"task": ["t"] * 2, "item": [0, 1], "correct": [len(calls) % 2, 1], "drop_set": name})

    monkeypatch.setattr(stage.accuracy, "items_of_set", items)
    settings = RunSettings(tasks=("t",), accuracy_sets=("none", *sets))
    study = SimpleNamespace(settings=settings, results={"pruned": pruned_size(model, sets)}, model=model,
                            tokenizer=None, progress=False, store=SimpleNamespace(model_record={"spec": "tiny"}),
                            part=lambda kind, name, compute: compute())
    monkeypatch.setattr(stage.accuracy, "accuracy_table", lambda items: items)
    result = stage.stage_accuracy(study)["accuracy_items"]
    assert calls == ["none", "cosine/attn-2:borda", "cosine/mlp-1:borda"]
    joint, attn = (result[result["drop_set"] == name].drop(columns="drop_set").reset_index(drop=True)
                   for name in ("cosine/joint-2:borda", "cosine/attn-2:borda"))
    pd.testing.assert_frame_equal(joint, attn)
    assert list(dict.fromkeys(result["drop_set"])) == ["none", *sets]

    # after a sequential held-out evaluation only the sets still in the race (and the unpruned model) are evaluated
    calls.clear()
    monkeypatch.setattr(stage, "in_the_race",
                        lambda study, groups=None: {"cosine/mlp-1:borda": sets["cosine/mlp-1:borda"]})
    result = stage.stage_accuracy(study)["accuracy_items"]
    assert calls == ["none", "cosine/mlp-1:borda"] and set(result["drop_set"]) == {"none", "cosine/mlp-1:borda"}

    # {answers}: each module kind and budget's resolved answer (rank 1 of a resolved group), whatever built it
    calls.clear()
    groups = pd.DataFrame({"module": ["attn", "attn", "mlp", "joint"], "k": [2, 2, 1, 2], "rank": [1, 2, 1, 1],
                           "resolved": [True, True, False, True],
                           "drop_set": ["cosine/attn-2:borda", "cosine/mlp-1:borda", "cosine/mlp-1:borda",
                                        "cosine/joint-2:borda"]})
    monkeypatch.setattr(stage, "in_the_race", lambda study, groups=None: sets)
    monkeypatch.setattr(stage, "resolved_groups", lambda study: groups)
    study.settings = RunSettings(tasks=("t",), accuracy_sets=("none", "{answers}"))
    result = stage.stage_accuracy(study)["accuracy_items"]
    assert calls == ["none", "cosine/attn-2:borda"]
    assert list(dict.fromkeys(result["drop_set"])) == ["none", "cosine/attn-2:borda", "cosine/joint-2:borda"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_kept_inputs_give_each_pruned_copys_logits_bit_for_bit(family):
    """A drop set resumed from the unpruned model's kept block input at its first removed layer computes the logits
    of a deep copy with the set removed, on batches the unpruned model ran, and on a batch it did not."""
    import copy

    import torch

    from analysis.evaluation.accuracy import KeptInputs
    from analysis.evaluation.heldout import removed_modules
    from analysis.models.pruning import drop_modules
    from analysis.study.dropsets import make_drop_set
    from tiny import tiny_model

    model = tiny_model(family)
    sets = [make_drop_set("attn", [1], "borda"), make_drop_set("mlp", [0, 2], "borda"),
            make_drop_set("block", [2], "borda"), make_drop_set("joint", ["attn:2", "mlp:1"], "borda")]
    kept = KeptInputs.for_sets(sets)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(2, 200, (3, length), generator=generator) for length in (17, 9)]
    unseen = torch.randint(2, 200, (2, 11), generator=generator)
    with torch.no_grad():
        for ids in batches:
            assert torch.equal(kept.logits(model, ids), model(ids, use_cache=False).logits)
        assert kept.kept_bytes > 0 and {layer for _, layer in kept.inputs} == {0, 1, 2}
        for chosen in sets:
            pruned = drop_modules(copy.deepcopy(model), **chosen.drop_kwargs())
            for ids in [*batches, unseen]:
                assert torch.equal(kept.logits(model, ids, removed_modules(chosen)), pruned(ids, use_cache=False).logits)
