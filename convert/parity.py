"""The parity gate: every TFLite variant must decide like the Keras model it came from.

Each variant is run through LiteRT (the device's runtime) on the validation and test splits
and compared with the Keras model on the same images, decision by decision:

* class agreement (top-1) and the referral decisions flipped at the operating threshold (each
  model at its own card's temperature and threshold: a fine-tuned variant has refitted both);
* max and mean |delta P(abnormal)|, and which images flipped, with the Keras model's own margin;
* COVID-19 images the Keras model found and the variant lost;
* the paired bootstrap 95 % CI of the difference (variant - Keras) in macro-F1, abnormal
  sensitivity and COVID-19 sensitivity: the same resampled images for both models.

The budgets are in benchmarks/gates.toml, `[conversion.VARIANT]`. A variant fails when it
disagrees or flips more than its budget (images the Keras model decided within
`excused_margin` do not count), loses a COVID-19 image beyond `max_covid_lost`, or when a
metric's drop exceeds `max_drop_points` AND its CI excludes no loss: a real loss, not one
borderline image moving on a small split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_app import decision
from edge_app.classifier import LOGITS, ood_score_of
from edge_app.runtime import open_backend
from edge_app import metrics

CI_METRICS = ("macro_f1", "abnormal_sensitivity", "covid_sensitivity")
BUDGET_KEYS = {"min_agreement", "max_flipped", "excused_margin", "max_drop_points", "max_covid_lost"}


def run_variant(model_bytes: bytes, inputs: np.ndarray, *, desc: str, progress: bool = True) -> dict:
    """A .tflite model's logits and OOD scores (edge_app.classifier.ood_score_of; None without
    the OOD outputs) for preprocessed model inputs, one image per call on the CPU through LiteRT,
    as the device runs it."""
    backend, _ = open_backend(model_bytes, accelerator="cpu")
    logits, scores = [], []
    for i in tqdm(range(len(inputs)), desc=desc, unit="img", disable=not progress):
        outputs = backend.run(inputs[i:i + 1])
        logits.append(outputs[LOGITS])
        scores.append(ood_score_of(outputs))
    return {"logits": np.concatenate(logits), "ood": None if scores[0] is None else np.array(scores)}


def variant_ood_scores(model_path, inputs: np.ndarray, *, desc: str, progress: bool = True) -> np.ndarray:
    """The out-of-distribution score of a .tflite file per input."""
    return run_variant(Path(model_path).read_bytes(), inputs, desc=desc, progress=progress)["ood"]


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


def budgets_of(gates: dict, variant: str) -> dict:
    """A variant's parity budgets from the gates file's [conversion.*] tables (pruned-* share
    [conversion.pruned]); a variant without a table is an error, never waved through."""
    tables = gates.get("conversion", {})
    key = "pruned" if variant.startswith("pruned") else variant
    if key not in tables:
        raise ValueError(f"no [conversion.{key}] budgets in the gates file; it has {sorted(tables)}")
    budget = tables[key]
    missing = BUDGET_KEYS - set(budget)
    if missing:
        raise ValueError(f"[conversion.{key}] lacks {sorted(missing)}")
    return {k: float(v) for k, v in budget.items()}


class Decisions:
    """What one model decides on one split: class, P(abnormal), referral, at its card's calibration."""

    def __init__(self, logits: np.ndarray, temperature: float, threshold: float):
        probs = decision.calibrated_probabilities(logits, temperature)
        self.top = probs.argmax(axis=1)
        self.p_abnormal = decision.abnormal_probability(probs)
        self.refer = self.p_abnormal >= threshold
        ranked = np.sort(probs, axis=1)
        self.class_margin = ranked[:, -1] - ranked[:, -2]          # how clearly the class was decided
        self.decision_margin = np.abs(self.p_abnormal - threshold)  # how clearly the referral was


def _metric_samples(d: Decisions, y: np.ndarray, rows: np.ndarray, num_classes: int, covid: int | None) -> dict:
    """macro-F1, abnormal sensitivity and COVID-19 sensitivity of each bootstrap sample (rows: (B, n))."""
    yb, pb = y[rows], d.top[rows]
    out = {}
    tp = np.stack([((yb == c) & (pb == c)).sum(1) for c in range(num_classes)], 1).astype(float)
    support = np.stack([(yb == c).sum(1) for c in range(num_classes)], 1).astype(float)
    predicted = np.stack([(pb == c).sum(1) for c in range(num_classes)], 1).astype(float)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)
    out["macro_f1"] = np.where(support > 0, f1, np.nan)
    out["macro_f1"] = np.nanmean(out["macro_f1"], axis=1)
    abnormal = yb != 0
    out["abnormal_sensitivity"] = (d.refer[rows] & abnormal).sum(1) / np.maximum(abnormal.sum(1), 1)
    if covid is not None:
        is_covid = yb == covid
        out["covid_sensitivity"] = (is_covid & (pb == covid)).sum(1) / np.maximum(is_covid.sum(1), 1)
    return out


def paired_bootstrap(reference: Decisions, candidate: Decisions, y: np.ndarray, labels, *,
                     resamples: int, seed: int) -> dict:
    """Per metric: the difference candidate - reference in points and its paired bootstrap 95 % CI."""
    covid = labels.index("covid") if "covid" in labels else None
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(y), size=(resamples, len(y)))
    every = np.arange(len(y))[None]
    ref, cand = (_metric_samples(d, y, rows, len(labels), covid) for d in (reference, candidate))
    ref0, cand0 = (_metric_samples(d, y, every, len(labels), covid) for d in (reference, candidate))
    result = {}
    for m in ref:
        diff = 100.0 * (cand[m] - ref[m])
        low, high = np.nanpercentile(diff, [2.5, 97.5])
        result[m] = {"diff_points": float(100.0 * (cand0[m][0] - ref0[m][0])),
                     "ci95_points": [float(low), float(high)]}
    return result


def compare(y: np.ndarray, labels, reference_logits: np.ndarray, reference_card, candidate_logits: np.ndarray,
            candidate_card, budget: dict, *, split: str, resamples: int = 2000, seed: int = 0) -> dict:
    """One variant against the Keras model on one split: agreement, flips, |delta p|, CIs, failures."""
    ref = Decisions(reference_logits, reference_card.temperature, reference_card.abnormal_threshold)
    cand = Decisions(candidate_logits, candidate_card.temperature, candidate_card.abnormal_threshold)
    n = len(y)
    disagree = np.flatnonzero(ref.top != cand.top)
    flipped = np.flatnonzero(ref.refer != cand.refer)
    excused = budget["excused_margin"]
    counted_disagree = int((ref.class_margin[disagree] >= excused).sum())
    counted_flips = int((ref.decision_margin[flipped] >= excused).sum())
    delta_p = np.abs(cand.p_abnormal - ref.p_abnormal)
    covid = labels.index("covid") if "covid" in labels else None
    covid_lost = ([] if covid is None else
                  np.flatnonzero((y == covid) & (ref.top == covid) & (cand.top != covid)).tolist())
    cis = paired_bootstrap(ref, cand, y, labels, resamples=resamples, seed=seed)
    agreement = 1.0 - counted_disagree / n
    failures = []
    if agreement < budget["min_agreement"]:
        failures.append(f"{split}: class agreement {agreement:.4f} below {budget['min_agreement']:.4f} "
                        f"({counted_disagree} of {n} images decided by a margin >= {excused:g} changed class)")
    if counted_flips / n > budget["max_flipped"]:
        failures.append(f"{split}: {counted_flips} of {n} referral decisions flipped ({counted_flips / n:.2%}; "
                        f"budget {budget['max_flipped']:.2%})")
    if len(covid_lost) > budget["max_covid_lost"]:
        failures.append(f"{split}: {len(covid_lost)} COVID-19 image(s) the Keras model found are lost "
                        f"(budget {budget['max_covid_lost']:g})")
    for m, c in cis.items():
        drop, (_, high) = -c["diff_points"], c["ci95_points"]
        if drop > budget["max_drop_points"] and high < 0:
            failures.append(f"{split}: {m} dropped {drop:.2f} points, CI95 of the difference "
                            f"[{c['ci95_points'][0]:+.2f}, {high:+.2f}] excludes no loss "
                            f"(budget {budget['max_drop_points']:g})")
    return {
        "n": n,
        "agreement": float((ref.top == cand.top).mean()),
        "agreement_counted": agreement,
        "decisions_flipped": int(len(flipped)),
        "decisions_flipped_counted": counted_flips,
        "max_abs_dp_abnormal": float(delta_p.max()),
        "mean_abs_dp_abnormal": float(delta_p.mean()),
        "max_abs_logit_diff": float(np.abs(reference_logits - candidate_logits).max()),
        "mean_logit_shift": {label: float(d) for label, d in
                             zip(labels, np.mean(candidate_logits - reference_logits, axis=0))},
        "bootstrap_ci95": cis,
        "covid_lost": covid_lost,
        "flips": [{"index": int(i), "kind": kind, "true": int(y[i]), "keras": int(ref.top[i]),
                   "variant": int(cand.top[i]), "keras_p_abnormal": float(ref.p_abnormal[i]),
                   "variant_p_abnormal": float(cand.p_abnormal[i]),
                   "keras_class_margin": float(ref.class_margin[i]),
                   "keras_decision_margin": float(ref.decision_margin[i])}
                  for kind, indices in (("class", disagree), ("referral", flipped)) for i in indices],
        "budget": budget,
        "failures": failures,
    }


def gate(per_split: dict[str, dict]) -> dict:
    """One verdict over the splits' comparisons."""
    failures = [f for c in per_split.values() for f in c["failures"]]
    return {"passed": not failures, "failures": failures}
