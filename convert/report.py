"""reports/conversion.json, conversion.md and conversion.png: one row per variant."""
from __future__ import annotations

import json
from pathlib import Path


def write(reports: Path, results: dict) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "conversion.json").write_text(json.dumps(results, indent=2))
    (reports / "conversion.md").write_text(markdown(results))
    plot(results, reports / "conversion.png")


def gpu_cell(v: dict) -> str:
    g = v.get("gpu")
    if g is None:
        return "not run"
    if g.get("no_adapter"):
        return "not checked: no GPU adapter"
    if not g.get("applicable"):
        return "n/a (int I/O)"
    if not g.get("loaded"):
        return "failed to load"
    return f"{'full' if g['fully_accelerated'] else 'partial'}, {g['max_abs_diff']['logits']:.1e}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.3f}"


def markdown(results: dict) -> str:
    splits = list(results["keras"])
    lines = ["# Conversion report", "",
             f"Model {results['model']}. Every variant run through LiteRT on the CPU on "
             f"{' and '.join(splits)}; drops are in points against the Keras model; the gate is on "
             "macro-F1. `GPU`: LiteRT GPU accelerator (full or partial acceleration, max |GPU - CPU| "
             "logit difference); `analyzer`: TFLite's static GPU-compatibility check.", "",
             "| variant | KiB | gzip KiB | × fp32 | gzip × fp32 | sparsity | analyzer | GPU | split "
             "| accuracy | macro-F1 | abn. sens. | abn. spec. | AUC | agreement | F1 drop | budget | gate |",
             "|" + "---|" * 18]
    for split in splits:
        k = results["keras"][split]
        lines.append(f"| keras | | | | | | | | {split} | {k['accuracy']:.4f} | {k['macro_f1']:.4f} "
                     f"| {k['abnormal_sensitivity']:.4f} | {k['abnormal_specificity']:.4f} "
                     f"| {k['abnormal_auc']:.4f} | | | | |")
    for name, v in results["variants"].items():
        for i, (split, s) in enumerate(v["splits"].items()):
            m = s["metrics"]
            head = (f"| {name} | {v['bytes'] / 1024:.0f} | {v['gzip_bytes'] / 1024:.0f} | {_ratio(v['size_vs_fp32'])} "
                    f"| {_ratio(v['gzip_vs_fp32'])} | {v['weight_sparsity']:.3f} "
                    f"| {'compatible' if v['analyzer']['gpu_compatible'] else 'flagged'} | {gpu_cell(v)} "
                    if i == 0 else "| | | | | | | | ")
            lines.append(head + f"| {split} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} "
                         f"| {m['abnormal_sensitivity']:.4f} | {m['abnormal_specificity']:.4f} "
                         f"| {m['abnormal_auc']:.4f} | {s['agreement']:.4f} | {s['drops_points']['macro_f1']:+.2f} "
                         f"| {s['budget_points']:.1f} | {'pass' if v['gate']['passed'] else 'FAIL'} |")
    for name, why in results.get("refused", {}).items():
        lines += ["", f"**{name} refused**: {why}"]
    pruned = {n: v["keras_sparsity"] for n, v in results["variants"].items() if v.get("keras_sparsity")}
    for name, s in pruned.items():
        lines += ["", f"**{name} sparsity**: {s['prunable']:.4f} over the pruned Conv2D/Dense kernels, "
                  f"{s['overall']:.4f} over all kernels (depthwise kept dense). Per layer: "
                  + ", ".join(f"{layer} {x:.3f}" for layer, x in s["per_layer"].items())]
        break  # the same mask in every pruned variant
    lines += ["", "Out-of-distribution warning: each variant that carries it gets the card's threshold scaled by "
              "how far its validation scores run from the Keras model's (quantisation moves the features).", "",
              "| variant | OOD threshold | run's threshold | " + " | ".join(f"{s} flagged" for s in splits) + " |",
              "|---" * (3 + len(splits)) + "|"]
    for name, v in results["variants"].items():
        o = v.get("ood")
        lines.append(f"| {name} | " + ("not carried (its features moved in fine-tuning) |  | " + " | ".join("" for _ in splits)
                                       if o is None else f"{o['threshold']:.1f} | {o['run_threshold']:.1f} | "
                                       + " | ".join(f"{o['flagged'][s]:.3f}" for s in splits)) + " |")
    failures = [f"{n}: {f}" for n, v in results["variants"].items() for f in v["gate"]["failures"]]
    lines += ["", "Gate failures:" if failures else "All variants pass the gate."] + [f"- {f}" for f in failures]
    flips = [(n, split, f) for n, v in results["variants"].items() for split, s in v["splits"].items()
             for f in s["flips"]]
    if flips:
        lines += ["", "Flipped images (Keras margin = its own top-1 minus top-2 probability):", ""]
        lines += [f"- {n} {split} #{f['index']}: {results['labels'][f['keras']]} -> "
                  f"{results['labels'][f['variant']]} (Keras margin {f['keras_margin']:.3f})"
                  for n, split, f in flips[:60]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Size against macro-F1 drop per variant, on the test split (else the first split)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "test" if "test" in results["keras"] else next(iter(results["keras"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in results["variants"].items():
        drop = v["splits"][split]["drops_points"]["macro_f1"]
        ax.scatter(v["bytes"] / 1024, drop, s=40, color="C3" if not v["gate"]["passed"] else "C0")
        ax.scatter(v["gzip_bytes"] / 1024, drop, s=40, marker="x", color="C7")
        ax.annotate(name, (v["bytes"] / 1024, drop), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("file size, KiB (x: gzip-compressed)")
    ax.set_ylabel(f"macro-F1 drop on {split}, points")
    ax.set_title(f"{results['model']}: size against parity (red: gate failed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
