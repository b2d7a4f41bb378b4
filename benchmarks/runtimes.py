"""The runtimes a benchmark times, each pinned (no fallback), and whether this machine has them.

litert-cpu           LiteRT Interpreter with XNNPACK: every variant, 1/2/4 threads. The ratio
                     gates (pipeline overhead, int8 speed-up) read this one, the same runtime
                     for every variant.
litert-compiled-cpu  LiteRT CompiledModel on the CPU: what the device picks first for float models.
litert-gpu           LiteRT CompiledModel on the GPU accelerator. Here that is SwiftShader, a
                     Vulkan GPU emulated on the CPU: labelled as such, its timings say that the
                     GPU path runs, not how fast a real GPU is.
tflite-runtime       the old `tflite_runtime` package, where it imports (not under numpy 2).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_app.errors import ModelError
from edge_app.runtime import GPU_ENFORCE_F32, CompiledModelBackend, InterpreterBackend, NoGpuAdapter, open_gpu


def _interpreter(module: str, name: str):
    def make(data: bytes, threads: int):
        cls = importlib.import_module(module).Interpreter
        return InterpreterBackend(name, cls(model_content=data, num_threads=threads))
    return make


def _compiled(accelerator: str, enforce_f32: bool = GPU_ENFORCE_F32):
    def make(data: bytes, threads: int):
        backend = (open_gpu(data, threads, enforce_f32=enforce_f32) if accelerator == "gpu"
                   else CompiledModelBackend(data, accelerator, threads))
        if accelerator == "gpu" and not backend.fully_accelerated:
            raise RuntimeError("the GPU accelerator did not take every op (part would run on the CPU)")
        return backend
    return make


@dataclass(frozen=True)
class Runtime:
    name: str
    make: Callable            # (model bytes, threads) -> an edge_app.runtime backend
    threaded: bool            # timed at each thread count, or once
    module: str               # what must import for it to exist

    @property
    def label(self) -> str:
        if self.name == "litert-gpu" and "swiftshader" in os.environ.get("VK_ICD_FILENAMES", "").lower():
            return "LiteRT GPU (CompiledModel) on SwiftShader: a software GPU emulated on the CPU"
        return LABELS[self.name]


LABELS = {
    "litert-cpu": "LiteRT Interpreter, XNNPACK, CPU",
    "litert-compiled-cpu": "LiteRT CompiledModel, CPU",
    "litert-gpu": "LiteRT GPU (CompiledModel, GPU accelerator, float32 arithmetic)",
    "litert-gpu-f16": "LiteRT GPU (CompiledModel, GPU accelerator), float16 arithmetic allowed (LiteRT's default)",
    "tflite-runtime": "tflite_runtime Interpreter, CPU",
}

# LiteRT's default GPU arithmetic (float16 allowed), which the device does not use (edge_app.runtime.
# GPU_ENFORCE_F32); not timed by `make benchmark` (SwiftShader computes in float32 either way):
# benchmarks.accelerators compares the two on a real GPU.
GPU_FLOAT16 = Runtime("litert-gpu-f16", _compiled("gpu", enforce_f32=False), False, "ai_edge_litert.compiled_model")

RUNTIMES = {r.name: r for r in (
    Runtime("litert-cpu", _interpreter("ai_edge_litert.interpreter", "litert-cpu"), True,
            "ai_edge_litert.interpreter"),
    Runtime("litert-compiled-cpu", _compiled("cpu"), True, "ai_edge_litert.compiled_model"),
    Runtime("litert-gpu", _compiled("gpu"), False, "ai_edge_litert.compiled_model"),
    Runtime("tflite-runtime", _interpreter("tflite_runtime.interpreter", "tflite-runtime"), True,
            "tflite_runtime.interpreter"),
)}
REFERENCE = "litert-cpu"


def import_error(module: str) -> str | None:
    """Why `module` does not import, tried in a fresh process (a broken build may abort the
    interpreter, as tflite_runtime does under numpy 2); None when it imports."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"import {module} exited {result.returncode}"


def no_gpu_adapter(model: Path) -> str | None:
    """Why LiteRT's GPU accelerator has nothing to run on here, tried with `model`; None where it has
    an adapter (then the model's own failures on it are the benchmarks' to report)."""
    try:
        open_gpu(model.read_bytes(), 1)
    except NoGpuAdapter as exc:
        return exc.message
    except (ModelError, RuntimeError):
        pass
    return None
