"""The tf.data input pipeline, built on the device's own preprocessing.

Images are decoded and fitted to the model's square once, with `edge_app.preprocess.load`,
and kept in memory (the datasets this project trains on fit easily). Augmentation then works
on the [0, 1] grey images, and `edge_app.preprocess.normalise` turns each batch into exactly
the tensor the device will feed the model: training never re-implements preprocessing.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge_app import preprocess
from train.config import TrainConfig
from train.data.records import Record


def load_images(records: list[Record], spec: preprocess.InputSpec, *, desc: str = "images",
                progress: bool = True) -> np.ndarray:
    """(N, size, size) float32 grey images in [0, 1], decoded exactly as the device decodes."""
    images = np.empty((len(records), spec.size, spec.size), dtype=np.float32)
    for i, record in enumerate(tqdm(records, desc=f"loading {desc}", unit="img", disable=not progress)):
        images[i] = preprocess.load(record.path, spec)
    return images


def augmentation(config: TrainConfig, seed: int) -> keras.Sequential:
    """Radiograph-safe augmentation: small rotations, zoom, shifts, brightness and contrast.

    No vertical flip ever; horizontal flip only when asked (the heart is on the left).
    """
    layers = keras.layers
    steps = [
        layers.RandomRotation(config.rotation_degrees / 360.0, fill_mode="constant", seed=seed),
        layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 1),
        layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 2),
        layers.RandomBrightness(config.brightness, value_range=(0.0, 1.0), seed=seed + 3),
        layers.RandomContrast(config.contrast, seed=seed + 4),
    ]
    if config.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(steps, name="augmentation")


def make_dataset(images: np.ndarray, labels: np.ndarray, spec: preprocess.InputSpec, *,
                 batch_size: int, training: bool, config: TrainConfig | None = None,
                 seed: int = 0) -> tf.data.Dataset:
    """Batches of (model input, class index). Training batches are shuffled and augmented."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and config is not None and config.augment:
        augment = augmentation(config, seed)
        ds = ds.map(lambda x, y: (tf.clip_by_value(augment(x[..., None], training=True)[..., 0], 0.0, 1.0), y),
                    num_parallel_calls=tf.data.AUTOTUNE)

    def to_model_input(x, y):
        x = tf.numpy_function(lambda a: preprocess.normalise(a, spec), [x], tf.float32, stateful=False)
        x.set_shape((None, spec.size, spec.size, spec.channels))
        return x, y

    return ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
