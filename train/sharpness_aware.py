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

from train.training_step import TrainingStep


class SharpnessAware(TrainingStep):
    """`fitted` trained by SAM with radius `rho` (the perturbation's L2 norm over every trainable weight)."""

    def __init__(self, fitted: keras.Model, rho: float, **kwargs):
        super().__init__(fitted, "sam", **kwargs)
        if rho <= 0:
            raise ValueError(f"SAM's radius rho must be > 0, got {rho}")
        self.rho = rho

    def _gradients(self, x, y, sample_weight):
        """(predictions, gradients of the loss) at the current weights."""
        def objective():
            predictions = self(x, training=True)
            return self.compute_loss(x, y, predictions, sample_weight), predictions
        (_, predictions), gradients = self.gradients(objective)
        return predictions, gradients

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        predictions, gradients = self._gradients(x, y, sample_weight)
        norm = tf.linalg.global_norm(gradients)
        # a non-finite gradient (float16 loss scale too high) perturbs nothing; the optimizer then skips the step
        scale = tf.where(tf.math.is_finite(norm), self.rho / (norm + 1e-12), 0.0)
        steps = [g * scale for g in gradients]
        for variable, step in zip(self.trainable_variables, steps):
            variable.assign_add(tf.cast(step, variable.dtype))
        _, sharp_gradients = self._gradients(x, y, sample_weight)
        for variable, step in zip(self.trainable_variables, steps):
            variable.assign_sub(tf.cast(step, variable.dtype))
        self.optimizer.apply_gradients(zip(sharp_gradients, self.trainable_variables))
        return self.compute_metrics(x, y, predictions, sample_weight)


def perturbed_losses(model: keras.Model, x, y, rhos) -> tuple[float, list[float]]:
    """The mean cross-entropy of (x, y) at the model's weights and at w + rho g / ||g|| for each rho, over the
    weights trainable now (the model is left as it was): how steep the loss is at the radius SAM would use."""
    def loss():
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False),
                                                                            from_logits=True))
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        at_weights = loss()
    gradients = tape.gradient(at_weights, variables)
    unit = [g / tf.linalg.global_norm(gradients) for g in gradients]
    perturbed = []
    for rho in rhos:
        for v, u in zip(variables, unit):
            v.assign_add(rho * u)
        perturbed.append(float(loss()))
        for v, u in zip(variables, unit):
            v.assign_sub(rho * u)
    return float(at_weights), perturbed


def main(argv=None) -> int:
    """python -m train.sharpness_aware RUN [--rho R ...] [--images N]: a finished run's training loss at its
    weights and at SAM's perturbed weights, with the weights its last phase trained (fine-tuning's top layers),
    on N of its training images: a radius that multiplies the loss breaks training rather than flattening it."""
    import argparse

    import numpy as np

    from train import evaluate
    from train.data import run_splits
    from train.pipeline import make_dataset
    from train.trainer import load_run, set_trainable

    parser = argparse.ArgumentParser(prog="python -m train.sharpness_aware", description=main.__doc__)
    parser.add_argument("run")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05, 0.02, 0.01, 0.005])
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args(argv)
    model, card, config = load_run(args.run)
    dataset, _ = run_splits.load(args.run)
    train_records = dataset.split("train")
    chosen = np.random.default_rng(0).choice(len(train_records), min(args.images, len(train_records)), replace=False)
    x, y, _ = evaluate.load_split([train_records[i] for i in chosen], dataset.labels, card.input, desc="train",
                                  progress=False)
    inputs = next(iter(make_dataset(x, y, card.input, batch_size=len(x), training=False)))[0]
    set_trainable(model, config.strategy, 2 if config.strategy == "finetune" else 1, config.fine_tune_layers)
    at_weights, perturbed = perturbed_losses(model, inputs, y, args.rho)
    print(f"{len(x)} training images, {len(model.trainable_variables)} trainable weight tensors: loss {at_weights:.4f}")
    for rho, value in zip(args.rho, perturbed):
        print(f"  at radius {rho:g} along the gradient: {value:.4f} ({value / at_weights:.1f} x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
