"""Sharpness-aware minimisation (train.sharpness_aware), random erasing and the Fourier amplitude mix
(train.pipeline): SAM's step by hand, its perturbation undone, each augmentation's output against its
definition, a run trained with all three and saved without the wrapper."""
import json

import numpy as np
import pytest

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from train.config import TrainConfig
from train.pipeline import amplitude_mix, random_erasing
from train.sharpness_aware import SharpnessAware


def _tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def _batch():
    rng = np.random.default_rng(1)
    return rng.normal(size=(8, 3)).astype(np.float32), rng.integers(0, 2, 8).astype(np.int32)


def _loss(model, x, y):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))


def test_a_step_descends_the_gradient_taken_at_the_worst_weights_within_rho_by_hand():
    x, y = _batch()
    model, rho, lr = _tiny_model(), 0.5, 0.1
    start = [w.numpy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = _loss(model, x, y)
    g = tape.gradient(loss, model.trainable_weights)
    norm = np.sqrt(sum(float(tf.reduce_sum(gi ** 2)) for gi in g))
    for w, gi in zip(model.trainable_weights, g):
        w.assign_add(rho * gi / norm)
    with tf.GradientTape() as tape:
        loss = _loss(model, x, y)
    sharp = [s.numpy() for s in tape.gradient(loss, model.trainable_weights)]
    expected = [w0 - lr * s for w0, s in zip(start, sharp)]

    for w, w0 in zip(model.trainable_weights, start):
        w.assign(w0)
    sam = SharpnessAware(model, rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for w, e in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)


def test_the_perturbation_is_undone_and_the_wrapper_trains_the_models_own_weights():
    x, y = _batch()
    model = _tiny_model()
    start = [w.numpy() for w in model.weights]
    sam = SharpnessAware(model, 0.5)
    assert sam(x).shape == (8, 2)
    assert all(a is b for a, b in zip(sam.trainable_weights, model.trainable_weights))
    sam.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    logs = sam.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert set(logs) == {"loss", "accuracy"}
    for w, w0 in zip(model.weights, start):   # a step of length 0 leaves every weight where it was
        np.testing.assert_allclose(w.numpy(), w0, atol=1e-7)
    with pytest.raises(ValueError, match="rho"):
        SharpnessAware(model, 0.0)


def test_random_erasing_fills_one_rectangle_of_the_stated_area_with_noise_or_leaves_the_image():
    x = tf.fill((64, 40, 40, 1), 0.5)
    erased = random_erasing(1.0, seed=3)(x).numpy()[..., 0] != 0.5
    for mask in erased:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and mask.sum() == box   # one rectangle
        assert 0.01 <= box / mask.size <= 0.36
    kept = random_erasing(0.5, seed=4)(x).numpy()
    untouched = (kept == 0.5).all(axis=(1, 2, 3))
    assert 16 <= untouched.sum() <= 48          # about half the images left as they are
    assert ((kept >= 0) & (kept <= 1)).all()


def test_amplitude_mix_keeps_each_images_phase_and_blends_its_amplitude_with_one_partners():
    rng = np.random.default_rng(5)
    x = (0.5 + 0.1 * rng.standard_normal((6, 32, 32, 1))).clip(0.2, 0.8).astype(np.float32)   # never clipped
    mixed = amplitude_mix(1.0, seed=2)(tf.constant(x)).numpy()
    assert mixed.shape == x.shape and np.abs(mixed - x).mean() > 1e-3
    spectra, out = np.fft.fft2(x[..., 0]), np.fft.fft2(mixed[..., 0])
    amplitudes = np.abs(spectra)
    for i in range(len(x)):
        strong = np.abs(out[i]) > 1e-2 * np.abs(out[i]).max()
        np.testing.assert_allclose(np.angle(out[i] * np.conj(spectra[i]))[strong], 0, atol=2e-3)  # its own phase
        # |out| = (1 - s) |own| + s |partner| for one share s and one image of the batch
        fits = []
        for j in range(len(x)):
            d = amplitudes[j] - amplitudes[i]
            share = float((d * (np.abs(out[i]) - amplitudes[i])).sum() / max((d * d).sum(), 1e-12))
            fits.append((np.abs(amplitudes[i] + share * d - np.abs(out[i])).max(), j, share))
        error, _, share = min(fits)
        assert error < 1e-3 * amplitudes[i].max() and -1e-3 <= share <= 1.001
    np.testing.assert_allclose(amplitude_mix(1e-9, seed=2)(tf.constant(x)).numpy(), x, atol=1e-5)


def test_a_config_refuses_out_of_range_settings():
    for bad in (dict(erase=1.5), dict(erase=-0.1), dict(sharpness_aware=-0.05), dict(amplitude_mix=1.5),
                dict(amplitude_mix=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_a_run_trained_by_sam_with_both_augmentations_is_saved_without_the_wrapper(tmp_path, tiny_dataset):
    from conftest import train_tiny_cnn
    from train.compare import measures

    out = tmp_path / "run"
    result = train_tiny_cnn(tiny_dataset, out, "sharpness_aware = 0.05\nerase = 0.5\namplitude_mix = 0.5")
    assert "Epoch 2/2" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["sharpness_aware"], config["erase"], config["amplitude_mix"]) == (0.05, 0.5, 0.5)
    assert measures(config).endswith("erase 0.5, sharpness_aware 0.05, amplitude_mix 0.5")
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert not saved.name.endswith("-sam") and saved.output.shape[-1] == 3


def test_a_runs_loss_at_sams_perturbed_weights_is_measured_without_moving_the_run(tiny_run, capsys):
    from train.sharpness_aware import main, perturbed_losses

    assert main([str(tiny_run), "--rho", "0.001", "0.01", "--images", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 training images") and "at radius 0.001 along the gradient" in out
    x, y = _batch()
    model = _tiny_model()
    start = [w.numpy() for w in model.weights]
    at_weights, (small, large) = perturbed_losses(model, x, y, [0.01, 0.5])
    assert at_weights < small < large      # uphill along the gradient, steeper further out
    for w, w0 in zip(model.weights, start):
        np.testing.assert_allclose(w.numpy(), w0, atol=1e-6)
