"""TFLite runtimes for the device, tried in order until one loads the model.

1. LiteRT `CompiledModel` on the GPU accelerator (CPU fallback for unsupported ops), when
   accelerator="gpu" or "auto"; `is_fully_accelerated()` tells whether every op ran on the GPU.
2. LiteRT `CompiledModel` on the CPU (accelerator="cpu" or fallback).
3. LiteRT `Interpreter` (XNNPACK, configurable threads), optionally with a GPU delegate
   library given by path (e.g. a self-built libtensorflowlite_gpu_delegate.so on a Pi);
   a delegate given by path is tried first, as it is what the user asked for.
4. `tflite_runtime.interpreter.Interpreter` where installed and working (numpy < 2).
5. `tensorflow.lite.Interpreter`, imported lazily, only as the last resort.

Every backend takes and returns float32 arrays: quantised models are (de)quantised here, so
callers never see the model's integer types.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import threading

import numpy as np

from edge_app.errors import ModelError
from edge_app.tflite_metadata import float_io

ACCELERATORS = ("auto", "gpu", "cpu")
# The GPU computes in float32. LiteRT's default lets it use float16: on an NVIDIA H200 that moved
# P(abnormal) by up to 0.028 and flipped 1 referral of 481 test images against the CPU, where
# float32 moved it by 6e-6 and flipped none, for 0-6 % more GPU time (docs/RESULTS.md, 2026-12-04).
GPU_ENFORCE_F32 = True
FLOAT_IO_ONLY = "CompiledModel backend runs float-I/O models only"  # int8-I/O models use the Interpreter
# "1": a machine without a GPU adapter fails the GPU checks instead of skipping them (CI, where
# SwiftShader is installed: losing the Vulkan driver must fail loudly, not skip quietly).
REQUIRE_GPU_ENV = "CXR_EDGE_REQUIRE_GPU"
# What Dawn/LiteRT log when Vulkan has no device to offer, or no Vulkan loader exists at all.
NO_ADAPTER_SIGNS = ("No adapters found", "Couldn't load Vulkan")


class NoGpuAdapter(ModelError):
    """The machine has no GPU adapter (no Vulkan device): the GPU path cannot run here, which
    says nothing about the model or the accelerator."""

    def __init__(self, sign: str, detail: str):
        super().__init__("no_gpu_adapter", f"no GPU adapter on this machine (LiteRT: {sign})")
        self.detail = detail  # the exception and LiteRT's error lines


def gpu_required() -> bool:
    return os.environ.get(REQUIRE_GPU_ENV, "") == "1"


class InterpreterBackend:
    """Any Interpreter with the tf.lite API (LiteRT, tflite_runtime, tf.lite), run through its
    default signature so outputs keep their names (edge_app.graph_names)."""

    def __init__(self, name: str, interpreter):
        self.name = name
        self.fully_accelerated = None  # not applicable: the CPU runs everything
        self._runner = interpreter.get_signature_runner()
        (self._input_name, self._input), = self._runner.get_input_details().items()
        self._outputs = self._runner.get_output_details()
        self._lock = threading.Lock()  # an Interpreter is not re-entrant

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._input["shape"])

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in d["shape"]) for name, d in self._outputs.items()}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = quantize(np.asarray(batch, dtype=np.float32), self._input)
        with self._lock, _run_failure():
            raw = self._runner(**{self._input_name: x})
        return {n: dequantize(v, self._outputs[n]) for n, v in raw.items()}


class CompiledModelBackend:
    """LiteRT's CompiledModel API, the one that drives the GPU accelerator."""

    def __init__(self, model_bytes: bytes, accelerator: str, num_threads: int, *,
                 enforce_f32: bool = GPU_ENFORCE_F32):
        """`enforce_f32`: the GPU computes in float32 (False: LiteRT's default, float16 allowed)."""
        from ai_edge_litert import compiled_model as cm

        accel = cm.HardwareAccelerator.CPU
        if accelerator == "gpu":
            accel = cm.HardwareAccelerator.GPU | cm.HardwareAccelerator.CPU
        options = cm.Options(hardware_accelerators=accel,
                             cpu_options=cm.CpuOptions(num_threads=num_threads),
                             gpu_options=cm.GpuOptions(enforce_f32=enforce_f32) if accelerator == "gpu" else None)
        self._model = cm.CompiledModel.from_buffer(model_bytes, options=options)
        self.name = f"litert-compiled-{accelerator}"
        self.fully_accelerated = bool(self._model.is_fully_accelerated()) if accelerator == "gpu" else None
        signature = self._model.get_signature_list()
        self._key = next(iter(signature))
        self._input_details = self._model.get_input_tensor_details(self._key)
        self._output_details = self._model.get_output_tensor_details(self._key)
        for d in list(self._input_details.values()) + list(self._output_details.values()):
            if np.dtype(d["dtype"]) != np.float32:
                raise ModelError("model_invalid", FLOAT_IO_ONLY)
        self._inputs = self._model.create_input_buffers(0)
        self._outputs = self._model.create_output_buffers(0)
        self._output_names = list(signature[self._key]["outputs"])
        self.output_shapes = {n: tuple(int(d) for d in self._output_details[n]["shape"])
                              for n in self._output_names}
        self._lock = threading.Lock()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in next(iter(self._input_details.values()))["shape"])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        shapes = self.output_shapes
        with self._lock, _run_failure():
            self._inputs[0].write(x)
            self._model.run_by_index(0, self._inputs, self._outputs)
            return {n: buf.read(int(np.prod(shapes[n])), np.float32).reshape(shapes[n])
                    for n, buf in zip(self._output_names, self._outputs)}


@contextlib.contextmanager
def _run_failure():
    """A runtime's failure to run the model ("failed to prepare", a bad tensor) as a ModelError."""
    try:
        yield
    except Exception as exc:
        raise ModelError("inference_failed", f"the model failed to run ({type(exc).__name__}: "
                         f"{str(exc).strip()[:300]})") from exc


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float values onto an integer tensor's grid (its interpreter `detail`); float tensors unchanged."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """An integer tensor's values as floats (its interpreter `detail`); a float tensor copied."""
    if np.dtype(detail["dtype"]) == np.float32:
        return y.copy()
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _interpreter_class(module: str):
    """The Interpreter class of a runtime module, or None where it is missing or broken."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, or tflite_runtime's numpy-2 crash (_ARRAY_API not found)
        return None
    return getattr(mod, "Interpreter", None) or getattr(getattr(mod, "lite", None), "Interpreter", None)


def open_backend(model_bytes: bytes, *, accelerator: str = "auto", num_threads: int = 2,
                 gpu_delegate: str | None = None):
    """The first backend that loads the model, in the documented order.

    Returns (backend, attempts) where attempts lists (backend name, why it was not used).
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a whole number >= 1, got {num_threads!r}")
    attempts: list[tuple[str, str]] = []

    def attempt(name, make):
        native: list[str] = []
        try:
            with _native_log(native):
                return make()
        except Exception as exc:  # every runtime failure here means "try the next one" ...
            attempts.append((name, _reason(exc, native)))
            if name in refusal_means_invalid and not isinstance(exc, ImportError):
                # ... except a plain CPU Interpreter's: the others read the same flatbuffer
                detail = "; ".join(f"{n}: {why}" for n, why in attempts)
                raise ModelError("model_invalid", f"the model cannot be loaded; the file may be damaged "
                                 f"({detail})") from exc
            return None

    interpreters = (("litert-interpreter", "ai_edge_litert.interpreter"),
                    ("tflite-runtime", "tflite_runtime.interpreter"))
    candidates = []
    if gpu_delegate:
        candidates += [(f"{name}+gpu-delegate", _interpreter_factory(module, model_bytes, num_threads, gpu_delegate))
                       for name, module in interpreters]
    compiled = ["gpu", "cpu"] if accelerator in ("auto", "gpu") else ["cpu"]
    if float_io(model_bytes) is False:   # known from the file: not worth importing CompiledModel (seconds)
        attempts += [(f"litert-compiled-{a}", f"ModelError: {FLOAT_IO_ONLY}") for a in compiled]
        compiled = []
    candidates += [(f"litert-compiled-{a}",
                    (lambda: open_gpu(model_bytes, num_threads)) if a == "gpu"
                    else (lambda: CompiledModelBackend(model_bytes, "cpu", num_threads)))
                   for a in compiled]
    cpu_interpreters = interpreters + (("tf.lite", "tensorflow"),)
    refusal_means_invalid = {name for name, _ in cpu_interpreters}
    candidates += [(name, _interpreter_factory(module, model_bytes, num_threads, None))
                   for name, module in cpu_interpreters]
    for name, make in candidates:
        backend = attempt(name, make)
        if backend is not None:
            backend.name = name
            return backend, attempts
    detail = "; ".join(f"{n}: {why}" for n, why in attempts)
    raise ModelError("no_runtime", f"no TFLite runtime could load the model ({detail})")


def open_gpu(model_bytes: bytes, num_threads: int, *, enforce_f32: bool = GPU_ENFORCE_F32) -> CompiledModelBackend:
    """CompiledModel on the GPU accelerator. NoGpuAdapter where the machine has none; any other
    failure is raised with LiteRT's own error lines in its message."""
    native: list[str] = []
    try:
        with _native_log(native):
            return CompiledModelBackend(model_bytes, "gpu", num_threads, enforce_f32=enforce_f32)
    except ModelError:
        raise
    except Exception as exc:
        reason = _reason(exc, native)
        for sign in NO_ADAPTER_SIGNS:
            if sign in reason:
                raise NoGpuAdapter(sign, reason) from exc
        raise RuntimeError(reason) from exc


@contextlib.contextmanager
def _native_log(lines: list[str]):
    """Collects what native code prints meanwhile, on file descriptors 1 and 2, into `lines`
    and re-emits it on stderr.

    LiteRT explains its failures there ("No adapters found", a missing libvulkan) while its
    Python exceptions only name a source line, so `backends_tried` can say why; and its GPU
    loader prints on stdout, which must stay clean for `predict --json`.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as log:
        for fd in saved:
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            log.seek(0)
            text = log.read()
            os.write(2, text)
            lines.extend(text.decode(errors="replace").splitlines())


def _reason(exc: Exception, native: list[str]) -> str:
    """The exception, plus the native log's error lines (the last three) when it logged any."""
    errors = [line.strip() for line in native  # error lines, and Dawn's "Couldn't load Vulkan"
              if line.startswith(("ERROR", "E0")) or "Couldn't load" in line]
    reason = f"{type(exc).__name__}: {exc}"
    if "[native log:" in reason:  # open_gpu's, already explained
        return reason
    return reason + (f" [native log: {' | '.join(errors[-3:])}]" if errors else "")


def _interpreter_factory(module: str, model_bytes: bytes, num_threads: int,
                         gpu_delegate: str | None):
    def make():
        cls = _interpreter_class(module)
        if cls is None:
            raise ImportError(f"{module} is not installed or does not import")
        delegates = None
        if gpu_delegate:
            delegates = [importlib.import_module(module).load_delegate(gpu_delegate)]
        interpreter = cls(model_content=model_bytes, num_threads=num_threads,
                          experimental_delegates=delegates)
        return InterpreterBackend(module, interpreter)
    return make
