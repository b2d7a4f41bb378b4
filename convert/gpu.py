"""GPU-delegate compatibility, proven twice.

static   TFLite's analyzer with gpu_compatibility=True: which ops the GPU delegate would refuse.
dynamic  the model really run on LiteRT's GPU accelerator (convert.gpu_probe, in a subprocess
         that never imports TensorFlow), against its CPU path on the same real images. Where
         there is no GPU, Vulkan runs on SwiftShader, the CPU Vulkan driver Debian's chromium
         package ships: a real GPU code path (shaders compiled and run), only slow.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SWIFTSHADER_ICD = "/usr/lib/chromium/vk_swiftshader_icd.json"
COMPATIBLE = "looks compatible with GPU delegate"


def analyze(model_bytes: bytes) -> dict:
    """The analyzer's report and its verdict: compatible, or the ops it flags."""
    import train  # noqa: F401
    import tensorflow as tf

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=model_bytes, gpu_compatibility=True)
    text = out.getvalue()
    flagged = sorted({line.split("GPU COMPATIBILITY WARNING:")[1].strip()
                      for line in text.splitlines() if "GPU COMPATIBILITY WARNING:" in line})
    return {"gpu_compatible": COMPATIBLE in text and not flagged, "warnings": flagged, "report": text}


def probe_environment() -> dict:
    """The environment for the probe: the machine's Vulkan driver, else SwiftShader."""
    env = dict(os.environ)
    if "VK_ICD_FILENAMES" not in env and Path(SWIFTSHADER_ICD).is_file():
        env["VK_ICD_FILENAMES"] = SWIFTSHADER_ICD
    env.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    return env


def probe(model_paths: list[Path], inputs: np.ndarray, *, timeout: float = 1800) -> dict:
    """{"models": convert.gpu_probe's verdict per model path (str), "vulkan_driver": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "inputs.npy"
        np.save(batch, np.asarray(inputs, np.float32))
        done = subprocess.run([sys.executable, "-m", "convert.gpu_probe", str(batch), *map(str, model_paths)],
                              capture_output=True, text=True, env=probe_environment(), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the GPU probe failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["imported_tensorflow"]:
        raise RuntimeError("the GPU probe imported TensorFlow: it must use the device's runtime only")
    return {"models": result["models"], "vulkan_driver": probe_environment().get("VK_ICD_FILENAMES", "system")}
