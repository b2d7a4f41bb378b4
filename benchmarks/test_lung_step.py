"""The lung step's cost beside the classifier it serves (issue 11: the segmenter small enough for
the Pi, its inference at most a fifth of the classifier's). Per variant, on LiteRT CPU at the
ratio gates' thread count and on a real test image: the embedded segmenter's inference, and the
whole lung step (the segmenter's input, its inference, the lung field, the crop), each alternated
call by call with the variant's own inference, so each ratio holds on any machine."""
from benchmarks.conftest import run_dir
from benchmarks.runtimes import REFERENCE, RUNTIMES
from benchmarks.stats import paired_speedup
from edge_app import lungs, preprocess
from edge_app.classifier import Classifier


def test_lung_step_cost(pytestconfig, results, variant, ratio_threads, timing, test_images):
    results.variant(variant)   # benchmarked, whichever tests of the suite run
    runtime = RUNTIMES[REFERENCE]
    classifier = Classifier(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite",
                            runtime=lambda data: runtime.make(data, ratio_threads))
    segmenter = classifier.segmenter
    if segmenter is None:   # a run that does not crop: no segmenter embedded, nothing to time
        assert classifier.spec.lung_crop == "none"
        results.lung_step(variant, None)
        return
    gray = preprocess.decode(test_images[0], strict=True)
    x = preprocess.normalise(preprocess.square(gray, classifier.spec), classifier.spec)[None]
    x_lungs = preprocess.normalise(preprocess.square(gray, segmenter.spec), segmenter.spec)[None]
    budget = {"max_time": timing["max_time"], "min_rounds": max(10, timing["min_rounds"])}
    inference = lambda: classifier.backend.run(x)
    alone = paired_speedup(inference, lambda: segmenter.backend.run(x_lungs), **budget)
    step = paired_speedup(inference, lambda: lungs.crop(gray, classifier.spec), **budget)
    results.lung_step(variant, {
        "segmenter_sha256": segmenter.sha256, "segmenter_bytes": len(segmenter.data),
        "segmenter_input_size": segmenter.spec.size, "segmenter_threads": segmenter.num_threads,
        "inference_ms": alone["baseline_median_ms"], "segmenter_ms": alone["median_ms"],
        "segmenter_vs_inference": 1.0 / alone["speedup"],
        "step_ms": step["median_ms"], "step_vs_inference": 1.0 / step["speedup"],
        "pairs": alone["pairs"] + step["pairs"]})
    assert alone["median_ms"] > 0 and step["median_ms"] > alone["median_ms"]
