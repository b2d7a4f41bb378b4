"""The base of the training-only graphs (SAM, Group DRO, consistency): a keras.Model around `fitted` (the run's
model, or the MixStyle / source-adversary training graph) that calls it as it is, so it shares every weight and
the run's model is saved without it. A subclass writes only its train_step, from `gradients`."""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras


class TrainingStep(keras.Model):
    def __init__(self, fitted: keras.Model, suffix: str, **kwargs):
        super().__init__(name=f"{fitted.name}-{suffix}", **kwargs)
        self.fitted = fitted

    def call(self, x, training=None):
        return self.fitted(x, training=training)

    def gradients(self, objective):
        """(what `objective()` returns: (loss, ...), the gradients of its loss over the trainable weights), with
        mixed precision's loss scaling applied and undone; a weight the loss does not reach gets zeros."""
        scaled = isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            outputs = objective()
            scaled_loss = self.optimizer.get_scaled_loss(outputs[0]) if scaled else outputs[0]
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        if scaled:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        return outputs, [tf.zeros_like(v) if g is None else g for g, v in zip(gradients, self.trainable_variables)]
