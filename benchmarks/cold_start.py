"""Cold start, in fresh processes: `python -m edge_app predict IMAGE --model M` from launch to its
printed result, and the app from launch to its first result (`--screen-and-exit IMAGE`, under an
X server that is already running, as on a device: Xvfb here). Median of a few runs after one
that warms the OS file cache and compiles the bytecode; `-X importtime` of one more run says
where the import time goes.

Bytecode: an installed device has its modules compiled (pip compiles them at install, a checkout
writes __pycache__ on its first run). Where PYTHONDONTWRITEBYTECODE is set (some sandboxes and CI
do), every launch would compile edge_app again (~70 ms of a ~0.6 s start here), so the measured
processes run without it, their bytecode cached in a temporary PYTHONPYCACHEPREFIX (nothing is
written into the checkout); the first, unmeasured run fills it.

    python -m benchmarks.cold_start --model M.tflite --image IMG [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = 5
TIMEOUT_S = 120
APP_MARK = "first result:"   # what the app prints once its first result was drawn


def cli_command(model, image) -> list[str]:
    return [sys.executable, "-m", "edge_app", "predict", str(image), "--model", str(model)]


def app_command(model, image, home: Path) -> list[str]:
    return [sys.executable, "-m", "edge_app", "app", "--model", str(model), "--accelerator", "cpu",
            "--screen-and-exit", str(image), "--config", str(home / "app.json"),
            "--history", str(home / "history.sqlite3"), "--exports", str(home / "exports")]


def _timed_cli(cmd, env) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-2000:]}")
    return elapsed


def _timed_app(cmd, env) -> float:
    """Launch to the app's APP_MARK line; then its exit is awaited (not timed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        elapsed = None
        for line in proc.stdout:
            if line.startswith(APP_MARK):
                elapsed = time.perf_counter() - t0
                break
        proc.stdout.read()
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if elapsed is None or proc.returncode != 0:
        raise RuntimeError(f"the app gave no result (exit {proc.returncode}): {err[-2000:]}")
    return elapsed


def imports(cmd, env) -> dict:
    """Total and slowest top-level imports (ms, cumulative) of one run under -X importtime."""
    result = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    top = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name.startswith("  "):   # top level: one space
                top.append({"module": name.strip(), "ms": int(cumulative) / 1000.0})
    return {"imports_ms": sum(m["ms"] for m in top),
            "slowest_imports": sorted(top, key=lambda m: -m["ms"])[:6]}


def _summary(cmd, samples, env) -> dict:
    return {"available": True, "command": [str(c) for c in cmd], "median_s": statistics.median(samples),
            "samples_s": samples, **imports(cmd, env)}


BYTECODE = "compiled by the first run, cached (PYTHONPYCACHEPREFIX), as an installed package has it"


def _env(bytecode_cache, **extra) -> dict:
    """The measured processes' environment: this checkout first on the path, bytecode cached."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(bytecode_cache), **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure_cli(model, image, runs: int = RUNS) -> dict:
    cmd = cli_command(model, image)
    with tempfile.TemporaryDirectory(prefix="cxr-pyc-") as cache:
        env = _env(cache)
        samples = [_timed_cli(cmd, env) for _ in range(runs + 1)][1:]
        return {**_summary(cmd, samples, env), "bytecode": BYTECODE}


class XServer:
    """An Xvfb display for the app, started once (a device's X server is up before the app)."""

    def __init__(self):
        read, write = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24",
                                      "-nolisten", "tcp"], pass_fds=(write,), stderr=subprocess.DEVNULL)
        os.close(write)
        with os.fdopen(read) as f:
            number = f.readline().strip()
        if not number:
            self.close()
            raise RuntimeError("Xvfb did not start")
        self.display = f":{number}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure_app(model, image, runs: int = RUNS) -> dict:
    """The app's launch to first result; unavailable (with the reason) without an X server."""
    if not os.environ.get("DISPLAY") and not shutil.which("Xvfb"):
        return {"available": False, "reason": "no X server: DISPLAY is unset and Xvfb is not installed"}
    server = None if os.environ.get("DISPLAY") else XServer()
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-app-") as home:
            home = Path(home)
            env = _env(home / "pyc", KIVY_HOME=str(home / "kivy"), KIVY_NO_ARGS="1",
                       **({"DISPLAY": server.display} if server else {}))
            cmd = app_command(model, image, home)
            samples = [_timed_app(cmd, env) for _ in range(runs + 1)][1:]
            return {**_summary(cmd, samples, env), "bytecode": BYTECODE,
                    "x_server": "Xvfb" if server else os.environ["DISPLAY"]}
    finally:
        if server:
            server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--runs", type=int, default=RUNS)
    args = p.parse_args(argv)
    print(json.dumps({"cli": measure_cli(args.model, args.image, args.runs),
                      "app": measure_app(args.model, args.image, args.runs)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
