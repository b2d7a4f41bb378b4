"""What a benchmark session measured, as one JSON document (schema: results.schema.json), and
what is made of it at the end: gates, the Markdown report, the Pareto plot, the comparison."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ai_edge_litert

from benchmarks import accelerators
from benchmarks import compare as compare_mod
from benchmarks import gates as gates_mod
from benchmarks.runtimes import REFERENCE
from edge_app.model_card import ModelCard

SCHEMA_FILE = Path(__file__).with_name("results.schema.json")
SCHEMA_VERSION = 1


def file_info(path: Path) -> dict:
    data = Path(path).read_bytes()
    return {"file": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9))}


class Collector:
    """Filled in by the benchmark tests, one figure at a time."""

    def __init__(self, run: Path, *, threads: list[int], device: str | None):
        self.run = Path(run)
        self.card = ModelCard.from_json((self.run / "model_card.json").read_text())
        self.threads = threads
        self.device = device
        self.runtimes: dict[str, dict] = {}
        self.variants: dict[str, dict] = {}
        self.test_split: dict = {}
        self.speedups: dict[str, dict] = {}
        self.lung_steps: dict[str, dict | None] = {}     # benchmarks/test_lung_step.py; None: no lung step
        self.robustness_worst: dict[str, dict] = {}      # benchmarks/test_robustness.py
        self.clinic: dict = {"runtime": REFERENCE, "threads": None, "pipeline_kind": None, "reference_kind": None,
                             "files": {}, "stages": {}, "memory": {}, "cold_start": {}}   # benchmarks/test_clinic.py
        self.started = time.time()

    def runtime(self, name: str, label: str, reason: str | None) -> None:
        self.runtimes[name] = {"label": label, "available": reason is None, "reason": reason}

    def available_runtimes(self) -> list[str]:
        return [n for n, r in self.runtimes.items() if r["available"]]

    def variant(self, name: str) -> dict:
        if name not in self.variants:
            path = self.run / ("model.keras" if name == "keras" else f"tflite/{name}.tflite")
            self.variants[name] = {"kind": "keras" if name == "keras" else "tflite", **file_info(path),
                                   "load_ms": None, "first_load_ms": None, "memory": None, "metrics": None,
                                   "latency": [], "unavailable": []}
        return self.variants[name]

    def latency(self, variant: str, runtime: str, threads: int | None, stage: str, stats: dict) -> None:
        self.variant(variant)["latency"].append({"runtime": runtime, "threads": threads, "stage": stage, **stats})

    def unavailable(self, variant: str, runtime: str, reason: str) -> None:
        entry = {"runtime": runtime, "reason": reason}
        if entry not in self.variant(variant)["unavailable"]:
            self.variant(variant)["unavailable"].append(entry)

    def speedup(self, variant: str, measured: dict) -> None:
        self.speedups[variant] = measured

    def lung_step(self, variant: str, measured: dict | None) -> None:
        self.lung_steps[variant] = measured

    def robustness(self, variant: str, worst: dict) -> None:
        self.robustness_worst[variant] = worst

    def clinic_stages(self, variant: str, kind: str, measured: dict) -> None:
        self.clinic["stages"].setdefault(variant, {})[kind] = measured

    def keras_reference(self) -> dict | None:
        """The Keras metrics the drops are measured against: this session's, or where TensorFlow
        is missing (a device) those conversion computed on the same split with the same code."""
        keras = self.variants.get("keras", {}).get("metrics")
        if keras:
            return {"source": "keras_baseline", "metrics": keras}
        conversion = self.run / "reports" / "conversion.json"
        if conversion.is_file():
            return {"source": str(conversion),
                    "metrics": json.loads(conversion.read_text())["keras"]["test"]}
        return None

    def to_json(self) -> dict:
        order = sorted(self.variants, key=lambda n: (n != "keras", n))
        return {
            "schema_version": SCHEMA_VERSION,
            "run": self.run.name,
            "run_dir": str(self.run),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": time.time() - self.started,
            "machine": {"hostname": platform.node(), "platform": platform.platform(),
                        "processor": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_average": list(os.getloadavg()), "python": platform.python_version(),
                        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "unknown")},
            "device": self.device,
            "model": {"name": self.card.name, "task": self.card.task, "labels": list(self.card.labels),
                      "input_size": self.card.input.size, "lung_crop": self.card.input.lung_crop},
            "test_split": self.test_split,
            "settings": {"threads": self.threads, "reference_runtime": REFERENCE},
            "runtimes": self.runtimes,
            "variants": {n: self.variants[n] for n in order},
            "speedup_vs_fp32": self.speedups,
            "lung_step": self.lung_steps,
            "robustness": self.robustness_worst,
            "clinic": self.clinic,
            "keras_reference": self.keras_reference(),
            "accelerators_elsewhere": accelerators.load(self.run),
            "conversion_gates": self.conversion_gates(),
        }

    def conversion_gates(self) -> dict:
        """Each variant's parity gate as `python -m convert` decided it (reports/conversion.json):
        decisions flipped, agreement, COVID-19 images lost, CIs of the differences (convert.parity)."""
        conversion = self.run / "reports" / "conversion.json"
        if not conversion.is_file():
            return {}
        return {name: {"passed": bool(v["gate"]["passed"]), "failures": list(v["gate"]["failures"])}
                for name, v in json.loads(conversion.read_text())["variants"].items()}


def _finite(obj):
    """NaN (e.g. a sensitivity without positives) -> null: the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def validate(results: dict) -> None:
    """Raise jsonschema.ValidationError when `results` does not follow results.schema.json."""
    import jsonschema

    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))


@dataclass
class Outcome:
    path: Path
    passed: bool
    lines: list[str]


def finish(collector: Collector, *, gates_file: Path, results_dir: Path, shipped: list[str] | None,
           compare: str | None, pytest_benchmark_json: Path | None, beside_run: bool = True) -> Outcome:
    """Gates, comparison, results JSON, report and plot; the lines to print at the end. With
    `beside_run` (a whole suite), also the run's recorded benchmark (reports/benchmark.*)."""
    from benchmarks import plot, report

    results = _finite(collector.to_json())
    gates = gates_mod.load_gates(gates_file)
    results["ratios"] = gates_mod.ratios(results, gates_mod.ratio_threads(gates))
    rows = gates_mod.evaluate(results, gates, device=collector.device, variants=shipped)
    results["gates"] = gates_mod.as_json(rows, gates_file=gates_file, device=collector.device,
                                         variants=shipped or [n for n, v in results["variants"].items()
                                                              if v["kind"] == "tflite"])
    changes = []
    if compare:
        changes = compare_mod.regressions(json.loads(Path(compare).read_text()), results,
                                          compare_mod.tolerances(gates))
        results["compare"] = {"against": str(compare), "regressions": [str(c) for c in changes]}
    results["pytest_benchmark_json"] = str(pytest_benchmark_json) if pytest_benchmark_json else None
    validate(results)

    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['run']}-{results['created'].replace(':', '').replace('-', '')}"
    path = results_dir / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2))
    plot_path = plot.pareto(results, results_dir / f"{stem}-pareto.png")
    clinic_plot = plot.clinic_stages(results, results_dir / f"{stem}-clinic.png")
    report_path = results_dir / f"{stem}.md"
    report_path.write_text(report.markdown(results, plot_path.name, clinic_plot and clinic_plot.name))
    reports = collector.run / "reports"  # the latest whole benchmark beside the run, for `make release`
    if beside_run:
        reports.mkdir(exist_ok=True)
        shutil.copy(path, reports / "benchmark.json")
        shutil.copy(plot_path, reports / "benchmark_pareto.png")
        if clinic_plot:
            shutil.copy(clinic_plot, reports / "benchmark_clinic.png")
        (reports / "benchmark.md").write_text(report.markdown(results, "benchmark_pareto.png",
                                                              clinic_plot and "benchmark_clinic.png"))

    lines = ["", "release gates (" + (f"device profile {collector.device}" if collector.device else
                                      "ratios; device budgets only with --device") + f", {gates_file}):",
             gates_mod.table(rows), gates_mod.summary(rows)]
    if compare:
        lines += [f"REGRESSION {c}" for c in changes] or [f"no regression beyond noise against {compare}"]
    lines += [f"results: {path}", f"report: {report_path}", f"plot: {plot_path}"]
    lines += [] if beside_run else [f"part of the suite only (-k / -m): {reports / 'benchmark.json'} left as it was"]
    lines += [f"clinic files plot: {clinic_plot}"] if clinic_plot else []
    return Outcome(path, all(r.passed for r in rows) and not changes, lines)
