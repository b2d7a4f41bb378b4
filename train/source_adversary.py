"""A class-conditional source adversary, during training only.

Why: within a class the pooled features name the data source of 95-97 % of test images (the run's
shortcut probe), so the classifier can score a hospital, an age or a projection instead of a finding.
A small head (the judge) learns to tell each training image's source from those features, separately
within each class (telling sources apart across classes would only remove the class itself); the
backbone is trained against it, so the features it learns keep the class and lose the source. Two ways:

- "reversal": the judge's gradient, reversed and times `weight`, goes into the backbone (Ganin et al.,
  "Domain-adversarial training of neural networks", JMLR 2016; conditioned on the class as in Li et al.,
  ECCV 2018). The backbone then maximises the judge's loss, which has no upper bound.
- "confusion": the backbone minimises, times `weight`, the cross-entropy between the judge's answer and
  an even split over the sources the class has in training, with the judge's weights held; the judge
  learns on features whose gradient is stopped (Tzeng et al., "Simultaneous deep transfer across domains
  and tasks", ICCV 2015; Alvi et al., "Turning a blind eye", ECCV workshops 2018). Bounded: at best the
  judge cannot tell the class's sources apart.

At inference the judge is not there: training fits a second graph (`SourceAdversary.graph`) that shares
every weight of the run's model and also outputs the judge's logits; the run's model is saved without it.
Labels: that graph takes one integer per image, class * sources + source (`train.pipeline.joint_labels`), so the
tf.data pipeline, sample weights and checkpoints stay as they are; the loss splits it again.
"""
from __future__ import annotations

from dataclasses import dataclass

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf
import tf_keras as keras

from edge_app import graph_names
from train.config import ADVERSARY_MODES

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


class Judge(keras.layers.Layer):
    """features -> (classes * sources) source logits through one hidden layer. `call` gives
    [the judge on stopped features | the same judge, its weights held, on the features]: the first
    trains the judge alone, the second the backbone alone."""

    def __init__(self, outputs: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(HIDDEN_UNITS, activation="relu", dtype="float32")
        self.out = keras.layers.Dense(outputs, dtype="float32")

    def call(self, features):
        features = tf.cast(features, tf.float32)
        judged = self.out(self.hidden(tf.stop_gradient(features)))
        w1, b1, w2, b2 = (tf.stop_gradient(w) for w in (self.hidden.kernel, self.hidden.bias,
                                                         self.out.kernel, self.out.bias))
        return tf.concat([judged, tf.nn.relu(features @ w1 + b1) @ w2 + b2], axis=1)


@dataclass(frozen=True)
class SourceAdversary:
    classes: int
    present: np.ndarray          # (classes, sources) bool: which sources each class has in training
    weight: float
    mode: str = "confusion"

    def __post_init__(self):
        if self.mode not in ADVERSARY_MODES:
            raise ValueError(f"the source adversary's mode must be one of {ADVERSARY_MODES}, got {self.mode!r}")
        if self.sources < 2:
            raise ValueError("the source adversary needs training images from at least two data sources "
                             f"(got {self.sources}): with one there is no source to forget")

    @classmethod
    def of(cls, labels: np.ndarray, source_index: np.ndarray, classes: int, sources: int, weight: float,
           mode: str) -> "SourceAdversary":
        present = np.zeros((classes, sources), bool)
        present[np.asarray(labels), np.asarray(source_index)] = True
        return cls(classes, present, weight, mode)

    @property
    def sources(self) -> int:
        return self.present.shape[1]

    def graph(self, model: keras.Model) -> keras.Model:
        """A training graph of `model` whose output is [the model's logits | the judge's logits, one
        block of `sources` per class (twice in "confusion": on stopped features, then with the judge
        held)]. It shares every weight of `model`; fit it, and `model` holds what it learnt."""
        features = model.get_layer(graph_names.POOL).output
        outputs = self.classes * self.sources
        if self.mode == "reversal":
            x = GradientReversal(self.weight, name="source_gradient_reversal")(features)
            x = keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="source_judge_hidden")(x)
            judged = keras.layers.Dense(outputs, dtype="float32", name="source_judge_logits")(x)
        else:
            judged = Judge(outputs, name="source_judge")(features)
        both = keras.layers.Concatenate(dtype="float32", name="logits_and_source")([model.output, judged])
        return keras.Model(model.input, both, name=f"{model.name}-source-adversary")

    def _split(self, y_true, outputs):
        """(class, source, class logits, judged source logits within the image's class[, held judge's])."""
        joint = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        label, source = joint // self.sources, joint % self.sources
        blocks = tf.reshape(outputs[:, self.classes:], [-1, 1 + (self.mode == "confusion"), self.classes,
                                                         self.sources])
        own = [tf.gather(blocks[:, i], label, axis=1, batch_dims=1) for i in range(blocks.shape[1])]
        return label, source, outputs[:, :self.classes], *own

    def loss(self, class_loss):
        """Per image: the class loss plus the judge's cross-entropy on the source within the image's class
        (in "reversal" the reversal turns it against the backbone), plus in "confusion" `weight` times the
        held judge's cross-entropy against an even split over the class's training sources."""
        even = tf.constant(self.present / self.present.sum(axis=1, keepdims=True).clip(1), tf.float32)

        def total(y_true, outputs):
            label, source, logits, judged, *held = self._split(y_true, outputs)
            value = class_loss(label, logits) + keras.losses.sparse_categorical_crossentropy(
                source, judged, from_logits=True)
            if held:
                value += self.weight * keras.losses.categorical_crossentropy(
                    tf.gather(even, label), held[0], from_logits=True)
            return value
        return total

    def metrics(self) -> list:
        """Training-time accuracy of the class and of the judge's source guess (how much of the source
        the features still carry)."""
        def accuracy(y_true, outputs):
            label, _, logits, *_ = self._split(y_true, outputs)
            return tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), label), tf.float32)

        def source_accuracy(y_true, outputs):
            _, source, _, judged, *_ = self._split(y_true, outputs)
            return tf.cast(tf.equal(tf.argmax(judged, 1, output_type=tf.int32), source), tf.float32)
        return [accuracy, source_accuracy]
