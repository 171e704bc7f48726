"""A tiny-model run of every stage (tests' pipeline settings, real text), for comparing two checkouts' tables with
identical_tables.py: run it once with PYTHONPATH at each checkout, then compare the two out folders.

  PYTHONPATH=/tmp/before python benchmarks/identity/move_identity_run.py /tmp/before /tmp/tiny-before
  PYTHONPATH=/tmp/after  python benchmarks/identity/move_identity_run.py /tmp/after  /tmp/tiny-after
  python benchmarks/identity/identical_tables.py /tmp/tiny-before/out /tmp/tiny-after/out
"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
from tiny import byte_tokenizer, tiny_model
from analysis.pipeline import RunSettings, run
folder = Path(sys.argv[2]); folder.mkdir(parents=True, exist_ok=True)
m = tiny_model("llama"); m.save_pretrained(folder / "model"); byte_tokenizer().save_pretrained(folder / "model")
settings = RunSettings(distributions=("code", "math", "general"), subsets=True, samples=8, seq_len=64, subset_samples=4, subset_seq_len=32,
    ablation_samples=4, ablation_seq_len=32, greedy_shortlist=2, n_boot=50, n_perm=50,
    budgets={"attn": (1, 2), "mlp": (1,), "block": (1,), "joint": (2,)}, transfer_k=(2,), transfer_samples=4, transfer_seq_len=64,
    random_seeds=(0,), tasks=("arc_easy",), task_limit=3, accuracy_sets=("none", "cosine/attn-2:borda"))
run(str(folder / "model"), folder / "out", preset=settings, progress=False, log=lambda m: None)
