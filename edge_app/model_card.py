"""The model card: everything the device needs to use a model correctly, in one JSON object.

It is written by training, completed by conversion (per variant) and embedded in every
`.tflite` file, so a model file alone says what its outputs mean, how its input must be
prepared, and at which threshold it refers a patient.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from edge_app.preprocess import PREPROCESSING_VERSION, InputSpec

CARD_SCHEMA_VERSION = 1
NORMAL = "normal"
# Every threshold a card may carry, with its allowed range (inclusive): the device refuses a card
# whose numbers it would silently misuse (temperature inf makes every probability 1/3; an OOD
# threshold NaN turns the warning off).
THRESHOLD_RANGES = {"abnormal": (0.0, 1.0), "target_sensitivity": (0.0, 1.0), "ood": (0.0, math.inf),
                    "detail": (0.0, math.inf)}


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
        self.labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else self.labels
        if isinstance(self.input, dict):
            try:
                self.input = InputSpec.from_dict(self.input)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model card input: {exc}") from exc
        validate(self)

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
        if not isinstance(d, dict):
            raise ValueError(f"a model card must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model card has unknown fields: {sorted(unknown)}")
        missing = [f.name for f in fields(cls) if f.name not in d]   # to_json writes every field
        if missing:
            raise ValueError(f"model card lacks the field(s) {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelCard":
        return cls.from_dict(json.loads(text))


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate(card: ModelCard) -> None:
    """Raises ValueError naming the first field that is of the wrong type, out of range, not
    finite, or of a version this device does not know."""
    for name in ("name", "task", "variant", "git_commit", "created", "intended_use"):
        if not isinstance(getattr(card, name), str):
            raise ValueError(f"model card {name} must be a string, got {getattr(card, name)!r}")
    for name in ("dataset", "metrics", "versions"):
        if not isinstance(getattr(card, name), dict):
            raise ValueError(f"model card {name} must be an object, got {getattr(card, name)!r}")
    if isinstance(card.schema_version, bool) or card.schema_version != CARD_SCHEMA_VERSION:
        raise ValueError(f"model card schema_version {card.schema_version!r} is unknown to this device "
                         f"(it reads version {CARD_SCHEMA_VERSION}); update the device software")
    if card.preprocessing_version != PREPROCESSING_VERSION:
        raise ValueError(f"model card preprocessing_version {card.preprocessing_version!r} is unknown to "
                         f"this device (it implements version {PREPROCESSING_VERSION!r}); update the "
                         "device software")
    if not isinstance(card.input, InputSpec):
        raise ValueError(f"model card input must be an object, got {card.input!r}")
    labels = card.labels
    if (not isinstance(labels, tuple) or len(labels) < 2
            or not all(isinstance(l, str) and l for l in labels)):
        raise ValueError(f"model card labels must be a list of at least two names, got {labels!r}")
    if labels[0] != NORMAL:
        raise ValueError(f"model card labels must start with {NORMAL!r}, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"model card labels repeat: {labels}")
    if not (_number(card.temperature) and math.isfinite(card.temperature) and card.temperature > 0):
        raise ValueError(f"model card temperature must be a finite number > 0, got {card.temperature!r}")
    if not isinstance(card.thresholds, dict):
        raise ValueError(f"model card thresholds must be an object, got {card.thresholds!r}")
    if "abnormal" not in card.thresholds:
        raise ValueError("model card needs thresholds.abnormal")
    for key, value in card.thresholds.items():
        if key not in THRESHOLD_RANGES:
            raise ValueError(f"model card thresholds.{key} is unknown; known: {sorted(THRESHOLD_RANGES)}")
        low, high = THRESHOLD_RANGES[key]
        if not (_number(value) and math.isfinite(value) and low <= value <= high):
            allowed = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"model card thresholds.{key} must be a finite number {allowed}, got {value!r}")
