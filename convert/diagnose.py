"""python -m convert.diagnose artifacts/RUN: where int8 loses agreement with the Keras model.

Full-integer int8 rounds two things: the (BatchNormalization-folded) weights, and every activation.
This separates them on the run's val split:
- "int8 weights, float activations": the Keras model with exactly TFLite's int8 weights
  (`with_int8_weights`), computed in float: the loss due to weight rounding alone, before and after
  bias correction (convert.bias_correction);
- "input rounding only": the float Keras model on its input rounded to the int8 file's input grid
  (the file quantises the float CLAHE output to 8 bits: a floor no weight or range choice removes);
- "int8": the full-integer model as `python -m convert` makes it (bias-corrected, linear activations
  over percentiles: ConvertConfig.linear_percentile), before and after the empirical bias correction
  (convert.empirical_bias);
each with its class agreement, referral flips, mean logit shift (systematic) and the logits' noise
(the spread of the error around that shift: what a bias correction cannot remove);
and, per linear activation (projection outputs and residual sums, which have no ReLU6 to bound
them), its range as calibration sees it (min/max over the calibration images) against its
0.01-99.99 percentiles and its spread: an int8 step of a large fraction of the standard deviation
means a range set by a few outlying values. Writes reports/int8_diagnosis.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_app import decision, native_logs

LINEAR_SUFFIXES = ("project_BN", "_add")   # MobileNetV2's activations without a ReLU6


def with_int8_weights(model):
    """A copy of `model` whose convolution (BN-folded) and Dense kernels are exactly TFLite's int8
    weights, dequantised: the same float graph, weight rounding only."""
    from convert import bias_correction as bc
    import tf_keras as keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for conv, bn in bc.conv_bn_pairs(model):
        kernel, factor = bc.folded_kernel(conv, bn), bc.fold_factor(conv, bn)
        axes = (0, 1) if isinstance(conv, keras.layers.DepthwiseConv2D) else (0, 1, 2)
        rounded = kernel + bc.rounding_error(kernel, axes)
        safe = np.where(factor == 0, 1.0, factor)   # a zero gamma zeroes the channel either way
        copy.get_layer(conv.name).set_weights([(rounded / safe).astype(np.float32)])
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, *rest = layer.get_weights()
            copy.get_layer(layer.name).set_weights([kernel + bc.rounding_error(kernel, (0,)), *rest])
    return copy


def agreement(logits: np.ndarray, reference: np.ndarray, temperature: float, threshold: float) -> dict:
    """Class agreement, referral decisions flipped and the mean logit shift against the reference."""
    p = lambda z: decision.abnormal_probability(decision.calibrated_probabilities(z, temperature))
    return {"agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "decisions_flipped": int(((p(logits) >= threshold) != (p(reference) >= threshold)).sum()),
            "mean_logit_shift": [float(v) for v in np.mean(logits - reference, axis=0)],
            "logit_noise_sd": float(np.mean(np.std(logits - reference, axis=0))),
            "mean_abs_dp_abnormal": float(np.abs(p(logits) - p(reference)).mean())}


def on_input_grid(flatbuffer: bytes, inputs: np.ndarray) -> np.ndarray:
    """`inputs` rounded to the int8 grid of the file's input (its scale and zero point), as the file's
    quantisation of a float input does; float inputs (no quantisation) come back unchanged."""
    from ai_edge_litert.interpreter import Interpreter

    scale, zero_point = Interpreter(model_content=flatbuffer).get_input_details()[0]["quantization"]
    if not scale:
        return inputs
    levels = np.clip(np.round(inputs / scale) + zero_point, -128, 127)
    return ((levels - zero_point) * scale).astype(np.float32)


def activation_ranges(model, inputs: np.ndarray, *, batch: int = 16) -> list[dict]:
    """Per linear activation: calibration's range, its 0.01/99.99 percentiles, the spread, and the
    int8 step (range / 255) in standard deviations; the channel that sets the range against the next."""
    import tf_keras as keras

    names = [layer.name for layer in model.layers if layer.name.endswith(LINEAR_SUFFIXES)]
    if not names:
        return []
    outputs = keras.Model(model.inputs, [model.get_layer(n).output for n in names]).predict(
        inputs, batch_size=batch, verbose=0)
    rows = []
    for name, out in zip(names, outputs if len(names) > 1 else [outputs]):
        values = out.reshape(-1, out.shape[-1])
        low, high = float(values.min()), float(values.max())
        channel_max = np.sort(np.abs(values).max(axis=0))
        std = float(values.std())
        rows.append({"layer": name, "min": low, "max": high,
                     "p0.01": float(np.percentile(values, 0.01)), "p99.99": float(np.percentile(values, 99.99)),
                     "std": std, "step_in_std": (high - low) / 255 / std if std else float("nan"),
                     "top_channel_max": float(channel_max[-1]),
                     "next_channel_max": float(channel_max[-2]) if len(channel_max) > 1 else float("nan")})
    return rows


def diagnose(run_dir: Path, *, progress: bool = True) -> dict:
    from convert import bias_correction, conversion, empirical_bias, export, parity
    from convert.config import ConvertConfig
    from train import ood

    cfg = ConvertConfig(splits=("val",))
    model, card, _, dataset, splits = conversion._prepare(run_dir, cfg, progress)
    val = splits["val"]
    representative = conversion.representative_inputs(dataset.split("train"), card, cfg, progress)
    corrected = bias_correction.corrected(model, representative)
    compare = lambda logits: agreement(logits, val["keras_logits"], card.temperature, card.abnormal_threshold)
    detector = ood.OodModel.load(run_dir / "ood.npz") if (run_dir / "ood.npz").is_file() else None
    flatbuffer = export.convert(export.device_model(corrected, detector), "int8", representative,
                                int8_io=cfg.int8_io, linear_percentile=cfg.linear_percentile, progress=progress)
    uncorrected = flatbuffer
    if cfg.empirical_bias_correction:
        float_file = export.convert(export.device_model(model, detector), "fp32")
        flatbuffer, _ = empirical_bias.corrected(flatbuffer, float_file, representative, progress=progress)
    return {
        "run": str(run_dir), "split": "val", "images": int(len(val["y"])),
        "int8 weights, float activations": compare(with_int8_weights(model).predict(val["x"], verbose=0)),
        "int8 weights bias-corrected, float activations": compare(
            with_int8_weights(corrected).predict(val["x"], verbose=0)),
        "input rounding only (float model, int8 input grid)": compare(
            model.predict(on_input_grid(flatbuffer, val["x"]), verbose=0)),
        "int8 before the empirical bias correction (weight-rounding correction, percentile ranges)": compare(
            parity.run_variant(uncorrected, val["x"], desc="int8 on val", progress=progress)["logits"]),
        "int8 as python -m convert makes it (and the empirical bias correction)": compare(
            parity.run_variant(flatbuffer, val["x"], desc="int8 on val", progress=progress)["logits"]),
        "linear_activations": activation_ranges(model, representative),
    }


def markdown(result: dict) -> str:
    lines = [f"# Where int8 loses agreement: {result['run']} ({result['split']}, {result['images']} images)", "",
             "| model | class agreement | decisions flipped | mean logit shift | logit noise (sd) | mean \\|ΔP(abnormal)\\| |",
             "|---|---|---|---|---|---|"]
    for name, m in result.items():
        if isinstance(m, dict) and "agreement" in m:
            shift = " / ".join(f"{v:+.3f}" for v in m["mean_logit_shift"])
            lines.append(f"| {name} | {m['agreement']:.2%} | {m['decisions_flipped']} | {shift} | "
                         f"{m['logit_noise_sd']:.3f} | {m['mean_abs_dp_abnormal']:.4f} |")
    lines += ["", "Linear activations (no ReLU6 bounds them): calibration's range against the values' spread.", "",
              "| layer | min | max | p0.01 | p99.99 | std | int8 step / std | largest channel max | next |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['min']:.1f} | {r['max']:.1f} | {r['p0.01']:.1f} | {r['p99.99']:.1f} | "
              f"{r['std']:.2f} | {r['step_in_std']:.3f} | {r['top_channel_max']:.1f} | {r['next_channel_max']:.1f} |"
              for r in result["linear_activations"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    native_logs.quiet("--verbose" in argv)  # before TensorFlow loads
    p = argparse.ArgumentParser(prog="python -m convert.diagnose", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help=native_logs.VERBOSE_HELP)
    args = p.parse_args(argv)
    result = diagnose(args.run, progress=not args.no_progress)
    reports = args.run / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "int8_diagnosis.json").write_text(json.dumps(result, indent=2))
    (reports / "int8_diagnosis.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
