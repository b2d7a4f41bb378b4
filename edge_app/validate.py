"""On-device commissioning: the model's figures on a site's own labelled images, with no TensorFlow.

`python -m edge_app validate --model M.tflite DIR` reads `DIR/<class>/...` (class names as training
reads them, edge_app.labels) or a CSV of `file,label[,group]`, classifies every image with
`Classifier.predict` (the code path of `predict` and the app, so each image's figures are the ones
the device gives it), and reports sensitivity and specificity at the model card's threshold with
Wilson intervals, the abnormal AUC with a bootstrap interval, per-class recall, the confusion
matrix, the out-of-distribution share, a reliability plot (drawn with Pillow) and the threshold
that reaches a target sensitivity on these images, with its bootstrap interval; with the CSV's optional
`group` column (projection PA / AP, ward, X-ray room, detector), sensitivity and specificity per group, since
one overall figure can hide the films a model handles worst. Every image that
cannot be read is listed with its error code, every file that is not an image is listed as skipped.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import socket
from pathlib import Path

import numpy as np

from edge_app import decision, metrics, site_config
from edge_app.errors import InputError, ModelError
from edge_app.inputs import collect
from edge_app.labels import canonical_label
from edge_app.progress import progress

# What each image's record keeps of Prediction.to_dict (timings and backend vary from run to run).
IMAGE_FIELDS = ("source", "label", "probabilities", "abnormal_probability", "decision", "threshold", "warning",
                "ood_score", "detail")


def read_labelled(source) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """((image path, class, group), ...) from class folders or a `file,label[,group]` CSV (group "" when
    none is given), and the files left out, each with its reason: not an image, not in a class folder, or a
    label no class has (EXCLUDED)."""
    source = Path(source)
    if source.is_dir():
        rows, left_out = _from_folders(source)
    elif source.is_file():
        rows, left_out = _from_csv(source)
    else:
        raise InputError("not_found", "no such folder or CSV file", source)
    classes = {}
    for path, raw, _ in rows:
        cls = classes.setdefault(raw, _canonical(raw, path))
        if cls is None:
            left_out.append({"path": path, "reason": f"label {raw!r} belongs to no class (edge_app.labels.EXCLUDED)"})
    labelled = [(path, classes[raw], group) for path, raw, group in rows if classes[raw] is not None]
    if not labelled:
        raise InputError("no_images", "no labelled images found", source)
    return labelled, left_out


def _from_folders(root: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    images, skipped = collect([root])
    left_out = [{"path": path, "reason": "not an image file (by its name or header)"} for path in skipped]
    rows = []
    for image in images:
        parts = Path(image).relative_to(root).parts
        if len(parts) < 2:
            left_out.append({"path": image, "reason": "not in a class folder"})
        else:
            rows.append((image, parts[0], ""))
    return rows, left_out


def _from_csv(path: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """Rows `file,label[,group]` under a header row; relative files are relative to the CSV's folder."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise InputError("bad_csv", f"the CSV needs a header row with the columns file,label "
                             f"(found {reader.fieldnames})", path)
        rows = list(reader)
    labelled = []
    for line, row in enumerate(rows, start=2):
        if not (row["file"] or "").strip():
            raise InputError("bad_csv", f"line {line}: no file", path)
        labelled.append((str(path.parent / row["file"].strip()), (row["label"] or "").strip(),
                         (row.get("group") or "").strip()))
    return labelled, []


def _canonical(raw: str, where: str) -> str | None:
    try:
        return canonical_label(raw, where=where)
    except ValueError as exc:
        raise InputError("unknown_label", str(exc)) from None


def classify(classifier, labelled: list[tuple[str, str, str]]) -> tuple[list[dict], list[dict]]:
    """(one record per classified image, one per image that could not be read), from (path, class, group)."""
    labels = classifier.card.labels
    missing = sorted({cls for _, cls, _ in labelled} - set(labels))
    if missing:
        raise InputError("label_not_in_model", f"the images include {', '.join(missing)}, which this model "
                         f"does not classify (its labels: {', '.join(labels)})", classifier.model_path)
    records, unreadable = [], []
    for path, cls, group in progress(labelled, "validating"):
        try:
            prediction = classifier.predict(path)
        except InputError as exc:
            unreadable.append({"source": path, "class": cls, "group": group, "code": exc.code,
                               "message": exc.message})
            continue
        as_dict = prediction.to_dict()
        records.append({"class": cls, "group": group, **{key: as_dict[key] for key in IMAGE_FIELDS}})
    return records, unreadable


def rate(hits) -> dict:
    """A proportion with its 95 % Wilson interval and counts."""
    hits = np.asarray(hits, bool)
    k, n = int(hits.sum()), int(hits.size)
    return {"value": k / n if n else None, "ci95": list(metrics.wilson_interval(k, n)), "k": k, "n": n}


def at_threshold(positive, scores, threshold: float) -> dict:
    """Sensitivity and specificity of P(abnormal) >= threshold, with Wilson intervals."""
    flagged = np.asarray(scores) >= threshold
    positive = np.asarray(positive, bool)
    return {"threshold": float(threshold), "sensitivity": rate(flagged[positive]),
            "specificity": rate(~flagged[~positive])}


def summarise(records: list[dict], labels, *, card_threshold: float, ood_threshold: float | None,
              target_sensitivity: float | None, bootstrap: int, site=None,
              detail_threshold: float | None = None) -> dict:
    """Every figure of the report, from the per-image records (site: a SiteConfig already stored
    for this model, also reported at its threshold; target_sensitivity None: no target threshold)."""
    y = np.array([labels.index(r["class"]) for r in records], dtype=int)
    probs = np.array([[r["probabilities"][label] for label in labels] for r in records],
                     dtype=float).reshape(len(records), len(labels))
    scores = np.array([r["abnormal_probability"] for r in records], dtype=float)
    positive, predicted = y != 0, probs.argmax(axis=1)
    both_classes = positive.any() and (~positive).any()
    return {
        "n_scored": len(records),
        "n_per_class": {label: int((y == c).sum()) for c, label in enumerate(labels)},
        "card_threshold": at_threshold(positive, scores, card_threshold),
        "site_threshold": None if site is None else {**at_threshold(positive, scores, site.threshold),
                                                     "site": site.describe()},
        "abnormal_auc": {"value": metrics.roc_auc(positive, scores),
                         "ci95": metrics.bootstrap_auc_ci(positive, scores, n=bootstrap)
                         if bootstrap and both_classes else [math.nan, math.nan],
                         "method": f"percentile bootstrap over images, {bootstrap} resamples"},
        "per_class_recall": {label: rate(predicted[y == c] == c) for c, label in enumerate(labels)},
        "confusion_matrix": {"rows_true_columns_predicted": list(labels),
                             "counts": metrics.confusion_matrix(y, predicted, len(labels)).tolist()},
        "ood": _warned(records, labels, decision.OUT_OF_DISTRIBUTION, ood_threshold, "ood_score"),
        "low_detail": _warned(records, labels, decision.LOW_DETAIL, detail_threshold, "detail"),
        "reliability": {"bins": [dict(zip(("confidence", "accuracy", "share"), b))
                                 for b in metrics.calibration_bins(probs, y)],
                        "ece": metrics.expected_calibration_error(probs, y) if len(records) else math.nan},
        "target": None if target_sensitivity is None else _target(positive, scores, target_sensitivity, bootstrap),
        "per_group": _per_group(records, positive, scores, card_threshold),
    }


def _per_group(records: list[dict], positive, scores, threshold: float) -> dict | None:
    """Per group of the CSV's `group` column: sensitivity and specificity at the card's threshold (Wilson
    intervals); None when no image has a group."""
    if not any(r.get("group") for r in records):
        return None
    groups = np.array([r.get("group") or "" for r in records])
    return {group or "(none)": at_threshold(positive[groups == group], scores[groups == group], threshold)
            for group in sorted(set(groups.tolist()))}


def _warned(records: list[dict], labels, warning: str, threshold: float | None, score: str) -> dict | None:
    """The share of images the device answered unreliable for with `warning` (decision.warning:
    out of distribution, too little detail); None when the model or its card makes no such check."""
    if threshold is None or any(r[score] is None for r in records):
        return None
    warned = np.array([r["warning"] == warning for r in records], bool)
    classes = np.array([r["class"] for r in records])
    return {"threshold": threshold, "share": rate(warned),
            "per_class": {label: rate(warned[classes == label]) for label in labels}}


def _target(positive, scores, target: float, bootstrap: int) -> dict | None:
    """The highest threshold reaching `target` sensitivity on these images, with its bootstrap
    interval and what it gives here; None without abnormal images."""
    if not positive.any():
        return None
    threshold = metrics.threshold_for_sensitivity(positive, scores, target)
    ci = metrics.bootstrap_threshold_ci(positive, scores, target, n=bootstrap) if bootstrap else [math.nan] * 2
    return {"target_sensitivity": target, **at_threshold(positive, scores, threshold), "threshold_ci95": ci,
            "method": f"percentile bootstrap over images, {bootstrap} resamples",
            "abnormal_needed": abnormal_images_needed(target)}


def abnormal_images_needed(target: float, z: float = metrics.Z_95) -> int | None:
    """The fewest abnormal images, every one found, whose Wilson interval lies at or above `target`
    (n / (n + z²) >= target): with fewer, no threshold can show that it reaches the target here."""
    return None if target >= 1 else math.ceil(target * z * z / (1 - target) - 1e-9)


def _too_few_abnormal(t: dict) -> str | None:
    """The caveat when these images cannot show the target sensitivity, whatever the threshold."""
    n, needed = t["sensitivity"]["n"], t["abnormal_needed"]
    if needed is None or n >= needed:
        return None
    return (f"only {n} abnormal images: too few to show sensitivity >= {t['target_sensitivity']:.2f} at any "
            f"threshold (at least {needed}, all found, would be needed); the site threshold's sensitivity "
            f"elsewhere may be as low as {t['sensitivity']['ci95'][0]:.3f}")


def validate(classifier, source, labelled, left_out, *, target_sensitivity: float, bootstrap: int) -> dict:
    """The JSON report: the figures at the model card's threshold (the classifier is opened without
    a site config) and at a site threshold already stored for this model, then every image and every
    file left out."""
    records, unreadable = classify(classifier, labelled)
    summary = summarise(records, classifier.card.labels, card_threshold=classifier.card.abnormal_threshold,
                        ood_threshold=classifier.card.thresholds.get("ood"),
                        detail_threshold=classifier.card.thresholds.get("detail"),
                        target_sensitivity=target_sensitivity, bootstrap=bootstrap,
                        site=existing_site_config(classifier))
    return {
        "model": str(classifier.model_path), "model_sha256": classifier.model_sha256,
        "images": str(source), "date": datetime.date.today().isoformat(),
        "labels": list(classifier.card.labels), "n_listed": len(labelled),
        "n_unreadable": len(unreadable), "n_left_out": len(left_out),
        **summary,
        "notice": decision.NOT_A_DIAGNOSIS,
        "unreadable": unreadable, "left_out": left_out, "per_image": records,
    }


def write_site_config(classifier, result: dict, site: str | None) -> site_config.SiteConfig:
    """Stores beside the model (site_config) the threshold for the target sensitivity and, where
    the site's films hold less fine detail than the card's threshold allows for, their own
    low-detail threshold: the target threshold was measured on those very films, so the device need
    not call them unreliable (a blurred copy of them still falls below)."""
    target = result["target"]
    if target is None or result["card_threshold"]["specificity"]["n"] == 0:
        raise InputError("no_images", "commissioning needs normal and abnormal images that could be read")
    site_detail = decision.site_low_detail_threshold(classifier.card.thresholds.get("detail"),
                                                     [r["detail"] for r in result["per_image"]])
    config = site_config.SiteConfig(
        site=site or socket.gethostname(), threshold=target["threshold"], date=result["date"],
        n_images=result["n_scored"], target_sensitivity=target["target_sensitivity"],
        model_sha256=classifier.model_sha256,
        detail_threshold=site_detail)
    site_config.write(classifier.model_path, config)
    return config


def existing_site_config(classifier):
    """The site config already stored for this model, None when there is none or it is unusable
    (commissioning runs to replace it)."""
    try:
        return site_config.load(classifier.model_path, classifier.model_sha256)
    except ModelError:
        return None


def write_reports(result: dict, out) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "validation.json", out / "validation.md", out / "reliability.png"]
    paths[0].write_text(json.dumps(json_safe(result), indent=2) + "\n")
    paths[1].write_text(markdown(result))
    reliability_png(result["reliability"]["bins"], paths[2])
    return paths


def json_safe(value):
    """NaN (a figure these images cannot give) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_rate(rate: dict) -> str:
    if rate["value"] is None:
        return "– (no images)"
    lo, hi = rate["ci95"]
    return f"{rate['value']:.3f} ({lo:.3f}–{hi:.3f}) {rate['k']}/{rate['n']}"


def format_number(value) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _interval(values) -> str:
    return "–" if any(v is None or math.isnan(v) for v in values) else f"{values[0]:.3f}–{values[1]:.3f}"


def markdown(r: dict) -> str:
    labels = r["labels"]
    lines = [f"# Validation of `{Path(r['model']).name}` on `{r['images']}`", "",
             f"{r['date']}; model SHA-256 `{r['model_sha256']}`. {r['n_listed']} labelled images listed, "
             f"{r['n_scored']} classified ({', '.join(f'{n} {c}' for c, n in r['n_per_class'].items())}), "
             f"{r['n_unreadable']} unreadable, {r['n_left_out']} file(s) left out (lists below).", "",
             "## Abnormal (pneumonia or COVID-19) vs normal", "",
             "Flagged: P(abnormal) at or above the threshold. 95 % intervals: Wilson for proportions.", "",
             "| threshold | sensitivity (95 % CI) k/n | specificity (95 % CI) k/n |", "|---|---|---|"]
    rows = [("model card", r["card_threshold"], "")]
    if r["site_threshold"]:
        rows.append((f"site ({r['site_threshold']['site']})", r["site_threshold"], ""))
    if r["target"]:
        t = r["target"]
        rows.append((f"for sensitivity ≥ {t['target_sensitivity']:.2f} on these images", t,
                     f" (95 % CI {_interval(t['threshold_ci95'])}, bootstrap)"))
    lines += [f"| {name}: {row['threshold']:.3f}{extra} | {format_rate(row['sensitivity'])} | "
              f"{format_rate(row['specificity'])} |" for name, row, extra in rows]
    caveat = r["target"] and _too_few_abnormal(r["target"])
    lines += ["", f"**Caution:** {caveat}."] if caveat else []
    auc = r["abnormal_auc"]
    lines += ["", f"Abnormal AUC {format_number(auc['value'])} (95 % CI {_interval(auc['ci95'])}, "
              f"{auc['method']}).", "",
              "## Recall per class (most probable class)", "", "| class | recall (95 % CI) k/n |", "|---|---|"]
    lines += [f"| {label} | {format_rate(rate)} |" for label, rate in r["per_class_recall"].items()]
    cm = r["confusion_matrix"]["counts"]
    lines += ["", "## Confusion matrix (rows: true class, columns: most probable class)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(labels, cm)]
    if r["per_group"]:
        lines += ["", "## Per group (the CSV's `group` column), at the model card's threshold", "",
                  "| group | sensitivity (95 % CI) k/n | specificity (95 % CI) k/n |", "|---|---|---|"]
        lines += [f"| {group} | {format_rate(row['sensitivity'])} | {format_rate(row['specificity'])} |"
                  for group, row in r["per_group"].items()]
    lines += ["", "## Out of distribution", ""]
    if r["ood"] is None:
        lines.append("This model carries no out-of-distribution score.")
    else:
        lines.append(f"Answered 'unlike the training images' (OOD score above {r['ood']['threshold']:.3g}): "
                     f"{format_rate(r['ood']['share'])}; per class: "
                     + ", ".join(f"{label} {format_rate(rate)}" for label, rate in r["ood"]["per_class"].items()) + ".")
    if r["low_detail"] is not None:
        lines.append("")
        lines.append(f"Answered 'too little fine detail' (detail below {r['low_detail']['threshold']:.3g}: blurred "
                     f"or enlarged from a small copy): {format_rate(r['low_detail']['share'])}; per class: "
                     + ", ".join(f"{label} {format_rate(rate)}"
                                 for label, rate in r["low_detail"]["per_class"].items()) + ".")
    lines += ["", "## Reliability", "", "![reliability](reliability.png)", "",
              f"Top-1 confidence against accuracy per confidence bin; expected calibration error "
              f"{format_number(r['reliability']['ece'])}.", ""]
    lines += ["## Images that could not be read", ""]
    lines += [f"- `{u['source']}` ({u['class']}): [{u['code']}] {u['message']}" for u in r["unreadable"]] or ["None."]
    lines += ["", "## Files left out", ""]
    lines += [f"- `{x['path']}`: {x['reason']}" for x in r["left_out"]] or ["None."]
    lines += ["", f"{r['notice']}.", ""]
    return "\n".join(lines)


def reliability_png(bins: list[dict], path, size: int = 480) -> None:
    """The reliability diagram, drawn with Pillow (matplotlib is not on the device): one dot per
    confidence bin at (mean confidence, accuracy), its area the bin's share of the images."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, top, side = 60, 40, size - 100
    xy = lambda x, y: (left + x * side, top + (1 - y) * side)
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160), width=1)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(tick, 0)
        draw.line([(x, y), (x, y + 5)], fill="black")
        draw.text((x - 10, y + 8), f"{tick:.2f}", fill="black")
        x, y = xy(0, tick)
        draw.line([(x - 5, y), (x, y)], fill="black")
        draw.text((x - 38, y - 6), f"{tick:.2f}", fill="black")
    draw.text((left, 12), "Reliability: accuracy vs top-1 confidence (grey: perfect)", fill="black")
    draw.text((left + side // 2 - 50, top + side + 28), "mean confidence in bin", fill="black")
    draw.text((6, top - 16), "accuracy", fill="black")
    points = [xy(b["confidence"], b["accuracy"]) for b in bins]
    if len(points) > 1:
        draw.line(points, fill=(31, 90, 160), width=2)
    for (x, y), b in zip(points, bins):
        r = 3 + 12 * math.sqrt(b["share"])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(31, 90, 160))
    image.save(path)


def text_summary(r: dict) -> str:
    """The few lines the command prints."""
    lines = [f"{r['n_scored']} of {r['n_listed']} labelled images classified "
             f"({r['n_unreadable']} unreadable, {r['n_left_out']} file(s) left out)."]
    rows = [("model card", r["card_threshold"])] + ([("site", r["site_threshold"])] if r["site_threshold"] else [])
    if r["target"]:
        rows.append((f"for sensitivity {r['target']['target_sensitivity']:.2f}", r["target"]))
    lines += [f"threshold {row['threshold']:.3f} ({name}): sensitivity {format_rate(row['sensitivity'])}, "
              f"specificity {format_rate(row['specificity'])}" for name, row in rows]
    if r["target"]:
        lines.append(f"  its 95 % CI (bootstrap): {_interval(r['target']['threshold_ci95'])}")
        caveat = _too_few_abnormal(r["target"])
        lines += [f"  CAUTION: {caveat}"] if caveat else []
    auc = r["abnormal_auc"]
    lines.append(f"abnormal AUC {format_number(auc['value'])} (95 % CI {_interval(auc['ci95'])})")
    lines += [f"  group {group}: sensitivity {format_rate(row['sensitivity'])}, specificity "
              f"{format_rate(row['specificity'])}" for group, row in (r["per_group"] or {}).items()]
    if r["ood"] is not None:
        lines.append(f"out of distribution: {format_rate(r['ood']['share'])}")
    if r["low_detail"] is not None:
        lines.append(f"too little fine detail: {format_rate(r['low_detail']['share'])}")
    lines += [f"CANNOT SCREEN [{u['code']}] {u['source']}: {u['message']}" for u in r["unreadable"]]
    return "\n".join(lines)
