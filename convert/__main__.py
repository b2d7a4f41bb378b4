"""python -m convert artifacts/RUN [--variants fp32 int8 ...] [--budget int8=1.0 ...]"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from convert.export import VARIANTS

    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Export a training run to TFLite variants and gate them on parity.")
    p.add_argument("run", help="training run folder (artifacts/RUN)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--budget", action="append", default=[], metavar="VARIANT=POINTS",
                   help="largest allowed macro-F1 drop in points for a variant")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    budgets = {}
    for item in args.budget:
        name, _, points = item.partition("=")
        budgets[name] = float(points)

    from convert.conversion import ParityError, convert_run

    try:
        results = convert_run(args.run, variants=args.variants, budgets=budgets,
                              progress=not args.no_progress)
    except (FileNotFoundError, ParityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, v in results["variants"].items():
        print(f"{name:8s} {v['bytes'] / 1024:8.0f} KiB  macro-F1 {v['metrics']['macro_f1']:.4f}  "
              f"agreement {v['parity']['agreement']:.4f}  {'pass' if v['parity']['passed'] else 'FAIL'}")
    print(f"reports: {args.run}/reports/conversion.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
