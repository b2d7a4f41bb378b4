"""Group distributionally robust optimisation (Group DRO; Sagawa et al., "Distributionally robust neural
networks for group shifts", ICLR 2020), during training only.

Why: the set's groups are a population crossed with a class (`train.data.sources.cohort_of`: adult normal,
adult pneumonia, adult COVID-19, child normal, child pneumonia), and the plain average loss is ruled by
the children's 1,398 films; the adults' films, the next hospital's patients, can stay badly fitted while
the average looks good. Group DRO minimises the worst group's loss instead, by its online algorithm: a
weight q per group, after each batch q_g <- q_g exp(step_size * loss_g) (normalised), and the step
descends sum_g q_g loss_g. A group the model keeps getting wrong gains weight until it is fitted.

loss_g is the mean loss of the batch's images of group g, weighted by the run's image weights; within a
group those are constant unless the view balance is on, so the recipe's class weights cancel and q takes
their place. A group with no image in the batch keeps its weight.

Labels: the training graph takes one integer per image, class * groups + group (`train.pipeline.joint_labels`), so the
tf.data pipeline, image weights and checkpoints stay as they are. The wrapper only changes the training
step: it calls the graph it wraps (the run's model, or the MixStyle graph), so it shares every weight and
the run's model is saved without it. Its logged `loss` is the recipe's own (weighted mean) loss; the
group weights are logged per epoch as `q_<group>` (training_phase*.csv).
"""
from __future__ import annotations

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras

from train.training_step import TrainingStep


class GroupDRO(TrainingStep):
    """`fitted` trained on the weighted group losses of `per_image_loss` (labels: `joint_labels`)."""

    def __init__(self, fitted: keras.Model, per_image_loss, group_names: list[str], step_size: float, **kwargs):
        super().__init__(fitted, "group-dro", **kwargs)
        if step_size <= 0:
            raise ValueError(f"Group DRO's step size must be > 0, got {step_size}")
        self.per_image_loss, self.step_size = per_image_loss, step_size
        self.group_names = list(group_names)
        self.group_weights = tf.Variable(tf.fill([len(group_names)], 1.0 / len(group_names)), trainable=False,
                                         name="group_weights")

    def _split(self, y):
        joint = tf.cast(tf.reshape(y, [-1]), tf.int32)
        return joint // len(self.group_names), joint % len(self.group_names)

    def group_losses(self, label, group, logits, sample_weight):
        """(each group's weighted mean loss in the batch, whether the batch has the group)."""
        weight = tf.ones(tf.shape(label), tf.float32) if sample_weight is None \
            else tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
        member = tf.one_hot(group, len(self.group_names)) * weight[:, None]
        per_image = tf.cast(tf.reshape(self.per_image_loss(label, logits), [-1]), tf.float32)
        totals, weights = tf.reduce_sum(member * per_image[:, None], 0), tf.reduce_sum(member, 0)
        return totals / tf.maximum(weights, 1e-12), weights > 0

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        label, group = self._split(y)

        def objective():
            logits = self(x, training=True)
            losses, present = self.group_losses(label, group, logits, sample_weight)
            q = self.group_weights * tf.exp(self.step_size * tf.where(present, tf.stop_gradient(losses), 0.0))
            q = q / tf.reduce_sum(q)
            regularisation = tf.add_n([0.0] + [tf.cast(r, tf.float32) for r in self.losses])
            return tf.reduce_sum(q * losses) + regularisation, logits, q

        (_, logits, q), gradients = self.gradients(objective)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.group_weights.assign(q)
        self.compute_loss(x, label, logits, sample_weight)     # the recipe's own loss, for the log
        logs = self.compute_metrics(x, label, logits, sample_weight)
        return {**logs, **{f"q_{name.replace(' ', '_')}": q[i] for i, name in enumerate(self.group_names)}}
