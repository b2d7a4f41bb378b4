"""Every benchmarked variant on the test films as other acquisitions would give them
(benchmarks/robustness.py): the files are written once and classified by each variant, the reports
written beside the run's others, and the worst acquisitions' shares of films silently cleared and
needlessly referred kept for the `[robustness]` gate and the report."""
from benchmarks import robustness
from benchmarks.conftest import run_dir, variants


def test_robustness_to_acquisition(pytestconfig, results, split):
    run = run_dir(pytestconfig)
    models = {name: run / "tflite" / f"{name}.tflite" for name in variants(pytestconfig)}
    result = robustness.measure(run, models, split=split, bootstrap=0)
    robustness.write_reports(result, run / "reports")
    for name, measured in result["variants"].items():
        results.variant(name)    # benchmarked, whichever tests of the suite run
        results.robustness(name, {"model_sha256": measured["model_sha256"], "n_films": result["n_films"],
                                  **measured["worst"]})
        stored = measured["acquisitions"][robustness.AS_STORED]["against_stored"]
        assert stored["referrals_flipped"] == 0 and stored["silently_cleared"]["k"] == 0
