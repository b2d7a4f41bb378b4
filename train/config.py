"""Every hyper-parameter of a training run, in one place.

A run is described by one TrainConfig: defaults here, overridden by a config file
(`--config run.toml`, same keys) and then by command-line flags. The resolved config is
saved in the run folder, so a run can always be repeated exactly.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edge_app.preprocess import LUNG_MARGIN

STRATEGIES = ("frozen", "finetune", "full")
SCRATCH_MODELS = ("cnn",)  # models with no ImageNet weights (train.models: weights_file None)
LOSSES = ("crossentropy", "focal")
THRESHOLD_RULES = ("overall", "every_cohort")
ADVERSARY_MODES = ("reversal", "confusion")   # train.source_adversary


@dataclass
class TrainConfig:
    model: str = "mobilenet_v2"
    alpha: float | None = None            # MobileNetV2 width; None -> the registry's default
    weights: str | None = None            # imagenet | none | path to a .h5 file; None -> "none" for
                                          # SCRATCH_MODELS, "imagenet" for the others
    weights_dirs: list[str] = field(default_factory=list)  # where to look for Keras weight files
    data: str = ""
    task: str = "3class"                  # 3class | pneumonia | covid
    image_size: int | None = None         # None -> the model's default
    fit: str = "crop"                     # crop | pad (see edge_app.preprocess)
    input_contrast: str = "clahe"         # none | equalize | clahe | equalize-clahe: contrast step of the one
                                          # preprocessing (InputSpec.contrast), so the device does it too;
                                          # clahe + trim: held-out adults' specificity 0.098 -> 0.254,
                                          # held-out children's 0.385 -> 0.261 (README, mixed evidence)
    input_borders: str = "trim"           # keep | trim: cut uniform frames off first (InputSpec.borders)
    lung_crop: str = "none"               # none | box | mask: crop to the lung field (InputSpec.lung_crop)
    lung_model: str = ""                  # the lung segmenter .tflite it crops with (python -m train.lungs)
    lung_margin: float = LUNG_MARGIN      # around the lungs' box, a share of its size (InputSpec.lung_margin)
    strategy: str | None = None           # frozen | finetune | full; None -> finetune from
                                          # pretrained weights, full from scratch (weights "none")
    epochs: int = 8                       # head epochs (frozen/finetune) or all epochs (full)
    fine_tune_epochs: int = 10            # second phase of finetune
    fine_tune_layers: int = 80            # top backbone layers unfrozen in the second phase
    batch_size: int = 32                  # per replica
    learning_rate: float = 1e-3           # per replica of batch_size; scaled by replicas
    fine_tune_learning_rate: float = 1e-4
    dropout: float = 0.2
    weight_average: float = 0.0           # momentum per step of an exponential moving average of the weights,
                                          # which validation, the checkpoint and the run's model use
                                          # (train.trainer.WeightAverage); 0 off
    loss: str = "crossentropy"            # crossentropy | focal
    focal_gamma: float = 2.0
    class_weight_power: float = 0.5       # class weights (1/frequency)^power: 1 balances the classes,
                                          # 0.5 softens the balance (on the shared set: fewer
                                          # false COVID-19 calls, test macro-F1 0.864 -> 0.898), 0 off
    class_prior_correction: bool = True   # after training, offsets fitted on val are added to the logits
                                          # layer's bias, undoing the prior shift the class weights cause
                                          # (train.evaluate.correct_class_priors); False: temperature only
    source_weight_power: float = 0.0      # within a class, sources weigh (1/their images)^power, the class's
                                          # total kept (train.pipeline.image_weights); 1: every source of a
                                          # class weighs the same
    view_balance: bool = False            # within each population (adults, children), image weights that make the
                                          # projection (PA / AP) independent of the class: the set's adult
                                          # pneumonias are mostly AP films, its adult normals PA, so "AP" could
                                          # stand for "sick" (train.pipeline.image_weights)
    label_smoothing: float = 0.0          # cross-entropy against (1 - e) one-hot + e / classes
    mixup: float = 0.0                    # mixup's Beta(a, a): each training input blended with another of
                                          # its batch, labels and weights alike (train.pipeline.mix_batches); 0 off
    mixstyle: float = 0.0                 # MixStyle's probability per batch: the early layers' feature statistics
                                          # blended between the batch's images (train.mixstyle); 0 off
    source_adversary: float = 0.0         # weight of the backbone's training against a head that tells the data
                                          # source from the pooled features within each class
                                          # (train.source_adversary); 0 off
    source_adversary_mode: str = "confusion"  # reversal (the head's gradient reversed into the backbone) | confusion
                                          # (the backbone pushes the head's answer to an even split over the
                                          # class's sources)
    sharpness_aware: float = 0.0          # SAM's radius rho: each step descends at the worst weights within rho of
                                          # the current ones (train.sharpness_aware; twice the gradients); 0 off
    group_dro: float = 0.0                # Group DRO's step size: the step descends the group losses (population x
                                          # class) weighted by q, q_g growing by exp(step * loss_g) per batch
                                          # (train.group_dro); 0 off
    consistency: float = 0.0              # weight of the Jensen-Shannon divergence between two augmentations of each
                                          # training image (AugMix's consistency; train.consistency: twice the
                                          # images per step); 0 off
    augment: bool = True
    rotation_degrees: float = 7.0
    zoom: float = 0.1
    shift: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    horizontal_flip: bool = False         # anatomy is not symmetric (heart on the left)
    stretch: float = 0.0                  # the width zoomed against the height by up to this share (Keras
                                          # RandomZoom's width factor): the Kermany copy squashed its films, and
                                          # its pneumonias' lung boxes are narrower than its normals' (w/h 1.00
                                          # against 1.11; adults 1.09-1.12), a cue adults do not share; 0 off
    augment_before_contrast: bool = False  # augment the square before the contrast step (input_contrast),
                                          # as an acquisition would vary it: CLAHE then undoes part of a grey
                                          # curve and amplifies noise as it would a detector's. False: after
                                          # it (the recipe the seeded tables measured)
    # against acquisition shortcuts (see train.pipeline.acquisition_augmentation); 0 turns one off
    crop_scale: float = 1.0               # random resized crop of area in [crop_scale, 1], aspect 3:4-4:3
    gamma: float = 0.0                    # grey curve x ** g, log g uniform in [-log(1+gamma), log(1+gamma)]
    contrast_curve: float = 0.0           # S-shaped grey curve x^a / (x^a + (1-x)^a), log a uniform in
                                          # [-log(1+c), log(1+c)]: mid-tone contrast up (a > 1) or down, as
                                          # display curves (a DICOM VOI LUT) differ between sites
    blur: float = 0.0                     # Gaussian blur, sigma uniform in [0, blur] pixels
    sharpen: float = 0.0                  # unsharp mask x + a (x - blur(x, 1.5 px)), a uniform in [0, sharpen]
    noise: float = 0.0                    # Gaussian noise, std uniform in [0, noise]
    min_resolution: float = 1.0           # down- and back up-sampled by a factor in [min_resolution, 1]
    erase: float = 0.0                    # random erasing's probability per image: a rectangle of 2-33 % of the
                                          # square, aspect 0.3-3.3, filled with noise (Zhong et al. 2020), so
                                          # that no one region decides; 0 off
    jpeg_quality: int = 0                 # re-encoded as JPEG at a quality in [jpeg_quality, 95]
    amplitude_mix: float = 0.0            # Fourier amplitude mix: each image takes a share, uniform in [0, this],
                                          # of a batch partner's amplitude spectrum, keeping its own phase
                                          # (train.pipeline.amplitude_mix); 0 off
    early_stopping_patience: int = 4
    holdout_source: str = ""              # leave this data source out of training; evaluate on it
    target_sensitivity: float = 0.95      # abnormal sensitivity the operating threshold must reach on val
    threshold_rule: str = "overall"       # overall | every_cohort: reach it in every abnormal population
                                          # of val too (adult pneumonia; edge_app.metrics.operating_threshold)
    bootstrap: int = 1000                 # bootstrap resamples for AUC intervals (0: none)
    mixed_precision: bool = True          # float16 compute on GPU (ignored on CPU)
    xla: bool = False
    seed: int = 42

    def __post_init__(self):
        if self.weights is None:
            self.weights = "none" if self.model in SCRATCH_MODELS else "imagenet"
        if self.strategy is None:
            self.strategy = "full" if self.weights == "none" else "finetune"
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.weights == "none" and self.strategy != "full":
            raise ValueError(f"strategy {self.strategy!r} freezes a backbone, but with weights 'none' it "
                             "is random: use --strategy full to train from scratch, or pretrained weights")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if self.lung_crop != "none" and not self.lung_model:
            raise ValueError(f"lung_crop {self.lung_crop!r} needs lung_model, the lung segmenter's .tflite "
                             "(python -m train.lungs)")
        if not (self.weight_average == 0.0 or 0.0 < self.weight_average < 1.0):
            raise ValueError(f"weight_average is a momentum in (0, 1), or 0 for off; got {self.weight_average}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mixup < 0 or (self.mixup and self.loss == "focal"):
            raise ValueError(f"mixup must be >= 0 and goes with the cross-entropy loss, got mixup {self.mixup} "
                             f"with loss {self.loss!r}")
        if not 0.0 <= self.mixstyle <= 1.0:
            raise ValueError(f"mixstyle is a probability in [0, 1], got {self.mixstyle}")
        if not 0.0 <= self.erase <= 1.0:
            raise ValueError(f"erase is a probability in [0, 1], got {self.erase}")
        if not 0.0 <= self.amplitude_mix <= 1.0:
            raise ValueError(f"amplitude_mix is a share in [0, 1], got {self.amplitude_mix}")
        if self.sharpness_aware < 0:
            raise ValueError(f"sharpness_aware is SAM's radius, >= 0 (0 off), got {self.sharpness_aware}")
        if self.group_dro < 0 or (self.group_dro and (self.mixup or self.source_adversary or self.sharpness_aware)):
            raise ValueError(f"group_dro is a step size >= 0 (0 off) and goes without mixup (blended labels), the "
                             f"source adversary (its own labels) and SAM (its own training step), got {self.group_dro} "
                             f"with mixup {self.mixup}, source_adversary {self.source_adversary}, sharpness_aware "
                             f"{self.sharpness_aware}")
        if self.consistency < 0 or (self.consistency and (not self.augment or self.mixup or self.source_adversary
                                                           or self.sharpness_aware or self.group_dro)):
            raise ValueError(f"consistency is a weight >= 0 (0 off) between two augmentations, so it needs augment "
                             f"and goes without mixup (blended labels), the source adversary and Group DRO (labels of "
                             f"their own) and SAM (its own training step), got {self.consistency} with augment "
                             f"{self.augment}, mixup {self.mixup}, source_adversary {self.source_adversary}, "
                             f"sharpness_aware {self.sharpness_aware}, group_dro {self.group_dro}")
        if self.source_adversary_mode not in ADVERSARY_MODES:
            raise ValueError(f"source_adversary_mode must be one of {ADVERSARY_MODES}, "
                             f"got {self.source_adversary_mode!r}")
        if self.source_adversary < 0 or (self.source_adversary and (self.mixup or self.mixstyle)):
            raise ValueError(f"source_adversary must be >= 0 and goes without mixup and mixstyle (their blended "
                             f"labels and second graph), got {self.source_adversary} with mixup {self.mixup}, "
                             f"mixstyle {self.mixstyle}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        try:
            return cls.from_dict(values, saved_run=path.suffix == ".json", **overrides)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, values: dict, *, saved_run: bool = False, **overrides) -> "TrainConfig":
        """`saved_run`: the values are a run's config.json (TrainConfig.save), not a recipe."""
        values = dict(values)
        if saved_run:                     # a run saved before class offsets existed trained without them
            values.setdefault("class_prior_correction", False)
            if values.get("source_adversary"):    # the adversary had one mode before "confusion" came
                values.setdefault("source_adversary_mode", "reversal")
        if "balance_sources" in values:   # runs made before source_weight_power replaced it
            if values.pop("balance_sources"):
                values.update(class_weight_power=1.0, source_weight_power=1.0)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


@dataclass
class AdaptConfig:
    """Site adaptation of a trained run (`python -m train adapt`, see train.adapt)."""
    per_class: int = 0              # local training images per class (0: all of the local train split);
                                    # the local validation images used for refitting are capped alike
    sources: list[str] = field(default_factory=list)  # only these data sources of the local set (empty: all)
    epochs: int = 15
    learning_rate: float = 1e-3
    fine_tune_layers: int = 0       # also unfreeze the top N backbone layers (BatchNorm stays frozen)
    replay: int = 1                 # per local image, this many of the run's own training images of
                                    # its class join the fine-tuning, so the model keeps what it knew
    batch_size: int = 16
    seed: int = 0
    bootstrap: int = 200            # bootstrap resamples for the AUC intervals of the before/after report
