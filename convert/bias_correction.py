"""Bias correction of weight rounding, before full-integer (int8) or float16 conversion.

TFLite folds each BatchNormalization into the convolution before it and rounds the folded kernel
to int8, symmetric per output channel (scale = max |w| / 127), or to float16. The rounding error E
of a channel's weights is fixed, and the channel's input is not zero-mean (it follows a ReLU6), so the int8
convolution is off by E . E[x] on average: a bias, not noise, and it adds up through the network
into the systematic logit shift seen in int8 (docs/RESULTS.md: P(abnormal) up in 66 of 76 changed
images). Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction"
(ICCV 2019), section 4.2: subtract the expected error from the bias. Here E[x] is measured, not
derived: the float model's mean input of each convolution over the calibration images.

`corrected(model, inputs, precision)` returns a copy whose BatchNormalization offsets (and the
logits' bias) are moved by -E . E[x]; converting that copy at that precision gives a model whose
expected layer outputs are the float model's. The float copy itself is not a model to ship.
float16 weights are off by far less, but systematically too (default model: mean logit shift
-0.019 on `normal`, max |dP(abnormal)| 0.021, one test image's class changed; corrected: 0.0006,
0.0017, none; docs/RESULTS.md, 2026-12-06 afternoon); fp16 keeps its biases in float32
(convert.export), so the correction survives the conversion.
"""
from __future__ import annotations

import numpy as np

import train  # noqa: F401
import tf_keras as keras

INT8_MAX = 127   # TFLite's symmetric per-channel weight range: [-127, 127]
PRECISIONS = ("int8", "fp16")


def rounding_error(kernel: np.ndarray, channel_axes: tuple[int, ...], precision: str = "int8") -> np.ndarray:
    """Rounding error of `kernel` as TFLite stores it: int8 symmetric per output channel (the axes in
    `channel_axes` are reduced for the scale), or float16 (round to nearest)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16":
        return kernel.astype(np.float16).astype(kernel.dtype) - kernel
    scale = np.abs(kernel).max(axis=channel_axes, keepdims=True) / INT8_MAX
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(kernel / scale), -INT8_MAX, INT8_MAX) * scale - kernel


def fold_factor(conv, bn) -> np.ndarray:
    """BatchNormalization's gamma / sqrt(var + eps), shaped to multiply the convolution's kernel."""
    weights = bn.get_weights()
    gamma = weights[0] if bn.scale else 1.0
    factor = gamma / np.sqrt(weights[-1] + bn.epsilon)
    if isinstance(conv, keras.layers.DepthwiseConv2D):      # kernel (kh, kw, channels, multiplier)
        return factor.reshape(1, 1, *conv.get_weights()[0].shape[2:])
    return factor                                             # kernel (kh, kw, in, out) or (in, out)


def folded_kernel(conv, bn) -> np.ndarray:
    """The kernel TFLite quantises: the convolution's times BatchNormalization's gamma / sqrt(var + eps)."""
    return conv.get_weights()[0] * fold_factor(conv, bn)


def conv_bn_pairs(model: keras.Model) -> list[tuple]:
    """Every (Conv2D or DepthwiseConv2D without bias, the BatchNormalization after it): the pairs
    TFLite folds into one quantised convolution."""
    return [(_producer(bn), bn) for bn in model.layers if isinstance(bn, keras.layers.BatchNormalization)
            and isinstance(_producer(bn), (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
            and not _producer(bn).use_bias]


def output_shift(layer, kernel: np.ndarray, input_mean: np.ndarray, precision: str = "int8") -> np.ndarray:
    """E . E[x] per output channel of `layer` for its (folded) kernel and mean input per channel
    (zero padding at the borders neglected)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        error = rounding_error(kernel, (0, 1), precision)
        return np.einsum("hwcm,c->cm", error, input_mean).reshape(-1)
    if isinstance(layer, keras.layers.Dense):
        return rounding_error(kernel, (0,), precision).T @ input_mean
    return np.einsum("hwio,i->o", rounding_error(kernel, (0, 1, 2), precision), input_mean)


def corrected(model: keras.Model, inputs: np.ndarray, precision: str = "int8", *, batch: int = 8) -> keras.Model:
    """A copy of `model` with every Conv2D/DepthwiseConv2D + BatchNormalization pair's offset, and
    every Dense layer's bias, moved by minus its weight-rounding shift at `precision` over `inputs`."""
    pairs = [(conv, bn) for conv, bn in conv_bn_pairs(model) if bn.center]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense) and layer.use_bias]
    means = _input_means(model, [conv for conv, _ in pairs] + dense, inputs, batch)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for (conv, bn), mean in zip(pairs, means):
        shift = output_shift(conv, folded_kernel(conv, bn), mean, precision)
        target = copy.get_layer(bn.name)
        weights = target.get_weights()           # [gamma (with scale)], beta, moving mean, moving variance
        weights[1 if target.scale else 0] -= shift
        target.set_weights(weights)
    for layer, mean in zip(dense, means[len(pairs):]):
        kernel, bias = layer.get_weights()
        copy.get_layer(layer.name).set_weights([kernel, bias - output_shift(layer, kernel, mean, precision)])
    return copy


def _producer(layer):
    node = layer._inbound_nodes[0]
    inbound = node.inbound_layers
    return inbound[0] if isinstance(inbound, list) else inbound


def _input_means(model, layers, inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    """Each layer's mean input per channel over `inputs` (every axis but the last)."""
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    sums = [np.zeros(layer.input.shape[-1], np.float64) for layer in layers]
    count = [0] * len(layers)
    for start in range(0, len(inputs), batch):
        outputs = probe(inputs[start:start + batch], training=False)
        for i, out in enumerate(outputs if len(layers) > 1 else [outputs]):   # one output: not a list
            values = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
            sums[i] += values.sum(axis=0)
            count[i] += len(values)
    return [s / n for s, n in zip(sums, count)]
