"""Drop sets: one label rule, one family builder, one JSON format, the drop_modules arguments."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.study import dropsets
from analysis.errors import InputError
from analysis.models.pruning import modules_dropped
from tests.tiny import tiny_model


def per_sample(columns: dict[str, list[float]], n_samples: int = 4) -> pd.DataFrame:
    """Per-sample cosine rows where every sample of distribution d has importance columns[d][layer]."""
    rows = [{"metric": "cosine", "distribution": d, "sample": s, "layer": i, "module": "attn", "stat_sum": 10 * (1 - v), "n_tokens": 10}
            for d, values in columns.items() for s in range(n_samples) for i, v in enumerate(values)]
    return pd.DataFrame(rows)


SCORES = per_sample({"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.5, 0.1, 0.2, 0.3, 0.4], "c": [0.1, 0.5, 0.2, 0.3, 0.4]})


def test_family_holds_each_method_each_own_set_and_random_sets_with_known_members():
    family = dropsets.drop_set_family(SCORES, module="attn", k=2, random_seeds=(0, 1))
    assert family["cosine/attn-2:own:a"].indices == (0, 1)
    assert family["cosine/attn-2:own:b"].indices == (1, 2)
    assert family["cosine/attn-2:own:c"].indices == (0, 2)
    # mean ranks: layer 0 (1+5+1)/3, layer 1 (2+1+5)/3, layer 2 (3+2+2)/3 = 2.33 lowest, then layer 0 = 2.33 tie, layer 1 = 2.67
    assert set(family["cosine/attn-2:borda"].indices) == {0, 2}
    assert family["cosine/attn-2:borda"].sources == ("a", "b", "c") and family["cosine/attn-2:own:b"].sources == ("b",)
    assert {label for label in family if ":random:" in label} == {"cosine/attn-2:random:0", "cosine/attn-2:random:1"}
    assert all(chosen.k == 2 and chosen.label == label for label, chosen in family.items())


@pytest.mark.parametrize("label", ["cosine/attn-8:borda", "ablation/joint-4:greedy:robust", "angular/mlp-2:own:code/go", "none"])
def test_labels_read_back(label):
    parsed = dropsets.parse_label(label)
    if label == dropsets.UNPRUNED:
        assert parsed["method"] == "none"
        return
    assert dropsets.make_drop_set(parsed["module"], range(parsed["k"]) if parsed["module"] != "joint" else
                                  [f"attn:{i}" for i in range(parsed["k"])], parsed["method"], parsed["metric"]).label == label


def test_a_drop_set_round_trips_through_its_json_and_drops_the_same_modules(tmp_path):
    chosen = dropsets.make_drop_set("joint", ["mlp:1", "attn:0"], "borda", "cosine", ("a", "b"))
    path = tmp_path / "set.json"
    path.write_text(json.dumps(chosen.record()))
    record = dropsets.read_drop_set(path)
    assert dropsets.as_drop_set(record) == chosen and record["file"] == str(path)
    assert chosen.drop_kwargs() == {"joint": ["mlp:1", "attn:0"]} and chosen.sorted_indices() == ["attn:0", "mlp:1"]
    model = tiny_model("llama")
    with modules_dropped(model, chosen.candidates()) as pruned:
        names = {name.split(".")[-1] for name, module in pruned.named_modules() if type(module).__name__ == "DroppedBranch"}
    assert names == {"self_attn", "mlp"}


def test_sorted_indices_order_layers_numerically():
    assert dropsets.make_drop_set("attn", [10, 2, 3], "borda").sorted_indices() == [2, 3, 10]
    assert dropsets.make_drop_set("joint", ["mlp:10", "attn:2", "mlp:2"], "borda").sorted_indices() == ["attn:2", "mlp:2", "mlp:10"]


def test_a_bad_drop_set_file_says_what_is_wrong(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"module": "attn", "indices": [1, 1]}))
    with pytest.raises(InputError, match="lists a module twice"):
        dropsets.read_drop_set(path)


def test_random_sets_are_seeded_and_uniform():
    matrix = pd.DataFrame({"a": np.arange(10.0)}, index=range(10))
    draws = [dropsets.random_drop_set(matrix, "attn", 3, seed, "cosine").indices for seed in range(400)]
    assert dropsets.random_drop_set(matrix, "attn", 3, 7, "cosine").indices == draws[7]
    counts = np.bincount(np.concatenate(draws), minlength=10)
    assert counts.min() > 80 and counts.max() < 160
