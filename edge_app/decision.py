"""From model logits to what a clinician sees: calibrated probabilities and a triage decision.

Training's evaluation and the device both use these functions, so the threshold chosen on
validation means exactly the same thing on the device.
"""
from __future__ import annotations

import numpy as np

REFER = "refer"
NO_ABNORMALITY = "no_abnormality"
UNRELIABLE = "unreliable"
TRIAGE_MESSAGES = {
    REFER: "Refer for clinical review",
    NO_ABNORMALITY: "No abnormality detected by the screening model",
    UNRELIABLE: ("This image is unlike the images the model was trained on; the result is unreliable. "
                 "Refer for clinical review"),
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


def triage(p_abnormal: float, threshold: float, ood_score: float | None = None,
           ood_threshold: float | None = None) -> str:
    """UNRELIABLE when the image is out of the training distribution (its OOD score is above the
    card's threshold), else REFER when the abnormal probability reaches the operating threshold."""
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        return UNRELIABLE
    return REFER if p_abnormal >= threshold else NO_ABNORMALITY
