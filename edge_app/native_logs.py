"""Native libraries' log floods kept off the terminal, unless asked for (--verbose, or
CXR_EDGE_VERBOSE=1, which `make VERBOSE=1` sets).

LiteRT (accelerator registry, "Failed to load plugin ... IntelOpenvino"), TensorFlow (CUDA,
oneDNN) and absl log from C++ straight to file descriptor 2: TF_CPP_MIN_LOG_LEVEL does not reach
absl's early messages and LiteRT has no switch at all. So the command-line entry points send fd 2
through a small filter process that drops those lines and passes every other byte unchanged
(Python's tracebacks and warnings, progress bars, the project's own messages).
"""
from __future__ import annotations

import os
import re
import select
import signal
import sys

VERBOSE_ENV = "CXR_EDGE_VERBOSE"
VERBOSE_HELP = "show the native libraries' logs (LiteRT, TensorFlow); also CXR_EDGE_VERBOSE=1"

# The start of a line of native logging: LiteRT's "INFO: [file.cc:12] ...", absl/glog's
# "I0000 00:00:00.000 123 file.cc:12]" (fatal "F" lines pass), their continuation lines, the Vulkan
# loader's warnings and LiteRT's error trace.
NATIVE_LINE = re.compile(
    rb"(?:INFO|WARNING|ERROR|VERBOSE): \[[\w./-]+:\d+\]"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\]"
    rb"|\xe2\x94\x94 |WARNING: All log messages before absl::InitializeLog"
    rb"|WARNING: Logging before InitGoogle|Warning: (?:loader_|vkCreateInstance)"
    rb"|=== Source Location Trace|third_party/|\s+at \S+ \(third_party/"
    rb"|INFO: Created TensorFlow Lite|fully_quantize: \d")


def verbose(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV) == "1"


def keep(line: bytes) -> bool:
    """Whether a line of stderr is shown: every line but native logging."""
    return NATIVE_LINE.match(line.lstrip(b"\r")) is None


def quiet(verbose_flag: bool = False) -> None:
    """Filter this process's fd 2 (and its children's) from now on, unless verbose. Call it first
    thing in an entry point, before TensorFlow or LiteRT load."""
    if verbose(verbose_flag) or os.environ.get("_CXR_EDGE_QUIET") == "1":
        return
    if not hasattr(os, "fork") or hasattr(sys, "getandroidapilevel"):  # no fork in an Android app
        return
    os.environ["_CXR_EDGE_QUIET"] = "1"  # child processes inherit the filtered fd 2 already
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    read, write = os.pipe()
    if os.fork() == 0:  # the filter: ends when every writer of the pipe has exited
        os.close(write)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the command, which closes the pipe
        _filter(read)
        os._exit(0)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)


def _filter(read: int) -> None:
    """Copies `read` to fd 2, line by line (\\n or \\r ends one), dropping native log lines; an
    unfinished line is judged and passed on after 0.2 s without more output (a progress bar)."""
    pending = b""
    poll = select.poll()
    poll.register(read, select.POLLIN)
    while True:
        if pending and not poll.poll(200):
            _write(pending)
            pending = b""
            continue
        chunk = os.read(read, 65536)
        if not chunk:
            _write(pending)
            return
        *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
        _write(b"".join(lines))


def _write(text: bytes) -> None:
    shown = b"".join(line for line in re.split(rb"(?<=[\r\n])", text) if line and keep(line))
    while shown:
        shown = shown[os.write(2, shown):]
