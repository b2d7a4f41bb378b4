"""Native libraries' log lines are dropped from stderr by default and shown with CXR_EDGE_VERBOSE=1;
every other byte passes, in order, unfinished progress lines included."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.device

NATIVE = [  # as LiteRT, absl/TensorFlow, the Vulkan loader and Dawn print them
    "INFO: [gpu_registry.cc:130] Attempting to load GPU accelerator(libLiteRtGpuAccelerator.so).",
    "WARNING: [compiler_plugin.cc:312] Failed to load plugin at: /x/libLiteRtCompilerPlugin_IntelOpenvino.so",
    "\u2514 Could not load shared library /x/libLiteRtCompilerPlugin_IntelOpenvino.so",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796221514.800425   16914 cudart_stub.cc:31] Could not find cuda drivers on your machine",
    "E0000 00:00:1796221177.628030   10423 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    "Warning: vkCreateInstance: Found no drivers!",
    "    at CheckVkSuccessImpl (third_party/dawn/src/dawn/native/vulkan/VulkanError.cpp:88)",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: INT8, output_inference_type: INT8",
]
OURS = ["error: the model could not be used", "Traceback (most recent call last):", "  File \"x.py\", line 1"]
SCRIPT = """
import os, sys, time
from edge_app import native_logs
native_logs.quiet()
lines = sys.argv[1:]
for line in lines:
    os.write(2, (line + "\\n").encode())
os.write(2, b"\\r progress 50%")   # a progress bar: no newline, shown all the same
time.sleep(0.5)
os.write(2, b"\\r progress 100%\\n")
"""


def _stderr(env: dict) -> str:
    lines = NATIVE[:2] + OURS[:1] + NATIVE[2:5] + OURS[1:] + NATIVE[5:]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *lines], capture_output=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr
    return done.stderr.decode()  # bytes: universal newlines would turn the \r into \n


def test_native_logs_are_dropped_and_everything_else_passes_in_order():
    assert _stderr({"CXR_EDGE_VERBOSE": ""}) == "\n".join(OURS) + "\n\r progress 50%\r progress 100%\n"


def test_verbose_shows_the_native_logs():
    assert all(line in _stderr({"CXR_EDGE_VERBOSE": "1"}) for line in NATIVE)
