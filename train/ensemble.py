"""python -m train.ensemble RUN RUN ... : what a small ensemble of trained runs would score, from the
runs' saved logits (reports/predictions.npz): no image is read and no model is run again.

The ensemble averages the members' calibrated probabilities (each member at its own temperature).
Its temperature and operating threshold are then fitted on val exactly as training fits a single
model's (`train.evaluate.calibrate`), and its figures on test and on a held-out source come from the
functions that write a run's reports/metrics.json, so its row compares like with like with its
members' rows (read from their metrics.json). Members must share their splits: seeds of one recipe,
or of one held-out source. An ensemble costs its members' inference time on the device: judge it
only if it helps where a single model fails (the held-out source), by more than the seeds' spread.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_app import decision
from train import evaluate
from train.compare import FIGURES, _fmt, _get
from train.config import TrainConfig
from train.data import run_splits

SPLITS = ("val", "test", run_splits.HOLDOUT)


def _member(run: Path) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """A run's calibrated probabilities and records, by split."""
    predictions = np.load(run / "reports" / "predictions.npz")
    temperature = json.loads((run / "model_card.json").read_text())["temperature"]
    dataset, held_out = run_splits.load(run)
    records = {**{s: dataset.split(s) for s in ("val", "test")}, run_splits.HOLDOUT: held_out}
    probs = {s: decision.calibrated_probabilities(predictions[f"{s}_logits"], temperature)
             for s in SPLITS if f"{s}_logits" in predictions.files}
    return probs, {s: records[s] for s in probs}


def ensemble_metrics(runs: list[Path]) -> dict:
    """metrics.json's figures (val, test, holdout) of the runs' averaged probabilities."""
    members = [_member(run) for run in runs]
    records = members[0][1]
    for run, (_, other) in zip(runs[1:], members[1:]):
        if {s: [r.path for r in rs] for s, rs in other.items()} != {s: [r.path for r in rs] for s, rs in records.items()}:
            raise ValueError(f"{run} has other splits than {runs[0]}: an ensemble's members share their splits")
    labels = json.loads((runs[0] / "model_card.json").read_text())["labels"]
    config = TrainConfig.from_file(runs[0] / "config.json")
    # log of the mean probability: logits whose softmax is the ensemble's probability
    logits = {s: np.log(np.clip(np.mean([m[0][s] for m in members], axis=0), 1e-12, 1.0)) for s in records}
    y = {s: np.array([labels.index(r.label) for r in records[s]]) for s in records}
    results = evaluate.refitted_metrics(logits, y, records, labels, config)
    return {**results, "members": [str(r) for r in runs]}


def table(runs: list[Path], ensemble: dict) -> str:
    columns = ("model",) + tuple(name for name, _ in FIGURES)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows = [(run.name, json.loads((run / "reports" / "metrics.json").read_text())) for run in runs]
    rows.append((f"ensemble of {len(runs)}", ensemble))
    for name, metrics in rows:
        lines.append("| " + " | ".join([name] + [_fmt(_get(metrics, path)) for _, path in FIGURES]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ensemble", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="also write the ensemble's figures here")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("an ensemble needs at least two runs")
    missing = [str(r) for r in args.runs if not (r / "reports" / "predictions.npz").is_file()]
    if missing:
        print(f"error: no reports/predictions.npz (not a finished training run): {', '.join(missing)}",
              file=sys.stderr)
        return 2
    try:
        ensemble = ensemble_metrics(args.runs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(args.runs, ensemble))
    if args.json:
        args.json.write_text(json.dumps(ensemble, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
