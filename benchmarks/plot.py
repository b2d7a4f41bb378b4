"""The Pareto plot: test macro-F1 against whole-pipeline latency, one labelled point per variant,
marker area proportional to the model file, the non-dominated variants joined by a line."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.gates import latency  # noqa: E402


def points(results: dict) -> list[tuple[str, float, float, int]]:
    """(variant, pipeline ms, macro-F1, bytes) at the ratio gates' thread count."""
    threads = results["ratios"]["threads"]
    ref = results["settings"]["reference_runtime"]
    out = []
    for name, v in results["variants"].items():
        ms = latency(v, "pipeline", threads, ref if v["kind"] == "tflite" else "keras")
        f1 = (v["metrics"] or {}).get("macro_f1")
        if ms is not None and f1 is not None:
            out.append((name, ms, f1, v["bytes"]))
    return out


def front(pts):
    """The variants no other variant beats on both latency and macro-F1."""
    return sorted((p for p in pts if not any(q[1] <= p[1] and q[2] >= p[2] and q[1:3] != p[1:3] for q in pts)),
                  key=lambda p: p[1])


def pareto(results: dict, path: Path) -> Path:
    pts = points(results)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    biggest = max((p[3] for p in pts), default=1)
    for name, ms, f1, size in pts:
        keras = results["variants"][name]["kind"] == "keras"
        ax.scatter(ms, f1, s=60 + 1400 * size / biggest, alpha=0.55, edgecolors="black",
                   facecolors="none" if keras else None, marker="s" if keras else "o")
        ax.annotate(f"{name} ({size / 2**20:.1f} MiB)", (ms, f1), textcoords="offset points", xytext=(8, 6), fontsize=9)
    if len(pts) > 1:
        f = front(pts)
        ax.plot([p[1] for p in f], [p[2] for p in f], "--x", color="grey", lw=1, ms=9,
                label="Pareto front: " + ", ".join(p[0] for p in f))
        ax.legend(loc="lower right")
    ref = results["settings"]["reference_runtime"]
    ax.set_xlabel(f"whole-pipeline latency, median ms ({ref}, {results['ratios']['threads']} threads; keras: TF)")
    ax.set_ylabel("test macro-F1")
    ax.set_title(f"{results['run']}: accuracy vs latency (marker area = model size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
