"""Models, strategies and training mechanics at tiny sizes (real models belong in benchmarks)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train  # noqa: F401
import tf_keras as keras

from edge_app import graph_names
from train import models
from train.trainer import set_trainable


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


def test_imagenet_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "KERAS_CACHE", tmp_path / "keras-cache")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded") as refused:
        models.build("mobilenet_v2", 3, image_size=96, alpha=0.35, weights="imagenet", weights_dirs=[tmp_path])
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5" in str(refused.value)


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


def test_weight_average_is_what_validation_sees_and_the_raw_weights_train_on():
    """WeightAverage: after each epoch the model holds the exponential moving average of the weights of
    every step so far (what validation and the checkpoint then read); the next epoch trains on from the
    raw weights, and the run ends on the average."""
    from train.trainer import WeightAverage

    model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 3)).astype("float32")
    steps, epoch_ends, epoch_starts = [], [], []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(self.model.get_weights())

        def on_epoch_end(self, epoch, logs=None):
            epoch_ends.append(self.model.get_weights())

        def on_epoch_begin(self, epoch, logs=None):
            epoch_starts.append(self.model.get_weights())

    average = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[WeightAverage(0.9), Watch()])
    expected = []
    for weights in steps:                         # 4 steps an epoch
        average = [0.9 * a + 0.1 * w for a, w in zip(average, weights)]
        expected.append(average)
    for got, want in zip(epoch_ends + [model.get_weights()], [expected[3], expected[7], expected[7]]):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    for g, w in zip(epoch_starts[1], steps[3]):   # the second epoch starts from the raw weights
        np.testing.assert_array_equal(g, w)
    assert not np.allclose(steps[3][0], expected[3][0])
    with pytest.raises(ValueError, match="momentum"):
        WeightAverage(1.0)
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="weight_average"):     # a recipe says so before any data is read
        TrainConfig(weight_average=1.5)


def test_mirrored_strategy_step_on_two_logical_cpus():
    code = """
import numpy as np
import train
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras as keras
from edge_app import graph_names
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


def test_gradcam_of_a_pooled_dense_head_is_the_class_activation_map():
    # With global average pooling and one dense layer, d logit_c / d feature = W[:, c] / (h w) at
    # every position, so Grad-CAM must equal relu(features . W[:, c]) up to scale (Zhou et al. 2016).
    from train.gradcam import gradcam

    keras.utils.set_random_seed(3)
    model = models.build("cnn", 3, image_size=64, weights="none")
    x = np.random.default_rng(1).random((3, 64, 64, 1), dtype=np.float32)
    features = keras.Model(model.input, model.get_layer(graph_names.FEATURES).output)(x).numpy()
    dense = model.get_layer(graph_names.LOGITS)
    kernel, bias = dense.get_weights()
    kernel[:, 2] = np.abs(kernel[:, 2])  # class 2: evidence everywhere; the others have zeros
    dense.set_weights([kernel, bias])
    classes = np.array([0, 1, 2])
    cam = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    assert peak[2] > 0
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    maps = gradcam(model, x, classes)
    assert maps.shape == cam.shape == (3, 4, 4)
    np.testing.assert_allclose(maps, cam, atol=1e-5)


def test_review_sample_shows_errors_and_every_class():
    from train.gradcam import sample_for_review

    y_true = np.array([0] * 10 + [1] * 10 + [2] * 4)
    y_pred = y_true.copy()
    y_pred[[0, 11, 21]] = [1, 2, 0]  # three errors
    chosen = sample_for_review(y_true, y_pred, count=9)
    assert len(chosen) == 9 and len(set(chosen)) == 9
    assert {0, 11, 21} <= set(chosen.tolist())
    correct = [i for i in chosen if y_true[i] == y_pred[i]]
    assert {int(y_true[i]) for i in correct} == {0, 1, 2}


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, tiny_dataset):
    """kill -9 after the first epoch's backup, then --resume: training continues, not restarts."""
    import os
    import signal
    import time

    from conftest import REPO, run_module

    config = tmp_path / "run.toml"
    config.write_text("early_stopping_patience = 100\nbootstrap = 0\n")
    out = tmp_path / "run"
    args = ["train", "--model", "cnn", "--weights", "none", "--data", tiny_dataset, "--out", out,
            "--config", config, "--image-size", "64", "--epochs", "6", "--strategy", "full",
            "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backup = out / "checkpoints" / "backup_phase1"
    deadline = time.time() + 300
    # the CheckpointManager writes its "checkpoint" state file last: before it the backup is half written
    while not any(backup.rglob("checkpoint")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(backup.rglob("checkpoint")), "the run never wrote a backup to resume from"
    assert not (out / "model.keras").exists(), "the run finished before it could be interrupted"

    resumed = run_module(*args, "--resume")
    assert "Epoch 1/6" not in resumed.stdout and "Epoch 6/6" in resumed.stdout
    epochs = [int(line.split(",")[0]) for line in (out / "training_phase1.csv").read_text().splitlines()[1:]]
    assert epochs[-1] == 5 and epochs == sorted(set(epochs))
    assert (out / "model.keras").is_file() and (out / "model_card.json").is_file()


def test_a_run_names_the_commit_it_trained_with(tiny_run):
    """The card's git_commit is HEAD as training started, "+modified" when tracked files differed from it
    (the tree does not move during the tests, so HEAD now is HEAD then)."""
    import json

    from conftest import REPO

    git = lambda *args: subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    modified = git("diff", "--quiet", "HEAD").returncode == 1
    expected = git("rev-parse", "HEAD").stdout.strip() + ("+modified" if modified else "")
    assert len(expected) >= 40
    assert json.loads((tiny_run / "model_card.json").read_text())["git_commit"] == expected


def test_a_run_with_mixup_trains_on_blended_labels_and_records_it(tmp_path, tiny_dataset):
    """`mixup` in a run's config: training takes the blended labels (the loss and the accuracy metric
    accept them; validation keeps class indices), and the run's config says it was on."""
    import json

    from conftest import train_tiny_cnn

    out = tmp_path / "run"
    result = train_tiny_cnn(tiny_dataset, out, "mixup = 0.2")
    assert "Epoch 2/2" in result.stdout
    losses = [float(line.split(",")[2]) for line in (out / "training_phase1.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((out / "config.json").read_text())["mixup"] == 0.2
    assert (out / "model.keras").is_file()

def test_training_from_scratch_never_freezes_a_random_backbone():
    from train.config import SCRATCH_MODELS, TrainConfig

    assert SCRATCH_MODELS == tuple(n for n, e in models.REGISTRY.items() if e.weights_file is None)
    assert (TrainConfig(model="cnn").weights, TrainConfig(model="cnn").strategy) == ("none", "full")
    assert TrainConfig(model="mobilenet_v2").weights == "imagenet"
    assert TrainConfig(weights="none").strategy == "full"
    assert TrainConfig(weights="imagenet").strategy == "finetune"
    with pytest.raises(ValueError, match="--strategy full"):
        TrainConfig(weights="none", strategy="frozen")


def test_acquisition_augmentation_changes_how_not_what():
    from train.config import TrainConfig
    from train.pipeline import acquisition_augmentation

    assert acquisition_augmentation(TrainConfig(), 0) is None      # off by default
    config = TrainConfig(crop_scale=0.7, gamma=0.5, blur=1.5, sharpen=1.0, noise=0.03, min_resolution=0.5,
                         jpeg_quality=40)
    augment = acquisition_augmentation(config, 0)
    y, x = np.mgrid[:64, :64] / 63.0
    batch = np.stack([(0.2 + 0.6 * x * y), (0.8 - 0.5 * x)])[..., None].astype(np.float32)
    out = augment(batch).numpy()
    assert out.shape == batch.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - batch).mean() > 0.005                        # it did change the pixels
    for a, b in zip(out[..., 0], batch[..., 0]):                     # ... but not the picture
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_stretch_zooms_the_width_alone():
    from train.config import TrainConfig
    from train.pipeline import augmentation

    still = dict(rotation_degrees=0.0, zoom=0.0, shift=0.0, brightness=0.0, contrast=1e-9)
    assert len(augmentation(TrainConfig(**still), 0).layers) == 5   # off by default: no sixth step
    batch = np.zeros((16, 64, 64, 1), np.float32)
    batch[:, 16:48, 20:44] = 1.0                                      # a 32 high x 24 wide bright box
    out = augmentation(TrainConfig(stretch=0.3, **still), 0)(batch, training=True).numpy()[..., 0] > 0.5
    heights, widths = out[:, :, 32].sum(axis=1), out[:, 32].sum(axis=1)
    assert (np.abs(heights - 32) <= 1).all()                          # the height is kept
    assert widths.min() < 23 and widths.max() > 25                    # the width zoomed both ways


def test_contrast_curve_is_monotone_keeps_mid_grey_and_varies_mid_tone_contrast():
    from train.config import TrainConfig
    from train.pipeline import acquisition_augmentation

    ramp = np.linspace(0.0, 1.0, 33, dtype=np.float32)
    batch = np.broadcast_to(ramp, (64, 4, 33))[..., None].copy()
    out = acquisition_augmentation(TrainConfig(contrast_curve=1.0), 0)(batch).numpy()[:, 0, :, 0]
    assert (np.diff(out, axis=1) >= -1e-6).all()                      # a grey curve: order kept
    np.testing.assert_allclose(out[:, 16], 0.5, atol=1e-5)             # mid grey stays mid grey
    assert out[:, 0].max() < 1e-3 and out[:, -1].min() > 1 - 1e-3     # black and white stay
    slope = (out[:, 18] - out[:, 14]) / (ramp[18] - ramp[14])          # mid-tone contrast, per image:
    assert slope.max() > 1.5 and slope.min() < 0.75                   # raised in some, lowered in others


def test_sharpening_overshoots_an_edge_that_blur_would_soften():
    from train.config import TrainConfig
    from train.pipeline import acquisition_augmentation

    edge = np.where(np.arange(32) < 16, 0.3, 0.7).astype(np.float32)
    batch = np.broadcast_to(edge, (8, 32, 32))[..., None].copy()
    out = acquisition_augmentation(TrainConfig(sharpen=1.0), 0)(batch).numpy()
    assert out.max() > 0.75 and out.min() < 0.25                    # halos either side of the edge
    np.testing.assert_allclose(out[:, :, :8], 0.3, atol=1e-5)         # flat grey away from it is kept
    np.testing.assert_allclose(out[:, :, -8:], 0.7, atol=1e-5)


def test_blur_keeps_flat_grey_and_spreads_a_point():
    from train.pipeline import _gaussian_blur

    flat = np.full((1, 16, 16, 1), 0.4, np.float32)
    np.testing.assert_allclose(_gaussian_blur(flat, 2.0, radius=6).numpy(), flat, atol=1e-6)
    point = np.zeros((1, 17, 17, 1), np.float32)
    point[0, 8, 8, 0] = 1.0
    spread = _gaussian_blur(point, 1.0, radius=3).numpy()[0, :, :, 0]
    assert spread.sum() == pytest.approx(1.0, abs=1e-5) and spread[8, 8] == pytest.approx(1 / (2 * np.pi), rel=0.05)
    assert spread[8, 9] == pytest.approx(spread[9, 8]) and spread[8, 9] < spread[8, 8]


def _records(pairs):
    from pathlib import Path

    from train.data.records import Record
    return [Record(Path(f"{i}.png"), label, "train", None, source) for i, (source, label) in enumerate(pairs)]


def _totals(weights, pairs) -> dict:
    totals = {}
    for weight, pair in zip(weights, pairs):
        totals[pair] = totals.get(pair, 0.0) + float(weight)
    return totals


LABELS = ("normal", "pneumonia", "covid")
PAIRS = [("kermany", "normal")] * 6 + [("rsna", "normal")] * 2 + [("kermany", "pneumonia")] * 4


def test_image_weights_with_both_powers_one_balance_classes_then_sources():
    from train.pipeline import image_weights

    w = image_weights(_records(PAIRS), LABELS, class_power=1.0, source_power=1.0)
    assert w.mean() == pytest.approx(1.0)
    # two classes of 6 each; normal's 6 shared by its two sources, whatever their sizes (6 and 2 images)
    assert _totals(w, PAIRS) == pytest.approx({("kermany", "normal"): 3.0, ("rsna", "normal"): 3.0,
                                               ("kermany", "pneumonia"): 6.0})


def test_image_weights_without_source_power_weigh_classes_by_their_frequency():
    from train.pipeline import image_weights

    pairs = [("a", "normal")] * 60 + [("a", "pneumonia")] * 30 + [("b", "covid")] * 10
    y = np.array([LABELS.index(c) for _, c in pairs])
    balanced = image_weights(_records(pairs), LABELS, class_power=1.0, source_power=0.0)
    assert balanced[[0, 60, 90]] == pytest.approx([100 / 180, 100 / 90, 100 / 30])   # every class weighs 100/3
    soft = image_weights(_records(pairs), LABELS, class_power=0.5, source_power=0.0)
    assert soft[90] / soft[0] == pytest.approx(6 ** 0.5)                              # (60 / 10) ** 0.5
    assert soft.sum() == pytest.approx(len(y))
    assert image_weights(_records(pairs), LABELS, class_power=0.0, source_power=0.0) == pytest.approx(np.ones(len(y)))


def test_source_power_lifts_a_small_source_within_its_class_and_keeps_the_class_total():
    from train.pipeline import image_weights

    w = image_weights(_records(PAIRS), LABELS, class_power=0.0, source_power=0.5)
    totals = _totals(w, PAIRS)
    # normal keeps 8 of 12 images' weight; within it, 6 and 2 images weigh 6 ** -0.5 and 2 ** -0.5 each
    assert totals[("kermany", "normal")] + totals[("rsna", "normal")] == pytest.approx(8.0)
    assert totals[("kermany", "pneumonia")] == pytest.approx(4.0)
    assert totals[("rsna", "normal")] / totals[("kermany", "normal")] == pytest.approx((2 * 2 ** -0.5) / (6 * 6 ** -0.5))


def test_view_balance_makes_the_projection_tell_nothing_of_the_class_within_a_population():
    from train.data import sources
    from train.data.records import Record, projection
    from train.pipeline import image_weights, projection_factors

    assert [projection(v) for v in ("PA", "AP Supine", "AP (pediatric)", "ap", "L", "")] == ["PA", "AP", "AP", "AP",
                                                                                             "", ""]
    adult_normal, adult_pneumonia = sources.SOURCES[2].repo, sources.SOURCES[3].repo   # rsna-normal, rsna-pneumonia
    cells = ([(adult_normal, "normal", "PA")] * 8 + [(adult_normal, "normal", "AP")] * 2
             + [(adult_pneumonia, "pneumonia", "AP")] * 6 + [(adult_pneumonia, "pneumonia", "PA")] * 2
             + [("kermany", "normal", "AP (pediatric)")] * 3 + [("kermany", "pneumonia", "AP (pediatric)")] * 5
             + [(adult_normal, "normal", "")])                               # a view not given
    records = [Record(Path(f"{i}.png"), label, "train", None, source, view=view)
               for i, (source, label, view) in enumerate(cells)]
    factors = projection_factors(records)
    total = lambda label, view: sum(f for f, (_, l, v) in zip(factors, cells) if (l, projection(v)) == (label, view)
                                    and v != "AP (pediatric)")
    # adults: 10 normal (8 PA, 2 AP), 8 pneumonia (2 PA, 6 AP) -> each class split as the adults' PA 10 : AP 8
    assert total("normal", "PA") / total("normal", "AP") == pytest.approx(10 / 8)
    assert total("pneumonia", "PA") / total("pneumonia", "AP") == pytest.approx(10 / 8)
    assert total("normal", "PA") + total("normal", "AP") == pytest.approx(10)       # class totals kept
    assert total("pneumonia", "PA") + total("pneumonia", "AP") == pytest.approx(8)
    assert factors[-9:].tolist() == [1.0] * 9      # children: one projection, nothing to balance; unknown: 1
    balanced = image_weights(records, LABELS, class_power=0.0, source_power=0.0, view_balance=True)
    assert balanced.mean() == pytest.approx(1.0)
    assert balanced[:8] == pytest.approx(factors[:8] * len(records) / factors.sum())


def test_a_split_reports_its_adults_by_projection_with_wilson_intervals():
    from edge_app.metrics import wilson_interval
    from train.data import sources
    from train.data.records import Record
    from train.evaluate import split_metrics

    adult_normal, adult_pneumonia = sources.SOURCES[2].repo, sources.SOURCES[3].repo   # rsna-normal, rsna-pneumonia
    cells = [(adult_pneumonia, "pneumonia", "AP", 0.9), (adult_pneumonia, "pneumonia", "AP Supine", 0.8),
             (adult_pneumonia, "pneumonia", "PA", 0.2), (adult_pneumonia, "pneumonia", "PA", 0.7),
             (adult_normal, "normal", "AP", 0.6), (adult_normal, "normal", "PA", 0.1),
             (adult_normal, "normal", "", 0.9),                       # projection unknown: left out
             ("kermany", "normal", "AP (pediatric)", 0.1)]            # a child: left out
    records = [Record(Path(f"{i}.png"), label, "test", None, source, view=view)
               for i, (source, label, view, _) in enumerate(cells)]
    p = np.array([c[3] for c in cells])
    logits = np.log(np.stack([1 - p, p / 2, p / 2], axis=1))
    y = np.array([LABELS.index(c[1]) for c in cells])
    m = split_metrics(logits, y, records, LABELS, temperature=1.0, threshold=0.5, bootstrap=0)["adult_projections"]
    assert set(m) == {"adult pneumonia AP", "adult pneumonia PA", "adult normal AP", "adult normal PA"}
    assert m["adult pneumonia AP"] == {"n": 2, "figure": "sensitivity", "value": 1.0,
                                       "ci95": list(wilson_interval(2, 2))}
    assert m["adult pneumonia PA"]["value"] == 0.5 and m["adult pneumonia PA"]["n"] == 2
    assert m["adult normal AP"]["value"] == 0.0 and m["adult normal PA"]["value"] == 1.0


def test_label_smoothing_loss_by_hand():
    from train.trainer import smoothed_crossentropy

    logits = np.log(np.array([[0.7, 0.2, 0.1]], dtype=np.float32))
    value = float(smoothed_crossentropy(0.1)(np.array([0]), logits)[0])
    assert value == pytest.approx(-(0.9 + 0.1 / 3) * np.log(0.7) - 0.1 / 3 * (np.log(0.2) + np.log(0.1)), rel=1e-5)


def test_a_run_saved_before_source_weights_still_loads(tmp_path):
    from train.config import TrainConfig

    old = tmp_path / "config.json"
    old.write_text('{"balance_sources": false, "seed": 3}')
    assert TrainConfig.from_file(old).source_weight_power == 0.0
    old.write_text('{"balance_sources": true}')
    loaded = TrainConfig.from_file(old)
    assert (loaded.class_weight_power, loaded.source_weight_power) == (1.0, 1.0)


def test_a_run_saved_before_class_offsets_keeps_temperature_only(tmp_path):
    """A run's config.json without the setting was trained without class offsets (its fine-tuned
    variants must not get them either); a recipe without it gets the default."""
    from train.config import TrainConfig

    old = tmp_path / "config.json"
    old.write_text('{"seed": 3}')
    assert TrainConfig.from_file(old).class_prior_correction is False
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("seed = 3\n")
    assert TrainConfig.from_file(recipe).class_prior_correction is True


@pytest.mark.parametrize("wrapped", [False, True])
def test_class_offsets_go_into_the_logits_layer_and_the_logits(wrapped):
    """The offsets fitted on val are added to the bias of the logits layer (inside a QAT wrapper
    too), so the model itself computes the corrected logits, and to the logits given."""
    from edge_app import decision
    from train import evaluate

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name=graph_names.LOGITS)(inputs))
    if wrapped:
        import tensorflow_model_optimization as tfmot
        model = tfmot.quantization.keras.quantize_model(model)
    rng = np.random.default_rng(0)
    x = {"val": rng.normal(size=(300, 4)).astype("float32"), "test": rng.normal(size=(50, 4)).astype("float32")}
    calibrated = model(x["val"], training=False).numpy() * 3.0
    y = (rng.random((300, 1)) > decision.calibrated_probabilities(calibrated).cumsum(axis=1)).sum(axis=1)
    layer = models.head_layer(model, graph_names.LOGITS)
    bias = getattr(layer, "layer", layer).bias
    bias.assign(bias.numpy() + np.array([0.0, 1.0, 2.0]))   # the model now over-calls classes 1 and 2
    logits = {split: model(v, training=False).numpy() for split, v in x.items()}
    before, bias_before = {split: v.copy() for split, v in logits.items()}, bias.numpy()
    assert not evaluate.correct_class_priors(model, logits, y, enabled=False).any()   # off: nothing moves
    np.testing.assert_allclose(bias.numpy(), bias_before)
    offsets = evaluate.correct_class_priors(model, logits, y, enabled=True)
    assert offsets[0] == 0.0 and np.isfinite(offsets).all()
    np.testing.assert_allclose(bias.numpy(), bias_before + offsets, atol=1e-6)
    for split in x:
        np.testing.assert_allclose(logits[split], before[split] + offsets, atol=1e-5)
    if not wrapped:     # (a QAT model's output is fake-quantised over ranges this untrained one never set)
        assert offsets[2] < offsets[1] < 0
        for split in x:
            np.testing.assert_allclose(model(x[split], training=False).numpy(), logits[split], atol=1e-5)


def test_a_one_class_held_out_source_is_ranked_against_the_test_splits_other_side():
    """Held-out normals only: their AUC is taken against the test split's abnormals (and the
    reverse); a held-out source with both sides has its own AUC, so none is made up."""
    from train.evaluate import holdout_auc_against_test

    def logits(p_normal):   # three-class logits whose P(normal) at temperature 1 is p_normal
        p = np.stack([p_normal, (1 - p_normal) / 2, (1 - p_normal) / 2], axis=1)
        return np.log(p).astype(np.float32)

    test_y = np.array([0, 0, 1, 2])
    test = logits(np.array([0.9, 0.8, 0.3, 0.1]))
    # unseen normals scoring between the test abnormals (P(abnormal) 0.7, 0.9) and above them
    normals = holdout_auc_against_test(logits(np.array([0.5, 0.2])), np.zeros(2, int), test, test_y,
                                       temperature=1.0, bootstrap=0)
    assert normals == {"auc": pytest.approx(0.75), "against": "test abnormal", "n_against": 2}
    abnormals = holdout_auc_against_test(logits(np.array([0.85, 0.1])), np.ones(2, int), test, test_y,
                                         temperature=1.0, bootstrap=50)
    assert abnormals["auc"] == pytest.approx(0.75) and abnormals["against"] == "test normal"
    assert len(abnormals["auc_ci95"]) == 2
    assert holdout_auc_against_test(test, test_y, test, test_y, temperature=1.0, bootstrap=0) is None



CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_is_a_valid_training_config(path):
    """A recipe in configs/ that `python -m train --config` would refuse (a misspelt key, a value out of
    range) is found here, not after an hour of someone's training; every key it sets is taken."""
    import tomllib

    from train.config import TrainConfig

    config = TrainConfig.from_file(path)
    for key, value in tomllib.loads(path.read_text()).items():
        assert getattr(config, key) == (list(value) if isinstance(value, list) else value), key


def test_crossentropy_takes_blended_labels_as_their_blend_of_losses():
    """mixup's labels (a distribution over the classes) cost the same blend of the class indices'
    losses, with and without smoothing."""
    from train.trainer import smoothed_crossentropy

    logits = np.log(np.array([[0.7, 0.2, 0.1]], dtype=np.float32))
    for e in (0.0, 0.1):
        loss = smoothed_crossentropy(e)
        blended = float(loss(np.array([[0.6, 0.4, 0.0]], np.float32), logits)[0])
        assert blended == pytest.approx(0.6 * float(loss(np.array([0]), logits)[0])
                                        + 0.4 * float(loss(np.array([1]), logits)[0]), rel=1e-5)
    assert float(smoothed_crossentropy(0.0)(np.array([2]), logits)[0]) == pytest.approx(-np.log(0.1), rel=1e-5)


def test_mix_batches_blends_inputs_labels_and_weights_alike():
    """Image i is filled with the value i, is class i and weighs i + 1: every mixed example's label
    names the two images and their shares, and its pixels and weight are the same blend."""
    import tensorflow as tf

    from train.pipeline import mix_batches

    n = 8
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 4, 1)).copy()
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(n, dtype=np.int32), np.arange(1, n + 1, dtype=np.float32)))
    (mx, my, mw), = mix_batches(ds.batch(n), 0.4, n, seed=0).as_numpy_iterator()
    assert my.shape == (n, n) and np.allclose(my.sum(1), 1) and (my >= 0).all()
    assert (np.count_nonzero(my > 1e-6, axis=1) <= 2).all() and not np.allclose(my, np.eye(n))
    expected = my @ np.arange(n)                 # sum of share * image value
    assert np.allclose(mx[:, :, :, 0], expected[:, None, None], atol=1e-5)
    assert np.allclose(mw, my @ np.arange(1, n + 1), atol=1e-5)
