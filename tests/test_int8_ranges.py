"""Post-training int8 with linear activations quantised over percentiles
(convert.export._int8_linear_percentile): the percentiles are exact, only the linear activations'
ranges change, and one that a few outlying values set gets a finer step and a closer answer."""
import numpy as np
import pytest

from conftest import tflite_outputs


def outlier_model():
    """conv -> BN -> ReLU6 -> 1x1 projection (linear) -> + skip (linear) -> pool -> logits: MobileNetV2's
    block in small. The projection's channel 0 answers with a large value to a rare, bright pixel."""
    import train  # noqa: F401
    import tf_keras as keras

    image = keras.Input((8, 8, 4), name="image")
    h = keras.layers.ReLU(6.0)(keras.layers.Conv2D(8, 1, name="expand")(image))
    p = keras.layers.Conv2D(4, 1, name="project")(h)
    s = keras.layers.Add(name="block_add")([p, image])
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(s)))
    rng = np.random.default_rng(0)
    for name in ("expand", "project", "logits"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, 0.5, kernel.shape).astype(np.float32), bias])
    return model


def inputs(n: int, seed: int, outliers: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 8, 8, 4)).astype(np.float32)
    if outliers:
        x[:3, 0, 0, :] = 60.0          # three images with one very bright pixel
    return x


def scales(model_bytes: bytes) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    return {d["name"]: d["quantization"][0] for d in Interpreter(model_content=model_bytes).get_tensor_details()
            if d["dtype"] == np.int8}


def test_percentile_ranges_are_numpys_percentiles():
    from convert import export

    model = outlier_model()
    x = inputs(12, 1, outliers=True)
    float_model = export.convert(model, "fp32")
    names = export.linear_conv_outputs(float_model, export.LINEAR_OPS)
    assert len(names) == 2                      # the projection and the sum; not the logits (an output)
    ranges = export._percentile_ranges(float_model, x, names, 99.0)
    import tf_keras as keras
    for layer, name in (("project", next(n for n in names if "project" in n)),
                        ("block_add", next(n for n in names if "add" in n))):
        values = keras.Model(model.input, model.get_layer(layer).output).predict(x, verbose=0).reshape(-1)
        np.testing.assert_allclose(ranges[name], np.percentile(values, [1.0, 99.0]), rtol=1e-5, atol=1e-5)


def test_a_range_set_by_outliers_gets_a_finer_step_and_a_closer_answer():
    from convert import export

    model = outlier_model()
    calibration, typical = inputs(64, 3, outliers=True), inputs(64, 4, outliers=False)
    plain = export.convert(model, "int8", calibration, int8_io="float")
    clipped = export.convert(model, "int8", calibration, int8_io="float", linear_percentile=99.9)
    before, after = scales(plain), scales(clipped)
    linear = [n for n in export.linear_conv_outputs(export.convert(model, "fp32"), export.LINEAR_OPS)]
    changed = [n for n in before if before[n] and after.get(n) and after[n] < 0.7 * before[n]]
    assert changed and all(any(part in n for part in ("project", "add")) for n in changed), changed
    unchanged = [n for n in before if not any(part in n for part in ("project", "add"))]
    assert any("Relu" in n for n in unchanged)
    assert all(after[n] == pytest.approx(before[n]) for n in unchanged)   # input, ReLU6, pool, logits
    assert linear
    reference = model.predict(typical, verbose=0)
    assert (np.abs(tflite_outputs(clipped, typical) - reference).mean()
            < 0.7 * np.abs(tflite_outputs(plain, typical) - reference).mean())



def test_the_heat_maps_class_maps_keep_their_peaks():
    """The class maps (convert.export.with_heatmap) are a linear convolution too, but the heat map
    shows their peaks: their range stays calibration's."""
    import tf_keras as keras

    from convert import export

    image = keras.Input((8, 8, 4))
    features = keras.layers.Conv2D(6, 1, name="features")(image)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D(name="pool")(features))
    model = export.with_heatmap(keras.Model(image, logits))
    x = inputs(32, 5, outliers=True)
    before = scales(export.convert(model, "int8", x, int8_io="float"))
    after = scales(export.convert(model, "int8", x, int8_io="float", linear_percentile=99.0))
    maps = [n for n in before if export.CLASS_MAPS in n and before[n]]
    assert maps and all(after[n] == pytest.approx(before[n]) for n in maps)
    assert any(after[n] < before[n] for n in before if "features" in n and before[n])
