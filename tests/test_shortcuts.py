"""The shortcut probe on constructed features: it must find a source that the features encode,
and not invent one that they do not."""
import numpy as np

from train.shortcuts import source_probe

LABELS = ("normal", "pneumonia", "covid")


def _images(n, rng):
    labels = rng.integers(0, 2, n)                         # normal or pneumonia
    sources = np.where(rng.random(n) < 0.5, "a", "b")      # both hospitals send both classes
    features = rng.normal(size=(n, 8))
    features[:, 0] += 3.0 * labels                         # the finding
    return features, sources, labels


def test_probe_flags_features_that_encode_the_hospital():
    rng = np.random.default_rng(0)
    (f_train, s_train, y_train), (f_test, s_test, y_test) = _images(400, rng), _images(200, rng)
    for f, s in ((f_train, s_train), (f_test, s_test)):
        f[:, 1] += np.where(s == "a", 4.0, -4.0)           # the scanner leaves its mark
    probe = source_probe(f_train, s_train, y_train, f_test, s_test, y_test, LABELS)
    assert probe["sources"] == ["a", "b"]
    assert probe["accuracy"] > 0.97
    assert probe["within_class"]["normal"]["accuracy"] > 0.97
    assert probe["within_class"]["normal"]["flagged"] and probe["flagged"]
    assert "covid" not in probe["within_class"]            # no covid images: nothing to tell apart


def test_probe_does_not_flag_features_blind_to_the_hospital():
    rng = np.random.default_rng(1)
    (f_train, s_train, y_train), (f_test, s_test, y_test) = _images(400, rng), _images(200, rng)
    probe = source_probe(f_train, s_train, y_train, f_test, s_test, y_test, LABELS)
    assert probe["accuracy"] < 0.65                        # a coin flip between two hospitals
    assert not probe["flagged"]
