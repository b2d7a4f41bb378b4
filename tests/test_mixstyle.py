"""MixStyle (train.mixstyle): style statistics blended in training, the identity at inference, the
run's model saved without it."""
import json

import numpy as np
import pytest

import train  # noqa: F401
import tf_keras as keras

from train import mixstyle, models
from train.config import TrainConfig


def _stats(x):
    return x.mean(axis=(1, 2)), np.sqrt(x.var(axis=(1, 2)) + mixstyle.EPSILON)


def test_each_image_takes_a_blend_of_its_own_and_another_images_statistics_and_keeps_its_content():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 9, 9, 6)) * rng.uniform(0.5, 3, (4, 1, 1, 6))
         + rng.uniform(-5, 5, (4, 1, 1, 6))).astype(np.float32)
    out = mixstyle.MixStyle(p=1.0, seed=3)(x, training=True).numpy()
    mu, sigma = _stats(x)
    mu_out, sigma_out = _stats(out)
    blended = 0
    for i in range(4):
        # some image j and one l in [0, 1] give every channel's mean and spread: l * own + (1 - l) * j's
        fits = []
        for j in range(4):
            if j == i:
                continue
            lam = np.median((mu_out[i] - mu[j]) / (mu[i] - mu[j]))
            if (-1e-4 <= lam <= 1 + 1e-4 and np.allclose(mu_out[i], lam * mu[i] + (1 - lam) * mu[j], atol=1e-3)
                    and np.allclose(sigma_out[i], lam * sigma[i] + (1 - lam) * sigma[j], atol=1e-3)):
                fits.append(lam)
        own = np.allclose(mu_out[i], mu[i], atol=1e-3) and np.allclose(sigma_out[i], sigma[i], atol=1e-3)
        assert fits or own, f"image {i}: its statistics are no blend of its own and another image's"
        blended += any(lam < 0.999 for lam in fits)
        content = (out[i] - mu_out[i]) / sigma_out[i]
        np.testing.assert_allclose(content, (x[i] - mu[i]) / sigma[i], atol=2e-3)
    assert blended >= 1


def test_inference_is_the_identity():
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(mixstyle.MixStyle(p=1.0)(x, training=False).numpy(), x)
    with pytest.raises(ValueError, match="p"):
        mixstyle.MixStyle(p=0.0)


def test_the_training_graph_shares_every_weight_and_answers_alike_at_inference():
    model = models.build("mobilenet_v2", 3, image_size=64, weights="none")
    fitted = mixstyle.with_mixstyle(model, models.get("mobilenet_v2").style_layers, 0.5, seed=0)
    assert [w.name for w in fitted.weights] == [w.name for w in model.weights]
    assert all(a is b for a, b in zip(fitted.trainable_weights, model.trainable_weights))
    assert sum(isinstance(layer, mixstyle.MixStyle) for layer in fitted.layers) == 3
    x = np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_array_equal(fitted(x, training=False).numpy(), model(x, training=False).numpy())


def test_a_model_without_style_layers_is_refused():
    model = models.build("cnn", 3, image_size=64, weights="none")
    with pytest.raises(ValueError, match="style_layers"):
        mixstyle.with_mixstyle(model, (), 0.5, seed=0)
    with pytest.raises(ValueError, match="block_2_add"):
        mixstyle.with_mixstyle(model, ("block_2_add",), 0.5, seed=0)
    with pytest.raises(ValueError, match="mixstyle"):
        TrainConfig(mixstyle=1.5)


def test_a_run_with_mixstyle_trains_and_saves_its_model_without_it(tmp_path, tiny_dataset):
    from conftest import train_tiny_cnn

    out = tmp_path / "run"
    result = train_tiny_cnn(tiny_dataset, out, "mixstyle = 1.0")
    assert "Epoch 2/2" in result.stdout
    assert json.loads((out / "config.json").read_text())["mixstyle"] == 1.0
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not any("mixstyle" in layer.name for layer in saved.layers)
    assert {"pool1", "pool2"} <= {layer.name for layer in saved.layers}
