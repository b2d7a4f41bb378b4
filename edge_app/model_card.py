"""The model card: everything the device needs to use a model correctly, in one JSON object.

It is written by training, completed by conversion (per variant) and embedded in every
`.tflite` file, so a model file alone says what its outputs mean, how its input must be
prepared, and at which threshold it refers a patient.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from edge_app.preprocess import PREPROCESSING_VERSION, InputSpec

CARD_SCHEMA_VERSION = 1
NORMAL = "normal"


@dataclass
class ModelCard:
    name: str                                  # e.g. "mobilenet_v2-0.5"
    task: str                                  # "3class", "pneumonia" or "covid"
    labels: tuple[str, ...]                    # output order; labels[0] is always "normal"
    input: InputSpec
    preprocessing_version: str = PREPROCESSING_VERSION
    temperature: float = 1.0                   # calibrated probabilities = softmax(logits / T)
    thresholds: dict = field(default_factory=lambda: {"abnormal": 0.5})
    variant: str = "keras"                     # keras, fp32, dynamic, fp16, int8, ...
    dataset: dict = field(default_factory=dict)  # root, fingerprint, counts
    metrics: dict = field(default_factory=dict)  # headline test metrics
    versions: dict = field(default_factory=dict)  # library versions that made it
    git_commit: str = ""
    created: str = ""
    intended_use: str = (
        "Screening aid for chest X-rays. Not a diagnosis: every result must be reviewed "
        "by a qualified clinician."
    )
    schema_version: int = CARD_SCHEMA_VERSION

    def __post_init__(self):
        self.labels = tuple(self.labels)
        if isinstance(self.input, dict):
            self.input = InputSpec.from_dict(self.input)
        if not self.labels or self.labels[0] != NORMAL:
            raise ValueError(f"model card labels must start with {NORMAL!r}, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"model card labels repeat: {self.labels}")
        if not self.temperature > 0:
            raise ValueError(f"model card temperature must be > 0, got {self.temperature}")
        threshold = self.thresholds.get("abnormal")
        if threshold is None or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"model card needs thresholds.abnormal in [0, 1], got {threshold}")

    @property
    def abnormal_threshold(self) -> float:
        return float(self.thresholds["abnormal"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["input"] = self.input.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model card has unknown fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelCard":
        return cls.from_dict(json.loads(text))
