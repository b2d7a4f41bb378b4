"""The low-detail warning: the detail measure on real films, the threshold training fits, and the
device's "too little fine detail" answer below the model card's threshold."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import run_module, with_card
from edge_app import decision, preprocess
from edge_app.model_card import ModelCard
from train import detail

SPEC = preprocess.InputSpec(size=224)


def _films(shared_data, n=12) -> list:
    return sorted((shared_data / "test").rglob("*.jp*g"))[:n]


def _square(image: Image.Image) -> np.ndarray:
    return preprocess.square8(preprocess.decode(_png(image)), SPEC)


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_blurred_or_enlarged_film_holds_less_detail_than_the_film_as_stored(shared_data):
    for path in _films(shared_data):
        film = Image.open(path).convert("L")
        stored = preprocess.detail(preprocess.load8(path, SPEC))
        blurred = preprocess.detail(_square(film.filter(ImageFilter.GaussianBlur(1.5))))
        small = film.resize((film.width // 2, film.height // 2), Image.Resampling.BILINEAR)
        enlarged = preprocess.detail(_square(small.resize(film.size, Image.Resampling.BILINEAR)))
        assert blurred < 0.8 * stored and enlarged < 0.8 * stored, path.name


def test_exposure_and_contrast_move_detail_far_less_than_blur(shared_data):
    for path in _films(shared_data, 6):
        square = preprocess.load8(path, SPEC)
        stored = preprocess.detail(square)
        blurred = preprocess.detail(np.asarray(Image.fromarray(square).filter(ImageFilter.GaussianBlur(1.5))))
        grey = square.astype(np.float64) / 255
        for changed in (grey ** 1.5, grey ** 0.67, 0.25 + 0.5 * grey):     # darker, brighter, flatter
            moved = abs(preprocess.detail(np.rint(255 * changed).astype(np.uint8)) - stored)
            assert moved < 0.3 * (stored - blurred), path.name


def test_detail_of_flat_and_tiny_images():
    assert preprocess.detail(np.full((32, 32), 128, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="at least 3 x 3"):
        preprocess.detail(np.zeros((2, 40), np.uint8))


def test_the_threshold_is_the_validation_quantile_and_flags_that_share():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (99, 32, 32)).astype(np.uint8)             # noise: the most detail
    soft = np.stack([np.asarray(Image.fromarray(s).filter(ImageFilter.GaussianBlur(2))) for s in sharp[:5]])
    val = np.concatenate([sharp, soft[:1]])                                  # 1 soft square in 100
    result = detail.fit({"val": val, "test": soft})
    scores = [preprocess.detail(s) for s in val]
    assert result["threshold"] == pytest.approx(np.quantile(scores, decision.LOW_DETAIL_QUANTILE))
    assert result["flagged"] == {"val": 0.01, "test": 1.0}


def test_with_sources_the_softest_source_sets_the_threshold():
    """A soft source (here: every square blurred) is not warned about as a whole: the threshold is
    the lowest of the sources' own quantiles; a source too small to estimate one does not count."""
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 256, (100, 32, 32)).astype(np.uint8)
    soft = np.stack([np.asarray(Image.fromarray(s).filter(ImageFilter.GaussianBlur(1))) for s in sharp])
    tiny = np.stack([np.asarray(Image.fromarray(s).filter(ImageFilter.GaussianBlur(3))) for s in sharp[:3]])
    soft_scores = [preprocess.detail(s) for s in soft]
    plain = detail.fit({"val": np.concatenate([sharp, soft])})
    by_source = detail.fit({"val": np.concatenate([sharp, soft])}, ["sharp"] * 100 + ["soft"] * 100)
    assert by_source["threshold"] == pytest.approx(np.quantile(soft_scores, decision.LOW_DETAIL_QUANTILE))
    assert by_source["val_flagged_per_source"] == {"sharp": 0.0, "soft": 0.01}
    assert plain["threshold"] > by_source["threshold"]     # the plain quantile: 2 % of the soft source warned
    with_tiny = detail.fit({"val": np.concatenate([sharp, soft, tiny])},
                           ["sharp"] * 100 + ["soft"] * 100 + ["tiny"] * 3)
    assert with_tiny["threshold"] == by_source["threshold"]
    assert with_tiny["val_flagged_per_source"]["tiny"] == 1.0


def test_leave_one_source_out_refits_without_each_source():
    """Held out, the softest source sets no threshold and is warned about far more than the others."""
    rng = np.random.default_rng(2)
    sharp, soft = rng.normal(0.8, 0.03, 400), rng.normal(0.65, 0.03, 400)
    scores = np.concatenate([sharp, soft])
    splits = np.tile(np.repeat(["train", "val", "test", "val"], 100), 2)
    names = ["sharp"] * 400 + ["soft"] * 400
    result = detail.leave_one_source_out(scores, splits, names)
    assert result["soft"]["threshold"] == pytest.approx(np.quantile(sharp[splits[:400] == "val"], 0.01))
    assert result["sharp"]["threshold"] == pytest.approx(np.quantile(soft[splits[:400] == "val"], 0.01))
    assert result["soft"]["held_out_warned"] > 0.5 > 0.02 > result["sharp"]["held_out_warned"]
    assert result["soft"]["n"] == 400 and 0 <= result["soft"]["other_test_warned"] <= 0.05


def test_training_writes_the_threshold_and_every_variant_carries_it(tiny_run):
    from edge_app.classifier import load_model_file

    card = ModelCard.from_json((tiny_run / "model_card.json").read_text())
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    assert card.thresholds["detail"] == metrics["detail"]["threshold"] > 0
    for model in sorted((tiny_run / "tflite").glob("*.tflite")):
        assert load_model_file(model)[1].thresholds["detail"] == card.thresholds["detail"], model.name


def test_device_says_unreliable_below_the_cards_detail_threshold(tiny_run, tiny_dataset, tmp_path):
    """Here the decision rule and what people see; how well it catches blurred films belongs to the
    real model's robustness benchmark."""
    from edge_app.classifier import Classifier

    model = tiny_run / "tflite" / "fp32.tflite"
    classifier = Classifier(model, accelerator="cpu")
    image = sorted((tiny_dataset / "test").rglob("*.jp*g"))[0]
    measured = classifier.predict(image).detail
    assert measured == preprocess.detail(preprocess.load8(image, classifier.spec))
    results = {}
    for name, limit in (("soft", 2.0 * measured), ("sharp", 0.5 * measured)):
        doctored = with_card(model, tmp_path / f"{name}.tflite", thresholds={
            **classifier.card.thresholds, "detail": limit, "ood": 1e9})
        results[name] = json.loads(run_module("edge_app", "predict", image, "--model", doctored,
                                              "--json").stdout)["results"][0]
    assert results["soft"]["decision"] == "unreliable" and results["soft"]["warning"] == "low_detail"
    assert "less fine detail" in results["soft"]["message"]
    assert results["sharp"]["decision"] in ("refer", "no_abnormality") and results["sharp"]["warning"] is None
    assert results["soft"]["probabilities"] == results["sharp"]["probabilities"]
    human = run_module("edge_app", "predict", image, "--model", tmp_path / "soft.tflite").stdout
    assert "LESS FINE DETAIL" in human and "no label: too little fine detail" in human


def test_commissioning_counts_the_low_detail_answers(tiny_run, tiny_dataset, tmp_path):
    from edge_app.classifier import Classifier

    model = tiny_run / "tflite" / "fp32.tflite"
    classifier = Classifier(model, accelerator="cpu")
    images = sorted((tiny_dataset / "test").rglob("*.jp*g"))
    scores = sorted(classifier.predict(p).detail for p in images)
    limit = (scores[1] + scores[2]) / 2                    # the two softest films fall below
    doctored = with_card(model, tmp_path / "m.tflite", thresholds={**classifier.card.thresholds,
                                                                   "detail": limit, "ood": 1e9})
    out = tmp_path / "report"
    run_module("edge_app", "validate", "--model", doctored, tiny_dataset / "test", "--out", out)
    report = json.loads((out / "validation.json").read_text())
    warned = [r for r in report["per_image"] if r["warning"] == "low_detail"]
    assert report["low_detail"]["share"]["k"] == len(warned) == 2
    assert all(r["decision"] == "unreliable" and r["detail"] < limit for r in warned)
    assert "too little fine detail" in (out / "validation.md").read_text()


def test_the_history_records_why_a_screening_was_unreliable(tiny_run, tiny_dataset, tmp_path):
    from edge_app.classifier import Classifier
    from edge_app.history import History
    from edge_app.screening import screen

    model = tiny_run / "tflite" / "fp32.tflite"
    image = sorted((tiny_dataset / "test").rglob("*.jp*g"))[0]
    card = Classifier(model, accelerator="cpu").card
    doctored = with_card(model, tmp_path / "soft.tflite", thresholds={**card.thresholds, "detail": 1e9, "ood": 1e9})
    history = History(tmp_path / "h.sqlite3")
    outcome = screen(Classifier(doctored, accelerator="cpu"), history, image)
    row = history.get(outcome.screening.id)
    assert (row.decision, row.warning) == ("unreliable", "low_detail") == (outcome.prediction.decision,
                                                                          outcome.prediction.warning)
    assert [s.id for s in history.search("low_detail")] == [row.id]
