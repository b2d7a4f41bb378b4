"""The Keras model, the baseline every variant is measured against, in its own process per thread
count (TensorFlow must not share a process with the LiteRT timings, and fixes its threads once)."""
import json
import subprocess
import sys

import pytest

from benchmarks.conftest import run_dir, threads
from benchmarks.test_model import MEMORY_THREADS


def test_keras_baseline(pytestconfig, results, keras_threads, timing):
    keras_runtime = results.runtimes["keras"]
    if not keras_runtime["available"]:  # a device: the drops use the Keras metrics of conversion
        pytest.skip(f"no TensorFlow here ({keras_runtime['reason']}): Keras metrics from reports/conversion.json")
    counts = threads(pytestconfig)
    primary = keras_threads == (MEMORY_THREADS if MEMORY_THREADS in counts else counts[0])
    cmd = [sys.executable, "-m", "benchmarks.keras_baseline", str(run_dir(pytestconfig)),
           "--threads", str(keras_threads), "--max-time", str(timing["max_time"]),
           "--min-rounds", str(timing["min_rounds"])] + (["--metrics"] if primary else [])
    if pytestconfig.getoption("data_root"):
        cmd += ["--data-root", pytestconfig.getoption("data_root")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in ("raw", "pipeline"):
        results.latency("keras", "keras", keras_threads, stage, measured[stage])
    if primary:
        keras = results.variant("keras")
        keras["metrics"] = measured["metrics"]
        keras["memory"] = {k: measured[k] for k in ("peak_rss_mib", "rss_before_load_mib")}
        keras["first_load_ms"] = measured["load_ms"]
        assert keras["metrics"]["n"] > 0
