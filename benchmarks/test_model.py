"""Per variant: load time, peak memory (in a fresh process each), and test-split accuracy."""
import pytest

from benchmarks import nonradiographs, probe
from benchmarks.conftest import run_dir
from benchmarks.runtimes import REFERENCE, RUNTIMES
from benchmarks.stats import from_pytest_benchmark
from convert.parity import headline
from convert import parity
from edge_app import decision
from edge_app.classifier import Classifier
from edge_app.errors import InputError

MEMORY_THREADS = 2  # the device default


@pytest.fixture(scope="session")
def test_inputs(split):
    return split.inputs()


def test_load_time(benchmark, pytestconfig, results, variant):
    """Read, check the card, create the runtime, warm up: what a restart of the app costs."""
    path = run_dir(pytestconfig) / "tflite" / f"{variant}.tflite"
    runtime = RUNTIMES[REFERENCE]
    benchmark.group = "model load"
    rounds = max(3, int(pytestconfig.getoption("benchmark_min_rounds")))
    classifier = benchmark.pedantic(Classifier, args=(path,), rounds=rounds, warmup_rounds=1,
                                    kwargs={"runtime": lambda data: runtime.make(data, MEMORY_THREADS)})
    if benchmark.enabled:
        results.variant(variant)["load_ms"] = from_pytest_benchmark(benchmark.stats.stats)
    assert classifier.card.variant == variant


def test_peak_memory(pytestconfig, results, variant, test_images):
    """Peak resident memory (VmHWM) of a fresh process that loads the variant and screens a test image."""
    path = run_dir(pytestconfig) / "tflite" / f"{variant}.tflite"
    measured = probe.measure(path, test_images[0], runtime=REFERENCE, threads=MEMORY_THREADS)
    results.variant(variant)["memory"] = {k: measured[k] for k in ("peak_rss_mib", "rss_before_load_mib")}
    results.variant(variant)["first_load_ms"] = measured["load_ms"]
    assert measured["peak_rss_mib"] >= measured["rss_before_load_mib"] > 0


def test_accuracy(pytestconfig, results, variant, split, test_inputs):
    """Test-split metrics through LiteRT, exactly as the parity gate computes them."""
    path = run_dir(pytestconfig) / "tflite" / f"{variant}.tflite"
    logits = parity.run_variant(path.read_bytes(), test_inputs, desc=f"evaluating {variant}", progress=False)["logits"]
    metrics = headline(parity.evaluate(logits, split.y, split.card))
    results.variant(variant)["metrics"] = metrics
    assert metrics["n"] == len(split.paths)


def test_ood_warning(pytestconfig, results, variant, split, tmp_path_factory):
    """Share of test images (false alarms) and of generated non-radiographs (catches) that the
    device withholds a label from, for the variants that carry the out-of-distribution warning:
    a warning (out of distribution, or too little fine detail), or a refusal to screen the image at
    all (a lung-cropping model's "no chest found"), counted apart as `..._refused`."""
    classifier = Classifier(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite", accelerator="cpu")
    if not classifier.info["ood_warning"]:
        results.variant(variant)["ood"] = {"carried": False}
        return
    others = nonradiographs.write(tmp_path_factory.mktemp("nonradiographs"))

    def outcome(path):
        try:
            return classifier.predict(path).decision
        except InputError:
            return "refused"

    def shares(paths):
        seen = [outcome(p) for p in paths]
        return (float(sum(d in (decision.UNRELIABLE, "refused") for d in seen) / len(seen)),
                float(sum(d == "refused" for d in seen) / len(seen)))

    (test_flagged, test_refused), (others_flagged, others_refused) = shares(split.paths), shares(others)
    measured = {"carried": True, "test_flagged": test_flagged, "test_refused": test_refused,
                "nonradiograph_flagged": others_flagged, "nonradiograph_refused": others_refused,
                "nonradiographs": len(others)}
    results.variant(variant)["ood"] = measured
    assert 0 <= measured["test_flagged"] <= 1
