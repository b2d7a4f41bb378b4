"""python -m train --model NAME --data DIR --out artifacts/RUN [--config FILE] [options]
   python -m train adapt --run artifacts/RUN --data LOCAL_DIR --out artifacts/RUN-site [options]"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

from edge_app import native_logs
from edge_app.preprocess import BORDERS, CONTRASTS, LUNG_CROPS
from train.config import STRATEGIES, AdaptConfig, TrainConfig
from edge_app.labels import TASKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0] +
                                "\nTrains a chest X-ray classifier and evaluates it for screening.")
    p.add_argument("--config", help="TOML or JSON file with any TrainConfig settings")
    p.add_argument("--out", required=True, help="run folder, e.g. artifacts/mobilenet_v2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help=native_logs.VERBOSE_HELP)
    p.add_argument("--model", help="registered model name (train.models.REGISTRY)")
    p.add_argument("--data", help="dataset folder (any supported layout)")
    p.add_argument("--task", choices=list(TASKS), help="the classes: " +
                   "; ".join(f"{task}: {', '.join(labels)}" for task, labels in TASKS.items()))
    p.add_argument("--weights", help="imagenet | none | path to a .h5 weights file (default: none for "
                   "models without ImageNet weights, e.g. cnn; imagenet for the others)")
    p.add_argument("--weights-dir", dest="weights_dirs", action="append",
                   help="folder holding Keras weight files (repeatable); ~/.keras/models is always searched")
    p.add_argument("--alpha", type=float, help="MobileNetV2 width (0.35, 0.5, 1.0, ...)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--input-contrast", choices=CONTRASTS, help="contrast step of the preprocessing")
    p.add_argument("--input-borders", choices=BORDERS, help="trim uniform borders first, or keep them")
    p.add_argument("--lung-crop", choices=LUNG_CROPS, help="crop to the lung field found by --lung-model")
    p.add_argument("--lung-model", help="lung segmenter .tflite (python -m train.lungs)")
    p.add_argument("--lung-margin", type=float, help="added around the lungs' box on every side, a share of "
                   "its height and width (default 0.1)")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--epochs", type=int)
    p.add_argument("--fine-tune-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--loss", choices=["crossentropy", "focal"])
    p.add_argument("--holdout-source", help="leave this data source (manifest source_repo, or a short name "
                   "of train/data/sources.py: kermany, ieee8023, rsna-normal, rsna-pneumonia) out of training "
                   "and evaluate on all its images: leave-one-source-out")
    p.add_argument("--seed", type=int)
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for AUC intervals (0: none)")
    return p.parse_args(argv)


def parse_adapt_args(argv):
    p = argparse.ArgumentParser(prog="python -m train adapt", description="Adapts a trained run to a "
                                "site's own labelled images (train.adapt) and reports before/after.")
    p.add_argument("--run", required=True, help="the trained run folder")
    p.add_argument("--data", required=True, help="the site's images (any supported dataset layout)")
    p.add_argument("--out", required=True, help="new run folder for the adapted model")
    p.add_argument("--per-class", type=int, nargs="+", default=[0],
                   help="local training images per class (0: all); several values: a learning curve, "
                   "one adapted run per value under --out")
    p.add_argument("--data-root", help="the run's own data folder, where it is not where training found it "
                   "(default: the model card's, relative to the run folder)")
    p.add_argument("--source", dest="sources", action="append",
                   help="use only this data source of --data (manifest source_repo or a short name, as for "
                   "--holdout-source; repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--fine-tune-layers", type=int, help="also unfreeze the top N backbone layers")
    p.add_argument("--replay", type=int, help="run training images per local image (0: none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help=native_logs.VERBOSE_HELP)
    return p.parse_args(argv)


def adapt_main(argv) -> int:
    args = parse_adapt_args(argv)
    names = {f.name for f in fields(AdaptConfig)}
    cfg = AdaptConfig(**{k: v for k, v in vars(args).items()
                         if k in names - {"per_class"} and v is not None})
    from train import adapt  # imports TensorFlow

    if len(args.per_class) > 1:
        adapt.learning_curve(args.run, args.data, args.out, args.per_class, cfg, data_root=args.data_root,
                             progress=not args.no_progress)
    else:
        adapt.adapt(args.run, args.data, args.out, replace(cfg, per_class=args.per_class[0]),
                    data_root=args.data_root, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    native_logs.quiet("--verbose" in argv)  # before TensorFlow loads
    if argv[:1] == ["adapt"]:
        return adapt_main(argv[1:])
    args = parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    config = TrainConfig.from_file(args.config, **overrides) if args.config else TrainConfig(**overrides)
    if not config.data:
        print("error: no dataset: pass --data DIR or set data in --config", file=sys.stderr)
        return 2
    from train import trainer  # imports TensorFlow: after argument errors are reported

    trainer.run(config, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
