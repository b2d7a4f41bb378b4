"""The device side with real exported models: embedded cards, refusals, errors, heat maps, threads."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from edge_app.classifier import Classifier, load_model_file
from edge_app.errors import InputError, ModelError
from edge_app.model_card import ModelCard
from edge_app.tflite_metadata import CARD_METADATA_NAME, read_metadata, write_metadata

pytestmark = pytest.mark.device  # make test-device: no training beyond device_run


@pytest.fixture(scope="module")
def int8_path(device_run) -> Path:
    return device_run / "tflite" / "int8.tflite"


def test_embedded_card_round_trips(device_run):
    trained = ModelCard.from_json((device_run / "model_card.json").read_text())
    for variant in ("fp32", "dynamic", "fp16", "int8"):
        _, card = load_model_file(device_run / "tflite" / f"{variant}.tflite")
        assert card.variant == variant
        own_ood = card.thresholds["ood"]   # each variant's own, refitted in conversion (test_ood)
        assert own_ood > 0 and {**card.thresholds, "ood": trained.thresholds["ood"]} == trained.thresholds
        assert {**card.to_dict(), "variant": "keras", "thresholds": trained.thresholds} == trained.to_dict()


def test_int8_model_is_integer_inside(int8_path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(int8_path))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert all(d["dtype"] == np.int8 for d in interpreter.get_output_details())
    tensors = interpreter.get_tensor_details()
    conv_weights = [t for t in tensors if len(t["shape"]) == 4 and t["quantization"][0] > 0
                    and "conv" in t["name"].lower()]
    assert conv_weights and all(t["dtype"] == np.int8 for t in conv_weights)
    floats = [t["name"] for t in tensors if t["dtype"] == np.float32]
    assert not floats, f"float tensors left in the int8 model: {floats[:5]}"


def test_missing_and_wrong_model_files(tmp_path, tiny_dataset):
    with pytest.raises(ModelError) as err:
        Classifier(tmp_path / "nope.tflite")
    assert err.value.code == "model_not_found"
    not_a_model = tmp_path / "notes.tflite"
    not_a_model.write_text("this is not a model")
    with pytest.raises(ModelError) as err:
        Classifier(not_a_model)
    assert err.value.code == "model_invalid"
    result = run_module("edge_app", "predict", next((tiny_dataset / "test" / "normal").iterdir()),
                        "--model", not_a_model, check=False)
    assert result.returncode == 2 and "model_invalid" in result.stderr


def test_model_without_card_is_refused(tmp_path, device_run):
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    model = schema.ModelT.InitFromPackedBuf(bytearray((device_run / "tflite" / "fp32.tflite").read_bytes()), 0)
    model.metadata = [m for m in model.metadata if m.name.decode() != CARD_METADATA_NAME]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(bytes(builder.Output()))
    with pytest.raises(ModelError) as err:
        Classifier(bare)
    assert err.value.code == "card_missing"


@pytest.mark.parametrize("change, field", [
    ({"labels": ["normal", "pneumonia"]}, "labels"),
    ({"input": {"size": 96, "channels": 1, "normalisation": "unit", "fit": "crop"}}, "input"),
])
def test_model_whose_card_does_not_match_is_refused(tmp_path, device_run, change, field):
    data, card = load_model_file(device_run / "tflite" / "fp32.tflite")
    wrong = ModelCard.from_dict({**card.to_dict(), **change})
    path = tmp_path / f"wrong_{field}.tflite"
    path.write_bytes(write_metadata(data, CARD_METADATA_NAME, wrong.to_json().encode()))
    with pytest.raises(ModelError) as err:
        Classifier(path, accelerator="cpu")  # no GPU driver next to TF (abort at exit)
    assert err.value.code == "card_mismatch"


def test_bad_images_get_specific_errors_and_others_are_still_screened(tmp_path, int8_path, tiny_dataset):
    text = tmp_path / "report.jpg"
    text.write_text("not an image")
    good = next((tiny_dataset / "test" / "covid").iterdir())
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = run_module("edge_app", "predict", text, good, truncated, "--model", int8_path, "--json",
                        check=False)
    assert result.returncode == 1
    bad1, ok, bad2 = json.loads(result.stdout)["results"]
    assert bad1["error"]["code"] == "not_an_image"
    assert bad2["error"]["code"] == "truncated"
    assert ok["label"] in ("normal", "pneumonia", "covid")
    classifier = Classifier(int8_path, accelerator="cpu")
    with pytest.raises(InputError) as err:
        classifier.predict(str(text))
    assert err.value.code == "not_an_image"


def test_prediction_has_heatmap_and_stage_timings(int8_path, tiny_dataset):
    classifier = Classifier(int8_path, accelerator="cpu")
    prediction = classifier.predict(next((tiny_dataset / "test" / "pneumonia").iterdir()))
    assert prediction.heatmap.ndim == 2 and prediction.heatmap.shape[0] > 1
    assert prediction.heatmap.min() >= 0.0 and prediction.heatmap.max() <= 1.0
    assert all(v >= 0 for v in prediction.timings_ms.values())
    stages = sum(prediction.timings_ms[s] for s in ("decode", "preprocess", "lungs", "inference", "postprocess"))
    assert stages == pytest.approx(prediction.timings_ms["total"], abs=0.05)
    assert prediction.timings_ms["lungs"] == 0.0      # this model does not crop: no segmenter ran


@pytest.mark.parametrize("variant", ["int8", "fp32"])   # Interpreter and CompiledModel backends
def test_predict_is_safe_from_worker_threads(device_run, tiny_dataset, variant):
    classifier = Classifier(device_run / "tflite" / f"{variant}.tflite", accelerator="cpu")
    images = sorted((tiny_dataset / "test").rglob("*.jpg"))[:6]
    expected = [classifier.predict(i).probabilities for i in images]
    results = {}

    def work(k):
        results[k] = [classifier.predict(i).probabilities for i in images]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(4))


def test_cli_info_and_bench(int8_path):
    info = json.loads(run_module("edge_app", "info", "--model", int8_path).stdout)
    assert info["card"]["variant"] == "int8" and info["backend"].startswith("litert")
    bench = json.loads(run_module("edge_app", "bench", "--model", int8_path, "--runs", "3").stdout)
    assert set(bench["stages"]) == {"decode", "preprocess", "lungs", "inference", "postprocess", "total"}
