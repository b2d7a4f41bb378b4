"""Metrics against values computed by hand on fixed predictions."""
import numpy as np
import pytest

from edge_app import decision, metrics


def test_classification_report_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    r = metrics.classification_report(y_true, y_pred, ("normal", "pneumonia", "covid"))
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    # normal: P=2/2 R=2/3; pneumonia: P=1/2 R=1/2; covid: P=1/2 R=1
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert r["per_class"]["normal"]["precision"] == pytest.approx(1.0)
    assert r["per_class"]["covid"]["recall"] == pytest.approx(1.0)
    assert r["per_class"]["pneumonia"]["support"] == 2
    assert r["macro_f1"] == pytest.approx(np.mean(f1))


def test_auc_by_hand_with_ties():
    positive = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.5, 0.5, 0.1, 0.8, 0.3]
    # pairs (pos, neg): 3 x 3 = 9; pos 0.9 beats all 3; 0.8 beats all 3; 0.5 beats 0.1, 0.3, ties 0.5
    assert metrics.roc_auc(positive, scores) == pytest.approx((3 + 3 + 2.5) / 9)
    assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(0)
    positive = rng.random(500) < 0.4
    scores = np.where(positive, rng.normal(0.7, 0.15, 500), rng.normal(0.4, 0.15, 500))
    t = metrics.threshold_for_sensitivity(positive, scores, 0.95)
    sens, spec = metrics.sensitivity_specificity(positive, scores, t)
    assert sens >= 0.95
    # the highest such threshold: a hair higher and sensitivity falls below the target
    sens_above, _ = metrics.sensitivity_specificity(positive, scores, np.nextafter(t, 1.0))
    assert sens_above < 0.95
    assert 0 < spec < 1


def test_temperature_scaling_lowers_ece_on_overconfident_model():
    rng = np.random.default_rng(1)
    n, k = 2000, 3
    y = rng.integers(0, k, n)
    true_logits = rng.normal(0, 1, (n, k))
    true_logits[np.arange(n), y] += 1.0          # a modestly accurate model ...
    overconfident = true_logits * 4.0            # ... that is far too sure of itself
    t = metrics.fit_temperature(overconfident, y)
    before = metrics.expected_calibration_error(decision.calibrated_probabilities(overconfident), y)
    after = metrics.expected_calibration_error(decision.calibrated_probabilities(overconfident, t), y)
    assert t == pytest.approx(4.0, rel=0.25)
    assert after < before / 2


def test_class_offsets_undo_a_prior_shift_that_temperature_cannot():
    """A model trained with class weights over-calls the rare classes: its logits are the true
    ones plus a constant per class. The fitted offsets remove that shift (up to the temperature),
    give the true posterior's argmax back, and are ~0 when fitted again on the corrected logits."""
    rng = np.random.default_rng(2)
    n, k = 4000, 3
    true_logits = rng.normal(0, 2, (n, k)) + np.log([0.6, 0.3, 0.1])   # calibrated: y is drawn from them
    p = decision.calibrated_probabilities(true_logits)
    y = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)
    shift = np.array([0.0, 1.5, 2.5])
    weighted = (true_logits + shift) * 2.0          # over-calls pneumonia and COVID-19, and overconfident
    offsets = metrics.fit_class_offsets(weighted, y)
    assert offsets[0] == 0.0
    np.testing.assert_allclose(offsets, -shift * 2.0, atol=0.4)
    corrected = weighted + offsets
    t = metrics.fit_temperature(corrected, y)
    nll = lambda z, t: -np.mean(np.log(decision.calibrated_probabilities(z, t)[np.arange(n), y]))
    assert nll(corrected, t) < nll(weighted, metrics.fit_temperature(weighted, y)) - 0.05
    accuracy = lambda z: (z.argmax(1) == y).mean()
    assert accuracy(corrected) > accuracy(weighted) + 0.05
    np.testing.assert_allclose(metrics.fit_class_offsets(corrected, y), 0.0, atol=1e-6)


def test_class_offsets_need_every_class_in_the_labels():
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[2\]"):
        metrics.fit_class_offsets(np.zeros((4, 3)), np.array([0, 1, 0, 1]))


def test_screening_metrics_blocks():
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]))
    y = np.array([0, 1, 2, 1])
    m = metrics.screening_metrics(logits, y, ("normal", "pneumonia", "covid"), temperature=1.0,
                                  threshold=0.5)
    # abnormal scores 0.2, 0.8, 0.9, 0.4 -> flagged: no, yes, yes, no
    assert m["abnormal"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["abnormal"]["specificity"] == pytest.approx(1.0)
    assert m["covid"]["sensitivity"] == pytest.approx(1.0)
    assert set(m) >= {"macro_f1", "accuracy", "per_class", "abnormal", "covid", "threshold", "ece"}


def test_per_source_metrics_by_hand():
    # same four images as above, from two hospitals: "a" holds images 0 and 1, "b" images 2 and 3
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]))
    y = np.array([0, 1, 2, 1])
    m = metrics.per_group_metrics(logits, y, ["a", "a", "b", "b"], ("normal", "pneumonia", "covid"),
                                  temperature=1.0, threshold=0.5)
    assert m["a"] == {"n": 2, "accuracy": 1.0,
                      "per_class": {"normal": {"n": 1, "recall": 1.0}, "pneumonia": {"n": 1, "recall": 1.0}},
                      "abnormal_sensitivity": 1.0, "abnormal_specificity": 1.0}
    # "b" has no normal image: its specificity does not exist, and is not reported as 0 or 1
    assert m["b"]["accuracy"] == 0.5 and m["b"]["abnormal_specificity"] is None
    assert m["b"]["abnormal_sensitivity"] == 0.5
    assert m["b"]["per_class"] == {"pneumonia": {"n": 1, "recall": 0.0}, "covid": {"n": 1, "recall": 1.0}}


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553-0.3662, 15/148 -> 0.0624-0.1605
    assert metrics.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert metrics.wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)   # never below 0, unlike the Wald interval
    assert metrics.wilson_interval(0, 0) != metrics.wilson_interval(0, 0)  # no images: no interval (nan)


def test_cohort_metrics_by_hand():
    from train.data import sources
    # two adult pneumonias (one referred), two adult normals (one referred), a child normal, an unknown source
    logits = np.log(np.array([[0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.95, 0.03, 0.02],
                              [0.97, 0.02, 0.01], [0.1, 0.1, 0.8]]))
    y = np.array([1, 1, 0, 0, 0, 2])
    rsna, kermany = "jas127/PS_Covid19", "lecuong1502/BTL_Machine_Learning"
    cohorts = [sources.cohort_of(rsna, "pneumonia")] * 2 + [sources.cohort_of("rsna-normal", "normal")] * 2 \
        + [sources.cohort_of(kermany, "normal"), sources.cohort_of("my-hospital", "covid")]
    assert cohorts[0] == "adult pneumonia" and cohorts[4] == "child normal" and cohorts[5] is None
    m = metrics.cohort_metrics(logits, y, cohorts, ("normal", "pneumonia", "covid"), temperature=1.0, threshold=0.5)
    assert set(m) == {"adult pneumonia", "adult normal", "child normal"}
    assert m["adult pneumonia"]["figure"] == "sensitivity" and m["adult pneumonia"]["value"] == 0.5
    assert m["adult normal"]["figure"] == "specificity" and m["adult normal"]["value"] == 0.5
    assert m["child normal"] == {"n": 1, "figure": "specificity", "value": 1.0,
                                 "ci95": list(metrics.wilson_interval(1, 1))}


def test_every_cohort_threshold_reaches_the_target_in_the_small_cohort_too():
    # 20 child pneumonias scored high, 10 adult pneumonias scored low, 10 normals in between
    scores = np.r_[np.linspace(0.8, 0.99, 20), np.linspace(0.2, 0.6, 10), np.linspace(0.1, 0.5, 10)]
    y = np.r_[np.ones(30, int), np.zeros(10, int)]
    cohorts = ["child pneumonia"] * 20 + ["adult pneumonia"] * 10 + ["adult normal"] * 10
    overall = metrics.operating_threshold(y, scores, cohorts, 0.9)
    every = metrics.operating_threshold(y, scores, cohorts, 0.9, rule="every_cohort")
    assert overall == metrics.threshold_for_sensitivity(y != 0, scores, 0.9)
    adult = scores[20:30]
    assert (adult >= overall).mean() < 0.9 and (adult >= every).mean() >= 0.9
    assert every == metrics.threshold_for_sensitivity(np.ones(10, bool), adult, 0.9)
    # a cohort below min_cohort images does not move the threshold
    assert metrics.operating_threshold(y, scores, cohorts, 0.9, rule="every_cohort", min_cohort=11) == overall
    with pytest.raises(ValueError, match="unknown threshold rule"):
        metrics.operating_threshold(y, scores, cohorts, 0.9, rule="worst")
