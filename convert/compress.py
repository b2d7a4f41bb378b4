"""Compression by fine-tuning, with tensorflow-model-optimization (tfmot, Keras 2 only).

qat(model)            quantisation-aware training: fake int8 quantisation in the forward pass,
                      its ranges started from the float model's (calibrate_ranges), fine-tuned,
                      so the weights learn to live with int8 rounding.
prune(model, 0.5)     magnitude pruning, polynomial decay of the sparsity to the target,
                      fine-tuned, then stripped (plain layers, zeros in the kernels).
pqat(pruned)          QAT that keeps the pruned zeros (Default8BitPrunePreserveQuantizeScheme).

QAT fine-tunes towards the float model's logits by default (ConvertConfig.qat_objective): the
int8 file is then a copy of the model that was evaluated, not a new one.

Every fine-tune runs on the training run's own data pipeline (train.pipeline.make_dataset,
with its augmentation; class weights and loss where it learns from the labels).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as registry)

from convert.config import ConvertConfig
from convert.export import kernel_of
from edge_app.preprocess import InputSpec
from train.config import TrainConfig
from train.pipeline import make_dataset, model_inputs
from train.trainer import sparse_focal_loss

KERNELS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)  # depthwise kernels stay dense (few weights, fragile)
# Layers tfmot's default 8-bit scheme has no config for, and what they are in the registered models.
WHY_UNSUPPORTED = {
    "TFOpLambda": "raw TF ops in the graph (in MobileNetV3: the hard-swish x*ReLU6(x+3)/6)",
    "Multiply": "elementwise gating (squeeze-and-excite)",
    "Rescaling": "in-graph input scaling (a preprocessing layer)",
    "Normalization": "in-graph input normalisation (a preprocessing layer)",
    "BatchNormalization": "batch normalisation not directly after a convolution (cannot be folded)",
}


class QATUnsupported(ValueError):
    """tfmot cannot quantisation-aware-train this architecture."""


@dataclass
class FineTuneData:
    """The training split, decoded once, and how the run trained on it."""
    images: np.ndarray     # (N, size, size) uint8 squares before the contrast step (train.pipeline.load_images)
    labels: np.ndarray     # class indices
    spec: InputSpec
    train_config: TrainConfig
    weights: np.ndarray    # per image, as the run trained (train.pipeline.image_weights)

    def dataset(self, cfg: ConvertConfig, *, augment: bool = True) -> tf.data.Dataset:
        """Shuffled batches of (model input, label, weight), augmented as the run trained, or
        without augmentation (the device's inputs)."""
        ds = make_dataset(self.images, self.labels, self.spec, batch_size=cfg.batch_size, training=True,
                          config=self.train_config if augment else None, seed=self.train_config.seed,
                          sample_weights=self.weights)
        return ds.repeat() if cfg.steps_per_epoch else ds  # capped epochs continue, never run dry

    def calibration_inputs(self, cfg: ConvertConfig, n: int = 256) -> np.ndarray:
        """Model inputs of `n` training images drawn at random, not augmented."""
        pick = np.random.default_rng(cfg.seed).permutation(len(self.images))[:n]
        return model_inputs(self.images[np.sort(pick)], self.spec)

    def loss(self):
        c = self.train_config
        return (sparse_focal_loss(c.focal_gamma) if c.loss == "focal"
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True))



def unsupported_layers(model: keras.Model) -> dict[str, list[str]]:
    """Layer type -> layer names that tfmot's default 8-bit scheme cannot quantise.

    BatchNormalization right after a convolution is supported (tfmot folds it into the
    convolution before quantising), so only other BatchNormalizations count.
    """
    reg = registry.Default8BitQuantizeRegistry()
    found = collections.defaultdict(list)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or reg.supports(layer):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            inbound = layer.inbound_nodes[0].inbound_layers
            if isinstance(inbound, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                continue
        found[type(layer).__name__].append(layer.name)
    return dict(found)


def check_quantizable(model: keras.Model) -> None:
    """Raise QATUnsupported naming each layer type tfmot refuses, and why, before tfmot fails
    somewhere deep inside with an unrelated-looking error."""
    bad = unsupported_layers(model)
    if bad:
        parts = [f"{kind} x{len(names)} (e.g. {names[0]}): {WHY_UNSUPPORTED.get(kind, 'no quantize config')}"
                 for kind, names in sorted(bad.items())]
        raise QATUnsupported(
            f"quantisation-aware training is not possible for {model.name}: tfmot's default 8-bit "
            f"scheme has no quantisation config for " + "; ".join(parts) +
            ". Use the post-training int8 variant for this architecture.")


def qat(model: keras.Model, data: FineTuneData, cfg: ConvertConfig, *, progress: bool = True) -> keras.Model:
    """The model wrapped for quantisation-aware training, its ranges calibrated, fine-tuned
    towards `model`'s logits or the labels (cfg.qat_objective)."""
    check_quantizable(model)
    q = tfmot.quantization.keras.quantize_model(_clone(model))
    calibrate_ranges(q, model, data.calibration_inputs(cfg))
    return _fit_quantised(q, model, data, cfg, cfg.qat_epochs, progress)


def _fit_quantised(q: keras.Model, teacher: keras.Model, data: FineTuneData, cfg: ConvertConfig, epochs: int,
                   progress: bool) -> keras.Model:
    """Fine-tune a fake-quantised model. "distill": towards the float `teacher`'s logits on the
    training images as the device sees them (not augmented: the ranges settle where the device's
    activations are; mean squared error, no labels, no class weights, no dropout), which keeps its
    decisions the teacher's; "labels": the run's loss on augmented batches, as training."""
    if cfg.qat_objective == "labels":
        return _fit(q, data, cfg, epochs, cfg.qat_learning_rate, [], progress)
    for layer in q.layers:      # no dropout: it would ask a noisy copy to match a deterministic teacher
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.Dropout):
            inner.rate = 0.0
    q.compile(optimizer=keras.optimizers.Adam(cfg.qat_learning_rate), loss=keras.losses.MeanSquaredError())
    if epochs:
        batches = data.dataset(cfg, augment=False).map(lambda x, *_: (x, teacher(x, training=False)))
        q.fit(batches, epochs=epochs, steps_per_epoch=cfg.steps_per_epoch, verbose=1 if progress else 2)
    return q


def calibrate_ranges(quantized: keras.Model, model: keras.Model, inputs: np.ndarray, batch_size: int = 32) -> int:
    """Start the activation ranges of a tfmot model where the float model's activations are.

    tfmot starts every activation range at [-6, 6] and moves it by an exponential moving
    average with decay 0.999 per training step: a fine-tune of a hundred steps never gets
    there, so ranges ten times wider (MobileNetV2's linear bottlenecks reach ~±30) are clipped
    and the first epoch is spent repairing the damage (measured: training accuracy 0.57 in
    epoch 1 of QAT on the real set, against 0.88 before). Here each range (`quant_X`'s
    output / post-activation range, the input quantiser's range) is set to the mean over
    batches of the batch min and max of float layer X's output, the value the moving average
    converges to. Returns the number of ranges set.
    """
    targets = {}
    for layer in quantized.layers:
        for w in layer.weights:
            kind = w.name.split("/")[-1].split(":")[0]
            if kind in ("output_min", "output_max", "post_activation_min", "post_activation_max"):
                targets.setdefault(layer.name.removeprefix("quant_"), []).append(w)
            elif kind in ("quantize_layer_min", "quantize_layer_max"):
                targets.setdefault(None, []).append(w)
    names = [n for n in targets if n is not None]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    lows, highs = collections.defaultdict(list), collections.defaultdict(list)
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        outputs = probe(x, training=False)
        for n, y in zip([None, *names], [x, *(outputs if len(names) > 1 else [outputs])]):
            y = np.asarray(y)
            lows[n].append(min(float(y.min()), 0.0))
            highs[n].append(max(float(y.max()), 0.0))
    for n, variables in targets.items():
        for w in variables:
            w.assign(np.mean(lows[n]) if w.name.split(":")[0].endswith("_min") else np.mean(highs[n]))
    return sum(len(v) for v in targets.values()) + _set_weight_ranges(quantized)


def _set_weight_ranges(quantized: keras.Model) -> int:
    """Weight ranges as tfmot's last-value quantiser sets them at the first training step
    (min/max of the kernel, per output channel where the variable is per channel), so the
    model is right before that step too (they also start at [-6, 6])."""
    count = 0
    for layer in quantized.layers:
        ranges = {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}
        for kind in ("kernel", "depthwise_kernel"):
            if f"{kind}_min" not in ranges:
                continue
            kernel = ranges[kind].numpy()
            axes = tuple(range(kernel.ndim - 1)) if ranges[f"{kind}_min"].shape.num_elements() > 1 else None
            ranges[f"{kind}_min"].assign(np.minimum(kernel.min(axis=axes), 0.0).reshape(ranges[f"{kind}_min"].shape))
            ranges[f"{kind}_max"].assign(np.maximum(kernel.max(axis=axes), 0.0).reshape(ranges[f"{kind}_max"].shape))
            count += 2
    return count


def prune(model: keras.Model, data: FineTuneData, cfg: ConvertConfig, *, progress: bool = True) -> keras.Model:
    """The model magnitude-pruned to cfg.prune_sparsity in its Conv2D and Dense kernels,
    fine-tuned, stripped: a plain Keras model with zeros in its kernels."""
    steps = cfg.steps_per_epoch or int(np.ceil(len(data.labels) / cfg.batch_size))
    ramp = steps * max(1, cfg.prune_epochs - 1)  # the last epoch fine-tunes under the final mask
    frequency = max(1, ramp // 10)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=cfg.prune_sparsity, begin_step=0,
        end_step=frequency * (ramp // frequency), frequency=frequency)

    def annotate(layer):  # wraps the layer itself, so the trained weights carry over
        return (tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
                if _prunable(layer) else layer)

    pruned = keras.models.clone_model(_clone(model), clone_function=annotate)
    pruned = _fit(pruned, data, cfg, cfg.prune_epochs, cfg.prune_learning_rate,
                  [tfmot.sparsity.keras.UpdatePruningStep()], progress)
    return _clone(tfmot.sparsity.keras.strip_pruning(pruned))  # fresh layers: the unpruned ones were shared


def pqat(pruned: keras.Model, data: FineTuneData, cfg: ConvertConfig, *, progress: bool = True) -> keras.Model:
    """Pruning-preserving QAT of a stripped pruned model: the zeros stay zeros."""
    check_quantizable(pruned)
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
        default_8bit_prune_preserve_quantize_scheme as scheme)

    annotated = tfmot.quantization.keras.quantize_annotate_model(_clone(pruned))
    q = tfmot.quantization.keras.quantize_apply(annotated, scheme.Default8BitPrunePreserveQuantizeScheme())
    calibrate_ranges(q, pruned, data.calibration_inputs(cfg))
    return _fit_quantised(q, pruned, data, cfg, cfg.pqat_epochs, progress)


def sparsity(model: keras.Model) -> dict:
    """Fraction of exact zeros in each prunable kernel, over the prunable kernels, and over
    every convolution and dense kernel (depthwise ones included, which are never pruned)."""
    per_layer, counts = {}, np.zeros((2, 2), np.int64)  # rows: prunable, all; cols: zeros, size
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # through QAT wrappers
        if not isinstance(inner, KERNELS):
            continue
        kernel = kernel_of(layer)
        row = np.array([int((kernel == 0).sum()), kernel.size])
        counts[1] += row
        if _prunable(inner):
            per_layer[inner.name] = float(row[0] / row[1])
            counts[0] += row
    return {"per_layer": per_layer,
            "prunable": float(counts[0, 0] / max(counts[0, 1], 1)),
            "overall": float(counts[1, 0] / max(counts[1, 1], 1))}


def _prunable(layer) -> bool:
    return isinstance(layer, PRUNABLE)


def _clone(model: keras.Model) -> keras.Model:
    """A fresh copy with the trained weights, every weight trainable except BatchNorm's, which
    stays in inference mode (its statistics are the trained ones; batches of 32 would only
    make them noisier, and the short fine-tune cannot re-learn them)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return copy


def _fit(model, data: FineTuneData, cfg: ConvertConfig, epochs: int, learning_rate: float,
         callbacks: list, progress: bool) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=data.loss(), metrics=["accuracy"])
    if epochs:
        model.fit(data.dataset(cfg), epochs=epochs, steps_per_epoch=cfg.steps_per_epoch,
                  callbacks=callbacks,
                  verbose=1 if progress else 2)
    return model
