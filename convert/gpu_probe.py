"""Run TFLite models on LiteRT's GPU accelerator and on its CPU path, and compare.

    python -m convert.gpu_probe INPUTS.npy MODEL.tflite... > result.json

A process of its own that never imports TensorFlow (TensorFlow and the GPU accelerator's
Vulkan driver do not share a process well, and the device never has TensorFlow either): it
uses the device's own backends, edge_app.runtime. Per model it prints whether every op ran on
the GPU (`is_fully_accelerated()`) and the largest |GPU - CPU| difference of each output.
Without a real GPU, point Vulkan at SwiftShader (convert.gpu does that).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edge_app.errors import ModelError
from edge_app.runtime import CompiledModelBackend, NoGpuAdapter, open_gpu


def probe(model_path: Path, inputs: np.ndarray) -> dict:
    data = model_path.read_bytes()
    try:
        gpu = open_gpu(data, num_threads=2)
    except NoGpuAdapter as exc:  # nothing to run on: not checked, which is not a failure
        return {"applicable": True, "loaded": False, "no_adapter": True, "why": exc.message,
                "error": exc.detail}
    except ModelError as exc:  # integer input/output: the GPU accelerator takes float I/O only
        return {"applicable": False, "why": exc.message}
    except Exception as exc:
        return {"applicable": True, "loaded": False, "error": f"{type(exc).__name__}: {exc}"}
    cpu = CompiledModelBackend(data, "cpu", num_threads=2)
    diffs, scales = {}, {}
    for x in inputs:
        g, c = gpu.run(x[None]), cpu.run(x[None])
        for name in c:
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(g[name] - c[name]).max()))
            scales[name] = max(scales.get(name, 0.0), float(np.abs(c[name]).max()))
    return {"applicable": True, "loaded": True, "fully_accelerated": gpu.fully_accelerated,
            "images": int(len(inputs)), "max_abs_diff": diffs, "max_abs_cpu": scales}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inputs = np.load(argv[0])
    results = {path: probe(Path(path), inputs) for path in argv[1:]}
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
    print(json.dumps({"models": results, "imported_tensorflow": bool(heavy)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
