"""python -m train.tta RUN ... [--margins 0.05 0.1 0.15]: what test-time augmentation over the lung
crop would score, for runs whose preprocessing crops to the lung field.

Every image of the run's val, test and held-out splits is cropped once per margin around the lungs'
box (the run's InputSpec with `lung_margin` changed, its segmenter unchanged: the views a device
could make from one decoded image), the run's Keras model scores each view, and the views' logits
are averaged. Temperature and operating threshold are then refitted on val as training fits them
(`train.evaluate.refitted_metrics`), so each row compares like with like with the run's own
(reports/metrics.json), and with each single view's. A device would run the classifier once per
view: judge the gain against that cost and against the spread of seeds. Writes reports/tta.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from train import evaluate
from train.compare import FIGURES, _fmt, _get
from train.data import run_splits
from train.data.records import label_indices
from train.pipeline import lung_refusals
from train.trainer import load_run

DEFAULT_MARGINS = (0.05, 0.10, 0.15)


def view_logits(run: Path, margins, *, progress: bool = True) -> tuple[dict, dict, dict, list, object]:
    """(logits by margin and split, labels by split, records by split, class names, TrainConfig)."""
    model, card, config = load_run(run)
    if card.input.lung_crop == "none":
        raise ValueError(f"{run} does not crop to the lung field: there are no lung-crop views to average")
    dataset, held_out = run_splits.load(run)
    records = {"val": dataset.split("val"), "test": dataset.split("test")}
    if held_out:
        records[run_splits.HOLDOUT] = held_out
    # a film today's lung step refuses (a run trained before a check was added kept it) is left out of
    # every view alike: the refusal comes before the margin, and the device would not score it
    refused = {r["file"] for r in lung_refusals([r for recs in records.values() for r in recs], card.input,
                                                progress=progress)}
    if refused:
        print(f"{run}: {len(refused)} films refused by the lung step are left out: {', '.join(sorted(refused))}")
        records = {split: [r for r in recs if str(r.path) not in refused] for split, recs in records.items()}
    logits = {}
    for margin in margins:
        spec = dataclasses.replace(card.input, lung_margin=margin)
        logits[margin] = {}
        for split, recs in records.items():
            x, y, _ = evaluate.load_split(recs, card.labels, spec, desc=f"{split}, margin {margin:g}", progress=progress)
            logits[margin][split] = evaluate.predict(model, x, y, spec)
    y = {split: label_indices(recs, card.labels) for split, recs in records.items()}
    return logits, y, records, list(card.labels), config


def tta_metrics(run: Path, margins, *, progress: bool = True) -> dict:
    """metrics.json's figures of each single view and of the views averaged, each refitted on val."""
    logits, y, records, labels, config = view_logits(run, margins, progress=progress)
    rows = {f"margin {m:g}": evaluate.refitted_metrics(logits[m], y, records, labels, config) for m in margins}
    averaged = {split: np.mean([logits[m][split] for m in margins], axis=0) for split in records}
    rows[f"mean of {len(margins)} views"] = evaluate.refitted_metrics(averaged, y, records, labels, config)
    return {"run": str(run), "margins": list(margins), "trained_margin": float(config.lung_margin), "rows": rows}


def table(results: list[dict]) -> str:
    columns = ("run", "model") + tuple(name for name, _ in FIGURES)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        run = Path(result["run"])
        own = json.loads((run / "reports" / "metrics.json").read_text())
        for name, metrics in [(f"as trained (margin {result['trained_margin']:g})", own), *result["rows"].items()]:
            lines.append("| " + " | ".join([run.name, name] + [_fmt(_get(metrics, path)) for _, path in FIGURES]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tta", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--margins", nargs="+", type=float, default=list(DEFAULT_MARGINS),
                   help="lung-crop margins of the views (default: 0.05 0.1 0.15)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if len(args.margins) < 2:
        p.error("test-time augmentation needs at least two views (--margins)")
    results = []
    for run in args.runs:
        try:
            result = tta_metrics(run, args.margins, progress=args.progress)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        (run / "reports" / "tta.json").write_text(json.dumps(result, indent=2))
        results.append(result)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
