"""The GPU backend for real (LiteRT's WebGPU accelerator on SwiftShader, a Vulkan GPU in software)
and every way it falls back. Each case runs the CLI in a fresh process: the Vulkan driver is
chosen from the environment when LiteRT first creates its GPU environment, once per process."""
import json

import numpy as np
import pytest

from conftest import REPO, SWIFTSHADER, run_module
from edge_app.runtime import REQUIRE_GPU_ENV

pytestmark = pytest.mark.device  # make test-device: no training beyond device_run

NO_GPU = {**SWIFTSHADER, "VK_ICD_FILENAMES": "/nonexistent/vk_icd.json"}


NO_ADAPTER = "no GPU adapter on this machine (LiteRT: No adapters found)"


def _json(*args, env):
    return json.loads(run_module("edge_app", *args, env=env).stdout)


def _images(tiny_dataset):
    return [sorted((tiny_dataset / "test" / c).iterdir())[0] for c in ("normal", "pneumonia", "covid")]


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_gpu_backend_runs_every_op_and_matches_cpu(swiftshader, device_run, tiny_dataset, variant):
    model = device_run / "tflite" / f"{variant}.tflite"
    info = _json("info", "--model", model, "--accelerator", "gpu", env=SWIFTSHADER)
    assert info["backend"] == "litert-compiled-gpu", info["backends_tried"]
    assert info["gpu_fully_accelerated"] is True and info["gpu"] == "run: every op on the GPU"
    images = _images(tiny_dataset)
    gpu = _json("predict", *images, "--model", model, "--accelerator", "gpu", "--json", env=SWIFTSHADER)
    cpu = _json("predict", *images, "--model", model, "--accelerator", "cpu", "--json", env=SWIFTSHADER)
    for g, c in zip(gpu["results"], cpu["results"]):
        assert (g["backend"], c["backend"]) == ("litert-compiled-gpu", "litert-compiled-cpu")
        assert g["label"] == c["label"] and g["decision"] == c["decision"]
        assert g["probabilities"] == pytest.approx(c["probabilities"], abs=1e-5)


def test_unavailable_gpu_falls_back_to_cpu_and_says_why(device_run):
    info = _json("info", "--model", device_run / "tflite" / "fp32.tflite", "--accelerator", "gpu", env=NO_GPU)
    assert info["backend"] == "litert-compiled-cpu" and info["gpu_fully_accelerated"] is None
    (tried,) = info["backends_tried"]
    assert tried["backend"] == "litert-compiled-gpu"
    assert "No adapters found" in tried["error"], tried["error"]  # LiteRT's own words, not a bare source line
    assert info["gpu"] == f"not run: {NO_ADAPTER}"
    assert _json("info", "--model", device_run / "tflite" / "fp32.tflite", env=NO_GPU)["gpu"] == \
        "not tried (accelerator cpu)"


def test_conversion_gpu_check_without_an_adapter_is_not_run_unless_required(device_run, monkeypatch):
    """No adapter: conversion's GPU check is "not checked", not a failed gate; under
    CXR_EDGE_REQUIRE_GPU=1 the same machine fails fp16's gate, naming the missing adapter."""
    from convert.config import ConvertConfig
    from convert.conversion import _gpu_check

    monkeypatch.setenv("VK_ICD_FILENAMES", NO_GPU["VK_ICD_FILENAMES"])
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)  # CI sets it for the whole suite
    card = json.loads((device_run / "model_card.json").read_text())
    size, channels = card["input"]["size"], card["input"]["channels"]
    splits = {"test": {"x": np.random.default_rng(0).random((2, size, size, channels), np.float32)}}

    def check():
        results = {"variants": {name: {"file": str(device_run / "tflite" / f"{name}.tflite"),
                                       "gate": {"passed": True, "failures": []}} for name in ("fp16", "int8")}}
        _gpu_check(results, splits, ConvertConfig())
        return results

    results = check()
    assert results["gpu"]["not_checked"] == NO_ADAPTER
    assert results["variants"]["fp16"]["gpu"]["no_adapter"] is True
    assert results["variants"]["fp16"]["gate"] == {"passed": True, "failures": []}
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    gate = check()["variants"]["fp16"]["gate"]
    assert not gate["passed"]
    assert gate["failures"][0].startswith(f"gpu: {REQUIRE_GPU_ENV}=1 but this machine has no GPU adapter")


def test_benchmarks_without_an_adapter_record_the_gpu_unavailable_unless_required(device_run, tmp_path):
    args = ("pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--run", device_run, "--results-dir", tmp_path,
            "--threads", "1", "-k", "test_raw_inference and fp32 and litert-cpu", "--benchmark-max-time=0.01",
            "--benchmark-min-rounds=1")
    env = {**NO_GPU, "PYTHONPATH": str(REPO), REQUIRE_GPU_ENV: ""}
    run_module(*args, check=False, env=env)
    (path,) = tmp_path.glob("*.json")
    runtime = json.loads(path.read_text())["runtimes"]["litert-gpu"]
    assert (runtime["available"], runtime["reason"]) == (False, NO_ADAPTER)
    assert f"| litert-gpu | {runtime['label']} | no: {NO_ADAPTER} |" in path.with_suffix(".md").read_text()
    required = run_module(*args, check=False, env={**env, REQUIRE_GPU_ENV: "1"})
    assert required.returncode == 4, required.stdout[-2000:]  # a usage error: before any benchmark
    assert f"{REQUIRE_GPU_ENV}=1 but litert-gpu cannot run: {NO_ADAPTER}" in required.stderr


def test_bad_gpu_delegate_path_falls_back_cleanly(device_run, tiny_dataset):
    model = device_run / "tflite" / "int8.tflite"
    missing = "/nonexistent/libtensorflowlite_gpu_delegate.so"
    info = _json("info", "--model", model, "--gpu-delegate", missing, env=NO_GPU)
    tried = {t["backend"]: t["error"] for t in info["backends_tried"]}
    assert missing in tried["litert-interpreter+gpu-delegate"]
    assert info["backend"] == "litert-interpreter"  # int8 I/O: CompiledModel refuses it, XNNPACK runs it
    result = _json("predict", _images(tiny_dataset)[1], "--model", model, "--gpu-delegate", missing,
                   "--json", env=NO_GPU)
    assert result["results"][0]["backend"] == "litert-interpreter"


def test_accelerator_timing_on_a_gpu_and_on_a_machine_without_one(swiftshader, device_run, tiny_dataset, tmp_path):
    """`python -m benchmarks.accelerators` (what a lent GPU machine runs): on SwiftShader the GPU row
    is timed, fully on the GPU and equal to the CPU's outputs; with no Vulkan driver it says "not
    available" and why, and still times the CPU; both files are found beside the run."""
    from benchmarks import accelerators

    reports = tmp_path / "reports"
    for name, env in (("swiftshader", SWIFTSHADER), ("plain", NO_GPU)):
        run_module("benchmarks.accelerators", device_run, "--images", tiny_dataset / "test", "--variants", "fp32",
                   "--threads", "1,2", "--runs", "5", "--name", name, "--out", reports, env=env)
    plain, gpu = accelerators.load(tmp_path)     # sorted by name
    assert (plain["name"], gpu["name"]) == ("plain", "swiftshader")
    assert gpu["images"] == plain["images"] == 18  # every test image of the three classes
    rows = {(r["runtime"], r["threads"]): r for r in gpu["variants"][0]["rows"]}
    assert set(rows) == {("litert-cpu", 1), ("litert-cpu", 2), ("litert-gpu", None), ("litert-gpu-f16", None)}
    assert all(r["available"] and r["median_ms"] > 0 and r["runs"] == 5 for r in rows.values())
    for name in ("litert-gpu", "litert-gpu-f16"):
        on_gpu = rows[(name, None)]
        assert on_gpu["fully_accelerated"] is True
        vs_cpu = on_gpu["vs_cpu"]
        assert vs_cpu["class_agreement"] == 1.0 and vs_cpu["referrals_flipped"] == 0 and vs_cpu["max_abs_prob_diff"] < 1e-4
    off = {(r["runtime"], r["threads"]): r for r in plain["variants"][0]["rows"]}
    for name in ("litert-gpu", "litert-gpu-f16"):
        assert off[(name, None)]["available"] is False and off[(name, None)]["reason"] == NO_ADAPTER
    assert off[("litert-cpu", 1)]["vs_cpu"]["max_abs_logit_diff"] == 0   # the reference itself
    assert off[("litert-cpu", 2)]["available"]
    assert f"| fp32 | litert-gpu | – | not available: {NO_ADAPTER} |" in accelerators.markdown(plain)


def test_the_device_asks_the_gpu_for_float32_arithmetic(device_run, monkeypatch):
    """LiteRT lets a GPU compute in float16 unless told otherwise; a real GPU then moves the
    probabilities (SwiftShader computes in float32 either way, so the request itself is checked)."""
    from ai_edge_litert import compiled_model

    from edge_app.runtime import open_backend

    asked = []
    real = compiled_model.Options

    def options(**kwargs):
        asked.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(compiled_model, "Options", options)
    open_backend((device_run / "tflite" / "fp32.tflite").read_bytes(), accelerator="gpu")   # GPU, else CPU
    gpu = [a for a in asked if a.get("gpu_options") is not None]
    assert gpu and all(a["gpu_options"].enforce_f32 is True for a in gpu)
    assert all(a.get("gpu_options") is None for a in asked if a not in gpu)   # the CPU fallback asks no GPU options
