"""Keras model -> TFLite variants, each carrying its model card.

fp32      plain float32 (the reference)
dynamic   dynamic-range quantisation: int8 weights, float activations
fp16      float16 weights: the GPU-delegate variant
int8      full integer: int8 weights and activations, int8 input and output, calibrated on
          a representative sample of the training split
"""
from __future__ import annotations

import dataclasses

import numpy as np

import train  # noqa: F401
import tensorflow as tf

from edge_app.model_card import ModelCard
from edge_app.tflite_metadata import CARD_METADATA_NAME, write_metadata

VARIANTS = ("fp32", "dynamic", "fp16", "int8")


def convert(model, variant: str, representative: np.ndarray | None = None) -> bytes:
    """The TFLite flatbuffer of `model` for one variant (representative: model inputs, int8 only)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    converter = _converter(model)
    if variant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 conversion needs a representative sample of model inputs")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def _converter(model) -> tf.lite.TFLiteConverter:
    """A converter whose signature names the outputs after the model's output layers
    ("logits", "heatmap"), with a batch of one image as the device feeds it."""
    spec = tf.TensorSpec((1, *model.input.shape[1:]), tf.float32, name="image")
    names = [name.split("/")[0] for name in model.output_names]

    @tf.function(input_signature=[spec])
    def serve(image):
        outputs = model(image, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(names, outputs))

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)


def with_card(model_bytes: bytes, card: ModelCard, variant: str) -> bytes:
    """The model with the card (marked with its variant) embedded as TFLite metadata."""
    card = dataclasses.replace(card, variant=variant)
    return write_metadata(model_bytes, CARD_METADATA_NAME, card.to_json().encode())


def with_heatmap(model):
    """The model with a second output, `heatmap`: a class-activation map computed in the graph.

    The classifier ends in global average pooling and one dense layer, so each logit is the
    spatial mean of a 1x1 convolution of the last feature map with that class's dense weights
    (Zhou et al., 2016). The map shown is the probability-weighted sum of the class maps, kept
    positive: where the evidence for the model's answer lies. Only
    elementwise, reduction and convolution ops, so it runs on the GPU delegate too; the device
    scales it to [0, 1] (a division in the graph breaks int8 models on an all-black image).
    """
    import tf_keras as keras

    from train.models import FEATURES_LAYER, LOGITS_LAYER

    dense = model.get_layer(LOGITS_LAYER)
    kernel, bias = dense.get_weights()
    features = model.get_layer(FEATURES_LAYER).output
    cam_conv = keras.layers.Conv2D(kernel.shape[1], 1, use_bias=False, dtype="float32", name="class_maps")
    class_maps = cam_conv(tf.cast(features, tf.float32))
    cam_conv.set_weights([kernel[None, None]])
    logits = model.output

    def weighted_map(inputs):
        maps, scores = inputs
        probs = tf.nn.softmax(scores)
        return tf.nn.relu(tf.reduce_sum(maps * probs[:, None, None, :], axis=-1))

    heatmap = keras.layers.Lambda(weighted_map, name="heatmap")([class_maps, logits])
    return keras.Model(model.input, [logits, heatmap], name=model.name)


def with_ood_score(model, detector):
    """The device model with one more output, `ood_score`: train.ood's distance of the pooled
    features from the training set, as a dense projection and a few elementwise ops in the graph.

    One dense layer projects the centred features on the principal directions, whitened and
    plain ([U / sqrt(var), U]); the score is the whitened squared norm plus the squared residual
    (|f - mean|^2 - |U^T (f - mean)|^2) over the residual variance, exactly as `train.ood.score`.
    """
    import tf_keras as keras

    k = detector.components.shape[1]
    kernel = np.concatenate([detector.components / np.sqrt(detector.variances), detector.components], axis=1)
    pooled = tf.cast(model.get_layer("pool").output, tf.float32)
    projection = keras.layers.Dense(2 * k, dtype="float32", name="ood_projection")
    projected = projection(pooled)
    projection.set_weights([kernel.astype(np.float32), (-detector.mean @ kernel).astype(np.float32)])
    mean = detector.mean.astype(np.float32)

    def distance(inputs):  # x * x, not tf.square: TFLite's SQUARE has no int8 kernel, MUL has
        z, features = inputs
        whitened, plain, centred = z[:, :k], z[:, k:], features - mean
        inside = tf.reduce_sum(whitened * whitened, axis=-1)
        outside = tf.nn.relu(tf.reduce_sum(centred * centred, axis=-1) - tf.reduce_sum(plain * plain, axis=-1))
        return inside + outside * (1.0 / detector.residual_variance)

    score = keras.layers.Lambda(distance, name="ood_score")([projected, pooled])
    return keras.Model(model.input, [*model.outputs, score], name=model.name)
