"""The out-of-distribution score: the numpy reference, the same number inside the exported graph,
and the device's warning above the model card's threshold."""
import json

import numpy as np
import pytest

from conftest import run_module, with_card
from train import ood


def test_ood_score_is_small_inside_and_large_outside_the_training_distribution():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(5, 40))                       # training features live on a 5-d subspace
    train = rng.normal(size=(500, 5)) @ basis + 0.05 * rng.normal(size=(500, 40))
    detector = ood.fit(train, components=5)
    inside = ood.score(detector, rng.normal(size=(200, 5)) @ basis + 0.05 * rng.normal(size=(200, 40)))
    off_subspace = ood.score(detector, rng.normal(size=(200, 40)))       # same scale, other directions
    far_along = ood.score(detector, 20 * rng.normal(size=(200, 5)) @ basis)  # right directions, too far
    limit = ood.threshold(inside, 0.99)
    assert np.median(inside) < 2 * 45                      # ~chi-square: k + (d - k) residual terms
    assert (off_subspace > limit).all() and (far_along > limit).mean() > 0.99


def test_exported_model_computes_the_same_ood_score(tiny_run, tiny_dataset):
    import train  # noqa: F401
    import tf_keras as keras
    from edge_app.classifier import Classifier
    from edge_app.graph_names import POOL
    from edge_app.model_card import ModelCard
    from edge_app.preprocess import preprocess

    card = ModelCard.from_json((tiny_run / "model_card.json").read_text())
    assert card.thresholds["ood"] > 0
    detector = ood.OodModel.load(tiny_run / "ood.npz")
    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    pooled = keras.Model(model.input, model.get_layer(POOL).output)
    images = sorted((tiny_dataset / "test").rglob("*.jp*g"))
    x = np.stack([preprocess(p, card.input) for p in images])
    expected = ood.score(detector, pooled.predict(x, verbose=0))
    scores = {}
    for variant in ("fp32", "int8"):
        classifier = Classifier(tiny_run / "tflite" / f"{variant}.tflite", accelerator="cpu")
        scores[variant] = np.array([classifier.predict(p).ood_score for p in images])
    np.testing.assert_allclose(scores["fp32"], expected, rtol=1e-3)
    # int8 quantises the whole network, so its features, and scores, move: they must still rank
    # images alike, and its own threshold is refitted in conversion (next test)
    assert np.corrcoef(scores["int8"], expected)[0, 1] > 0.9


def test_each_variant_corrects_the_cards_ood_threshold_for_its_own_drift(tiny_run):
    from convert import parity
    from edge_app.classifier import load_model_file
    from train.data import run_splits
    from train.pipeline import load_images, model_inputs

    conversion = json.loads((tiny_run / "reports" / "conversion.json").read_text())
    card = json.loads((tiny_run / "model_card.json").read_text())
    val = run_splits.load(tiny_run)[0].split("val")
    _, int8_card = load_model_file(tiny_run / "tflite" / "int8.tflite")
    x = model_inputs(load_images(val, int8_card.input, progress=False), int8_card.input)
    scores = parity.variant_ood_scores(tiny_run / "tflite" / "int8.tflite", x, desc="", progress=False)
    # the card's threshold is the run's validation quantile, so the int8 one is its own quantile
    assert int8_card.thresholds["ood"] == pytest.approx(ood.threshold(scores), rel=1e-3)
    assert conversion["variants"]["int8"]["ood"]["drift"] == pytest.approx(
        int8_card.thresholds["ood"] / card["thresholds"]["ood"])
    assert conversion["variants"]["int8"]["ood"]["threshold"] == pytest.approx(int8_card.thresholds["ood"])
    assert conversion["variants"]["int8"]["ood"]["run_threshold"] == card["thresholds"]["ood"]
    # QAT moved the features: its warning starts from its own refitted threshold, not the run's
    assert conversion["variants"]["qat"]["ood"]["run_threshold"] != card["thresholds"]["ood"]



def test_device_says_unreliable_above_the_cards_ood_threshold(tiny_run, tiny_dataset, tmp_path):
    """How well the score separates belongs to the real model's report; here: the decision rule."""
    from edge_app.classifier import Classifier

    model = tiny_run / "tflite" / "fp32.tflite"
    classifier = Classifier(model, accelerator="cpu")
    image = sorted((tiny_dataset / "test").rglob("*.jp*g"))[0]
    score = classifier.predict(image).ood_score
    decisions = {}
    for name, limit in (("below", 0.5 * score), ("above", 2.0 * score)):
        doctored = with_card(model, tmp_path / f"{name}.tflite",
                             thresholds={**classifier.card.thresholds, "ood": limit})
        out = json.loads(run_module("edge_app", "predict", image, "--model", doctored, "--json").stdout)
        decisions[name] = out["results"][0]
    assert decisions["below"]["decision"] == "unreliable"
    assert "unlike the images the model was trained on" in decisions["below"]["message"]
    assert decisions["above"]["decision"] in ("refer", "no_abnormality")
    assert decisions["below"]["probabilities"] == decisions["above"]["probabilities"]
    human = run_module("edge_app", "predict", image, "--model", tmp_path / "below.tflite").stdout
    assert "UNLIKE THE IMAGES" in human and "most likely" not in human


def test_every_variant_of_the_trained_model_carries_the_ood_warning(tiny_run):
    """int8 too, and the fine-tuned ones (QAT, pruned), whose OOD detector is refitted on their own
    moved features at conversion."""
    from edge_app.classifier import Classifier

    carried = {p.stem: Classifier(p, accelerator="cpu").info["ood_warning"]
               for p in sorted((tiny_run / "tflite").glob("*.tflite"))}
    assert carried == {name: True for name in carried} and "qat" in carried and "pruned-qat" in carried
