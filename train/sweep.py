"""python -m train.sweep: one recipe trained with several seeds (and held-out sources), one run each.

    python -m train.sweep --data ../shared/data/cxr --config configs/X.toml --seeds 1 2 3 \\
        [--holdout-source kermany ...] --out artifacts/sweep-X [-- more python -m train flags]

Runs `python -m train` once per (held-out source, seed) in a fresh process each (TensorFlow frees
its memory only at exit), skips runs that already finished, and ends with `train.compare`'s tables:
a recipe is judged by its mean and spread over seeds, never by one run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from train.compare import recipe_table, table


def run_name(seed: int, holdout: str | None) -> str:
    return f"{'loso-' + holdout + '-' if holdout else ''}s{seed}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--config", help="the recipe (a TrainConfig TOML); default: the TrainConfig defaults "
                   "(no lung-field crop; real data's recipe, which make train uses, is configs/cxr.toml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--holdout-source", dest="holdouts", action="append", default=[],
                   help="also train without this source (repeatable); without any: in-distribution runs only")
    p.add_argument("--in-distribution", action="store_true",
                   help="with --holdout-source: also the runs that hold nothing out")
    p.add_argument("--out", required=True, type=Path, help="folder of the runs (one sub-folder per run)")
    args, train_args = p.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    holdouts = ([None] if not args.holdouts or args.in_distribution else []) + args.holdouts
    runs = [(h, s) for h in holdouts for s in args.seeds]
    done = []
    for i, (holdout, seed) in enumerate(runs, 1):
        out = args.out / run_name(seed, holdout)
        done.append(out)
        if (out / "reports" / "metrics.json").is_file():
            print(f"[{i}/{len(runs)}] {out}: already trained", flush=True)
            continue
        cmd = [sys.executable, "-m", "train", "--data", args.data, "--out", str(out), "--seed", str(seed),
               "--no-progress", *(["--config", args.config] if args.config else []),
               *(["--holdout-source", holdout] if holdout else []), *train_args]
        print(f"[{i}/{len(runs)}] {' '.join(cmd)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(out / "train.log", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        print(f"[{i}/{len(runs)}] {'done' if code == 0 else f'FAILED (exit {code}, see {out}/train.log)'} "
              f"in {(time.time() - started) / 60:.1f} min", flush=True)
        if code:
            return code
    print(table(done) + "\n\n" + recipe_table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
