"""Latency of every TFLite variant of a run, per runtime and thread count: the raw inference
call, and the whole device pipeline (decode -> preprocess -> inference -> post-process); and the
speed-up of each variant over fp32, measured pairwise."""
import itertools

import numpy as np
import pytest

from benchmarks.conftest import run_dir
from benchmarks.runtimes import REFERENCE, RUNTIMES
from benchmarks.stats import from_pytest_benchmark, paired_speedup, stage_breakdown
from edge_app import preprocess
from edge_app.classifier import Classifier
from edge_app.errors import ModelError
from edge_app.graph_names import LOGITS
from edge_app.runtime import FLOAT_IO_ONLY


@pytest.fixture(scope="module")
def classifier(pytestconfig, results, variant, setup):
    """The variant on one pinned runtime; None (recorded with its reason) where it cannot run."""
    runtime, threads = setup
    try:
        return Classifier(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite",
                          runtime=lambda data: RUNTIMES[runtime].make(data, threads or 1))
    except ModelError as exc:
        if FLOAT_IO_ONLY not in str(exc):
            raise  # any other failure to load is a failure, never a skip
        # an int8-I/O model on the float-only CompiledModel API: not applicable, recorded as such
        results.unavailable(variant, runtime, f"{type(exc).__name__}: {exc.message}")
        return None


def _timed(benchmark, results, classifier, variant, setup, stage, fn, extra=dict):
    runtime, threads = setup
    if classifier is None:
        reason = next(u["reason"] for u in results.variant(variant)["unavailable"] if u["runtime"] == runtime)
        pytest.skip(f"{variant} does not run on {runtime}: {reason}")
    benchmark.group = f"{stage}: {variant}"
    benchmark.extra_info.update(runtime=runtime, threads=threads, label=RUNTIMES[runtime].label)
    out = benchmark(fn)
    if benchmark.enabled:  # not under --benchmark-disable
        results.latency(variant, runtime, threads, stage, {**from_pytest_benchmark(benchmark.stats.stats), **extra()})
    return out


def test_raw_inference(benchmark, results, classifier, variant, setup, test_images):
    """One inference call on a real test image, already preprocessed (dynamic-range
    quantisation, for one, does not cost the same on an all-zero input)."""
    if classifier is not None:
        x = preprocess.preprocess(test_images[0], classifier.spec)[None]
    outputs = _timed(benchmark, results, classifier, variant, setup, "raw", lambda: classifier.backend.run(x))
    assert np.isfinite(outputs[LOGITS]).all()


def test_device_pipeline(benchmark, results, classifier, variant, setup, test_images):
    images = itertools.cycle(test_images)
    timings = []

    def screen():
        prediction = classifier.predict(next(images))
        timings.append(prediction.timings_ms)
        return prediction

    prediction = _timed(benchmark, results, classifier, variant, setup, "pipeline", screen,
                        lambda: stage_breakdown(timings))
    assert prediction.label in classifier.card.labels


def test_speedup_over_fp32(pytestconfig, results, paired_variant, ratio_threads, timing, test_images):
    """Raw inference of fp32 and of another variant alternated call by call on LiteRT CPU."""
    runtime = RUNTIMES[REFERENCE]
    fp32, other = (Classifier(run_dir(pytestconfig) / "tflite" / f"{name}.tflite",
                              runtime=lambda data: runtime.make(data, ratio_threads))
                   for name in ("fp32", paired_variant))
    x = preprocess.preprocess(test_images[0], fp32.spec)[None]
    measured = paired_speedup(lambda: fp32.backend.run(x), lambda: other.backend.run(x),
                              max_time=2 * timing["max_time"], min_rounds=max(10, timing["min_rounds"]))
    results.speedup(paired_variant, {"runtime": REFERENCE, "threads": ratio_threads, **measured})
    assert measured["speedup"] > 0
