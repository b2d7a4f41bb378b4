"""The unit of every dataset: one image file with its label, split, patient and source."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path                 # absolute path of the image file
    label: str                 # as read; the canonical class ("normal", "pneumonia", "covid") after labels.to_task
    split: str | None          # "train" | "val" | "test"; None until a split is assigned
    patient_id: str | None     # None when the source names no patient
    source: str | None         # where the image came from (manifest source_repo, CSV name, ...)
    orig_label: str = ""       # the label exactly as the source gave it
    view: str = ""             # the projection as the source gives it ("PA", "AP", "AP Supine", ...); "" unknown


def projection(view: str) -> str:
    """"PA" or "AP" (AP supine, AP pediatric...) from a record's view; "" when unknown or another view."""
    view = view.strip().upper()
    return "PA" if view.startswith("PA") else "AP" if view.startswith("AP") else ""


def label_indices(records: list[Record], labels: tuple[str, ...]) -> np.ndarray:
    """The records' labels as class indices into `labels` (a model's output order)."""
    return np.array([labels.index(r.label) for r in records], dtype=np.int32)
