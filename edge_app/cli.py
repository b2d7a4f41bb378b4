"""The device CLI: the app, and headless commands.

  python -m edge_app [app] [--model M] [--kiosk --pin PIN] [--size 800x480]   the Kivy app
  python -m edge_app predict IMAGE_OR_FOLDER... --model M [--json] [--csv FILE]
  python -m edge_app validate DIR_OR_CSV --model M [--out DIR] [--target-sensitivity S]
                              [--write-site-config [--site NAME]]
  python -m edge_app info --model M
  python -m edge_app bench --model M [--image IMAGE_OR_FOLDER...] [--runs N]

Folders are searched recursively for images (edge_app.inputs).

Never imports TensorFlow, never prints a traceback. `predict` prints every result it has, one
entry per image, whatever happened to the others. Exit codes (the highest that applies):

  0  every image was screened
  1  an image was refused (its entry names why: not_an_image, corrupt, ...); the others were screened
  2  the model could not be used (model_invalid, card_invalid, ...: at start, or on an image)
  3  an unexpected error (a bug): that image's entry is internal_error, its traceback is appended
     to $XDG_STATE_HOME/cxr-edge/errors.log (~/.local/state/cxr-edge/errors.log), not the screen
"""
from __future__ import annotations

import argparse
import json
import sys

from edge_app import decision, native_logs
from edge_app.errors import CxrEdgeError, InputError, ModelError, log_unexpected

EXIT_OK, EXIT_REFUSED, EXIT_MODEL, EXIT_INTERNAL = 0, 1, 2, 3
COMMANDS = ("app", "predict", "validate", "info", "bench")


def _classifier(args, **options):
    from edge_app.classifier import Classifier

    return Classifier(args.model, accelerator=args.accelerator, num_threads=args.threads,
                      gpu_delegate=args.gpu_delegate, **options)


def _inputs(paths) -> list[str]:
    """The images among files and folders; the files a folder holds that are not images are named
    on stderr."""
    from edge_app.inputs import collect

    images, skipped = collect(paths)
    for path in skipped:
        print(f"{path}\n  SKIPPED: not an image file (by its name or header)", file=sys.stderr)
    return images


def _write_csv(path, labels, results) -> None:
    """predict's results, one row per image (an image that could not be screened: its error)."""
    import csv

    columns = ["source", "label", *(f"p_{label}" for label in labels), "abnormal_probability",
               "threshold", "decision", "warning", "ood_score", "detail", "error_code", "error_message"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in results:
            error = r.get("error") or {}
            writer.writerow({**{k: r.get(k) for k in ("source", "label", "abnormal_probability", "threshold",
                                                      "decision", "warning", "ood_score", "detail")},
                             **{f"p_{label}": r.get("probabilities", {}).get(label) for label in labels},
                             "error_code": error.get("code"), "error_message": error.get("message")})


def _format(prediction) -> str:
    probs = "  ".join(f"{label} {p:6.1%}" for label, p in prediction.probabilities.items())
    likely = (f"no label: {decision.WARNING_SHORT[prediction.warning]}" if prediction.warning
              else f"most likely: {prediction.label}")
    return (f"{prediction.source}\n  {prediction.message.upper()}  (P(abnormal) {prediction.abnormal_probability:.3f}"
            f" vs threshold {prediction.threshold:.3f}; {likely})\n  {probs}\n"
            f"  {prediction.timings_ms['total']:.1f} ms on {prediction.backend}"
            f" (inference {prediction.timings_ms['inference']:.1f} ms)")


def cmd_predict(args) -> int:
    from edge_app.progress import progress

    images = _inputs(args.images)
    classifier = _classifier(args)
    results, status = [], EXIT_OK
    for image in progress(images, "screening") if args.json else images:
        try:
            prediction = classifier.predict(image)
        except Exception as exc:  # noqa: BLE001 - one image's failure must not lose the batch
            error, code = _image_error(exc, image)
            status = max(status, code)
            results.append({"source": image, "error": error})
            if not args.json:
                print(f"{image}\n  CANNOT SCREEN [{error['code']}]: {error['message']}", file=sys.stderr)
            continue
        results.append(prediction.to_dict())
        if not args.json:
            print(_format(prediction))
    if args.csv:
        _write_csv(args.csv, classifier.card.labels, results)
    if args.json:
        print(json.dumps({"model": classifier.info["model"], "model_sha256": classifier.model_sha256,
                          "threshold_note": classifier.threshold_note, "site": classifier.info["site"],
                          "results": results}, indent=2))
    else:
        print(f"Operating {classifier.threshold_note}.\nScreening aid, not a diagnosis.")
    return status


def _image_error(exc: Exception, image: str) -> tuple[dict, int]:
    """An image's error entry and exit status; an unexpected error is logged, not shown."""
    if isinstance(exc, InputError):
        return exc.as_dict(), EXIT_REFUSED
    if isinstance(exc, CxrEdgeError):
        return exc.as_dict(), EXIT_MODEL
    where = log_unexpected(exc, f"predict {image}")
    return {"code": "internal_error", "message": f"unexpected error {type(exc).__name__}: {exc} ({where})",
            "path": image}, EXIT_INTERNAL


def cmd_info(args) -> int:
    print(json.dumps(_classifier(args).info, indent=2))
    return 0


def cmd_bench(args) -> int:
    import statistics

    import numpy as np

    from edge_app.progress import progress

    images = _inputs(args.image) if args.image else []
    classifier = _classifier(args)
    if not images:  # a synthetic radiograph-sized input when no image is given
        rng = np.random.default_rng(0)
        image = rng.random((1024, 1024), dtype=np.float32)
    runs = args.runs or (len(images) if len(images) > 1 else 20)
    timings, unreadable = [], {}
    for i in progress(range(runs), "timing"):
        source = images[i % len(images)] if images else None
        if source in unreadable:
            continue
        try:
            p = classifier.predict(source) if source else classifier.predict_array(image)
        except CxrEdgeError as exc:
            unreadable[source] = exc.as_dict()
            print(f"{source}\n  CANNOT SCREEN [{exc.code}]: {exc.message}", file=sys.stderr)
            continue
        timings.append(p.timings_ms)
    if not timings:
        print("error: no image could be read, nothing was timed", file=sys.stderr)
        return 1
    summary = {stage: {"median_ms": statistics.median(t[stage] for t in timings),
                       "min_ms": min(t[stage] for t in timings), "max_ms": max(t[stage] for t in timings)}
               for stage in timings[0]}
    print(json.dumps({"model": str(classifier.model_path), "backend": classifier.backend.name,
                      "threads": args.threads, "runs": len(timings), "images": len(images) or None,
                      "unreadable": list(unreadable.values()), "stages": summary}, indent=2))
    return 1 if unreadable else 0


def cmd_validate(args) -> int:
    from edge_app import site_config, validate

    if args.site and not args.write_site_config:
        print("error: --site names the site of --write-site-config", file=sys.stderr)
        return 2
    labelled, left_out = validate.read_labelled(args.images)   # layout errors before the model loads
    classifier = _classifier(args, use_site_config=False)       # measured at the model card's threshold
    target = (args.target_sensitivity if args.target_sensitivity is not None
              else classifier.card.thresholds.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    result = validate.validate(classifier, args.images, labelled, left_out,
                               target_sensitivity=target, bootstrap=args.bootstrap)
    paths = validate.write_reports(result, args.out)
    print(validate.text_summary(result))
    print("Reports: " + ", ".join(map(str, paths)))
    if args.write_site_config:
        site = validate.write_site_config(classifier, result, args.site)
        detail = ("" if site.detail_threshold is None else f"; low-detail threshold {site.detail_threshold:.4f}, "
                  f"the site's own, below the card's {classifier.card.thresholds['detail']:.4f}")
        print(f"Site config written: {site_config.path_for(classifier.model_path)} (threshold {site.threshold:.3f}"
              f"{detail}); predict and the app now use it.")
    return 1 if result["unreadable"] else 0


def cmd_app(args) -> int:
    from edge_app.app import run
    from edge_app.app.config import from_args

    try:
        cfg = from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (0 runs has no latency, 0 threads no runtime)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; given the `command` about to be parsed, the app's own arguments (and
    their imports) are only added when it is the app (or not known: help lists every command)."""
    p = argparse.ArgumentParser(prog="python -m edge_app", description="cxr-edge on the device (no TensorFlow).")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("app", help="the screening app (default when no command is given)")
    if command in (None, "app"):
        from edge_app.app.config import add_arguments

        add_arguments(sp)
    sp.set_defaults(func=cmd_app)

    def with_model(sp):
        sp.add_argument("--model", required=True, help=".tflite model exported by `python -m convert`")
        sp.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default="cpu",
                        help="auto/gpu try LiteRT's GPU accelerator first (default: cpu)")
        sp.add_argument("--threads", type=_at_least_one, default=2, help="CPU threads (default: 2)")
        sp.add_argument("--gpu-delegate", help="path of a TFLite GPU delegate library to load")
        return sp

    sp = with_model(sub.add_parser("predict", help="classify X-ray images"))
    sp.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--csv", metavar="FILE", help="also write the results to FILE as CSV")
    sp.set_defaults(func=cmd_predict)
    add_validate_parser(sub, with_model)
    with_model(sub.add_parser("info", help="model card, runtime and GPU status")).set_defaults(func=cmd_info)
    sp = with_model(sub.add_parser("bench", help="latency of each pipeline stage"))
    sp.add_argument("--image", nargs="+", help="image files or folders (default: a synthetic input)")
    sp.add_argument("--runs", type=_at_least_one, help="predictions timed, images taken in turn "
                    "(default: one per image of several, else 20)")
    sp.set_defaults(func=cmd_bench)
    for sp in sub.choices.values():
        sp.add_argument("--verbose", action="store_true", help=native_logs.VERBOSE_HELP)
    return p


DEFAULT_TARGET_SENSITIVITY = 0.95   # a model card that does not say what its threshold was set for


def add_validate_parser(sub, with_model) -> None:
    sp = with_model(sub.add_parser("validate", help="commissioning: the model's figures on a site's own "
                                   "labelled images"))
    sp.add_argument("images", help="a folder of class folders (normal/, pneumonia/, covid/ or their synonyms), "
                    "searched recursively, or a CSV of file,label[,group] (group: PA / AP, ward, room...: "
                    "figures per group too)")
    sp.add_argument("--out", default="validation", help="folder for validation.{json,md} and reliability.png")
    sp.add_argument("--target-sensitivity", type=_fraction,
                    help="the abnormal sensitivity the site threshold must reach on these images "
                         "(default: the one the model's own threshold was set for, its card's "
                         f"thresholds.target_sensitivity, else {DEFAULT_TARGET_SENSITIVITY})")
    sp.add_argument("--bootstrap", type=int, default=1000, help="resamples for the AUC and threshold intervals")
    sp.add_argument("--write-site-config", action="store_true",
                    help="store that threshold beside the model (M.site.json) for predict and the app")
    sp.add_argument("--site", help="the site's name in the site config (default: this device's host name)")
    sp.set_defaults(func=cmd_validate)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["app", *argv]
    args = parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    native_logs.quiet(args.verbose)
    try:
        return args.func(args)
    except ModelError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except CxrEdgeError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # noqa: BLE001 - a bug: logged with its traceback, not shown
        print(f"error [internal_error]: unexpected {type(exc).__name__}: {exc} "
              f"({log_unexpected(exc, ' '.join(argv))})", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
