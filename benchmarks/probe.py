"""One model in a fresh process: load time and peak resident memory, so variants don't pollute
each other (peak memory only grows). No TensorFlow is imported here.

    python -m benchmarks.probe MODEL --runtime litert-cpu --threads 2 --image IMG [--predictions 10]

Prints one JSON object: load_ms (file read, card check, runtime creation, warm-up),
rss_before_load_mib (interpreter and imports), peak_rss_mib (after loading and screening the image).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process image, in MiB.

    Linux's VmHWM, not ru_maxrss: a child spawned with vfork (as subprocess does) inherits the
    parent's high-water mark into ru_maxrss at exec, so it would report the benchmark session's
    memory instead of its own. ru_maxrss (KiB on Linux) only where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model, image, *, runtime: str, threads: int, predictions: int = 10) -> dict:
    """This probe in a fresh process (this interpreter): its JSON line as a dict."""
    probe = subprocess.run([sys.executable, "-m", "benchmarks.probe", str(model), "--runtime", runtime,
                            "--threads", str(threads), "--image", str(image), "--predictions", str(predictions)],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        raise RuntimeError(f"benchmarks.probe exited {probe.returncode}: {probe.stderr[-3000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--runtime", default="litert-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", required=True)
    p.add_argument("--predictions", type=int, default=10)
    args = p.parse_args(argv)

    from benchmarks.runtimes import RUNTIMES
    from edge_app.classifier import Classifier

    runtime = RUNTIMES[args.runtime]
    before = peak_rss_mib()
    t0 = time.perf_counter()
    classifier = Classifier(args.model, runtime=lambda data: runtime.make(data, args.threads))
    load_ms = 1000.0 * (time.perf_counter() - t0)
    for _ in range(args.predictions):
        classifier.predict(args.image)
    print(json.dumps({"load_ms": load_ms, "rss_before_load_mib": before, "peak_rss_mib": peak_rss_mib(),
                      "runtime": args.runtime, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
