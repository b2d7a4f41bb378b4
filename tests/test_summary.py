"""`make summary` (python -m benchmarks.summary): a run folder on one screen, from its JSON reports."""
import json

import pytest

from conftest import run_module

pytestmark = pytest.mark.device


def test_summary_of_a_converted_run(device_run):
    out = run_module("benchmarks.summary", device_run).stdout
    metrics = json.loads((device_run / "reports" / "metrics.json").read_text())
    conversion = json.loads((device_run / "reports" / "conversion.json").read_text())
    assert f"test: macro-F1 {metrics['test']['macro_f1']:.3f}" in out
    assert "data      " in out and "train 36, val 18, test 18" in out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in conversion["variants"]}
    # device_run is the full tiny_run (fine-tuned variants too) when the session builds that anyway
    assert set(rows) == set(conversion["variants"]) >= {"fp32", "dynamic", "fp16", "int8"}
    for name, v in conversion["variants"].items():
        assert f"{v['bytes'] / 1024:.0f}" in rows[name] and ("pass" if v["gate"]["passed"] else "FAIL") in rows[name]
    benchmarked = (device_run / "reports" / "benchmark.json").is_file()   # in a full session, maybe
    assert ("benchmark not run yet (make benchmark)" in out) != benchmarked
    assert f"make app RUN={device_run.name}" in out


def test_summary_of_a_folder_that_is_no_run(tmp_path):
    result = run_module("benchmarks.summary", tmp_path, check=False)
    assert result.returncode == 2 and "is not a training run (no model_card.json)" in result.stderr
