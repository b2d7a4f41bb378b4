"""The run folder is the contract: a run's images and splits, written once by training
(`splits.csv` beside `model_card.json`) and read back by conversion, adaptation and the
benchmarks through `load`, so that every stage sees the same images in the same splits without
re-reading the data folder or re-drawing its splits.

`splits.csv` holds one row per image: its path relative to the data root, label, split (`train`,
`val`, `test`, or `holdout` for a held-out source), source, patient id, label and view (projection) as
the source gave them (files written before views were recorded have no view column: read as unknown).
The data root is the model card's `dataset.root`, relative to the run folder (a card is embedded in
every shipped model: it names no folder of the build machine); a run copied elsewhere reads its images
from a data folder given with `data_root`.

A run trained before runs recorded their splits gets its `splits.csv` once with

    python -m train.data.run_splits artifacts/RUN [--data-root DIR]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

from edge_app.model_card import ModelCard
from train.config import TrainConfig
from train.data import sources
from train.data.dataset import Dataset, load_dataset
from train.data.records import SPLITS, Record

SPLITS_FILE = "splits.csv"
HOLDOUT = "holdout"
COLUMNS = ("path", "label", "split", "source", "patient_id", "orig_label")   # required; "view" is written too
MISSING_SHOWN = 5


def relative_to_run(folder: str | Path, run_dir: str | Path) -> str:
    """A folder as the run's model card names it: relative to the run folder (the card is embedded
    in every shipped model: it holds no absolute path of the build machine)."""
    return Path(os.path.relpath(Path(folder).resolve(), Path(run_dir).resolve())).as_posix()


def write(run_dir: str | Path, dataset: Dataset, held_out: list[Record] = ()) -> Path:
    """`splits.csv` of the dataset's records (and a held-out source's, as split `holdout`), in order."""
    path = Path(run_dir) / SPLITS_FILE
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow((*COLUMNS, "view"))
        for r in [*dataset.records, *(dataclasses.replace(h, split=HOLDOUT) for h in held_out)]:
            writer.writerow([Path(os.path.relpath(r.path, dataset.root)).as_posix(), r.label, r.split,
                             r.source or "", r.patient_id or "", r.orig_label, r.view])
    return path


def load(run_dir: str | Path, data_root: str | Path | None = None) -> tuple[Dataset, list[Record]]:
    """(the run's dataset: its train, val and test records; a held-out source's records) as
    training split them. `data_root` overrides the card's data root (a run moved elsewhere)."""
    run_dir = Path(run_dir)
    path = run_dir / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {SPLITS_FILE}: the run was trained before runs recorded "
                                f"their splits; write it with `python -m train.data.run_splits {run_dir}`")
    card = ModelCard.from_json((run_dir / "model_card.json").read_text())
    root = Path(data_root) if data_root is not None else run_dir / card.dataset["root"]
    root = root.resolve()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(COLUMNS) - set(rows[0]):
        raise ValueError(f"{path}: not a splits file (wants the columns {', '.join(COLUMNS)})")
    records = [Record(root / row["path"], row["label"], row["split"], row["patient_id"] or None,
                      row["source"] or None, row["orig_label"], row.get("view") or "") for row in rows]
    unknown = {r.split for r in records} - {*SPLITS, HOLDOUT} | {r.label for r in records} - set(card.labels)
    if unknown:
        raise ValueError(f"{path}: unknown splits or labels {sorted(unknown)} (labels: {', '.join(card.labels)})")
    missing = [str(r.path) for r in records if not r.path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(records)} images of {path} are not under {root} (e.g. "
            f"{', '.join(missing[:MISSING_SHOWN])}): give the run's data folder with --data-root")
    dataset = Dataset([r for r in records if r.split != HOLDOUT], card.task, card.labels, root, SPLITS_FILE)
    return dataset, [r for r in records if r.split == HOLDOUT]


def recover(run_dir: str | Path, data_root: str | Path | None = None) -> Path:
    """`splits.csv` of a run trained before runs recorded their splits: its data folder split again
    as training split it (the card's seed and held-out source), refused unless the result has the
    card's dataset fingerprint."""
    run_dir = Path(run_dir)
    card = ModelCard.from_json((run_dir / "model_card.json").read_text())
    seed = card.dataset["seed"] if "seed" in card.dataset else TrainConfig.from_file(run_dir / "config.json").seed
    dataset = load_dataset(data_root or run_dir / card.dataset["root"], task=card.task, seed=seed)
    held_out = []
    if card.dataset.get("holdout_source"):
        dataset, held_out = dataset.without_source(sources.resolve(card.dataset["holdout_source"]))
    if dataset.fingerprint() != card.dataset.get("fingerprint"):
        raise ValueError(f"{dataset.root} is not the data {run_dir} was trained on (its fingerprint differs "
                         "from the model card's): its splits cannot be recovered")
    return write(run_dir, dataset, held_out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.data.run_splits", description="Writes splits.csv for a "
                                "run trained before runs recorded their splits.")
    p.add_argument("run", type=Path, help="the run folder")
    p.add_argument("--data-root", type=Path, help="its data folder (default: the model card's)")
    args = p.parse_args(argv)
    if (args.run / SPLITS_FILE).exists():
        print(f"error: {args.run / SPLITS_FILE} exists: a run's splits are written once", file=sys.stderr)
        return 1
    try:
        print(f"wrote {recover(args.run, args.data_root)}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
