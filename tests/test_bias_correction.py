"""Bias correction of weight rounding (convert.bias_correction): the rounding it models is TFLite's,
and converting the corrected copy (int8 or fp16) removes the mean output shift that rounding causes."""
import numpy as np
import pytest


def spiky_model(rng, spike: float | None = 3.0):
    """Depthwise -> BN -> ReLU6 -> 1x1 projection -> BN -> pool -> logits, with one large weight per
    output channel (coarse int8 steps, as BatchNormalization folding makes in trained MobileNetV2s; None:
    none) and BN statistics far from the identity (so folding matters). 'valid' padding: no border terms."""
    import train  # noqa: F401
    import tf_keras as keras

    image = keras.Input((8, 8, 16), name="image")
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="depthwise")(image)
    h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(name="depthwise_bn")(h))
    h = keras.layers.BatchNormalization(name="project_bn")(keras.layers.Conv2D(24, 1, use_bias=False, name="project")(h))
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(h)))
    for layer in model.layers:
        weights = layer.get_weights()
        if layer.name in ("depthwise", "project", "logits"):
            kernel = rng.normal(0, 0.1, weights[0].shape)
            if spike is not None:
                kernel.reshape(-1, kernel.shape[-1])[0] = spike
            layer.set_weights([kernel, *weights[1:]])
        elif layer.name.endswith("_bn"):
            n = weights[0].shape
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.2, 2, n)])
    return model


def int8_outputs(model, x: np.ndarray, calibration: np.ndarray, recipe: str = "int8") -> tuple[np.ndarray, object]:
    """The outputs of `model` converted with `recipe` (int8 with float I/O, or fp16) on `x`, and its interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    from convert import export

    interpreter = Interpreter(model_content=export.convert(model, recipe, calibration, int8_io="float"))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i:i + 1])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"]))
    return np.concatenate(outputs), interpreter


def test_simulated_rounding_is_tflites_int8_weights():
    """Each int8 weight tensor TFLite writes, dequantised, is the BN-folded kernel plus the rounding
    error `rounding_error` predicts (up to float32 ties)."""
    from convert import bias_correction as bc

    rng = np.random.default_rng(0)
    model = spiky_model(rng)
    x = rng.uniform(0, 1, (32, 8, 8, 16)).astype(np.float32)
    _, interpreter = int8_outputs(model, x[:1], x)
    expected = {   # TFLite layout -> ours
        (1, 3, 3, 32): lambda q: q[0].reshape(3, 3, 16, 2),                              # depthwise
        (24, 1, 1, 32): lambda q: np.transpose(q, (1, 2, 3, 0)),                        # (out, kh, kw, in)
        (3, 24): lambda q: q.T,                                                          # dense (out, in)
    }
    kernels = {(1, 3, 3, 32): (bc.folded_kernel(model.get_layer("depthwise"), model.get_layer("depthwise_bn")), (0, 1)),
               (24, 1, 1, 32): (bc.folded_kernel(model.get_layer("project"), model.get_layer("project_bn")), (0, 1, 2)),
               (3, 24): (model.get_layer("logits").get_weights()[0], (0,))}
    found = set()
    for t in interpreter.get_tensor_details():
        shape = tuple(t["shape"])
        if t["dtype"] != np.int8 or shape not in expected:
            continue
        scales = t["quantization_parameters"]["scales"]
        kernel, axes = kernels[shape]
        dequantised = expected[shape](interpreter.get_tensor(t["index"]).astype(np.float64)
                                      * scales.reshape(-1, *[1] * (len(shape) - 1))
                                      if shape[0] != 1 else interpreter.get_tensor(t["index"]) * scales)
        simulated = kernel + bc.rounding_error(kernel, axes)
        close = np.isclose(dequantised, simulated, rtol=0, atol=1e-5 * np.abs(kernel).max())
        assert close.mean() > 0.99, (shape, close.mean())
        found.add(shape)
    assert found == set(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_of_the_corrected_copy_has_no_mean_output_shift(seed):
    """The int8 model's mean logit shift against the float model, over the calibration images: the
    correction removes at least four fifths of it (measured: 94-99 %)."""
    from convert import bias_correction as bc

    rng = np.random.default_rng(seed)
    model = spiky_model(rng)
    x = rng.uniform(0, 1, (64, 8, 8, 16)).astype(np.float32)
    reference = model.predict(x, verbose=0)
    before = np.abs((int8_outputs(model, x, x)[0] - reference).mean(axis=0)).sum()
    corrected = bc.corrected(model, x)
    after = np.abs((int8_outputs(corrected, x, x)[0] - reference).mean(axis=0)).sum()
    assert after < 0.2 * before, (before, after)
    # the copy moved only its offsets (BN beta, the logits' bias): kernels and BN statistics are kept
    for layer in model.layers:
        kept = (0, 2, 3) if layer.name.endswith("_bn") else (0,)
        for i, (original, copied) in enumerate(zip(layer.get_weights(), corrected.get_layer(layer.name).get_weights())):
            if i in kept:
                np.testing.assert_array_equal(original, copied)
            else:
                assert not np.array_equal(original, copied), (layer.name, i)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_of_the_corrected_copy_has_no_mean_output_shift(seed):
    """float16 weights shift the outputs too (less than int8's, the same way): the fp16 conversion of the
    copy corrected for float16 rounding removes at least four fifths of the mean logit shift, and the
    rounding it models is the float16 cast. No spike: float16's error is relative, so a spike would carry
    most of it and move with the very inputs that open the ReLU, which a mean correction cannot follow
    (int8's spike sits on its grid)."""
    from convert import bias_correction as bc

    rng = np.random.default_rng(seed)
    model = spiky_model(rng, spike=None)
    kernel = rng.normal(0, 0.1, (3, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(kernel + bc.rounding_error(kernel, (0, 1, 2), "fp16"),
                                  kernel.astype(np.float16).astype(np.float32))
    x = rng.uniform(0, 1, (64, 8, 8, 16)).astype(np.float32)
    reference = model.predict(x, verbose=0)
    before = np.abs((int8_outputs(model, x, x, "fp16")[0] - reference).mean(axis=0)).sum()
    after = np.abs((int8_outputs(bc.corrected(model, x, "fp16"), x, x, "fp16")[0] - reference).mean(axis=0)).sum()
    assert after < 0.2 * before, (before, after)
    with pytest.raises(ValueError, match="precision"):
        bc.rounding_error(kernel, (0, 1, 2), "int4")


def test_a_model_with_one_layer_to_correct_is_corrected():
    """A head-only model (pooling -> logits): one layer's mean input, which Keras returns bare, not in a list."""
    import train  # noqa: F401
    import tf_keras as keras

    from convert import bias_correction as bc

    image = keras.Input((4, 4, 3))
    model = keras.Model(image, keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(image)))
    x = np.random.default_rng(0).uniform(0, 1, (8, 4, 4, 3)).astype(np.float32)
    kernel, bias = model.get_layer("logits").get_weights()
    moved = bc.corrected(model, x, "fp16").get_layer("logits").get_weights()[1] - bias
    assert np.abs(moved).max() > 0
    expected = -bc.output_shift(model.get_layer("logits"), kernel, x.mean(axis=(0, 1, 2)), "fp16")
    np.testing.assert_allclose(moved, expected, rtol=1e-5, atol=1e-9)


def test_diagnosis_separates_weight_rounding_and_finds_the_range_setting_channel():
    """convert.diagnose: `with_int8_weights` puts every folded kernel exactly on TFLite's int8 grid
    (the float graph with weight rounding only), and `activation_ranges` names a linear activation
    whose range one outlying channel sets."""
    from convert import bias_correction as bc
    from convert.diagnose import activation_ranges, with_int8_weights

    rng = np.random.default_rng(3)
    model = spiky_model(rng)
    rounded = with_int8_weights(model)
    for name, axes in (("depthwise", (0, 1)), ("project", (0, 1, 2))):
        kernel = bc.folded_kernel(rounded.get_layer(name), rounded.get_layer(f"{name}_bn"))
        expected = bc.folded_kernel(model.get_layer(name), model.get_layer(f"{name}_bn"))
        expected = expected + bc.rounding_error(expected, axes)
        np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert not np.allclose(kernel, bc.folded_kernel(model.get_layer(name), model.get_layer(f"{name}_bn")))
    logits = rounded.get_layer("logits").get_weights()[0]
    original = model.get_layer("logits").get_weights()[0]
    np.testing.assert_allclose(logits, original + bc.rounding_error(original, (0,)), rtol=1e-6)

    x = rng.uniform(0, 1, (16, 8, 8, 16)).astype(np.float32)
    plain = activation_ranges(model, x)
    assert plain == []                       # no layer named as MobileNetV2's linear outputs
    import tf_keras as keras
    image = keras.Input((8, 8, 16))
    h = keras.layers.Conv2D(8, 1, name="block_1_project_BN")(image)
    spread = keras.Model(image, h)
    kernel, bias = spread.layers[1].get_weights()
    kernel[:, :, :, 0] *= 200.0              # one channel far wider than the others
    spread.layers[1].set_weights([kernel, bias])
    (row,) = activation_ranges(spread, x)
    assert row["layer"] == "block_1_project_BN"
    assert row["top_channel_max"] > 20 * row["next_channel_max"]
    assert row["step_in_std"] > 0


def test_diagnosis_parts_input_rounding_and_systematic_shift_from_noise():
    """convert.diagnose: `on_input_grid` rounds inputs to the int8 file's own input grid (within half
    a step, every value on it) and leaves a float-input file's inputs alone; `agreement` reports a
    constant logit offset as a shift with no noise, and a random error as noise."""
    from convert import export
    from convert.diagnose import agreement, on_input_grid
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(4)
    model = spiky_model(rng)
    x = rng.uniform(0, 1, (16, 8, 8, 16)).astype(np.float32)
    int8_file = export.convert(model, "int8", x, int8_io="int8")
    scale, zero_point = Interpreter(model_content=int8_file).get_input_details()[0]["quantization"]
    rounded = on_input_grid(int8_file, x)
    assert rounded.dtype == np.float32 and not np.array_equal(rounded, x)
    assert np.abs(rounded - x).max() <= scale / 2 * 1.001
    levels = rounded / scale + zero_point
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert on_input_grid(export.convert(model, "fp32"), x) is x

    reference = rng.normal(0, 2, (200, 3)).astype(np.float32)
    shifted = agreement(reference + np.float32([0.5, 0, 0]), reference, 1.0, 0.5)
    assert shifted["mean_logit_shift"][0] == pytest.approx(0.5, abs=1e-5)
    assert shifted["logit_noise_sd"] == pytest.approx(0.0, abs=1e-5)
    noisy = agreement(reference + rng.normal(0, 0.3, reference.shape), reference, 1.0, 0.5)
    assert noisy["logit_noise_sd"] == pytest.approx(0.3, rel=0.2)
    assert noisy["agreement"] < 1.0
