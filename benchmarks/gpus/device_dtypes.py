"""Scores on an accelerator in float32, bfloat16 and float16 against float32 on the CPU.

For each family of tests/tiny.py (random weights) the largest absolute difference in
importance is printed; float32 on CUDA should match the CPU to ~1e-5.

  python benchmarks/gpus/device_dtypes.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from tiny import CONFIGS, byte_tokenizer, tiny_model  # noqa: E402

from analysis import score_texts  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 8, "def f(x):\n    return x * 2\n" * 6, "short"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    tokenizer = byte_tokenizer()
    rows = []
    for family in CONFIGS:
        reference = score_texts(tiny_model(family), tokenizer, TEXTS, progress=False)["importance"].to_numpy()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model = tiny_model(family, dtype=dtype).to(args.device)
            got = score_texts(model, tokenizer, TEXTS, progress=False)["importance"].to_numpy()
            rows.append({"family": family, "dtype": str(dtype), "max_abs_diff_vs_cpu_fp32": float(abs(got - reference).max())})
    print(json.dumps({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
