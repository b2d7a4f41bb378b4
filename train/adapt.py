"""Site adaptation: a trained run, fitted to a hospital's own images with few labels.

    python -m train adapt --run artifacts/RUN --data LOCAL_DIR --out artifacts/RUN-site

The local set is read like any dataset (its splits, or per-patient splits made for it). Its train
split fine-tunes the classifier head (and, asked for, the top backbone layers), mixed with as many of
the run's own training images ("replay", so the model does not forget the findings it learnt
elsewhere). The temperature and the operating threshold are then refitted on the local validation
images together with the run's validation split (a handful of local images cannot place a
sensitivity threshold on their own), the out-of-distribution score is refitted so that the site's
images count as familiar, and a before/after report compares the local test split and the run's
own test split. The result is a run folder like any other: `python -m convert` and the release
gates take it unchanged.

With several `--per-class` values it writes one adapted run per value and a learning curve.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge_app import decision, preprocess
from train import evaluate, ood
from train.report import figure
from train.config import AdaptConfig
from train.data import load_dataset, run_splits, sources
from train.data.dataset import Dataset
from train.data.records import Record
from train.pipeline import lung_refusals, make_dataset
from train.trainer import load_run, set_trainable

EVALUATED = ("local_test", "run_test")


def _local_dataset(data, task: str, cfg: AdaptConfig, progress: bool) -> Dataset:
    local = load_dataset(data, task=task, seed=cfg.seed, progress=progress)
    if cfg.sources:
        known = local.sources()
        wanted = [sources.resolve(s) for s in cfg.sources]   # short names (rsna-normal, ...) too
        missing = [s for s, repo in zip(cfg.sources, wanted) if repo not in known]
        if missing:
            raise ValueError(f"no source {missing} in {local.root}; sources: {', '.join(known)}")
        local = dataclasses.replace(local, records=[r for r in local.records if r.source in wanted])
    return local


def _draw(pool: list[Record], counts: dict[str, int], rng) -> list[Record]:
    """counts[label] records of each label from `pool` (all there are, if fewer), at random."""
    chosen = []
    for label, n in counts.items():
        of_class = [r for r in pool if r.label == label]
        chosen += [of_class[i] for i in sorted(rng.choice(len(of_class), min(n, len(of_class)), replace=False))]
    return chosen


def _per_class(records: list[Record], labels, n: int, rng) -> list[Record]:
    """At most n records of each class (all of them with n = 0)."""
    return _draw(records, dict.fromkeys(labels, n), rng) if n else list(records)


def _replay(local: list[Record], pool: list[Record], times: int, labels, rng) -> list[Record]:
    """`times` run-training images per local image, class by class, none repeated. A class the site has
    no images of gets as many as the site's classes have on average: a site that labelled only its
    normal films still fine-tunes on every class (else the head would learn that everything is normal)."""
    counts = {label: sum(r.label == label for r in local) for label in labels}
    present = [n for n in counts.values() if n]
    filler = round(sum(present) / len(present)) if present else 0
    return _draw(pool, {label: times * (n or filler) for label, n in counts.items()}, rng)


def _evaluate(model, card, sets: dict, temperature: float, threshold: float, bootstrap: int) -> dict:
    return {name: evaluate.split_metrics(evaluate.predict(model, x, y, card.input), y, records, card.labels,
                                         temperature=temperature, threshold=threshold, bootstrap=bootstrap)
            for name, (x, y, records) in sets.items()}


def _ood_flagged(model, spec, sets: dict, detector, threshold: float) -> dict[str, float]:
    """Share of each evaluated set that the out-of-distribution warning flags."""
    features = evaluate.pooled_features(model, spec, sets)
    return {name: float((ood.score(detector, f) > threshold).mean()) for name, f in features.items()}


def adapt(run_dir: str | Path, data: str | Path, out: str | Path, cfg: AdaptConfig | None = None,
          *, data_root: str | Path | None = None, progress: bool = True) -> dict:
    """Adapt the run in `run_dir` to the images in `data`; write the adapted run to `out`.
    `data_root`: the run's own data folder, where it is not where the model card says."""
    cfg = cfg or AdaptConfig()
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must be a new folder: adaptation never overwrites the run it starts from")
    model, card, config = load_run(run_dir)
    labels, spec = card.labels, card.input
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()   # the same site data gives the same adapted model
    rng = np.random.default_rng(cfg.seed)

    original, _ = run_splits.load(run_dir, data_root)
    local = _local_dataset(data, card.task, cfg, progress)
    refused = lung_refusals(local.records, spec, progress=progress)   # the device refuses them: as training,
    gone = {r["file"] for r in refused}                                 # neither fitted nor scored, but listed
    local = dataclasses.replace(local, records=[r for r in local.records if str(r.path) not in gone])
    local_fit = _per_class(local.split("train"), labels, cfg.per_class, rng)
    local_cal = _per_class(local.split("val"), labels, cfg.per_class, rng)
    local_paths = {r.path for r in local.records}     # the local set may share images with the run's
    replayed = _replay(local_fit, [r for r in original.split("train") if r.path not in local_paths],
                       cfg.replay, labels, rng)
    if not local_fit or not local.split("test"):
        raise ValueError(f"{local.root}: the local set needs train and test images; found\n{local.summary()}")

    def load(records, desc):
        return evaluate.load_split(records, labels, spec, desc=desc, progress=progress)

    sets = {"local_test": load(local.split("test"), "local test"),
            "run_test": load(original.split("test"), "run test")}
    calibration = [load(local_cal, "local val"), load(original.split("val"), "run val")]
    x_cal = np.concatenate([c[0] for c in calibration])
    y_cal = np.concatenate([c[1] for c in calibration])
    fit_records = local_fit + replayed
    x_fit, y_fit, _ = load(fit_records, "fine-tuning")

    before_temperature, before_threshold = card.temperature, card.thresholds["abnormal"]
    before_detail = card.thresholds.get("detail")
    before = _evaluate(model, card, sets, before_temperature, before_threshold, cfg.bootstrap)
    before_flagged = _ood_flagged(model, spec, sets, ood.OodModel.load(run_dir / "ood.npz"),
                                  card.thresholds["ood"])

    set_trainable(model, "finetune" if cfg.fine_tune_layers else "frozen", 2, cfg.fine_tune_layers)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(f"fine-tuning on {len(local_fit)} local + {len(replayed)} replayed images, {cfg.epochs} epochs")
    model.fit(make_dataset(x_fit, y_fit, spec, batch_size=cfg.batch_size, training=True, config=config,
                           seed=cfg.seed), epochs=cfg.epochs, verbose=1 if progress else 2)

    logits_cal = {"calibration": evaluate.predict(model, x_cal, y_cal, spec)}
    offsets = evaluate.correct_class_priors(model, logits_cal, y_cal, fit_on="calibration",   # the fine-tune's
                                            enabled=config.class_prior_correction)          # class mix moved the priors
    temperature, threshold = evaluate.calibrate(logits_cal["calibration"], y_cal,
                                                [r for c in calibration for r in c[2]],
                                                card.thresholds.get("target_sensitivity", config.target_sensitivity))
    after = _evaluate(model, card, sets, temperature, threshold, cfg.bootstrap)

    # the OOD score, refitted on the run's training images and the local ones
    features = evaluate.pooled_features(model, spec, {"train": load(original.split("train") + local_fit, "OOD fit"),
                                                      "cal": (x_cal, y_cal)})
    detector = ood.fit(features["train"])
    ood_threshold = ood.threshold(ood.score(detector, features["cal"]))
    after_flagged = _ood_flagged(model, spec, sets, detector, ood_threshold)

    out.mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    model.save(out / "model.keras")
    detector.save(out / "ood.npz")
    shutil.copy(run_dir / "config.json", out / "config.json")
    shutil.copy(run_dir / run_splits.SPLITS_FILE, out / run_splits.SPLITS_FILE)  # conversion gates on the run's splits
    counts = {"local_fit": _class_counts(local_fit, labels), "replayed": _class_counts(replayed, labels),
              "calibration_local": _class_counts(local_cal, labels), "calibration_run": len(original.split("val")),
              "local_test": _class_counts(local.split("test"), labels), "local_refused_by_lung_step": len(refused)}
    card.temperature = temperature
    card.thresholds = {**card.thresholds, "abnormal": threshold, "ood": ood_threshold,
                       **_site_detail(card.thresholds.get("detail"), calibration[0][0])}
    card.dataset = {**card.dataset, "root": run_splits.relative_to_run(original.root, out),   # folders relative to `out`
                    "adapted": {"from": run_splits.relative_to_run(run_dir, out),
                                "local_root": run_splits.relative_to_run(local.root, out),
                                "local_sources": cfg.sources, "counts": counts, "config": dataclasses.asdict(cfg)}}
    card.metrics = {**card.metrics, **evaluate.card_metrics(after["run_test"]),
                    "local_test_macro_f1": after["local_test"]["macro_f1"],
                    "local_test_abnormal_specificity": after["local_test"]["abnormal"]["specificity"]}
    card.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "model_card.json").write_text(card.to_json() + "\n")
    result = {"run": str(run_dir), "local": str(local.root), "config": dataclasses.asdict(cfg), "counts": counts,
              "before": {"temperature": before_temperature, "threshold": before_threshold,
                         "detail_threshold": before_detail, "ood_flagged": before_flagged, **before},
              "after": {"class_offsets": dict(zip(labels, offsets.tolist())),
                        "temperature": temperature, "threshold": threshold, "ood_threshold": ood_threshold,
                        "detail_threshold": card.thresholds.get("detail"),
                        "ood_flagged": after_flagged, **after}}
    (out / "reports" / "lung_refusals.json").write_text(json.dumps(refused, indent=2))
    (out / "reports" / "adapt.json").write_text(json.dumps(result, indent=2))
    (out / "reports" / "adapt.md").write_text(adapt_report(result, labels))
    print(f"adapted run saved to {out}\n" + adapt_report(result, labels))
    return result


def _site_detail(card_detail: float | None, site_squares: np.ndarray) -> dict:
    """{"detail": the site's own low-detail threshold} from its calibration squares, as commissioning
    sets it (decision.site_low_detail_threshold); {} where the card's stands."""
    site = decision.site_low_detail_threshold(card_detail, [preprocess.detail(s) for s in site_squares])
    return {} if site is None else {"detail": site}


def _class_counts(records, labels) -> dict[str, int]:
    return {label: sum(r.label == label for r in records) for label in labels}


ROWS = [("macro-F1", lambda m: m["macro_f1"]), ("abnormal sensitivity", lambda m: m["abnormal"]["sensitivity"]),
        ("abnormal specificity", lambda m: m["abnormal"]["specificity"]), ("abnormal AUC", lambda m: m["abnormal"]["auc"]),
        ("COVID-19 sensitivity", lambda m: m.get("covid", {}).get("sensitivity", float("nan"))),
        ("ECE", lambda m: m["ece"])]


def adapt_report(result: dict, labels) -> str:
    c = result["counts"]
    lines = ["# Site adaptation", "",
             f"From `{result['run']}` to the images of `{result['local']}`. Fine-tuned on "
             f"{sum(c['local_fit'].values())} local images ({_fmt_counts(c['local_fit'])}) and "
             f"{sum(c['replayed'].values())} of the run's own training images; temperature and threshold "
             f"refitted on {sum(c['calibration_local'].values())} local validation images "
             f"({_fmt_counts(c['calibration_local'])}) and the run's {c['calibration_run']} validation images."
             + (f" {c['local_refused_by_lung_step']} local images the lung step refuses (no plausible lung field: the "
                "device would refuse them) are left out (reports/lung_refusals.json)."
                if c.get("local_refused_by_lung_step") else ""), "",
             "| metric | local test before | local test after | run test before | run test after |",
             "|---|---|---|---|---|"]
    for name, get in ROWS:
        values = [get(result[when][split]) for split in EVALUATED for when in ("before", "after")]
        lines.append(f"| {name} | " + " | ".join(figure(v) for v in values) + " |")
    lines.append("| flagged unlike the training images | " + " | ".join(
        figure(result[when]["ood_flagged"][split]) for split in EVALUATED for when in ("before", "after")) + " |")
    lines += ["", f"Temperature {result['before']['temperature']:.3f} → {result['after']['temperature']:.3f}; "
              f"operating threshold {result['before']['threshold']:.4f} → {result['after']['threshold']:.4f}; "
              f"out-of-distribution threshold refitted ({result['after']['ood_threshold']:.1f})"
              + (f"; low-detail threshold {result['before']['detail_threshold']:.4f} → the site's own "
                 f"{result['after']['detail_threshold']:.4f}"
                 if result["after"].get("detail_threshold") != result["before"].get("detail_threshold") else "")
              + ".", ""]
    return "\n".join(lines)


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{n} {label}" for label, n in counts.items())


def learning_curve(run_dir, data, out, sizes: list[int], cfg: AdaptConfig | None = None,
                   *, data_root: str | Path | None = None, progress: bool = True) -> dict:
    """One adapted run per size (images per class) in `out/n<size>`, and the curve in `out/reports`."""
    cfg = cfg or AdaptConfig()
    out = Path(out)
    points = []
    for n in sizes:
        result = adapt(run_dir, data, out / f"n{n}", dataclasses.replace(cfg, per_class=n),
                       data_root=data_root, progress=progress)
        points.append({"per_class": n, "before": {s: result["before"][s] for s in EVALUATED},
                       "after": {s: result["after"][s] for s in EVALUATED}})
    curve = {"run": str(run_dir), "local": str(data), "config": dataclasses.asdict(cfg), "points": points}
    (out / "reports").mkdir(parents=True, exist_ok=True)
    (out / "reports" / "adaptation_curve.json").write_text(json.dumps(curve, indent=2))
    _plot_curve(points, out / "reports" / "adaptation_curve.png")
    table = ["| images per class | " + " | ".join(f"{s} {name}" for s in EVALUATED for name, _ in ROWS[:3]) + " |",
             "|---" * (1 + 3 * len(EVALUATED)) + "|"]
    table.append("| 0 (before) | " + " | ".join(figure(get(points[0]["before"][s])) for s in EVALUATED
                                                  for _, get in ROWS[:3]) + " |")
    table += [f"| {p['per_class']} | " + " | ".join(figure(get(p["after"][s])) for s in EVALUATED
                                                   for _, get in ROWS[:3]) + " |" for p in points]
    (out / "reports" / "adaptation_curve.md").write_text(
        "# Adaptation learning curve\n\n" + "\n".join(table) + "\n\n![curve](adaptation_curve.png)\n")
    print("\n".join(table))
    return curve


def _plot_curve(points, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [0] + [p["per_class"] for p in points]
    fig, axes = plt.subplots(1, len(EVALUATED), figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, EVALUATED):
        for name, get in ROWS[:3]:
            ax.plot(sizes, [get(points[0]["before"][split])] + [get(p["after"][split]) for p in points],
                    marker="o", label=name)
        ax.set_title(split.replace("_", " "))
        ax.set_xlabel("local images per class (0: before adaptation)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
