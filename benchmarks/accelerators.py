"""LiteRT's GPU accelerator against its CPU, on whatever machine this runs on: a run's float
variants, one inference call at a time (batch 1, as the device screens), on real test images.

    python -m benchmarks.accelerators artifacts/RUN --images DIR [--variants fp32,fp16,int8] \
        [--runs 300] [--threads 1,2,4] [--name h200] [--out DIR]

It needs only the device side (ai-edge-litert, numpy, Pillow; no TensorFlow, no pytest), so it runs
where `make benchmark` cannot: a lent machine with a real GPU, a tablet. It writes
accelerators-NAME.json and .md to --out (default RUN/reports); `make benchmark` puts every such file
it finds beside the run into the benchmark report, labelled with the machine it was measured on.
The GPU's outputs are compared with the CPU Interpreter's (its first thread count, 1 by default) on
the same tensors, in the device's float32 arithmetic (`litert-gpu`) and in LiteRT's default, float16
allowed (`litert-gpu-f16`).
A machine with no GPU adapter records "not available" and why, and still times the CPU.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.runtimes import GPU_FLOAT16, RUNTIMES
from edge_app import decision, preprocess
from edge_app.classifier import Classifier
from edge_app.errors import ModelError
from edge_app.graph_names import LOGITS
from edge_app.inputs import collect
from edge_app.runtime import NoGpuAdapter

WARMUP = 10


def machine() -> dict:
    """What the figures were measured on: the CPU, the GPU the driver names, the Vulkan driver."""
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpu = out.stdout.strip() or None
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
            "gpu": gpu, "vulkan_icd": os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")}


def timed(backend, tensors: list[np.ndarray], runs: int) -> tuple[dict, list[np.ndarray]]:
    """Median, p10 and p90 of `runs` calls (after a warm-up), tensors taken in turn; and the logits
    of each tensor."""
    for i in range(WARMUP):
        backend.run(tensors[i % len(tensors)])
    samples = []
    for i in range(runs):
        x = tensors[i % len(tensors)]
        start = time.perf_counter()
        backend.run(x)
        samples.append((time.perf_counter() - start) * 1e3)
    logits = [backend.run(x)[LOGITS][0] for x in tensors]
    q = np.percentile(samples, [10, 90])
    return {"median_ms": statistics.median(samples), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
            "runs": runs}, logits


def compare(logits: list[np.ndarray], reference: list[np.ndarray], card) -> dict:
    """How far one runtime's outputs are from the reference's on the same tensors: logits,
    calibrated probabilities, predicted classes and referrals at the card's threshold."""
    p = np.array([decision.calibrated_probabilities(z, card.temperature) for z in logits])
    q = np.array([decision.calibrated_probabilities(z, card.temperature) for z in reference])
    refer_p, refer_q = (decision.abnormal_probability(x) >= card.abnormal_threshold for x in (p, q))
    return {"max_abs_logit_diff": float(np.max(np.abs(np.array(logits) - np.array(reference)))),
            "max_abs_prob_diff": float(np.max(np.abs(p - q))),
            "class_agreement": float(np.mean(p.argmax(1) == q.argmax(1))),
            "referrals_flipped": int(np.sum(refer_p != refer_q))}


def measure(model: Path, images: list[Path], threads: list[int], runs: int) -> dict:
    classifier = Classifier(model, accelerator="cpu", num_threads=1)
    tensors = [preprocess.preprocess(path, classifier.spec)[None] for path in images]
    data = model.read_bytes()
    rows, reference = [], None
    for runtime, counts in ((RUNTIMES["litert-cpu"], threads), (RUNTIMES["litert-gpu"], [None]), (GPU_FLOAT16, [None])):
        name = runtime.name
        for t in counts:
            row = {"runtime": name, "label": runtime.label, "threads": t}
            try:
                backend = runtime.make(data, t or 1)
            except NoGpuAdapter as exc:
                rows.append({**row, "available": False, "reason": exc.message})
                continue
            except (ModelError, RuntimeError) as exc:
                rows.append({**row, "available": False, "reason": str(exc)[:300]})
                continue
            stats, logits = timed(backend, tensors, runs)
            reference = reference if reference is not None else logits
            rows.append({**row, "available": True, "fully_accelerated": backend.fully_accelerated, **stats,
                         "vs_cpu": compare(logits, reference, classifier.card)})
            print(f"{model.stem:>6} {name:<14} {t or '':>2}: {stats['median_ms']:.3f} ms median", file=sys.stderr)
    return {"variant": model.stem, "bytes": len(data), "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"### {result['name']}: {m['gpu'] or 'no GPU named by a driver'} ({m['cpu_count']} CPUs, "
             f"ai-edge-litert {m['ai_edge_litert']}, {result['created']})", "",
             f"Inference only, batch 1, {result['images']} test images in turn; median of each runtime's "
             "calls after a warm-up. Outputs compared with the first CPU row's on the same tensors.", "",
             "| variant | runtime | threads | fully on GPU | median ms | p10–p90 ms | max abs Δ logit "
             "| max abs Δ P | class agreement | referrals flipped |", "|---" * 10 + "|"]
    for v in result["variants"]:
        for r in v["rows"]:
            if not r["available"]:
                lines.append(f"| {v['variant']} | {r['runtime']} | {r['threads'] or '–'} | not available: "
                             f"{r['reason'][:160]} | | | | | | |")
                continue
            c = r["vs_cpu"]
            full = "–" if r["fully_accelerated"] is None else ("yes" if r["fully_accelerated"] else "no")
            lines.append(f"| {v['variant']} | {r['runtime']} | {r['threads'] or '–'} | {full} "
                         f"| {r['median_ms']:.3f} | {r['p10_ms']:.3f}–{r['p90_ms']:.3f} "
                         f"| {c['max_abs_logit_diff']:.2g} | {c['max_abs_prob_diff']:.2g} | {c['class_agreement']:.3f} "
                         f"| {c['referrals_flipped']} |")
    return "\n".join(lines) + "\n"


def load(run: Path) -> list[dict]:
    """Every accelerators-*.json beside a run (reports/), for the benchmark report."""
    return [json.loads(p.read_text()) for p in sorted((run / "reports").glob("accelerators-*.json"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accelerators", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a converted run folder (its tflite/ variants)")
    parser.add_argument("--images", nargs="+", required=True, help="test image files or folders")
    parser.add_argument("--variants", default="fp32,fp16", help="comma-separated (default: fp32,fp16)")
    parser.add_argument("--threads", default="1,2,4", help="CPU thread counts (default: 1,2,4)")
    parser.add_argument("--runs", type=int, default=300, help="timed calls per runtime (default: 300)")
    parser.add_argument("--max-images", type=int, default=32, help="test images used, spread over the folders (default: 32)")
    parser.add_argument("--name", default=platform.node(), help="the machine's name in the file name")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN/reports)")
    args = parser.parse_args(argv)
    images, _ = collect(args.images)
    images = [Path(p) for p in images[::max(1, len(images) // args.max_images)][:args.max_images]]  # every class
    threads = [int(t) for t in args.threads.split(",")]
    result = {"name": args.name, "run": args.run.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine(), "images": len(images),
              "variants": [measure(args.run / "tflite" / f"{v}.tflite", images, threads, args.runs)
                           for v in args.variants.split(",")]}
    out = args.out or args.run / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"accelerators-{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"accelerators-{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
