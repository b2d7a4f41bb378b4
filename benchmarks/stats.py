"""Latency statistics in milliseconds, the same fields for pytest-benchmark and own timers."""
from __future__ import annotations

import time

import numpy as np

FIELDS = ("min", "median", "q1", "q3", "iqr", "mean", "stddev", "max")


def from_pytest_benchmark(stats) -> dict:
    """pytest-benchmark's Stats (seconds) -> {min_ms, median_ms, ..., rounds}."""
    return {**{f"{f}_ms": 1000.0 * float(getattr(stats, f)) for f in FIELDS}, "rounds": int(stats.rounds)}


def from_samples(seconds) -> dict:
    """Own timings (seconds) -> the same fields; quartiles as pytest-benchmark computes them."""
    s = np.sort(np.asarray(seconds, dtype=np.float64))
    q1, median, q3 = np.percentile(s, [25, 50, 75], method="median_unbiased") if len(s) > 1 else (s[0],) * 3
    values = {"min": s[0], "median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "mean": s.mean(),
              "stddev": s.std(ddof=1) if len(s) > 1 else 0.0, "max": s[-1]}
    return {**{f"{f}_ms": 1000.0 * float(v) for f, v in values.items()}, "rounds": int(len(s))}


def time_calls(fn, *, max_time: float, min_rounds: int, warmup: int = 2) -> dict:
    """Call fn until max_time seconds have passed and at least min_rounds calls were timed."""
    for _ in range(warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < min_rounds or time.perf_counter() - start < max_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return from_samples(samples)


def stage_breakdown(timings: list[dict]) -> dict:
    """Median ms of each pipeline stage (Prediction.timings_ms) over the timed calls, and the
    median per-call ratio of the whole pipeline to its inference: both halves of that ratio come
    from the same call, so they see the same machine load."""
    return {"stages_ms": {k: float(np.median([t[k] for t in timings])) for k in timings[0]},
            "overhead_ratio": float(np.median([t["total"] / t["inference"] for t in timings if t["inference"] > 0]))}


def paired_speedup(baseline, candidate, *, max_time: float, min_rounds: int) -> dict:
    """baseline() and candidate() alternated call by call (the order swapped every pair); the
    median of the per-pair time ratios is the speed-up, robust to load that drifts over a run."""
    pairs, start = [], time.perf_counter()
    while len(pairs) < min_rounds or time.perf_counter() - start < max_time:
        first, second = (baseline, candidate) if len(pairs) % 2 == 0 else (candidate, baseline)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a, b = (t1 - t0, t2 - t1) if first is baseline else (t2 - t1, t1 - t0)
        pairs.append((a, b))
    base, cand = np.array(pairs).T
    return {"speedup": float(np.median(base / cand)), "baseline_median_ms": 1000.0 * float(np.median(base)),
            "median_ms": 1000.0 * float(np.median(cand)), "pairs": len(pairs)}
