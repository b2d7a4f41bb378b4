"""Damaged models, invalid model cards and batches with failures: a ModelError with its code or a
correct result, never a traceback, never a silent wrong answer (issue 13).

The corpus is generated here from the tiny run's models; nothing of it is committed.
"""
import collections
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from edge_app import cli, preprocess
from edge_app.classifier import Classifier, load_model_file
from edge_app.errors import ModelError
from edge_app.tflite_metadata import CARD_METADATA_NAME, write_metadata

MODEL_CODES = {"model_invalid", "inference_failed", "card_invalid", "card_missing", "card_mismatch"}
DECISIONS = {"refer", "no_abnormality", "unreliable"}


def damaged_copies(model: Path, folder: Path, count: int, seed: int) -> list[Path]:
    """Truncated copies, and copies with 1, 4 or 16 bytes XOR-ed at seeded offsets."""
    data, rng = model.read_bytes(), random.Random(seed)
    fractions = (0.01, 0.1, 0.5, 0.9, 0.999, 0.9999)
    copies = [(f"cut{f}", data[: int(len(data) * f)]) for f in fractions]
    while len(copies) < count:
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 4, 16))):
            damaged[rng.randrange(len(damaged))] ^= rng.randrange(1, 256)
        copies.append((f"flip{len(copies)}", bytes(damaged)))
    paths = []
    for name, content in copies:
        paths.append(folder / f"{model.stem}-{name}.tflite")
        paths[-1].write_bytes(content)
    return paths


def first_conv_changed(model: Path, dest: Path, change) -> Path:
    """A copy of the model where `change(tensor, buffer)` edits its first convolution's filter."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model.read_bytes()), 0)
    graph = m.subgraphs[0]
    conv = next(op for op in graph.operators
                if m.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.CONV_2D)
    weights = graph.tensors[conv.inputs[1]]
    change(weights, m.buffers[weights.buffer])
    builder = flatbuffers.Builder(0)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    dest.write_bytes(bytes(builder.Output()))
    return dest


def wrong_filter_shape(model: Path, dest: Path) -> Path:
    """The filter takes twice the input channels (its weights doubled to match): the flatbuffer
    parses and verifies, the convolution fails to prepare."""
    def change(weights, buffer):
        weights.shape = np.array([*weights.shape[:3], 2 * weights.shape[3]], np.int32)
        buffer.data = np.concatenate([buffer.data, buffer.data])
    return first_conv_changed(model, dest, change)


def nan_weights(model: Path, dest: Path) -> Path:
    """A float model whose first convolution's weights are all NaN."""
    def change(_weights, buffer):
        buffer.data = np.full(len(buffer.data) // 4, np.nan, np.float32).view(np.uint8)
    return first_conv_changed(model, dest, change)


def outcome(model: Path, image: Path) -> str:
    """'ok' for a sound result, the ModelError's code otherwise; anything else fails the test."""
    try:
        prediction = Classifier(model, accelerator="cpu").predict(image)
    except ModelError as exc:
        assert exc.code in MODEL_CODES and exc.message, exc
        return exc.code
    probabilities = list(prediction.probabilities.values())
    assert all(math.isfinite(p) and 0 <= p <= 1 for p in probabilities)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
    assert prediction.decision in DECISIONS and math.isfinite(prediction.abnormal_probability)
    return "ok"


@pytest.fixture(scope="module")
def image(tiny_dataset) -> Path:
    return sorted((tiny_dataset / "test" / "pneumonia").iterdir())[0]


def test_a_model_that_fails_to_prepare_is_model_invalid(tmp_path, tiny_run, image):
    for variant in ("int8", "fp32"):   # Interpreter, and CompiledModel first
        broken = wrong_filter_shape(tiny_run / "tflite" / f"{variant}.tflite", tmp_path / f"{variant}.tflite")
        with pytest.raises(ModelError, match="failed to prepare") as err:
            Classifier(broken, accelerator="cpu")
        assert err.value.code == "model_invalid" and err.value.path == str(broken)
    result = run_module("edge_app", "predict", image, "--model", broken, "--json", check=False, timeout=120)
    assert result.returncode == 2 and "error [model_invalid]" in result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


@pytest.mark.parametrize("variant, seed", [("int8", 13), ("fp32", 31)])
def test_damaged_models_are_refused_with_a_code_or_give_a_sound_result(tmp_path, tiny_run, image, variant, seed):
    copies = damaged_copies(tiny_run / "tflite" / f"{variant}.tflite", tmp_path, 40, seed)
    seen = collections.Counter(outcome(path, image) for path in copies)   # any other exception fails
    print(f"{variant}: {len(copies)} damaged copies -> {dict(seen)}")
    assert sum(seen.values()) == 40 and seen["model_invalid"] >= 5   # every truncation is refused
    # A few through the CLI, in a fresh process with a time limit: no traceback, no hang.
    for path in copies[:3] + copies[-2:]:
        result = run_module("edge_app", "predict", image, "--model", path, "--json", check=False, timeout=120)
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        if result.returncode == 0:
            (entry,) = json.loads(result.stdout)["results"]
            assert entry["decision"] in DECISIONS
        else:
            assert result.returncode == 2 and "error [" in result.stderr and not result.stdout


def test_a_model_giving_nan_is_refused_not_read_as_no_abnormality(tmp_path, tiny_run):
    with pytest.raises(ModelError, match="not finite") as err:
        Classifier(nan_weights(tiny_run / "tflite" / "fp32.tflite", tmp_path / "nan.tflite"), accelerator="cpu")
    assert err.value.code == "model_invalid"


# -- model cards ------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
# (where, value): where is a card field, or "thresholds.<key>"; value None with "missing" removes it
CARD_CASES = [
    *[("temperature", v) for v in (INF, -INF, NAN, 0.0, -1.0, "1.0", None, True, [1.0])],
    *[("thresholds.abnormal", v) for v in (NAN, INF, -0.1, 1.5, "0.5", None, "missing")],
    *[("thresholds.ood", v) for v in (NAN, INF, -INF, -1.0, "12.5", None, [3.0])],
    *[("thresholds.target_sensitivity", v) for v in (NAN, 1.01, "0.9")],
    *[("thresholds.detail", v) for v in (NAN, INF, -0.1, "0.3", None)],
    ("thresholds.new_limit", 0.5),
    *[("thresholds", v) for v in ("0.5", [0.5], None)],
    *[("preprocessing_version", v) for v in ("99", "0", 1, None, "missing")],
    *[("schema_version", v) for v in (2, 0, "1", True, None, 1.5, "missing")],
    *[("labels", v) for v in ([], ["normal"], ["covid", "normal", "pneumonia"], ["normal", "normal", "covid"],
                              "normal", [0, 1, 2], None, "missing")],
    *[("input", v) for v in (None, "64", {"size": "64"}, {"size": -64}, {"size": 64.5}, {"size": 64, "channels": 2},
                             {"size": 64, "normalisation": "none"}, {"size": 64, "shape": [64, 64]}, "missing")],
    *[(name, v) for name in ("name", "task", "variant") for v in (7, None, "missing")],
    *[(name, v) for name in ("dataset", "metrics", "versions") for v in ("x", [1], None)],
    ("intended_use", None),
    ("extra_field", 1),
]


def card_with(card: dict, where: str, value) -> dict:
    card = json.loads(json.dumps(card))
    parent, key = (card["thresholds"], where.split(".")[1]) if where.startswith("thresholds.") else (card, where)
    if value == "missing":
        del parent[key]
    else:
        parent[key] = value
    return card


@pytest.fixture(scope="module")
def card_model(tiny_run) -> tuple[bytes, dict]:
    data, card = load_model_file(tiny_run / "tflite" / "int8.tflite")
    return data, card.to_dict()


@pytest.mark.parametrize("where, value", CARD_CASES, ids=[f"{w}={v!r}" for w, v in CARD_CASES])
def test_every_invalid_card_field_is_card_invalid_naming_the_field(tmp_path, card_model, where, value):
    data, card = card_model
    path = tmp_path / "doctored.tflite"
    path.write_bytes(write_metadata(data, CARD_METADATA_NAME, json.dumps(card_with(card, where, value)).encode()))
    with pytest.raises(ModelError) as err:
        Classifier(path, accelerator="cpu")
    assert err.value.code == "card_invalid"
    field = where.split(".")[-1] if where != "thresholds.abnormal" or value != "missing" else "abnormal"
    assert field in err.value.message, err.value.message


@pytest.mark.parametrize("text", [b"{not json", b"[1, 2, 3]", b"\xff\xfe\x00card", b""])
def test_a_card_that_is_not_a_json_object_is_card_invalid(tmp_path, card_model, text):
    path = tmp_path / "doctored.tflite"
    path.write_bytes(write_metadata(card_model[0], CARD_METADATA_NAME, text))
    with pytest.raises(ModelError) as err:
        Classifier(path, accelerator="cpu")
    assert err.value.code == "card_invalid"


def test_invalid_cards_through_the_cli(tmp_path, card_model, image):
    """The attack's cases: OOD threshold a string (was a TypeError), temperature inf (every
    probability 1/3, decision flipped), OOD threshold NaN (warning silently off)."""
    data, card = card_model
    for where, value in (("thresholds.ood", "12.5"), ("temperature", INF), ("thresholds.ood", NAN)):
        path = tmp_path / "doctored.tflite"
        path.write_bytes(write_metadata(data, CARD_METADATA_NAME, json.dumps(card_with(card, where, value)).encode()))
        result = run_module("edge_app", "predict", image, "--model", path, "--json", check=False, timeout=120)
        assert result.returncode == 2 and "error [card_invalid]" in result.stderr, result.stderr[-2000:]
        assert where.split(".")[-1] in result.stderr and "Traceback" not in result.stderr


# -- the CLI: batches and arguments ------------------------------------------------------------
def test_a_batch_prints_every_result_and_its_exit_code_says_the_worst(tmp_path, tiny_run, tiny_dataset,
                                                                     monkeypatch, capsys):
    model = tiny_run / "tflite" / "int8.tflite"
    good = sorted((tiny_dataset / "test" / "covid").iterdir())[:2]
    refused = tmp_path / "letter.jpg"
    refused.write_text("a referral letter, not an image")
    buggy = tmp_path / "bad.dcm"
    buggy.write_bytes(good[0].read_bytes())
    decode = preprocess.decode

    def decode_with_a_bug(source, **kwargs):   # stands for any bug met on one image
        if str(source) == str(buggy):
            raise ZeroDivisionError("injected bug")
        return decode(source, **kwargs)

    monkeypatch.setattr(preprocess, "decode", decode_with_a_bug)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def predict(*images):
        status = cli.main(["predict", *map(str, images), "--model", str(model), "--json"])
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err
        return status, json.loads(out.out)["results"]

    status, results = predict(good[0], buggy, refused, good[1])
    assert status == cli.EXIT_INTERNAL == 3
    assert [r["source"] for r in results] == list(map(str, (good[0], buggy, refused, good[1])))
    assert results[0]["decision"] in DECISIONS and results[3]["decision"] in DECISIONS
    assert results[1]["error"]["code"] == "internal_error" and "ZeroDivisionError" in results[1]["error"]["message"]
    assert results[2]["error"]["code"] == "not_an_image"
    log = tmp_path / "state" / "cxr-edge" / "errors.log"
    assert str(log) in results[1]["error"]["message"]
    assert "Traceback" in log.read_text() and "injected bug" in log.read_text()

    assert predict(good[0], refused)[0] == cli.EXIT_REFUSED == 1
    assert predict(*good)[0] == cli.EXIT_OK == 0
    status = cli.main(["predict", str(good[0]), str(buggy), "--model", str(model)])   # human-readable
    out = capsys.readouterr()
    assert status == 3 and "CANNOT SCREEN [internal_error]" in out.err and "Traceback" not in out.err
    assert str(good[0]) in out.out and str(buggy) not in out.out and "not a diagnosis" in out.out


@pytest.mark.parametrize("args, message", [
    (["bench", "--runs", "0"], "argument --runs: must be at least 1, got 0"),
    (["bench", "--runs", "-3"], "argument --runs: must be at least 1, got -3"),
    (["predict", "x.jpg", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["info", "--threads", "two"], "argument --threads: must be a whole number, got 'two'"),
])
def test_runs_and_threads_below_one_are_refused_by_the_parser(args, message):
    result = run_module("edge_app", *args, "--model", "m.tflite", check=False, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
