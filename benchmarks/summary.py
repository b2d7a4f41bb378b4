"""python -m benchmarks.summary artifacts/RUN: a run on one screen, read in 20 seconds.

Reads only the run folder, the contract between the steps: model_card.json, reports/metrics.json
(training), reports/conversion.json (variants, parity gate, GPU check) and reports/benchmark.json
(latency, release gates). A step that has not run yet is named, not guessed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from benchmarks import gates as gates_mod
from convert.report import gpu_cell


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stale(run: Path, bench: dict) -> bool:
    """Whether the benchmark measured other .tflite files than the run's current ones."""
    return any(v["kind"] == "tflite" and (not (run / "tflite" / f"{name}.tflite").is_file() or hashlib.sha256(
               (run / "tflite" / f"{name}.tflite").read_bytes()).hexdigest() != v["sha256"])
               for name, v in bench["variants"].items())


def _threads(bench: dict) -> int:
    """The thread count the device runs at: its profile's, else the ratio gates'."""
    gates = gates_mod.load_gates(Path(bench["gates"]["file"]))
    profile = gates.get("devices", {}).get(bench.get("device") or "", {})
    return int(profile.get("threads", gates.get("ratios", {}).get("threads", 2)))


def data_lines(run: Path, card: dict, metrics: dict | None) -> list[str]:
    dataset = card.get("dataset", {})
    counts = dataset.get("counts", {})
    per_split = ", ".join(f"{split} {sum(counts[split].values())}" for split in ("train", "val", "test", "holdout")
                          if split in counts)
    lines = [f"data      {dataset.get('root', '?')}: {per_split}",
             f"model     {card['name']}, {card['input']['size']} px, labels {', '.join(card['labels'])}"]
    if metrics is None:
        return lines + ["Keras     not trained yet (no reports/metrics.json)"]
    test = metrics["test"]
    return lines + [f"Keras     test: macro-F1 {test['macro_f1']:.3f}, accuracy {test['accuracy']:.3f}, abnormal "
                    f"sensitivity {test['abnormal']['sensitivity']:.3f} at specificity "
                    f"{test['abnormal']['specificity']:.3f}, AUC {test['abnormal']['auc']:.3f}"]


def variant_lines(conversion: dict | None, bench: dict | None) -> tuple[list[str], list[str]]:
    """The table of variants, and the failed gates with their reason."""
    if conversion is None:
        return ["variants  not converted yet (make convert)"], []
    threads = _threads(bench) if bench else None
    rows = bench["gates"]["rows"] if bench else []
    header = (f"{'variant':12s} {'KiB':>7s}  {'parity (test F1 drop)':24s} {'GPU (max |GPU - CPU|)':27s} "
              f"{f'ms ({threads} thr)' if threads else 'ms':>11s}  gates")
    lines, failed = [header], []
    for name, v in conversion["variants"].items():
        test = v["splits"].get("test", next(iter(v["splits"].values())))
        parity = f"{'pass' if v['gate']['passed'] else 'FAIL'} ({test['drops_points']['macro_f1']:+.2f} pt)"
        failed += [f"{name}: conversion: {why}" for why in v["gate"]["failures"]]
        latency, gates = "—", "—"
        if bench and name in bench["variants"]:
            ms = gates_mod.latency(bench["variants"][name], "pipeline", threads)
            latency = "—" if ms is None else f"{ms:.1f}"
            mine = [r for r in rows if r["variant"] == name]
            gates = f"{sum(r['passed'] for r in mine)}/{len(mine)}" if mine else "—"
        lines.append(f"{name:12s} {v['bytes'] / 1024:7.0f}  {parity:24s} {gpu_cell(v):27s} {latency:>11s}  {gates}")
    for name, why in conversion.get("refused", {}).items():
        lines.append(f"{name:12s} refused: {why.splitlines()[0][:100]}")
    by_gate: dict[str, list[dict]] = {}
    for r in rows:
        if not r["passed"]:
            by_gate.setdefault(r["gate"], []).append(r)
    for gate, failures in by_gate.items():  # one line per gate, however many variants failed it
        unit = f" {failures[0]['unit']}" if failures[0]["unit"] else ""
        measured = ", ".join(" ".join(filter(None, (r["variant"], "not measured" if r["measured"] is None
                                                     else f"{r['measured']:.4g}"))) for r in failures)
        failed.append(f"{gate} (limit {failures[0]['op']} {failures[0]['limit']:g}{unit}): {measured}")
    if bench is None:
        lines.append("benchmark not run yet (make benchmark)")
    return lines, failed


def summary(run: Path) -> str:
    card = _load(run / "model_card.json")
    if card is None:
        raise FileNotFoundError(f"{run} is not a training run (no model_card.json)")
    reports = run / "reports"
    bench = _load(reports / "benchmark.json")
    lines = [f"== cxr-edge: {run} ==", *data_lines(run, card, _load(reports / "metrics.json")), ""]
    table, failed = variant_lines(_load(reports / "conversion.json"), bench)
    lines += table
    if bench and _stale(run, bench):
        lines += ["", "reports/benchmark.json measured other .tflite files than these: make benchmark again"]
    if bench:
        total = len(bench["gates"]["rows"])
        lines += ["", f"release gates: {total - len(bench['gates']['failed'])} of {total} passed"
                  + (f" (device profile {bench['device']})" if bench.get("device") else "")]
    if failed:
        lines += ["failed:"] + [f"  {line}" for line in failed]
    name = run.name
    lines += ["", f"reports   {reports}/ (report.md, conversion.md, benchmark.md and their plots)",
              f"next      make app RUN={name}   |   make release RUN={name}   |   make bundle-pi RUN={name}",
              "          (a screening aid, not a diagnosis; `make release` ships only when every gate passes)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder (artifacts/RUN)")
    args = p.parse_args(argv)
    try:
        print(summary(args.run))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
