"""Conversion: every variant from a tiny trained model, integer and pruned models inspected,
the parity gate on good and damaged models, the GPU accelerator, heat maps, QAT refusals."""
import json

import numpy as np
import pytest

from conftest import run_module
from edge_app.classifier import Classifier, load_model_file
from edge_app.model_card import ModelCard

ALL_VARIANTS = ("fp32", "dynamic", "fp16", "int8", "qat", "pruned-fp32", "pruned-int8", "pruned-qat")
INTEGER_VARIANTS = ("int8", "qat", "pruned-int8", "pruned-qat")


@pytest.fixture(scope="module")
def conversion(tiny_run) -> dict:
    return json.loads((tiny_run / "reports" / "conversion.json").read_text())


def test_every_variant_is_written_gated_and_reported(tiny_run, conversion):
    assert tuple(conversion["variants"]) == ALL_VARIANTS and not conversion["refused"]
    trained = ModelCard.from_json((tiny_run / "model_card.json").read_text())
    for name, v in conversion["variants"].items():
        data, card = load_model_file(tiny_run / "tflite" / f"{name}.tflite")
        assert len(data) == v["bytes"] and v["gzip_bytes"] < v["bytes"]
        assert v["ood"] is not None and card.thresholds["ood"] == v["ood"]["threshold"]   # every variant warns
        assert card.variant == name and card.thresholds == v["card"]["thresholds"]
        assert card.temperature == v["card"]["temperature"]
        assert ({**card.to_dict(), "variant": "keras", "thresholds": trained.thresholds,
                 "temperature": trained.temperature} == trained.to_dict())
        assert set(v["splits"]) == {"val", "test"}
        for split in v["splits"].values():
            assert set(split["drops_points"]) == {"accuracy", "macro_f1", "abnormal_sensitivity",
                                                  "abnormal_specificity", "abnormal_auc", "covid_sensitivity"}
            assert 0.0 <= split["agreement"] <= 1.0 and 0.0 <= split["mean_abs_dp_abnormal"] <= split["max_abs_dp_abnormal"]
            assert set(split["bootstrap_ci95"]) == {"macro_f1", "abnormal_sensitivity", "covid_sensitivity"}
    # fine-tuned models carry their own calibration, refitted on val; post-training ones the Keras model's
    for name, source in (("qat", "qat"), ("pruned-fp32", "pruned"), ("pruned-int8", "pruned"), ("pruned-qat", "pqat")):
        refit = conversion["calibration"][source]
        v = conversion["variants"][name]
        assert v["card"]["calibrated_on"] == source
        assert v["card"]["temperature"] == refit["temperature"]["refitted"]
        assert set(refit["class_offsets"]) == set(trained.labels)
        assert v["card"]["thresholds"]["abnormal"] == refit["abnormal_threshold"]["refitted"]
        assert v["ood"]["run_threshold"] == refit["ood_threshold"]["refitted"]
    for name, v in conversion["variants"].items():   # post-training int8 measured op by op against the float model
        corrected = v.get("empirical_bias_correction")
        assert (corrected is not None) == (name in ("int8", "pruned-int8")), name
        assert corrected is None or (corrected["ops"] and corrected["images"] > 0)
    for name in ("fp32", "fp16", "dynamic", "int8"):
        assert conversion["variants"][name]["card"]["temperature"] == trained.temperature
        assert v["analyzer"]["gpu_compatible"] in (True, False)
    for split in ("val", "test"):  # fp32 is the same network: the same answer on every image
        assert conversion["variants"]["fp32"]["splits"][split]["agreement"] == 1.0
        assert conversion["variants"]["fp32"]["splits"][split]["max_abs_logit_diff"] < 1e-3
    fp32 = conversion["variants"]["fp32"]["bytes"]
    assert all(conversion["variants"][n]["bytes"] < 0.3 * fp32 for n in INTEGER_VARIANTS)
    markdown = (tiny_run / "reports" / "conversion.md").read_text()
    assert all(f"| {name} |" in markdown for name in ALL_VARIANTS)
    assert (tiny_run / "reports" / "conversion.png").stat().st_size > 1000


@pytest.mark.parametrize("variant", INTEGER_VARIANTS)
def test_integer_variants_are_int8_inside(tiny_run, variant):
    """Weights and activations are int8 (biases int32), input and output too: no float left."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tiny_run / "tflite" / f"{variant}.tflite"))
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    weighted = [op for op in interpreter._get_ops_details()
                if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(weighted) >= 6  # five convolutions, the dense layer, the heat map's 1x1 convolution
    for op in weighted:
        weights = tensors[op["inputs"][1]]
        assert weights["dtype"] == np.int8 and len(weights["quantization_parameters"]["scales"]) >= 1
        assert tensors[op["inputs"][0]]["dtype"] == np.int8 and tensors[op["outputs"][0]]["dtype"] == np.int8
    kinds = {np.dtype(t["dtype"]) for t in tensors.values()}
    assert kinds <= {np.dtype(np.int8), np.dtype(np.int32)}, kinds
    int32 = [t for t in tensors.values() if t["dtype"] == np.int32]
    assert all(len(t["shape"]) <= 1 for t in int32)  # biases and shape constants only
    assert all(d["dtype"] == np.int8 for d in interpreter.get_input_details() + interpreter.get_output_details())


def test_pruned_sparsity_is_on_target_and_survives_int8_and_qat(conversion):
    target = 0.5
    for name in ("pruned-fp32", "pruned-int8", "pruned-qat"):
        v = conversion["variants"][name]
        keras_sparsity = v["keras_sparsity"]
        assert abs(keras_sparsity["prunable"] - target) <= 0.01, (name, keras_sparsity)
        assert all(abs(s - target) <= 0.01 for s in keras_sparsity["per_layer"].values()), keras_sparsity
        # the file itself: zeros stay zeros through int8 conversion and pruning-preserving QAT
        assert abs(v["weight_sparsity"] - keras_sparsity["overall"]) <= 0.01, (name, v["weight_sparsity"])
    assert conversion["variants"]["int8"]["weight_sparsity"] < 0.1
    # the gain shows compressed only
    assert conversion["variants"]["pruned-int8"]["gzip_bytes"] < 0.8 * conversion["variants"]["int8"]["gzip_bytes"]


def test_parity_gate_fails_a_damaged_model_and_passes_a_good_one(tiny_run, tmp_path):
    import train  # noqa: F401
    import tf_keras as keras

    from convert import export
    from convert.conversion import check_file, load_run

    good = check_file(tiny_run, tiny_run / "tflite" / "fp32.tflite", "fp32", progress=False)   # the real budgets
    assert good["gate"]["passed"], good["gate"]
    model, card, _ = load_run(tiny_run)
    val_f1 = good["splits"]["val"]["metrics"]["macro_f1"]
    assert val_f1 > 0.2, "the tiny model must beat a constant answer on val for this test to mean anything"
    # damage: the logits layer answers "covid" for every image, whatever the image
    damaged = keras.models.clone_model(model)
    damaged.set_weights(model.get_weights())
    dense = damaged.get_layer("logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), np.array([0.0, 0.0, 10.0], np.float32)])
    path = tmp_path / "damaged.tflite"
    path.write_bytes(export.with_card(export.convert(export.with_heatmap(damaged), "fp32"), card, "fp32"))
    bad = check_file(tiny_run, path, "fp32", progress=False)
    assert not bad["gate"]["passed"]
    assert any(f.startswith("val: class agreement") for f in bad["gate"]["failures"]), bad["gate"]
    # on test too; which figure shows it depends on how many images the tiny model already refers
    assert any(f.startswith("test: ") for f in bad["gate"]["failures"]), bad["gate"]


def test_fp16_runs_fully_accelerated_on_the_gpu_accelerator(swiftshader, tiny_run, tiny_dataset, conversion):
    """On SwiftShader's Vulkan (CI) or a real GPU: every op on the GPU, outputs as on the CPU."""
    from convert import gpu
    from convert.config import ConvertConfig
    from edge_app import preprocess

    recorded = conversion["variants"]["fp16"]["gpu"]
    assert recorded["fully_accelerated"] and recorded["max_abs_diff"]["logits"] <= ConvertConfig().gpu_tolerance
    assert conversion["variants"]["fp16"]["analyzer"]["gpu_compatible"]
    card = load_model_file(tiny_run / "tflite" / "fp16.tflite")[1]
    images = sorted((tiny_dataset / "test").rglob("*.jpg"))[::4]
    x = np.stack([preprocess.preprocess(i, card.input) for i in images])
    result = gpu.probe([tiny_run / "tflite" / "fp16.tflite"], x)
    (verdict,) = result["models"].values()
    assert verdict["fully_accelerated"] is True
    assert verdict["max_abs_diff"]["logits"] <= ConvertConfig().gpu_tolerance
    assert verdict["max_abs_diff"]["heatmap"] <= ConvertConfig().gpu_tolerance * max(1.0, verdict["max_abs_cpu"]["heatmap"])


def keras_grad_cam(model, x: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of the Keras model, by automatic differentiation: channel
    weights = spatial mean of d(target)/d(features), target = the probability-weighted logits
    (probabilities held constant), map = ReLU of the weighted feature channels."""
    import tensorflow as tf
    import tf_keras as keras

    from edge_app.graph_names import FEATURES

    probe = keras.Model(model.input, [model.get_layer(FEATURES).output, model.output])
    with tf.GradientTape() as tape:
        features, logits = probe(x, training=False)
        tape.watch(features)
        target = tf.reduce_sum(tf.stop_gradient(tf.nn.softmax(logits)) * logits, axis=-1)
    alphas = tf.reduce_mean(tape.gradient(target, features), axis=(1, 2))
    return tf.nn.relu(tf.einsum("bhwk,bk->bhw", features, alphas)).numpy()


@pytest.mark.parametrize("variant, min_correlation", [("fp32", 0.99), ("fp16", 0.99), ("int8", 0.9)])
def test_device_heatmap_matches_keras_grad_cam(tiny_run, tiny_dataset, variant, min_correlation):
    """The in-graph map is CAM; for a GAP + dense head CAM equals Grad-CAM, so the device's map
    must correlate with Keras's Grad-CAM of the same image: ~1 for float models (rounding only),
    and > 0.9 for int8, whose feature map and class maps carry 8-bit rounding (a 4x4 map at 64 px,
    so one badly rounded cell weighs 1/16: 0.9 still means the same regions light up)."""
    import train  # noqa: F401
    import tf_keras as keras

    from edge_app import preprocess

    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    classifier = Classifier(tiny_run / "tflite" / f"{variant}.tflite", accelerator="cpu")
    images = sorted((tiny_dataset / "test").rglob("*.jpg"))
    x = np.stack([preprocess.preprocess(i, classifier.spec) for i in images])
    cams = keras_grad_cam(model, x)
    correlations = []
    for image, cam in zip(images, cams):
        device = classifier.predict(image).heatmap
        assert device.shape == cam.shape
        if cam.std() > 0 and device.std() > 0:
            correlations.append(np.corrcoef(device.ravel(), cam.ravel())[0, 1])
    assert len(correlations) >= len(images) // 2
    assert np.median(correlations) > min_correlation, np.round(correlations, 3)


def test_qat_refuses_mobilenet_v3_naming_the_layers_and_why():
    import train  # noqa: F401

    from convert.compress import QATUnsupported, check_quantizable
    from train import models

    check_quantizable(models.build("mobilenet_v2", 3, image_size=32, alpha=0.35))  # supported
    with pytest.raises(QATUnsupported) as err:
        check_quantizable(models.build("mobilenet_v3_small", 3, image_size=32))
    message = str(err.value)
    assert "mobilenet_v3_small" in message
    assert "TFOpLambda" in message and "hard-swish" in message
    assert "Multiply" in message and "Rescaling" in message
    assert "BatchNormalization" not in message  # folded into the convolutions, not a refusal


def test_a_failed_parity_gate_exits_3_with_every_file_written(tiny_run, tmp_path):
    """3 tells a failed gate (files and reports written, readable) from a broken conversion (1)."""
    import shutil

    from conftest import gates_with_conversion_budgets

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tflite", "checkpoints", "logs"))
    impossible = gates_with_conversion_budgets(tmp_path / "gates.toml", min_agreement=1.5, max_flipped=0.0,
                                               excused_margin=0.0, max_drop_points=0.0, max_covid_lost=0)
    result = run_module("convert", run, "--variants", "fp32", "--gates", impossible, "--no-gpu",
                        "--no-progress", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "parity gate failed" in result.stderr and "fp32" in result.stderr
    assert (run / "tflite" / "fp32.tflite").is_file() and (run / "reports" / "conversion.md").is_file()
    assert run_module("convert", tmp_path / "missing", "--no-progress", check=False).returncode == 1


def test_a_variant_that_converts_but_does_not_run_is_refused_and_fails_the_conversion(tiny_run, tmp_path,
                                                                                      monkeypatch, loose_gates):
    """A flatbuffer LiteRT cannot prepare (as XNNPACK refuses some degenerate int8 graphs) is named
    with its error, not written (the benchmarks take every file in tflite/, an earlier one included),
    and fails the conversion as a gate does; the other variants still come out."""
    import shutil

    from convert import conversion, parity
    from edge_app.errors import ModelError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    assert (run / "tflite" / "dynamic.tflite").is_file()      # the earlier conversion's file
    real = parity.run_variant

    def unpreparable_dynamic(model_bytes, inputs, *, desc, progress=True):
        if desc.startswith("dynamic"):
            raise ModelError("inference_failed", "Failed to prepare node 76 (XNNPACK)")
        return real(model_bytes, inputs, desc=desc, progress=progress)

    monkeypatch.setattr(parity, "run_variant", unpreparable_dynamic)
    with pytest.raises(conversion.ParityError) as failed:
        conversion.convert_run(run, variants=("fp32", "dynamic"), gates_file=loose_gates, gpu_check=False,
                               progress=False)
    assert "dynamic: does not run on LiteRT's CPU" in str(failed.value)
    assert "node 76" in str(failed.value)
    assert (run / "tflite" / "fp32.tflite").is_file() and not (run / "tflite" / "dynamic.tflite").exists()
    written = json.loads((run / "reports" / "conversion.json").read_text())
    assert set(written["variants"]) == {"fp32"} and "node 76" in written["refused"]["dynamic"]
    assert "**dynamic refused**" in (run / "reports" / "conversion.md").read_text()


def _card(temperature=1.0, threshold=0.5):
    from edge_app.preprocess import InputSpec

    return ModelCard(name="m", task="3class", labels=("normal", "pneumonia", "covid"), input=InputSpec(size=8),
                     temperature=temperature, thresholds={"abnormal": threshold})


def _decided_logits(y: np.ndarray, margin: float = 4.0) -> np.ndarray:
    """Logits that answer class y[i] clearly (every class margin large, P(abnormal) far from 0.5)."""
    logits = np.zeros((len(y), 3))
    logits[np.arange(len(y)), y] = margin
    return logits


GATE_BUDGET = {"min_agreement": 0.995, "max_flipped": 0.005, "excused_margin": 0.0, "max_drop_points": 0.5,
               "max_covid_lost": 0}


def test_parity_gate_lets_one_borderline_image_move_but_not_a_real_loss():
    """One image the Keras model hardly decided changes class: the macro-F1 drop (over 0.5 point on 150
    images) has a CI that includes no loss, so it is not a failure by itself; with the agreement and
    flip budgets at one image it passes. The same model losing 20 pneumonia images fails on flips, agreement and a
    macro-F1 loss whose CI excludes zero."""
    from convert import parity

    y = np.repeat([0, 1, 2], [75, 50, 25])
    keras = _decided_logits(y)
    keras[0] = [0.01, 0.0, -5.0]                     # normal by a hair: P(abnormal) just under 0.5
    moved = keras.copy()
    moved[0] = [0.0, 0.01, -5.0]                     # now pneumonia, referred
    one = parity.compare(y, _card().labels, keras, _card(), moved, _card(),
                         {**GATE_BUDGET, "min_agreement": 0.99, "max_flipped": 0.01}, split="val")
    assert one["agreement"] == pytest.approx(149 / 150) and one["decisions_flipped"] == 1 and one["covid_lost"] == []
    assert one["bootstrap_ci95"]["macro_f1"]["diff_points"] < -0.5 < one["bootstrap_ci95"]["macro_f1"]["ci95_points"][1]
    assert one["failures"] == []
    assert one["max_abs_dp_abnormal"] == pytest.approx(0.005, abs=1e-3)
    assert [f["kind"] for f in one["flips"]] == ["class", "referral"] and one["flips"][0]["index"] == 0

    damaged = keras.copy()
    damaged[75:95] = _decided_logits(np.zeros(20, int))  # 20 of 50 pneumonia images now called normal
    bad = parity.compare(y, _card().labels, keras, _card(), damaged, _card(), GATE_BUDGET, split="test")
    ci = bad["bootstrap_ci95"]
    assert ci["macro_f1"]["ci95_points"][1] < 0 and ci["abnormal_sensitivity"]["diff_points"] == pytest.approx(-80 / 3)
    failures = " | ".join(bad["failures"])
    assert "test: class agreement 0.8667" in failures and "20 of 150 referral decisions flipped" in failures
    assert "macro_f1 dropped" in failures and "abnormal_sensitivity dropped" in failures


def test_parity_gate_counts_lost_covid_images_and_excuses_only_undecided_ones():
    from convert import parity

    y = np.repeat([0, 1, 2], [50, 30, 20])
    keras = _decided_logits(y)
    lost = keras.copy()
    lost[80] = [0.0, 4.0, 0.0]                       # a COVID-19 image now called pneumonia (still referred)
    result = parity.compare(y, _card().labels, keras, _card(), lost, _card(), {**GATE_BUDGET, "min_agreement": 0.0},
                            split="val")
    assert result["covid_lost"] == [80] and result["decisions_flipped"] == 0
    assert result["failures"] == ["val: 1 COVID-19 image(s) the Keras model found are lost (budget 0)"]
    # an image the Keras model decided within the excused margin may change class; a decided one may not
    keras[0] = [0.004, 0.0, -5.0]
    moved = keras.copy()
    moved[0] = [0.0, 0.004, -5.0]
    fp16_budget = {**GATE_BUDGET, "min_agreement": 1.0, "max_flipped": 0.0, "excused_margin": 0.01}
    excused = parity.compare(y, _card().labels, keras, _card(), moved, _card(), fp16_budget, split="val")
    assert excused["agreement"] == 0.99 and excused["agreement_counted"] == 1.0 and excused["failures"] == []
    moved[1] = [0.0, 4.0, 0.0]
    assert len(parity.compare(y, _card().labels, keras, _card(), moved, _card(), fp16_budget,
                              split="val")["failures"]) == 2   # class and referral of image 1


def test_each_model_decides_at_its_own_calibration():
    """A fine-tuned variant whose logits run hotter but whose refitted temperature undoes it decides
    exactly as the Keras model: nothing flips, |dp| is rounding."""
    from convert import parity

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    keras = rng.normal(size=(300, 3)) + 2 * np.eye(3)[y]
    result = parity.compare(y, _card().labels, keras, _card(1.5, 0.4), 2 * keras, _card(3.0, 0.4), GATE_BUDGET,
                            split="val")
    assert result["decisions_flipped"] == 0 and result["max_abs_dp_abnormal"] < 1e-9 and not result["failures"]


def test_budgets_come_from_the_gates_file_and_a_missing_one_is_an_error():
    from benchmarks.gates import load_gates
    from convert import parity

    gates = load_gates()
    assert parity.budgets_of(gates, "pruned-int8") == parity.budgets_of(gates, "pruned-qat")
    assert parity.budgets_of(gates, "int8")["max_flipped"] == 0.005
    with pytest.raises(ValueError, match=r"no \[conversion.int8\] budgets"):
        parity.budgets_of({"conversion": {"fp32": gates["conversion"]["fp32"]}}, "int8")


def test_int8_mixed_keeps_depthwise_and_linear_bottleneck_convolutions_float():
    """The int8-mixed recipe on a (small, untrained) MobileNetV2: every depthwise convolution and every
    convolution without an activation (the linear-bottleneck projections) computes in float; the
    expansions and the stem (ReLU6) stay int8."""
    import train  # noqa: F401
    from ai_edge_litert.interpreter import Interpreter

    from convert import export
    from train import models

    model = models.build("mobilenet_v2", 3, image_size=32, alpha=0.35)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    interpreter = Interpreter(model_content=export.convert(model, "int8-mixed", x))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    inputs = {"CONV_2D": [], "DEPTHWISE_CONV_2D": []}
    for op in interpreter._get_ops_details():
        if op["op_name"] in inputs:
            inputs[op["op_name"]].append(np.dtype(tensors[op["inputs"][0]]["dtype"]).name)
    convs = [l.name for l in model.layers if type(l).__name__ == "Conv2D"]
    projections = [n for n in convs if n.endswith("_project")]   # the linear bottlenecks (no ReLU6)
    assert set(inputs["DEPTHWISE_CONV_2D"]) == {"float32"}
    # (converted tensor names do not say which convolution is which: count them instead)
    assert sorted(inputs["CONV_2D"]) == sorted(["float32"] * len(projections) + ["int8"] * (len(convs) - len(projections)))



def test_fp16_keeps_biases_float32_and_kernels_float16():
    """The fp16 recipe on a (small, untrained) MobileNetV2 whose BatchNorm offsets are large, as
    trained ones are: every one-dimensional constant (the folded biases) is float32 with exactly the
    fp32 file's values and no DEQUANTIZE before it, every kernel is still float16, and the rewritten
    graph still computes the fp32 file's outputs to within float16 kernel rounding.

    (Whether the outputs are closer than TFLite's plain float16 conversion's is a property of a
    trained model, measured in docs/RESULTS.md: on this untrained one both differ by ~1e-3 and which
    is closer depends on the random initialisation.)"""
    import train  # noqa: F401
    from ai_edge_litert.interpreter import Interpreter

    from convert import export

    from train import models

    rng = np.random.default_rng(1)
    model = models.build("mobilenet_v2", 3, image_size=32, alpha=0.35)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma, rng.normal(0, 20, beta.shape), mean, variance])
    fp32, fp16 = export.convert(model, "fp32"), export.convert(model, "fp16")

    def constants(data):
        interpreter = Interpreter(model_content=data)
        details = interpreter.get_tensor_details()
        ops = interpreter._get_ops_details()
        produced = {int(i) for op in ops for i in op["outputs"]}
        values = {}
        for t in details:
            if t["index"] not in produced and len(t["shape"]) and t["index"] != interpreter.get_input_details()[0]["index"]:
                try:
                    values[t["index"]] = interpreter.get_tensor(t["index"])
                except ValueError:
                    continue
        return interpreter, ops, values

    _, ops, values = constants(fp16)
    used = {int(i) for op in ops for i in op["inputs"]}
    vectors = [v for i, v in values.items() if i in used and v.ndim == 1 and v.dtype.kind == "f"]
    kernels = [v for i, v in values.items() if i in used and v.ndim == 4]
    assert vectors and {v.dtype for v in vectors} == {np.dtype(np.float32)}
    assert kernels and {v.dtype for v in kernels} == {np.dtype(np.float16)}
    dequantized = [op for op in ops if op["op_name"] == "DEQUANTIZE"]
    assert dequantized and all(len(values[int(op["inputs"][0])].shape) != 1 for op in dequantized
                               if int(op["inputs"][0]) in values)
    _, _, reference = constants(fp32)
    originals = [v for v in reference.values() if v.ndim == 1 and v.dtype == np.float32]
    for v in vectors:
        assert any(v.shape == o.shape and np.array_equal(v, o) for o in originals)
        assert not np.array_equal(v, v.astype(np.float16).astype(np.float32)) or not v.any()

    x = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    from convert import parity

    out = {name: parity.run_variant(data, x, desc=name, progress=False)["logits"]
           for name, data in (("fp32", fp32), ("fp16", fp16))}
    np.testing.assert_allclose(out["fp16"], out["fp32"], rtol=1e-3, atol=1e-2)
