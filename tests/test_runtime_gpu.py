"""The GPU backend for real (LiteRT's WebGPU accelerator on SwiftShader, a Vulkan GPU in software)
and every way it falls back. Each case runs the CLI in a fresh process: the Vulkan driver is
chosen from the environment when LiteRT first creates its GPU environment, once per process."""
import json

import pytest

from conftest import run_module

SWIFTSHADER = {"VK_ICD_FILENAMES": "/usr/lib/chromium/vk_swiftshader_icd.json", "XDG_RUNTIME_DIR": "/tmp"}
NO_GPU = {**SWIFTSHADER, "VK_ICD_FILENAMES": "/nonexistent/vk_icd.json"}


def _json(*args, env):
    return json.loads(run_module("edge_app", *args, env=env).stdout)


def _images(tiny_dataset):
    return [sorted((tiny_dataset / "test" / c).iterdir())[0] for c in ("normal", "pneumonia", "covid")]


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_gpu_backend_runs_every_op_and_matches_cpu(tiny_run, tiny_dataset, variant):
    model = tiny_run / "tflite" / f"{variant}.tflite"
    info = _json("info", "--model", model, "--accelerator", "gpu", env=SWIFTSHADER)
    assert info["backend"] == "litert-compiled-gpu", info["backends_tried"]
    assert info["gpu_fully_accelerated"] is True
    images = _images(tiny_dataset)
    gpu = _json("predict", *images, "--model", model, "--accelerator", "gpu", "--json", env=SWIFTSHADER)
    cpu = _json("predict", *images, "--model", model, "--accelerator", "cpu", "--json", env=SWIFTSHADER)
    for g, c in zip(gpu["results"], cpu["results"]):
        assert (g["backend"], c["backend"]) == ("litert-compiled-gpu", "litert-compiled-cpu")
        assert g["label"] == c["label"] and g["decision"] == c["decision"]
        assert g["probabilities"] == pytest.approx(c["probabilities"], abs=1e-5)


def test_unavailable_gpu_falls_back_to_cpu_and_says_why(tiny_run):
    info = _json("info", "--model", tiny_run / "tflite" / "fp32.tflite", "--accelerator", "gpu", env=NO_GPU)
    assert info["backend"] == "litert-compiled-cpu" and info["gpu_fully_accelerated"] is None
    (tried,) = info["backends_tried"]
    assert tried["backend"] == "litert-compiled-gpu"
    assert "No adapters found" in tried["error"], tried["error"]  # LiteRT's own words, not a bare source line


def test_bad_gpu_delegate_path_falls_back_cleanly(tiny_run, tiny_dataset):
    model = tiny_run / "tflite" / "int8.tflite"
    missing = "/nonexistent/libtensorflowlite_gpu_delegate.so"
    info = _json("info", "--model", model, "--gpu-delegate", missing, env=NO_GPU)
    tried = {t["backend"]: t["error"] for t in info["backends_tried"]}
    assert missing in tried["litert-interpreter+gpu-delegate"]
    assert info["backend"] == "litert-interpreter"  # int8 I/O: CompiledModel refuses it, XNNPACK runs it
    result = _json("predict", _images(tiny_dataset)[1], "--model", model, "--gpu-delegate", missing,
                   "--json", env=NO_GPU)
    assert result["results"][0]["backend"] == "litert-interpreter"
