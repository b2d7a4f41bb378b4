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


def _ci(c: dict | None) -> str:
    if c is None:
        return ""
    low, high = c["ci95_points"]
    return f"{c['diff_points']:+.2f} [{low:+.2f}, {high:+.2f}]"


def markdown(results: dict) -> str:
    splits = list(results["keras"])
    labels = results["labels"]
    lines = ["# Conversion report", "",
             f"Model {results['model']}. Every variant run through LiteRT on the CPU on "
             f"{' and '.join(splits)} and compared with the Keras model on the same images, each at its "
             "own card's calibration. `agree`: share of images whose class stays the Keras model's; "
             "`flipped`: referral decisions (P(abnormal) >= threshold) that changed (counted against the "
             "budget / all); `|dp|`: |delta P(abnormal)|, max and mean; the differences (variant - Keras, "
             "points) carry their paired bootstrap 95 % CI. Budgets: "
             f"`{results.get('gates_file', 'benchmarks/gates.toml')}` [conversion.*]. `GPU`: LiteRT GPU "
             "accelerator (full or partial, max |GPU - CPU| logit difference); `analyzer`: TFLite's static "
             "GPU-compatibility check.", "",
             "| variant | KiB | × fp32 | sparsity | analyzer | GPU | split | macro-F1 | agree | flipped "
             "| max / mean \\|dp\\| | macro-F1 diff | abn. sens. diff | COVID sens. diff | COVID lost | gate |",
             "|" + "---|" * 16]
    for split in splits:
        k = results["keras"][split]
        lines.append(f"| keras | | | | | | {split} | {k['macro_f1']:.4f} | | | | | | | | |")
    for name, v in results["variants"].items():
        for i, (split, s) in enumerate(v["splits"].items()):
            ci = s["bootstrap_ci95"]
            head = (f"| {name} | {v['bytes'] / 1024:.0f} | {_ratio(v['size_vs_fp32'])} | {v['weight_sparsity']:.3f} "
                    f"| {'compatible' if v['analyzer']['gpu_compatible'] else 'flagged'} | {gpu_cell(v)} "
                    if i == 0 else "| | | | | | ")
            lines.append(head + f"| {split} | {s['metrics']['macro_f1']:.4f} | {s['agreement']:.4f} "
                         f"| {s['decisions_flipped_counted']} / {s['decisions_flipped']} "
                         f"| {s['max_abs_dp_abnormal']:.3f} / {s['mean_abs_dp_abnormal']:.4f} "
                         f"| {_ci(ci['macro_f1'])} | {_ci(ci['abnormal_sensitivity'])} "
                         f"| {_ci(ci.get('covid_sensitivity'))} | {len(s['covid_lost'])} "
                         f"| {'pass' if v['gate']['passed'] else 'FAIL'} |")
    for name, why in results.get("refused", {}).items():
        lines += ["", f"**{name} refused**: {why}"]
    corrected = results.get("config", {}).get("bias_correction")
    lines += ["", "Mean logit shift (variant - Keras) per class: a systematic error, not noise, where it is "
              f"far from 0 (int8 and fp16 {'with' if corrected else 'without'} the weight-rounding bias correction, "
              "convert.bias_correction).", "",
              "| variant | split | " + " | ".join(labels) + " |", "|---" * (2 + len(labels)) + "|"]
    for name, v in results["variants"].items():
        for split, s in v["splits"].items():
            lines.append(f"| {name} | {split} | " + " | ".join(f"{s['mean_logit_shift'][c]:+.3f}" for c in labels) + " |")
    for name, v in results["variants"].items():
        corrected_ops = (v.get("empirical_bias_correction") or {}).get("ops")
        if corrected_ops:
            largest = max(corrected_ops, key=lambda op: op["max_abs_shift"])
            lines += ["", f"{name}: each of its {len(corrected_ops)} convolutions and dense layers had its "
                      f"remaining mean int8 error against the float model taken off its bias, op by op on "
                      f"{v['empirical_bias_correction']['images']} calibration images (convert.empirical_bias); the "
                      f"largest per-channel shift removed: {largest['max_abs_shift']:.4f} ({largest['op']})."]
    pruned = {n: v["keras_sparsity"] for n, v in results["variants"].items() if v.get("keras_sparsity")}
    for name, s in pruned.items():
        lines += ["", f"**{name} sparsity**: {s['prunable']:.4f} over the pruned Conv2D/Dense kernels, "
                  f"{s['overall']:.4f} over all kernels (depthwise kept dense). Per layer: "
                  + ", ".join(f"{layer} {x:.3f}" for layer, x in s["per_layer"].items())]
        break  # the same mask in every pruned variant
    if results.get("calibration"):
        lines += ["", "Fine-tuned models, refitted on val as training fits the Keras model (trained -> refitted):", "",
                  "| model | class offsets added | temperature | abnormal threshold | OOD threshold |",
                  "|---|---|---|---|---|"]
        for source, c in results["calibration"].items():
            cells = [f"{c[k]['trained']:.4g} -> {c[k]['refitted']:.4g}" if c[k]["refitted"] is not None else "none"
                     for k in ("temperature", "abnormal_threshold", "ood_threshold")]
            offsets = " ".join(f"{label} {x:+.3f}" for label, x in c.get("class_offsets", {}).items())
            lines.append(f"| {source} | {offsets or 'none'} | " + " | ".join(cells) + " |")
    lines += ["", "Out-of-distribution warning: each variant's threshold is its card's (refitted for fine-tuned "
              "models) scaled by how far its validation scores run from its Keras model's.", "",
              "| variant | OOD threshold | card's threshold | " + " | ".join(f"{s} flagged" for s in splits) + " |",
              "|---" * (3 + len(splits)) + "|"]
    for name, v in results["variants"].items():
        o = v.get("ood")
        lines.append(f"| {name} | " + ("**not carried** (the run has no OOD detector) |  | "
                                       + " | ".join("" for _ in splits)
                                       if o is None else f"{o['threshold']:.1f} | {o['run_threshold']:.1f} | "
                                       + " | ".join(f"{o['flagged'][s]:.3f}" for s in splits)) + " |")
    failures = [f"{n}: {f}" for n, v in results["variants"].items() for f in v["gate"]["failures"]]
    lines += ["", "Gate failures:" if failures else "All variants pass the gate."] + [f"- {f}" for f in failures]
    flips = [(n, split, f) for n, v in results["variants"].items() for split, s in v["splits"].items()
             for f in s["flips"]]
    if flips:
        lines += ["", "Changed images (class: top-1 changed, Keras margin = its top-1 minus top-2 probability; "
                  "referral: the decision at the threshold changed, Keras margin = |P(abnormal) - threshold|):", ""]
        lines += [f"- {n} {split} {f['kind']} `{f.get('file', f['index'])}` (true {labels[f['true']]}): "
                  f"{labels[f['keras']]} -> {labels[f['variant']]}, P(abnormal) {f['keras_p_abnormal']:.3f} -> "
                  f"{f['variant_p_abnormal']:.3f} (Keras margin "
                  f"{f['keras_class_margin'] if f['kind'] == 'class' else f['keras_decision_margin']:.3f})"
                  for n, split, f in flips[:80]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Size against the referral decisions flipped per variant, on the test split (else the first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "test" if "test" in results["keras"] else next(iter(results["keras"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in results["variants"].items():
        drop = 100.0 * v["splits"][split]["decisions_flipped"] / v["splits"][split]["n"]
        ax.scatter(v["bytes"] / 1024, drop, s=40, color="C3" if not v["gate"]["passed"] else "C0")
        ax.scatter(v["gzip_bytes"] / 1024, drop, s=40, marker="x", color="C7")
        ax.annotate(name, (v["bytes"] / 1024, drop), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("file size, KiB (x: gzip-compressed)")
    ax.set_ylabel(f"referral decisions flipped on {split}, %")
    ax.set_title(f"{results['model']}: size against parity (red: gate failed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
