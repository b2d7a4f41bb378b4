"""Models, strategies and training mechanics at tiny sizes (real models belong in benchmarks)."""
import subprocess
import sys

import numpy as np
import pytest

import train  # noqa: F401
import tf_keras as keras

from train import models
from train.trainer import class_weights, set_trainable


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_registered_model_builds_and_takes_a_training_step(name):
    model = models.build(name, 3, image_size=64, weights="none")
    spec = models.input_spec(name, 64)
    assert model.input_shape == (None, 64, 64, spec.channels)
    assert model.output_shape == (None, 3)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((4, 64, 64, spec.channels), dtype=np.float32)
    before = [w.numpy().copy() for w in model.trainable_weights[-2:]]
    loss = model.train_on_batch(x, np.array([0, 1, 2, 0]))
    assert np.isfinite(loss)
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights[-2:]))


def test_imagenet_weights_load_from_a_local_folder(shared_weights):
    model = models.build("mobilenet_v2", 3, image_size=96, alpha=0.35, weights="imagenet",
                         weights_dirs=[shared_weights])
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35,
                                               input_shape=(96, 96, 3))
    reference.load_weights(str(shared_weights / models.get("mobilenet_v2").weights_file(0.35)))
    np.testing.assert_array_equal(model.get_layer("Conv1").get_weights()[0],
                                  reference.get_layer("Conv1").get_weights()[0])


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights none"):
        models.build("mobilenet_v2", 3, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="--weights none"):
        models.build("cnn", 3, weights="imagenet")


def _trainable(model):
    return {l.name for l in model.layers if l.trainable and l.weights}


def test_strategies_freeze_exactly_the_layers_they_claim():
    model = models.build("mobilenet_v2", 3, image_size=64, alpha=0.35, weights="none")
    backbone = models.backbone_layers(model)
    head = {"logits"}
    set_trainable(model, "frozen", 1, 20)
    assert _trainable(model) == head
    set_trainable(model, "finetune", 1, 20)
    assert _trainable(model) == head
    set_trainable(model, "finetune", 2, 20)
    top = {l.name for l in backbone[-20:] if l.weights and not isinstance(l, keras.layers.BatchNormalization)}
    assert top and _trainable(model) == head | top
    assert not any(isinstance(model.get_layer(n), keras.layers.BatchNormalization) for n in _trainable(model))
    set_trainable(model, "full", 1, 20)
    assert _trainable(model) == {l.name for l in model.layers if l.weights}


def test_class_weights_balance_the_classes():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(y, 3)
    assert w == pytest.approx({0: 100 / 180, 1: 100 / 90, 2: 100 / 30})
    assert sum(w[c] * (y == c).sum() for c in w) == pytest.approx(len(y))


def test_mirrored_strategy_step_on_two_logical_cpus():
    code = """
import numpy as np
import train
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras as keras
from train import models
from train.trainer import distribution_strategy
strategy = distribution_strategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
with strategy.scope():
    model = models.build("cnn", 3, image_size=64, weights="none")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).random((8, 64, 64, 1), dtype=np.float32)
before = model.get_layer("logits").get_weights()[0].copy()
history = model.fit(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]), batch_size=8, epochs=1, verbose=0)
assert np.isfinite(history.history["loss"][0])
assert not np.allclose(before, model.get_layer("logits").get_weights()[0])
print("replicas", strategy.num_replicas_in_sync)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas 2" in done.stdout
