"""Regressions of a benchmark run against an earlier one, beyond the noise both runs measured.

    python -m benchmarks.compare EARLIER.json LATER.json [--gates FILE]   (or `pytest benchmarks --compare EARLIER.json`)

A latency (or load time) regresses when its median grows by more than the larger IQR of the two
runs AND by more than `latency_floor` of the earlier median. The median and IQR are robust to the
stray slow rounds a machine shared with other jobs produces; the IQR is the noise of that very
benchmark on that machine, so a fast, steady stage is held tighter than a jittery one; the
relative floor keeps two quiet runs from flagging a few microseconds. pytest-benchmark's
--benchmark-compare-fail applies one fixed percentage to every benchmark and knows nothing of
accuracy, size or memory, which regress too: those are compared here with their own tolerances.
Every tolerance is in the [regression] section of the gates file (benchmarks/gates.toml).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gates import ACCURACY_METRICS, GATES_FILE, GateFileError, load_gates


@dataclass
class Change:
    variant: str
    what: str
    before: float
    after: float
    allowed: str

    def __str__(self) -> str:
        return f"{self.variant} {self.what}: {self.before:.4g} -> {self.after:.4g} (allowed {self.allowed})"


def tolerances(gates: dict) -> dict:
    """The [regression] section of a loaded gates file."""
    if "regression" not in gates:
        raise GateFileError("the gates file has no [regression] section: comparing runs needs its tolerances")
    return gates["regression"]


def regressions(earlier: dict, later: dict, tolerance: dict) -> list[Change]:
    """What got worse from `earlier` to `later` beyond `tolerance` (`tolerances` of a gates file)."""
    floor = tolerance["latency_floor"]

    def slower(before: dict, after: dict) -> bool:
        noise = max(before["iqr_ms"], after["iqr_ms"])
        return after["median_ms"] - before["median_ms"] > max(noise, floor * before["median_ms"])

    changes = []
    for name, new in later["variants"].items():
        old = earlier["variants"].get(name)
        if old is None:
            continue
        rows = {(r["runtime"], r["threads"], r["stage"]): r for r in old.get("latency", [])}
        for row in new.get("latency", []):
            key = (row["runtime"], row["threads"], row["stage"])
            if key in rows and slower(rows[key], row):
                runtime, threads, stage = key
                changes.append(Change(name, f"{stage} median ms ({runtime}{f', {threads} threads' if threads else ''})",
                                      rows[key]["median_ms"], row["median_ms"],
                                      f"+max(IQR, {floor:.0%})"))
        if old.get("load_ms") and new.get("load_ms") and slower(old["load_ms"], new["load_ms"]):
            changes.append(Change(name, "load median ms", old["load_ms"]["median_ms"], new["load_ms"]["median_ms"],
                                  f"+max(IQR, {floor:.0%})"))
        drop = tolerance["max_metric_drop"]
        for m in ACCURACY_METRICS:
            a, b = (old.get("metrics") or {}).get(m), (new.get("metrics") or {}).get(m)
            if a is not None and b is not None and 100.0 * (a - b) > drop:
                changes.append(Change(name, m, a, b, f"-{drop} points"))
        growth = tolerance["max_size_growth"]
        if old.get("bytes") and new.get("bytes") and new["bytes"] > old["bytes"] * (1 + growth):
            changes.append(Change(name, "bytes", old["bytes"], new["bytes"], f"+{growth:.0%}"))
        a, b = ((v.get("memory") or {}).get("peak_rss_mib") for v in (old, new))
        share, mib = tolerance["max_rss_growth"], tolerance["max_rss_growth_mib"]
        if a and b and b > a * (1 + share) and b - a > mib:
            changes.append(Change(name, "peak RSS MiB", a, b, f"+{share:.0%} and +{mib:g} MiB"))
    return changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("earlier", type=Path)
    p.add_argument("later", type=Path)
    p.add_argument("--gates", type=Path, default=GATES_FILE, help="gates file with the [regression] tolerances")
    args = p.parse_args(argv)
    changes = regressions(json.loads(args.earlier.read_text()), json.loads(args.later.read_text()),
                          tolerances(load_gates(args.gates)))
    for c in changes:
        print(f"REGRESSION {c}")
    print(f"{len(changes)} regression(s) beyond noise" if changes else "no regression beyond noise")
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
