"""Release gates: every limit in benchmarks/gates.toml checked against one results JSON.

    python -m benchmarks.gates RESULTS.json [--gates FILE] [--device pi4] [--variants fp16,int8]

Prints gate, variant, measured, limit, pass/FAIL and exits 1 naming every failed gate. Gates
apply to the shipped variants (all that were benchmarked unless --variants says otherwise). A
gate whose figure was not measured fails: a release is never waved through for lack of data.
Ratios come from the same run on the same machine, so they hold on any machine; absolute
budgets belong to a device profile and are checked only with --device on that device.
"""
from __future__ import annotations

import argparse
import json
import operator
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

GATES_FILE = Path(__file__).with_name("gates.toml")
ACCURACY_METRICS = ("accuracy", "macro_f1", "abnormal_sensitivity", "abnormal_specificity", "covid_sensitivity")
DEVICE_KEYS = ("threads", "max_raw_ms", "max_pipeline_ms", "max_load_ms", "max_peak_rss_mib")
SCHEMA = {
    "accuracy": {f"min_{m}" for m in ACCURACY_METRICS},
    "drop_vs_keras": {f"max_{m}" for m in ACCURACY_METRICS},
    "size": {"max_mib", "max_gzip_mib"},
    "ratios": {"threads", "max_pipeline_overhead", "min_int8_speedup"},
    "ood": {"required", "max_test_flagged", "min_nonradiograph_flagged"},
    "lungs": {"max_segmenter_kib", "max_segmenter_vs_inference"},
    "robustness": {"max_silently_cleared"},
    "regression": {"latency_floor", "max_metric_drop", "max_size_growth", "max_rss_growth", "max_rss_growth_mib"},
    "clinic": {"max_decode_vs_library", "max_preprocess_vs_inference", "max_pipeline_vs_library_and_inference",
               "max_peak_rss_mib", "max_cold_start_s"},
}
# clinic ratio gates, per kind: the figure, and the two stages (ms) it divides, named in a failure
CLINIC_RATIOS = {"max_decode_vs_library": ("decode_vs_library", "decode", "library decode"),
                 "max_preprocess_vs_inference": ("preprocess_vs_inference", "preprocess", "inference"),
                 "max_pipeline_vs_library_and_inference": ("pipeline_vs_library_and_inference", "total",
                                                           "library decode + inference")}
COLD_START_VARIANT = "int8"
# [conversion.VARIANT]: the parity budgets of python -m convert (convert/parity.py); pruned-* share "pruned"
CONVERSION_KEYS = ("min_agreement", "max_flipped", "excused_margin", "max_drop_points", "max_covid_lost")
OPS = {"min": (">=", operator.ge), "max": ("<=", operator.le)}


class GateFileError(ValueError):
    """gates.toml names something no gate knows."""


@dataclass
class GateResult:
    gate: str                 # section.key, e.g. accuracy.min_macro_f1
    variant: str | None
    measured: float | None
    limit: float
    op: str                   # ">=" or "<="
    unit: str
    passed: bool
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.gate}[{self.variant}]" if self.variant else self.gate


def load_gates(path: Path = GATES_FILE) -> dict:
    gates = tomllib.loads(Path(path).read_text())
    for section, keys in gates.items():
        if section == "devices":
            for device, budget in keys.items():
                unknown = set(budget) - set(DEVICE_KEYS)
                if unknown or "threads" not in budget:
                    raise GateFileError(f"{path}: [devices.{device}] needs threads and knows only "
                                        f"{DEVICE_KEYS}; unknown: {sorted(unknown)}")
            continue
        if section == "conversion":
            for variant, budget in keys.items():
                if not isinstance(budget, dict) or set(budget) != set(CONVERSION_KEYS):
                    raise GateFileError(f"{path}: [conversion.{variant}] needs exactly {CONVERSION_KEYS}")
            continue
        if section not in SCHEMA:
            raise GateFileError(f"{path}: unknown section [{section}]; known: {sorted(SCHEMA)} and devices")
        unknown = set(keys) - SCHEMA[section]
        if unknown:
            raise GateFileError(f"{path}: unknown key(s) {sorted(unknown)} in [{section}]; "
                                f"known: {sorted(SCHEMA[section])}")
    return gates


def ratio_threads(gates: dict) -> int:
    """The thread count the ratio gates are read at: [ratios] threads, else the device default (2)."""
    return gates.get("ratios", {}).get("threads", 2)


def latency(variant: dict, stage: str, threads: int, runtime: str = "litert-cpu") -> float | None:
    """The median latency (ms) of one stage of a variant, or None when it was not measured."""
    for row in variant.get("latency", []):
        if (row["runtime"], row["threads"], row["stage"]) == (runtime, threads, stage):
            return row["median_ms"]
    return None


def ratios(results: dict, threads: int) -> dict:
    """The machine-independent figures of a run: pipeline overhead, speed-ups, drops vs Keras.

    Each ratio comes from one measurement where there is one (the pipeline's own stage timings,
    fp32 and the variant alternated pairwise); from two medians of separate benchmarks otherwise.
    """
    variants = {n: v for n, v in results["variants"].items() if v["kind"] == "tflite"}
    keras = ((results["variants"].get("keras") or {}).get("metrics")
             or (results.get("keras_reference") or {}).get("metrics"))

    def overhead(v):
        row = next((r for r in v.get("latency", []) if (r["runtime"], r["threads"], r["stage"])
                    == ("litert-cpu", threads, "pipeline")), {})
        raw, pipe = latency(v, "raw", threads), row.get("median_ms")
        return row.get("overhead_ratio") or (pipe / raw if raw and pipe else None)

    def speedup(name):
        paired = results.get("speedup_vs_fp32", {}).get(name)
        if paired:
            return paired["speedup"]
        fp32, other = (latency(variants[n], "raw", threads) if n in variants else None for n in ("fp32", name))
        return fp32 / other if fp32 and other else None

    drops = {}
    for name, v in variants.items():
        if keras and v.get("metrics"):
            drops[name] = {m: None if keras[m] is None or v["metrics"][m] is None
                           else 100.0 * (keras[m] - v["metrics"][m]) for m in ACCURACY_METRICS}
    return {"threads": threads,
            "pipeline_overhead": {n: overhead(v) for n, v in variants.items()},
            "speedup_vs_fp32": {n: speedup(n) for n in variants if n != "fp32"},
            "int8_speedup": speedup("int8") if "int8" in variants else None,
            "drop_vs_keras_points": drops}


def evaluate(results: dict, gates: dict, *, device: str | None = None,
             variants: list[str] | None = None) -> list[GateResult]:
    """Every gate that applies to the shipped variants, in the order of the gates file."""
    measured = {n: v for n, v in results["variants"].items() if v["kind"] == "tflite"}
    shipped = list(variants) if variants else list(measured)
    derived = ratios(results, ratio_threads(gates))
    rows: list[GateResult] = []

    def check(gate, variant, value, key, limit, unit, note=""):
        op, compare = OPS[key.split("_", 1)[0]]
        passed = value is not None and compare(value, limit)
        rows.append(GateResult(gate, variant, value, float(limit), op, unit, passed,
                               note or ("not measured" if value is None else "")))

    for name in shipped:
        v = measured.get(name)
        if v is None:
            rows.append(GateResult("benchmarked", name, None, 1.0, ">=", "", False,
                                   f"no benchmark of {name!r}; benchmarked: {sorted(measured)}"))
            continue
        parity = (results.get("conversion_gates") or {}).get(name)   # the budgets of [conversion.VARIANT]
        rows.append(GateResult("conversion.parity", name, None if parity is None else float(len(parity["failures"])),
                               0.0, "<=", "failures", bool(parity and parity["passed"]),
                               "not measured (no reports/conversion.json entry)" if parity is None
                               else "; ".join(parity["failures"])[:300]))
        metrics = v.get("metrics") or {}
        for key, limit in gates.get("accuracy", {}).items():
            metric = key.split("_", 1)[1]
            if metric == "covid_sensitivity" and "covid" not in results["model"]["labels"]:
                continue  # a binary task without COVID-19
            check(f"accuracy.{key}", name, metrics.get(metric), key, limit, "")
        drops = derived["drop_vs_keras_points"].get(name, {})
        for key, limit in gates.get("drop_vs_keras", {}).items():
            metric = key.split("_", 1)[1]
            if metric == "covid_sensitivity" and "covid" not in results["model"]["labels"]:
                continue
            check(f"drop_vs_keras.{key}", name, drops.get(metric), key, limit, "points",
                  "" if drops else "no Keras baseline")
        size = gates.get("size", {})
        if "max_mib" in size:
            check("size.max_mib", name, v["bytes"] / 2**20, "max_mib", size["max_mib"], "MiB")
        if "max_gzip_mib" in size:
            check("size.max_gzip_mib", name, v["gzip_bytes"] / 2**20, "max_gzip_mib", size["max_gzip_mib"], "MiB")
        ood, ood_gates = v.get("ood") or {}, dict(gates.get("ood", {}))
        carried = ood.get("carried") if ood else None
        if ood_gates.pop("required", False):
            rows.append(GateResult("ood.required", name, None if carried is None else float(carried), 1.0, "==", "",
                                   bool(carried), {None: "not measured", False: "ships without the OOD warning"}
                                   .get(carried, "")))
        if carried is not False:      # a variant without the OOD output has no figures to gate
            for key, limit in ood_gates.items():
                check(f"ood.{key}", name, ood.get(key.split("_", 1)[1]), key, limit, "")
        if results["model"].get("lung_crop", "none") != "none":
            rows += lung_step_rows(results.get("lung_step") or {}, gates.get("lungs", {}), name)
        rows += robustness_rows((results.get("robustness") or {}).get(name), gates.get("robustness", {}), name)
        if "max_pipeline_overhead" in gates.get("ratios", {}):
            check("ratios.max_pipeline_overhead", name, derived["pipeline_overhead"].get(name),
                  "max_pipeline_overhead", gates["ratios"]["max_pipeline_overhead"], "x")
        if device:
            budget = gates.get("devices", {}).get(device)
            if budget is None:
                raise GateFileError(f"no [devices.{device}] profile in the gates file; "
                                    f"profiles: {sorted(gates.get('devices', {}))}")
            t = budget["threads"]
            figures = {"max_raw_ms": latency(v, "raw", t), "max_pipeline_ms": latency(v, "pipeline", t),
                       "max_load_ms": (v.get("load_ms") or {}).get("median_ms"),
                       "max_peak_rss_mib": (v.get("memory") or {}).get("peak_rss_mib")}
            for key, limit in budget.items():
                if key != "threads":
                    check(f"devices.{device}.{key}", name, figures[key], key, limit,
                          "MiB" if key.endswith("mib") else "ms", f"{t} threads")
        rows += clinic_rows(results.get("clinic") or {}, gates.get("clinic", {}), name)
    if COLD_START_VARIANT in shipped:
        rows += cold_start_rows(results.get("clinic") or {}, gates.get("clinic", {}))
    if "int8" in shipped and "min_int8_speedup" in gates.get("ratios", {}):
        check("ratios.min_int8_speedup", "int8", derived["int8_speedup"], "min_int8_speedup",
              gates["ratios"]["min_int8_speedup"], "x", "" if derived["int8_speedup"] else "needs fp32 and int8")
    return rows


def _over(value: float, limit: float) -> str:
    return f"{100.0 * (value / limit - 1.0):+.0f}% vs the limit"


def clinic_rows(clinic: dict, gates: dict, variant: str) -> list[GateResult]:
    """The full-size clinic file gates of one variant: one row per kind and stage, named
    clinic.KIND.GATE, whose note says which stages were compared and by how much it missed."""
    rows = []
    stages = (clinic.get("stages") or {}).get(variant, {})
    for key, (figure, stage, reference) in CLINIC_RATIOS.items():
        if key not in gates:
            continue
        limit = float(gates[key])
        kinds = ([clinic.get("pipeline_kind")] if figure == "pipeline_vs_library_and_inference"
                 else [k for k in stages if k != clinic.get("reference_kind")])
        for kind in kinds or [None]:
            m = stages.get(kind)
            if m is None:
                rows.append(GateResult(f"clinic.{kind or 'files'}.{key}", variant, None, limit, "<=", "x", False,
                                       "not measured: no full-size clinic file benchmark"))
                continue
            ms, value = m["stages_ms"], m[figure]
            other = {"library decode": m["library_decode_ms"], "inference": ms["inference"],
                     "library decode + inference": m["library_decode_ms"] + ms["inference"]}[reference]
            rows.append(GateResult(f"clinic.{kind}.{key}", variant, value, limit, "<=", "x", value <= limit,
                                   f"{kind}: {stage} {ms[stage]:.1f} ms vs {reference} {other:.1f} ms, "
                                   f"{_over(value, limit)}"))
    if "max_peak_rss_mib" in gates:
        memory = (clinic.get("memory") or {}).get(variant)
        limit = float(gates["max_peak_rss_mib"])
        value = memory["peak_rss_mib"] if memory else None
        rows.append(GateResult(f"clinic.{memory['kind'] if memory else 'largest'}.max_peak_rss_mib", variant, value,
                               limit, "<=", "MiB", value is not None and value <= limit,
                               f"peak RSS {_over(value, limit)}" if memory else "not measured"))
    return rows


def lung_step_rows(lung_step: dict, gates: dict, variant: str) -> list[GateResult]:
    """The embedded lung segmenter of a lung-cropping variant: its size and its inference against
    the variant's (benchmarks/test_lung_step.py); not measured fails."""
    m = lung_step.get(variant)
    figures = {"max_segmenter_kib": m and m["segmenter_bytes"] / 1024,
               "max_segmenter_vs_inference": m and m["segmenter_vs_inference"]}
    rows = []
    for key, limit in gates.items():
        value = figures[key]
        note = ("not measured (benchmarks/test_lung_step.py)" if m is None else
                f"segmenter {m['segmenter_ms']:.2f} ms vs inference {m['inference_ms']:.2f} ms; whole lung step "
                f"{m['step_ms']:.2f} ms = {m['step_vs_inference']:.2f} x" if key == "max_segmenter_vs_inference"
                else f"{m['segmenter_input_size']} px input")
        rows.append(GateResult(f"lungs.{key}", variant, value, float(limit), "<=",
                               "KiB" if key.endswith("kib") else "x", value is not None and value <= limit, note))
    return rows


def robustness_rows(worst: dict | None, gates: dict, variant: str) -> list[GateResult]:
    """The acquisition that silently clears most referred abnormal films (benchmarks/test_robustness.py);
    not measured fails."""
    if "max_silently_cleared" not in gates:
        return []
    limit = float(gates["max_silently_cleared"])
    cleared = (worst or {}).get("silently_cleared") or {}
    value = cleared.get("value")
    note = ("not measured (benchmarks/test_robustness.py)" if value is None else
            f"worst: {cleared['acquisition']}, {cleared['k']} of {cleared['n']} referred abnormal films cleared "
            f"without a warning (95 % CI {cleared['ci95'][0]:.3f}-{cleared['ci95'][1]:.3f})")
    return [GateResult("robustness.max_silently_cleared", variant, value, limit, "<=", "",
                       value is not None and value <= limit, note)]


def cold_start_rows(clinic: dict, gates: dict) -> list[GateResult]:
    """Launch to first result of the predict CLI and of the app, each a row."""
    if "max_cold_start_s" not in gates:
        return []
    limit = float(gates["max_cold_start_s"])
    rows = []
    for what in ("cli", "app"):
        m = (clinic.get("cold_start") or {}).get(what) or {}
        value = m.get("median_s")
        note = (f"{what} cold start {_over(value, limit)}" if value is not None
                else "not measured" + (f": {m['reason']}" if m.get("reason") else ""))
        rows.append(GateResult(f"clinic.{what}.max_cold_start_s", COLD_START_VARIANT, value, limit, "<=", "s",
                               value is not None and value <= limit, note))
    return rows


def table(rows: list[GateResult]) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4g}"
    cells = [["gate", "variant", "measured", "limit", "result"]]
    cells += [[r.gate, r.variant or "", f"{fmt(r.measured)} {r.unit}".strip(), f"{r.op} {fmt(r.limit)} {r.unit}".strip(),
               ("pass" if r.passed else "FAIL") + (f" ({r.note})" if r.note and not r.passed else "")]
              for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in cells)


# the gates about what a variant answers, not how fast or how big it is; [robustness] aside: it
# measures what the trained weights do under other acquisitions, which every variant of a run shares
DECISION_SECTIONS = ("conversion", "accuracy", "drop_vs_keras", "ood")


def best_variant(rows: list[GateResult], results: dict, *, decisions_only: bool = False) -> str | None:
    """The variant to ship: the smallest file among those that passed every one of their gates
    (None when none did); with `decisions_only`, every gate about its answers (DECISION_SECTIONS),
    speed, size and memory aside."""
    if decisions_only:
        rows = [r for r in rows if r.gate.split(".", 1)[0] in DECISION_SECTIONS]
    failed = {r.variant for r in rows if not r.passed}
    passed = {r.variant for r in rows if r.variant} - failed
    return min(sorted(passed), key=lambda n: results["variants"][n]["bytes"], default=None)


def summary(rows: list[GateResult]) -> str:
    failed = [r.name for r in rows if not r.passed]
    if failed:
        return f"{len(failed)} of {len(rows)} gates FAILED: " + ", ".join(failed)
    return f"all {len(rows)} gates passed"


def as_json(rows: list[GateResult], *, gates_file, device, variants) -> dict:
    return {"file": str(gates_file), "device": device, "variants": variants,
            "rows": [asdict(r) | {"name": r.name} for r in rows],
            "passed": all(r.passed for r in rows), "failed": [r.name for r in rows if not r.passed]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gates", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a benchmarks/results/<run>-<timestamp>.json")
    p.add_argument("--gates", type=Path, default=GATES_FILE)
    p.add_argument("--device", help="a [devices.NAME] profile: check its absolute budgets")
    p.add_argument("--variants", help="comma-separated variants to ship (default: every benchmarked one)")
    p.add_argument("--best", action="store_true",
                   help="print only the variant to ship (the smallest that passed all its gates); exit 1 if none")
    p.add_argument("--keeping-decisions", action="store_true",
                   help="with --best: among the variants that passed every gate about their answers "
                        f"({', '.join(DECISION_SECTIONS)}), speed and size aside")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    rows = evaluate(results, load_gates(args.gates), device=args.device,
                    variants=args.variants.split(",") if args.variants else None)
    if args.best:
        best = best_variant(rows, results, decisions_only=args.keeping_decisions)
        kind = "gate about its answers" if args.keeping_decisions else "gate"
        print(best or f"no variant passed every {kind}: {summary(rows)}", file=sys.stdout if best else sys.stderr)
        return 0 if best else 1
    print(table(rows))
    print(summary(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
