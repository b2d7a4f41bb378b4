"""From real X-rays to a classified image on the device side, the way a newcomer runs it."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from edge_app.model_card import ModelCard


def test_training_run_writes_model_card_and_reports(tiny_run):
    card = ModelCard.from_json((tiny_run / "model_card.json").read_text())
    assert card.labels == ("normal", "pneumonia", "covid")
    assert card.input.size == 64 and card.input.channels == 1
    assert 0.0 <= card.abnormal_threshold <= 1.0 and card.temperature > 0
    assert len(card.dataset["fingerprint"]) == 64
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    for split in ("val", "test"):
        m = metrics[split]
        assert m["n"] == 18
        assert {"macro_f1", "accuracy", "per_class", "abnormal", "covid", "threshold", "ece"} <= set(m)
        assert {"sensitivity", "specificity", "auc"} <= set(m["abnormal"])
        assert sum(g["n"] for g in m["per_source"].values()) == m["n"]
    # the threshold was chosen on validation to reach the target sensitivity there
    assert metrics["val"]["abnormal"]["sensitivity"] >= 0.95
    # the class offsets are in the saved logits: fitted again on them, there is nothing left to correct
    from edge_app.metrics import fit_class_offsets
    assert list(metrics["class_offsets"]) == list(card.labels) and metrics["class_offsets"]["normal"] == 0.0
    saved = np.load(tiny_run / "reports" / "predictions.npz")
    np.testing.assert_allclose(fit_class_offsets(saved["val_logits"], saved["val_labels"]), 0.0, atol=1e-3)
    for plot in ("training_curves.png", "confusion_test.png", "roc_test.png", "reliability_test.png",
                 "gradcam_test.png"):
        assert (tiny_run / "reports" / plot).stat().st_size > 1000
    assert (tiny_run / "model.keras").is_file()


def test_conversion_writes_every_variant_with_report(tiny_run):
    conversion = json.loads((tiny_run / "reports" / "conversion.json").read_text())
    assert {"fp32", "dynamic", "fp16", "int8"} <= set(conversion["variants"])
    for name, v in conversion["variants"].items():
        assert (tiny_run / "tflite" / f"{name}.tflite").stat().st_size == v["bytes"]
        assert 0.0 <= v["splits"]["test"]["agreement"] <= 1.0
    # fp32 is the same network: it must agree with Keras on every test image
    assert conversion["variants"]["fp32"]["splits"]["test"]["agreement"] == 1.0
    assert conversion["variants"]["fp32"]["splits"]["test"]["max_abs_logit_diff"] < 1e-3
    assert conversion["variants"]["int8"]["bytes"] < conversion["variants"]["fp32"]["bytes"]


def test_device_cli_classifies_a_real_xray(tiny_run, tiny_dataset):
    image = sorted((tiny_dataset / "test" / "pneumonia").iterdir())[0]
    result = run_module("edge_app", "predict", image, "--model", tiny_run / "tflite" / "int8.tflite", "--json")
    out = json.loads(result.stdout)
    (r,) = out["results"]
    assert r["label"] in ("normal", "pneumonia", "covid")
    assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-6
    assert r["decision"] in ("refer", "no_abnormality")
    assert (r["abnormal_probability"] >= r["threshold"]) == (r["decision"] == "refer")
    assert r["backend"].startswith("litert")
    assert set(r["timings_ms"]) == {"decode", "preprocess", "lungs", "inference", "postprocess", "total"}
    human = run_module("edge_app", "predict", image, "--model", tiny_run / "tflite" / "int8.tflite")
    assert "Screening aid, not a diagnosis" in human.stdout


def test_device_side_never_imports_tensorflow(tiny_run, tiny_dataset):
    image = sorted((tiny_dataset / "test" / "covid").iterdir())[0]
    code = (
        "import sys, edge_app.cli as cli\n"
        f"rc = cli.main(['predict', {str(image)!r}, '--model', {str(tiny_run / 'tflite' / 'fp32.tflite')!r}])\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')]\n"
        "assert rc == 0 and not bad, (rc, bad[:5])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_device_matches_keras_on_the_same_file(tiny_run, tiny_dataset):
    """The fp32 model on the device gives the Keras model's probabilities for a real file."""
    import train  # noqa: F401
    import tf_keras as keras

    from edge_app import decision, preprocess
    from edge_app.classifier import Classifier

    image = sorted((tiny_dataset / "test" / "normal").iterdir())[0]
    classifier = Classifier(tiny_run / "tflite" / "fp32.tflite", accelerator="cpu")
    device = classifier.predict(image)
    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    x = preprocess.preprocess(image, classifier.spec)[None]
    keras_probs = decision.calibrated_probabilities(model.predict(x, verbose=0)[0], classifier.card.temperature)
    np.testing.assert_allclose(list(device.probabilities.values()), keras_probs, atol=1e-4)


def test_runs_compare_as_one_table(tiny_run, tmp_path):
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    out = run_module("train.compare", tiny_run).stdout.splitlines()
    config = json.loads((tiny_run / "config.json").read_text())
    assert out[0].startswith("| run | model | size | strategy | seed | shortcut measures | macro-F1")
    assert out[2].startswith(f"| {tiny_run.name} | cnn | 64 | full | {config['seed']} | input_borders trim | "
                             f"{metrics['test']['macro_f1']:.3f} |")
    recipes = out[out.index("| runs | seeds | shortcut measures | macro-F1 | abn. sens. | abn. spec. | abn. AUC "
                            "| COVID sens. | adult pneumonia sens. | adult normal spec. | holdout sens. "
                            "| holdout spec. | holdout AUC | holdout AUC vs test |") + 2]
    assert recipes.startswith(f"| {tiny_run.name} | 1 | input_borders trim | {metrics['test']['macro_f1']:.3f} |")
    refused = run_module("train.compare", tmp_path, check=False)
    assert refused.returncode == 2 and "not a finished training run" in refused.stderr
    plot = tmp_path / "recipes.png"
    run_module("train.compare", tiny_run, "--plot", plot)
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 200


def test_test_time_views_of_a_lung_cropping_run(tiny_dataset, lung_segmenter, tiny_run, tmp_path, monkeypatch):
    """train.tta: the view at the margin the run trained with is the run itself (its saved logits,
    its metrics after the refit); another margin is another view; a film today's lung step refuses is
    left out of every view; a run that does not crop is refused."""
    from train import tta

    run = tmp_path / "lungs-run"
    run_module("train", "--model", "cnn", "--data", tiny_dataset, "--out", run, "--image-size", "64",
               "--epochs", "1", "--batch-size", "8", "--input-contrast", "none", "--bootstrap", "0",
               "--no-progress", "--lung-crop", "box", "--lung-model", lung_segmenter)
    logits, y, records, labels, config = tta.view_logits(run, (0.1, 0.25), progress=False)
    saved = np.load(run / "reports" / "predictions.npz")
    np.testing.assert_allclose(logits[0.1]["test"], saved["test_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y["test"], saved["test_labels"])
    assert np.abs(logits[0.25]["test"] - logits[0.1]["test"]).max() > 1e-4
    first = records["test"][0]      # as if a check added after the run refused its first test film
    with monkeypatch.context() as m:
        m.setattr(tta, "lung_refusals", lambda recs, spec, progress: [{"file": str(first.path)}])
        fewer, _, kept, *_ = tta.view_logits(run, (0.1,), progress=False)
    assert kept["test"] == records["test"][1:] and kept["val"] == records["val"]
    np.testing.assert_allclose(fewer[0.1]["test"], logits[0.1]["test"][1:], rtol=1e-5, atol=1e-5)
    out = run_module("train.tta", run, "--margins", "0.1", "0.25", "--no-progress").stdout
    result = json.loads((run / "reports" / "tta.json").read_text())
    metrics = json.loads((run / "reports" / "metrics.json").read_text())
    assert set(result["rows"]) == {"margin 0.1", "margin 0.25", "mean of 2 views"}
    assert result["rows"]["margin 0.1"]["test"]["macro_f1"] == pytest.approx(metrics["test"]["macro_f1"])
    assert result["rows"]["margin 0.1"]["temperature"] == pytest.approx(metrics["temperature"], rel=1e-3)
    assert "| lungs-run | mean of 2 views |" in out
    refused = run_module("train.tta", tiny_run, check=False)
    assert refused.returncode == 2 and "does not crop to the lung field" in refused.stderr
    # train.compare names the segmenter a lung-cropping recipe used
    assert f"lung_crop box, segmenter {lung_segmenter} |" in run_module("train.compare", run).stdout


def test_an_ensemble_of_a_run_with_itself_scores_as_the_run(tiny_run, tmp_path):
    """train.ensemble refits temperature and threshold on val like training: averaging a run with
    itself gives the run's own logits, scaled by the refitted temperature. That is 1 where the run's
    own fit was free; a two-epoch model that answers almost a constant can have its temperature
    clamped at the fit's lower bound (0.05), and the ensemble then sharpens further, which moves the
    ranking of a 3-class P(abnormal): its AUC is the run's logits' at the product of the two.
    Members with other splits are refused."""
    from edge_app import decision
    from edge_app import metrics as edge_metrics

    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    out = run_module("train.ensemble", tiny_run, tiny_run, "--json", tmp_path / "ensemble.json").stdout
    ensemble = json.loads((tmp_path / "ensemble.json").read_text())
    assert ensemble["test"]["macro_f1"] == metrics["test"]["macro_f1"]
    own = json.loads((tiny_run / "model_card.json").read_text())["temperature"]
    saved = np.load(tiny_run / "reports" / "predictions.npz")
    p = decision.calibrated_probabilities(saved["test_logits"], own * ensemble["temperature"])
    assert ensemble["test"]["abnormal"]["auc"] == pytest.approx(
        edge_metrics.roc_auc(saved["test_labels"] != 0, decision.abnormal_probability(p)), abs=1e-9)
    if own > 0.051:   # the run's own fit was free: the ensemble is the run
        assert ensemble["test"]["abnormal"]["auc"] == pytest.approx(metrics["test"]["abnormal"]["auc"], abs=1e-9)
        assert ensemble["test"]["abnormal"]["sensitivity"] == pytest.approx(metrics["test"]["abnormal"]["sensitivity"])
        assert ensemble["test"]["abnormal"]["specificity"] == pytest.approx(metrics["test"]["abnormal"]["specificity"])
    assert f"| ensemble of 2 | {metrics['test']['macro_f1']:.3f} |" in out
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("tflite", "checkpoints"))
    rows = (other / "splits.csv").read_text().splitlines()
    first_test = next(i for i, row in enumerate(rows) if row.split(",")[2] == "test")
    (other / "splits.csv").write_text("\n".join(rows[:first_test] + rows[first_test + 1:]) + "\n")
    refused = run_module("train.ensemble", tiny_run, other, check=False)
    assert refused.returncode == 2 and "share their splits" in refused.stderr


def test_held_out_figures_at_one_validation_specificity(tmp_path):
    """train.compare --at-val-specificity: the threshold is the val normals' quantile, and the held-out
    source is counted against it (saved logits: two classes, temperature 1, P(abnormal) = sigmoid(b - a))."""
    from train.compare import holdout_at_val_specificity

    def logits(p_abnormal):
        p = np.asarray(p_abnormal, float)
        return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)

    val_normals = np.linspace(0.01, 0.99, 99)          # P(abnormal) of 99 val normals
    run = tmp_path / "run"
    (run / "reports").mkdir(parents=True)
    (run / "model_card.json").write_text(json.dumps({"temperature": 1.0}))
    held = np.array([0.2, 0.5, 0.93, 0.96, 0.99])
    np.savez(run / "reports" / "predictions.npz", val_logits=logits(np.r_[val_normals, 0.9]),
             val_labels=np.r_[np.zeros(99, int), 1], holdout_logits=logits(held), holdout_labels=np.ones(5, int))
    m = holdout_at_val_specificity(run, 0.95)
    assert m["threshold"] == pytest.approx(np.quantile(val_normals, 0.95))
    assert m["sensitivity"] == pytest.approx(2 / 5)       # 0.96 and 0.99 reach 0.941
    np.savez(run / "reports" / "predictions.npz", val_logits=logits(val_normals), val_labels=np.zeros(99, int),
             holdout_logits=logits(held), holdout_labels=np.zeros(5, int))
    assert holdout_at_val_specificity(run, 0.95)["specificity"] == pytest.approx(3 / 5)


def test_class_offsets_fitted_after_the_fact_change_a_corrected_run_by_nothing(tiny_run):
    """train.compare --class-offsets on a run trained with class_prior_correction: the offsets it
    fits on the saved val logits are ~0 and every figure stays as trained."""
    from train.compare import class_offsets_effect

    effect = class_offsets_effect(tiny_run)
    np.testing.assert_allclose(effect["offsets"], 0.0, atol=1e-3)
    assert effect["class offsets"]["macro-F1"] == pytest.approx(effect["as trained"]["macro-F1"])
    out = run_module("train.compare", tiny_run, "--class-offsets").stdout
    assert f"| {tiny_run.parent.name}/{tiny_run.name} | +0.00 +0.00 | " in out.replace("-0.00", "+0.00")


def test_a_run_refitted_for_its_own_target_sensitivity_scores_as_trained(tiny_run):
    """train.compare --target-sensitivity: refitting the threshold on val for the run's own target
    reproduces its threshold and test figures; a higher target never lowers the test sensitivity."""
    from train.compare import at_target_sensitivity

    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    card = json.loads((tiny_run / "model_card.json").read_text())
    own = at_target_sensitivity(tiny_run, card["thresholds"]["target_sensitivity"])
    assert own["threshold"] == pytest.approx(card["thresholds"]["abnormal"], abs=1e-3)
    for figure in ("sensitivity", "specificity"):
        assert own["test"]["abnormal"][figure] == pytest.approx(metrics["test"]["abnormal"][figure], abs=0.02)
    assert own["test"]["macro_f1"] == pytest.approx(metrics["test"]["macro_f1"], abs=0.02)
    higher = at_target_sensitivity(tiny_run, 0.99)
    assert higher["threshold"] <= own["threshold"]
    assert higher["test"]["abnormal"]["sensitivity"] >= own["test"]["abnormal"]["sensitivity"]
    out = run_module("train.compare", tiny_run, "--runs-only", "--target-sensitivity", "0.99").stdout
    assert f"| {tiny_run.parent.name}/{tiny_run.name} | 0.99 | {higher['threshold']:.3f} | " in out
    sensitivity = higher["test"]["abnormal"]["sensitivity"]
    assert f"| {tiny_run.parent.name} | 0.99 | 1 | {higher['test']['macro_f1']:.3f} | {sensitivity:.3f} | " in out


def test_class_offsets_after_the_fact_undo_a_run_that_over_calls_the_rare_classes(tmp_path):
    """A run whose logits are calibrated ones plus +1.5 / +2.5 on pneumonia / COVID-19 (what class
    weights do): the offsets fitted on val take the shift back and the test macro-F1 rises."""
    from edge_app import decision
    from train.compare import class_offsets_effect

    rng = np.random.default_rng(3)

    def split(n):
        z = rng.normal(0, 2, (n, 3)) + np.log([0.6, 0.3, 0.1])
        y = (rng.random((n, 1)) > decision.calibrated_probabilities(z).cumsum(axis=1)).sum(axis=1)
        return (z + [0.0, 1.5, 2.5]).astype("float32"), y

    (val_logits, val_labels), (test_logits, test_labels) = split(3000), split(3000)
    run = tmp_path / "run"
    (run / "reports").mkdir(parents=True)
    (run / "model_card.json").write_text(json.dumps({
        "temperature": 1.0, "labels": ["normal", "pneumonia", "covid"],
        "thresholds": {"abnormal": 0.5, "target_sensitivity": 0.95}}))
    np.savez(run / "reports" / "predictions.npz", val_logits=val_logits, val_labels=val_labels,
             test_logits=test_logits, test_labels=test_labels)
    effect = class_offsets_effect(run)
    np.testing.assert_allclose(effect["offsets"], [0.0, -1.5, -2.5], atol=0.3)
    assert effect["class offsets"]["macro-F1"] > effect["as trained"]["macro-F1"] + 0.02
    assert effect["class offsets"]["COVID prec."] > effect["as trained"]["COVID prec."]
    # a binary task (normal / pneumonia) has no COVID-19 figures, and its offsets are fitted all the same
    (run / "model_card.json").write_text(json.dumps({
        "temperature": 1.0, "labels": ["normal", "pneumonia"],
        "thresholds": {"abnormal": 0.5, "target_sensitivity": 0.95}}))
    binary = lambda z, y: (z[y < 2][:, :2], y[y < 2])
    np.savez(run / "reports" / "predictions.npz", **dict(zip(("val_logits", "val_labels"), binary(val_logits, val_labels))),
             **dict(zip(("test_logits", "test_labels"), binary(test_logits, test_labels))))
    effect = class_offsets_effect(run)
    assert len(effect["offsets"]) == 2 and "COVID sens." not in effect["class offsets"]
