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
# Why a result is UNRELIABLE: the model's features are unlike any training image's (OOD score above
# the card's thresholds["ood"]), or the model input holds less fine detail than the validation images
# (preprocess.detail below the card's thresholds["detail"]: a blurred film, or one enlarged from a
# small copy, which the model clears far more often than the same film as stored).
OUT_OF_DISTRIBUTION = "out_of_distribution"
LOW_DETAIL = "low_detail"
WARNING_MESSAGES = {
    OUT_OF_DISTRIBUTION: TRIAGE_MESSAGES[UNRELIABLE],
    LOW_DETAIL: ("This image holds less fine detail than the images the model was checked on (blurred, or "
                 "enlarged from a small copy); the result is unreliable. Load the original full-resolution "
                 "file, or refer for clinical review"),
}
WARNING_SHORT = {OUT_OF_DISTRIBUTION: "unlike the training images", LOW_DETAIL: "too little fine detail"}
LOW_DETAIL_QUANTILE = 0.01   # ~1 % of each development source's (or a commissioned site's) films warned about
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


def warning(ood_score: float | None = None, ood_threshold: float | None = None,
            detail: float | None = None, detail_threshold: float | None = None) -> str | None:
    """OUT_OF_DISTRIBUTION, LOW_DETAIL or None; a check whose score or threshold is None is not made
    (models exported without the OOD outputs, cards without a detail threshold)."""
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        return OUT_OF_DISTRIBUTION
    if detail is not None and detail_threshold is not None and detail < detail_threshold:
        return LOW_DETAIL
    return None


def low_detail_threshold(groups, quantile: float = LOW_DETAIL_QUANTILE) -> float | None:
    """The low-detail warning's threshold for groups of `preprocess.detail` scores (a development
    set's sources: train.detail; one site's images: commissioning): the lowest of the groups'
    `quantile`s, over the groups with at least 1 / quantile scores; None when none has that many."""
    estimable = [np.asarray(group, dtype=float) for group in groups if len(group) * quantile >= 1]
    return min(float(np.quantile(group, quantile)) for group in estimable) if estimable else None


def site_low_detail_threshold(card_threshold: float | None, scores) -> float | None:
    """A site's own low-detail threshold (commissioning, site adaptation): the 1st percentile of its
    films' `preprocess.detail` scores (enough of them: `low_detail_threshold`) where that is below the
    card's, so the site's films are not called unreliable for being what they are; None otherwise (the
    card's stands; a card without the warning stays without it)."""
    site = low_detail_threshold([scores])
    return site if card_threshold is not None and site is not None and site < card_threshold else None


def triage(p_abnormal: float, threshold: float, warned: str | None = None) -> str:
    """UNRELIABLE when a warning (`warning`) stands, else REFER when the abnormal probability
    reaches the operating threshold."""
    if warned is not None:
        return UNRELIABLE
    return REFER if p_abnormal >= threshold else NO_ABNORMALITY
