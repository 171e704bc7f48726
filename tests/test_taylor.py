"""The ``taylor`` metric: the first-order ΔNLL of dropping each module, against finite differences without autograd."""

import numpy as np
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from analysis import adapter_for, decoder_layers, score_token_batches
from analysis.importance.taylor import taylor_increase

from tiny import tiny_model

FAMILIES = ("llama", "gemma3", "gpt_neox", "gpt_neox_sequential")
KINDS = ("attn", "mlp", "block")


@pytest.fixture
def float64_norms(monkeypatch):
    """transformers' RMSNorms compute in float32 whatever the model's dtype; here in the model's float64, so that
    finite differences resolve the derivative to 1e-7 (GPT-NeoX's LayerNorm already does)."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: self.weight * (
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)))
    monkeypatch.setattr(Gemma3RMSNorm, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))


def _batch():
    """Two rows of random tokens, the second right-padded after 11 tokens."""
    ids = torch.randint(2, 300, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _row_nll(model, ids, mask) -> np.ndarray:
    """Plain summed next-token NLL per row, float64, over positions whose token and next token are real."""
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       use_cache=False).logits.double(), -1)
    out = np.zeros(len(ids))
    for s in range(len(ids)):
        for t in range(ids.shape[1] - 1):
            if mask[s, t] and mask[s, t + 1]:
                out[s] -= float(logp[s, t, ids[s, t + 1]])
    return out


def _scaled(module, factor):
    """A forward hook multiplying a branch's output (the first element of a tuple) by ``factor``."""
    def hook(mod, args, out):
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

    return module.register_forward_hook(hook)


def _shrunk_nll(model, kind, layer_index, eps, ids, mask) -> np.ndarray:
    """Row NLL with module ``(kind, layer)``'s branch scaled by ``1 - eps`` (the block: output ``post - eps (post -
    pre)``)."""
    adapter, layer = adapter_for(model), decoder_layers(model)[layer_index]
    if kind == "block":
        pre = {}
        handles = [layer.register_forward_pre_hook(
            lambda mod, args, kwargs: pre.__setitem__("x", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)]

        def shrink(mod, args, out):
            post = out[0] if isinstance(out, tuple) else out
            post = post - eps * (post - pre["x"])
            return (post, *out[1:]) if isinstance(out, tuple) else post

        handles.append(layer.register_forward_hook(shrink))
    else:
        last = adapter.attn_branch[-1] if kind == "attn" else adapter.mlp_branch_modules[-1]
        handles = [_scaled(layer.get_submodule(last), 1.0 - eps)]
    try:
        return _row_nll(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_is_the_derivative_of_the_nll_along_the_removed_branch(family, float64_norms):
    model = tiny_model(family, dtype=torch.float64)
    ids, mask = _batch()
    got, n_predicted = taylor_increase(model, ids, mask)
    assert list(n_predicted) == [13, 10]
    eps = 1e-4
    for layer in range(model.config.num_hidden_layers):
        for m, kind in enumerate(KINDS):
            central = (_shrunk_nll(model, kind, layer, eps, ids, mask)
                       - _shrunk_nll(model, kind, layer, -eps, ids, mask)) / (2 * eps)
            np.testing.assert_allclose(got[:, layer, m], central, rtol=1e-6, atol=1e-9, err_msg=f"{kind} {layer}")
    assert np.abs(got).min() > 1e-6


@pytest.mark.parametrize("family", ("llama", "gpt_neox"))
def test_taylor_is_zero_for_a_branch_that_adds_nothing(family):
    model = tiny_model(family, dtype=torch.float64)
    layers = decoder_layers(model)
    with torch.no_grad():
        if family == "llama":
            layers[1].self_attn.o_proj.weight.zero_()
            layers[2].mlp.down_proj.weight.zero_()
        else:
            for linear in (layers[1].attention.dense, layers[2].mlp.dense_4h_to_h):
                linear.weight.zero_()
                linear.bias.zero_()
    ids, mask = _batch()
    got, _ = taylor_increase(model, ids, mask)
    assert (got[:, 1, 0] == 0).all() and (got[:, 2, 1] == 0).all()
    assert (np.abs(np.delete(got.reshape(2, -1), [3, 7], axis=1)) > 1e-8).all()


def test_taylor_flows_through_scoring_beside_the_proxies_and_the_ground_truth():
    model = tiny_model("qwen2")
    ids, mask = _batch()
    batches = [{"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    together = score_token_batches(model, batches, metrics="taylor,cosine,ablation", progress=False)
    alone = score_token_batches(model, batches, metrics="taylor", progress=False)
    assert list(dict.fromkeys(together["metric"])) == ["cosine", "taylor", "ablation"]
    rows = together[together["metric"] == "taylor"].reset_index(drop=True)
    np.testing.assert_allclose(rows["stat_sum"], alone["stat_sum"], rtol=1e-6, atol=1e-9)
    increase, n_predicted = taylor_increase(model, ids, mask)
    np.testing.assert_allclose(rows["stat_sum"], increase.reshape(-1), rtol=1e-4, atol=1e-6)
    assert list(rows.drop_duplicates("sample")["n_tokens"]) == list(n_predicted)
    np.testing.assert_allclose(rows["importance"], rows["stat_sum"] / rows["n_tokens"])
