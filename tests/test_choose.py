"""`calibdrop choose`: the windows it cuts, the halves, the pick and its confirmation against a direct computation on
the tiny run, and one clear line for an empty file, too few texts and a run of another model."""

import json
import math

import pandas as pd
import pytest
from conftest import cli
from tiny import byte_tokenizer, tiny_model

from analysis.data.documents import load_distribution
from analysis.evaluation import choose as choosing
from analysis.io import read_table
from analysis.study import recommend
from analysis.study.dropsets import UNPRUNED


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_text_windows_cut_each_text_and_skip_what_predicts_nothing():
    tokenizer = byte_tokenizer()
    with pytest.warns(UserWarning, match="1 text"):
        windows = choosing.text_windows(tokenizer, ["a" * 50, "b", "c" * 10], seq_len=16, max_windows_per_text=2)
    assert [len(w) for w in windows["input_ids"]] == [16, 16, 10] and windows["text"] == [0, 0, 2]


def test_halves_split_the_texts_in_two_disjoint_parts():
    first, second = choosing.halves(9, seed=3)
    assert len(first) == 4 and len(second) == 5 and not set(first) & set(second)
    assert sorted([*first, *second]) == list(range(9))


def test_the_pick_is_the_lowest_on_the_choosing_half_and_is_judged_on_the_other(tiny_run, tmp_path):
    folder = tiny_run[0]
    texts = load_distribution("legal", "heldout")["text"][:12]
    result = cli("choose", folder, "--texts", write_texts(tmp_path / "t.jsonl", texts), "--seq-len", "32",
                 "--n-boot", "200", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    choice = read_table(tmp_path / "out" / "choose_choice.parquet")
    windows = read_table(tmp_path / "out" / "choose_windows.parquet")
    # a direct computation from the per-window NLL: each set's ratio on each half, the pick the lowest on the first
    totals = windows.groupby(["half", "drop_set"])[["nll_sum", "n_tokens"]].sum()
    for (module, k), part in choice.groupby(["module", "k"]):
        ratio = {half: {name: math.exp((totals.loc[(half, name), "nll_sum"] - totals.loc[(half, UNPRUNED), "nll_sum"])
                                       / totals.loc[(half, UNPRUNED), "n_tokens"]) for name in part["drop_set"]}
                 for half in ("choose", "confirm")}
        assert part["drop_set"].iloc[0] == min(ratio["choose"], key=ratio["choose"].get)
        assert part["ppl_ratio"].tolist() == pytest.approx([ratio["confirm"][n] for n in part["drop_set"]])
        assert part["level"].eq(0.05).all() and part["status"].nunique() == 1
        assert f"{module}-{k}: {part['status'].iloc[0]}" in result.stdout
    # the candidates: the run's leading sets, its answer's group and its baselines, never a random set
    groups = read_table(folder / "set_groups.parquet")
    assert set(choice["drop_set"]) == set(choosing.candidate_sets(groups)["drop_set"])
    assert not choice["drop_set"].str.contains(":random").any()


@pytest.mark.parametrize("lines, message", [
    ([], "holds no texts"),
    (["one", "two", "three"], "give at least 4 texts"),
])
def test_too_little_text_is_one_line(tiny_run, tmp_path, lines, message):
    result = cli("choose", tiny_run[0], "--texts", write_texts(tmp_path / "t.jsonl", lines))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_of_another_model_is_one_line(tiny_run, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    texts = load_distribution("legal", "heldout")["text"][:8]
    result = cli("choose", tiny_run[0], "--texts", write_texts(tmp_path / "t.jsonl", texts), "--model", other)
    assert result.returncode == 2 and "the run was made with" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_set_groups_table_from_before_member_recommendations_is_refused():
    old = pd.DataFrame([{"module": "attn", "k": 2, "drop_set": "cosine/attn-2:borda", "rank": 1, "in_group": True}])
    with pytest.raises(Exception, match="predates member recommendations"):
        choosing.candidate_sets(old)
    assert recommend.MARGIN == 0.02
