"""The command line: `calibdrop run --preset smoke` on the real default model (every stage, once per session) with its numbers
checked against independent computations, the commands that read a run, and clear errors."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from analysis.evaluation.heldout import heldout_samples, pruned_copy, window_nll
from analysis.importance.scoring import calibration_windows, score_texts
from analysis.models import loading as models
from analysis.presets import PRESETS
from analysis.study.consensus import consensus_drop_set
from analysis.study.selection import sets_from_table

from conftest import cli
from reference import sequence_nll

SMOKE = PRESETS["smoke"]


@pytest.mark.real_model
def test_smoke_run_writes_report_figures_and_every_stage(smoke_run):
    summary = json.loads((smoke_run / "run_summary.json").read_text())
    report = (smoke_run / "report.md").read_text()
    assert summary["figures"] > 40 and "report" in report and "## Pruned models on held-out text" in report
    assert not summary["stages_reused"]
    assert {"scores.proxies", "scores.ablation", "subsets.per_sample", "agreement", "validity", "drop_sets", "leave_one_out", "greedy",
            "heldout_windows", "accuracy", "check", "routing"} <= set(summary["stages_computed"])
    accuracy = pd.read_parquet(smoke_run / "accuracy_items.parquet")
    assert set(accuracy["drop_set"]) == set(SMOKE.accuracy_labels) and len(accuracy) == len(SMOKE.accuracy_labels) * SMOKE.task_limit


@pytest.mark.real_model
def test_smoke_score_rows_equal_score_texts_on_the_same_windows(smoke_run, smollm2):
    """The run's per-sample rows of one distribution equal ``score_texts`` on its calibration windows as texts
    (each window decodes to a text that tokenizes back to the same ids, so both score the same tokens)."""
    model, tokenizer = smollm2
    windows = calibration_windows("math", tokenizer, n_samples=SMOKE.samples, seq_len=SMOKE.seq_len, seed=SMOKE.seed)["input_ids"]
    texts = [tokenizer.decode(ids) for ids in windows]
    assert [tokenizer(text)["input_ids"] for text in texts] == windows
    want = score_texts(model, tokenizer, texts, max_length=SMOKE.seq_len, metrics=("cosine", "angular", "relative_update"),
                       per_sample=True, progress=False)
    saved = pd.read_parquet(smoke_run / "scores.per_sample.parquet")
    got = saved[(saved["distribution"] == "math") & (saved["metric"] != "ablation")]
    merged = got.merge(want, on=["metric", "sample", "layer", "module"], suffixes=("", "_texts"), validate="one_to_one")
    assert len(merged) == len(want) == 3 * SMOKE.samples * 30 * 3
    assert (merged["n_tokens"] == merged["n_tokens_texts"]).all()
    np.testing.assert_allclose(merged["stat_sum"], merged["stat_sum_texts"], rtol=1e-5, atol=1e-6)


def _matrix(scores: pd.DataFrame, metric: str, module: str) -> pd.DataFrame:
    """Candidates x distributions importance by a plain groupby: cosine ``1 - sum(cos) / tokens``, else ``sum / tokens``."""
    rows = scores[scores["metric"] == metric]
    if module == "joint":
        rows = rows[rows["module"].isin(["attn", "mlp"])].assign(candidate=lambda f: f["module"] + ":" + f["layer"].astype(str))
    else:
        rows = rows[rows["module"] == module].assign(candidate=lambda f: f["layer"].astype(str))
    sums = rows.groupby(["candidate", "distribution"])[["stat_sum", "n_tokens"]].sum()
    mean = sums["stat_sum"] / sums["n_tokens"]
    return (1 - mean if metric == "cosine" else mean).unstack("distribution")


@pytest.mark.real_model
@pytest.mark.parametrize("metric", ["cosine", "ablation"])
def test_smoke_drop_sets_equal_the_consensus_recomputed_from_saved_scores(smoke_run, metric):
    """Borda by plain average ranks and minimax by brute force over every size-k set, from the saved per-sample scores."""
    scores = pd.read_parquet(smoke_run / "scores.per_sample.parquet")
    sets = pd.read_parquet(smoke_run / "drop_sets.parquet")
    for module, (k,) in SMOKE.budgets.items():
        matrix = _matrix(scores, metric, module)
        chosen = sets[(sets["metric"] == metric) & (sets["module"] == module) & (sets["k"] == k)].set_index("drop_set")["indices"]
        ranks = np.column_stack([rankdata(matrix[d]) for d in matrix.columns]).mean(axis=1)
        borda = set(matrix.index[np.argsort(ranks, kind="stable")[:k]])
        assert set(chosen["borda"]) == borda, (module, chosen["borda"], borda)
        values, labels = matrix.to_numpy(), list(matrix.index)
        best = np.sort(values, axis=0)[:k].sum(axis=0)
        worst = {c: (values[list(c)].sum(axis=0) - best).max() for c in itertools.combinations(range(len(labels)), k)}
        minimax = tuple(sorted(labels.index(c) for c in chosen["minimax"]))
        assert worst[minimax] == pytest.approx(min(worst.values()), abs=1e-12)
        for d in matrix.columns:
            assert set(chosen[f"own:{d}"]) == set(matrix[d].nsmallest(k).index)
        assert sorted(map(str, consensus_drop_set(scores, module=module, k=k, method="borda", metric=metric))) == sorted(chosen["borda"])


@pytest.mark.real_model
def test_smoke_heldout_nll_equals_a_pruned_copy(smoke_run, smollm2):
    """One held-out window's NLL under the run's borda set equals a deep copy with that set removed, evaluated one window at a
    time by a plain forward pass (and by ``window_nll`` of the copy)."""
    model, tokenizer = smollm2
    chosen = sets_from_table(pd.read_parquet(smoke_run / "pruned.parquet"))["cosine/attn-2:borda"]
    windows = pd.read_parquet(smoke_run / "heldout_windows.parquet").set_index(["drop_set", "distribution", "window"])
    samples = heldout_samples(tokenizer, ["general"], n_samples=SMOKE.transfer_samples, seq_len=SMOKE.transfer_seq_len, seed=SMOKE.seed)
    pruned = pruned_copy(model, chosen)
    assert pruned.config.calibdrop_pruning["attn"] == sorted(chosen.indices) and not hasattr(model.config, "calibdrop_pruning")
    for window in (0, SMOKE.transfer_samples - 1):
        nll, count = sequence_nll(pruned, [samples["general"]["input_ids"][window]])
        saved = windows.loc[(chosen.label, "general", window)]
        assert saved["n_tokens"] == count
        # float32 logits: the run's cross-entropy (over the (batch, vocab, tokens) layout) and the reference's (float64) differ
        # by about 3e-5 relative on the real model; dropping the set moves the NLL by 100x more than that tolerance
        assert saved["nll_sum"] == pytest.approx(nll, rel=1e-4)
        assert abs(saved["nll_sum"] - windows.loc[("none", "general", window), "nll_sum"]) > 1e-4 * nll
    copy_rows = window_nll(pruned, samples, {"copy": None}).set_index("window")["nll_sum"]
    saved = [windows.loc[(chosen.label, "general", w), "nll_sum"] for w in range(SMOKE.transfer_samples)]
    np.testing.assert_allclose(copy_rows.sort_index().to_numpy(), saved, rtol=1e-6)


@pytest.mark.real_model
def test_compare_consensus_and_prune_read_the_smoke_run(smoke_run, tmp_path):
    compare = cli("compare", str(smoke_run), "--modules", "attn", "--k", "2,4", "--n-boot", "50", "--n-perm", "50",
                        "--out", str(tmp_path / "cmp"))
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert (tmp_path / "cmp" / "permutation.parquet").exists() and (tmp_path / "cmp" / "figures" / "cosine" / "similarity_attn_spearman.svg").exists()
    agreement = pd.read_parquet(tmp_path / "cmp" / "agreement.parquet")
    assert set(agreement["metric"]) == {"cosine", "angular", "relative_update", "ablation"} and set(agreement["module"]) == {"attn"}
    ran = pd.read_parquet(smoke_run / "agreement.parquet")
    merged = agreement.merge(ran[ran["module"] == "attn"], on=["metric", "module", "a", "b"], suffixes=("", "_run"), validate="one_to_one")
    assert len(merged) == len(agreement) == 4 * 3
    np.testing.assert_array_equal(merged[["spearman", "jaccard@2"]].to_numpy(), merged[["spearman_run", "jaccard@2_run"]].to_numpy())
    consensus = cli("consensus", str(smoke_run / "scores.per_sample.parquet"), "--module", "attn", "--k", "4",
                          "--method", "minimax", "--out", str(tmp_path / "set.json"))
    assert consensus.returncode == 0, consensus.stderr[-2000:]
    record = json.loads((tmp_path / "set.json").read_text())
    assert record["module"] == "attn" and len(record["indices"]) == 4 and record["method"] == "minimax" and record["metric"] == "cosine"
    pruned = cli("prune", "--drop-set", str(tmp_path / "set.json"), "--out", str(tmp_path / "pruned"))
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    reloaded, _ = models.load_model(str(tmp_path / "pruned"))
    assert reloaded.config.calibdrop_pruning["attn"] == sorted(record["indices"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["score"], "give either --texts FILE.jsonl or --distributions"),
        (["score", "--texts", "missing.jsonl"], "texts file missing.jsonl does not exist"),
        (["score", "--distributions", "poetry"], "unknown distribution 'poetry'"),
        (["compare", "nowhere"], "no per-sample scores at nowhere"),
        (["prune", "--drop-set", "missing.json", "--out", "x"], "drop-set file missing.json does not exist"),
        (["evaluate"], "nothing to evaluate"),
        (["check", "--model", "m", "--drop-set", "s.json", "--alpha=--"], "argument --alpha: '--' is not a value"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_registered_metric_flows_through_compare_and_consensus(tmp_path, capsys):
    from analysis import score_texts, write_table
    from analysis.cli import main
    from analysis.importance.metrics import METRICS, register_metric

    from tiny import byte_tokenizer, tiny_model

    register_metric("update_norm_cli", lambda pair: pair.update_norm, replace=True)
    try:
        model, tokenizer = tiny_model("llama"), byte_tokenizer()
        texts = {"prose": ["The cat sat on the mat today.", "A long walk in the park.", "Rain again.", "Tea, then bed."],
                 "code": ["def f(x): return x", "for i in range(3): pass", "x = [1, 2, 3]", "import os; os.sep"],
                 "numbers": ["1 + 2 = 3", "3.14159 2.71828", "10 / 5 = 2", "2 ** 10 = 1024"]}
        rows = pd.concat([score_texts(model, tokenizer, t, metrics=("cosine", "update_norm_cli"), per_sample=True, progress=False).assign(distribution=d)
                          for d, t in texts.items()], ignore_index=True)
        write_table(rows, tmp_path / "mine.per_sample.parquet", {"kind": "scores-per-sample"})
        assert main(["compare", str(tmp_path / "mine.per_sample.parquet"), "--modules", "attn", "--k", "1", "--n-boot", "40",
                     "--n-perm", "20", "--out", str(tmp_path / "cmp")]) == 0
        assert set(pd.read_parquet(tmp_path / "cmp" / "agreement.parquet")["metric"]) == {"cosine", "update_norm_cli"}
        assert (tmp_path / "cmp" / "figures" / "update_norm_cli" / "similarity_attn_spearman.png").exists()
        assert main(["consensus", str(tmp_path / "mine.per_sample.parquet"), "--metric", "update_norm_cli", "--k", "1", "--out", str(tmp_path / "s.json")]) == 0
        record = json.loads((tmp_path / "s.json").read_text())
        assert record["metric"] == "update_norm_cli" and len(record["indices"]) == 1
    finally:
        METRICS.pop("update_norm_cli")
