"""Classes onto tasks: the records a task trains on (the label synonyms: edge_app.labels)."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from edge_app.labels import TASKS, canonical_label
from train.data.records import Record


def to_task(records: list[Record], task: str) -> tuple[list[Record], Counter]:
    """Records relabelled with their canonical class and kept only if the task has it.

    `label` comes in raw (as the reader found it) and goes out canonical. Returns the kept
    records and the dropped ones counted by reason.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    kept, dropped = [], Counter()
    for record in records:
        cls = canonical_label(record.label, where=f"{record.path}, source {record.source}")
        if cls is None:
            dropped[f"excluded label: {record.label}"] += 1
        elif cls not in TASKS[task]:
            dropped[f"class not in task: {cls}"] += 1
        else:
            kept.append(replace(record, label=cls))
    return kept, dropped
