"""Keras model -> TFLite variants, each carrying its model card.

fp32         plain float32 (the reference)
dynamic      dynamic-range quantisation: int8 weights, float activations
fp16         float16 weights: the GPU-delegate variant; its biases and other vectors stay float32
             (`_float32_vectors`)
int8         full integer: int8 weights and activations, calibrated on a class-balanced sample
             of the training split; int8 input and output (or float, ConvertConfig.int8_io);
             converted from a copy whose biases absorb the mean weight-rounding error
             (convert.bias_correction; ConvertConfig.bias_correction), its linear activations
             quantised over percentiles (`_int8_linear_percentile`; ConvertConfig.linear_percentile),
             then each op's remaining mean error against the float model taken off its int32 bias
             (convert.empirical_bias, applied by convert.conversion)
int8-mixed   int8 as above except the ops whose int8 rounding moves the decisions (`_mixed`);
             float input and output (not a default variant: `--variants int8-mixed`)
qat          full integer from the quantisation-aware-trained model (convert.compress.qat)
pruned-fp32  the magnitude-pruned model (convert.compress.prune), float32
pruned-int8  the pruned model, full integer (post-training)
pruned-qat   the pruned model after pruning-preserving QAT, full integer
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

import train  # noqa: F401
import tensorflow as tf

from edge_app import lungs
from edge_app.graph_names import FEATURES, HEATMAP, LOGITS, OOD_RESIDUAL, OOD_WHITENED, POOL
from edge_app.model_card import ModelCard
from edge_app.tflite_metadata import CARD_METADATA_NAME, packed, write_metadata
from train import models

# variant -> (Keras model it is converted from, conversion recipe)
VARIANT_SOURCES = {
    "fp32": ("trained", "fp32"), "dynamic": ("trained", "dynamic"), "fp16": ("trained", "fp16"),
    "int8": ("trained", "int8"), "int8-mixed": ("trained", "int8-mixed"), "qat": ("qat", "int8"),
    "pruned-fp32": ("pruned", "fp32"), "pruned-int8": ("pruned", "int8"), "pruned-qat": ("pqat", "int8"),
}
VARIANTS = tuple(VARIANT_SOURCES)
BASE_VARIANTS = ("fp32", "dynamic", "fp16", "int8", "qat")
RECIPES = ("fp32", "dynamic", "fp16", "int8", "int8-mixed")


def convert(model, recipe: str, representative: np.ndarray | None = None, *, int8_io: str = "int8",
            linear_percentile: float | None = None, progress: bool = False) -> bytes:
    """The TFLite flatbuffer of `model` for one recipe (representative: model inputs, int8 only).

    A quantisation-aware-trained model takes its int8 ranges from its fake-quantisation nodes;
    the representative sample still calibrates what QAT did not cover (the heat-map branch).
    `linear_percentile` (int8 only): the linear activations' ranges from percentiles, not the
    extremes (`_int8_linear_percentile`); None or 100: calibration's min/max everywhere.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown conversion recipe {recipe!r}; known: {RECIPES}")
    converter = _converter(model)
    if recipe == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif recipe == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        return _float32_vectors(converter.convert(), _converter(model).convert())
    elif recipe in ("int8", "int8-mixed"):
        if representative is None or not len(representative):
            raise ValueError("int8 conversion needs a representative sample of model inputs")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [x[None].astype(np.float32)]
            for x in tqdm(representative, desc="calibrating", unit="img", disable=not progress))
        if recipe == "int8-mixed":
            return _mixed(converter)
        if linear_percentile is not None and linear_percentile < 100:
            return _int8_linear_percentile(converter, representative, linear_percentile, int8_io)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter.convert()


def _float32_vectors(fp16_model: bytes, fp32_model: bytes) -> bytes:
    """The float16 file with its one-dimensional constants (the BatchNorm-folded biases, the OOD
    mean) back in float32, taken from the float32 file of the same model: each such constant's
    DEQUANTIZE op is dropped and its output becomes the float32 constant. Kernels stay float16.

    Why (docs/RESULTS.md): the folded biases reach +-50, where float16's step is 0.03, and their
    rounding moved the logits systematically (about +0.04 / -0.05 on pneumonia / COVID-19), enough
    to change images the Keras model decided by a margin of 0.01. The biases are 1-2 % of the
    weights. A float32 constant is matched by its float16 rounding, which must be unique.
    """
    from edge_app.tflite_metadata import _schema

    schema = _schema()
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    reference = schema.ModelT.InitFromPackedBuf(bytearray(fp32_model), 0)
    originals: dict[bytes, set[bytes]] = {}
    for tensor in reference.subgraphs[0].tensors:
        data = reference.buffers[tensor.buffer].data
        if tensor.type == schema.TensorType.FLOAT32 and len(tensor.shape) == 1 and data is not None and len(data):
            values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32)
            originals.setdefault(values.astype(np.float16).tobytes(), set()).add(values.tobytes())
    model = schema.ModelT.InitFromPackedBuf(bytearray(fp16_model), 0)
    graph = model.subgraphs[0]
    kept = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        source = graph.tensors[int(op.inputs[0])]
        if (max(code.builtinCode, code.deprecatedBuiltinCode) == dequantize
                and source.type == schema.TensorType.FLOAT16 and len(source.shape) == 1):
            matches = originals.get(np.asarray(model.buffers[source.buffer].data, np.uint8).tobytes(), set())
            if len(matches) != 1:
                raise ValueError(f"float16 constant {source.name!r} has {len(matches)} float32 originals")
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(next(iter(matches)), np.uint8)
            model.buffers.append(buffer)
            graph.tensors[int(op.outputs[0])].buffer = len(model.buffers) - 1
            continue
        kept.append(op)
    graph.operators = kept
    return packed(model)


FLOAT_OPS = ("DEPTHWISE_CONV_2D",)   # kept float in int8-mixed, with every activation-free convolution


def _mixed(converter) -> bytes:
    """int8, calibrated once, except depthwise convolutions and convolutions without an activation
    (MobileNetV2's linear-bottleneck projections), which run in float.

    Why (TFLite's QuantizationDebugger and per-layer float fallbacks on the trained MobileNetV2 0.5):
    the projections' outputs have no ReLU6 to bound them, so their int8 ranges are 30-155 wide and
    their rounding has a bias that adds up to a systematic logit shift (-0.73 on `normal`); the
    depthwise layers have the largest rounding error per scale step (2-3x the rounding floor).
    The classifier head, the heat map and the OOD outputs are not the cause: keeping them float,
    or dropping them, changes nothing.
    """
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter,
                                                         debug_dataset=converter.representative_dataset)
    linear = linear_conv_outputs(debugger.get_nondebug_quantized_model())
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS),
                                                                     denylisted_nodes=linear)
    return debugger.get_nondebug_quantized_model()


def linear_conv_outputs(model_bytes: bytes, ops: tuple[str, ...] = ("CONV_2D",)) -> list[str]:
    """Names of the output tensors of the `ops` (CONV_2D, ADD, ...) that have no fused activation,
    the graph's own outputs left out."""
    from edge_app.tflite_metadata import _schema

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    codes = {getattr(schema.BuiltinOperator, op) for op in ops}
    return [graph.tensors[int(op.outputs[0])].name.decode() for op in graph.operators
            if max(model.operatorCodes[op.opcodeIndex].builtinCode,
                   model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) in codes
            and op.builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.NONE
            and int(op.outputs[0]) not in set(int(o) for o in graph.outputs)]


LINEAR_OPS = ("CONV_2D", "ADD")   # MobileNetV2's linear-bottleneck projections and residual sums
CLASS_MAPS = "class_maps"         # the heat map's per-class maps (`with_heatmap`): their peaks are what it shows


def _int8_linear_percentile(converter, representative: np.ndarray, percentile: float, int8_io: str) -> bytes:
    """Full-integer int8 whose linear activations (outputs of convolutions and sums without a fused
    activation: no ReLU6 bounds them) are quantised over their [100 - p, p] percentiles on the
    representative images instead of their extremes; every other range is calibration's min/max,
    the heat map's class maps' too (their peaks are what it shows).

    Why (convert.diagnose on the default model): a projection's range is set by a few values, up
    to 3x its 99.99th percentile and by one channel in block 5, so its int8 step is 0.05-0.12 of a
    standard deviation (and TFLite's calibration gives a projection that feeds a residual sum the
    sum's range). Measured on three trained models (docs/RESULTS.md): p = 99.99 flips fewer referral
    decisions against Keras and moves P(abnormal) less; p = 100 (each tensor's own extremes) does
    not help. Calibration and quantisation are TFLite's own (calibrate only, then `mlir_quantize`,
    as TFLiteConverter and its QuantizationDebugger do); only the linear activations' ranges change.
    """
    from tensorflow.lite.python import convert as tflite_convert

    from edge_app.tflite_metadata import _schema

    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True   # noqa: SLF001 - TFLite's own debugger does the same
    calibrated = converter.convert()
    linear = [name for name in linear_conv_outputs(calibrated, LINEAR_OPS) if f"/{CLASS_MAPS}/" not in name]
    ranges = _percentile_ranges(calibrated, representative, linear, percentile)
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    for tensor in model.subgraphs[0].tensors:
        q, name = tensor.quantization, tensor.name.decode()
        if name in ranges and q is not None and q.min is not None and len(q.min) == 1:
            low, high = ranges[name]
            q.min, q.max = [float(max(q.min[0], low))], [float(min(q.max[0], high))]
    io = tf.int8 if int8_io == "int8" else tf.float32   # as TFLiteConverter quantises a calibrated model
    return tflite_convert.mlir_quantize(packed(model), input_data_type=io, output_data_type=io)


def _percentile_ranges(float_model: bytes, inputs: np.ndarray, names: list[str],
                       percentile: float) -> dict[str, tuple[float, float]]:
    """The [100 - p, p] percentiles of each named tensor's values over `inputs`, run through the
    float model by TFLite's reference kernels (no delegate: every intermediate tensor kept). Exact:
    each image's share of the extreme values is kept, so no tensor is held whole."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=float_model, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    index = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    image = interpreter.get_input_details()[0]["index"]
    low = {n: [] for n in names}
    high = {n: [] for n in names}
    sizes = {}
    for x in inputs:
        interpreter.set_tensor(image, x[None].astype(np.float32))
        interpreter.invoke()
        for n in names:
            values = interpreter.get_tensor(index[n]).reshape(-1)
            sizes[n] = values.size
            k = min(values.size, int(np.ceil(values.size * len(inputs) * (100 - percentile) / 100)) + 1)
            low[n].append(np.partition(values, k - 1)[:k])
            high[n].append(np.partition(values, values.size - k)[values.size - k:])
    result = {}
    for n in names:
        total = sizes[n] * len(inputs)
        rank = (100 - percentile) / 100 * (total - 1)   # numpy's linear percentile, from each end
        lows, highs = np.sort(np.concatenate(low[n])), np.sort(np.concatenate(high[n]))[::-1]
        result[n] = (_interpolated(lows, rank), _interpolated(highs, rank))
    return result


def _interpolated(sorted_values: np.ndarray, rank: float) -> float:
    i = int(np.floor(rank))
    j = min(i + 1, len(sorted_values) - 1)
    return float(sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (rank - i))


def _converter(model) -> tf.lite.TFLiteConverter:
    """A converter whose signature names the outputs after the model's output layers
    (edge_app.graph_names, also for tfmot's `quant_logits`), with a batch of one image as the
    device feeds it."""
    spec = tf.TensorSpec((1, *model.input.shape[1:]), tf.float32, name="image")
    names = [name.split("/")[0].removeprefix("quant_") for name in model.output_names]

    @tf.function(input_signature=[spec])
    def serve(image):
        outputs = model(image, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(names, outputs))

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)


def with_card(model_bytes: bytes, card: ModelCard, variant: str) -> bytes:
    """The model with the card (marked with its variant) embedded as TFLite metadata, and the lung
    segmenter where the card's input crops to the lung field (edge_app.lungs)."""
    card = dataclasses.replace(card, variant=variant)
    with_card = write_metadata(model_bytes, CARD_METADATA_NAME, card.to_json().encode())
    return lungs.embed(with_card, card.input)   # the lung segmenter its preprocessing crops with, if any


def with_heatmap(model):
    """The model with a second output, `heatmap`: a class-activation map computed in the graph.

    The classifier ends in global average pooling and one dense layer, so each logit is the
    spatial mean of a 1x1 convolution of the last feature map with that class's dense weights
    (Zhou et al., 2016). The map shown is the probability-weighted sum of the class maps, kept
    positive: where the evidence for the model's answer lies. Only
    elementwise, reduction and convolution ops, so it runs on the GPU delegate too; the device
    scales it to [0, 1] (a division in the graph breaks int8 models on an all-black image).
    """
    import tf_keras as keras

    kernel = kernel_of(models.head_layer(model, LOGITS))
    features = models.head_layer(model, FEATURES).output
    cam_conv = keras.layers.Conv2D(kernel.shape[1], 1, use_bias=False, dtype="float32", name=CLASS_MAPS)
    class_maps = cam_conv(tf.cast(features, tf.float32))
    cam_conv.set_weights([kernel[None, None]])
    logits = model.output

    def weighted_map(inputs):
        maps, scores = inputs
        probs = tf.nn.softmax(scores)
        return tf.nn.relu(tf.reduce_sum(maps * probs[:, None, None, :], axis=-1))

    heatmap = keras.layers.Lambda(weighted_map, name=HEATMAP)([class_maps, logits])
    return keras.Model(model.input, [logits, heatmap], name=model.name)


def device_model(model, detector=None):
    """What the device runs: logits, the heat map and, given the run's OOD detector, its parts."""
    with_map = with_heatmap(model)
    return with_map if detector is None else with_ood_parts(with_map, detector)


def with_ood_parts(model, detector):
    """The device model with two more outputs from which the device computes train.ood's score
    as the sum of their squares (`edge_app.classifier.ood_score_of`):

    `ood_whitened`: the centred pooled features on the principal directions, divided by their
    standard deviations; `ood_residual`: what the principal directions leave of the centred
    features, divided by the square root of the residual variance. Only dense layers,
    subtractions and multiplications by constants: every variant carries them, int8 too, each
    output with its own quantisation scale (squaring and summing inside an int8 graph does not
    survive: the residual is a small difference of large sums).
    """
    import tf_keras as keras

    pooled = tf.cast(models.head_layer(model, POOL).output, tf.float32)
    mean = detector.mean.astype(np.float32)
    std = np.sqrt(detector.variances).astype(np.float32)
    whitening = (detector.components / std).astype(np.float32)                  # (d, k): U / std
    whiten = keras.layers.Dense(whitening.shape[1], dtype="float32", name=OOD_WHITENED)
    whitened = whiten(pooled)            # every component at unit variance: one int8 scale fits all
    whiten.set_weights([whitening, -mean @ whitening])
    reconstruct = keras.layers.Dense(mean.shape[0], use_bias=False, dtype="float32", name="ood_reconstruct")
    reconstructed = reconstruct(whitened)                                       # U U^T (f - mean)
    reconstruct.set_weights([(detector.components * std).T.astype(np.float32)])
    inverse_residual_std = np.float32(1.0 / np.sqrt(detector.residual_variance))
    residual = keras.layers.Lambda(lambda a: (a[0] - mean - a[1]) * inverse_residual_std,
                                   name=OOD_RESIDUAL)([pooled, reconstructed])
    return keras.Model(model.input, [*model.outputs, whitened, residual], name=model.name)


def kernel_of(layer) -> np.ndarray:
    """A layer's kernel variable, also through a tfmot wrapper (whose inner layer's `kernel`
    attribute is the fake-quantised tensor, not the variable)."""
    return next(w for w in layer.weights
                if w.name.split("/")[-1].split(":")[0] in ("kernel", "depthwise_kernel")).numpy()


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def weight_sparsity(model_bytes: bytes) -> float:
    """Fraction of exact zeros in the weights of the file's convolutions and dense layers, as
    stored (int8, float16 or float32; behind a DEQUANTIZE for float16 weights)."""
    from edge_app.tflite_metadata import _schema

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    op_name = lambda op: codes.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                                       model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode))
    producer = {int(op.outputs[0]): op for op in graph.operators if op_name(op) == "DEQUANTIZE"}
    dtypes = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    zeros = total = 0
    for op in graph.operators:
        if op_name(op) not in WEIGHTED_OPS:
            continue
        index = int(op.inputs[1])
        if index in producer:
            index = int(producer[index].inputs[0])
        tensor = graph.tensors[index]
        raw = model.buffers[tensor.buffer].data
        if raw is None or not len(raw):
            continue
        dtype = {"INT8": np.int8, "FLOAT16": np.float16, "FLOAT32": np.float32}[dtypes[tensor.type]]
        values = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), dtype)
        zeros += int((values == 0).sum())
        total += values.size
    return zeros / total if total else 0.0
