"""A Keras classifier on a run's splits: the images and labels of a split, its logits, the
calibration (temperature and operating threshold), the metrics of the report and of the model card,
and the pooled features. One place, used by the trainer, adaptation and conversion, so that a run's
figures are computed one way whichever stage reports them.
"""
from __future__ import annotations

import numpy as np

import train  # noqa: F401
import tf_keras as keras

from edge_app import decision, metrics
from edge_app.graph_names import LOGITS, POOL
from edge_app.preprocess import InputSpec
from train import models
from train.data import run_splits, sources
from train.data.records import Record, label_indices, projection
from train.pipeline import load_images, make_dataset

BATCH = 64

SplitArrays = tuple[np.ndarray, np.ndarray, list[Record]]   # (squares before contrast, class indices, records)


def load_split(records: list[Record], labels, spec: InputSpec, *, desc: str, progress: bool = True) -> SplitArrays:
    """The records' images decoded as the device decodes them (uint8 squares before the contrast step,
    train.pipeline.load_images), with their class indices."""
    return load_images(records, spec, desc=desc, progress=progress), label_indices(records, labels), records


def predict(model, x: np.ndarray, y: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The model's logits for cached squares `x` (contrast step and normalise as the device does them)."""
    return model.predict(make_dataset(x, y, spec, batch_size=BATCH, training=False), verbose=0)


def correct_class_priors(model, logits: dict[str, np.ndarray], y: np.ndarray, *, enabled: bool,
                         fit_on: str = "val") -> np.ndarray:
    """Fit per-class logit offsets on logits[fit_on] with labels `y` (metrics.fit_class_offsets) and
    add them to the bias of the model's logits layer, so the saved model, every converted file and
    the device compute the corrected logits with no extra step; `logits` (by split) are shifted the
    same way in place. Returns the offsets (zeros, nothing changed, unless `enabled`: the run's
    TrainConfig.class_prior_correction)."""
    if not enabled:
        return np.zeros(logits[fit_on].shape[1])
    offsets = metrics.fit_class_offsets(logits[fit_on], y)
    layer = models.head_layer(model, LOGITS)
    layer = getattr(layer, "layer", layer)          # a QAT wrapper holds the Dense layer
    layer.bias.assign(layer.bias.numpy() + offsets.astype(np.float32))
    for split in logits:
        logits[split] = (logits[split] + offsets).astype(np.float32)
    return offsets


def calibrate(logits: np.ndarray, y: np.ndarray, records: list[Record], target_sensitivity: float,
              rule: str = "overall") -> tuple[float, float]:
    """(temperature, abnormal threshold reaching `target_sensitivity` by `rule`, metrics.operating_threshold),
    both fitted on these logits."""
    temperature = metrics.fit_temperature(logits, y)
    probs = decision.calibrated_probabilities(logits, temperature)
    threshold = metrics.operating_threshold(y, decision.abnormal_probability(probs), _cohorts(records),
                                            target_sensitivity, rule)
    return temperature, threshold


def split_metrics(logits: np.ndarray, y: np.ndarray, records: list[Record], labels, *, temperature: float,
                  threshold: float, bootstrap: int) -> dict:
    """The screening metrics of one split, the same per data source, and per cohort."""
    result = metrics.screening_metrics(logits, y, labels, temperature=temperature, threshold=threshold,
                                       bootstrap=bootstrap)
    result["per_source"] = metrics.per_group_metrics(logits, y, [r.source or "unknown" for r in records], labels,
                                                     temperature=temperature, threshold=threshold)
    result["cohorts"] = metrics.cohort_metrics(logits, y, _cohorts(records), labels,
                                               temperature=temperature, threshold=threshold)
    result["adult_projections"] = metrics.cohort_metrics(logits, y, _adult_projections(records), labels,
                                                         temperature=temperature, threshold=threshold)
    return result


def holdout_auc_against_test(holdout_logits: np.ndarray, y_holdout: np.ndarray, test_logits: np.ndarray,
                             y_test: np.ndarray, *, temperature: float, bootstrap: int) -> dict | None:
    """A held-out source with one side of the referral question only (all normal, or all abnormal)
    has no AUC of its own. Ranked against the test split's images of the other side, it has one:
    do the unseen hospital's normals score below the known hospitals' abnormals (or its abnormals
    above their normals)? A threshold can be moved at a new site (commissioning), a ranking cannot.
    None when the held-out source has both sides (its own AUC says it)."""
    held_abnormal = np.asarray(y_holdout) != 0
    if held_abnormal.all():
        other, side = np.asarray(y_test) == 0, "normal"
    elif not held_abnormal.any():
        other, side = np.asarray(y_test) != 0, "abnormal"
    else:
        return None
    score = lambda logits: decision.abnormal_probability(decision.calibrated_probabilities(logits, temperature))
    scores = np.concatenate([score(holdout_logits), score(test_logits[other])])
    positive = np.concatenate([held_abnormal, np.asarray(y_test)[other] != 0])
    result = {"auc": metrics.roc_auc(positive, scores), "against": f"test {side}", "n_against": int(other.sum())}
    if bootstrap:
        result["auc_ci95"] = metrics.bootstrap_auc_ci(positive, scores, n=bootstrap)
    return result


def refitted_metrics(logits: dict[str, np.ndarray], y: dict[str, np.ndarray], records: dict[str, list[Record]],
                     labels, config) -> dict:
    """What a run's reports/metrics.json would say of other logits for its images (an ensemble's,
    test-time views'): temperature and threshold fitted on logits["val"] as training fits them
    (`config`: the run's TrainConfig), the figures of every split, and a held-out source's AUC
    against test; so such a row compares like with like with the run's own."""
    temperature, threshold = calibrate(logits["val"], y["val"], records["val"], config.target_sensitivity,
                                       config.threshold_rule)
    results = {s: split_metrics(logits[s], y[s], records[s], labels, temperature=temperature, threshold=threshold,
                                bootstrap=config.bootstrap) for s in logits}
    if run_splits.HOLDOUT in results:
        against = holdout_auc_against_test(logits[run_splits.HOLDOUT], y[run_splits.HOLDOUT], logits["test"],
                                           y["test"], temperature=temperature, bootstrap=config.bootstrap)
        if against:
            results[run_splits.HOLDOUT]["abnormal"]["auc_against_test"] = against
    return {**results, "temperature": temperature}


def _cohorts(records: list[Record]) -> list[str | None]:
    return [sources.cohort_of(r.source, r.label) for r in records]


def _adult_projections(records: list[Record]) -> list[str | None]:
    """'adult normal PA', 'adult pneumonia AP', ... for an adult of known projection; None otherwise. The
    set's adult pneumonias are mostly AP films and its adult normals mostly PA, a clinic's outpatients PA:
    a model can read the projection for the finding (docs/RESULTS.md, 2026-12-07 morning)."""
    return [f"{sources.cohort_of(r.source, r.label)} {projection(r.view)}"
            if sources.population_of(r.source) == "adult" and projection(r.view) else None for r in records]


def card_metrics(test: dict) -> dict:
    """The model card's headline metrics, from `split_metrics` of the test split."""
    return {"test_macro_f1": test["macro_f1"], "test_accuracy": test["accuracy"],
            "test_abnormal_sensitivity": test["abnormal"]["sensitivity"],
            "test_abnormal_specificity": test["abnormal"]["specificity"],
            "test_abnormal_auc": test["abnormal"]["auc"], "test_ece": test["ece"],
            **({"test_covid_sensitivity": test["covid"]["sensitivity"]} if "covid" in test else {})}


def pooled_model(model) -> keras.Model:
    """The model up to its pooled (penultimate) features: what the probe and the OOD score read."""
    return keras.Model(model.input, model.get_layer(POOL).output)


def pooled_features(model, spec: InputSpec, sets: dict) -> dict[str, np.ndarray]:
    """The pooled features of every set of `sets` (name -> (grey images, class indices, ...))."""
    pooled = pooled_model(model)
    return {name: predict(pooled, x, y, spec) for name, (x, y, *_) in sets.items()}
