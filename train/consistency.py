"""Consistency between two augmented views of each training image (the Jensen-Shannon term of AugMix:
Hendrycks et al., "AugMix: A simple data processing method to improve robustness and uncertainty",
ICLR 2020), during training only.

Why: augmentation alone shows the model more acquisitions (blur, sharpening, lower resolution) but lets it
answer differently for each; measured here (docs/RESULTS.md, 2026-12-05), it then lost specificity and AUC
in distribution. The consistency term asks for the same answer on two independent draws of the
augmentation of one film, so what an acquisition changes stops moving the answer, which is what the next
hospital's detector and export change.

The batch holds two views of each image, stacked (`train.pipeline.make_dataset`: n labels, 2n inputs);
the step descends the recipe's loss on both views (labels and image weights repeated) plus
`weight` x JS(p1, p2), the mean over the batch of the Jensen-Shannon divergence between the two views'
class probabilities. The wrapper only changes the training step: it calls the graph it wraps, so it shares
every weight and the run's model is saved without it. Logged per epoch: `loss` (the recipe's own loss on the
views) and `consistency` (the mean JS divergence, in nats).
"""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras

from train.training_step import TrainingStep


def jensen_shannon(logits_a, logits_b):
    """Per image, the Jensen-Shannon divergence (nats) between the softmax of two logits rows."""
    p, q = tf.nn.softmax(tf.cast(logits_a, tf.float32)), tf.nn.softmax(tf.cast(logits_b, tf.float32))
    log_m = tf.math.log(tf.clip_by_value((p + q) / 2.0, 1e-7, 1.0))
    kl = lambda r: tf.reduce_sum(r * (tf.math.log(tf.clip_by_value(r, 1e-7, 1.0)) - log_m), axis=-1)
    return (kl(p) + kl(q)) / 2.0


class ConsistencyTraining(TrainingStep):
    """`fitted` trained on its loss over two stacked views of each image plus `weight` x their JS divergence."""

    def __init__(self, fitted: keras.Model, weight: float, **kwargs):
        super().__init__(fitted, "consistency", **kwargs)
        if weight <= 0:
            raise ValueError(f"the consistency weight must be > 0, got {weight}")
        self.weight = weight
        self.divergence = keras.metrics.Mean(name="consistency")   # the epoch's mean, reset with the others

    @property
    def metrics(self):
        return [*super().metrics, self.divergence]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        n = tf.shape(y)[0]
        y2 = tf.concat([y, y], axis=0)
        w2 = None if sample_weight is None else tf.concat([sample_weight, sample_weight], axis=0)

        def objective():
            logits = self(x, training=True)
            recipe_loss = self.compute_loss(x, y2, logits, w2)   # with the regularisation losses
            divergence = tf.reduce_mean(jensen_shannon(logits[:n], logits[n:]))
            return tf.cast(recipe_loss, tf.float32) + self.weight * divergence, logits, divergence

        (_, logits, divergence), gradients = self.gradients(objective)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.divergence.update_state(divergence)
        return {**self.compute_metrics(x, y2, logits, w2), "consistency": self.divergence.result()}
