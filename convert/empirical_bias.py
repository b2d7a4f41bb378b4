"""Empirical bias correction of a full-integer int8 file (Nagel et al., "Data-Free Quantization", 2019,
section 4.2, measured on data): op by op in execution order, the per-channel mean of each convolution's
and dense layer's int8 output over calibration images, every earlier op already corrected, against the
float model's mean of the same tensor; the difference is taken off the op's int32 bias.

Why (docs/RESULTS.md, 2026-12-06 night): after the weight-rounding correction (convert.bias_correction)
the full-integer default still moved the logits by -0.15 to -0.24 on `normal` and +0.18 on COVID-19,
on val and test, in every seed; 80 of 84 referral decisions it flipped went towards "refer". The
weights alone no longer shift the logits: rounding every activation to int8 does, through the
nonlinearities (quantisation noise that a ReLU6 rectifies becomes a bias). A constant taken off the
logits removes only part of it (the shift is larger on normal films than on COVID-19); taken off where
it arises it goes, and the noise around it shrinks too.

A fused ReLU6 (or ReLU) passes a bias change only where its input is in the linear part: the measured
shift of the output is divided by the float output's share of values there (at least 5 %).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

CORRECTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
MIN_ACTIVE_SHARE = 0.05


def corrected(int8_model: bytes, float_model: bytes, inputs: np.ndarray, *,
              progress: bool = False) -> tuple[bytes, dict]:
    """`int8_model` with each corrected op's int32 bias moved by minus its measured mean shift against
    `float_model` (the same graph in float: the same corrected ops in the same order) over `inputs`
    (float model inputs); and a report of the shift removed per op."""
    from edge_app.tflite_metadata import _schema, packed

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(int8_model), 0)
    graph = model.subgraphs[0]
    ops, float_ops = _corrected_ops(model, schema), _corrected_ops(schema.ModelT.InitFromPackedBuf(
        bytearray(float_model), 0), schema)
    if [code for code, _ in ops] != [code for code, _ in float_ops]:
        raise ValueError(f"the float model's {len(float_ops)} convolutions and dense layers are not the int8 "
                         f"file's {len(ops)}: it is not the same graph")
    ops = [op for _, op in ops]
    outputs = [int(op.outputs[0]) for op in ops]
    linear_parts = {int(op.outputs[0]): _linear_part(op, schema) for _, op in float_ops}
    float_means, shares = _channel_means(float_model, list(linear_parts), inputs, linear_parts)
    report = []
    for op, output, (_, float_op) in tqdm(list(zip(ops, outputs, float_ops)), desc="empirical bias correction",
                                          unit="op", disable=not progress):
        reference = int(float_op.outputs[0])
        shift = _channel_means(packed(model), [output], inputs, {})[0][output] - float_means[reference]
        part = linear_parts[reference]
        pre_activation = shift / np.maximum(shares[reference], MIN_ACTIVE_SHARE) if part else shift
        input_scale = graph.tensors[int(op.inputs[0])].quantization.scale[0]
        weight_scales = np.asarray(graph.tensors[int(op.inputs[1])].quantization.scale, np.float64)
        buffer = model.buffers[graph.tensors[int(op.inputs[2])].buffer]
        bias = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), np.int32)
        bias = bias - np.round(pre_activation / (input_scale * weight_scales)).astype(np.int32)
        buffer.data = np.frombuffer(bias.astype(np.int32).tobytes(), np.uint8)
        report.append({"op": graph.tensors[output].name.decode().split(";")[0],
                       "mean_abs_shift": float(np.abs(shift).mean()), "max_abs_shift": float(np.abs(shift).max())})
    return packed(model), {"images": int(len(inputs)), "ops": report}


def _corrected_ops(model, schema) -> list[tuple[int, object]]:
    """(op code, op) of the graph's convolutions and dense layers with a bias, in execution order."""
    codes = {getattr(schema.BuiltinOperator, op) for op in CORRECTED_OPS}
    found = []
    for op in model.subgraphs[0].operators:
        opcode = model.operatorCodes[op.opcodeIndex]
        code = max(opcode.builtinCode, opcode.deprecatedBuiltinCode)
        if code in codes and len(op.inputs) > 2 and op.inputs[2] >= 0:
            found.append((code, op))
    return found


def _linear_part(op, schema):
    """The fused activation's linear interval (low, high), or None when there is none."""
    fused = getattr(op.builtinOptions, "fusedActivationFunction", schema.ActivationFunctionType.NONE)
    return {schema.ActivationFunctionType.RELU: (0.0, np.inf), schema.ActivationFunctionType.RELU6: (0.0, 6.0),
            schema.ActivationFunctionType.RELU_N1_TO_1: (-1.0, 1.0)}.get(fused)


def _channel_means(model_bytes: bytes, tensors: list[int], inputs: np.ndarray,
                   linear_parts: dict) -> tuple[dict, dict]:
    """Per tensor (its index in the graph): its per-channel (last axis) mean over `inputs`, dequantised,
    and the share of its values strictly inside `linear_parts[tensor]` (where one is given). TFLite's
    reference kernels, every intermediate tensor kept."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edge_app.runtime import dequantize, quantize

    interpreter = Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    image = interpreter.get_input_details()[0]
    sums = {t: 0.0 for t in tensors}
    inside = {t: 0.0 for t in tensors if linear_parts.get(t)}
    counts = {t: 0 for t in tensors}
    for x in inputs:
        interpreter.set_tensor(image["index"], quantize(x[None], image))
        interpreter.invoke()
        for t in tensors:
            values = dequantize(interpreter.get_tensor(t), details[t])
            values = values.reshape(-1, values.shape[-1])
            sums[t] = sums[t] + values.sum(axis=0, dtype=np.float64)
            counts[t] += values.shape[0]
            if t in inside:
                low, high = linear_parts[t]
                inside[t] = inside[t] + ((values > low) & (values < high)).sum(axis=0)
    return {t: sums[t] / counts[t] for t in tensors}, {t: inside[t] / counts[t] for t in inside}

