"""Consistency training (train.consistency): the divergence against numpy, one step against the same step by
hand, two independent augmentations per image from the pipeline, the config's refusals, and a run trained
with it, saved without the wrapper and logging the divergence."""
import csv
import json

import numpy as np
import pytest

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from train.config import TrainConfig
from train.consistency import ConsistencyTraining, jensen_shannon
from train.trainer import crossentropy


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_divergence_is_jensen_shannon_of_the_two_softmaxes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    p, q = _softmax(a), _softmax(b)
    m = (p + q) / 2
    expected = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
    np.testing.assert_allclose(jensen_shannon(a, b).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(jensen_shannon(a, a).numpy(), 0.0, atol=1e-6)
    assert (jensen_shannon(a, b).numpy() <= np.log(2) + 1e-6).all()


def test_a_step_descends_the_loss_on_both_views_plus_the_weighted_divergence_by_hand():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, activation="tanh")(inputs)))
    rng = np.random.default_rng(1)
    views = rng.normal(size=(8, 3)).astype(np.float32)        # images 0-3, then the same four seen again
    y, w = np.array([0, 1, 2, 1]), np.array([1.0, 2.0, 0.5, 1.0], np.float32)
    weight, lr = 3.0, 0.1
    start = [v.numpy() for v in model.trainable_weights]
    with tf.GradientTape() as tape:
        logits = model(views)
        per_image = crossentropy(np.concatenate([y, y]), logits) * np.concatenate([w, w])
        objective = tf.reduce_mean(per_image) + weight * tf.reduce_mean(jensen_shannon(logits[:4], logits[4:]))
    expected = [v0 - lr * g.numpy() for v0, g in zip(start, tape.gradient(objective, model.trainable_weights))]

    wrapped = ConsistencyTraining(model, weight)
    wrapped.compile(optimizer=keras.optimizers.SGD(lr), loss=crossentropy, metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensors((views, y, w))
    logs = wrapped.fit(ds, epochs=1, verbose=0).history
    for v, e in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"loss", "accuracy", "consistency"}
    np.testing.assert_allclose(logs["loss"][0], per_image.numpy().mean(), rtol=1e-5)   # the recipe's own loss
    np.testing.assert_allclose(logs["consistency"][0], jensen_shannon(logits[:4], logits[4:]).numpy().mean(),
                               rtol=1e-5)
    assert all(a is b for a, b in zip(wrapped.trainable_weights, model.trainable_weights))


def test_the_logged_divergence_is_the_epochs_mean_over_its_batches():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 1])) for _ in range(2)]
    wrapped = ConsistencyTraining(model, 1.0)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss=crossentropy)        # weights stay where they are
    divergences = [float(tf.reduce_mean(jensen_shannon(model(x)[:2], model(x)[2:]))) for x, _ in batches]
    logs = wrapped.fit(tf.data.Dataset.from_tensor_slices(tuple(map(np.stack, zip(*batches)))), epochs=2,
                       verbose=0).history
    np.testing.assert_allclose(logs["consistency"], [np.mean(divergences)] * 2, rtol=1e-5)


def test_the_pipeline_gives_two_different_augmentations_of_each_image_and_one_without_views():
    from edge_app import preprocess
    from train.pipeline import make_dataset

    spec = preprocess.InputSpec(size=32, channels=3, contrast="none")
    rows, cols = np.mgrid[:32, :32]
    images = np.stack([np.where((rows - r) ** 2 + (cols - c) ** 2 < 30, 230, 40).astype(np.uint8)   # a disk each,
                       for r in (9, 23) for c in (7, 16, 25)])                                       # elsewhere
    config = TrainConfig(consistency=1.0)
    x, y = next(iter(make_dataset(images, np.arange(6), spec, batch_size=6, training=True, config=config, seed=3,
                                  views=2)))
    assert x.shape == (12, 32, 32, 3) and y.shape == (6,)
    # both halves hold the same images in the same order: each view is closer to its twin than to any other image,
    # and differs from it (independent draws)
    distance = tf.reduce_mean(tf.abs(x[:6, None] - x[None, 6:]), axis=[2, 3, 4]).numpy()
    assert (distance.argmin(axis=1) == np.arange(6)).all() and np.diag(distance).min() > 0.0
    single, _ = next(iter(make_dataset(images, np.arange(6), spec, batch_size=6, training=True, config=config,
                                       seed=3)))
    assert single.shape == (6, 32, 32, 3)


def test_a_config_refuses_consistency_without_augmentation_or_with_a_training_step_or_labels_of_its_own():
    for bad in (dict(consistency=-1.0), dict(consistency=1.0, augment=False), dict(consistency=1.0, mixup=0.2),
                dict(consistency=1.0, source_adversary=0.1), dict(consistency=1.0, sharpness_aware=0.05),
                dict(consistency=1.0, group_dro=0.01)):
        with pytest.raises(ValueError, match="consistency"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="consistency weight"):
        ConsistencyTraining(keras.Sequential([keras.layers.Dense(2)]), 0.0)


def test_a_run_trained_with_consistency_is_saved_without_the_wrapper_and_logs_the_divergence(tmp_path, tiny_dataset):
    from conftest import train_tiny_cnn
    from train.compare import measures

    out = tmp_path / "run"
    result = train_tiny_cnn(tiny_dataset, out, "consistency = 2.0")
    assert "consistency between two augmentations of each image (JS weight 2)" in result.stdout
    assert "Epoch 2/2" in result.stdout
    assert measures(json.loads((out / "config.json").read_text())).endswith("consistency 2.0")
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not saved.name.endswith("-consistency") and saved.output.shape[-1] == 3
    rows = list(csv.DictReader((out / "training_phase1.csv").open()))
    assert len(rows) == 2 and all(0.0 <= float(row["consistency"]) <= np.log(2) for row in rows)
