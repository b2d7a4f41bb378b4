"""How the device's answers move when the same films are acquired differently (issue 11: the next
hospital images with another detector, exposure, compression and resolution than the development set).

    python -m benchmarks.robustness --run artifacts/RUN [--model artifacts/RUN/tflite/VARIANT.tflite ...] [--limit N]
                                    [--exports]
    make robustness RUN=...                  (every variant of the run)

Every test image of the run (`benchmarks.testset`) is decoded, changed as one acquisition might change it
(ACQUISITIONS), written to a file and classified from that file by `edge_app.validate.classify`, i.e.
`Classifier.predict`, the path of `predict` and the app. Per variant and acquisition:
`edge_app.validate.summarise`'s figures (sensitivity and specificity at the card's threshold with Wilson
intervals, AUC, per-class recall, out-of-distribution share) and, against the same films as stored: referral
decisions flipped (P(abnormal) crossing the card's threshold either way), abnormal films silently cleared
(referred as stored, "no abnormality" and no warning as acquired), predicted classes changed, mean and max
|delta P(abnormal)|, films refused. reports/robustness.{json,md,png}. `make benchmark` runs it on every
benchmarked variant (benchmarks/test_robustness.py) and the `[robustness]` gates read the worst acquisition.

`--exports` adds the full-size export's detector counts stored as every other kind of clinic file
(`benchmarks.clinic_files`: 16-bit PNG, RGB PNG, JPEG q95, DICOM MONOCHROME2/1 with a VOI window, DICOM
with a VOI LUT Sequence), the same counts for every kind, and says how many films get a different referral
decision from one storage to another (`across_exports`): how much the way a clinic exports its films
moves the answer. Not part of `make benchmark` (a few seconds of writing per film).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
from PIL import Image, ImageFilter

from benchmarks import clinic_files
from benchmarks.testset import Split
from edge_app import decision, preprocess, validate
from edge_app.classifier import Classifier
from edge_app.progress import progress

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AS_STORED = "as stored"
EXPORT_SCALE = 8          # the full-size export: a 256 px film becomes ~2,000 px


@dataclass(frozen=True)
class Acquisition:
    name: str
    what: str
    change: Callable[[Path, np.ndarray, np.random.Generator], Image.Image] | None   # None: the file itself
    suffix: str = ".png"
    quality: int | None = None     # JPEG
    export: str | None = None      # a benchmarks.clinic_files kind: the full-size export stored as that kind


def _grey(values) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _exposure(power: float):
    return lambda path, grey, rng: _grey(255.0 * (grey / 255.0) ** power)


def _half_resolution(path, grey, rng) -> Image.Image:
    image = Image.fromarray(grey, "L")
    small = image.resize((max(1, grey.shape[1] // 2), max(1, grey.shape[0] // 2)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


ACQUISITIONS = (
    Acquisition(AS_STORED, "the test file itself", None),
    Acquisition("blurred", "Gaussian blur, sigma 1.5 px", lambda p, g, r: Image.fromarray(g, "L").filter(
        ImageFilter.GaussianBlur(1.5))),
    Acquisition("sharpened", "unsharp mask, radius 2 px, 100 %", lambda p, g, r: Image.fromarray(g, "L").filter(
        ImageFilter.UnsharpMask(radius=2, percent=100, threshold=0))),
    Acquisition("noisy", "Gaussian noise, sd 4 % of full scale", lambda p, g, r: _grey(g + r.normal(0.0, 0.04 * 255,
                                                                                              g.shape))),
    Acquisition("darker", "grey curve x^1.5", _exposure(1.5)),
    Acquisition("brighter", "grey curve x^0.67", _exposure(0.67)),
    Acquisition("jpeg q30", "JPEG quality 30", lambda p, g, r: Image.fromarray(g, "L"), ".jpg", 30),
    Acquisition("half resolution", "down to half size and back (bilinear)", _half_resolution),
    Acquisition("tilted 5 deg", "rotated 5 degrees, black corners", lambda p, g, r: Image.fromarray(g, "L").rotate(
        5, resample=Image.Resampling.BILINEAR, fillcolor=0)),
    Acquisition("negative", "grey inverted: a MONOCHROME1 film exported without its inversion",
                lambda p, g, r: Image.fromarray(255 - g, "L")),
    Acquisition("on its side", "rotated 90 degrees: a film stored turned",
                lambda p, g, r: Image.fromarray(g, "L").transpose(Image.Transpose.ROTATE_90)),
    Acquisition("upside down", "rotated 180 degrees: a film digitised the wrong way round",
                lambda p, g, r: Image.fromarray(g, "L").transpose(Image.Transpose.ROTATE_180)),
    Acquisition("full-size export", f"{EXPORT_SCALE} x upscaled as detector counts with noise, 8-bit PNG",
                None, export="png8"),
)
EXPORTS = tuple(Acquisition(f"exported as {kind}", f"the full-size export's counts as {clinic_files.KINDS[kind].what}",
                            None, clinic_files.KINDS[kind].suffix, export=kind)
                for kind in ("png16", "png-rgb", "jpeg95", "dicom-mono2", "dicom-mono1", "dicom-voilut"))


def write_acquired(acquisition: Acquisition, paths: list[Path], folder: Path, seed: int) -> list[Path]:
    """The films as `acquisition` would give them, one file each in `folder` (the files themselves
    for AS_STORED); seeded per film, so a film's noise does not depend on the others, and every
    export kind stores the same detector counts of a film."""
    if acquisition.change is None and acquisition.export is None:
        return list(paths)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(progress(paths, f"writing {acquisition.name}")):
        rng = np.random.default_rng([seed, i])
        grey = preprocess.decode(path)
        target = folder / f"{i:05d}{acquisition.suffix}"
        if acquisition.export:
            h, w = grey.shape
            size = clinic_files.Kind("export", w * EXPORT_SCALE, h * EXPORT_SCALE, acquisition.suffix, acquisition.what)
            clinic_files.store(clinic_files.detector_counts(path, size, rng), acquisition.export, target,
                               compress_level=1)
        else:
            image = acquisition.change(path, grey, rng)
            image.save(target, **({"quality": acquisition.quality} if acquisition.quality else {"compress_level": 1}))
        out.append(target)
    return out


def against_stored(stored: dict[int, dict], acquired: dict[int, dict], threshold: float, labels) -> dict:
    """What changed for the films scored both as stored and as acquired. `silently_cleared`: the
    abnormal films referred as stored that the acquisition turns into "no abnormality detected" with
    no warning (out of distribution, too little detail), as a share of the abnormal films referred as
    stored (Wilson interval): the error a screening aid must not make when the next hospital's
    detector differs.
    `needlessly_referred`, its mirror: normal films not referred as stored that the acquisition refers
    (no warning), as a share of those."""
    both = sorted(set(stored) & set(acquired))
    p0 = np.array([stored[i]["abnormal_probability"] for i in both], float)
    p1 = np.array([acquired[i]["abnormal_probability"] for i in both], float)
    top = lambda r: max(labels, key=lambda label: r["probabilities"][label])  # noqa: E731
    flipped = [i for i, a, b in zip(both, p0, p1) if (a >= threshold) != (b >= threshold)]
    abnormal = {i: stored[i]["class"] != labels[0] for i in both}
    referred = [i for i, a in zip(both, p0) if abnormal[i] and a >= threshold]
    cleared = [acquired[i]["decision"] == decision.NO_ABNORMALITY for i in referred]
    not_referred = [i for i, a in zip(both, p0) if not abnormal[i] and a < threshold]
    needless = [acquired[i]["decision"] == decision.REFER for i in not_referred]
    return {"n": len(both),
            "referrals_flipped": len(flipped),
            "newly_referred": int(((p1 >= threshold) & (p0 < threshold)).sum()),
            "no_longer_referred": int(((p0 >= threshold) & (p1 < threshold)).sum()),
            "silently_cleared": validate.rate(cleared),
            "needlessly_referred": validate.rate(needless),
            "classes_changed": sum(top(stored[i]) != top(acquired[i]) for i in both),
            "mean_abs_delta_p": float(np.abs(p1 - p0).mean()) if both else None,
            "max_abs_delta_p": float(np.abs(p1 - p0).max()) if both else None,
            "flipped_films": flipped, "silently_cleared_films": [i for i, c in zip(referred, cleared) if c]}


def across_exports(by_export: dict[str, dict[int, dict]], threshold: float) -> dict:
    """The films scored from every export (kind -> {film: record}): on how many the referral decision
    (P(abnormal) >= threshold) is not the same for all of them, and how far P(abnormal) spreads
    between the exports of one film."""
    films = sorted(set.intersection(*(set(records) for records in by_export.values())))
    p = np.array([[records[i]["abnormal_probability"] for records in by_export.values()] for i in films],
                 float).reshape(len(films), len(by_export))
    referred = p >= threshold
    differs = referred.any(axis=1) & ~referred.all(axis=1)
    spread = p.max(axis=1) - p.min(axis=1) if films else np.zeros(0)
    return {"exports": list(by_export), "decision_differs": validate.rate(differs),
            "referred": {kind: validate.rate(referred[:, k]) for k, kind in enumerate(by_export)},
            "mean_spread": float(spread.mean()) if films else None,
            "max_spread": float(spread.max()) if films else None,
            "differing_films": [films[k] for k in np.flatnonzero(differs)]}


WORST_OF = ("silently_cleared", "needlessly_referred")


def worst(rows: dict) -> dict:
    """Per figure of WORST_OF, the acquisition with the largest share, and that share."""
    out = {}
    for figure in WORST_OF:
        measured = {name: r["against_stored"][figure] for name, r in rows.items()
                    if r["against_stored"][figure]["value"] is not None}
        name = max(measured, key=lambda n: measured[n]["value"], default=None)
        out[figure] = {"acquisition": name, **(measured[name] if name else validate.rate([]))}
    return out


def measure(run: Path, models: dict[str, Path], *, split: Split | None = None, limit: int | None = None,
            seed: int = 0, bootstrap: int = 200, exports: bool = False) -> dict:
    """Each acquisition's files are written once and classified by every model in `models`
    (variant name -> .tflite), so the variants are compared on the same files; `split`: the run's
    test split where it was loaded already (the benchmark's, with its --data-root); `exports`: also
    EXPORTS, and `across_exports` per variant."""
    acquisitions = ACQUISITIONS + (EXPORTS if exports else ())
    split = split or Split.of_run(run)
    classifiers = {name: Classifier(path, accelerator="cpu") for name, path in models.items()}
    films = list(zip(split.paths, (split.card.labels[c] for c in split.y)))[:limit]
    paths = [p for p, _ in films]
    rows: dict[str, dict] = {name: {} for name in models}
    stored: dict[str, dict] = {}
    exported: dict[str, dict] = {name: {} for name in models}    # variant -> export kind -> {film: record}
    work = Path(tempfile.mkdtemp(prefix="robustness-"))      # one acquisition's files at a time
    try:
        for acquisition in acquisitions:
            folder = work / acquisition.name.replace(" ", "-")
            files = write_acquired(acquisition, paths, folder, seed)
            index = {str(f): i for i, f in enumerate(files)}
            labelled = [(str(f), cls, "") for f, (_, cls) in zip(files, films)]
            for name, classifier in classifiers.items():
                card = classifier.card
                records, refused = validate.classify(classifier, labelled)
                by_film = {index[r["source"]]: r for r in records}
                if acquisition.name == AS_STORED:
                    stored[name] = by_film
                if acquisition.export:
                    exported[name][acquisition.export] = by_film
                summary = validate.summarise(records, card.labels, card_threshold=card.abnormal_threshold,
                                             ood_threshold=card.thresholds.get("ood"), target_sensitivity=None,
                                             detail_threshold=card.thresholds.get("detail"),
                                             bootstrap=bootstrap)
                change = against_stored(stored[name], by_film, card.abnormal_threshold, card.labels)
                for key in ("flipped_films", "silently_cleared_films"):
                    change[key] = [str(paths[i]) for i in change[key]]
                rows[name][acquisition.name] = {
                    "what": acquisition.what, **summary,
                    "refused": [{"film": str(paths[index[u["source"]]]), "code": u["code"], "message": u["message"]}
                                for u in refused],
                    "against_stored": change}
            if acquisition.name != AS_STORED:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"run": str(run), "n_films": len(films), "seed": seed,
            "acquisitions": {a.name: a.what for a in acquisitions},
            "variants": {name: {"model": str(models[name]), "model_sha256": c.model_sha256,
                                "threshold": c.card.abnormal_threshold, "acquisitions": rows[name],
                                "worst": worst(rows[name]),
                                "across_exports": _across_exports_of(exported[name], c.card.abnormal_threshold,
                                                                     paths) if exports else None}
                         for name, c in classifiers.items()}}


def _across_exports_of(by_export: dict[str, dict[int, dict]], threshold: float, paths: list[Path]) -> dict:
    result = across_exports(by_export, threshold)
    result["differing_films"] = [str(paths[i]) for i in result["differing_films"]]
    return result


def markdown(result: dict) -> str:
    lines = [f"# Robustness to acquisition: {result['run']}", "",
             f"{result['n_films']} test films, each changed as below and classified from the file by the device's "
             "code, at each variant's referral threshold. Flips, silently cleared films and |dP| are against the "
             "same films as stored; silently cleared: abnormal films referred as stored that the acquisition turns "
             "into \"no abnormality\" without a warning (out of distribution or too little detail; share of those "
             "referred); needlessly referred: normal films not referred as stored that it refers without a "
             "warning.", ""]
    for name, v in result["variants"].items():
        cleared, needless = v["worst"]["silently_cleared"], v["worst"]["needlessly_referred"]
        lines += [f"## {name} (`{v['model']}`, threshold {v['threshold']:.3f})", "",
                  f"Worst: {cleared['acquisition'] or '—'} silently clears {validate.format_rate(cleared)}; "
                  f"{needless['acquisition'] or '—'} needlessly refers {validate.format_rate(needless)}.", "",
                  "| acquisition | scored | refused | sensitivity [95 % CI] | specificity [95 % CI] | AUC | "
                  "OOD share | low-detail share | referrals flipped (new / lost) | silently cleared [95 % CI] | "
                  "needlessly referred [95 % CI] | classes changed | mean / max abs dP |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for acquisition, r in v["acquisitions"].items():
            sens, spec = r["card_threshold"]["sensitivity"], r["card_threshold"]["specificity"]
            change = r["against_stored"]
            ood, low_detail = ("—" if r[key] is None else validate.format_rate(r[key]["share"])
                               for key in ("ood", "low_detail"))
            delta = ("—" if change["mean_abs_delta_p"] is None
                     else f"{change['mean_abs_delta_p']:.3f} / {change['max_abs_delta_p']:.3f}")
            lines.append(f"| {acquisition} ({r['what']}) | {r['n_scored']} | {len(r['refused'])} | "
                         f"{validate.format_rate(sens)} | {validate.format_rate(spec)} | "
                         f"{validate.format_number(r['abnormal_auc']['value'])} | {ood} | {low_detail} | "
                         f"{change['referrals_flipped']} ({change['newly_referred']} / "
                         f"{change['no_longer_referred']}) | {validate.format_rate(change['silently_cleared'])} | "
                         f"{validate.format_rate(change['needlessly_referred'])} | {change['classes_changed']} | "
                         f"{delta} |")
        lines.append("")
        across = v.get("across_exports")
        if across:
            referred = ", ".join(f"{kind} {r['k']}" for kind, r in across["referred"].items())
            lines += [f"Across the {len(across['exports'])} exports of the same detector counts "
                      f"({', '.join(across['exports'])}): the referral decision differs between them for "
                      f"{validate.format_rate(across['decision_differs'])} films; P(abnormal) spreads by "
                      f"{across['mean_spread']:.3f} on average, {across['max_spread']:.3f} at most. "
                      f"Films referred: {referred}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Per variant, abnormal sensitivity and specificity per acquisition with their Wilson intervals."""
    names = list(result["acquisitions"])
    fig, axes = plt.subplots(len(result["variants"]), 1, figsize=(9, 3.6 * len(result["variants"]) + 0.8),
                             squeeze=False, sharex=True)
    x = np.arange(len(names))
    for ax, (variant, v) in zip(axes[:, 0], result["variants"].items()):
        for offset, what, colour in ((-0.18, "sensitivity", "tab:red"), (0.18, "specificity", "tab:blue")):
            rates = [v["acquisitions"][n]["card_threshold"][what] for n in names]
            values = np.array([np.nan if r["value"] is None else r["value"] for r in rates])
            low = np.maximum(values - np.array([r["ci95"][0] for r in rates]), 0.0)    # (rounding: Wilson's
            high = np.maximum(np.array([r["ci95"][1] for r in rates]) - values, 0.0)   # interval holds the value)
            ax.bar(x + offset, values, 0.36, yerr=[low, high], capsize=3, color=colour, alpha=0.8,
                   label=f"abnormal {what}")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("at the threshold (95 % CI)")
        ax.set_title(f"{variant}: {Path(v['model']).name}", fontsize=10)
        ax.legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(f"Acquisition changes, {result['n_films']} test films")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(result: dict, reports: Path) -> list[Path]:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "robustness.json").write_text(json.dumps(validate.json_safe(result), indent=2) + "\n")
    (reports / "robustness.md").write_text(markdown(result))
    return [reports / "robustness.json", reports / "robustness.md", plot(result, reports / "robustness.png")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="the run folder (its test split and reports/)")
    p.add_argument("--model", action="append", type=Path,
                   help="a .tflite to measure, named by its file's stem (repeatable; default: every "
                        ".tflite in the run's tflite/)")
    p.add_argument("--limit", type=int, help="only the first N test films")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200, help="AUC interval resamples (0: none)")
    p.add_argument("--exports", action="store_true",
                   help="also the full-size export stored as every kind of clinic file (PNG, JPEG, DICOM), and how "
                        "often the storage changes the referral decision")
    args = p.parse_args(argv)
    models = args.model or sorted((args.run / "tflite").glob("*.tflite"))
    if not models:
        p.error(f"no .tflite in {args.run / 'tflite'}: convert the run first, or name one with --model")
    result = measure(args.run, {m.stem: m for m in models}, limit=args.limit, seed=args.seed,
                     bootstrap=args.bootstrap, exports=args.exports)
    written = write_reports(result, args.run / "reports")
    print(markdown(result))
    print("written: " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
