"""Out-of-distribution score: how unlike the training images an image is, in the model's own features.

The score is a Mahalanobis distance of the pooled penultimate features from the training set,
in the top-k principal components (whitened), plus the squared residual outside them scaled by
the mean residual variance: an image far from every training X-ray scores high in one or the
other. Training fits it (`fit`, saved as the run's `ood.npz`) and chooses the threshold on
validation (model card `thresholds.ood`); conversion builds its projections into the exported
graph as two more outputs whose summed squares are the score (`convert.export.with_ood_parts`),
so the device needs nothing but the `.tflite`. The numpy `score` here is the reference the
device is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = 32          # principal components kept; at most one per 10 training images, so that
                         # their variances are estimated well enough to whiten by
VAL_QUANTILE = 0.99      # threshold: this quantile of validation scores (~1 % of in-distribution flagged)


@dataclass
class OodModel:
    mean: np.ndarray          # (d,) mean training feature
    components: np.ndarray    # (d, k) orthonormal principal directions
    variances: np.ndarray     # (k,) variance along each
    residual_variance: float  # mean variance per dimension outside the k components

    def save(self, path) -> None:
        np.savez(path, mean=self.mean, components=self.components, variances=self.variances,
                 residual_variance=self.residual_variance)

    @classmethod
    def load(cls, path) -> "OodModel":
        with np.load(path) as f:
            return cls(f["mean"], f["components"], f["variances"], float(f["residual_variance"]))


def fit(features: np.ndarray, components: int = COMPONENTS) -> OodModel:
    features = np.asarray(features, np.float64)
    n, d = features.shape
    mean = features.mean(axis=0)
    _, s, vt = np.linalg.svd(features - mean, full_matrices=False)
    variances = s ** 2 / max(n - 1, 1)
    k = int(max(1, min(components, d - 1, n // 10)))
    residual = variances[k:].sum() / max(d - k, 1)
    floor = 1e-6 * max(variances[0], 1e-12)   # no division by a vanishing variance
    return OodModel(mean.astype(np.float32), vt[:k].T.astype(np.float32),
                    np.maximum(variances[:k], floor).astype(np.float32), float(max(residual, floor)))


def score(model: OodModel, features: np.ndarray) -> np.ndarray:
    centred = np.asarray(features, np.float64) - model.mean
    projected = centred @ model.components
    inside = (projected ** 2 / model.variances).sum(axis=1)
    outside = np.maximum((centred ** 2).sum(axis=1) - (projected ** 2).sum(axis=1), 0.0)
    return inside + outside / model.residual_variance


def threshold(val_scores: np.ndarray, quantile: float = VAL_QUANTILE) -> float:
    return float(np.quantile(np.asarray(val_scores, np.float64), quantile))
