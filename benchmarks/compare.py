"""Regressions of a benchmark run against an earlier one, beyond the noise both runs measured.

    python -m benchmarks.compare EARLIER.json LATER.json      (or `pytest benchmarks --compare EARLIER.json`)

A latency (or load time) regresses when its median grows by more than the larger IQR of the two
runs AND by more than REL_FLOOR of the earlier median. The median and IQR are robust to the
stray slow rounds a machine shared with other jobs produces; the IQR is the noise of that very
benchmark on that machine, so a fast, steady stage is held tighter than a jittery one; the
relative floor keeps two quiet runs from flagging a few microseconds. pytest-benchmark's
--benchmark-compare-fail applies one fixed percentage to every benchmark and knows nothing of
accuracy, size or memory, which regress too: those are compared here with their own tolerances.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REL_FLOOR = 0.10             # latency: at least +10 % of the earlier median ...
METRIC_TOLERANCE = 0.5       # accuracy metrics: points (0-100) lost
SIZE_TOLERANCE = 0.01        # file size: relative growth
RSS_TOLERANCE = (0.10, 16.0)  # peak memory: relative growth and MiB, both exceeded
METRICS = ("accuracy", "macro_f1", "abnormal_sensitivity", "abnormal_specificity", "covid_sensitivity")


@dataclass
class Change:
    variant: str
    what: str
    before: float
    after: float
    allowed: str

    def __str__(self) -> str:
        return f"{self.variant} {self.what}: {self.before:.4g} -> {self.after:.4g} (allowed {self.allowed})"


def _slower(before: dict, after: dict) -> bool:
    noise = max(before["iqr_ms"], after["iqr_ms"])
    return after["median_ms"] - before["median_ms"] > max(noise, REL_FLOOR * before["median_ms"])


def regressions(earlier: dict, later: dict) -> list[Change]:
    changes = []
    for name, new in later["variants"].items():
        old = earlier["variants"].get(name)
        if old is None:
            continue
        rows = {(r["runtime"], r["threads"], r["stage"]): r for r in old.get("latency", [])}
        for row in new.get("latency", []):
            key = (row["runtime"], row["threads"], row["stage"])
            if key in rows and _slower(rows[key], row):
                runtime, threads, stage = key
                changes.append(Change(name, f"{stage} median ms ({runtime}{f', {threads} threads' if threads else ''})",
                                      rows[key]["median_ms"], row["median_ms"],
                                      f"+max(IQR, {REL_FLOOR:.0%})"))
        if old.get("load_ms") and new.get("load_ms") and _slower(old["load_ms"], new["load_ms"]):
            changes.append(Change(name, "load median ms", old["load_ms"]["median_ms"], new["load_ms"]["median_ms"],
                                  f"+max(IQR, {REL_FLOOR:.0%})"))
        for m in METRICS:
            a, b = (old.get("metrics") or {}).get(m), (new.get("metrics") or {}).get(m)
            if a is not None and b is not None and 100.0 * (a - b) > METRIC_TOLERANCE:
                changes.append(Change(name, m, a, b, f"-{METRIC_TOLERANCE} points"))
        if old.get("bytes") and new.get("bytes") and new["bytes"] > old["bytes"] * (1 + SIZE_TOLERANCE):
            changes.append(Change(name, "bytes", old["bytes"], new["bytes"], f"+{SIZE_TOLERANCE:.0%}"))
        a, b = ((v.get("memory") or {}).get("peak_rss_mib") for v in (old, new))
        if a and b and b > a * (1 + RSS_TOLERANCE[0]) and b - a > RSS_TOLERANCE[1]:
            changes.append(Change(name, "peak RSS MiB", a, b, f"+{RSS_TOLERANCE[0]:.0%} and +{RSS_TOLERANCE[1]:g} MiB"))
    return changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("earlier", type=Path)
    p.add_argument("later", type=Path)
    args = p.parse_args(argv)
    changes = regressions(json.loads(args.earlier.read_text()), json.loads(args.later.read_text()))
    for c in changes:
        print(f"REGRESSION {c}")
    print(f"{len(changes)} regression(s) beyond noise" if changes else "no regression beyond noise")
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
