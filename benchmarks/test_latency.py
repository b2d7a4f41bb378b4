"""Latency of every TFLite variant of a run: the raw inference call and the whole device pipeline."""
import itertools

import numpy as np
import pytest

from benchmarks.conftest import RUN, VARIANTS
from edge_app.classifier import Classifier


@pytest.fixture(scope="module", params=VARIANTS)
def classifier(request):
    return Classifier(RUN / "tflite" / f"{request.param}.tflite", accelerator="cpu", num_threads=2)


def test_raw_inference(benchmark, classifier):
    benchmark.group = "raw inference"
    x = np.zeros((1, classifier.spec.size, classifier.spec.size, classifier.spec.channels), np.float32)
    benchmark.extra_info["backend"] = classifier.backend.name
    benchmark(classifier.backend.run, x)


def test_device_pipeline(benchmark, classifier, test_images):
    benchmark.group = "decode + preprocess + inference + postprocess"
    images = itertools.cycle(test_images)
    benchmark.extra_info["backend"] = classifier.backend.name
    result = benchmark(lambda: classifier.predict(next(images)))
    assert result.label in classifier.card.labels
