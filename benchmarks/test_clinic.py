"""Full-size clinic files (benchmarks/clinic_files.py) beside a development-set image, per variant
on LiteRT CPU at the ratio gates' thread count: each pipeline stage, and the plain library decode
of the same file alternated with it call by call (both see the same load, so the ratios hold on
any machine); peak RSS on the largest file in a fresh process; the cold start of the predict CLI
and of the app with the int8 model (benchmarks/cold_start.py)."""
import time

import numpy as np
import pytest

from benchmarks import clinic_files as clinic, cold_start, probe
from benchmarks.conftest import run_dir
from benchmarks.gates import COLD_START_VARIANT
from benchmarks.runtimes import REFERENCE, RUNTIMES
from edge_app import preprocess
from edge_app.classifier import Classifier

DEVSET = "devset"   # the run's own first test image (256 px JPEG in the development set)


@pytest.fixture(scope="session")
def clinic_set(results, test_images, ratio_threads, tmp_path_factory) -> dict:
    """{kind: file}: the clinic files, made from the run's test images, and one test image itself."""
    files = {DEVSET: test_images[0], **clinic.write(test_images, tmp_path_factory.mktemp("clinic"))}
    results.clinic.update(threads=ratio_threads, pipeline_kind=clinic.PIPELINE_KIND, reference_kind=DEVSET)
    for kind, path in files.items():
        height, width = preprocess.decode(path).shape
        results.clinic["files"][kind] = {"file": str(path), "width": width, "height": height,
                                         "bytes": path.stat().st_size,
                                         "what": clinic.KINDS[kind].what if kind in clinic.KINDS
                                         else "development-set test image"}
    return files


@pytest.fixture(scope="module")
def clinic_classifier(pytestconfig, results, variant, ratio_threads):
    results.variant(variant)   # benchmarked, whichever tests of the suite run
    runtime = RUNTIMES[REFERENCE]
    return Classifier(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite",
                      runtime=lambda data: runtime.make(data, ratio_threads))


@pytest.mark.parametrize("kind", [DEVSET, *clinic.KINDS])
def test_clinic_file_stages(results, clinic_classifier, variant, kind, clinic_set, timing):
    """predict() and the library decode of the same file, alternated (order swapped each round)."""
    path = clinic_set[kind]

    def library():
        t0 = time.perf_counter()
        clinic.library_decode(path)
        return 1000.0 * (time.perf_counter() - t0)

    library(), clinic_classifier.predict(path)   # warm-up
    lib, stages = [], []
    start = time.perf_counter()
    while len(stages) < timing["min_rounds"] or time.perf_counter() - start < timing["max_time"]:
        if len(stages) % 2:
            stages.append(clinic_classifier.predict(path).timings_ms)
            lib.append(library())
        else:
            lib.append(library())
            stages.append(clinic_classifier.predict(path).timings_ms)
    lib = np.array(lib)
    ms = {stage: np.array([t[stage] for t in stages]) for stage in stages[0]}
    results.clinic_stages(variant, kind, {
        "stages_ms": {stage: float(np.median(v)) for stage, v in ms.items()},
        "library_decode_ms": float(np.median(lib)),
        "decode_vs_library": float(np.median(ms["decode"] / lib)),
        "preprocess_vs_inference": float(np.median(ms["preprocess"] / ms["inference"])),
        "pipeline_vs_library_and_inference": float(np.median(ms["total"] / (lib + ms["inference"]))),
        "rounds": len(stages)})
    assert all(t["total"] > 0 for t in stages)


def test_clinic_peak_memory(pytestconfig, results, variant, clinic_set, ratio_threads):
    """Peak RSS (VmHWM) of a fresh process that loads the variant and screens the 3 k x 3 k DICOM."""
    measured = probe.measure(run_dir(pytestconfig) / "tflite" / f"{variant}.tflite",
                             clinic_set[clinic.LARGEST_KIND], runtime=REFERENCE, threads=ratio_threads,
                             predictions=1)
    results.clinic["memory"][variant] = {"kind": clinic.LARGEST_KIND,
                                         **{k: measured[k] for k in ("peak_rss_mib", "rss_before_load_mib")}}
    assert measured["peak_rss_mib"] >= measured["rss_before_load_mib"] > 0


@pytest.mark.parametrize("what", ["cli", "app"])
def test_cold_start(pytestconfig, results, what, clinic_set, timing):
    """Launch to first result with the int8 model, on the development-set image (the start-up,
    not the decode of a big file, is what this measures); --benchmark-min-rounds runs, at least 3."""
    model = run_dir(pytestconfig) / "tflite" / f"{COLD_START_VARIANT}.tflite"
    if not model.is_file():
        results.clinic["cold_start"][what] = {"available": False, "reason": f"the run has no {model.name}"}
        return   # recorded: its gate fails as not measured
    measure = cold_start.measure_cli if what == "cli" else cold_start.measure_app
    measured = {**measure(model, clinic_set[DEVSET], runs=max(3, timing["min_rounds"])), "variant": COLD_START_VARIANT, "image": str(clinic_set[DEVSET])}
    results.clinic["cold_start"][what] = measured
    assert not measured["available"] or measured["median_s"] > 0
