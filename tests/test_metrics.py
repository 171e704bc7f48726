import numpy as np
import pandas as pd
import pytest

from analysis import adapter_for, score_texts
from analysis.importance.ablation import greedy_drop_path, greedy_set
from analysis.errors import InputError
from analysis.importance.metrics import METRICS, register_metric
from analysis.data.samples import tokenize_texts

from reference import reference_importance, slow_ablation, slow_greedy
from tiny import CONFIGS, byte_tokenizer, tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2",
    "Ein kurzer Satz.",
    "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants in mathematics.",
]
PROXIES = ("cosine", "angular", "relative_update")


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_proxy_matches_an_independent_float64_computation(family):
    model, tokenizer = tiny_model(family), byte_tokenizer()
    adapter = adapter_for(model)
    got = score_texts(model, tokenizer, TEXTS, batch_size=3, max_length=64, metrics=PROXIES, progress=False)
    sequences = tokenize_texts(tokenizer, TEXTS, 64)
    for metric in PROXIES:
        want = reference_importance(model, sequences, adapter.attn, adapter.mlp, adapter.is_parallel(model.config), metric=metric)
        merged = got[got["metric"] == metric].merge(want, on=["layer", "module"], suffixes=("", "_ref"))
        assert len(merged) == 3 * model.config.num_hidden_layers
        np.testing.assert_allclose(merged["importance"], merged["importance_ref"], atol=1e-5, err_msg=metric)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_ablation_equals_drop_modules_on_a_copy(family):
    model, tokenizer = tiny_model(family), byte_tokenizer()
    got = score_texts(model, tokenizer, TEXTS, batch_size=3, max_length=64, metrics=("ablation",), progress=False)
    want = slow_ablation(model, tokenize_texts(tokenizer, TEXTS, 64))
    merged = got.merge(want, on=["layer", "module"], suffixes=("", "_ref"))
    assert len(merged) == 3 * model.config.num_hidden_layers
    np.testing.assert_allclose(merged["importance"], merged["importance_ref"], atol=1e-5)
    assert (got["n_tokens"] == sum(len(s) - 1 for s in tokenize_texts(tokenizer, TEXTS, 64))).all()


def test_ablation_with_padding_matches_each_text_alone():
    model, tokenizer = tiny_model("llama"), byte_tokenizer(padding_side="left")
    batch = score_texts(model, tokenizer, TEXTS, batch_size=len(TEXTS), metrics=("ablation",), per_sample=True, progress=False)
    alone = score_texts(model, tokenizer, TEXTS[2:3], metrics=("ablation",), per_sample=True, progress=False)
    np.testing.assert_allclose(batch[batch["sample"] == 2]["stat_sum"].to_numpy(), alone["stat_sum"].to_numpy(), atol=1e-4)


def test_proxies_and_ablation_in_one_pass_equal_each_alone():
    model, tokenizer = tiny_model("qwen2"), byte_tokenizer()
    together = score_texts(model, tokenizer, TEXTS, metrics=("cosine", "ablation", "angular"), progress=False)
    for metric in ("cosine", "ablation", "angular"):
        alone = score_texts(model, tokenizer, TEXTS, metrics=(metric,), progress=False)
        np.testing.assert_allclose(together[together["metric"] == metric]["importance"].to_numpy(), alone["importance"].to_numpy(), atol=1e-9)
    assert list(dict.fromkeys(together["metric"])) == ["cosine", "angular", "ablation"]


def _batches(tokenizer, texts):
    from analysis.data.samples import length_sorted_batches, pad_token_id

    return list(length_sorted_batches(tokenize_texts(tokenizer, texts, 64), 2, pad_token_id(tokenizer), tokenizer.padding_side))


@pytest.mark.parametrize("family,module", [("llama", "attn"), ("gemma3", "block"), ("gpt_neox", "joint"), ("qwen3", "mlp")])
def test_greedy_and_robust_greedy_match_the_slow_reference(family, module):
    model, tokenizer = tiny_model(family), byte_tokenizer()
    texts = {"a": TEXTS[:2], "b": TEXTS[2:]}
    batches = {d: _batches(tokenizer, t) for d, t in texts.items()}
    sequences = {d: tokenize_texts(tokenizer, t, 64) for d, t in texts.items()}
    k = 2
    for objective in ("a", "robust"):
        path = greedy_drop_path(model, batches, module=module, k=k, objective=objective)
        want = slow_greedy(model, sequences, module, k, objective)
        assert greedy_set(path, k) == [str(c) for c in want], objective


def _prior(model, sequences, module: str, objective: str) -> dict:
    """Single-drop ablation cost of every candidate (by ``drop_modules`` on copies): the objective's distribution's,
    or the largest over distributions for robust, as the run's greedy stage takes it from the ablation scores."""
    names = list(sequences) if objective == "robust" else [objective]
    costs = [slow_ablation(model, sequences[d]).set_index(["module", "layer"])["importance"] for d in names]
    cost = pd.concat(costs, axis=1).max(axis=1)
    if module == "joint":
        return {f"{kind}:{i}": cost[kind, i] for kind in ("attn", "mlp") for i in range(model.config.num_hidden_layers)}
    return {i: cost[module, i] for i in range(model.config.num_hidden_layers)}


@pytest.mark.parametrize("family,module,n_layers,diverges", [
    ("llama", "attn", 8, {"a": 2, "robust": 2}),  # the shortlist misses the exact search's second step
    ("mistral", "block", 8, {"a": None, "robust": None}),
    ("qwen3", "mlp", 8, {"a": None, "robust": None}),
    ("gpt_neox", "joint", 4, {"a": None, "robust": None}),
])
def test_shortlisted_greedy_against_the_exact_search(family, module, n_layers, diverges):
    """Every preset runs the greedy path with ``greedy_shortlist=4``: each step tries only the 4 remaining candidates of
    smallest single-drop cost.  The shortlisted path equals a slow reference that does the same with copies.  Against the
    exact search it equals step for step while the shortlist holds the exact step's choice; at the first step where it
    does not (``diverges``: that step, or None), the shortlisted step picks another candidate at a cost no lower than the
    exact step's (the exact search minimises over a superset), and the two paths are not compared after it."""
    model, tokenizer = tiny_model(family, n_layers=n_layers), byte_tokenizer()
    texts = {"a": TEXTS[:2], "b": TEXTS[2:]}
    batches = {d: _batches(tokenizer, t) for d, t in texts.items()}
    sequences = {d: tokenize_texts(tokenizer, t, 64) for d, t in texts.items()}
    k, shortlist = 3, 4
    for objective in ("a", "robust"):
        prior = _prior(model, sequences, module, objective)
        exact = greedy_drop_path(model, batches, module=module, k=k, objective=objective).set_index("step")
        short = greedy_drop_path(model, batches, module=module, k=k, objective=objective, shortlist=shortlist, prior=prior).set_index("step")
        assert greedy_set(short.reset_index(), k) == [str(c) for c in slow_greedy(model, sequences, module, k, objective, shortlist, prior)]
        chosen, divergence = [], None
        for step in range(1, k + 1):
            listed = [str(c) for c in sorted((c for c in prior if str(c) not in chosen), key=prior.get)[:shortlist]]
            if exact.loc[step, "candidate"] not in listed:
                divergence = step
                assert short.loc[step, "candidate"] != exact.loc[step, "candidate"]
                assert short.loc[step, "objective_increase"] >= exact.loc[step, "objective_increase"]
                break
            assert short.loc[step, "candidate"] == exact.loc[step, "candidate"]
            assert short.loc[step, "objective_increase"] == pytest.approx(exact.loc[step, "objective_increase"], rel=1e-9, abs=1e-12)
            chosen.append(exact.loc[step, "candidate"])
        assert divergence == diverges[objective], objective


def test_a_registered_metric_scores_and_unknown_metrics_are_refused():
    """A registered ``||Y - X|| / ||X||`` scores like the hook-free float64 reference of that statistic (a known answer)."""
    register_metric("update_norm_test", lambda pair: pair.update_norm / pair.x_norm, replace=True)
    try:
        model, tokenizer = tiny_model("llama"), byte_tokenizer()
        got = score_texts(model, tokenizer, TEXTS, max_length=64, metrics=("update_norm_test",), progress=False)
        assert set(got["metric"]) == {"update_norm_test"}
        adapter = adapter_for(model)
        want = reference_importance(model, tokenize_texts(tokenizer, TEXTS, 64), adapter.attn, adapter.mlp, False, metric="relative_update")
        merged = got.merge(want, on=["layer", "module"], suffixes=("", "_ref"), validate="one_to_one")
        assert len(merged) == 3 * model.config.num_hidden_layers
        np.testing.assert_allclose(merged["importance"], merged["importance_ref"], atol=1e-5)
        with pytest.raises(InputError, match="unknown metric 'nope'.*cosine"):
            score_texts(model, tokenizer, TEXTS, metrics=("nope",), progress=False)
        with pytest.raises(InputError, match="already registered"):
            register_metric("cosine", lambda pair: pair.cos)
        # a metric with no per-token statistic has no scoring pass (only the built-in ground truth has one)
        with pytest.raises(InputError, match="'no_statistic' must be a function of a TokenPair"):
            register_metric("no_statistic", None)
        assert "no_statistic" not in METRICS
    finally:
        METRICS.pop("update_norm_test")
