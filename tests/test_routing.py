"""Input-adaptive drop sets: routed inference equals the pruned models, an oracle router equals the own sets."""

import copy

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from analysis.study.dropsets import make_drop_set
from analysis.errors import InputError
from analysis.evaluation.heldout import pruned_copy, window_nll
from analysis.evaluation.routing import (RoutedModel, Router, calibration_features, check_routing_layer, fit_router, prefix,
                                        prefix_features, routed_from_static, routed_window_nll, router_accuracy,
                                        router_from_features, routing_layer, window_features, window_routes)

from tiny import _COMMON, _GQA, tiny_model

SETS = {
    "a": make_drop_set("attn", [3, 5, 7], "own:a"),
    "b": make_drop_set("attn", [4, 6, 9], "own:b"),
    "c": make_drop_set("mlp", [8, 10], "own:c"),
}


def deep_llama(layers: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "num_hidden_layers": layers}, **_GQA)
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def windows(seed: int, n: int, low: int, high: int, length: int = 24) -> datasets.Dataset:
    """``n`` token windows of ids in ``[low, high)``, the last few padded out on the right."""
    rng = np.random.default_rng(seed)
    lengths = [length if i % 3 else length - 5 for i in range(n)]
    ids = [list(rng.integers(low, high, size=m)) + [0] * (length - m) for m in lengths]
    mask = [[1] * m + [0] * (length - m) for m in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "sample": list(range(n))})


SPANS = {"a": (2, 6), "b": (150, 154), "c": (290, 294)}
SAMPLES = {name: windows(i + 1, 6, *span) for i, (name, span) in enumerate(SPANS.items())}


class FixedRouter(Router):
    """Routes row i to ``routes[i % len(routes)]``."""

    def __init__(self, layer, routes):
        super().__init__(layer, None, tuple(SETS))
        self.routes = routes

    def predict(self, features):
        return [self.routes[i % len(self.routes)] for i in range(len(features))]


def test_routing_layer_precedes_every_dropped_module():
    assert routing_layer(SETS) == 2
    check_routing_layer(2, SETS)
    with pytest.raises(InputError, match="does not precede"):
        check_routing_layer(3, SETS)
    with_block_0 = {**SETS, "d": make_drop_set("attn", [0, 5], "own:d")}
    assert routing_layer(with_block_0) == -1  # only the embeddings precede every dropped module
    check_routing_layer(-1, with_block_0)
    with pytest.raises(InputError, match="use a layer in -1..-1"):
        check_routing_layer(0, with_block_0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_a_router_before_block_0_reads_the_embeddings_and_routes_to_the_pruned_models(family):
    """Sets that drop modules of block 0 route on the mean token embedding (the input of block 0, which gemma3 scales
    inside its embedding module); each row's logits equal its pruned copy's."""
    from analysis.importance.ablation import block_inputs, full_row_nll

    model = tiny_model(family)
    sets = {"a": make_drop_set("attn", [0], "own:a"), "b": make_drop_set("mlp", [0, 1], "own:b"),
            "c": make_drop_set("attn", [2], "own:c")}
    assert routing_layer(sets) == -1
    batch = next(iter(SAMPLES["a"].with_format("torch").iter(batch_size=6)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, features = prefix(model, ids, mask, -1)
    with torch.inference_mode(), block_inputs(model) as resid_pre:
        full_row_nll(model, ids, mask)
    torch.testing.assert_close(hidden, resid_pre[0], rtol=0, atol=0)
    routed = RoutedModel(model, sets, FixedRouter(-1, ["b", "a", "c"]), {name: name for name in sets})
    logits, routes = routed.forward(ids, mask)
    for row, route in enumerate(routes):
        pruned = pruned_copy(copy.deepcopy(model), sets[route])
        want = pruned(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], use_cache=False).logits
        real = mask[row].bool()
        torch.testing.assert_close(logits[row : row + 1, real], want[:, real], rtol=1e-5, atol=1e-5)


def test_routed_logits_equal_the_pruned_models():
    model = deep_llama()
    routed = RoutedModel(model, SETS, FixedRouter(2, ["b", "a", "c", "a"]), {name: name for name in SETS})
    batch = next(iter(SAMPLES["a"].with_format("torch").iter(batch_size=6)))
    logits, routes = routed.forward(batch["input_ids"], batch["attention_mask"])
    assert routes == ["b", "a", "c", "a", "b", "a"]
    for row, route in enumerate(routes):
        pruned = pruned_copy(copy.deepcopy(model), SETS[route])
        ids, mask = batch["input_ids"][row : row + 1], batch["attention_mask"][row : row + 1]
        want = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = mask[0].bool()
        torch.testing.assert_close(logits[row : row + 1, real], want[:, real], rtol=1e-5, atol=1e-5)
    # the weights were never copied or changed: the unpruned model still gives its own logits
    assert all(type(m).__name__ != "DroppedBranch" for m in model.modules())


def test_oracle_router_reproduces_each_own_sets_heldout_nll():
    model = deep_llama()
    routed = RoutedModel(model, SETS, FixedRouter(2, ["a"]), {name: name for name in SETS})
    oracle = routed_window_nll(routed, SAMPLES, batch_size=4, oracle=True)
    static = window_nll(model, SAMPLES, dict(SETS), batch_size=4)
    for name in SETS:
        want = static[(static["drop_set"] == name) & (static["distribution"] == name)].set_index("window")["nll_sum"]
        got = oracle[oracle["distribution"] == name].set_index("window")["nll_sum"].loc[want.index]
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
        ppl = lambda frame: np.exp(frame["nll_sum"].sum() / frame["n_tokens"].sum())
        np.testing.assert_allclose(ppl(oracle[oracle["distribution"] == name]),
                                   ppl(static[(static["drop_set"] == name) & (static["distribution"] == name)]), rtol=1e-6)
    assert (oracle["route"] == oracle["distribution"]).all()


def test_router_learns_separable_sources_and_reports_accuracy():
    model = deep_llama()
    train = {name: list(windows(10 + i, 12, *span).with_format("torch").iter(batch_size=4))
             for i, (name, span) in enumerate(SPANS.items())}
    router = fit_router(model, train, 2)
    _, features = prefix(model, *[next(iter(SAMPLES["b"].with_format("torch").iter(batch_size=6)))[key] for key in ("input_ids", "attention_mask")], 2)
    assert router.predict(features) == ["b"] * 6
    routed = RoutedModel(model, SETS, router, {name: name for name in SETS})
    table = router_accuracy(routed_window_nll(routed, SAMPLES, batch_size=5))
    overall = table.set_index("distribution").loc["all"]
    assert overall["accuracy"] == 1.0 and overall["n_windows"] == 18 and overall["ci_low"] < 1.0
    with pytest.raises(InputError, match="unknown router classifier"):
        fit_router(model, train, 2, classifier="tree")


FAMILIES = ("llama", "gemma3", "gpt_neox")


@pytest.mark.parametrize("family", FAMILIES)
def test_features_of_several_blocks_from_one_pass_equal_each_blocks_own_prefix(family):
    model = tiny_model(family, n_layers=12)
    train = {name: list(windows(10 + i, 6, *span).with_format("torch").iter(batch_size=4))
             for i, (name, span) in enumerate(SPANS.items())}
    batch = next(iter(SAMPLES["a"].with_format("torch").iter(batch_size=6)))
    layers = [1, 2, 5]
    features = prefix_features(model, batch["input_ids"], batch["attention_mask"], layers)
    calibration = calibration_features(model, train, layers)
    for layer in layers:
        assert np.array_equal(features[layer], prefix(model, batch["input_ids"], batch["attention_mask"], layer)[1])
        alone, shared = fit_router(model, train, layer), router_from_features(calibration[layer], layer)
        assert np.array_equal(alone.classifier[-1].centroids_, shared.classifier[-1].centroids_)
        assert alone.predict(features[layer]) == shared.predict(features[layer])
    assert not np.array_equal(features[1], features[5])


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_nll_read_from_the_static_sets_equals_running_the_routed_model(family):
    """The stage's routed NLL (each window's route from its features, the chosen set's NLL from the static table, whose
    windows are batched per distribution, 4 at a time, re-padded) against the routed model really run on mixed
    batches of 5: the same routes and token counts, the NLL within 1e-4 relative per window (float sums over other
    batch shapes).  The router is trained with the sources' labels rotated, so windows go to other sources' sets."""
    model = tiny_model(family, n_layers=12)
    train = {name: list(windows(10 + i, 12, *SPANS[source]).with_format("torch").iter(batch_size=4))
             for i, (name, source) in enumerate(zip(SPANS, ["b", "c", "a"]))}
    router = fit_router(model, train, 2)
    set_of = {"a": "a", "b": "b", "c": "c"}
    real = routed_window_nll(RoutedModel(model, SETS, router, set_of), SAMPLES, batch_size=5, seed=3)
    static = window_nll(model, SAMPLES, dict(SETS), batch_size=4)
    looked_up = routed_from_static(static, window_routes(window_features(model, SAMPLES, [2, 4], batch_size=5, seed=3),
                                                         router), set_of)
    assert list(looked_up.columns) == list(real.columns)
    pd.testing.assert_frame_equal(looked_up.drop(columns="nll_sum"), real.drop(columns="nll_sum"))
    assert set(real["route"]) == set(SETS) and (real["route"] != real["distribution"]).all()
    np.testing.assert_allclose(looked_up["nll_sum"], real["nll_sum"], rtol=1e-4)


ROUTED_RUN = dict(distributions=("code", "math", "general"), subsets=False, metrics=("cosine",), samples=8, seq_len=64, greedy_module=None,
                  n_boot=50, n_perm=50, budgets={"attn": (2,)}, transfer_modules=("attn",), transfer_k=(2,), transfer_samples=4,
                  transfer_seq_len=64, random_seeds=(), tasks=())


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory):
    from analysis.pipeline import RunSettings, run
    from conftest import PIPELINE_DISTRIBUTIONS
    from analysis.data.manifests import load_manifest
    from analysis.data.fetching import is_fetched
    from tiny import byte_tokenizer

    if not all(is_fetched(load_manifest(name)) for name in PIPELINE_DISTRIBUTIONS):
        pytest.skip("the pipeline distributions are not fetched; run `calibdrop data fetch`")
    folder = tmp_path_factory.mktemp("routed-run")
    deep_llama().save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    run(str(folder / "model"), folder / "out", preset=RunSettings(**ROUTED_RUN), progress=False, log=lambda m: None,
        figures=False)
    return folder


def test_the_runs_routed_model_gives_the_chosen_sets_nll_and_the_oracle_each_own_set(routed_run):
    from analysis.io import read_table

    out = routed_run / "out"
    summary, accuracy = read_table(out / "routing.parquet"), read_table(out / "routing_accuracy.parquet")
    assert summary["max_abs_static_difference"].max() <= 1e-4
    per = summary.set_index(["drop_set", "distribution"])["ppl"]
    for name in ROUTED_RUN["distributions"]:
        assert per[("cosine/attn-2:oracle", name)] == pytest.approx(per[(f"cosine/attn-2:own:{name}", name)], rel=1e-9)
    assert accuracy.set_index("distribution").loc["all", "n_windows"] == 3 * ROUTED_RUN["transfer_samples"]
    assert 0 < summary["layer"].iloc[0] < 12
    text = (out / "report.md").read_text()
    section = text.split("## One model, several drop sets: a router per input")[1].split("\n## ")[0]
    paired = read_table(out / "routing_paired.parquet")
    versus = paired[(paired["distribution"] == "mix") & (paired["comparison"] == "routed vs borda")].iloc[0]
    verdict = "beats" if versus["ci_high"] < 1 else "loses to" if versus["ci_low"] > 1 else "does not beat"
    assert f"**Routing {verdict} the consensus set**" in section and f"{versus['ratio']:.3f} [" in section
    check = read_table(out / "check.parquet")
    assert set(check["checked"]) == {"own set", "consensus without it"} and len(check) == 6
    assert "## Does a drop set hold on new data?" in text


def test_cli_route_writes_the_routing_tables_and_prints_the_verdict(routed_run, capsys):
    from analysis.cli import main
    from analysis.io import read_table

    args = ["route", str(routed_run / "out"), "--model", str(routed_run / "model"), "--k", "2", "--samples", "4", "--seq-len", "48",
            "--calibration-samples", "8", "--calibration-seq-len", "64", "--n-boot", "50", "--out", str(routed_run / "route")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = read_table(routed_run / "route" / "routing_summary.parquet")
    assert "the consensus set**" in printed and "routing cost" in printed
    assert summary["max_abs_static_difference"].max() <= 1e-4
    assert {"routed", "oracle", "borda", "minimax"} <= {label.split(":", 1)[1] for label in summary["drop_set"] if label != "none"}
    assert main(["route", str(routed_run / "model"), "--model", str(routed_run / "model")]) == 2
    assert "calibdrop: error:" in capsys.readouterr().err


REAL_LOSS_RUN = {**ROUTED_RUN, "metrics": ("cosine", "ablation"), "greedy_module": "attn", "greedy_shortlist": 2,
                 "ablation_samples": 4, "ablation_seq_len": 32}


@pytest.fixture(scope="module")
def real_loss_routed_run(routed_run):
    from analysis.pipeline import RunSettings, run

    from tiny import byte_tokenizer

    model = deep_llama()
    with torch.no_grad():  # block 0's attention silenced: dropping it costs nothing, so no real-loss set
        # drops it (the others lower this random model's loss), while every cosine set does (routed on the embeddings)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    model.save_pretrained(routed_run / "model0")
    byte_tokenizer().save_pretrained(routed_run / "model0")
    out = routed_run / "real-loss"
    run(str(routed_run / "model0"), out, preset=RunSettings(**REAL_LOSS_RUN), progress=False, log=lambda m: None, figures=False)
    return out


def test_routing_among_real_loss_sets_reproduces_them_and_says_whether_any_beats_the_best_static(real_loss_routed_run):
    from analysis.evaluation.routing import pooled_ratios
    from analysis.io import read_table

    out = real_loss_routed_run
    summary, paired = read_table(out / "routing.parquet"), read_table(out / "routing_paired.parquet")
    accuracy, windows = read_table(out / "routing_accuracy.parquet"), read_table(out / "heldout_windows.parquet")
    ran = set(paired["family"])
    # every cosine set drops block 0's attention: that family's router reads the token embeddings (layer -1)
    assert ran == {"", "greedy", "own"} and summary["drop_set"].notna().all()
    assert set(summary.loc[summary["family"] == "", "layer"]) == {-1}
    assert (summary.loc[summary["family"] != "", "layer"] >= 0).all()
    assert summary["max_abs_static_difference"].max() <= 1e-4
    per = summary.set_index(["drop_set", "distribution"])["ppl"]
    for name in ROUTED_RUN["distributions"]:
        for family, method in (("greedy", "greedy"), ("own", "own")):
            oracle = per[(f"ablation/attn-2:oracle:{family}", name)]
            assert oracle == pytest.approx(per[(f"ablation/attn-2:{method}:{name}", name)], rel=1e-9)
    assert set(accuracy["family"]) == ran
    static = windows[~windows["drop_set"].str.contains(":random")]
    best = summary["best_static"].dropna().iloc[0]
    mix = summary[summary["distribution"] == "mix"].set_index("drop_set")["ppl_ratio"]
    lowest = pooled_ratios(static).index[0]
    assert lowest in mix.index and mix[best] == pytest.approx(mix[lowest], rel=1e-9)
    beaten = paired[(paired["distribution"] == "mix") & (paired["b"] == best) & (paired["ci_high"] < 1)]
    section = (out / "report.md").read_text().split("### Routing among real-loss sets")[1].split("\n## ")[0]
    assert ("**No routed model beats the best static set**" in section) == beaten.empty
    assert "No router" not in section
    assert "the mean token embedding (`resid_pre` of block 0" in (out / "report.md").read_text()
    for family in ran:
        pair = paired[(paired["family"] == family) & (paired["distribution"] == "mix") & (paired["b"] == best)].iloc[0]
        assert f"{pair['ratio']:.3f} [{pair['ci_low']:.3f}, {pair['ci_high']:.3f}]" in section


def test_without_route_truth_own_only_the_ablations_own_sets_are_not_routed(real_loss_routed_run, tmp_path):
    """A copy of the real-loss run rerun (``force``) with ``route_truth_own`` off recomputes the routing stage alone,
    without the family ``own``; the other families' rows are unchanged."""
    import shutil

    from analysis.io import read_table
    from analysis.pipeline import RunSettings, run

    shutil.copytree(real_loss_routed_run, tmp_path / "run")
    summary = run(str(real_loss_routed_run.parent / "model0"), tmp_path / "run",
                  preset=RunSettings(**{**REAL_LOSS_RUN, "route_truth_own": False}), progress=False, log=lambda m: None,
                  figures=False, force=True)
    assert "routing" in summary["stages_computed"] and "heldout_windows" not in summary["stages_computed"]
    before, after = (read_table(folder / "routing_paired.parquet") for folder in (real_loss_routed_run, tmp_path / "run"))
    assert set(after["family"]) == {"", "greedy"}
    kept = before[before["family"] != "own"].reset_index(drop=True)
    pd.testing.assert_frame_equal(after.reset_index(drop=True)[kept.columns], kept, check_exact=False, rtol=1e-12)
