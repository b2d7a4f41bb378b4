"""A shortcut probe: can a linear classifier tell an image's data source from the model's features?

A model that has learnt hospitals, ages or scanners instead of findings carries the source in its
penultimate features. The probe is softmax regression on those (standardised) features, trained
on the training split and scored on the test split, overall and within each class: within a class
the label cannot explain the source, so high accuracy there means the features encode the source
itself. High source predictability is a warning, not a verdict: read it beside the scores on a
left-out source (`--holdout-source`).
"""
from __future__ import annotations

import numpy as np

FLAG_ACCURACY = 0.9   # within-class source accuracy above this, and well above the majority guess


def fit_softmax_regression(x: np.ndarray, y: np.ndarray, classes: int, *, steps: int = 300,
                           learning_rate: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """Weights (features + 1, classes) by full-batch gradient descent on the L2-regularised NLL."""
    x = np.c_[x, np.ones(len(x))]
    w = np.zeros((x.shape[1], classes))
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= learning_rate * (x.T @ (p - onehot) / len(x) + l2 * w)
    return w


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.c_[x, np.ones(len(x))] @ w).argmax(axis=1)


def source_probe(train_features, train_sources, train_labels, test_features, test_sources, test_labels,
                 label_names) -> dict:
    """Test accuracy of predicting the source, overall and within each class with two or more sources."""
    train_sources, test_sources = np.asarray(train_sources), np.asarray(test_sources)
    names = sorted(set(train_sources.tolist()))
    index = {n: i for i, n in enumerate(names)}
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6
    standardise = lambda f: (np.asarray(f, np.float64) - mean) / std
    seen = np.isin(test_sources, names)
    x_test, s_test = standardise(test_features)[seen], np.array([index[s] for s in test_sources[seen]])
    y_test = np.asarray(test_labels)[seen]
    w = fit_softmax_regression(standardise(train_features), np.array([index[s] for s in train_sources]),
                               len(names))
    predicted = predict(w, x_test)
    result = {"sources": names, "test_images": int(seen.sum()),
              "accuracy": float((predicted == s_test).mean()),
              "majority_baseline": float(np.bincount(s_test).max() / len(s_test)), "within_class": {}}
    for c, label in enumerate(label_names):
        inside = y_test == c
        if len(np.unique(s_test[inside])) < 2:
            continue  # a class from one source only: nothing to tell apart
        acc = float((predicted[inside] == s_test[inside]).mean())
        baseline = float(np.bincount(s_test[inside]).max() / inside.sum())
        result["within_class"][label] = {"n": int(inside.sum()), "accuracy": acc, "majority_baseline": baseline,
                                         "flagged": acc > FLAG_ACCURACY and acc > baseline + 0.05}
    result["flagged"] = any(v["flagged"] for v in result["within_class"].values())
    return result
