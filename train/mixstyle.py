"""MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021): during training only,
each image's feature statistics in the early layers are blended with another image's of the batch.

Why: a feature map's per-channel mean and spread carry an image's "style" (a hospital's detector,
exposure and processing) more than its content. The shared set's classes come from few hospitals,
so a classifier can score by style; mixing styles between the batch's images (which come from
every source) makes style a poorer cue. At inference the layer is the identity, so the run's
model is saved without it: training fits a second graph that calls the same layers (sharing every
weight) with MixStyle inserted after the registry's `style_layers` (`with_mixstyle`).
"""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras

EPSILON = 1e-6


class MixStyle(keras.layers.Layer):
    """With probability `p` per batch, x -> sigma_mix * (x - mu) / sigma + mu_mix, where mu and sigma
    are each image's per-channel mean and standard deviation over the feature map and
    mu_mix = l mu + (1 - l) mu_j (sigma alike) with l ~ Beta(alpha, alpha) and j another image of the
    batch. The statistics are not differentiated through (as in the paper)."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < p <= 1.0 or alpha <= 0.0:
            raise ValueError(f"MixStyle needs 0 < p <= 1 and alpha > 0, got p {p}, alpha {alpha}")
        self.p, self.alpha, self.seed = p, alpha, seed

    def call(self, x, training=None):
        if not training:
            return x
        mu = tf.stop_gradient(tf.reduce_mean(x, axis=(1, 2), keepdims=True))
        sigma = tf.stop_gradient(tf.sqrt(tf.math.reduce_variance(x, axis=(1, 2), keepdims=True) + EPSILON))
        n = tf.shape(x)[0]
        a = tf.random.gamma([n, 1, 1, 1], self.alpha, dtype=x.dtype, seed=self.seed)
        b = tf.random.gamma([n, 1, 1, 1], self.alpha, dtype=x.dtype, seed=self.seed + 1)
        lam = a / (a + b + EPSILON)
        other = tf.random.shuffle(tf.range(n), seed=self.seed + 2)
        mu_mix = lam * mu + (1 - lam) * tf.gather(mu, other)
        sigma_mix = lam * sigma + (1 - lam) * tf.gather(sigma, other)
        mixed = (x - mu) / sigma * sigma_mix + mu_mix
        return tf.cond(tf.random.uniform([], seed=self.seed + 3) < self.p, lambda: mixed, lambda: x)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "alpha": self.alpha, "seed": self.seed}


def with_mixstyle(model: keras.Model, after: tuple[str, ...], p: float, seed: int) -> keras.Model:
    """A training graph of `model`: its layers called again in their order, sharing their weights,
    with a MixStyle after each layer named in `after`. Fit it; `model` then holds what it learnt."""
    missing = set(after) - {layer.name for layer in model.layers}
    if not after or missing:
        raise ValueError(f"{model.name} has no layer to put MixStyle after: "
                         f"{sorted(missing) or 'the registry names none (style_layers)'}")
    inputs = keras.Input(model.input.shape[1:], name=model.input.name.split(":")[0])
    tensors = {model.layers[0].name: inputs}
    for layer in model.layers[1:]:
        parents = [tensors[p.name] for p in tf.nest.flatten(layer._inbound_nodes[0].inbound_layers)]
        x = layer(parents if len(parents) > 1 else parents[0])
        if layer.name in after:
            x = MixStyle(p, seed=seed + 10 * after.index(layer.name), name=f"mixstyle_{layer.name}")(x)
        tensors[layer.name] = x
    return keras.Model(inputs, tensors[model.layers[-1].name], name=f"{model.name}-mixstyle")
