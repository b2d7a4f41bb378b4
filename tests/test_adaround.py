"""Learnt int8 rounding (convert.adaround): the converter stores exactly the rounding chosen in Keras,
and that rounding reproduces each layer, and the model, better than rounding to nearest."""
import numpy as np

from test_bias_correction import int8_outputs, spiky_model


def _int8_kernels(interpreter, shapes) -> dict:
    """The file's int8 kernels of these shapes, with their per-channel scales."""
    found = {}
    for t in interpreter.get_tensor_details():
        if t["dtype"] == np.int8 and tuple(t["shape"]) in shapes:
            found[tuple(t["shape"])] = (interpreter.get_tensor(t["index"]), t["quantization_parameters"]["scales"])
    return found


def test_the_int8_file_stores_the_learnt_rounding_and_it_beats_nearest():
    from convert import adaround, bias_correction as bc

    rng = np.random.default_rng(0)
    model = spiky_model(rng)
    calibration = rng.uniform(0, 1, (48, 8, 8, 16)).astype(np.float32)
    held_out = rng.uniform(0, 1, (48, 8, 8, 16)).astype(np.float32)
    copy, summary = adaround.adarounded(model, calibration, 300, progress=False)

    assert [s["layer"] for s in summary] == ["depthwise", "project"]
    for s in summary:   # some weights rounded the other way, each layer's output closer to the float layer's
        assert 0 < s["weights_rounded_the_other_way"] < 0.5, s
        assert s["error_learnt"] < s["error_nearest"], s

    _, interpreter = int8_outputs(copy, held_out[:1], calibration)
    layouts = {"depthwise": ((1, 3, 3, 32), lambda q: q.reshape(1, 3, 3, 32)),
               "project": ((24, 1, 1, 32), lambda q: np.transpose(q, (3, 0, 1, 2)))}
    stored = _int8_kernels(interpreter, {shape for shape, _ in layouts.values()})
    for name, (shape, to_tflite) in layouts.items():
        conv, bn = copy.get_layer(name), copy.get_layer(f"{name}_bn")
        chosen = bc.folded_kernel(conv, bn)
        axes = (0, 1) if name == "depthwise" else (0, 1, 2)
        original_scale = np.abs(bc.folded_kernel(model.get_layer(name), model.get_layer(f"{name}_bn"))).max(axis=axes)
        q, scales = stored[shape]
        np.testing.assert_allclose(scales, original_scale.reshape(-1) / 127, rtol=1e-6)   # the grid is the same
        np.testing.assert_array_equal(q, to_tflite(np.round(chosen / (original_scale.reshape(
            (1, 1, -1, 2) if name == "depthwise" else (1, 1, 1, -1)) / 127))).astype(np.int8))
        nearest = np.round(bc.folded_kernel(model.get_layer(name), model.get_layer(f"{name}_bn")) * 127
                           / original_scale.reshape((1, 1, -1, 2) if name == "depthwise" else (1, 1, 1, -1)))
        assert 0 < np.mean(to_tflite(nearest) != q) < 0.5          # the file is not simply nearest rounding

    reference = model.predict(held_out, verbose=0)
    nearest_error = np.square(int8_outputs(model, held_out, calibration)[0] - reference).mean()
    learnt_error = np.square(int8_outputs(copy, held_out, calibration)[0] - reference).mean()
    assert learnt_error < nearest_error, (learnt_error, nearest_error)
