"""The parity gate: every TFLite variant must classify like the Keras model it came from."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from edge_app.classifier import Classifier
from train import metrics

# Largest allowed drop of test macro-F1, in points (0-100 scale), per variant.
DEFAULT_BUDGETS = {"fp32": 0.2, "fp16": 0.2, "dynamic": 1.0, "int8": 1.0, "pruned": 2.0}


def variant_logits(model_path, inputs: np.ndarray, *, desc: str, progress: bool = True) -> np.ndarray:
    """Logits of a .tflite model for preprocessed model inputs, run on the CPU through LiteRT."""
    classifier = Classifier(model_path, accelerator="cpu")
    return np.concatenate([classifier.logits(inputs[i:i + 1])
                           for i in tqdm(range(len(inputs)), desc=desc, unit="img", disable=not progress)])


def compare(reference: dict, candidate: dict, reference_logits: np.ndarray,
            candidate_logits: np.ndarray, budget_points: float) -> dict:
    """Metric drops (points) of a variant against the Keras model, top-1 agreement, verdict."""
    drop = 100.0 * (reference["macro_f1"] - candidate["macro_f1"])
    agreement = float((reference_logits.argmax(1) == candidate_logits.argmax(1)).mean())
    failures = []
    if drop > budget_points:
        failures.append(f"macro_f1 dropped {drop:.2f} points (budget {budget_points:.2f})")
    return {
        "macro_f1_drop_points": drop,
        "accuracy_drop_points": 100.0 * (reference["accuracy"] - candidate["accuracy"]),
        "abnormal_sensitivity_drop_points": 100.0 * (reference["abnormal"]["sensitivity"]
                                                     - candidate["abnormal"]["sensitivity"]),
        "agreement": agreement,
        "max_abs_logit_diff": float(np.abs(reference_logits - candidate_logits).max()),
        "budget_points": budget_points,
        "passed": not failures,
        "failures": failures,
    }


def evaluate(logits, y, card) -> dict:
    return metrics.screening_metrics(logits, y, card.labels, temperature=card.temperature,
                                     threshold=card.abnormal_threshold)
