"""Benchmarks of a converted run: `pytest benchmarks --run artifacts/RUN` (or `make benchmark`).

Options (besides pytest-benchmark's own --benchmark-max-time / --benchmark-min-rounds, which the
Keras and memory probes follow too): --run (default $CXR_RUN), --threads, --device, --gates,
--variants (the ones to ship and gate), --compare EARLIER.json, --results-dir.
At the end the results JSON, report.md, Pareto plot and per-stage plot of the full-size clinic
files (test_clinic.py) are written (benchmarks/results/), the gates are printed as a table, and
the session fails when a gate fails or --compare flags a regression.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import results as results_mod
from benchmarks import gates as gates_mod
from benchmarks.gates import GATES_FILE, load_gates
from benchmarks.runtimes import RUNTIMES, import_error, no_gpu_adapter
from benchmarks.testset import Split
from edge_app.runtime import REQUIRE_GPU_ENV, gpu_required

RESULTS_KEY = pytest.StashKey[results_mod.Collector]()
OUTCOME_KEY = pytest.StashKey[results_mod.Outcome]()
PARTIAL_KEY = pytest.StashKey[bool]()


def pytest_addoption(parser):
    g = parser.getgroup("cxr-edge benchmarks")
    g.addoption("--run", default=os.environ.get("CXR_RUN", "artifacts/mobilenet_v2-synthetic"),
                help="converted run folder (default: $CXR_RUN)")
    g.addoption("--data-root", default=None, help="the run's data folder, where it is not where training "
                "found it (default: the model card's, relative to the run folder)")
    g.addoption("--threads", default="1,2,4", help="CPU thread counts, comma-separated (default 1,2,4)")
    g.addoption("--device", default=None, help="a device profile of the gates file (pi4, pi5, tablet): "
                "check its absolute budgets; only on that device")
    g.addoption("--gates", default=str(GATES_FILE), help="gates file (default benchmarks/gates.toml)")
    g.addoption("--variants", default=None, help="variants to ship and gate, comma-separated (default: all)")
    g.addoption("--compare", default=None, help="an earlier results JSON: flag regressions beyond noise")
    g.addoption("--results-dir", default=str(Path(__file__).with_name("results")))


def run_dir(config) -> Path:
    return Path(config.getoption("run"))


def variants(config) -> list[str]:
    """Every .tflite of the run, whatever variants conversion made."""
    return sorted(p.stem for p in (run_dir(config) / "tflite").glob("*.tflite"))


def threads(config) -> list[int]:
    return [int(t) for t in config.getoption("threads").split(",")]


def pytest_configure(config):
    if not hasattr(config.option, "run") or config.option.help or config.option.collectonly:
        return
    if not (run_dir(config) / "model_card.json").is_file():
        raise pytest.UsageError(f"{run_dir(config)} is not a training run (no model_card.json): "
                                "point --run / CXR_RUN at a converted run")
    load_gates(Path(config.getoption("gates")))  # a bad gates file fails now, not after the run
    collector = results_mod.Collector(run_dir(config), threads=threads(config),
                                      device=config.getoption("device"))
    fp32 = run_dir(config) / "tflite" / "fp32.tflite"
    for runtime in RUNTIMES.values():
        reason = import_error(runtime.module)
        if reason is None and runtime.name == "litert-gpu" and variants(config):
            # LiteRT imports on any machine; the GPU may not be there. Asked with a float-I/O model
            # (fp32) where there is one: the GPU refuses int8 I/O whatever the machine.
            probe = fp32 if fp32.is_file() else run_dir(config) / "tflite" / f"{variants(config)[0]}.tflite"
            reason = no_gpu_adapter(probe)
            if reason and gpu_required():
                raise pytest.UsageError(f"{REQUIRE_GPU_ENV}=1 but litert-gpu cannot run: {reason}")
        collector.runtime(runtime.name, runtime.label, reason)
    collector.runtime("keras", "Keras on TensorFlow (the baseline), a process per thread count",
                      import_error("tensorflow"))
    config.stash[RESULTS_KEY] = collector


def pytest_collection_modifyitems(config, items):
    if not variants(config):
        raise pytest.UsageError(f"no .tflite models in {run_dir(config)}/tflite: run `make convert` first "
                                "or point --run / CXR_RUN at a converted run")


def pytest_deselected(items):
    """A session that leaves benchmarks out (-k, -m) measures part of the suite: its results are
    saved, but they never replace the run's recorded benchmark (reports/benchmark.json, which
    `make release` and SHIPPED read)."""
    if items:
        items[0].config.stash[PARTIAL_KEY] = True


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", variants(config), scope="module")
    if "paired_variant" in metafunc.fixturenames:  # every variant against fp32
        names = variants(config)
        metafunc.parametrize("paired_variant", [n for n in names if n != "fp32"] if "fp32" in names else [])
    if "keras_threads" in metafunc.fixturenames:
        metafunc.parametrize("keras_threads", threads(config))
    if "setup" in metafunc.fixturenames:  # (runtime, threads) of the latency benchmarks
        available = [r for r in config.stash[RESULTS_KEY].available_runtimes() if r in RUNTIMES]
        setups = [(r, t) for r in available for t in (threads(config) if RUNTIMES[r].threaded else [None])]
        metafunc.parametrize("setup", setups, ids=[f"{r}-{t}t" if t else r for r, t in setups], scope="module")


@pytest.fixture(scope="session")
def results(pytestconfig) -> results_mod.Collector:
    return pytestconfig.stash[RESULTS_KEY]


@pytest.fixture(scope="session")
def split(pytestconfig, results) -> Split:
    split = Split.of_run(run_dir(pytestconfig), pytestconfig.getoption("data_root"))
    results.test_split = {"n": len(split.paths), "root": str(split.root),
                          "fingerprint_matches": split.fingerprint_matches}
    return split


@pytest.fixture(scope="session")
def test_images(split) -> list[Path]:
    return split.pipeline_images()


@pytest.fixture(scope="session")
def ratio_threads(pytestconfig) -> int:
    """The thread count the ratio gates are read at."""
    return gates_mod.ratio_threads(load_gates(Path(pytestconfig.getoption("gates"))))


@pytest.fixture(scope="session")
def timing(pytestconfig) -> dict:
    """pytest-benchmark's time budget, for the timers outside it (Keras, the paired speed-up)."""
    return {"max_time": float(pytestconfig.getoption("benchmark_max_time")),
            "min_rounds": int(pytestconfig.getoption("benchmark_min_rounds"))}


def pytest_sessionfinish(session, exitstatus):
    """Write the results and check the gates; a failed gate or a regression fails the session."""
    config = session.config
    if RESULTS_KEY not in config.stash or exitstatus not in (0, 1) or not config.stash[RESULTS_KEY].variants:
        return
    shipped = config.getoption("variants")
    outcome = results_mod.finish(
        config.stash[RESULTS_KEY], gates_file=Path(config.getoption("gates")),
        results_dir=Path(config.getoption("results_dir")), shipped=shipped.split(",") if shipped else None,
        compare=config.getoption("compare"), pytest_benchmark_json=config.getoption("benchmark_json"),
        beside_run=not config.stash.get(PARTIAL_KEY, False))
    config.stash[OUTCOME_KEY] = outcome
    if not outcome.passed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """The gate table last, below pytest-benchmark's tables."""
    if OUTCOME_KEY in config.stash:
        for line in config.stash[OUTCOME_KEY].lines:
            terminalreporter.write_line(line)
