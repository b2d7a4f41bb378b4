"""`load_dataset`: a folder in any supported layout -> a labelled, split, checked `Dataset`.

The steps: read the layout (`readers`) -> canonical labels, only the task's classes
(`labels`) -> splits per patient where missing (`splits`) -> every file opened with the
device's own decoder, so that training never meets an image the device could not read ->
every task class present in train, or a clear error.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from edge_app.errors import InputError
from edge_app.preprocess import MIN_SIDE, decode
from train.data.labels import TASKS, to_task
from train.data.readers import read_any
from train.data.records import SPLITS, Record
from train.data.splits import assign_splits

UNREADABLE_SHOWN = 10  # unreadable files listed by summary(); the report keeps them all


@dataclass
class IngestReport:
    """What ingestion left out, and why."""

    unreadable: list[tuple[str, str, str]] = field(default_factory=list)  # (path, code, message)
    dropped: dict[str, int] = field(default_factory=dict)   # reason -> images
    counts: dict[str, int] = field(default_factory=dict)    # images left after each step, in order


@dataclass
class Dataset:
    records: list[Record]
    task: str
    labels: tuple[str, ...]   # the task's classes, "normal" first; a model's outputs follow this order
    root: Path
    layout: str               # which reader read it (a key of readers.READERS)
    report: IngestReport = field(default_factory=IngestReport)

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, zeros included."""
        table = {split: dict.fromkeys(self.labels, 0) for split in SPLITS}
        for r in self.records:
            table[r.split][r.label] += 1
        return table

    def sources(self) -> dict[str, dict[str, int]]:
        """Images per source and class: a class drawn from one source lets a model learn the source."""
        table: dict[str, dict[str, int]] = {}
        for r in self.records:
            table.setdefault(r.source or "unknown", dict.fromkeys(self.labels, 0))[r.label] += 1
        return dict(sorted(table.items()))

    def without_source(self, source: str) -> tuple["Dataset", list[Record]]:
        """(this dataset without `source` in any split, that source's images): leave-one-source-out,
        to measure what a model does at a hospital it has never seen."""
        known = self.sources()
        if source not in known:
            raise ValueError(f"no source {source!r} in {self.root}; sources: {', '.join(known)}")
        kept = [r for r in self.records if (r.source or "unknown") != source]
        held_out = [r for r in self.records if (r.source or "unknown") == source]
        rest = Dataset(kept, self.task, self.labels, self.root, self.layout, self.report)
        _check_classes(rest, f"without source {source!r}")
        return rest, held_out

    def fingerprint(self) -> str:
        """sha256 of (path relative to root, label, split, file size) of every image, sorted.

        The same files, labels and splits give the same fingerprint on any machine.
        """
        rows = sorted(f"{Path(os.path.relpath(r.path, self.root)).as_posix()}\t{r.label}\t{r.split}\t"
                      f"{r.path.stat().st_size}\n" for r in self.records)
        return hashlib.sha256("".join(rows).encode()).hexdigest()

    def summary(self) -> str:
        counts = self.counts()
        by_split = [[split, *counts[split].values(), sum(counts[split].values())] for split in SPLITS]
        by_split.append(["total", *(sum(column) for column in zip(*(row[1:] for row in by_split)))])
        lines = [f"{self.root} ({self.layout}), task {self.task}: {len(self.records)} images",
                 _table(["split", *self.labels, "total"], by_split), "",
                 _table(["source", *self.labels], [[s, *n.values()] for s, n in self.sources().items()])]
        if self.report.dropped:
            lines += ["", f"dropped {sum(self.report.dropped.values())} images:"]
            lines += [f"  {reason}: {n}" for reason, n in self.report.dropped.items()]
        if self.report.unreadable:
            lines += ["", f"unreadable, left out: {len(self.report.unreadable)} images:"]
            lines += [f"  {path}: {code}: {message}"
                      for path, code, message in self.report.unreadable[:UNREADABLE_SHOWN]]
            if len(self.report.unreadable) > UNREADABLE_SHOWN:
                lines.append(f"  ... and {len(self.report.unreadable) - UNREADABLE_SHOWN} more")
        return "\n".join(lines)


def _table(header: list[str], rows: list[list]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                     for row in cells)


def _readable(records: list[Record], decode_all: bool, progress: bool):
    """(records whose file is readable, [(path, code, message)] of the others).

    Without `decode_all` only existence is checked (cheap); with it every file is decoded at
    a reduced JPEG scale, which still reads all of its data.
    """
    readable, unreadable = [], []
    for record in tqdm(records, desc="checking images", unit="img", disable=not (progress and decode_all)):
        try:
            if decode_all:
                decode(record.path, draft_size=MIN_SIDE)
            elif not record.path.is_file():
                raise InputError("not_found", "no such file", record.path)
        except InputError as e:
            unreadable.append((str(record.path), e.code, e.message))
        else:
            readable.append(record)
    return readable, unreadable


def _check_classes(dataset: Dataset, where: str = "") -> None:
    counts = dataset.counts()
    for cls in dataset.labels:
        if counts["train"][cls] == 0:
            missing = "no images" if not any(counts[s][cls] for s in SPLITS) else "no training images"
            raise ValueError(f"class {cls!r} has {missing} in {dataset.root}{' ' + where if where else ''}; task {dataset.task!r} "
                             f"needs {', '.join(dataset.labels)}. Found:\n{dataset.summary()}")


def load_dataset(root: str | Path, task: str = "3class", seed: int = 42, check_readable: bool = True,
                 progress: bool = True) -> Dataset:
    """Read, label, split and check the dataset at `root` (see the module docstring).

    `seed` only affects records that come without a split. With `check_readable=False` files are
    only checked to exist (fast); unreadable files are left out and listed in `report.unreadable`.
    """
    root = Path(root).resolve()
    layout, found = read_any(root)
    records, dropped = to_task(found, task)
    records = assign_splits(records, seed)
    readable, unreadable = _readable(records, check_readable, progress)
    report = IngestReport(unreadable=unreadable, dropped=dict(sorted(dropped.items())),
                          counts={"found": len(found), "in task": len(records), "readable": len(readable)})
    dataset = Dataset(readable, task, TASKS[task], root, layout, report)
    _check_classes(dataset)
    return dataset
