"""The parity gate: every TFLite variant must classify like the Keras model it came from.

Each variant is run through LiteRT (the device's runtime) on the validation and test splits
and compared with the Keras model on the same inputs: accuracy, macro-F1, abnormal
sensitivity and specificity at the card's threshold, abnormal AUC, and top-1 agreement. The
gate is on macro-F1 (a budget in points per variant, on every split); the other drops are
reported. Images whose class flips are listed with the Keras model's own margin (top-1 minus
top-2 probability): a flip of an image the Keras model itself hardly decided is rounding,
not damage.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from edge_app import decision
from edge_app.classifier import Classifier, ood_score_of
from edge_app import metrics

GATED_METRIC = "macro_f1"


def variant_logits(model_path, inputs: np.ndarray, *, desc: str, progress: bool = True) -> np.ndarray:
    """Logits of a .tflite model for preprocessed model inputs, run on the CPU through LiteRT."""
    classifier = Classifier(model_path, accelerator="cpu")
    return np.concatenate([classifier.logits(inputs[i:i + 1])
                           for i in tqdm(range(len(inputs)), desc=desc, unit="img", disable=not progress)])


def variant_ood_scores(model_path, inputs: np.ndarray, *, desc: str, progress: bool = True) -> np.ndarray:
    """The out-of-distribution score of a .tflite model (edge_app.classifier.ood_score_of) per input."""
    classifier = Classifier(model_path, accelerator="cpu")
    return np.array([ood_score_of(classifier.backend.run(inputs[i:i + 1]))
                     for i in tqdm(range(len(inputs)), desc=desc, unit="img", disable=not progress)])


def evaluate(logits, y, card) -> dict:
    return metrics.screening_metrics(logits, y, card.labels, temperature=card.temperature,
                                     threshold=card.abnormal_threshold)


DROP_METRICS = ("accuracy", "macro_f1", "abnormal_sensitivity", "abnormal_specificity", "abnormal_auc",
                "covid_sensitivity")


def headline(m: dict) -> dict:
    """The gated and reported numbers of one split's screening metrics (edge_app.metrics.screening_metrics),
    as conversion, the benchmarks and the release gates read them."""
    covid = m.get("covid")
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "abnormal_sensitivity": m["abnormal"]["sensitivity"],
            "abnormal_specificity": m["abnormal"]["specificity"], "abnormal_auc": m["abnormal"]["auc"],
            "covid_sensitivity": None if covid is None else covid["sensitivity"],
            "confusion_matrix": m["confusion_matrix"]}


def compare(reference: dict, candidate: dict, reference_logits: np.ndarray, candidate_logits: np.ndarray,
            budget_points: float, *, split: str, temperature: float = 1.0) -> dict:
    """Drops (points) of every headline metric against the Keras model on one split, top-1
    agreement, the flipped images, and the failures of the gate."""
    ref, cand = headline(reference), headline(candidate)
    drops = {k: 100.0 * (ref[k] - cand[k]) for k in DROP_METRICS if ref[k] is not None}
    ref_top, cand_top = reference_logits.argmax(1), candidate_logits.argmax(1)
    probs = np.sort(decision.calibrated_probabilities(reference_logits, temperature), axis=1)
    flipped = np.flatnonzero(ref_top != cand_top)
    failures = []
    if drops[GATED_METRIC] > budget_points:
        failures.append(f"{split} {GATED_METRIC} dropped {drops[GATED_METRIC]:.2f} points "
                        f"(budget {budget_points:.2f})")
    return {
        "drops_points": drops,
        "agreement": float((ref_top == cand_top).mean()),
        "max_abs_logit_diff": float(np.abs(reference_logits - candidate_logits).max()),
        "flips": [{"index": int(i), "keras": int(ref_top[i]), "variant": int(cand_top[i]),
                   "keras_margin": float(probs[i, -1] - probs[i, -2])} for i in flipped],
        "budget_points": budget_points,
        "failures": failures,
    }


def gate(per_split: dict[str, dict]) -> dict:
    """One verdict over the splits' comparisons."""
    failures = [f for c in per_split.values() for f in c["failures"]]
    return {"passed": not failures, "failures": failures}
