"""python -m convert artifacts/RUN [--variants fp32 int8 ...] [--prune 0.5] [--gates FILE] [--data-root DIR]"""
from __future__ import annotations

import argparse
import sys

from edge_app import native_logs


PARITY_FAILED = 3   # exit status of a conversion whose parity gate failed (make all goes on past it)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    native_logs.quiet("--verbose" in argv)  # before TensorFlow loads
    from benchmarks.gates import GATES_FILE
    from convert.config import INT8_IO, ConvertConfig
    from convert.export import VARIANTS

    defaults = ConvertConfig()
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Export a training run to TFLite variants, check them on the GPU "
                                            "accelerator and gate them on parity.")
    p.add_argument("run", help="training run folder (artifacts/RUN)")
    p.add_argument("--data-root", help="the run's data folder, where it is not where training found it "
                   "(default: the model card's, relative to the run folder)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="default: fp32 dynamic fp16 int8 qat, and the pruned ones with --prune")
    p.add_argument("--prune", type=float, metavar="SPARSITY", help="target sparsity of the pruned variants, e.g. 0.5")
    p.add_argument("--gates", default=str(GATES_FILE),
                   help="gates file whose [conversion.VARIANT] tables hold the parity budgets")
    p.add_argument("--int8-io", choices=INT8_IO, default=defaults.int8_io,
                   help="input/output type of the full-integer variants")
    p.add_argument("--representative-per-class", type=int, default=defaults.representative_per_class)
    p.add_argument("--no-bias-correction", action="store_true",
                   help="post-training int8 and fp16 without the weight-rounding bias correction "
                        "(convert.bias_correction)")
    p.add_argument("--no-empirical-bias-correction", action="store_true",
                   help="post-training int8 without the op-by-op correction of its remaining mean error "
                        "against the float model (convert.empirical_bias)")
    p.add_argument("--equalise", type=float, default=defaults.equalise, metavar="ALPHA",
                   help="post-training int8: rescale the residual streams' channels first (convert.equalisation; "
                        "ALPHA 1: activations alone, 0.5: halfway to the weights)")
    p.add_argument("--linear-percentile", type=float, default=defaults.linear_percentile, metavar="P",
                   help="post-training int8: quantise linear activations over their [100-P, P] percentiles "
                        "(100: calibration's min/max)")
    p.add_argument("--qat-epochs", type=int, default=defaults.qat_epochs)
    p.add_argument("--qat-learning-rate", type=float, default=defaults.qat_learning_rate)
    p.add_argument("--qat-objective", choices=("distill", "labels"), default=defaults.qat_objective,
                   help="QAT (and pruned QAT) fine-tunes towards the float model's logits (distill: a copy) "
                        "or the labels with the run's loss (a new model)")
    p.add_argument("--prune-epochs", type=int, default=defaults.prune_epochs)
    p.add_argument("--pqat-epochs", type=int, default=defaults.pqat_epochs)
    p.add_argument("--steps-per-epoch", type=int, help="cap the fine-tune epochs (default: the whole train split)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU accelerator check")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help=native_logs.VERBOSE_HELP)
    args = p.parse_args(argv)
    try:
        cfg = ConvertConfig(representative_per_class=args.representative_per_class, int8_io=args.int8_io,
                            bias_correction=not args.no_bias_correction,
                            empirical_bias_correction=not args.no_empirical_bias_correction,
                            equalise=args.equalise, linear_percentile=args.linear_percentile,
                            qat_epochs=args.qat_epochs, qat_learning_rate=args.qat_learning_rate,
                            qat_objective=args.qat_objective, prune_sparsity=args.prune, prune_epochs=args.prune_epochs,
                            pqat_epochs=args.pqat_epochs, steps_per_epoch=args.steps_per_epoch)
    except ValueError as exc:
        p.error(str(exc))

    from convert.conversion import ParityError, convert_run

    try:
        results = convert_run(args.run, variants=args.variants, cfg=cfg, gates_file=args.gates,
                              progress=not args.no_progress, gpu_check=not args.no_gpu, data_root=args.data_root)
    except ParityError as exc:       # every file and report is written: they can be read
        print(f"{exc}\n(a result, not a crash: every file and reports/conversion.md are written; "
              "`make release` refuses a variant that failed its gate)", file=sys.stderr)
        return PARITY_FAILED
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, v in results["variants"].items():
        figures = "  ".join(f"{split}: agreement {s['agreement']:.4f}, {s['decisions_flipped']} flipped, "
                            f"max |dp| {s['max_abs_dp_abnormal']:.3f}" for split, s in v["splits"].items())
        ratio = "" if v["size_vs_fp32"] is None else f" ({v['size_vs_fp32']:.3f}x)"
        print(f"{name:12s} {v['bytes'] / 1024:8.0f} KiB{ratio}  {figures}  "
              f"{'pass' if v['gate']['passed'] else 'FAIL'}")
    for name, why in results["refused"].items():
        print(f"{name:12s} refused: {why}")
    print(f"reports: {args.run}/reports/conversion.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
