"""Benchmarks, gates and release: the gate logic on hand-made results, and the benchmark suite
itself run end to end (in a minimal mode) on the tiny converted run, so it never rots."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from benchmarks import clinic_files, compare, gates, results as results_mod, robustness
from benchmarks.release import main as release_main
from edge_app import preprocess
from edge_app.classifier import Classifier
from tests.conftest import REPO, run_module

VARIANTS = ("dynamic", "fp16", "fp32", "int8", "pruned-fp32", "pruned-int8", "pruned-qat", "qat")  # tiny_run's
PERMISSIVE = """
[accuracy]
min_macro_f1 = 0.0
[drop_vs_keras]
max_macro_f1 = 100.0
[size]
max_mib = 1000.0
[ratios]
threads = 2
max_pipeline_overhead = 1000.0
"""


def stats(median, iqr=0.1):
    return {"min_ms": median - iqr, "median_ms": median, "q1_ms": median - iqr / 2, "q3_ms": median + iqr / 2,
            "iqr_ms": iqr, "mean_ms": median, "stddev_ms": iqr, "max_ms": median + iqr, "rounds": 10}


def metrics(f1, sens=0.95, spec=0.9, covid=0.9):
    return {"n": 100, "accuracy": f1, "macro_f1": f1, "abnormal_sensitivity": sens, "abnormal_specificity": spec,
            "abnormal_auc": 0.99, "covid_sensitivity": covid, "confusion_matrix": [[1]]}


def variant(kind, f1, raw, pipeline, mib=2.0):
    return {"kind": kind, "bytes": int(mib * 2**20), "gzip_bytes": int(mib * 2**19), "metrics": metrics(f1),
            "load_ms": stats(20.0), "memory": {"peak_rss_mib": 150.0, "rss_before_load_mib": 90.0},
            "latency": [{"runtime": "litert-cpu" if kind == "tflite" else "keras", "threads": t, "stage": stage,
                         **stats(ms)} for t in (1, 2, 4) for stage, ms in (("raw", raw), ("pipeline", pipeline))]}


def clinic_stage(decode=100.0, library=95.0, preprocess=8.0, inference=10.0):
    """One kind's figures as benchmarks/test_clinic.py records them (ratios of these medians here)."""
    total = decode + preprocess + inference + 1.0
    return {"stages_ms": {"decode": decode, "preprocess": preprocess, "inference": inference, "postprocess": 1.0,
                          "total": total},
            "library_decode_ms": library, "decode_vs_library": decode / library,
            "preprocess_vs_inference": preprocess / inference,
            "pipeline_vs_library_and_inference": total / (library + inference), "rounds": 5}


@pytest.fixture
def measured() -> dict:
    """Results of a healthy run: every gate of benchmarks/gates.toml passes."""
    clinic = {"runtime": "litert-cpu", "threads": 2, "pipeline_kind": "dicom-mono2", "reference_kind": "devset",
              "files": {},
              "stages": {v: {"devset": clinic_stage(decode=9.0, library=1.0),  # the reference: never gated
                             "png16": clinic_stage(), "dicom-mono2": clinic_stage()} for v in ("fp32", "int8")},
              "memory": {v: {"kind": "dicom-3k", "peak_rss_mib": 150.0, "rss_before_load_mib": 60.0}
                         for v in ("fp32", "int8")},
              "cold_start": {"cli": {"available": True, "median_s": 0.6}, "app": {"available": True, "median_s": 0.9}}}
    return {"model": {"labels": ["normal", "pneumonia", "covid"]},
            "conversion_gates": {v: {"passed": True, "failures": []} for v in ("fp32", "int8")},
            "variants": {"keras": variant("keras", 0.90, 30.0, 34.0, 8.0),
                         "fp32": {**variant("tflite", 0.90, 20.0, 24.0, 8.0),
                                  "ood": {"carried": True, "test_flagged": 0.01, "nonradiograph_flagged": 1.0}},
                         "int8": {**variant("tflite", 0.895, 10.0, 14.0, 2.0),
                                  "ood": {"carried": True, "test_flagged": 0.02, "nonradiograph_flagged": 0.95}}},
            "clinic": clinic,
            "robustness": {v: {"model_sha256": "0" * 64, "n_films": 481,
                               "silently_cleared": {"acquisition": "blurred", "value": 0.02, "ci95": [0.008, 0.05],
                                                    "k": 4, "n": 200},
                               "needlessly_referred": {"acquisition": "jpeg q30", "value": 0.2, "ci95": [0.15, 0.26],
                                                       "k": 48, "n": 240}}
                           for v in ("fp32", "int8")}}


def test_healthy_measurements_pass_every_gate(measured):
    rows = gates.evaluate(measured, gates.load_gates())
    assert rows and all(r.passed for r in rows), gates.table(rows)
    assert {r.variant for r in rows} == {"fp32", "int8"}
    assert "ratios.min_int8_speedup" in {r.gate for r in rows}
    ratios = gates.ratios(measured, 2)
    assert ratios["int8_speedup"] == pytest.approx(2.0)
    assert ratios["pipeline_overhead"]["fp32"] == pytest.approx(1.2)
    assert ratios["drop_vs_keras_points"]["int8"]["macro_f1"] == pytest.approx(0.5)


def test_a_variant_without_the_ood_warning_fails_the_release_and_the_smallest_passing_one_ships(measured):
    assert gates.best_variant(gates.evaluate(measured, gates.load_gates()), measured) == "int8"
    measured["variants"]["int8"]["ood"] = {"carried": False}
    rows = gates.evaluate(measured, gates.load_gates())
    (row,) = [r for r in rows if r.gate == "ood.required" and r.variant == "int8"]
    assert not row.passed and row.note == "ships without the OOD warning"
    assert not any(r.gate.startswith("ood.m") and r.variant == "int8" for r in rows)  # nothing else to measure
    assert gates.best_variant(rows, measured) == "fp32"
    measured["variants"]["fp32"]["metrics"]["macro_f1"] = 0.5
    assert gates.best_variant(gates.evaluate(measured, gates.load_gates()), measured) is None


def test_a_variant_that_failed_its_conversion_parity_gate_never_ships(measured):
    """Conversion's parity verdict (decisions flipped, COVID-19 images lost) is a gate of the release
    too: a variant that passed every benchmark figure but flipped decisions does not ship."""
    flips = "test: 8 of 481 referral decisions flipped (1.66%; budget 0.50%)"
    measured["conversion_gates"]["int8"] = {"passed": False, "failures": [flips]}
    rows = gates.evaluate(measured, gates.load_gates())
    (row,) = [r for r in rows if r.name == "conversion.parity[int8]"]
    assert not row.passed and row.measured == 1.0 and row.note == flips
    assert [r.name for r in rows if not r.passed] == ["conversion.parity[int8]"]
    assert gates.best_variant(rows, measured) == "fp32"
    measured["speedup_vs_fp32"] = {"int8": {"speedup": 1.1}}
    measured["variants"]["fp32"]["latency"][3]["overhead_ratio"] = 9.0     # fp32 fails a speed gate
    rows = gates.evaluate(measured, gates.load_gates())
    assert gates.best_variant(rows, measured) is None
    assert gates.best_variant(rows, measured, decisions_only=True) == "fp32"   # int8 flips decisions
    measured["conversion_gates"]["int8"] = {"passed": True, "failures": []}
    assert gates.best_variant(gates.evaluate(measured, gates.load_gates()), measured, decisions_only=True) == "int8"
    del measured["conversion_gates"]
    assert {"conversion.parity[fp32]", "conversion.parity[int8]"} <= \
        {r.name for r in gates.evaluate(measured, gates.load_gates()) if not r.passed}   # not measured: never waved through

def test_ratios_prefer_one_paired_measurement_over_two_medians(measured):
    measured["speedup_vs_fp32"] = {"int8": {"speedup": 1.1}}
    measured["variants"]["fp32"]["latency"][3]["overhead_ratio"] = 1.05
    ratios = gates.ratios(measured, 2)
    assert ratios["int8_speedup"] == 1.1 and ratios["pipeline_overhead"]["fp32"] == 1.05
    failed = [r.name for r in gates.evaluate(measured, gates.load_gates()) if not r.passed]
    assert failed == ["ratios.min_int8_speedup[int8]"]


def test_without_tensorflow_the_drops_use_the_recorded_keras_metrics(measured):
    keras = measured["variants"].pop("keras")
    assert not any(r.passed for r in gates.evaluate(measured, gates.load_gates()) if r.gate.startswith("drop_vs"))
    measured["keras_reference"] = {"source": "reports/conversion.json", "metrics": keras["metrics"]}
    assert all(r.passed for r in gates.evaluate(measured, gates.load_gates()))


@pytest.mark.parametrize("spoil, failed", [
    (lambda r: r["variants"]["int8"]["metrics"].update(macro_f1=0.5), "accuracy.min_macro_f1[int8]"),
    (lambda r: r["variants"]["int8"]["metrics"].update(abnormal_sensitivity=0.8),
     "drop_vs_keras.max_abnormal_sensitivity[int8]"),
    (lambda r: r["variants"]["fp32"].update(bytes=40 * 2**20), "size.max_mib[fp32]"),
    (lambda r: r["variants"]["int8"]["latency"][3].update(median_ms=40.0),  # pipeline, 2 threads
     "ratios.max_pipeline_overhead[int8]"),
    (lambda r: r["variants"]["int8"]["latency"][2].update(median_ms=19.0),  # raw, 2 threads
     "ratios.min_int8_speedup[int8]"),
    (lambda r: r["variants"]["fp32"].update(metrics=None), "accuracy.min_macro_f1[fp32]"),  # not measured
    (lambda r: r["variants"]["fp32"]["ood"].update(nonradiograph_flagged=0.5), "ood.min_nonradiograph_flagged[fp32]"),
    (lambda r: r["variants"]["fp32"]["ood"].update(test_flagged=0.2), "ood.max_test_flagged[fp32]"),
    (lambda r: r["variants"]["fp32"].pop("ood"), "ood.max_test_flagged[fp32]"),                 # not measured
    (lambda r: r["clinic"]["stages"]["int8"].update(png16=clinic_stage(decode=169.0, library=100.0)),
     "clinic.png16.max_decode_vs_library[int8]"),
    (lambda r: r["clinic"]["stages"]["fp32"].update(png16=clinic_stage(preprocess=12.0)),
     "clinic.png16.max_preprocess_vs_inference[fp32]"),
    (lambda r: r["clinic"]["stages"]["int8"].update({"dicom-mono2": clinic_stage(decode=115.0, library=40.0)}),
     "clinic.dicom-mono2.max_pipeline_vs_library_and_inference[int8]"),
    (lambda r: r["clinic"]["stages"]["fp32"].pop("dicom-mono2"),                               # not measured
     "clinic.dicom-mono2.max_pipeline_vs_library_and_inference[fp32]"),
    (lambda r: r["clinic"]["memory"]["fp32"].update(peak_rss_mib=320.0), "clinic.dicom-3k.max_peak_rss_mib[fp32]"),
    (lambda r: r["clinic"]["cold_start"]["app"].update(median_s=1.4), "clinic.app.max_cold_start_s[int8]"),
    (lambda r: r["clinic"]["cold_start"].update(cli={"available": False, "reason": "no X"}),   # not measured
     "clinic.cli.max_cold_start_s[int8]"),
    (lambda r: r.pop("clinic"), "clinic.files.max_decode_vs_library[fp32]"),                  # an older results file
    (lambda r: r["robustness"]["int8"]["silently_cleared"].update(value=0.32, k=64),
     "robustness.max_silently_cleared[int8]"),
    (lambda r: r.pop("robustness"), "robustness.max_silently_cleared[fp32]"),                  # not measured
])
def test_a_failing_measurement_fails_its_gate_and_the_command(measured, tmp_path, capsys, spoil, failed):
    spoil(measured)
    rows = gates.evaluate(measured, gates.load_gates())
    assert failed in [r.name for r in rows if not r.passed], gates.table(rows)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(measured))
    assert gates.main([str(path)]) == 1
    assert failed in capsys.readouterr().out.splitlines()[-1]


def test_a_failed_clinic_gate_says_which_kind_and_stage_and_by_how_much(measured):
    measured["clinic"]["stages"]["int8"]["png16"] = clinic_stage(decode=169.0, library=100.0)
    rows = gates.evaluate(measured, gates.load_gates())
    (row,) = [r for r in rows if not r.passed]
    assert row.name == "clinic.png16.max_decode_vs_library[int8]" and row.measured == pytest.approx(1.69)
    assert "png16: decode 169.0 ms vs library decode 100.0 ms, +41% vs the limit" in gates.table(rows)
    assert not [r for r in rows if ".devset." in r.gate]   # the development-set image is only a reference


def test_a_lung_cropping_variant_is_gated_on_its_segmenter(measured):
    assert not [r for r in gates.evaluate(measured, gates.load_gates()) if r.gate.startswith("lungs.")]
    measured["model"]["lung_crop"] = "box"
    step = {"segmenter_sha256": "0" * 64, "segmenter_bytes": 109464, "segmenter_input_size": 96, "segmenter_threads": 2,
            "inference_ms": 3.0, "segmenter_ms": 0.5, "segmenter_vs_inference": 0.5 / 3.0, "step_ms": 1.5,
            "step_vs_inference": 0.5, "pairs": 40}
    measured["lung_step"] = {"fp32": step, "int8": {**step, "segmenter_vs_inference": 0.26, "inference_ms": 1.9}}
    rows = [r for r in gates.evaluate(measured, gates.load_gates()) if r.gate.startswith("lungs.")]
    assert {r.name for r in rows} == {f"lungs.{k}[{v}]" for k in ("max_segmenter_kib", "max_segmenter_vs_inference")
                                      for v in ("fp32", "int8")}
    assert [r.name for r in rows if not r.passed] == ["lungs.max_segmenter_vs_inference[int8]"]
    assert "segmenter 0.50 ms vs inference 1.90 ms; whole lung step 1.50 ms = 0.50 x" in gates.table(rows)
    del measured["lung_step"]["int8"]            # a lung-cropping variant not measured fails
    rows = [r for r in gates.evaluate(measured, gates.load_gates()) if r.gate.startswith("lungs.")]
    assert {r.name for r in rows if not r.passed} == {"lungs.max_segmenter_kib[int8]",
                                                      "lungs.max_segmenter_vs_inference[int8]"}


def test_silently_cleared_and_needlessly_referred_count_only_changed_decisions_without_a_warning():
    labels = ["normal", "pneumonia", "covid"]

    def film(cls, p, decision):
        return {"class": cls, "abnormal_probability": p, "decision": decision,
                "probabilities": {"normal": 1 - p, "pneumonia": p, "covid": 0.0}}
    stored = {0: film("pneumonia", 0.9, "refer"), 1: film("pneumonia", 0.8, "refer"),
              2: film("covid", 0.7, "refer"), 3: film("pneumonia", 0.3, "no_abnormality"),
              4: film("normal", 0.9, "refer")}
    acquired = {0: film("pneumonia", 0.2, "no_abnormality"),    # cleared, no warning: counted
                1: film("pneumonia", 0.2, "unreliable"),        # cleared, but the warning shows
                2: film("covid", 0.9, "refer"),                 # still referred
                3: film("pneumonia", 0.1, "no_abnormality"),    # never referred: not in the share
                4: film("normal", 0.1, "no_abnormality")}       # a normal film: not in the share
    change = robustness.against_stored(stored, acquired, 0.5, labels)
    assert change["silently_cleared"]["k"] == 1 and change["silently_cleared"]["n"] == 3
    assert change["silently_cleared_films"] == [0] and change["no_longer_referred"] == 3
    stored[5], acquired[5] = film("normal", 0.2, "no_abnormality"), film("normal", 0.7, "refer")       # counted
    stored[6], acquired[6] = film("normal", 0.2, "no_abnormality"), film("normal", 0.9, "unreliable")  # warned
    needless = robustness.against_stored(stored, acquired, 0.5, labels)["needlessly_referred"]
    assert (needless["k"], needless["n"]) == (1, 2)


def test_device_budgets_are_checked_only_with_a_device(measured):
    gate_file = gates.load_gates()
    assert not [r for r in gates.evaluate(measured, gate_file) if r.gate.startswith("devices.")]
    measured["variants"]["fp32"]["latency"][5].update(median_ms=900.0)  # pipeline at 4 threads
    rows = gates.evaluate(measured, gate_file, device="pi4")
    assert [r.name for r in rows if not r.passed] == ["devices.pi4.max_pipeline_ms[fp32]"]
    with pytest.raises(gates.GateFileError, match="no \\[devices.toaster\\]"):
        gates.evaluate(measured, gate_file, device="toaster")


def test_only_shipped_variants_are_gated(measured):
    measured["variants"]["int8"]["metrics"].update(macro_f1=0.1)
    rows = gates.evaluate(measured, gates.load_gates(), variants=["fp32"])
    assert all(r.passed for r in rows) and {r.variant for r in rows} == {"fp32"}
    assert not gates.evaluate(measured, gates.load_gates(), variants=["qat"])[0].passed  # never benchmarked


def test_gates_file_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "g.toml").write_text("[accuracy]\nmin_macro_f1 = 0.8\nmin_happiness = 1\n")
    with pytest.raises(gates.GateFileError, match="min_happiness"):
        gates.load_gates(tmp_path / "g.toml")


def test_compare_flags_only_regressions_beyond_noise(measured):
    tolerance = compare.tolerances(gates.load_gates())
    later = copy.deepcopy(measured)
    later["variants"]["fp32"]["latency"][0].update(median_ms=20.5)  # +2.5 %: noise
    assert compare.regressions(measured, later, tolerance) == []
    later["variants"]["fp32"]["latency"][0].update(median_ms=26.0, iqr_ms=1.0)  # +30 %, beyond the IQR
    later["variants"]["int8"]["metrics"].update(macro_f1=0.85)
    found = {(c.variant, c.what) for c in compare.regressions(measured, later, tolerance)}
    assert found == {("fp32", "raw median ms (litert-cpu, 1 threads)"), ("int8", "macro_f1")}
    later["variants"]["fp32"]["latency"][0].update(iqr_ms=8.0)  # a jittery stage: +6 ms is within its noise
    assert ("fp32", "raw median ms (litert-cpu, 1 threads)") not in {
        (c.variant, c.what) for c in compare.regressions(measured, later, tolerance)}


# --- the benchmark suite itself, in a minimal mode on the tiny run -------------------------------

def run_benchmarks(run: Path, out: Path, gates_text: str, *extra) -> subprocess.CompletedProcess:
    gates_file = out / "gates.toml"
    gates_file.write_text(gates_text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    swiftshader = Path("/usr/lib/chromium/vk_swiftshader_icd.json")
    if swiftshader.is_file():  # the GPU path too, where a software Vulkan is installed
        env.update(VK_ICD_FILENAMES=str(swiftshader), XDG_RUNTIME_DIR=env.get("XDG_RUNTIME_DIR", "/tmp"))
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--run", str(run), "--results-dir", str(out), "--gates", str(gates_file),
                           "--benchmark-max-time=0.02", "--benchmark-min-rounds=2", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def suite(tiny_run, tmp_path_factory):
    """One minimal benchmark session whose size gate cannot pass: (process, results path)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_benchmarks(tiny_run, out, PERMISSIVE.replace("max_mib = 1000.0", "max_mib = 0.0001"))
    found = sorted(out.glob("tiny-*.json"))
    assert len(found) == 1, f"no results JSON\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return proc, found[0]


@pytest.mark.slow
def test_benchmark_suite_measures_every_variant(suite, tiny_run):
    proc, path = suite
    results = json.loads(path.read_text())
    results_mod.validate(results)
    assert set(results["variants"]) == {"keras", *VARIANTS}
    gpu = results["runtimes"]["litert-gpu"]
    assert gpu["available"] or gpu["reason"].startswith("no GPU adapter on this machine"), gpu
    for name in VARIANTS:
        v = results["variants"][name]
        assert v["sha256"] == hashlib.sha256((tiny_run / "tflite" / f"{name}.tflite").read_bytes()).hexdigest()
        for stage in ("raw", "pipeline"):
            for threads in (1, 2, 4):
                assert gates.latency(v, stage, threads) > 0
        assert v["memory"]["peak_rss_mib"] > v["memory"]["rss_before_load_mib"] > 0
        assert v["load_ms"]["median_ms"] > 0 and 0 <= v["metrics"]["macro_f1"] <= 1
        assert v["metrics"]["n"] == results["test_split"]["n"] == 18
        # the benchmarks skip a latency only where a runtime cannot run a variant, and record why: in CI
        # that must be exactly the int8-I/O variants on the float-only CompiledModel (CPU, and GPU
        # where this machine has a GPU adapter: else litert-gpu is unavailable as a whole, below)
        compiled = {"litert-compiled-cpu"} | ({"litert-gpu"} if gpu["available"] else set())
        expected = compiled if name in ("int8", "qat", "pruned-int8", "pruned-qat") else set()
        assert {u["runtime"] for u in v["unavailable"]} == expected, v["unavailable"]
        assert all("CompiledModel backend runs float-I/O models only" in u["reason"] for u in v["unavailable"])
        carries = Classifier(tiny_run / "tflite" / f"{name}.tflite", accelerator="cpu").info["ood_warning"]
        assert v["ood"]["carried"] is carries
        if carries:
            assert 0 <= v["ood"]["test_flagged"] <= 1 and v["ood"]["nonradiographs"] == 8
        pipeline = next(r for r in v["latency"] if (r["runtime"], r["threads"], r["stage"]) == ("litert-cpu", 2, "pipeline"))
        assert pipeline["overhead_ratio"] >= 1 and set(pipeline["stages_ms"]) >= {"decode", "inference", "total"}
    assert set(results["speedup_vs_fp32"]) == set(VARIANTS) - {"fp32"}
    assert results["lung_step"] == {n: None for n in VARIANTS}    # tiny_run does not crop: no lung step
    for name in VARIANTS:       # every variant on the re-acquired films, its worst acquisition kept for the gate
        robust = results["robustness"][name]
        assert robust["n_films"] == 18 and robust["model_sha256"] == results["variants"][name]["sha256"]
        for figure in robustness.WORST_OF:
            assert robust[figure]["acquisition"] in {a.name for a in robustness.ACQUISITIONS} | {None}
    clinic = results["clinic"]
    assert set(clinic["files"]) == {"devset", *clinic_files.KINDS} and clinic["pipeline_kind"] == "dicom-mono2"
    assert all(2000 <= min(f["width"], f["height"]) <= max(f["width"], f["height"]) <= 3000
               for kind, f in clinic["files"].items() if kind != "devset")
    for name in VARIANTS:
        assert set(clinic["stages"][name]) == set(clinic["files"])
        for m in clinic["stages"][name].values():
            assert m["library_decode_ms"] > 0 and m["stages_ms"]["inference"] > 0
            assert m["stages_ms"]["total"] >= m["stages_ms"]["decode"] + m["stages_ms"]["preprocess"]
        memory = clinic["memory"][name]
        assert memory["kind"] == "dicom-3k" and memory["peak_rss_mib"] > memory["rss_before_load_mib"] > 0
    assert clinic["cold_start"]["cli"]["median_s"] > 0 and clinic["cold_start"]["cli"]["imports_ms"] > 0
    assert clinic["cold_start"]["app"]["median_s"] > 0   # xvfb is installed wherever the GUI tests run
    assert results["ratios"]["int8_speedup"] == results["speedup_vs_fp32"]["int8"]["speedup"]
    keras = results["variants"]["keras"]
    assert keras["metrics"]["n"] == 18 and gates.latency(keras, "pipeline", 2, "keras") > 0
    assert results["runtimes"]["tflite-runtime"]["available"] is False
    assert results["runtimes"]["tflite-runtime"]["reason"]
    assert path.with_suffix(".md").read_text().startswith("# Benchmark: tiny")
    assert path.with_name(path.stem + "-pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert path.with_name(path.stem + "-clinic.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Full-size clinic files" in path.with_suffix(".md").read_text()
    assert (tiny_run / "reports" / "benchmark.json").is_file()


@pytest.mark.slow
def test_summary_shows_latency_gates_and_the_failed_gate(suite, tiny_run):
    proc, path = suite
    results = json.loads(path.read_text())
    out = run_module("benchmarks.summary", tiny_run).stdout
    for name in VARIANTS:
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert f"{gates.latency(results['variants'][name], 'pipeline', 2):.1f}" in row
    total = len(results["gates"]["rows"])
    assert f"release gates: {total - len(results['gates']['failed'])} of {total} passed" in out
    size = next(line for line in out.splitlines() if line.startswith("  size.max_mib (limit <= 0.0001 MiB): "))
    assert all(f"{name} " in size for name in VARIANTS)  # one line for every variant that failed it


@pytest.mark.slow
def test_a_failed_gate_fails_the_benchmark_command_and_names_itself(suite):
    proc, path = suite
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()
    line = next(l for l in summary if "gates FAILED" in l)
    assert all(f"size.max_mib[{v}]" in line for v in VARIANTS)
    results = json.loads(path.read_text())
    assert results["gates"]["passed"] is False
    assert sorted(results["gates"]["failed"]) == sorted(f"size.max_mib[{v}]" for v in VARIANTS)
    assert gates.main([str(path), "--gates", str(path.parent / "gates.toml")]) == 1
    (path.parent / "ok.toml").write_text(PERMISSIVE)
    assert gates.main([str(path), "--gates", str(path.parent / "ok.toml")]) == 0  # the same figures pass


@pytest.mark.slow
def test_results_schema_rejects_a_broken_document(suite):
    results = json.loads(suite[1].read_text())
    broken = copy.deepcopy(results)
    del broken["variants"]["fp32"]["sha256"]
    with pytest.raises(jsonschema.ValidationError, match="sha256"):
        results_mod.validate(broken)
    broken = copy.deepcopy(results)
    broken["variants"]["int8"]["latency"][0]["stage"] = "warp"
    with pytest.raises(jsonschema.ValidationError):
        results_mod.validate(broken)


@pytest.mark.slow
def test_compare_against_itself_finds_nothing_and_a_slower_copy_is_flagged(suite, tmp_path):
    path = suite[1]
    assert compare.main([str(path), str(path)]) == 0
    slower = json.loads(path.read_text())
    row = slower["variants"]["fp32"]["latency"][0]
    row["median_ms"] = row["median_ms"] * 3 + 3 * row["iqr_ms"]
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    assert compare.main([str(path), str(tmp_path / "slower.json")]) == 1


@pytest.mark.slow
def test_part_of_the_suite_never_replaces_the_runs_recorded_benchmark(suite, tiny_run, tmp_path):
    recorded = (tiny_run / "reports" / "benchmark.json").read_bytes()   # the whole suite's, above
    proc = run_benchmarks(tiny_run, tmp_path, PERMISSIVE, "-k", "lung_step")
    assert "part of the suite only (-k / -m)" in proc.stdout, proc.stdout[-3000:]
    assert len(list(tmp_path.glob("tiny-*.json"))) == 1
    assert (tiny_run / "reports" / "benchmark.json").read_bytes() == recorded


# --- release -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_release_refuses_on_a_failed_gate(suite, tiny_run, tmp_path, capsys):
    path = suite[1]
    dist = tmp_path / "dist"
    assert release_main([str(tiny_run), "--results", str(path), "--gates", str(path.parent / "gates.toml"),
                         "--dist", str(dist)]) == 1
    assert "size.max_mib[fp32]" in capsys.readouterr().err
    assert not dist.exists() or not any(dist.iterdir())


@pytest.mark.slow
def test_release_writes_a_verified_dist_when_every_gate_passes(suite, tiny_run, tmp_path):
    path = suite[1]
    (tmp_path / "ok.toml").write_text(PERMISSIVE)
    dist = tmp_path / "dist"
    args = [str(tiny_run), "--results", str(path), "--gates", str(tmp_path / "ok.toml"), "--dist", str(dist),
            "--variants", "fp16,int8", "--version", "1.2.3"]
    assert release_main(args) == 0
    card = json.loads((tiny_run / "model_card.json").read_text())
    target = dist / f"{card['name']}-1.2.3"
    assert sorted(p.name for p in target.iterdir()) == [
        "SHA256SUMS", "benchmark.json", "benchmark.md", "benchmark_pareto.png", "fp16.tflite", "int8.tflite",
        "model_card.json"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=target, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert Classifier(target / "int8.tflite", accelerator="cpu").card.variant == "int8"
    assert json.loads((target / "benchmark.json").read_text())["gates"]["variants"] == ["fp16", "int8"]
    assert release_main(args) == 1  # never overwritten


@pytest.mark.slow
def test_release_refuses_results_that_do_not_describe_the_files(suite, tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    data = bytearray((run / "tflite" / "fp32.tflite").read_bytes())
    data[-1] ^= 0xFF
    (run / "tflite" / "fp32.tflite").write_bytes(bytes(data))
    (tmp_path / "ok.toml").write_text(PERMISSIVE)
    assert release_main([str(run), "--results", str(suite[1]), "--gates", str(tmp_path / "ok.toml"),
                         "--dist", str(tmp_path / "dist")]) == 1
    assert "changed since it was benchmarked" in capsys.readouterr().err


def test_robustness_reacquires_every_test_film_and_measures_what_moved(tiny_run, tmp_path):
    """benchmarks.robustness on the tiny run's test films with two variants: every acquisition scores
    every film or lists it as refused; the films as stored move nothing against themselves, the
    re-acquired ones do; the worst acquisition is the one that clears most; a seeded acquisition writes
    the same file twice; the reports are written, and train.compare shows the worst shares."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    run_module("benchmarks.robustness", "--run", run, "--model", run / "tflite" / "fp32.tflite",
               "--model", run / "tflite" / "int8.tflite", "--bootstrap", "0")
    result = json.loads((run / "reports" / "robustness.json").read_text())
    assert list(result["variants"]) == ["fp32", "int8"] and result["n_films"] == 18
    for variant in result["variants"].values():
        rows = variant["acquisitions"]
        assert list(rows) == [a.name for a in robustness.ACQUISITIONS]
        for row in rows.values():
            assert row["n_scored"] + len(row["refused"]) == result["n_films"]
            assert row["against_stored"]["n"] == row["n_scored"]
        stored = rows[robustness.AS_STORED]["against_stored"]
        assert stored["referrals_flipped"] == stored["classes_changed"] == 0 and stored["max_abs_delta_p"] == 0.0
        assert stored["silently_cleared"]["k"] == 0 and stored["silently_cleared"]["n"] > 0
        assert max(row["against_stored"]["max_abs_delta_p"] for row in rows.values()) > 0.0
        for figure, worst in variant["worst"].items():
            shares = [r["against_stored"][figure]["value"] for r in rows.values()]
            assert worst["value"] == max(v for v in shares if v is not None)
            at_worst = rows[worst["acquisition"]]["against_stored"][figure]
            assert {**at_worst, "acquisition": worst["acquisition"]} == worst
    markdown = (run / "reports" / "robustness.md").read_text()
    assert "## fp32 (" in markdown and "## int8 (" in markdown
    assert all(f"| {name} (" in markdown for name in result["acquisitions"])
    cleared = result["variants"]["fp32"]["worst"]["silently_cleared"]     # train.compare reads the first variant
    compared = run_module("train.compare", run).stdout
    assert f"| {tmp_path.name}/run | fp32 | {cleared['value']:.3f} [" in compared
    assert (run / "reports" / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    noisy = next(a for a in robustness.ACQUISITIONS if a.name == "noisy")
    paths = robustness.Split.of_run(run).paths[:1]
    first = robustness.write_acquired(noisy, paths, tmp_path / "a", seed=3)[0].read_bytes()
    assert robustness.write_acquired(noisy, paths, tmp_path / "b", seed=3)[0].read_bytes() == first
    assert robustness.write_acquired(noisy, paths, tmp_path / "c", seed=4)[0].read_bytes() != first


def test_across_exports_counts_films_whose_referral_depends_on_how_they_were_stored():
    def films(*ps):
        return {i: {"abnormal_probability": p} for i, p in enumerate(ps) if p is not None}
    by_export = {"png8": films(0.9, 0.1, 0.55, 0.45, 0.7),
                 "png16": films(0.8, 0.2, 0.45, 0.40, None),      # film 4 refused as png16: left out
                 "dicom-voilut": films(0.95, 0.1, 0.60, 0.49, 0.1)}
    across = robustness.across_exports(by_export, 0.5)
    assert across["exports"] == ["png8", "png16", "dicom-voilut"]
    assert (across["decision_differs"]["k"], across["decision_differs"]["n"]) == (1, 4)
    assert across["differing_films"] == [2]                        # 0.55 / 0.45 / 0.60 around 0.5
    assert [across["referred"][k]["k"] for k in by_export] == [2, 1, 2]
    assert across["max_spread"] == pytest.approx(0.15)
    assert across["mean_spread"] == pytest.approx((0.15 + 0.1 + 0.15 + 0.09) / 4)


def test_every_export_kind_stores_the_same_detector_counts(shared_data, tmp_path):
    """The robustness benchmark's exports differ only in how the same counts are stored."""
    import pydicom
    from PIL import Image

    film = sorted((shared_data / "test" / "normal").iterdir())[:1]
    written = {a.export: robustness.write_acquired(a, film, tmp_path / a.export, seed=5)[0]
               for a in robustness.ACQUISITIONS + robustness.EXPORTS if a.export}
    assert set(written) == {"png8", "png16", "png-rgb", "jpeg95", "dicom-mono2", "dicom-mono1", "dicom-voilut"}
    with Image.open(written["png16"]) as im:
        counts = np.asarray(im).astype(np.int64)
    h, w = preprocess.decode(film[0]).shape
    assert counts.shape == (h * robustness.EXPORT_SCALE, w * robustness.EXPORT_SCALE)
    assert counts.max() <= clinic_files.FULL and counts.max() - counts.min() > 2000
    np.testing.assert_array_equal(pydicom.dcmread(written["dicom-mono2"]).pixel_array, counts)
    np.testing.assert_array_equal(pydicom.dcmread(written["dicom-voilut"]).pixel_array, counts)
    np.testing.assert_array_equal(clinic_files.FULL - pydicom.dcmread(written["dicom-mono1"]).pixel_array, counts)
    with Image.open(written["png8"]) as im:
        np.testing.assert_array_equal(np.asarray(im), counts >> (clinic_files.BITS - 8))
    with Image.open(written["png-rgb"]) as im:
        np.testing.assert_array_equal(np.asarray(im)[..., 1], counts >> (clinic_files.BITS - 8))
    # MONOCHROME1's window sits on its own (inverted) stored values: the device sees MONOCHROME2's film
    mono1, mono2 = (preprocess.decode(written[k]).astype(int) for k in ("dicom-mono1", "dicom-mono2"))
    assert np.abs(mono1 - mono2).max() <= 1
