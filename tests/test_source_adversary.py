"""The class-conditional source adversary (train.source_adversary): a reversed gradient, a judge whose
two readings train the judge and the backbone apart, a loss that asks the source within the image's
class, a training graph sharing the model's weights, and a run that trains with it and saves the model
without it."""
import csv
import json
import shutil

import numpy as np
import pytest

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from train import models, source_adversary
from train.pipeline import joint_labels
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
    present = np.array([[True, False], [True, True], [True, True]])
    labels = joint_labels(np.array([2, 0]), np.array([1, 0]), 2)
    assert labels.tolist() == [5, 0]
    logits = np.array([[0.1, 0.2, 1.5], [2.0, -1.0, 0.0]], np.float32)
    judged = np.array([[9.0, 9.0, 9.0, 9.0, 0.5, -0.5],     # class 2's block is (0.5, -0.5)
                       [1.0, 3.0, -9.0, 9.0, -9.0, 9.0]], np.float32)  # class 0's block is (1, 3)
    held = judged[:, ::-1].copy()                              # class 2's (-9, 9), class 0's (-0.5, 0.5)

    def ce(z, target):
        return -(np.asarray(target) * np.log(np.exp(z) / np.exp(z).sum())).sum()
    class_and_judge = np.array([ce(logits[0], [0, 0, 1]) + ce(judged[0, 4:], [0, 1]),
                                ce(logits[1], [1, 0, 0]) + ce(judged[1, :2], [1, 0])])
    reversal = source_adversary.SourceAdversary(3, present, 0.5, "reversal")
    total = reversal.loss(crossentropy)(labels, np.concatenate([logits, judged], axis=1))
    np.testing.assert_allclose(total.numpy(), class_and_judge, rtol=1e-5)
    # confusion: plus 0.5 x the held judge against an even split of the class's sources (class 0 has one)
    confusion = source_adversary.SourceAdversary(3, present, 0.5, "confusion")
    outputs = np.concatenate([logits, judged, held], axis=1)
    even = class_and_judge + 0.5 * np.array([ce(held[0, 4:], [0.5, 0.5]), ce(held[1, :2], [1, 0])])
    np.testing.assert_allclose(confusion.loss(crossentropy)(labels, outputs).numpy(), even, rtol=1e-5)
    accuracy, source_accuracy = confusion.metrics()
    assert accuracy(labels, outputs).numpy().tolist() == [1.0, 1.0]
    assert source_accuracy(labels, outputs).numpy().tolist() == [0.0, 0.0]


def test_which_sources_a_class_has_is_counted_from_the_training_labels():
    adversary = source_adversary.SourceAdversary.of([0, 0, 1, 2], [0, 1, 1, 1], 3, 2, 1.0, "confusion")
    assert adversary.present.tolist() == [[True, True], [False, True], [False, True]]
    assert adversary.sources == 2
    with pytest.raises(ValueError, match="at least two data sources"):
        source_adversary.SourceAdversary.of([0, 1], [0, 0], 3, 1, 1.0, "confusion")
    with pytest.raises(ValueError, match="mode"):
        source_adversary.SourceAdversary.of([0, 1], [0, 1], 3, 2, 1.0, "both")


@pytest.mark.parametrize("mode", ["reversal", "confusion"])
def test_the_training_graph_shares_the_models_weights_and_its_first_outputs_are_the_logits(mode):
    model = models.build("mobilenet_v2", 3, image_size=64, weights="none")
    adversary = source_adversary.SourceAdversary(3, np.ones((3, 4), bool), 0.5, mode)
    fitted = adversary.graph(model)
    own = {id(w) for w in model.weights}
    assert own <= {id(w) for w in fitted.weights}
    assert len(fitted.weights) == len(model.weights) + 4       # the judge's two kernels and biases
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    out = fitted(x, training=False).numpy()
    assert out.shape == (2, 3 + 3 * 4 * (1 + (mode == "confusion")))
    np.testing.assert_array_equal(out[:, :3], model(x, training=False).numpy())
    if mode == "confusion":   # the judge and the held judge answer alike forwards
        np.testing.assert_allclose(out[:, 3:15], out[:, 15:], rtol=1e-5, atol=1e-6)


def test_the_confusion_judge_learns_only_from_its_own_loss_and_the_backbone_only_from_the_held_judge():
    judge = source_adversary.Judge(2)
    features = tf.Variable(np.random.default_rng(1).random((4, 8), dtype=np.float32))
    judge(features)
    for block, learns_judge, learns_features in ((slice(0, 2), True, False), (slice(2, 4), False, True)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(judge(features)[:, block] ** 2)
        moves = [g is not None and bool(np.any(g.numpy() != 0))
                 for g in tape.gradient(loss, [features, *judge.trainable_weights])]
        assert moves == [learns_features] + [learns_judge] * 4


def test_a_config_refuses_a_negative_weight_and_the_settings_it_cannot_go_with():
    for bad in (dict(source_adversary=-0.1), dict(source_adversary=0.3, mixup=0.2),
                dict(source_adversary=0.3, mixstyle=0.5), dict(source_adversary=0.3, source_adversary_mode="both")):
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
    assert ("source adversary (confusion, weight 0.5) within each class over ['hospital-0', 'hospital-1']"
            in result.stdout)
    assert "source_accuracy" in result.stdout and "Epoch 2/2" in result.stdout
    assert json.loads((out / "config.json").read_text())["source_adversary"] == 0.5
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not any("source" in layer.name for layer in saved.layers)
    assert saved.output.shape[-1] == 3


def test_a_run_saved_before_the_confusion_mode_was_trained_by_reversal():
    assert TrainConfig.from_dict({"source_adversary": 1.0}, saved_run=True).source_adversary_mode == "reversal"
    assert TrainConfig.from_dict({"source_adversary": 1.0}).source_adversary_mode == "confusion"
    assert TrainConfig.from_dict({}, saved_run=True).source_adversary_mode == "confusion"


def test_compare_names_the_adversary_with_the_mode_it_trained_by():
    from train.compare import measures

    assert measures({"source_adversary": 1.0}) == "source adversary 1.0 by reversal"
    confusion = {"source_adversary": 0.5, "source_adversary_mode": "confusion"}
    assert measures(confusion) == "source adversary 0.5 by confusion"
    assert measures({"source_adversary": 0.0, "source_adversary_mode": "confusion"}) == "none"
