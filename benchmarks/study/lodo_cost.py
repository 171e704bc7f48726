"""What leave-one-distribution-out adds to a run, measured in one run on the tiny config-built llama of the tests.

Runs the pipeline with the tests' settings (tests/test_pipeline.py SETTINGS, no zero-shot tasks, ``lodo=True``) and writes
the stage times of that one run (ratios within the run are what matter: the machine is shared) and the ``lodo_cost``
table (greedy trials requested and run, set-distribution pairs looked up and evaluated) to
benchmarks/results/lodo-cost-tiny-cpu.json.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/study/lodo_cost.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_pipeline import SETTINGS  # noqa: E402
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from analysis.io import read_table  # noqa: E402
from analysis.pipeline import RunSettings, run  # noqa: E402

with tempfile.TemporaryDirectory() as folder:
    model = Path(folder) / "model"
    tiny_model("llama").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    summary = run(str(model), Path(folder) / "out", preset=RunSettings(**{**SETTINGS, "tasks": (), "lodo": True}),
                  progress=False, log=lambda m: None)
    cost = read_table(Path(folder) / "out" / "lodo_cost.parquet").iloc[0].to_dict()
stages = {k: v for k, v in summary["timings"].items() if k not in ("load model", "figures")}
lodo = sum(v for k, v in stages.items() if k.startswith("lodo"))
result = {"model": "tiny llama (tests/tiny.py, config-built, 3 layers)", "settings": "tests/test_pipeline.py SETTINGS, tasks=(), lodo=True",
          "stage_seconds": stages, "lodo_seconds": lodo, "all_stages_seconds": sum(stages.values()),
          "lodo_over_greedy": lodo / stages["greedy"], "lodo_over_all_stages": lodo / sum(stages.values()),
          "lodo_cost": {k: int(v) for k, v in cost.items()}}
out = Path(__file__).resolve().parents[1] / "results" / "lodo-cost-tiny-cpu.json"
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
