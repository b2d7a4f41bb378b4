"""The tf.data input pipeline, built on the device's own preprocessing.

Images are decoded and fitted to the model's square once, with `edge_app.preprocess.load8`,
and kept in memory as uint8 (the datasets this project trains on fit easily): the square
BEFORE the contrast step. Augmentation (training only) works on those as [0, 1] grey images,
so that a change of exposure, noise, blur, resolution or JPEG reaches the model the way the
device's contrast step (CLAHE) passes it on; then `model_inputs` (the device's own
`edge_app.preprocess.contrast_step` per image, then `normalise`) turns each batch into exactly
the tensor the device would feed the model: training never re-implements preprocessing.
Anything that feeds cached images to a model without `make_dataset` goes through `model_inputs`.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from tqdm import tqdm

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge_app import preprocess
from edge_app.errors import InputError
from train.config import TrainConfig
from train.data import sources
from train.data.records import Record, projection


def load_images(records: list[Record], spec: preprocess.InputSpec, *, desc: str = "images",
                progress: bool = True) -> np.ndarray:
    """(N, size, size) uint8 grey squares before the contrast step, decoded exactly as the device
    decodes (`edge_app.preprocess.load8`); `model_inputs` or `make_dataset` make model inputs of them."""
    images = np.empty((len(records), spec.size, spec.size), dtype=np.uint8)
    for i, record in enumerate(tqdm(records, desc=f"loading {desc}", unit="img", disable=not progress)):
        images[i] = preprocess.load8(record.path, spec)
    return images


def contrasted(images: np.ndarray, spec: preprocess.InputSpec) -> np.ndarray:
    """(N, size, size) squares before the contrast step (uint8 from `load_images`, or float after
    augmentation: clipped to [0, 1], rounded to 8 bits) -> float32 [0, 1] after the device's
    contrast step (`edge_app.preprocess.contrast_step`), image by image."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(images, 0.0, 1.0)
    out = np.empty(images.shape, np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess.contrast_step(image, spec)
    return out


def model_inputs(images: np.ndarray, spec: preprocess.InputSpec) -> np.ndarray:
    """(N, size, size, channels) model inputs of cached squares: for unaugmented images, the tensor
    `edge_app.preprocess.preprocess` gives the device, bit for bit."""
    return preprocess.normalise(contrasted(images, spec), spec)


def lung_refusals(records: list[Record], spec: preprocess.InputSpec, *, progress: bool = True) -> list[dict]:
    """The records whose image the preprocessing's lung step refuses (no plausible lung field,
    edge_app.lungs), with the reason: the device would refuse them, so they are neither trained on
    nor scored. Empty when the spec does not crop to the lung field."""
    if spec.lung_crop == "none":
        return []
    refused = []
    for record in tqdm(records, desc="lung fields", unit="img", disable=not progress):
        try:
            preprocess.load8(record.path, spec)
        except InputError as e:
            refused.append({"file": str(record.path), "split": record.split, "label": record.label,
                            "source": record.source, "code": e.code, "message": e.message})
    return refused


def augmentation(config: TrainConfig, seed: int) -> keras.Sequential:
    """Radiograph-safe augmentation: small rotations, zoom, [a stretch of the width,] shifts, brightness
    and contrast.

    No vertical flip ever; horizontal flip only when asked (the heart is on the left).
    """
    layers = keras.layers
    steps = [
        layers.RandomRotation(config.rotation_degrees / 360.0, fill_mode="constant", seed=seed),
        layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 1),
        *([layers.RandomZoom(0.0, width_factor=config.stretch, fill_mode="constant", seed=seed + 6)]
          if config.stretch else []),
        layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 2),
        layers.RandomBrightness(config.brightness, value_range=(0.0, 1.0), seed=seed + 3),
        layers.RandomContrast(config.contrast, seed=seed + 4),
    ]
    if config.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(steps, name="augmentation")


def acquisition_augmentation(config: TrainConfig, seed: int):
    """Batch -> batch changes of how an image was taken, not of what it shows: random resized crops
    (framing, collimation), grey curves (gamma, S-shaped contrast), blur or sharpening, detector noise,
    resolution and JPEG re-compression, so that a model cannot tell hospitals apart by them. None when
    all are off.

    They act before the contrast step (`make_dataset`), as an acquisition does before the device's:
    a grey curve (gamma) is then partly undone by CLAHE (almost wholly by equalize), and noise is
    amplified by CLAHE in flat regions just as a detector's would be (noise std 0.02 on [0, 1]
    comes out larger; that is intended)."""
    if not (config.crop_scale < 1.0 or config.gamma or config.contrast_curve or config.blur or config.sharpen
            or config.noise or config.min_resolution < 1.0 or config.jpeg_quality):
        return None
    rng = tf.random.Generator.from_seed(seed)

    def augment(x):  # (batch, size, size, 1) in [0, 1]
        n, size = tf.shape(x)[0], tf.shape(x)[1]
        if config.crop_scale < 1.0:
            area = rng.uniform((n,), config.crop_scale, 1.0)
            aspect = tf.exp(rng.uniform((n,), np.log(3 / 4), np.log(4 / 3)))
            h, w = tf.minimum(tf.sqrt(area / aspect), 1.0), tf.minimum(tf.sqrt(area * aspect), 1.0)
            y0, x0 = rng.uniform((n,)) * (1.0 - h), rng.uniform((n,)) * (1.0 - w)
            boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
            x = tf.image.crop_and_resize(x, boxes, tf.range(n), tf.stack([size, size]))
        if config.gamma:
            log_g = rng.uniform((n, 1, 1, 1), -np.log1p(config.gamma), np.log1p(config.gamma))
            x = tf.pow(tf.maximum(x, 1e-6), tf.exp(log_g))
        if config.contrast_curve:
            a = tf.exp(rng.uniform((n, 1, 1, 1), -np.log1p(config.contrast_curve), np.log1p(config.contrast_curve)))
            low, high = tf.pow(tf.maximum(x, 1e-6), a), tf.pow(tf.maximum(1.0 - x, 1e-6), a)
            x = low / (low + high)
        if config.blur:
            x = _gaussian_blur(x, rng.uniform((), 0.0, config.blur), radius=int(np.ceil(3 * config.blur)))
        if config.sharpen:   # a detector's or an export's edge enhancement, the opposite of blur
            x = x + rng.uniform((n, 1, 1, 1), 0.0, config.sharpen) * (x - _gaussian_blur(x, 1.5, radius=5))
        if config.min_resolution < 1.0:
            scale = rng.uniform((), config.min_resolution, 1.0)
            small = tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32)
            x = tf.image.resize(tf.image.resize(x, (small, small), antialias=True), (size, size))
        if config.noise:
            x = x + rng.normal(tf.shape(x)) * rng.uniform((n, 1, 1, 1), 0.0, config.noise)
        x = tf.clip_by_value(x, 0.0, 1.0)
        if config.jpeg_quality:
            qualities = rng.uniform((n,), config.jpeg_quality, 96, dtype=tf.int32)
            x = tf.map_fn(lambda a: tf.image.adjust_jpeg_quality(a[0], a[1]), (x, qualities),
                          fn_output_signature=tf.float32)
        return x

    return augment


def random_erasing(probability: float, seed: int, area=(0.02, 0.33), aspect=(0.3, 3.3)):
    """Batch -> batch random erasing (Zhong et al., "Random erasing data augmentation", AAAI 2020): with
    `probability` per image, a rectangle of `area` (shares of the square) and `aspect` (height / width) at a
    random place is filled with uniform noise, so that the model cannot rest its answer on one region."""
    rng = tf.random.Generator.from_seed(seed)

    def erase(x):  # (batch, size, size, 1) in [0, 1]
        n, size = tf.shape(x)[0], tf.cast(tf.shape(x)[1], tf.float32)
        share = rng.uniform((n,), *area)
        ratio = tf.exp(rng.uniform((n,), np.log(aspect[0]), np.log(aspect[1])))
        h, w = tf.minimum(tf.sqrt(share * ratio), 1.0) * size, tf.minimum(tf.sqrt(share / ratio), 1.0) * size
        y0, x0 = rng.uniform((n,)) * (size - h), rng.uniform((n,)) * (size - w)
        at = tf.range(size)[None, :] + 0.5   # pixel centres
        rows = (at >= y0[:, None]) & (at < (y0 + h)[:, None])
        cols = (at >= x0[:, None]) & (at < (x0 + w)[:, None])
        chosen = rng.uniform((n,)) < probability
        inside = rows[:, :, None] & cols[:, None, :] & chosen[:, None, None]
        return tf.where(inside[..., None], rng.uniform(tf.shape(x)), x)

    return erase


def amplitude_mix(strength: float, seed: int):
    """Batch -> batch Fourier amplitude mix (Xu et al., "A Fourier-based Framework for Domain Generalization",
    CVPR 2021; Liu et al., FedDG, CVPR 2021, for medical images): each image keeps its phase spectrum (where
    its edges and structures are) and takes a share, uniform in [0, strength], of a batch partner's amplitude
    spectrum (how much of each spatial frequency it holds: sharpness, grain, noise, which differ by detector
    and export), so that an image's texture says less about its source. Partners: a random permutation of
    the batch; the result is clipped to [0, 1]."""
    rng = tf.random.Generator.from_seed(seed)

    def mix(x):  # (batch, size, size, 1) in [0, 1]
        n = tf.shape(x)[0]
        spectrum = tf.signal.fft2d(tf.cast(x[..., 0], tf.complex64))
        amplitude, phase = tf.abs(spectrum), tf.math.angle(spectrum)
        partner = tf.gather(amplitude, tf.argsort(rng.uniform((n,))))
        share = rng.uniform((n, 1, 1), 0.0, strength)
        mixed = (1.0 - share) * amplitude + share * partner
        out = tf.math.real(tf.signal.ifft2d(tf.complex(mixed * tf.cos(phase), mixed * tf.sin(phase))))
        return tf.clip_by_value(out, 0.0, 1.0)[..., None]

    return mix


def _gaussian_blur(x, sigma, radius: int):
    """Separable Gaussian blur of (batch, h, w, 1) with edge reflection; sigma ~ 0 leaves x as it is."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / tf.maximum(sigma, 1e-3)))
    kernel /= tf.reduce_sum(kernel)
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.conv2d(x, tf.reshape(kernel, (-1, 1, 1, 1)), strides=1, padding="VALID")
    return tf.nn.conv2d(x, tf.reshape(kernel, (1, -1, 1, 1)), strides=1, padding="VALID")


def image_weights(records: list[Record], labels, *, class_power: float, source_power: float,
                  view_balance: bool = False) -> np.ndarray:
    """Per-image weights, averaging 1. Classes weigh (1/frequency) ** class_power (1 balances them);
    within a class, each source weighs (1/its images) ** source_power with the class's total kept,
    so that 101 adult pneumonias are not drowned by 699 children's (1: every source of a class
    weighs the same). Both 1: every class has the same total weight, shared equally by its sources.
    `view_balance`: times `projection_factors`."""
    y = [labels.index(r.label) for r in records]
    keys = [(r.source or "unknown", c) for r, c in zip(records, y)]
    pair = {k: keys.count(k) for k in set(keys)}
    per_class = {c: y.count(c) for c in set(y)}
    raw = np.array([pair[k] ** -source_power for k in keys])
    raw_total = {c: sum(w for w, (_, kc) in zip(raw, keys) if kc == c) for c in per_class}
    weights = np.array([w * per_class[c] / raw_total[c] * per_class[c] ** -class_power
                        for w, (_, c) in zip(raw, keys)])
    if view_balance:
        weights *= projection_factors(records)
    return (weights * len(weights) / weights.sum()).astype(np.float32)


def projection_factors(records: list[Record]) -> np.ndarray:
    """Per image, n(class) n(projection) / (n n(class, projection)) counted within its population (the
    source's, `train.data.sources`; an unknown source is its own): weighted so, the projection tells
    nothing of the class there, and each class's and each projection's total is kept. 1 for an image
    of unknown projection (left out of the counts)."""
    cells = [(sources.population_of(r.source), r.label, projection(r.view)) for r in records]
    known = [cell for cell in cells if cell[2]]
    n = Counter(population for population, _, _ in known)
    by_class = Counter((population, label) for population, label, _ in known)
    by_view = Counter((population, view) for population, _, view in known)
    joint = Counter(known)
    return np.array([by_class[p, label] * by_view[p, view] / (n[p] * joint[p, label, view]) if view else 1.0
                     for p, label, view in cells])


def joint_labels(classes: np.ndarray, index: np.ndarray, count: int) -> np.ndarray:
    """class * count + index, one integer per image: the labels of a training graph that needs a second index per
    image (the source adversary's source, Group DRO's group), so that the tf.data pipeline, the image weights and
    the checkpoints stay as they are."""
    return (np.asarray(classes) * count + np.asarray(index)).astype(np.int32)


def make_dataset(images: np.ndarray, labels: np.ndarray, spec: preprocess.InputSpec, *,
                 batch_size: int, training: bool, config: TrainConfig | None = None,
                 seed: int = 0, sample_weights: np.ndarray | None = None, views: int = 1) -> tf.data.Dataset:
    """Batches of (model input, class index[, sample weight]) from `load_images`' squares (before the
    contrast step). Unaugmented batches go through the contrast step and normalise (`model_inputs`):
    the device's tensor. Training batches are shuffled and augmented, before the contrast step with
    `config.augment_before_contrast`, else after it (the recipe measured before that option). With
    `views` 2, an augmented batch of n labels holds 2n inputs: two independent augmentations of each image,
    the first n then the second n (train.consistency)."""
    columns = (images, labels.astype(np.int32)) + (() if sample_weights is None else (sample_weights,))
    ds = tf.data.Dataset.from_tensor_slices(columns)
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def numpy_step(step, channels=()):   # a numpy function of (batch, spec) as a tf.data map
        def apply(x, *rest):
            y = tf.numpy_function(lambda a: step(a, spec), [x], tf.float32, stateful=False)
            y.set_shape((None, spec.size, spec.size, *channels))
            return (y, *rest)
        return apply

    to_model_input = numpy_step(model_inputs, (spec.channels,))
    if training and config is not None and config.augment:
        geometry = augmentation(config, seed)
        later = [step for step in (acquisition_augmentation(config, seed + 10),
                                   amplitude_mix(config.amplitude_mix, seed + 30) if config.amplitude_mix else None,
                                   random_erasing(config.erase, seed + 20) if config.erase else None) if step]

        def view(x):
            x = tf.clip_by_value(geometry(x[..., None], training=True), 0.0, 1.0)
            for step in later:
                x = step(x)
            return x[..., 0]

        def augment(x, *rest):   # [0, 1] squares; `views` draws of each, stacked
            return (view(x) if views == 1 else tf.concat([view(x) for _ in range(views)], axis=0), *rest)

        if config.augment_before_contrast:
            ds = ds.map(lambda x, *rest: (tf.cast(x, tf.float32) / 255.0, *rest))
        else:   # the contrast step first, then augmentation, then normalise
            ds = ds.map(numpy_step(contrasted), num_parallel_calls=tf.data.AUTOTUNE)
            to_model_input = numpy_step(preprocess.normalise, (spec.channels,))
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def mix_batches(ds: tf.data.Dataset, alpha: float, num_classes: int, seed: int) -> tf.data.Dataset:
    """mixup (Zhang et al., 2018): each input of a batch of (input, class index[, weight]) blended
    with another of the same batch, x = l x_i + (1 - l) x_j with l ~ Beta(alpha, alpha) per image; the
    labels become the same blend of one-hot vectors (train.trainer.smoothed_crossentropy takes them),
    the weights the same blend of the two weights."""
    def mix(x, y, *weights):
        n = tf.shape(x)[0]
        a, b = tf.random.gamma([n], alpha, seed=seed), tf.random.gamma([n], alpha, seed=seed + 1)
        lam = a / (a + b)
        other = tf.random.shuffle(tf.range(n), seed=seed + 2)
        x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * tf.gather(x, other)
        one_hot = tf.one_hot(y, num_classes)
        y = lam[:, None] * one_hot + (1 - lam[:, None]) * tf.gather(one_hot, other)
        weights = tuple(tf.cast(lam, w.dtype) * w + tf.cast(1 - lam, w.dtype) * tf.gather(w, other) for w in weights)
        return (x, y, *weights)
    return ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
