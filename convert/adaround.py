"""Learnt rounding of the int8 weights (AdaRound), before full-integer conversion (issue 14).

TFLite rounds each BatchNormalization-folded kernel to nearest on its per-output-channel grid
(scale = max |w| / 127). Nearest is best for each weight alone, not for the layer's output: the
errors of a channel's weights add up over its inputs. Nagel et al., "Up or Down? Adaptive Rounding
for Post-Training Quantization" (ICML 2020): learn, per weight, whether to round up or down so the
layer reproduces the float layer's output (after its activation) on calibration images. Layers go
in order, each fed the inputs the already-rounded layers before it give, so a layer also makes up
for the rounding upstream of it.

A kernel whose folded weights already lie on that grid (each an integer multiple of its channel's
scale, the largest at +-127, so the scale stays the same) is stored by the converter exactly as it
is. So the chosen rounding is written back into a copy of the Keras model (kernel = scale * q / BN
factor) and the conversion itself is unchanged (tests/test_adaround.py: the file's int8 kernels are
the chosen integers). Bias correction, run after, then finds no rounding error left to correct in
these kernels; the op-by-op correction (convert.empirical_bias) still measures the file.

`adarounded(model, inputs, iterations)` returns the copy and, per layer, the output error of the
nearest and of the learnt rounding over `inputs`.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from convert import bias_correction

ZETA, GAMMA = 1.1, -0.1       # the rectified sigmoid's stretch (the paper's values)
REGULARISATION = 0.01         # weight of the term that drives every rounding to 0 or 1
WARMUP = 0.2                  # share of the iterations before that term starts
BETA = (20.0, 2.0)            # its sharpness, annealed from the first to the second over the rest
LEARNING_RATE = 1e-3
BATCH = 16


def adarounded(model: keras.Model, inputs: np.ndarray, iterations: int, *, seed: int = 0,
               progress: bool = True) -> tuple[keras.Model, list[dict]]:
    """A copy of `model` whose Conv2D/DepthwiseConv2D + BatchNormalization kernels lie on TFLite's int8 grid with
    the rounding learnt over `inputs` (`iterations` steps per layer), and per layer what that changed."""
    rng = np.random.default_rng(seed)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    summary = []
    pairs = bias_correction.conv_bn_pairs(model)
    for conv, bn in tqdm(pairs, desc="learning int8 rounding", unit="layer", disable=not progress):
        layer = _Layer(model, conv, bn)
        x = _outputs(copy, copy.get_layer(conv.name).input, inputs)
        target = np.asarray(layer.activation(_outputs(model, bn.output, inputs)))
        nearest = np.clip(np.round(layer.kernel / layer.scale), -bias_correction.INT8_MAX, bias_correction.INT8_MAX)
        learnt = layer.learn(x, target, iterations, rng)
        copy.get_layer(conv.name).set_weights([(layer.scale * learnt / layer.factor).astype(np.float32)])
        summary.append({"layer": conv.name, "error_nearest": layer.error(x, target, nearest),
                        "error_learnt": layer.error(x, target, learnt),
                        "weights_rounded_the_other_way": float(np.mean(learnt != nearest))})
    return copy, summary


class _Layer:
    """One folded convolution: its kernel, per-channel int8 scale, bias and activation, as TFLite computes it."""

    def __init__(self, model, conv, bn):
        self.conv = conv
        self.factor = bias_correction.fold_factor(conv, bn).astype(np.float32)
        self.kernel = bias_correction.folded_kernel(conv, bn).astype(np.float32)
        weights = bn.get_weights()                  # [gamma], [beta], moving mean, moving variance
        beta = weights[1 if bn.scale else 0] if bn.center else 0.0
        self.bias = tf.constant(beta - weights[-2] * np.reshape(self.factor, -1), tf.float32)
        axes = (0, 1) if isinstance(conv, keras.layers.DepthwiseConv2D) else (0, 1, 2)
        scale = np.abs(self.kernel).max(axis=axes, keepdims=True) / bias_correction.INT8_MAX
        self.scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        self.activation = _activation_after(model, bn)

    def output(self, x, kernel):
        conv = self.conv
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            y = tf.nn.depthwise_conv2d(x, kernel, strides=(1, *conv.strides, 1), padding=conv.padding.upper(),
                                       dilations=conv.dilation_rate)
        else:
            y = tf.nn.conv2d(x, kernel, strides=conv.strides, padding=conv.padding.upper(),
                             dilations=conv.dilation_rate)
        return self.activation(y + self.bias)

    def error(self, x: np.ndarray, target: np.ndarray, q: np.ndarray, batch: int = 32) -> float:
        """Mean over pixels of the squared output error summed over channels, with integer kernel `q`."""
        kernel = tf.constant(self.scale * q, tf.float32)
        errors = [tf.reduce_sum(tf.square(self.output(x[i:i + batch], kernel) - target[i:i + batch]), axis=-1)
                  for i in range(0, len(x), batch)]
        return float(np.mean(np.concatenate([np.reshape(e, -1) for e in errors])))

    def learn(self, x: np.ndarray, target: np.ndarray, iterations: int, rng) -> np.ndarray:
        """The integer kernel: floor(w / scale) + 1 where the learnt rounding says up; the largest |weight| of each
        channel kept at +-127 (it sets the scale the converter computes)."""
        ratio = self.kernel / self.scale
        floor = np.floor(ratio)
        rest = np.clip(ratio - floor, 1e-4, 1 - 1e-4)
        v = tf.Variable(-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1).astype(np.float32))  # h(v) = rest at the start
        floor_t, scale_t = tf.constant(floor, tf.float32), tf.constant(self.scale)
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
        limit = float(bias_correction.INT8_MAX)

        def up():
            return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

        @tf.function
        def step(xb, yb, beta, weight):
            with tf.GradientTape() as tape:
                kernel = scale_t * tf.clip_by_value(floor_t + up(), -limit, limit)
                reconstruction = tf.reduce_mean(tf.reduce_sum(tf.square(self.output(xb, kernel) - yb), axis=-1))
                decided = tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * up() - 1.0), beta))
                loss = reconstruction + weight * REGULARISATION * decided
            optimizer.apply_gradients([(tape.gradient(loss, v), v)])

        warmup = int(WARMUP * iterations)
        for i in range(iterations):
            batch = rng.choice(len(x), min(BATCH, len(x)), replace=False)
            beta = BETA[0] + (BETA[1] - BETA[0]) * max(0, i - warmup) / max(1, iterations - warmup)
            step(x[batch], target[batch], tf.constant(beta), tf.constant(0.0 if i < warmup else 1.0))
        learnt = np.clip(floor + (v.numpy() >= 0), -limit, limit)
        return np.where(np.abs(ratio) >= limit - 1e-4, np.round(ratio), learnt)


def _activation_after(model, bn):
    """The ReLU that reads `bn` (as a function), or the identity for a linear output."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.ReLU) and bias_correction.producer(layer) is bn:
            top = np.inf if layer.max_value is None else float(layer.max_value)
            return lambda y: tf.clip_by_value(y, 0.0, top)
    return lambda y: y


def _outputs(model, tensor, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    probe = keras.Model(model.inputs, tensor)
    return np.concatenate([np.asarray(probe(inputs[i:i + batch], training=False), np.float32)
                           for i in range(0, len(inputs), batch)])
