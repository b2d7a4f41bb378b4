"""From model logits to what a clinician sees: calibrated probabilities and a triage decision.

Training's evaluation and the device both use these functions, so the threshold chosen on
validation means exactly the same thing on the device.
"""
from __future__ import annotations

import numpy as np

REFER = "refer"
NO_ABNORMALITY = "no_abnormality"
TRIAGE_MESSAGES = {
    REFER: "Refer for clinical review",
    NO_ABNORMALITY: "No abnormality detected by the screening model",
}
NOT_A_DIAGNOSIS = "Screening aid, not a diagnosis"


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) along the last axis, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def abnormal_probability(probabilities: np.ndarray) -> np.ndarray:
    """P(pneumonia or COVID-19) = 1 - P(normal); labels[0] is always "normal"."""
    return 1.0 - np.asarray(probabilities)[..., 0]


def triage(p_abnormal: float, threshold: float) -> str:
    """REFER when the abnormal probability reaches the operating threshold."""
    return REFER if p_abnormal >= threshold else NO_ABNORMALITY
