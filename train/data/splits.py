"""Train/val/test for records that come without one, patient by patient.

A patient's images are never split apart: a model that has seen one film of a patient would
be scored partly on recognising them. Records without a patient id are a group of their own.
Groups are stratified by class (their majority class) and shuffled with the seed; the same
records and seed give the same splits on any machine, in any order.

Records that have a split keep it. The one exception: a dataset with train but no val
(CoronaHack ships only TRAIN and TEST) has val carved out of its train-only patients.
"""
from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import replace

from train.data.records import Record


def _group_keys(records: list[Record]) -> list[tuple[str, str]]:
    """One key per record: its patient, or its own path relative to all the records' common folder.

    Relative, so that the keys, their order and thus the splits are the same wherever the data lives.
    """
    base = os.path.commonpath([str(r.path) for r in records])
    return [("patient", r.patient_id) if r.patient_id else ("file", os.path.relpath(r.path, base))
            for r in records]


def _majority(values) -> str:
    """The most common value; ties go to the first in sorted order, so input order does not matter."""
    return min(Counter(values).items(), key=lambda item: (-item[1], item[0]))[0]


def _sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Groups per split out of n: rounded fractions, but at least one each while train keeps one."""
    sizes: dict[str, int] = {}
    for split, fraction in fractions.items():
        room = n - 1 - sum(sizes.values())
        wanted = max(round(n * fraction), 1 if fraction > 0 else 0)
        sizes[split] = max(0, min(wanted, room))
    return sizes


def _allocate(groups: dict, fractions: dict[str, float], rng: random.Random) -> dict:
    """Group key -> split, stratified by class; `groups` maps key -> class, train takes the rest."""
    by_class = defaultdict(list)
    for key, cls in groups.items():
        by_class[cls].append(key)
    assigned = {}
    for cls in sorted(by_class):
        keys = sorted(by_class[cls])
        rng.shuffle(keys)
        sizes = _sizes(len(keys), fractions)
        splits = [split for split, size in sizes.items() for _ in range(size)]
        assigned.update(zip(keys, splits + ["train"] * (len(keys) - len(splits))))
    return assigned


def assign_splits(records: list[Record], seed: int, val_fraction: float = 0.15,
                  test_fraction: float = 0.15) -> list[Record]:
    """The records, in their order, with every missing split filled in (see the module docstring)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be "
                         "non-negative and leave room for train")
    if not records:
        return []
    keys = _group_keys(records)
    members = defaultdict(list)
    for key, record in zip(keys, records):
        members[key].append(record)
    carve_val = (any(r.split == "train" for r in records)
                 and not any(r.split == "val" for r in records))

    unsplit, train_only, kept = {}, {}, {}
    for key, group in members.items():
        given = [r.split for r in group if r.split]
        cls = _majority(r.label for r in group)
        if not given:
            unsplit[key] = cls
        elif carve_val and set(given) == {"train"}:
            train_only[key] = cls
        else:  # a patient's unsplit images join the patient's split
            kept[key] = _majority(given)

    rng = random.Random(seed)
    assigned = {**kept,
                # val_fraction / (1 - test_fraction) of train: about val_fraction of the whole set
                **_allocate(train_only, {"val": val_fraction / (1 - test_fraction)}, rng),
                **_allocate(unsplit, {"val": val_fraction, "test": test_fraction}, rng)}
    return [record if key in kept and record.split else replace(record, split=assigned[key])
            for key, record in zip(keys, records)]
