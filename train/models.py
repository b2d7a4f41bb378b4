"""A registry of classifiers, created by name (timm style).

Every entry knows its default input size, the normalisation its ImageNet weights expect
(applied by `edge_app.preprocess.normalise`, so the device does the same), how many input
channels it takes, and the file name under which Keras caches its ImageNet weights.

All models are flat tf_keras functional models: input -> backbone -> global average pooling
-> dropout -> `logits` (float32). Flat, so that tensorflow-model-optimization can prune and
quantise them layer by layer; logits, so that temperature scaling and the device's
class-activation map work on the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tf_keras as keras

from edge_app import graph_names
from edge_app.preprocess import InputSpec

KERAS_CACHE = Path.home() / ".keras" / "models"
HEAD_LAYERS = (graph_names.FEATURES, graph_names.POOL, graph_names.DROPOUT, graph_names.LOGITS)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    default_size: int
    normalisation: str
    channels: int
    build_backbone: Callable  # (input_tensor, weights: "imagenet" | None, alpha) -> keras.Model
    weights_file: Callable | None = None  # alpha -> Keras cache file name (no top, 224 px)
    default_alpha: float | None = None
    style_layers: tuple[str, ...] = ()  # early stages' outputs, where MixStyle goes (train.mixstyle)


def _seed_cnn(inputs, weights, alpha):
    """The seeds' small baseline CNN: four conv blocks, trained from scratch."""
    if weights is not None:
        raise ValueError("the cnn baseline has no pretrained weights: use --weights none")
    layers = keras.layers
    x = inputs
    for i, filters in enumerate((32, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv5")(x)
    return keras.Model(inputs, x, name="cnn")


def _application(fn_name, **fixed):
    def build(inputs, weights, alpha):
        fn = getattr(keras.applications, fn_name)
        kwargs = dict(fixed)
        if alpha is not None:
            kwargs["alpha"] = alpha
        return fn(include_top=False, weights=weights, input_tensor=inputs, **kwargs)
    return build


def _mobilenet_v2_file(alpha):
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{_alpha_str(alpha)}_224_no_top.h5"


def _alpha_str(alpha):
    return {0.35: "0.35", 0.5: "0.5", 0.75: "0.75", 1.0: "1.0", 1.3: "1.3", 1.4: "1.4"}[float(alpha)]


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("cnn", 128, "unit", 1, _seed_cnn, style_layers=("pool1", "pool2")),
    ModelEntry("resnet50", 224, "caffe", 3, _application("ResNet50"),
               lambda a: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ModelEntry("resnet101", 224, "caffe", 3, _application("ResNet101"),
               lambda a: "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ModelEntry("densenet121", 224, "torch", 3, _application("DenseNet121"),
               lambda a: "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ModelEntry("mobilenet_v2", 224, "symmetric", 3, _application("MobileNetV2"),
               _mobilenet_v2_file, default_alpha=0.5,
               style_layers=("block_2_add", "block_5_add", "block_9_add")),  # 56, 28, 14 px
    ModelEntry("mobilenet_v3_small", 224, "raw255", 3,
               _application("MobileNetV3Small", minimalistic=False),
               lambda a: "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    ModelEntry("mobilenet_v3_large", 224, "raw255", 3,
               _application("MobileNetV3Large", minimalistic=False),
               lambda a: "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    ModelEntry("efficientnet_b0", 224, "raw255", 3, _application("EfficientNetB0"),
               lambda a: "efficientnetb0_notop.h5"),
)}


def get(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def input_spec(name: str, image_size: int | None = None, fit: str = "crop", contrast: str = "none",
               borders: str = "keep") -> InputSpec:
    entry = get(name)
    return InputSpec(size=image_size or entry.default_size, channels=entry.channels,
                     normalisation=entry.normalisation, fit=fit, contrast=contrast, borders=borders)


def resolve_weights(entry: ModelEntry, weights: str, alpha, weights_dirs=()) -> Path | None:
    """What to load: None (random init) or a local weights file. Nothing is ever downloaded:
    "imagenet" means Keras's weight file found in `weights_dirs` or ~/.keras/models."""
    if weights == "none":
        return None
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}. Pass --weights imagenet, "
                                    f"--weights none or the path of an existing .h5 file.")
        return path
    if entry.weights_file is None:
        raise ValueError(f"{entry.name} has no ImageNet weights: use --weights none")
    file_name = entry.weights_file(alpha)
    folders = [*map(Path, weights_dirs), KERAS_CACHE]
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
    raise FileNotFoundError(
        f"ImageNet weights for {entry.name} ({file_name}) are not on this machine (looked in "
        f"{', '.join(map(str, folders))}); nothing is downloaded. Put the file in one of those folders "
        f"or pass --weights-dir DIR, --weights PATH, or --weights none to train from scratch.")


def build(name: str, num_classes: int, *, image_size: int | None = None, alpha: float | None = None,
          weights: str = "none", weights_dirs=(), dropout: float = 0.2) -> keras.Model:
    """The classifier `name` with `num_classes` logits, ready to compile."""
    entry = get(name)
    alpha = alpha if alpha is not None else entry.default_alpha
    spec = input_spec(name, image_size)
    source = resolve_weights(entry, weights, alpha, weights_dirs)
    inputs = keras.Input((spec.size, spec.size, spec.channels), name="image")
    backbone = entry.build_backbone(inputs, None, alpha)
    if source is not None:
        backbone.load_weights(str(source))
    features = keras.layers.Activation("linear", name=graph_names.FEATURES)(backbone.output)
    x = keras.layers.GlobalAveragePooling2D(name=graph_names.POOL)(features)
    x = keras.layers.Dropout(dropout, name=graph_names.DROPOUT)(x)
    logits = keras.layers.Dense(num_classes, name=graph_names.LOGITS, dtype="float32")(x)
    return keras.Model(inputs, logits, name=name if alpha is None else f"{name}-{alpha:g}")


def backbone_layers(model: keras.Model) -> list:
    """The model's layers below the head, input excluded, in order."""
    return [layer for layer in model.layers
            if layer.name not in HEAD_LAYERS and not isinstance(layer, keras.layers.InputLayer)]


def head_layer(model: keras.Model, name: str):
    """A head layer by name, also inside a tfmot-quantised model (`quant_<name>`, wrapped)."""
    names = {layer.name: layer for layer in model.layers}
    layer = names.get(name) or names.get(f"quant_{name}")
    if layer is None:
        raise ValueError(f"{model.name} has no {name!r} layer: not a cxr-edge classifier")
    return layer
