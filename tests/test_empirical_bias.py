"""Empirical bias correction of an int8 file (convert.empirical_bias): on inputs it never saw, the
corrected file's outputs are shifted less from the float model's, and only the int32 biases changed."""
import numpy as np
import pytest

from conftest import tflite_outputs


def relu6_stack(rng):
    """Four 3x3 convolutions with ReLU6 -> pool -> logits: the int8 rounding of each activation reaches
    the next ReLU6, which rectifies part of it into a systematic shift."""
    import train  # noqa: F401
    import tf_keras as keras

    image = keras.Input((12, 12, 4), name="image")
    h = image
    for i in range(4):
        h = keras.layers.ReLU(6.0)(keras.layers.Conv2D(8, 3, padding="same", name=f"conv{i}")(h))
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(h)))
    for layer in model.layers:
        if layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.35, kernel.shape), rng.normal(0, 0.3, bias.shape)])
    return model


@pytest.mark.parametrize("seed", [0, 2])
def test_corrected_int8_is_shifted_less_on_unseen_inputs(seed):
    from convert import empirical_bias, export

    rng = np.random.default_rng(seed)
    model = relu6_stack(rng)
    calibration, unseen = (rng.uniform(0, 1, (64, 12, 12, 4)).astype(np.float32) for _ in range(2))
    int8 = export.convert(model, "int8", calibration, int8_io="float")
    corrected, report = empirical_bias.corrected(int8, export.convert(model, "fp32"), calibration)
    reference = model.predict(unseen, verbose=0)
    before, after = tflite_outputs(int8, unseen) - reference, tflite_outputs(corrected, unseen) - reference
    assert np.abs(before.mean(axis=0)).max() > 0.01                  # int8 shifts this model's logits ...
    assert np.abs(after.mean(axis=0)).max() < 0.5 * np.abs(before.mean(axis=0)).max()   # ... the correction, less
    assert np.sqrt(np.mean(after ** 2)) < np.sqrt(np.mean(before ** 2))
    assert report["images"] == 64 and len(report["ops"]) == 5         # four convolutions and the logits
    assert all(op["max_abs_shift"] >= op["mean_abs_shift"] >= 0 for op in report["ops"])


def test_only_the_biases_change_and_another_graph_is_refused():
    from edge_app.tflite_metadata import _schema

    from convert import empirical_bias, export

    rng = np.random.default_rng(1)
    model = relu6_stack(rng)
    calibration = rng.uniform(0, 1, (16, 12, 12, 4)).astype(np.float32)
    int8 = export.convert(model, "int8", calibration, int8_io="float")
    corrected, _ = empirical_bias.corrected(int8, export.convert(model, "fp32"), calibration)
    schema = _schema()
    graphs = [schema.ModelT.InitFromPackedBuf(bytearray(b), 0) for b in (int8, corrected)]
    biases = {int(op.inputs[2]) for op in graphs[0].subgraphs[0].operators if len(op.inputs) > 2 and op.inputs[2] >= 0}
    changed = set()
    for i, (a, b) in enumerate(zip(graphs[0].subgraphs[0].tensors, graphs[1].subgraphs[0].tensors)):
        data = [np.asarray(g.buffers[t.buffer].data if g.buffers[t.buffer].data is not None else [])
                for g, t in zip(graphs, (a, b))]
        assert a.name == b.name and a.type == b.type
        if not np.array_equal(*data):
            changed.add(i)
    assert changed and changed <= biases

    other = relu6_stack(rng)
    import tf_keras as keras
    smaller = keras.Model(other.input, other.get_layer("conv1").output)
    with pytest.raises(ValueError, match="not the same graph"):
        empirical_bias.corrected(int8, export.convert(smaller, "fp32"), calibration)
