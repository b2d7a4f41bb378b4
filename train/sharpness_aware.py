"""Sharpness-aware minimisation (SAM; Foret et al., "Sharpness-aware minimization for efficiently improving
generalization", ICLR 2021): each step descends the loss at the worst nearby weights, w + rho g / ||g||,
instead of at w, so training settles in a flat minimum.

Why: flat minima are the common thread of what carries to unseen domains (Cha et al., "SWAD: domain
generalization by seeking flat minima", NeurIPS 2021). The default's weight average seeks them by
averaging along the path; SAM seeks them in every step, at twice the gradients per step.

The wrapper only changes the training step: it calls the graph it wraps (the run's model, or the
MixStyle / source-adversary training graph), so it shares every weight and the run's model is saved
without it. The loss it logs per epoch averages the loss at the weights and at the perturbed weights.
"""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras


class SharpnessAware(keras.Model):
    """`fitted` trained by SAM with radius `rho` (the perturbation's L2 norm over every trainable weight)."""

    def __init__(self, fitted: keras.Model, rho: float, **kwargs):
        super().__init__(name=f"{fitted.name}-sam", **kwargs)
        if rho <= 0:
            raise ValueError(f"SAM's radius rho must be > 0, got {rho}")
        self.fitted, self.rho = fitted, rho

    def call(self, x, training=None):
        return self.fitted(x, training=training)

    def _gradients(self, x, y, sample_weight):
        """(predictions, loss, gradients of the loss) at the current weights, loss scaling undone."""
        scaled = isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            predictions = self(x, training=True)
            loss = self.compute_loss(x, y, predictions, sample_weight)
            scaled_loss = self.optimizer.get_scaled_loss(loss) if scaled else loss
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        if scaled:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        return predictions, loss, [tf.zeros_like(v) if g is None else g
                                   for g, v in zip(gradients, self.trainable_variables)]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        predictions, loss, gradients = self._gradients(x, y, sample_weight)
        norm = tf.linalg.global_norm(gradients)
        # a non-finite gradient (float16 loss scale too high) perturbs nothing; the optimizer then skips the step
        scale = tf.where(tf.math.is_finite(norm), self.rho / (norm + 1e-12), 0.0)
        steps = [g * scale for g in gradients]
        for variable, step in zip(self.trainable_variables, steps):
            variable.assign_add(tf.cast(step, variable.dtype))
        _, _, sharp_gradients = self._gradients(x, y, sample_weight)
        for variable, step in zip(self.trainable_variables, steps):
            variable.assign_sub(tf.cast(step, variable.dtype))
        self.optimizer.apply_gradients(zip(sharp_gradients, self.trainable_variables))
        return self.compute_metrics(x, y, predictions, sample_weight)
