"""Screening metrics in plain numpy, computed the same way for Keras, every TFLite variant and
a site's own images on the device (`python -m edge_app validate`).

Conventions: `y` holds class indices into the task's labels, labels[0] is "normal", and the
"abnormal" score of an image is 1 - P(normal) (edge_app.decision.abnormal_probability).
"""
from __future__ import annotations

import numpy as np

from edge_app import decision


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true, y_pred, labels) -> dict:
    """Per-class precision, recall, F1 and support, plus accuracy and macro F1."""
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    return {
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion_matrix": cm.tolist(),
    }


def roc_auc(positive, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN with one class only."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(positive, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_positive = scores[order], positive[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tpr = np.cumsum(sorted_positive)[last_of_each] / max(positive.sum(), 1)
    fpr = np.cumsum(~sorted_positive)[last_of_each] / max((~positive).sum(), 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, sorted_scores[last_of_each]]


def bootstrap_auc_ci(positive, scores, *, n: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the AUC, resampling images."""
    rng = np.random.default_rng(seed)
    positive, scores = np.asarray(positive, bool), np.asarray(scores, float)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(scores), len(scores))
        value = roc_auc(positive[idx], scores[idx])
        if not np.isnan(value):
            values.append(value)
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def sensitivity_specificity(positive, scores, threshold: float) -> tuple[float, float]:
    positive = np.asarray(positive, dtype=bool)
    flagged = np.asarray(scores) >= threshold
    sens = float(flagged[positive].mean()) if positive.any() else float("nan")
    spec = float((~flagged[~positive]).mean()) if (~positive).any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(positive, scores, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target` (so specificity is as high as it can be)."""
    positive = np.asarray(positive, dtype=bool)
    pos_scores = np.sort(np.asarray(scores, dtype=np.float64)[positive])[::-1]
    if len(pos_scores) == 0:
        raise ValueError("cannot choose a threshold: no positive images")
    needed = int(np.ceil(target * len(pos_scores)))
    return float(pos_scores[max(needed, 1) - 1])


def operating_threshold(y_true, scores, cohorts, target: float, rule: str = "overall",
                        min_cohort: int = 10) -> float:
    """The threshold on P(abnormal) fitted on validation. "overall": the highest that reaches
    `target` sensitivity over all abnormal images. "every_cohort": the highest that reaches it in
    every abnormal cohort of at least `min_cohort` images too (train.data.sources.cohort_of), so a
    population the set holds few of (adult pneumonia) is not sacrificed to one it holds many of."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    threshold = threshold_for_sensitivity(y_true != 0, scores, target)
    if rule == "overall":
        return threshold
    if rule != "every_cohort":
        raise ValueError(f"unknown threshold rule {rule!r}: overall or every_cohort")
    cohorts = np.array(cohorts, dtype=object)
    for cohort in {c for c in cohorts.tolist() if c}:
        inside = (cohorts == cohort) & (y_true != 0)
        if inside.sum() >= min_cohort and inside.sum() == (cohorts == cohort).sum():
            threshold = min(threshold, threshold_for_sensitivity(np.ones(inside.sum(), bool), scores[inside], target))
    return threshold


def bootstrap_threshold_ci(positive, scores, target: float, *, n: int = 1000, seed: int = 0,
                           level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of `threshold_for_sensitivity`, resampling images (resamples
    without a positive image are left out)."""
    rng = np.random.default_rng(seed)
    positive, scores = np.asarray(positive, bool), np.asarray(scores, float)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(scores), len(scores))
        if positive[idx].any():
            values.append(threshold_for_sensitivity(positive[idx], scores[idx], target))
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def calibration_bins(probabilities, y_true, bins: int = 15) -> list[tuple[float, float, float]]:
    """(mean confidence, accuracy, share of images) of each non-empty equal-width confidence bin."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1]), 0, bins - 1)
    return [(float(confidence[which == b].mean()), float(correct[which == b].mean()), float((which == b).mean()))
            for b in range(bins) if (which == b).any()]


def expected_calibration_error(probabilities, y_true, bins: int = 15) -> float:
    """ECE of the top-1 confidence over equal-width bins."""
    return float(sum(share * abs(accuracy - confidence)
                     for confidence, accuracy, share in calibration_bins(probabilities, y_true, bins)))


def fit_temperature(logits, y_true) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    logits, y_true = np.asarray(logits, np.float64), np.asarray(y_true)

    def nll(log_t):
        p = decision.calibrated_probabilities(logits, np.exp(log_t))
        return -np.mean(np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, None)))

    lo, hi = np.log(0.05), np.log(20.0)  # golden-section search on log T (NLL is unimodal in T)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def fit_class_offsets(logits, y_true) -> np.ndarray:
    """Per-class offsets c (c[0] = 0) so that softmax((logits + c) / T) with its own fitted T has the
    least negative log-likelihood on these labels: bias-corrected temperature scaling (Alexandari,
    Kundaje & Shrikumar, ICML 2020), fitted jointly as softmax(a * logits + b) with c = b / a.

    Why: training weighs the classes (class_weight_power), which moves the model's priors towards
    the rare classes; temperature alone cannot undo a prior shift, so the most likely class is then
    biased (normal films called COVID-19). The NLL is convex in (a, b). When the logits say so little
    about the labels that 1 / a leaves fit_temperature's range [0.05, 20] (an untrained model), a is
    held at that range's edge and only b is fitted, so the offsets stay finite."""
    z, y = np.asarray(logits, np.float64), np.asarray(y_true)
    missing = sorted(set(range(z.shape[1])) - set(y.tolist()))
    if missing:
        raise ValueError(f"cannot fit class offsets: no image of class(es) {missing} in these labels")
    theta = _newton_softmax_affine(z, y, np.r_[1.0, np.zeros(z.shape[1] - 1)], free_scale=True)
    if not 1 / 20 <= theta[0] <= 1 / 0.05:
        theta = _newton_softmax_affine(z, y, np.r_[np.clip(theta[0], 1 / 20, 1 / 0.05), theta[1:] * 0],
                                       free_scale=False)
    return np.r_[0.0, theta[1:]] / theta[0]


def _newton_softmax_affine(z, y, theta, *, free_scale: bool, steps: int = 50) -> np.ndarray:
    """Newton's method with a backtracking line search on the mean NLL of softmax(a * z + [0, b]),
    theta = (a, b); a stays fixed unless `free_scale`."""
    n, k = z.shape
    onehot = np.eye(k)[y]

    def nll(theta):
        u = theta[0] * z + np.r_[0.0, theta[1:]]
        u -= u.max(axis=1, keepdims=True)
        return float(-(u[np.arange(n), y] - np.log(np.exp(u).sum(axis=1))).mean())

    jac = np.concatenate([z[:, :, None], np.broadcast_to(np.eye(k)[:, 1:], (n, k, k - 1))], axis=2)
    if not free_scale:
        jac = jac[:, :, 1:]
    for _ in range(steps):
        p = decision.calibrated_probabilities(theta[0] * z + np.r_[0.0, theta[1:]])
        grad = np.einsum("ikp,ik->p", jac, p - onehot) / n
        cov = p[:, :, None] * np.eye(k) - p[:, :, None] * p[:, None, :]
        hess = np.einsum("ikp,ikl,ilq->pq", jac, cov, jac) / n
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]   # least norm: no jump along a flat direction
        if not free_scale:
            step = np.r_[0.0, step]
        rate, before = 1.0, nll(theta)
        while nll(theta - rate * step) > before - 1e-4 * rate * (grad @ step[-len(grad):]) and rate > 1e-8:
            rate /= 2
        theta = theta - rate * step
        if abs(grad @ step[-len(grad):]) < 1e-12:
            break
    return theta


def screening_metrics(logits, y_true, labels, *, temperature: float, threshold: float,
                      bootstrap: int = 0) -> dict:
    """Everything a clinician and a release manager read for one split."""
    y_true = np.asarray(y_true)
    probs = decision.calibrated_probabilities(logits, temperature)
    raw_probs = decision.calibrated_probabilities(logits, 1.0)
    report = classification_report(y_true, probs.argmax(axis=1), labels)
    abnormal_score = decision.abnormal_probability(probs)
    abnormal = y_true != 0
    sens, spec = sensitivity_specificity(abnormal, abnormal_score, threshold)
    result = {
        "n": int(len(y_true)),
        **report,
        "threshold": float(threshold),
        "abnormal": {"sensitivity": sens, "specificity": spec,
                     "auc": roc_auc(abnormal, abnormal_score)},
        "ece": expected_calibration_error(probs, y_true),
        "ece_uncalibrated": expected_calibration_error(raw_probs, y_true),
        "auc_one_vs_rest": {label: roc_auc(y_true == i, probs[:, i]) for i, label in enumerate(labels)},
    }
    if bootstrap:
        result["abnormal"]["auc_ci95"] = bootstrap_auc_ci(abnormal, abnormal_score, n=bootstrap)
        result["auc_ci95_one_vs_rest"] = {label: bootstrap_auc_ci(y_true == i, probs[:, i], n=bootstrap)
                                          for i, label in enumerate(labels)}
    if "covid" in labels:
        c = labels.index("covid")
        is_covid = y_true == c
        predicted_covid = probs.argmax(axis=1) == c
        result["covid"] = {
            "sensitivity": float(predicted_covid[is_covid].mean()) if is_covid.any() else float("nan"),
            "specificity": float((~predicted_covid[~is_covid]).mean()) if (~is_covid).any() else float("nan"),
            "auc": roc_auc(is_covid, probs[:, c]),
        }
    return result


def per_group_metrics(logits, y_true, groups, labels, *, temperature: float, threshold: float) -> dict:
    """Accuracy, recall per class and abnormal sensitivity/specificity within each group (e.g. the
    data source): one overall score hides a model that has learnt hospitals instead of findings.
    Figures a group cannot have (no abnormal image, say) are None."""
    y_true, groups = np.asarray(y_true), np.asarray(groups)
    probs = decision.calibrated_probabilities(logits, temperature)
    predicted = probs.argmax(axis=1)
    flagged = decision.abnormal_probability(probs) >= threshold
    rate = lambda hits: float(hits.mean()) if hits.size else None
    result = {}
    for group in sorted(set(groups.tolist())):
        inside = groups == group
        y, pred, flag = y_true[inside], predicted[inside], flagged[inside]
        result[group] = {
            "n": int(inside.sum()),
            "accuracy": rate(pred == y),
            "per_class": {labels[c]: {"n": int((y == c).sum()), "recall": rate(pred[y == c] == c)}
                          for c in np.unique(y)},
            "abnormal_sensitivity": rate(flag[y != 0]),
            "abnormal_specificity": rate(~flag[y == 0]),
        }
    return result


Z_95 = 1.959963984540054   # the normal quantile of a two-sided 95 % interval


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: honest at the small counts of a cohort (a
    normal-approximation interval of 20/21 would pass 1.0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def cohort_metrics(logits, y_true, cohorts, labels, *, temperature: float, threshold: float) -> dict:
    """Per cohort (e.g. 'adult pneumonia', train.data.sources.cohort_of): how many images and the
    share decided correctly at the operating threshold with its Wilson interval, i.e. the
    sensitivity of an abnormal cohort (referred) or the specificity of a normal one (not referred).
    Images of no known cohort (None) are left out."""
    y_true = np.asarray(y_true)
    probs = decision.calibrated_probabilities(logits, temperature)
    referred = decision.abnormal_probability(probs) >= threshold
    result = {}
    for cohort in sorted({c for c in cohorts if c}):
        inside = np.array([c == cohort for c in cohorts])
        normal = bool((y_true[inside] == 0).all())
        correct = ~referred[inside] if normal else referred[inside]
        k, n = int(correct.sum()), int(inside.sum())
        result[cohort] = {"n": n, "figure": "specificity" if normal else "sensitivity",
                          "value": k / n, "ci95": list(wilson_interval(k, n))}
    return result
