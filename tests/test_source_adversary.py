"""The class-conditional source adversary (train.source_adversary): a reversed gradient, a loss that
asks the source within the image's class, a training graph sharing the model's weights, and a run
that trains with it and saves the model without it."""
import csv
import json
import shutil

import numpy as np
import pytest

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from train import models, source_adversary
from train.trainer import crossentropy
from train.config import TrainConfig


def test_gradient_reversal_is_the_identity_forwards_and_turns_the_gradient_backwards():
    x = tf.constant([[1.0, -2.0, 3.0]])
    layer = source_adversary.GradientReversal(0.3)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-0.3, -0.6, -0.9]], rtol=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        source_adversary.GradientReversal(0.0)


def test_the_loss_is_the_class_loss_plus_the_source_within_the_images_class_by_hand():
    classes, sources = 3, 2
    labels = source_adversary.joint_labels(np.array([2, 0]), np.array([1, 0]), sources)
    assert labels.tolist() == [5, 0]
    logits = np.array([[0.1, 0.2, 1.5], [2.0, -1.0, 0.0]], np.float32)
    adversary = np.array([[9.0, 9.0, 9.0, 9.0, 0.5, -0.5],     # class 2's block is (0.5, -0.5)
                          [1.0, 3.0, -9.0, 9.0, -9.0, 9.0]], np.float32)  # class 0's block is (1, 3)
    outputs = np.concatenate([logits, adversary], axis=1)

    def ce(z, k):
        return -np.log(np.exp(z[k]) / np.exp(z).sum())
    expected = [ce(logits[0], 2) + ce(adversary[0, 4:], 1), ce(logits[1], 0) + ce(adversary[1, :2], 0)]
    total = source_adversary.loss(crossentropy, classes, sources)(labels, outputs)
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5)
    accuracy, source_accuracy = source_adversary.metrics(classes, sources)
    assert accuracy(labels, outputs).numpy().tolist() == [1.0, 1.0]
    assert source_accuracy(labels, outputs).numpy().tolist() == [0.0, 0.0]


def test_the_training_graph_shares_the_models_weights_and_its_first_outputs_are_the_logits():
    model = models.build("mobilenet_v2", 3, image_size=64, weights="none")
    fitted = source_adversary.with_source_adversary(model, 4, 0.5)
    own = {id(w) for w in model.weights}
    assert own <= {id(w) for w in fitted.weights}
    assert sorted(w.name for w in fitted.weights if id(w) not in own) == sorted(
        w.name for layer in ("source_adversary_hidden", "source_adversary_logits")
        for w in fitted.get_layer(layer).weights)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    out = fitted(x, training=False).numpy()
    assert out.shape == (2, 3 + 3 * 4)
    np.testing.assert_array_equal(out[:, :3], model(x, training=False).numpy())
    with pytest.raises(ValueError, match="at least two data sources"):
        source_adversary.with_source_adversary(model, 1, 0.5)


def test_a_config_refuses_a_negative_weight_and_the_settings_it_cannot_go_with():
    for bad in (dict(source_adversary=-0.1), dict(source_adversary=0.3, mixup=0.2),
                dict(source_adversary=0.3, mixstyle=0.5)):
        with pytest.raises(ValueError, match="source_adversary"):
            TrainConfig(**bad)


def test_a_run_with_the_adversary_trains_against_two_sources_and_saves_its_model_without_it(tmp_path, tiny_dataset):
    from conftest import train_tiny_cnn

    data = tmp_path / "two_sources"     # the tiny set with a manifest that names two sources
    shutil.copytree(tiny_dataset, data)
    files = sorted(p.relative_to(data) for p in data.glob("*/*/*"))
    with open(data / "manifest.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["split", "class", "file", "source_repo"])
        rows.writerows([p.parts[0], p.parts[1], str(p), f"hospital-{i % 2}"] for i, p in enumerate(files))
    out = tmp_path / "run"
    result = train_tiny_cnn(data, out, "source_adversary = 0.5")
    assert "source adversary (weight 0.5) within each class over ['hospital-0', 'hospital-1']" in result.stdout
    assert "source_accuracy" in result.stdout and "Epoch 2/2" in result.stdout
    assert json.loads((out / "config.json").read_text())["source_adversary"] == 0.5
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not any("source" in layer.name for layer in saved.layers)
    assert saved.output.shape[-1] == 3
