"""python -m train.compare artifacts/RUN ... : the headline figures of several runs as Markdown tables.

One row per run, then (`--by-recipe`, the default when runs repeat a recipe with other seeds) one
row per recipe: the mean ± sd and the range over its seeds, so that a choice between recipes rests
on a difference larger than the run-to-run noise.

`--at-val-specificity 0.95`: also each held-out run's figure at the threshold that gives that
specificity on val, from its saved logits. Each run's own operating threshold mixes how well a recipe
ranks an unseen source with where its threshold fell; at one in-distribution specificity for all,
recipes compare on the first.

`--target-sensitivity 0.95 0.97`: each run's test, adult-cohort and held-out figures with its operating
threshold refitted on val for each target (after class offsets fitted on val), as training fits it:
what the choice of `target_sensitivity` trades, in distribution and on an unseen source.

`--plot FILE.png`: the per-recipe figures drawn, each seed a dot and the recipe's mean a bar.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dataclasses import asdict

import numpy as np

from edge_app import decision, metrics

from edge_app.preprocess import LUNG_MARGIN
from train.config import TrainConfig
from train.report import interval

COLUMNS = ("run", "model", "size", "strategy", "seed", "shortcut measures", "macro-F1", "abn. sens.", "abn. spec.",
           "abn. AUC", "COVID sens.", "ECE", "adult pneumonia sens.", "adult normal spec.", "train min",
           "holdout sens.", "holdout spec.", "holdout AUC", "holdout AUC vs test", "holdout OOD flagged")
SHORTCUTS_OFF = {"input_contrast": "none", "input_borders": "keep", "crop_scale": 1.0, "gamma": 0.0,
                 "contrast_curve": 0.0, "blur": 0.0, "sharpen": 0.0, "noise": 0.0, "min_resolution": 1.0,
                 "jpeg_quality": 0, "source_weight_power": 0.0,
                 "label_smoothing": 0.0, "mixup": 0.0, "lung_crop": "none", "lung_margin": LUNG_MARGIN,
                 "augment_before_contrast": False, "weight_average": 0.0, "mixstyle": 0.0,
                 "erase": 0.0, "sharpness_aware": 0.0, "amplitude_mix": 0.0,
                 "group_dro": 0.0, "consistency": 0.0}
# what a recipe is: the config without the settings that only say which repetition or where
NOT_RECIPE = ("seed", "data", "weights_dirs")
# the figures averaged over seeds: (column, path into reports/metrics.json)
FIGURES = (("macro-F1", ("test", "macro_f1")), ("abn. sens.", ("test", "abnormal", "sensitivity")),
           ("abn. spec.", ("test", "abnormal", "specificity")), ("abn. AUC", ("test", "abnormal", "auc")),
           ("COVID sens.", ("test", "covid", "sensitivity")),
           ("adult pneumonia sens.", ("test", "cohorts", "adult pneumonia", "value")),
           ("adult normal spec.", ("test", "cohorts", "adult normal", "value")),
           ("holdout sens.", ("holdout", "abnormal", "sensitivity")),
           ("holdout spec.", ("holdout", "abnormal", "specificity")), ("holdout AUC", ("holdout", "abnormal", "auc")),
           # a one-class held-out source ranked against the test split's other side (evaluate.holdout_auc_against_test)
           ("holdout AUC vs test", ("holdout", "abnormal", "auc_against_test", "auc")))


def measures(config: dict) -> str:
    """The measures against shortcuts a run had switched on (configs/shortcuts/)."""
    on = [f"{k} {config[k]}" for k, off in SHORTCUTS_OFF.items() if config.get(k, off) != off]
    if config.get("source_adversary"):           # a run saved before the confusion mode was trained by reversal
        on.append(f"source adversary {config['source_adversary']} by {config.get('source_adversary_mode', 'reversal')}")
    if config.get("lung_crop", "none") != "none" and config.get("lung_model"):
        on.append(f"segmenter {config['lung_model']}")      # which one found the lungs to crop to
    return ", ".join(on) or "none"


def _get(d: dict, path) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return None if d is None or d != d else float(d)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def load(run: Path) -> tuple[dict, dict, dict]:
    return tuple(json.loads(p.read_text()) for p in
                 (run / "reports" / "metrics.json", run / "config.json", run / "model_card.json"))


def row(run: Path) -> list[str]:
    metrics, config, card = load(run)
    cohorts = metrics["test"].get("cohorts", {})
    cohort = lambda name: interval(cohorts[name]) if name in cohorts else "—"
    flagged = metrics.get("ood", {}).get("flagged", {}).get("holdout")
    f = lambda *path: _fmt(_get(metrics, path))
    return [run.name, card["name"], str(card["input"]["size"]), config["strategy"], str(config["seed"]), measures(config),
            f("test", "macro_f1"), f("test", "abnormal", "sensitivity"), f("test", "abnormal", "specificity"),
            f("test", "abnormal", "auc"), f("test", "covid", "sensitivity"), f("test", "ece"),
            cohort("adult pneumonia"), cohort("adult normal"), f"{metrics['training_seconds'] / 60:.1f}",
            f("holdout", "abnormal", "sensitivity"), f("holdout", "abnormal", "specificity"),
            f("holdout", "abnormal", "auc"), f("holdout", "abnormal", "auc_against_test", "auc"), _fmt(flagged)]


def recipe(config: dict) -> str:
    """A recipe's key: its config, settings it lacks at their defaults (a run saved before a setting
    existed trained with its default), without seed and paths (runs of one recipe differ only in seed)."""
    full = asdict(TrainConfig.from_dict(config, saved_run=True))
    return json.dumps({k: v for k, v in full.items() if k not in NOT_RECIPE}, sort_keys=True)


def mean_sd_range(values: list[float]) -> str:
    """'0.912 ± 0.008 (0.903–0.921)', or the value alone for one run."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
            f"({min(values):.3f}–{max(values):.3f})")


def by_recipe(runs: list[Path]) -> dict[str, list[Path]]:
    """The runs grouped by recipe (its key: `recipe`), in the order given."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        groups.setdefault(recipe(load(run)[1]), []).append(run)
    return groups


def recipe_table(runs: list[Path]) -> str:
    groups = by_recipe(runs)
    columns = ("runs", "seeds", "shortcut measures") + tuple(name for name, _ in FIGURES)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for members in groups.values():
        loaded = [load(r) for r in members]
        cells = [", ".join(r.name for r in members), str(len(members)), measures(loaded[0][1])]
        cells += [mean_sd_range([v for m, _, _ in loaded if (v := _get(m, path)) is not None])
                  for _, path in FIGURES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_label(run: Path, config: dict) -> str:
    """A recipe's name in a plot: its runs' folder and the source it held out."""
    held_out = config.get("holdout_source")
    return run.parent.name + (f", {held_out} held out" if held_out else "")


def recipe_plot(runs: list[Path], path: Path) -> None:
    """One panel per figure of FIGURES that any run has, one row per recipe: each seed's value a dot,
    their mean a bar, so a difference larger than the seeds' spread shows at a glance."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[Path, dict, dict]]] = {}
    for run in runs:
        run_metrics, config, _ = load(run)
        groups.setdefault(recipe(config), []).append((run, run_metrics, config))
    labels = []
    for members in groups.values():
        label = f"{recipe_label(members[0][0], members[0][2])} ({len(members)})"
        labels.append(label if label not in labels else f"{label} #{len(labels) + 1}")
    values = {name: [[v for _, m, _ in members if (v := _get(m, figure)) is not None] for members in groups.values()]
              for name, figure in FIGURES}
    shown = [name for name in values if any(values[name])]
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, sharey=True, squeeze=False,
                             figsize=(2.6 * columns + 3.0, rows * (0.3 * len(labels) + 0.9) + 0.5))
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, shown):
        for row, seeds in enumerate(values[name]):
            if seeds:
                ax.scatter(seeds, [row] * len(seeds), s=14, color="tab:blue", alpha=0.7)
                ax.plot([statistics.mean(seeds)] * 2, [row - 0.3, row + 0.3], color="black", lw=1.5)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Each seed's run (dots) and the recipe's mean (bar); test split, and (holdout) the source held out",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: list[Path]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(run)) + " |" for run in runs]
    return "\n".join(lines)


def holdout_at_val_specificity(run: Path, specificity: float) -> dict | None:
    """The held-out source's sensitivity (all abnormal) or specificity (all normal) at the threshold
    that gives `specificity` on the run's val normals; None for a run without a one-class held-out source."""
    path = run / "reports" / "predictions.npz"
    if not path.is_file():
        return None
    saved = np.load(path)
    if "holdout_logits" not in saved.files:
        return None
    temperature = json.loads((run / "model_card.json").read_text())["temperature"]
    score = lambda split: decision.abnormal_probability(
        decision.calibrated_probabilities(saved[f"{split}_logits"], temperature))
    threshold = float(np.quantile(score("val")[saved["val_labels"] == 0], specificity))
    held, abnormal = score("holdout"), saved["holdout_labels"] != 0
    if abnormal.all():
        return {"threshold": threshold, "sensitivity": float((held >= threshold).mean())}
    if not abnormal.any():
        return {"threshold": threshold, "specificity": float((held < threshold).mean())}
    return None


def at_specificity_table(runs: list[Path], specificity: float) -> str:
    lines = [f"| run | threshold at val specificity {specificity:.2f} | held-out sens. | held-out spec. |",
             "|---|---|---|---|"]
    for run in runs:
        m = holdout_at_val_specificity(run, specificity)
        if m is not None:
            lines.append(f"| {run.parent.name}/{run.name} | {m['threshold']:.3f} | {_fmt(m.get('sensitivity'))} | "
                         f"{_fmt(m.get('specificity'))} |")
    return "\n".join(lines)


def class_offsets_effect(run: Path) -> dict:
    """A run's test figures (and held-out rate) as trained, and with class offsets fitted on its val
    logits (edge_app.metrics.fit_class_offsets), the temperature and the threshold then refitted on
    val as training fits them (threshold rule "overall"): what class_prior_correction does, measured
    on a run trained before it existed. A run trained with it changes by ~nothing."""
    saved, card = np.load(run / "reports" / "predictions.npz"), json.loads((run / "model_card.json").read_text())
    target = card["thresholds"]["target_sensitivity"]
    y = {split: saved[f"{split}_labels"] for split in ("val", "test", "holdout") if f"{split}_labels" in saved.files}
    offsets = metrics.fit_class_offsets(saved["val_logits"], y["val"])
    result = {"offsets": offsets}
    for name, shift in (("as trained", 0.0), ("class offsets", offsets)):
        logits = {split: saved[f"{split}_logits"] + shift for split in y}
        temperature = card["temperature"] if name == "as trained" else metrics.fit_temperature(logits["val"], y["val"])
        probs = {split: decision.calibrated_probabilities(z, temperature) for split, z in logits.items()}
        score = {split: decision.abnormal_probability(p) for split, p in probs.items()}
        threshold = (card["thresholds"]["abnormal"] if name == "as trained"
                     else metrics.threshold_for_sensitivity(y["val"] != 0, score["val"], target))
        test = metrics.screening_metrics(logits["test"], y["test"], card["labels"], temperature=temperature,
                                         threshold=threshold)
        covid = card["labels"].index("covid") if "covid" in card["labels"] else None   # not in the binary tasks
        figures = {"macro-F1": test["macro_f1"], "normal recall": test["per_class"]["normal"]["recall"],
                   "abn. sens.": test["abnormal"]["sensitivity"], "abn. spec.": test["abnormal"]["specificity"]}
        if covid is not None:
            figures.update({"COVID sens.": test["per_class"]["covid"]["recall"],
                            "COVID prec.": test["per_class"]["covid"]["precision"]})
        if "holdout" in y:
            abnormal = y["holdout"] != 0
            flagged = score["holdout"] >= threshold
            figures["holdout referred" if abnormal.all() else "holdout not referred"] = float(
                flagged.mean() if abnormal.all() else (~flagged).mean())
            if covid is not None:
                figures["holdout labelled COVID"] = float((probs["holdout"].argmax(axis=1) == covid).mean())
        result[name] = figures
    return result


def class_offsets_table(runs: list[Path]) -> str:
    effects = {run: class_offsets_effect(run) for run in runs if (run / "reports" / "predictions.npz").is_file()}
    names = list(dict.fromkeys(k for e in effects.values() for k in e["as trained"]))
    lines = ["| run | offsets | " + " | ".join(f"{n}: as trained → offsets" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for run, e in effects.items():
        cells = [f"{_fmt(e['as trained'].get(n))} → {_fmt(e['class offsets'].get(n))}" for n in names]
        lines.append(f"| {run.parent.name}/{run.name} | " + " ".join(f"{x:+.2f}" for x in e["offsets"][1:])
                     + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_target_sensitivity(run: Path, target: float) -> dict:
    """A run's figures (metrics.json's shape: test, holdout) with its temperature and operating
    threshold refitted on val for `target` abnormal sensitivity by the run's own threshold rule,
    after class offsets fitted on val (which change nothing for a run trained with them), from its
    saved logits: no image is read."""
    from train import evaluate
    from train.data import run_splits

    saved = np.load(run / "reports" / "predictions.npz")
    labels = json.loads((run / "model_card.json").read_text())["labels"]
    config = TrainConfig.from_file(run / "config.json")
    dataset, held_out = run_splits.load(run)
    records = {"val": dataset.split("val"), "test": dataset.split("test"), run_splits.HOLDOUT: held_out}
    splits = [s for s in records if f"{s}_logits" in saved.files]
    y = {s: saved[f"{s}_labels"] for s in splits}
    offsets = metrics.fit_class_offsets(saved["val_logits"], y["val"])
    logits = {s: saved[f"{s}_logits"] + offsets for s in splits}
    temperature, threshold = evaluate.calibrate(logits["val"], y["val"], records["val"], target, config.threshold_rule)
    results = {s: evaluate.split_metrics(logits[s], y[s], records[s], labels, temperature=temperature,
                                         threshold=threshold, bootstrap=0) for s in splits if s != "val"}
    return {**results, "threshold": threshold}


# abnormal films referred as stored that an acquisition clears without a warning; normal films not
# referred as stored that an acquisition refers without one (benchmarks.robustness.against_stored)
ROBUSTNESS_FIGURES = ("silently cleared", "needlessly referred")


def robustness(run: Path) -> dict | None:
    """The first variant of the run's reports/robustness.json (benchmarks.robustness): per figure of
    ROBUSTNESS_FIGURES, its worst acquisition and share; None for a run not measured."""
    path = run / "reports" / "robustness.json"
    variants = json.loads(path.read_text()).get("variants") if path.is_file() else None
    if not variants:
        return None
    name, measured = next(iter(variants.items()))
    return {"variant": name, **{figure: measured["worst"][figure.replace(" ", "_")] for figure in ROBUSTNESS_FIGURES}}


def robustness_table(runs: list[Path]) -> str:
    """Per run, then per recipe (mean ± sd over seeds): the worst acquisition's share of each figure."""
    measured = {run: m for run in runs if (m := robustness(run)) is not None}
    names = ROBUSTNESS_FIGURES
    lines = ["| run | variant | " + " | ".join(f"worst {n} (acquisition)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for run, m in measured.items():
        lines.append(f"| {run.parent.name}/{run.name} | {m['variant']} | " + " | ".join(
            f"{interval(m[n])} ({m[n]['acquisition'] or '—'})" for n in names) + " |")
    groups = {key: [measured[run] for run in members] for key, members in by_recipe(list(measured)).items()}
    lines += ["", "| recipe (shortcut measures) | runs | " + " | ".join(f"worst {n}" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for key, members in groups.items():
        lines.append(f"| {measures(json.loads(key))} | {len(members)} | " + " | ".join(
            mean_sd_range([m[n]["value"] for m in members if m[n]["value"] is not None]) for n in names) + " |")
    return "\n".join(lines)


TARGET_FIGURES = tuple((name, path) for name, path in FIGURES
                       if name in ("macro-F1", "abn. sens.", "abn. spec.", "COVID sens.", "adult pneumonia sens.",
                                   "adult normal spec.", "holdout sens.", "holdout spec."))


def target_sensitivity_table(runs: list[Path], targets: list[float]) -> str:
    """Per run and target, then per recipe and target (mean ± sd over seeds): what the threshold's target
    trades, with the seed noise beside it."""
    names = [name for name, _ in TARGET_FIGURES]
    refitted = {(run, target): at_target_sensitivity(run, target) for run in runs for target in targets}
    lines = ["| run | target (val) | threshold | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for (run, target), m in refitted.items():
        lines.append(f"| {run.parent.name}/{run.name} | {target:.2f} | {m['threshold']:.3f} | "
                     + " | ".join(_fmt(_get(m, path)) for _, path in TARGET_FIGURES) + " |")
    lines += ["", "| recipe | target (val) | runs | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for members in by_recipe(runs).values():
        label = recipe_label(members[0], load(members[0])[1])
        for target in targets:
            refits = [refitted[run, target] for run in members]
            lines.append(f"| {label} | {target:.2f} | {len(members)} | " + " | ".join(
                mean_sd_range([v for m in refits if (v := _get(m, path)) is not None]) for _, path in TARGET_FIGURES)
                + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--runs-only", action="store_true", help="only the table of runs, no per-recipe means")
    p.add_argument("--at-val-specificity", type=float, metavar="S",
                   help="also the held-out runs' figures at the threshold giving specificity S on val")
    p.add_argument("--class-offsets", action="store_true",
                   help="also each run's figures with class offsets fitted on its val logits (a run "
                        "trained before class_prior_correction: what the correction would change)")
    p.add_argument("--target-sensitivity", type=float, nargs="+", metavar="S",
                   help="also each run's figures with its threshold refitted on val for these target "
                        "sensitivities (after class offsets fitted on val)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="also the per-recipe figures as a plot: each seed a dot, the recipe's mean a bar")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "reports" / "metrics.json").is_file()]
    if missing:
        print(f"error: not a finished training run: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(args.runs))
    if not args.runs_only:
        print("\nPer recipe (mean ± sd over seeds, range in brackets; adult cohorts on the test split):\n")
        print(recipe_table(args.runs))
    if any(robustness(run) for run in args.runs):
        print("\nRobustness to acquisition (reports/robustness.json, benchmarks.robustness; worst acquisition per run, "
              "Wilson 95 % CI):\n")
        print(robustness_table(args.runs))
    if args.at_val_specificity is not None:
        print(f"\nHeld-out sources at one in-distribution specificity ({args.at_val_specificity:.2f} on val):\n")
        print(at_specificity_table(args.runs, args.at_val_specificity))
    if args.class_offsets:
        print("\nClass offsets fitted on val (temperature and threshold refitted after them), test split:\n")
        print(class_offsets_table(args.runs))
    if args.target_sensitivity:
        print("\nOperating threshold refitted on val for each target sensitivity (class offsets fitted on val first):\n")
        print(target_sensitivity_table(args.runs, args.target_sensitivity))
    if args.plot:
        recipe_plot(args.runs, args.plot)
        print(f"\nPlot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
