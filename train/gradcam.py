"""Grad-CAM on the Keras model: where the network looked for the class it is asked about.

Selvaraju et al. (2017): the last feature map weighted by the spatially averaged gradient of
the class logit, kept positive. Training's report shows it for a sample of test images; the
device shows the cheaper class-activation map computed inside the exported graph
(`convert.export.with_heatmap`), which for this head (pooling + one dense layer) is the same
map up to scale.
"""
from __future__ import annotations

import numpy as np

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge_app.graph_names import FEATURES


def gradcam(model: keras.Model, inputs: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray:
    """(N, h, w) maps in [0, 1] for a batch of model inputs; class_index None -> the predicted class."""
    probe = keras.Model(model.input, [model.get_layer(FEATURES).output, model.output])
    x = tf.convert_to_tensor(inputs, tf.float32)
    with tf.GradientTape() as tape:
        features, logits = probe(x, training=False)
        if class_index is None:
            class_index = tf.argmax(logits, axis=1)
        chosen = tf.gather(logits, tf.cast(class_index, tf.int32), axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(chosen, features), tf.float32)  # float16 under mixed precision
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1)).numpy()
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def sample_for_review(y_true: np.ndarray, y_pred: np.ndarray, count: int = 12, seed: int = 0) -> np.ndarray:
    """Indices of up to `count` test images: half errors (when there are any), the rest correct,
    spread over the classes, so the grid shows both what the model gets wrong and right."""
    rng = np.random.default_rng(seed)
    errors = np.flatnonzero(y_true != y_pred)
    chosen = list(rng.permutation(errors)[: count // 2])
    correct = [rng.permutation(np.flatnonzero((y_true == c) & (y_pred == c))) for c in np.unique(y_true)]
    for i in range(max((len(c) for c in correct), default=0)):
        for per_class in correct:
            if i < len(per_class) and len(chosen) < count:
                chosen.append(per_class[i])
    return np.array(sorted(chosen), dtype=int)
