"""One training run: data -> model -> fit (frozen / finetune / full) -> evaluation -> artifacts.

The run folder (`artifacts/<run>/`) gets the trained model (`model.keras`), its model card,
the resolved config, its images and splits (`splits.csv`, read back by every later stage through
train.data.run_splits), per-epoch checkpoints (for `--resume`), logs and `reports/`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge_app import decision, lungs, metrics
from edge_app.model_card import ModelCard
from train import (consistency, detail, evaluate, gradcam, group_dro, mixstyle, models, ood, report, sharpness_aware,
                   shortcuts, source_adversary)
from train.config import TrainConfig
from train.data import load_dataset, run_splits, sources
from train.data.leakage import check_leakage
from train.data.records import SPLITS
from train.pipeline import contrasted, image_weights, joint_labels, lung_refusals, make_dataset, mix_batches
from edge_app.preprocess import normalise

MONITOR = "val_abnormal_auc"


def distribution_strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """MultiWorkerMirrored from TF_CONFIG, Mirrored over local GPUs (or the given devices), else default."""
    if devices:
        return tf.distribute.MirroredStrategy(devices)
    if "TF_CONFIG" in os.environ:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()


def crossentropy(y_true, logits):
    """Per-image cross-entropy on logits (per image, so that the source adversary can add its own)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


def sparse_focal_loss(gamma: float):
    """Focal loss on logits: cross-entropy down-weighted for images the model already gets right."""
    def loss(y_true, logits):
        y_true = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32))
        log_pt = tf.gather(log_p, y_true, axis=1, batch_dims=1)
        return -tf.pow(1.0 - tf.exp(log_pt), gamma) * log_pt
    return loss


def smoothed_crossentropy(smoothing: float):
    """Cross-entropy on logits against (1 - e) * target + e / classes: the model is never pushed to
    certainty on labels that are themselves noisy (a report's 'Infiltration', a squashed film).
    The target is a class index, or a distribution over the classes (mixup's blended labels)."""
    def loss(y_true, logits):
        y_true, log_p = tf.convert_to_tensor(y_true), tf.nn.log_softmax(tf.cast(logits, tf.float32))
        classes = log_p.shape[-1]
        if y_true.shape.rank == 2 and y_true.shape[-1] == classes and classes != 1:
            target = tf.cast(y_true, tf.float32)
        else:
            target = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), classes)
        return -tf.reduce_sum(((1.0 - smoothing) * target + smoothing / classes) * log_p, axis=1)
    return loss


def set_trainable(model: keras.Model, strategy: str, phase: int, fine_tune_layers: int) -> None:
    """frozen: head only. finetune: head, then the top N backbone layers (BatchNorm stays frozen,
    i.e. in inference mode). full: everything."""
    backbone = models.backbone_layers(model)
    for layer in model.layers:
        layer.trainable = True
    if strategy == "full":
        return
    unfrozen = set()
    if strategy == "finetune" and phase == 2:
        unfrozen = {l.name for l in backbone[-fine_tune_layers:]
                    if not isinstance(l, keras.layers.BatchNormalization)}
    for layer in backbone:
        layer.trainable = layer.name in unfrozen


class ValidationMetrics(keras.callbacks.Callback):
    """One pass of the run's model over validation per epoch, logging val_loss, val_accuracy,
    val_abnormal_auc and val_macro_f1 (monitored by checkpoint, early stopping and the learning-rate
    schedule): a screening model is judged by how it ranks abnormal images. `scored` is the run's
    model, which shares its weights with the graph being fitted (with MixStyle or a source adversary)."""

    def __init__(self, scored, dataset, y, loss):
        super().__init__()
        self.scored, self.dataset, self.y, self.loss = scored, dataset, y, loss

    def on_epoch_end(self, epoch, logs=None):
        logits = self.scored.predict(self.dataset, verbose=0)
        probs = decision.calibrated_probabilities(logits)
        logs["val_loss"] = float(tf.reduce_mean(self.loss(self.y, logits)))
        logs["val_accuracy"] = float((probs.argmax(1) == self.y).mean())
        logs[MONITOR] = metrics.roc_auc(self.y != 0, decision.abnormal_probability(probs))
        logs["val_macro_f1"] = metrics.classification_report(self.y, probs.argmax(1), range(logits.shape[1]))["macro_f1"]
        print(f" - val_loss: {logs['val_loss']:.4f} - {MONITOR}: {logs[MONITOR]:.4f} "
              f"- val_macro_f1: {logs['val_macro_f1']:.4f}")


class WeightAverage(keras.callbacks.Callback):
    """An exponential moving average of the trainable weights, `momentum` per training step, which
    validation, the checkpoint and so the run's model see instead of the last step's weights:
    fine-tuning's validation accuracy swings by up to 15 points from one epoch to the next
    (training_phase2.csv), and the average sits between the swings. Put it before the validation
    callback; the raw weights train on from the next epoch. A resumed run starts a new average."""

    def __init__(self, momentum: float):
        super().__init__()
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"the weight average's momentum must be in (0, 1), got {momentum}")
        self.momentum = momentum
        self.average, self.raw = [], None

    def on_train_begin(self, logs=None):
        self.average = [tf.Variable(w, trainable=False) for w in self.model.trainable_weights]

    def on_train_batch_end(self, batch, logs=None):
        for average, w in zip(self.average, self.model.trainable_weights):
            average.assign(self.momentum * average + (1.0 - self.momentum) * w)

    def on_epoch_end(self, epoch, logs=None):
        self.raw = [w.numpy() for w in self.model.trainable_weights]
        for average, w in zip(self.average, self.model.trainable_weights):
            w.assign(average)

    def on_epoch_begin(self, epoch, logs=None):
        if self.raw is not None:
            for value, w in zip(self.raw, self.model.trainable_weights):
                w.assign(value)
            self.raw = None


def _versions() -> dict:
    import edge_app.preprocess as pp
    return {"tensorflow": tf.__version__, "tf_keras": keras.__version__, "numpy": np.__version__,
            "preprocessing": pp.PREPROCESSING_VERSION}


def _git_commit() -> str:
    """HEAD, with "+modified" when tracked files differ from it: read when training starts, so a run
    names the code it trained with even if the tree moves on before it ends."""
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                                       timeout=10)
    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        return head + ("+modified" if head and git("diff", "--quiet", "HEAD").returncode == 1 else "")
    except Exception:
        return ""


def load_run(run_dir: str | Path) -> tuple[keras.Model, ModelCard, TrainConfig]:
    """(model, model card, training config) of a finished run folder."""
    run_dir = Path(run_dir)
    for name in ("model.keras", "model_card.json", "config.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a training run: {name} is missing "
                                    f"(train one with `python -m train ... --out {run_dir}`)")
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    card = ModelCard.from_json((run_dir / "model_card.json").read_text())
    config = TrainConfig.from_file(run_dir / "config.json")
    if card.input.lung_crop != "none":
        lungs.use(config.lung_model)   # the preprocessing crops with it (conversion embeds it)
    return model, card, config


def run(config: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
        devices: list[str] | None = None) -> Path:
    out = Path(out)
    reports = out / "reports"
    checkpoints = out / "checkpoints"
    reports.mkdir(parents=True, exist_ok=True)
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(exist_ok=True)
    config.save(out / "config.json")
    commit = _git_commit()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    dataset = load_dataset(config.data, task=config.task, seed=config.seed, progress=progress)
    held_out = []
    if config.holdout_source:
        dataset, held_out = dataset.without_source(sources.resolve(config.holdout_source))
        print(f"holding out source {config.holdout_source!r}: {len(held_out)} images, evaluated as 'holdout'")
    print(dataset.summary())
    leakage = check_leakage(dataset.records, progress=progress)
    (reports / "leakage.json").write_text(json.dumps(leakage.to_dict(), indent=2))
    if not leakage.ok:
        print("WARNING: leakage across splits (see reports/leakage.json):\n" + leakage.summary())

    labels = dataset.labels
    spec = models.input_spec(config.model, config.image_size, config.fit, config.input_contrast,
                             config.input_borders)
    if config.lung_crop != "none":
        spec = dataclasses.replace(spec, lung_crop=config.lung_crop, lung_model=lungs.use(config.lung_model).sha256,
                                   lung_margin=config.lung_margin)
        refused = lung_refusals(dataset.records + held_out, spec, progress=progress)
        (reports / "lung_refusals.json").write_text(json.dumps(refused, indent=2))
        gone = {r["file"] for r in refused}
        dataset = dataclasses.replace(dataset, records=[r for r in dataset.records if str(r.path) not in gone])
        held_out = [r for r in held_out if str(r.path) not in gone]
        print(f"lung crop: {len(refused)} images refused by the lung step are left out (reports/lung_refusals.json)")
    run_splits.write(out, dataset, held_out)   # after the lung step: every later stage reads what trained
    split_data = {split: evaluate.load_split(records, labels, spec, desc=split, progress=progress)
                  for split, records in [(s, dataset.split(s)) for s in SPLITS]
                  + [(run_splits.HOLDOUT, held_out)] * bool(held_out)}

    strategy = distribution_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    if tf.config.list_logical_devices("GPU") and config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    batch = config.batch_size * replicas
    x_train, y_train, train_records = split_data["train"]
    x_val, y_val, _ = split_data["val"]
    per_image = image_weights(train_records, labels, class_power=config.class_weight_power,
                              source_power=config.source_weight_power, view_balance=config.view_balance)
    adversary, y_fit = None, y_train
    if config.source_adversary:
        train_sources = sorted({r.source or "unknown" for r in train_records})
        source_index = [train_sources.index(r.source or "unknown") for r in train_records]
        adversary = source_adversary.SourceAdversary.of(y_train, source_index, len(labels), len(train_sources),
                                                        config.source_adversary, config.source_adversary_mode)
        y_fit = joint_labels(y_train, source_index, adversary.sources)
        print(f"source adversary ({adversary.mode}, weight {adversary.weight:g}) within each class over "
              f"{train_sources}")
    groups = []
    if config.group_dro:
        cohorts = [sources.cohort_of(r.source, r.label) or f"{r.source or 'unknown'} {r.label}" for r in train_records]
        groups = sorted(set(cohorts))
        y_fit = joint_labels(y_train, [groups.index(c) for c in cohorts], len(groups))
        print(f"group DRO (step size {config.group_dro:g}) over {groups}")
    train_ds = make_dataset(x_train, y_fit, spec, batch_size=batch, training=True, config=config,
                            seed=config.seed, sample_weights=per_image, views=2 if config.consistency else 1)
    if config.mixup:
        train_ds = mix_batches(train_ds, config.mixup, len(labels), seed=config.seed)
    val_ds = make_dataset(x_val, y_val, spec, batch_size=batch, training=False)
    print(f"{replicas} replica(s) on {strategy.__class__.__name__}; global batch {batch}; mean image weights "
          + ", ".join(f"{s} {c}: {per_image[[(r.source, r.label) == (s, c) for r in train_records]].mean():.2f}"
                      for s, c in sorted({(r.source, r.label) for r in train_records}, key=str)))

    with strategy.scope():
        model = models.build(config.model, len(labels), image_size=spec.size, alpha=config.alpha,
                             weights=config.weights, weights_dirs=config.weights_dirs,
                             dropout=config.dropout)
        fitted = model   # or a training graph that shares model's weights:
        if config.mixstyle:
            fitted = mixstyle.with_mixstyle(model, models.get(config.model).style_layers, config.mixstyle, config.seed)
        if adversary is not None:
            fitted = adversary.graph(model)
        if config.sharpness_aware:
            fitted = sharpness_aware.SharpnessAware(fitted, config.sharpness_aware)
    loss = (sparse_focal_loss(config.focal_gamma) if config.loss == "focal"
            else smoothed_crossentropy(config.label_smoothing) if config.label_smoothing or config.mixup
            else crossentropy)
    fitted_loss, fitted_metrics = loss, ["accuracy"]
    if adversary is not None:
        fitted_loss, fitted_metrics = adversary.loss(loss), adversary.metrics()
    if groups:
        with strategy.scope():
            fitted = group_dro.GroupDRO(fitted, loss, groups, config.group_dro)
    if config.consistency:
        with strategy.scope():
            fitted = consistency.ConsistencyTraining(fitted, config.consistency)
        print(f"consistency between two augmentations of each image (JS weight {config.consistency:g})")

    phases = [(1, config.epochs, config.learning_rate)]
    if config.strategy == "finetune":
        phases.append((2, config.fine_tune_epochs, config.fine_tune_learning_rate))
    history = []
    started = time.time()
    for phase, epochs, lr in phases:
        done_marker = checkpoints / f"phase{phase}.done"
        if resume and done_marker.exists():
            print(f"phase {phase} already complete: skipping")
            continue
        set_trainable(model, config.strategy, phase, config.fine_tune_layers)
        with strategy.scope():
            fitted.compile(optimizer=keras.optimizers.Adam(lr * replicas), loss=fitted_loss,
                           metrics=fitted_metrics, jit_compile=config.xla)
        print(f"phase {phase}: {sum(np.prod(w.shape) for w in fitted.trainable_weights):,} trainable "
              f"parameters, {epochs} epochs, learning rate {lr * replicas:g}")
        callbacks = [WeightAverage(config.weight_average)] if config.weight_average else []
        callbacks += [
            ValidationMetrics(model, val_ds, y_val, loss),
            keras.callbacks.ModelCheckpoint(str(checkpoints / "best.weights.h5"), monitor=MONITOR,
                                            mode="max", save_best_only=True, save_weights_only=True),
            keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max",
                                          patience=config.early_stopping_patience),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6),
            keras.callbacks.CSVLogger(str(out / f"training_phase{phase}.csv"), append=resume),
            keras.callbacks.TensorBoard(str(out / "logs" / f"phase{phase}")),
            keras.callbacks.BackupAndRestore(str(checkpoints / f"backup_phase{phase}")),
        ]
        fit = fitted.fit(train_ds, epochs=epochs,
                        callbacks=callbacks, verbose=1 if progress else 2)
        history.append({"phase": phase, **{k: [float(v) for v in vs] for k, vs in fit.history.items()}})
        fitted.load_weights(str(checkpoints / "best.weights.h5"))
        done_marker.touch()
    train_seconds = time.time() - started

    card = evaluate_and_card(model, config, dataset, spec, split_data, reports, history,
                             train_seconds=train_seconds, replicas=replicas, git_commit=commit)
    model.save(out / "model.keras")                # after evaluate_and_card: with its class offsets
    (out / "model_card.json").write_text(card.to_json() + "\n")
    print(f"\nrun saved to {out}\n" + report.headline(card.metrics))
    return out


def _gradcam_grid(model, spec, test_split, test_logits, labels, path) -> None:
    """Grad-CAM overlays for a sample of test images, errors first."""
    images, y, records = test_split
    predicted = test_logits.argmax(axis=1)
    chosen = gradcam.sample_for_review(y, predicted)
    squares = contrasted(images[chosen], spec)      # what the model sees, before normalise
    maps = gradcam.gradcam(model, normalise(squares, spec))
    titles = [f"{records[i].path.name[:22]}\ntrue {labels[y[i]]}, predicted {labels[predicted[i]]}"
              for i in chosen]
    report.gradcam_grid(squares, maps, titles, y[chosen] != predicted[chosen], path)


def _shortcut_probe(features, split_data, labels) -> dict | None:
    """How well the features tell the data source (train.shortcuts); None with one source."""
    sources = {s: [r.source or "unknown" for r in split_data[s][2]] for s in ("train", "test")}
    if len(set(sources["train"])) < 2:
        return None
    return shortcuts.source_probe(features["train"], sources["train"], split_data["train"][1],
                                  features["test"], sources["test"], split_data["test"][1], labels)


def _fit_ood(features, run_dir: Path) -> dict:
    """The out-of-distribution score fitted on train (saved as ood.npz for conversion), its
    threshold chosen on val, and the share of each split it flags."""
    detector = ood.fit(features["train"])
    detector.save(run_dir / "ood.npz")
    scores = {split: ood.score(detector, f) for split, f in features.items()}
    threshold = ood.threshold(scores["val"])
    return {"threshold": threshold, "components": int(detector.components.shape[1]),
            "flagged": {split: float((s > threshold).mean()) for split, s in scores.items()}}


def evaluate_and_card(model, config, dataset, spec, split_data, reports, history, *,
                      train_seconds, replicas, git_commit: str) -> ModelCard:
    """Class offsets (config.class_prior_correction), temperature and operating threshold fitted on
    val; metrics on val and test; the model card."""
    labels = dataset.labels
    evaluated = [s for s in ("val", "test", run_splits.HOLDOUT) if s in split_data]
    logits = {split: evaluate.predict(model, *split_data[split][:2], spec) for split in evaluated}
    offsets = evaluate.correct_class_priors(model, logits, split_data["val"][1],
                                            enabled=config.class_prior_correction)
    temperature, threshold = evaluate.calibrate(logits["val"], *split_data["val"][1:], config.target_sensitivity,
                                                config.threshold_rule)
    results = {split: evaluate.split_metrics(logits[split], *split_data[split][1:], labels, temperature=temperature,
                                             threshold=threshold, bootstrap=config.bootstrap)
               for split in evaluated}
    if run_splits.HOLDOUT in results:
        against = evaluate.holdout_auc_against_test(
            logits[run_splits.HOLDOUT], split_data[run_splits.HOLDOUT][1], logits["test"], split_data["test"][1],
            temperature=temperature, bootstrap=config.bootstrap)
        if against:
            results[run_splits.HOLDOUT]["abnormal"]["auc_against_test"] = against
    features = evaluate.pooled_features(model, spec, split_data)
    probe = _shortcut_probe(features, split_data, labels)
    if probe:
        results["shortcut_probe"] = probe
    results["ood"] = _fit_ood(features, reports.parent)
    results["detail"] = detail.fit({split: split_data[split][0] for split in evaluated},
                                   [r.source or "unknown" for r in split_data["val"][2]])
    results["temperature"] = temperature
    results["class_offsets"] = dict(zip(labels, offsets.tolist()))
    results["target_sensitivity"] = config.target_sensitivity
    results["training_seconds"] = train_seconds
    results["hardware"] = {"replicas": replicas,
                           "gpus": [d.name for d in tf.config.list_logical_devices("GPU")],
                           "cpu_count": os.cpu_count()}
    (reports / "metrics.json").write_text(json.dumps(results, indent=2))
    np.savez_compressed(reports / "predictions.npz", **{f"{s}_logits": logits[s] for s in logits},
                        **{f"{s}_labels": split_data[s][1] for s in logits})
    report.write(reports, results, labels, logits, {s: split_data[s][1] for s in logits}, history)
    _gradcam_grid(model, spec, split_data["test"], logits["test"], labels, reports / "gradcam_test.png")
    return ModelCard(
        name=model.name, task=config.task, labels=labels, input=spec, temperature=temperature,
        thresholds={"abnormal": threshold, "target_sensitivity": config.target_sensitivity,
                    "ood": results["ood"]["threshold"], "detail": results["detail"]["threshold"]},
        dataset={"root": run_splits.relative_to_run(dataset.root, reports.parent), "fingerprint": dataset.fingerprint(),
                 "counts": dataset.counts(), "seed": config.seed,
                 **({"holdout_source": config.holdout_source} if config.holdout_source else {})},
        metrics=evaluate.card_metrics(results["test"]),
        versions=_versions(), git_commit=git_commit,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
