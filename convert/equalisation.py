"""Residual-stream equalisation, before full-integer conversion (issue 14).

int8 activations get one scale per tensor. MobileNetV2's linear bottlenecks (the projection
outputs and the residual sums, which no ReLU6 bounds) carry a few channels whose range is several
times the others' (docs/RESULTS.md, 2026-12-03: in block 5 one channel reaches 69, the next 26),
so one int8 step spans a large share of most channels' spread: the activation rounding that
remains after bias correction.

Such a stream is linear in its producers (a convolution + BatchNormalization with no activation
after it, and residual additions of those) and enters only convolutions. So each of its channels
c can be divided by s_c at every producer (BatchNormalization's gamma and beta) and multiplied
back in every consumer (the consumer's kernel at input channel c): the float model computes the
same function, up to float rounding, and the int8 tensors get channels of like range. As in
SmoothQuant (Xiao et al., ICML 2023), s_c = r_c^alpha / w_c^(1 - alpha): r_c the channel's largest
|value| over the calibration images, w_c the largest share of a consumer's per-output-channel int8
range that its weights take (depthwise consumers quantise per channel: no share); alpha = 1
equalises the activations alone, smaller alpha leaves part of the range in them so the consumers'
weights are not coarsened as much. Nagel et al. (ICCV 2019) do the same between ReLU layers for
the weights; this is the activation side, where MobileNetV2's linear bottlenecks allow it exactly.

`equalised(model, inputs, alpha)` returns the equalised copy; `streams(model)` says what it rescales.
Measured (docs/RESULTS.md, 2026-12-06 late morning): on real calibration images the streams' channel
ranges differ only 1.4-2.5 x, and int8's agreement with Keras did not improve beyond the noise on
three models: off by default (ConvertConfig.equalise), kept to reproduce that table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import train  # noqa: F401
import tf_keras as keras

CONSUMERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


@dataclass(frozen=True)
class Stream:
    """Layers whose outputs share channels and scale: `producers` (BatchNormalization after a
    convolution), `adds` (residual additions of them), `consumers` (convolutions reading them)."""
    producers: tuple[str, ...]
    adds: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def members(self) -> tuple[str, ...]:
        return self.producers + self.adds


def _inbound(layer) -> list:
    """The layers feeding `layer` (its first call), [] for an input."""
    if not layer._inbound_nodes:
        return []
    inbound = layer._inbound_nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def _linear_bn(layer) -> bool:
    """A BatchNormalization with gamma right after a plain convolution (what TFLite folds)."""
    inbound = _inbound(layer)
    return (isinstance(layer, keras.layers.BatchNormalization) and layer.scale and len(inbound) == 1
            and type(inbound[0]) is keras.layers.Conv2D)


def streams(model: keras.Model) -> list[Stream]:
    """Every stream of `model` that can be rescaled exactly: BatchNormalization outputs after a
    convolution and the additions of them, joined by the additions, whose every reader (outside
    the stream) is a convolution and none of which is a model output."""
    layers = {layer.name: layer for layer in model.layers}
    parent = {name: name for name, layer in layers.items()
              if _linear_bn(layer) or isinstance(layer, keras.layers.Add)}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name in list(parent):
        if isinstance(layers[name], keras.layers.Add):
            for i in _inbound(layers[name]):
                if i.name in parent:
                    parent[root(i.name)] = root(name)
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(root(name), []).append(name)
    readers: dict[str, list[str]] = {}
    for layer in model.layers:
        for i in _inbound(layer):
            readers.setdefault(i.name, []).append(layer.name)
    outputs = {t._keras_history.layer.name for t in model.outputs}
    found = []
    for names in groups.values():
        members = set(names)
        if any(isinstance(layers[n], keras.layers.Add) and          # an addition of anything else
               not all(i.name in members for i in _inbound(layers[n])) for n in members):
            continue
        consumers = sorted({r for n in members for r in readers.get(n, []) if r not in members})
        producers = tuple(sorted(n for n in members if not isinstance(layers[n], keras.layers.Add)))
        if (producers and consumers and not members & outputs
                and all(isinstance(layers[c], CONSUMERS) for c in consumers)):
            found.append(Stream(producers, tuple(sorted(members - set(producers))), tuple(consumers)))
    return sorted(found, key=lambda s: model.layers.index(layers[s.producers[0]]))


def channel_ranges(model: keras.Model, found: list[Stream], inputs: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per stream, each channel's largest |value| over its members' outputs on `inputs`."""
    names = [n for s in found for n in s.members]
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    peak = {n: np.zeros(model.get_layer(n).output.shape[-1], np.float64) for n in names}
    for start in range(0, len(inputs), batch):
        outputs = probe(inputs[start:start + batch], training=False)
        for n, out in zip(names, outputs if len(names) > 1 else [outputs]):
            values = np.abs(np.asarray(out)).reshape(-1, out.shape[-1])
            peak[n] = np.maximum(peak[n], values.max(axis=0))
    return [np.max([peak[n] for n in s.members], axis=0) for s in found]


def weight_shares(model: keras.Model, stream: Stream) -> np.ndarray:
    """Per input channel, the largest share of a consumer's per-output-channel int8 range its
    weights take (1 for depthwise consumers, which quantise each channel on its own)."""
    share = None
    for name in stream.consumers:
        layer = model.get_layer(name)
        kernel = np.abs(layer.get_weights()[0])
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            part = np.ones(kernel.shape[2])
        else:   # (kh, kw, in, out): each output channel's scale is its largest |weight|
            per_out = kernel.max(axis=(0, 1, 2), keepdims=True)
            part = (kernel / np.where(per_out == 0, 1.0, per_out)).max(axis=(0, 1, 3))
        share = part if share is None else np.maximum(share, part)
    return share


def scales(ranges: np.ndarray, shares: np.ndarray, alpha: float) -> np.ndarray:
    """s_c = r_c^alpha / w_c^(1 - alpha), normalised to a geometric mean of 1; channels that never
    move (r_c = 0) or never count (w_c = 0) keep 1."""
    valid = (ranges > 0) & (shares > 0)
    s = np.ones_like(ranges)
    s[valid] = ranges[valid] ** alpha / shares[valid] ** (1.0 - alpha)
    s[valid] /= np.exp(np.log(s[valid]).mean())
    return s


def equalised(model: keras.Model, inputs: np.ndarray, alpha: float = 1.0) -> tuple[keras.Model, list[dict]]:
    """A copy of `model` with every stream's channel c divided by s_c (see the module's docstring),
    and per stream what was done: its layers, the channels' ranges before and after."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    found = streams(model)
    ranges = channel_ranges(model, found, inputs)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    summary = []
    for stream, r in zip(found, ranges):
        s = scales(r, weight_shares(model, stream), alpha)
        for name in stream.producers:           # gamma, beta (then moving mean and variance)
            weights = copy.get_layer(name).get_weights()
            weights[0] = weights[0] / s
            weights[1] = weights[1] / s
            copy.get_layer(name).set_weights(weights)
        for name in stream.consumers:           # kernel (kh, kw, in, out or multiplier): input channel c
            weights = copy.get_layer(name).get_weights()
            weights[0] = weights[0] * s[None, None, :, None]
            copy.get_layer(name).set_weights(weights)
        summary.append({"producers": list(stream.producers), "adds": list(stream.adds),
                        "consumers": list(stream.consumers), "channels": int(len(s)),
                        "range_max_over_median_before": float(r.max() / max(np.median(r), 1e-12)),
                        "range_max_over_median_after": float((r / s).max() / max(np.median(r / s), 1e-12)),
                        "scale_min": float(s.min()), "scale_max": float(s.max())})
    return copy, summary
