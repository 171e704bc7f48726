"""The run's float32 matmul precision: applied during the run, restored after it, part of every stage key unless it is
the default (so stores written before the setting existed stay valid)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from analysis import pipeline
from analysis.errors import InputError
from analysis.models.loading import float32_matmul_precision
from analysis.pipeline import STAGES
from analysis.presets import PRESETS, RunSettings
from analysis.stages import StageStore, stage_key
from analysis.steps.core import Study


def test_precision_is_set_and_restored():
    before = torch.get_float32_matmul_precision()
    with float32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError), float32_matmul_precision("high"):
        raise RuntimeError("a stage failed")
    assert torch.get_float32_matmul_precision() == before


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(InputError, match="unknown matmul precision 'tf32'; use highest, high, medium"):
        with float32_matmul_precision("tf32"):
            pass


def test_the_run_computes_at_its_settings_precision(monkeypatch, tmp_path):
    seen = {}

    def record(*args, **kwargs):
        seen["precision"] = torch.get_float32_matmul_precision()
        return {}

    monkeypatch.setattr(pipeline, "_run", record)
    before = torch.get_float32_matmul_precision()
    pipeline.run("smollm2-135m", tmp_path, preset=dataclasses.replace(PRESETS["smoke"], matmul_precision="high"))
    assert seen["precision"] == "high" and torch.get_float32_matmul_precision() == before
    assert PRESETS["reference"].matmul_precision == "high" and PRESETS["default"].matmul_precision == "highest"


def keys(tmp_path, settings: RunSettings) -> dict[str, str]:
    record = {"weights_sha256": "0" * 64, "dtype": "float32"}
    study = Study(None, None, settings, StageStore(tmp_path, record, log=lambda message: None), False)
    result = {}
    for stage in STAGES:
        result[stage.name] = study.keys[stage.name] = study.key(stage)
    return result


def test_default_precision_keeps_the_keys_and_another_changes_every_key(tmp_path):
    settings = PRESETS["smoke"]
    default = keys(tmp_path, settings)
    # the key as it was computed before the setting existed: model checksum and dtype only
    first = STAGES[0]
    fields = {name: getattr(settings, name) for name in first.settings}
    study = Study(None, None, settings, StageStore(tmp_path, {"weights_sha256": "0" * 64, "dtype": "float32"},
                                                   log=lambda message: None), False)
    assert default[first.name] == stage_key(first.name, ["0" * 64, "float32"], fields, study.manifests,
                                            {name: None for name in first.reads})
    tf32 = keys(tmp_path, dataclasses.replace(settings, matmul_precision="high"))
    assert all(tf32[name] != default[name] for name in default)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_the_report_header_names_a_precision_other_than_full_float32(precision):
    from analysis.report.sections.common import Results
    from analysis.report.sections.verdict import section_header

    model = {"spec": "m", "family": "llama", "n_layers": 2, "dtype": "float32", "weights_sha256": "0" * 64}
    results = Results(model, dataclasses.replace(PRESETS["smoke"], matmul_precision=precision),
                      pd.DataFrame({"distribution": ["code"]}), {}, [])
    header = "\n".join(section_header(results))
    assert ("(llama, 2 layers, float32, matmul precision high)" in header) == (precision == "high")
    assert ("(llama, 2 layers, float32)" in header) == (precision == "highest")
