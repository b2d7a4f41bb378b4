"""A class-conditional source adversary (Ganin et al., "Domain-adversarial training of neural networks",
JMLR 2016; conditioned on the class as in Li et al., "Deep domain generalization via conditional
invariant adversarial networks", ECCV 2018), during training only.

Why: within a class the pooled features name the data source of 95-97 % of test images (the run's
shortcut probe), so the classifier can score a hospital, an age or a projection instead of a finding.
A small head learns to tell each training image's source from those features, separately within
each class (telling sources apart across classes would only remove the class itself); a gradient
reversal layer hands the backbone the opposite of that head's gradient, times `weight`, so the
features it learns keep the class and lose the source. At inference the head is not there: training
fits a second graph (`with_source_adversary`) that shares every weight of the run's model and also
outputs the head's logits; the run's model is saved without it.

Labels: the training graph takes one integer per image, class * sources + source (`joint_labels`), so
the tf.data pipeline, sample weights and checkpoints stay as they are; `loss` splits it again.
"""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf
import tf_keras as keras

from edge_app import graph_names

HIDDEN_UNITS = 256


class GradientReversal(keras.layers.Layer):
    """The identity forwards; backwards, the gradient times -weight."""

    def __init__(self, weight: float, **kwargs):
        super().__init__(**kwargs)
        if weight <= 0:
            raise ValueError(f"the gradient reversal's weight must be > 0, got {weight}")
        self.weight = weight

    def call(self, x):
        @tf.custom_gradient
        def reverse(x):
            return tf.identity(x), lambda dy: -self.weight * dy
        return reverse(x)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


def with_source_adversary(model: keras.Model, sources: int, weight: float) -> keras.Model:
    """A training graph of `model` whose output is [the model's logits | the adversary's logits, one
    block of `sources` per class], the adversary reading the pooled features through a gradient
    reversal. It shares every weight of `model`; fit it, and `model` holds what it learnt."""
    if sources < 2:
        raise ValueError("the source adversary needs training images from at least two data sources "
                         f"(got {sources}): with one there is no source to forget")
    classes = model.output.shape[-1]
    features = model.get_layer(graph_names.POOL).output
    x = GradientReversal(weight, name="source_gradient_reversal")(features)
    x = keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="source_adversary_hidden")(x)
    x = keras.layers.Dense(classes * sources, dtype="float32", name="source_adversary_logits")(x)
    outputs = keras.layers.Concatenate(dtype="float32", name="logits_and_source")([model.output, x])
    return keras.Model(model.input, outputs, name=f"{model.name}-source-adversary")


def joint_labels(classes: np.ndarray, source_index: np.ndarray, sources: int) -> np.ndarray:
    """One integer per image for the training graph: class * sources + source."""
    return (np.asarray(classes) * sources + np.asarray(source_index)).astype(np.int32)


def _split(y_true, outputs, classes: int, sources: int):
    """(class, source, class logits, the adversary's source logits within the image's class)."""
    joint = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    label, source = joint // sources, joint % sources
    logits, adversary = outputs[:, :classes], tf.reshape(outputs[:, classes:], [-1, classes, sources])
    return label, source, logits, tf.gather(adversary, label, axis=1, batch_dims=1)


def loss(class_loss, classes: int, sources: int):
    """Per image: the class loss on the class logits plus the adversary's cross-entropy on the source,
    within the image's class. The reversal, not a sign here, turns the second against the backbone."""
    def total(y_true, outputs):
        label, source, logits, adversary = _split(y_true, outputs, classes, sources)
        return class_loss(label, logits) + keras.losses.sparse_categorical_crossentropy(
            source, adversary, from_logits=True)
    return total


def metrics(classes: int, sources: int) -> list:
    """Training-time accuracy of the class and of the adversary's source guess (how much of the source
    the features still carry)."""
    def accuracy(y_true, outputs):
        label, _, logits, _ = _split(y_true, outputs, classes, sources)
        return tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), label), tf.float32)

    def source_accuracy(y_true, outputs):
        _, source, _, adversary = _split(y_true, outputs, classes, sources)
        return tf.cast(tf.equal(tf.argmax(adversary, 1, output_type=tf.int32), source), tf.float32)
    return [accuracy, source_accuracy]
