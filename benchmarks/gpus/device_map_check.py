"""A model dispatched by accelerate across the GPU and the CPU scores and prunes like the unsplit model.

Builds a random Llama from a config, scores the same batches (a) on one GPU and (b) with the
first half of the blocks on the GPU and the rest, the final norm and the LM head on the CPU
(``accelerate.dispatch_model``), then drops attention layers on both and compares logits.

  python benchmarks/gpus/device_map_check.py
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM, LlamaConfig

from analysis import drop_modules, score_token_batches
from analysis.data.samples import padded_batches

CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()
    split = copy.deepcopy(model)
    half = CONFIG["num_hidden_layers"] // 2
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": 0 if i < half else "cpu" for i in range(CONFIG["num_hidden_layers"])})
    split = dispatch_model(split, device_map=device_map)
    whole = model.to("cuda")
    sequences = torch.randint(0, CONFIG["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(1)).tolist()
    sequences[1] = sequences[1][100:]
    batches = list(padded_batches(sequences, len(sequences), side="left"))
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    a = score_token_batches(whole, batches, progress=False)
    b = score_token_batches(split, batches, progress=False)
    score_diff = float(np.abs(a["stat_sum"] / a["n_tokens"] - b["stat_sum"] / b["n_tokens"]).max())
    drop_modules(whole, attn=[2, 6], mlp=[5])
    drop_modules(split, attn=[2, 6], mlp=[5])
    with torch.inference_mode():
        logits_whole = whole(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
        logits_split = split(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    devices = sorted({str(p.device) for p in split.parameters()})
    print(json.dumps({"devices_of_split_model": devices, "max_abs_cos_mean_diff": score_diff,
                      "max_abs_pruned_logit_diff": float((logits_whole - logits_split).abs().max())}, indent=1))


if __name__ == "__main__":
    main()
