"""The Pareto plot: test macro-F1 against whole-pipeline latency, one labelled point per variant,
marker area proportional to the model file, the non-dominated variants joined by a line.

    python -m benchmarks.plot RESULTS.json... --out runs.png     several runs in one plot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

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


def pareto(results: dict | list[dict], path: Path) -> Path:
    """One run's variants, or (a list) several runs' variants labelled run/variant, in one plot."""
    runs = results if isinstance(results, list) else [results]
    splits = {(r["test_split"]["root"], r["test_split"]["n"]) for r in runs}
    if len(splits) > 1:
        raise ValueError(f"these runs were tested on different test splits {sorted(splits)}: "
                         "their macro-F1 cannot be compared in one plot")
    multi = len(runs) > 1
    labelled = [(name, r["variants"][name]["kind"], ms, f1, size, i)
                for i, r in enumerate(runs) for name, ms, f1, size in points(r)]
    fig, ax = plt.subplots(figsize=(9, 6) if multi else (7, 5), dpi=120)
    biggest = max((p[4] for p in labelled), default=1)
    for label, kind, ms, f1, size, run in labelled:
        keras = kind == "keras"
        color = f"C{run}" if multi else None  # one colour per run, or per variant
        ax.scatter(ms, f1, s=60 + 1400 * size / biggest, alpha=0.55, edgecolors=(color or "black") if keras else "black",
                   c=None if keras else color, facecolors="none" if keras else None, marker="s" if keras else "o")
        ax.annotate(f"{label} ({size / 2**20:.1f} MiB)", (ms, f1), textcoords="offset points",
                    xytext=(8, -12 if keras else 6), fontsize=8 if multi else 9)
    for i, r in enumerate(runs if multi else []):  # the colour of each run
        ax.scatter([], [], color=f"C{i}", alpha=0.55, edgecolors="black", label=r["run"])
    pts = [(f"{runs[i]['run']}/{label}" if multi else label, ms, f1, size)
           for label, _, ms, f1, size, i in labelled]
    if len(pts) > 1:
        f = front(pts)
        ax.plot([p[1] for p in f], [p[2] for p in f], "--x", color="grey", lw=1, ms=9,
                label="Pareto front" + ("" if multi else ": " + ", ".join(p[0] for p in f)))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ref = runs[0]["settings"]["reference_runtime"]
    ax.set_xlabel(f"whole-pipeline latency, median ms ({ref}, {runs[0]['ratios']['threads']} threads; keras: TF)")
    ax.set_ylabel("test macro-F1")
    title = runs[0]["run"] if len(runs) == 1 else ", ".join(r["run"] for r in runs)
    ax.set_title(f"{title}: accuracy vs latency (marker area = model size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


CLINIC_STAGES = ("decode", "preprocess", "lungs", "inference", "postprocess")


def clinic_stages(results: dict, path: Path) -> Path | None:
    """Per-stage latency of each file kind (stacked bars, one panel per variant), the plain library
    decode of the same file as a black tick; None when no clinic file was measured."""
    clinic = results.get("clinic") or {}
    stages = clinic.get("stages") or {}
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), dpi=110, sharey=True, squeeze=False)
    for ax, (variant, kinds) in zip(axes[0], stages.items()):
        names = list(kinds)
        left = np.zeros(len(names))
        for i, stage in enumerate(CLINIC_STAGES):
            ms = np.array([kinds[k]["stages_ms"].get(stage, 0.0) for k in names])
            ax.barh(names, ms, left=left, color=f"C{i}", label=stage)
            left += ms
        ax.scatter([kinds[k]["library_decode_ms"] for k in names], names, marker="|", s=300, color="black",
                   label="library decode", zorder=3)
        ax.set_title(f"{variant}", fontsize=10)
        ax.set_xlabel(f"median ms ({clinic['runtime']}, {clinic['threads']} threads)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"{results['run']}: per-stage latency per file kind", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description="Several runs in one Pareto plot.")
    p.add_argument("results", nargs="+", type=Path, help="benchmarks/results/<run>-<timestamp>.json files")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        print(pareto([json.loads(r.read_text()) for r in args.results], args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
