"""A run's report for people: plots (PNG) beside metrics.json, and a short report.md linking them."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edge_app import decision, metrics  # noqa: E402
from train import ood  # noqa: E402


def headline(card_metrics: dict) -> str:
    return "\n".join(f"  {k:<28} {v:.4f}" for k, v in card_metrics.items())


def _training_curves(history, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    offset = 0
    for phase in history:
        epochs = np.arange(len(phase.get("loss", []))) + offset
        axes[0].plot(epochs, phase.get("loss", []), "o-", label=f"train loss (phase {phase['phase']})")
        axes[0].plot(epochs, phase.get("val_loss", []), "s--", label=f"val loss (phase {phase['phase']})")
        axes[1].plot(epochs, phase.get("val_abnormal_auc", []), "o-", label=f"val abnormal AUC (phase {phase['phase']})")
        axes[1].plot(epochs, phase.get("val_macro_f1", []), "s--", label=f"val macro-F1 (phase {phase['phase']})")
        offset += len(epochs)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _confusion(cm, labels, title, path):
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc(probs, y, labels, results, path):
    fig, ax = plt.subplots(figsize=(4.5, 4))
    curves = [("abnormal", y != 0, decision.abnormal_probability(probs))]
    curves += [(label, y == i, probs[:, i]) for i, label in enumerate(labels) if label != "normal"]
    for name, positive, score in curves:
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = metrics.roc_curve(positive, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(positive, score):.3f})")
    sens, spec = results["abnormal"]["sensitivity"], results["abnormal"]["specificity"]
    ax.plot([1 - spec], [sens], "k*", ms=10, label=f"operating point (t={results['threshold']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliability(logits, y, temperature, path, bins=10):
    fig, ax = plt.subplots(figsize=(4, 4))
    for t, name in ((1.0, "uncalibrated"), (temperature, f"T={temperature:.2f}")):
        probs = decision.calibrated_probabilities(logits, t)
        xs, ys, _ = zip(*metrics.calibration_bins(probs, y, bins))
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {metrics.expected_calibration_error(probs, y):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradcam_grid(images, maps, titles, errors, path, columns: int = 4) -> None:
    """Each image with its Grad-CAM map overlaid (jet, 40 %), titled with truth and prediction."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, cam, title, error in zip(axes.ravel(), images, maps, titles, errors):
        h, w = image.shape
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam, cmap="jet", alpha=0.4, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=0, vmax=1,
                  interpolation="bilinear")
        ax.set_title(title, fontsize=7, color="firebrick" if error else "black")
    fig.suptitle("Grad-CAM on test images (red titles: errors)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(v) -> str:
    """A figure, or a dash where a split cannot have it (no abnormal image, say)."""
    return "—" if v is None or v != v else f"{v:.3f}"


def _per_source_table(per_source: dict, labels) -> list[str]:
    lines = ["| source | n | accuracy | " + " | ".join(f"{l} recall (n)" for l in labels)
             + " | abnormal sens. | abnormal spec. |", "|---" * (len(labels) + 5) + "|"]
    for source, m in per_source.items():
        recalls = [f"{figure(m['per_class'][l]['recall'])} ({m['per_class'][l]['n']})" if l in m["per_class"] else "—"
                   for l in labels]
        lines.append(f"| {source} | {m['n']} | {figure(m['accuracy'])} | " + " | ".join(recalls)
                     + f" | {figure(m['abnormal_sensitivity'])} | {figure(m['abnormal_specificity'])} |")
    return lines


def interval(c: dict) -> str:
    """'0.905 [0.773–0.962] (21)' for one cohort's figure."""
    lo, hi = c["ci95"]
    return f"{figure(c['value'])} [{figure(lo)}–{figure(hi)}] ({c['n']})"


def _cohort_table(results: dict, key: str = "cohorts", missing: str = "No image of a known source "
                  "(train/data/sources.py): no cohort figures.") -> list[str]:
    splits = [s for s in ("val", "test", "holdout") if s in results and results[s].get(key)]
    if not splits:
        return [missing]
    cohorts = sorted({c for s in splits for c in results[s][key]})
    lines = ["| cohort | figure | " + " | ".join(splits) + " |", "|---" * (len(splits) + 2) + "|"]
    for cohort in cohorts:
        cells = [results[s][key].get(cohort) for s in splits]
        kind = next(c["figure"] for c in cells if c)
        lines.append(f"| {cohort} | {kind} | " + " | ".join(interval(c) if c else "—" for c in cells) + " |")
    return lines


def write(reports: Path, results: dict, labels, logits: dict, ys: dict, history: list) -> None:
    reports = Path(reports)
    _training_curves(history, reports / "training_curves.png")
    for split in ("val", "test"):
        _confusion(results[split]["confusion_matrix"], labels, f"{split} confusion matrix",
                   reports / f"confusion_{split}.png")
    test_probs = decision.calibrated_probabilities(logits["test"], results["temperature"])
    _roc(test_probs, ys["test"], labels, results["test"], reports / "roc_test.png")
    _reliability(logits["test"], ys["test"], results["temperature"], reports / "reliability_test.png")
    lines = ["# Evaluation report", "",
             "Screening aid, not a diagnosis. Figures on the test split unless stated; the operating "
             f"threshold and the temperature were fitted on validation (target abnormal sensitivity "
             f"{results['target_sensitivity']:.2f}).", "",
             "| split | n | accuracy | macro-F1 | abnormal sens. | abnormal spec. | abnormal AUC | ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for split in [s for s in ("val", "test", "holdout") if s in results]:
        r = results[split]
        a = r["abnormal"]
        lines.append(f"| {split} | {r['n']} | " + " | ".join(figure(v) for v in (
            r["accuracy"], r["macro_f1"], a["sensitivity"], a["specificity"], a["auc"], r["ece"])) + " |")
    lines += ["", f"Operating threshold on P(abnormal): **{results['test']['threshold']:.4f}**; "
              f"temperature **{results['temperature']:.3f}** (test ECE {results['test']['ece_uncalibrated']:.3f} "
              f"at T = 1, {results['test']['ece']:.3f} after)."
              + (" Class offsets added to the logits before it (fitted on validation, undoing the prior shift of "
                 "the class weights): " + ", ".join(f"{label} {x:+.3f}" for label, x in results["class_offsets"].items())
                 + "." if "class_offsets" in results else ""), "", "## Per class (test)", "",
              "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, c in results["test"]["per_class"].items():
        lines.append(f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    if "covid" in results["test"]:
        c = results["test"]["covid"]
        lines += ["", f"COVID-19 vs rest (test): sensitivity {c['sensitivity']:.3f}, "
                  f"specificity {c['specificity']:.3f}, AUC {c['auc']:.3f}."]
    if "holdout" in results:
        lines += ["", f"**holdout**: every image of the source left out of training "
                  f"({', '.join(results['holdout']['per_source'])}): the score at a hospital the model never saw, "
                  "beside the in-distribution test split."]
        against = results["holdout"]["abnormal"].get("auc_against_test")
        if against:
            lines += ["", f"The held-out source has one side of the referral question only; ranked against the "
                      f"{against['n_against']} {against['against']} images its abnormal AUC is "
                      f"**{figure(against['auc'])}**"
                      + (" (95 % CI {} to {})".format(*map(figure, against["auc_ci95"])) if "auc_ci95" in against else "")
                      + "."]
    lines += ["", "## Adults and children (decisions at the operating threshold, 95 % Wilson intervals)", "",
              "The figures that decide the next hospital: the set's children and adults come from different "
              "hospitals, so an overall score can hide a model that refers children and clears adults.", "",
              *_cohort_table(results), "", "### Adults by projection (PA / AP)", "",
              "The development set's adult pneumonias are mostly AP films (bedside, supine), its adult normals "
              "mostly PA; a clinic's outpatients are PA. A model that reads the projection for the finding "
              "refers AP normals and misses PA pneumonias: read the PA rows before an outpatient clinic.", "",
              *_cohort_table(results, "adult_projections", "No adult image of known projection (the manifest's "
                             "`view`; a run trained before it was recorded has none).")]
    lines += ["", "## Per data source (test)", "",
              "A class drawn mostly from one hospital lets a model learn the hospital: read recall per "
              "source before trusting the overall score.", "",
              *_per_source_table(results["test"]["per_source"], labels)]
    flagged = results["ood"]["flagged"]
    lines += ["", "## Out-of-distribution warning", "",
              f"Images whose feature distance from the training set exceeds **{results['ood']['threshold']:.1f}** "
              f"(the {100 * ood.VAL_QUANTILE:g}th percentile on validation) are reported as unlike the training "
              "images, with no confident label. Share flagged: "
              + ", ".join(f"{split} {share:.1%}" for split, share in flagged.items()) + "."]
    low = results.get("detail")
    if low:
        lines += ["", f"Images whose model input holds less fine detail than **{low['threshold']:.3f}** (the "
                  f"{100 * low['val_quantile']:g}th percentile on validation; blurred, or enlarged from a small "
                  "copy) are reported as too soft to screen. Share flagged: "
                  + ", ".join(f"{split} {share:.1%}" for split, share in low["flagged"].items()) + "."]
    probe = results.get("shortcut_probe")
    if probe:
        lines += ["", "## Shortcut probe", "",
                  f"A linear probe on the penultimate features names the data source of "
                  f"{probe['accuracy']:.1%} of test images (majority guess {probe['majority_baseline']:.1%}).", "",
                  "| within class | n | source accuracy | majority guess | flagged |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {v['n']} | {v['accuracy']:.3f} | {v['majority_baseline']:.3f} | "
                  f"{'**yes**' if v['flagged'] else 'no'} |" for label, v in probe["within_class"].items()]
        if probe["flagged"]:
            lines += ["", "**Warning:** within a class the features tell the hospitals apart: the model may "
                      "score by source rather than by finding. Check the per-source figures and a "
                      "leave-one-source-out run (`--holdout-source`) before trusting it elsewhere."]
    lines += ["", "![training curves](training_curves.png)", "![confusion matrix](confusion_test.png)",
              "![ROC](roc_test.png)", "![reliability](reliability_test.png)",
              "![Grad-CAM](gradcam_test.png)", ""]
    (reports / "report.md").write_text("\n".join(lines))
