"""The Keras model as the baseline, in its own process: TensorFlow's thread pools and memory
must not disturb the LiteRT timings, and its thread count is fixed once per process.

    python -m benchmarks.keras_baseline RUN --threads 2 [--metrics] [--max-time 1] [--min-rounds 5] [--data-root DIR]

Prints one JSON object: raw and pipeline latency (same fields as pytest-benchmark's), load time,
peak resident memory, and with --metrics the test-split metrics (convert.parity.evaluate).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.keras_baseline", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--metrics", action="store_true")
    p.add_argument("--max-time", type=float, default=1.0)
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--data-root", type=Path, help="the run's data folder (default: the model card's)")
    args = p.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from benchmarks.probe import peak_rss_mib
    from benchmarks.stats import time_calls
    from benchmarks.testset import Split
    from convert.parity import headline
    from convert import parity
    from edge_app import decision, preprocess
    from train.trainer import load_run

    split = Split.of_run(args.run, args.data_root)
    card, spec = split.card, split.card.input
    before = peak_rss_mib()
    t0 = time.perf_counter()
    model, _, _ = load_run(args.run)   # and the run's lung segmenter, where its preprocessing crops
    serve = tf.function(lambda x: model(x, training=False))
    load_ms = 1000.0 * (time.perf_counter() - t0)

    def pipeline(path):
        x = preprocess.preprocess(path, spec, strict=True)
        probs = decision.calibrated_probabilities(serve(x[None]).numpy()[0], card.temperature)
        return decision.triage(float(decision.abnormal_probability(probs)), card.abnormal_threshold)

    x = tf.constant(preprocess.preprocess(split.pipeline_images()[0], spec)[None])  # as the LiteRT raw benchmark
    images = itertools.cycle(split.pipeline_images())
    timing = dict(max_time=args.max_time, min_rounds=args.min_rounds)
    out = {"threads": args.threads, "load_ms": load_ms,
           "raw": time_calls(lambda: serve(x).numpy(), **timing),
           "pipeline": time_calls(lambda: pipeline(next(images)), **timing),
           "rss_before_load_mib": before, "peak_rss_mib": peak_rss_mib()}
    if args.metrics:
        logits = model.predict(split.inputs(progress=False), batch_size=32, verbose=0)
        out["metrics"] = headline(parity.evaluate(logits, split.y, card))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
