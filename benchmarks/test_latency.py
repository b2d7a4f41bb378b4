"""Latency of every TFLite variant of a run, per runtime and thread count: the raw inference
call, and the whole device pipeline (decode -> preprocess -> inference -> post-process)."""
import itertools

import numpy as np
import pytest

from benchmarks.conftest import run_dir
from benchmarks.runtimes import RUNTIMES
from benchmarks.stats import from_pytest_benchmark
from edge_app.classifier import Classifier


@pytest.fixture(scope="module")
def classifier(request, pytestconfig, results, variant, setup):
    """The variant on one pinned runtime; None (recorded with its reason) where it cannot run."""
    runtime, threads = setup
    try:
        return Classifier(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite",
                          runtime=lambda data: RUNTIMES[runtime].make(data, threads or 1))
    except Exception as exc:  # e.g. an int8 model on the float-only CompiledModel API
        results.unavailable(variant, runtime, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return None


def _timed(benchmark, results, classifier, variant, setup, stage, fn):
    runtime, threads = setup
    if classifier is None:
        reason = next(u["reason"] for u in results.variant(variant)["unavailable"] if u["runtime"] == runtime)
        pytest.skip(f"{variant} does not run on {runtime}: {reason}")
    benchmark.group = f"{stage}: {variant}"
    benchmark.extra_info.update(runtime=runtime, threads=threads, label=RUNTIMES[runtime].label)
    out = benchmark(fn)
    if benchmark.enabled:  # not under --benchmark-disable
        results.latency(variant, runtime, threads, stage, from_pytest_benchmark(benchmark.stats.stats))
    return out


def test_raw_inference(benchmark, results, classifier, variant, setup):
    if classifier is not None:
        spec = classifier.spec
        x = np.zeros((1, spec.size, spec.size, spec.channels), np.float32)
    outputs = _timed(benchmark, results, classifier, variant, setup, "raw", lambda: classifier.backend.run(x))
    assert np.isfinite(outputs["logits"]).all()


def test_device_pipeline(benchmark, results, classifier, variant, setup, test_images):
    images = itertools.cycle(test_images)
    prediction = _timed(benchmark, results, classifier, variant, setup, "pipeline",
                        lambda: classifier.predict(next(images)))
    assert prediction.label in classifier.card.labels
