"""`make release RUN=...`: ship a run only when every gate passes.

    python -m benchmarks.release artifacts/RUN [--results JSON] [--variants fp32,fp16]
                                 [--gates FILE] [--device pi4] [--version V] [--dist dist]

Reads the run's latest benchmark (reports/benchmark.json, written by `make benchmark`), refuses
when it does not describe the files on disk or when a gate fails, and otherwise writes
dist/<model>-<version>/: the shipped .tflite files, model_card.json, benchmark.md with its plot,
benchmark.json and SHA256SUMS, which the device checks when it loads a model from there
(edge_app.release). A release folder is never overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from benchmarks import gates as gates_mod
from benchmarks import report
from edge_app import release as checksums
from edge_app.classifier import Classifier
from edge_app.errors import ModelError

REPO = Path(__file__).resolve().parents[1]


class ReleaseRefused(RuntimeError):
    """The run may not ship; the message says why."""


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def check_fresh(run: Path, results: dict, shipped: list[str]) -> None:
    """The benchmark must have measured exactly the files that would ship."""
    for name in shipped:
        path = run / "tflite" / f"{name}.tflite"
        measured = results["variants"].get(name)
        if not path.is_file():
            raise ReleaseRefused(f"{path} does not exist")
        if measured is None:
            raise ReleaseRefused(f"{name} was not benchmarked; benchmarked: "
                                 f"{sorted(n for n, v in results['variants'].items() if v['kind'] == 'tflite')}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != measured["sha256"]:
            raise ReleaseRefused(f"{path} changed since it was benchmarked: run `make benchmark` again")


def make_release(run: Path, *, results_path: Path | None = None, gates_file: Path = gates_mod.GATES_FILE,
                 variants: list[str] | None = None, device: str | None = None, version: str | None = None,
                 dist: Path = Path("dist")) -> Path:
    run = Path(run)
    results_path = Path(results_path or run / "reports" / "benchmark.json")
    if not results_path.is_file():
        raise ReleaseRefused(f"no benchmark results at {results_path}: run `make benchmark RUN={run.name}`")
    results = json.loads(results_path.read_text())
    shipped = variants or [n for n, v in results["variants"].items() if v["kind"] == "tflite"]
    check_fresh(run, results, shipped)
    rows = gates_mod.evaluate(results, gates_mod.load_gates(gates_file), device=device, variants=shipped)
    print(gates_mod.table(rows))
    print(gates_mod.summary(rows))
    if not all(r.passed for r in rows):
        raise ReleaseRefused("gates failed: " + ", ".join(r.name for r in rows if not r.passed))

    card = json.loads((run / "model_card.json").read_text())
    target = Path(dist) / f"{card['name']}-{version or project_version()}"
    if target.exists():
        raise ReleaseRefused(f"{target} exists: a release is never overwritten; pass another --version")
    results["gates"] = gates_mod.as_json(rows, gates_file=gates_file, device=device, variants=shipped)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # all or nothing
        staging = Path(tmp) / target.name
        staging.mkdir()
        for name in shipped:
            shutil.copy(run / "tflite" / f"{name}.tflite", staging)
        shutil.copy(run / "model_card.json", staging)
        shutil.copy(run / "reports" / "benchmark_pareto.png", staging)
        (staging / "benchmark.json").write_text(json.dumps(results, indent=2))
        (staging / "benchmark.md").write_text(report.markdown(results, "benchmark_pareto.png"))
        checksums.write_sums(staging, [p.name for p in staging.iterdir()])
        for name in shipped:  # the device's own check: checksum, card, runtime
            try:
                Classifier(staging / f"{name}.tflite", accelerator="cpu")
            except ModelError as exc:
                raise ReleaseRefused(f"the released {name} does not load on the device: {exc}") from exc
        staging.rename(target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.release", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--results", type=Path, help="benchmark results JSON (default RUN/reports/benchmark.json)")
    p.add_argument("--gates", type=Path, default=gates_mod.GATES_FILE)
    p.add_argument("--variants", help="comma-separated variants to ship (default: every benchmarked one)")
    p.add_argument("--device", help="also check this device profile's absolute budgets")
    p.add_argument("--version", help="release version (default: pyproject's)")
    p.add_argument("--dist", type=Path, default=Path("dist"))
    args = p.parse_args(argv)
    try:
        target = make_release(args.run, results_path=args.results, gates_file=args.gates, device=args.device,
                              variants=args.variants.split(",") if args.variants else None,
                              version=args.version, dist=args.dist)
    except ReleaseRefused as exc:
        print(f"release refused: {exc}", file=sys.stderr)
        return 1
    print(f"released: {target}")
    for line in (target / checksums.SUMS_FILE).read_text().splitlines():
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
