"""`check`: does a drop set hold on the user's texts? Known answers on a tiny 12-layer model."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis.importance.ablation import full_row_nll
from analysis.evaluation.check import _verdict, check, drop_set_record, load_source_scores
from analysis.errors import InputError
from analysis.evaluation.heldout import pruned_copy
from analysis.io import write_table
from analysis.importance.scoring import score_texts, tokenize_texts

from test_routing import deep_llama
from tiny import byte_tokenizer


def prose(rng, n):
    return [" ".join("".join(rng.choice(list("etaoinshrdlu"), size=rng.integers(2, 7))) for _ in range(30)) for _ in range(n)]


def digits(rng, n):
    return ["".join(rng.choice(list("0123456789+-=*"), size=120)) for _ in range(n)]


@pytest.fixture(scope="module")
def setting():
    """The model, its tokenizer, calibration scores of two distributions and fresh texts of each."""
    model, tokenizer, rng = deep_llama(), byte_tokenizer(), np.random.default_rng(0)
    calibration = {"prose": prose(rng, 24), "digits": digits(rng, 24)}
    rows = pd.concat([score_texts(model, tokenizer, texts, per_sample=True, progress=False).assign(distribution=name)
                      for name, texts in calibration.items()], ignore_index=True)
    return model, tokenizer, rows, calibration, {"prose": prose(rng, 24), "digits": digits(rng, 24)}


def test_texts_of_the_calibration_distribution_keep_the_drop_set(setting):
    model, tokenizer, rows, _, fresh = setting
    record = drop_set_record(rows, module="attn", k=4, method="own:prose")
    result = check(model, tokenizer, record, fresh["prose"], source_scores=rows, n_perm=300)
    assert result.verdict == "keep" and not result.drift
    assert result.recommendation.startswith("keep the drop set: on your 24 texts")
    assert result.summary.loc[0, "p_permutation"] > 0.05


def test_a_different_distribution_is_flagged_as_drift(setting):
    model, tokenizer, rows, _, fresh = setting
    record = drop_set_record(rows, module="attn", k=3, method="own:prose")
    result = check(model, tokenizer, record, fresh["digits"], source_scores=rows, n_perm=300)
    assert result.drift and result.summary.loc[0, "p_permutation"] < 0.01
    # the prose set drops more importance on digits than the best set; the consensus of prose and digits does not
    assert result.summary.loc[0, "excess"] > 0.1 and result.summary.loc[0, "consensus_excess"] <= 0.1
    assert result.verdict == "consensus" and result.recommendation.startswith("use the consensus set")


def test_numbers_match_an_independent_computation(setting):
    model, tokenizer, rows, calibration, fresh = setting
    record = drop_set_record(rows, module="attn", k=3, method="own:prose")
    result = check(model, tokenizer, record, fresh["digits"], source_scores=rows, n_perm=50, n_splits=20)
    reference = score_texts(model, tokenizer, calibration["prose"], progress=False)
    yours = score_texts(model, tokenizer, fresh["digits"], progress=False)
    ref_attn = reference[reference["module"] == "attn"]["importance"].to_numpy()
    your_attn = yours[yours["module"] == "attn"]["importance"].to_numpy()
    assert result.summary.loc[0, "spearman"] == pytest.approx(stats.spearmanr(ref_attn, your_attn).statistic)
    assert sorted(record["indices"]) == sorted(np.argsort(ref_attn)[:3].tolist())
    best = np.sort(your_attn)[:3].sum()
    regret = your_attn[record["indices"]].sum() - best
    assert result.summary.loc[0, "regret"] == pytest.approx(regret)
    assert result.summary.loc[0, "excess"] == pytest.approx(regret / best)
    assert sorted(result.recalibrated) == sorted(np.argsort(your_attn)[:3].tolist())


def test_measured_loss_equals_the_pruned_model_on_the_same_texts(setting):
    model, tokenizer, rows, _, fresh = setting
    record = drop_set_record(rows, module="attn", k=3, method="own:prose")
    result = check(model, tokenizer, record, fresh["digits"], source_scores=rows, n_perm=50, n_splits=20, loss_samples=6, n_boot=100)
    chosen = sorted(result.loss["n_windows"].unique())
    assert chosen == [6]
    texts = fresh["digits"]
    picked = np.sort(np.random.default_rng(0).choice(len(texts), size=6, replace=False))
    sequences = tokenize_texts(tokenizer, [texts[i] for i in picked], 512)
    pruned = pruned_copy(copy.deepcopy(model), record)
    total = {"full": 0.0, "pruned": 0.0}
    tokens = 0
    for seq in sequences:
        ids = torch.tensor([seq])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            total["full"] += float(full_row_nll(model, ids, mask)[0].sum())
            nll, n = full_row_nll(pruned, ids, mask)
        total["pruned"] += float(nll.sum())
        tokens += int(n.sum())
    ratio = result.loss.set_index("role").loc["drop_set", "ppl_ratio"]
    assert ratio == pytest.approx(np.exp((total["pruned"] - total["full"]) / tokens), rel=1e-5)
    assert set(result.paired["comparison"]) == {"drop_set vs recalibrated", "consensus vs recalibrated"}
    with pytest.raises(InputError, match="at most half"):
        check(model, tokenizer, record, texts, source_scores=rows, loss_samples=13)


@pytest.mark.parametrize("drift, acceptable, has_consensus, want", [
    (False, {"drop_set": False, "consensus": False}, True, "keep"),
    (True, {"drop_set": True, "consensus": False}, True, "keep"),
    (True, {"drop_set": False, "consensus": True}, True, "consensus"),
    (True, {"drop_set": False, "consensus": True}, False, "recalibrate"),
    (True, {"drop_set": False, "consensus": False}, True, "recalibrate"),
])
def test_verdict_rule(drift, acceptable, has_consensus, want):
    assert _verdict(drift, acceptable, has_consensus) == want


def test_drop_set_points_to_its_scores_and_notices_changes(setting, tmp_path):
    _, _, rows, _, _ = setting
    path = write_table(rows, tmp_path / "scores.per_sample.parquet", {"kind": "scores-per-sample"})
    record = drop_set_record(rows, module="attn", k=4, method="borda", per_sample_path=path)
    assert record["distributions"] == ["prose", "digits"] and record["scores"]["path"] == str(path.resolve())
    json.dumps(record)
    pd.testing.assert_frame_equal(load_source_scores(record).reset_index(drop=True), rows.reset_index(drop=True), check_dtype=False)
    write_table(rows.head(10), path, {"kind": "scores-per-sample"})
    with pytest.raises(InputError, match="changed since the drop set was made"):
        load_source_scores(record)
    with pytest.raises(InputError, match="does not name its source scores"):
        load_source_scores({"module": "attn", "indices": [1]})
    with pytest.raises(InputError, match="no distribution 'code'"):
        drop_set_record(rows, method="own:code")


def test_cli_check_reads_the_consensus_json_and_writes_tables(setting, tmp_path, capsys):
    from analysis.cli import main

    model, tokenizer, rows, _, fresh = setting
    checkpoint = tmp_path / "model"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    write_table(rows, tmp_path / "cal.per_sample.parquet", {"kind": "scores-per-sample"})
    assert main(["consensus", str(tmp_path / "cal.per_sample.parquet"), "--k", "3", "--out", str(tmp_path / "set.json")]) == 0
    record = json.loads((tmp_path / "set.json").read_text())
    assert record["scores"]["path"] == str((tmp_path / "cal.per_sample.parquet").resolve())
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in fresh["prose"]))
    args = ["check", "--model", str(checkpoint), "--drop-set", str(tmp_path / "set.json"), "--texts", str(tmp_path / "texts.jsonl"),
            "--n-perm", "50", "--max-length", "200", "--out", str(tmp_path / "check")]
    assert main(args) == 0
    out = capsys.readouterr().out
    want = check(model, tokenizer, record, fresh["prose"], n_perm=50, max_length=200)
    assert want.recommendation in out
    assert pd.read_parquet(tmp_path / "check" / "check_summary.parquet").loc[0, "verdict"] == want.verdict
    del record["scores"]
    (tmp_path / "old.json").write_text(json.dumps(record))
    assert main([*args[:3], "--drop-set", str(tmp_path / "old.json"), *args[5:-1], str(tmp_path / "check-old")]) == 2
    assert "does not name its source scores" in capsys.readouterr().err
