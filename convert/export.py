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
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
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


def with_card(model_bytes: bytes, card: ModelCard, variant: str) -> bytes:
    """The model with the card (marked with its variant) embedded as TFLite metadata."""
    card = dataclasses.replace(card, variant=variant)
    return write_metadata(model_bytes, CARD_METADATA_NAME, card.to_json().encode())
