"""Group DRO (train.group_dro): its step by hand, the group weights' update, the image weights within a group,
the config's refusals, and a run trained with it, saved without the wrapper and logging its group weights."""
import csv
import json

import numpy as np
import pytest

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from train.config import TrainConfig
from train.group_dro import GroupDRO
from train.pipeline import joint_labels
from train.trainer import crossentropy

GROUPS = ["adult normal", "adult pneumonia", "child normal"]


def _tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(4, activation="tanh")(inputs)))


def _batch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 3)).astype(np.float32)
    y, group = np.array([0, 1, 0, 1, 0, 1, 0, 0, 1]), np.array([0, 1, 2, 1, 0, 1, 2, 0, 1])
    return x, y, group


def test_a_step_descends_the_group_losses_weighted_by_the_updated_group_weights_by_hand():
    x, y, group = _batch()
    model, step_size, lr = _tiny_model(), 0.5, 0.1
    start = [w.numpy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        per_image = crossentropy(y, model(x))
        losses = tf.stack([tf.reduce_mean(tf.boolean_mask(per_image, group == g)) for g in range(3)])
        q = np.full(3, 1 / 3) * np.exp(step_size * losses.numpy())
        q /= q.sum()
        objective = tf.reduce_sum(q * losses)
    expected = [w0 - lr * g.numpy() for w0, g in zip(start, tape.gradient(objective, model.trainable_weights))]

    dro = GroupDRO(model, crossentropy, GROUPS, step_size)
    dro.compile(optimizer=keras.optimizers.SGD(lr), loss=crossentropy, metrics=["accuracy"])
    logs = dro.fit(x, joint_labels(y, group, 3), batch_size=9, epochs=1, shuffle=False, verbose=0).history
    for w, e in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dro.group_weights.numpy(), q, rtol=1e-5)
    assert set(logs) == {"loss", "accuracy", "q_adult_normal", "q_adult_pneumonia", "q_child_normal"}
    np.testing.assert_allclose(logs["loss"][0], per_image.numpy().mean(), rtol=1e-5)   # the recipe's own loss
    assert all(a is b for a, b in zip(dro.trainable_weights, model.trainable_weights))


def test_the_worst_fitted_group_gains_weight_and_a_group_absent_from_the_batch_only_shares_the_normalisation():
    x, y, group = _batch()
    dro = GroupDRO(_tiny_model(), crossentropy, GROUPS + ["adult covid"], 1.0)
    losses, present = dro.group_losses(y, group, dro(x), None)
    assert present.numpy().tolist() == [True, True, True, False]
    dro.compile(optimizer=keras.optimizers.SGD(0.0), loss=crossentropy)
    dro.fit(x, joint_labels(y, group, 4), batch_size=9, epochs=1, verbose=0)
    q = dro.group_weights.numpy()
    expected = np.exp(np.where(present, losses.numpy(), 0.0))
    np.testing.assert_allclose(q, expected / expected.sum(), rtol=1e-5)
    assert q.argmax() == losses.numpy()[:3].argmax()


def test_image_weights_that_are_constant_within_a_group_cancel_and_others_weigh_within_it():
    x, y, group = _batch()
    dro = GroupDRO(_tiny_model(), crossentropy, GROUPS, 0.1)
    logits = dro(x)
    plain, _ = dro.group_losses(y, group, logits, None)
    by_group, _ = dro.group_losses(y, group, logits, np.array([2.0, 0.5, 3.0], np.float32)[group])
    np.testing.assert_allclose(by_group.numpy(), plain.numpy(), rtol=1e-6)
    uneven = np.ones(9, np.float32)
    uneven[0] = 3.0                                # image 0 counts three times in group 0's mean
    weighted, _ = dro.group_losses(y, group, logits, uneven)
    per_image = crossentropy(y, logits).numpy()
    members = np.flatnonzero(group == 0)
    np.testing.assert_allclose(weighted.numpy()[0], np.average(per_image[members], weights=uneven[members]), rtol=1e-6)


def test_a_config_refuses_group_dro_out_of_range_or_with_a_training_step_or_labels_of_its_own():
    for bad in (dict(group_dro=-0.01), dict(group_dro=0.01, mixup=0.2), dict(group_dro=0.01, source_adversary=0.1),
                dict(group_dro=0.01, sharpness_aware=0.05)):
        with pytest.raises(ValueError, match="group_dro"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="step size"):
        GroupDRO(_tiny_model(), crossentropy, GROUPS, 0.0)


def test_a_run_trained_by_group_dro_is_saved_without_the_wrapper_and_logs_its_group_weights(tmp_path, tiny_dataset):
    from conftest import train_tiny_cnn
    from train.compare import measures

    out = tmp_path / "run"
    result = train_tiny_cnn(tiny_dataset, out, "group_dro = 0.01")
    assert "group DRO (step size 0.01) over" in result.stdout and "Epoch 2/2" in result.stdout
    assert measures(json.loads((out / "config.json").read_text())).endswith("group_dro 0.01")
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not saved.name.endswith("-group-dro") and saved.output.shape[-1] == 3
    rows = list(csv.DictReader((out / "training_phase1.csv").open()))
    weights = [[float(v) for k, v in row.items() if k.startswith("q_")] for row in rows]
    assert len(rows) == 2 and len(weights[0]) >= 2
    np.testing.assert_allclose([sum(w) for w in weights], 1.0, rtol=1e-5)
