"""The low-detail warning's threshold: the model card's thresholds["detail"].

The device warns ("too little fine detail", decision.LOW_DETAIL) when the model's square holds less
fine detail (`edge_app.preprocess.detail`) than all but 1 % of any source's validation squares: a
blurred film, or one enlarged from a small copy, which the model clears far more often than the
same film as stored (benchmarks/robustness.py). Training fits it on its cached squares; a run
trained before gets it once with

    python -m train.detail artifacts/RUN [artifacts/RUN ...] [--data-root DIR]

(then convert the run again: every converted file carries the card's thresholds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_app import decision, lungs, preprocess
from edge_app.model_card import ModelCard


def fit(squares: dict[str, np.ndarray], val_sources: list[str] | None = None,
        quantile: float = decision.LOW_DETAIL_QUANTILE) -> dict:
    """The threshold from squares["val"] ((N, size, size) uint8, `square8`), and the share of each
    split's squares below it. With `val_sources` (one per val square), the lowest of the quantiles of
    the sources with at least 1 / quantile films: the softest source (the set's adult normals,
    docs/RESULTS.md 2026-12-05 evening) is warned about no more often than the others, instead of
    carrying the whole quantile; too few films to estimate it: the quantile of all val."""
    scores = {split: np.array([preprocess.detail(s) for s in images]) for split, images in squares.items()}
    sources = np.asarray(val_sources if val_sources is not None else [""] * len(scores["val"]))
    groups = {str(source): scores["val"][sources == source] for source in sorted(set(sources))}
    threshold = decision.low_detail_threshold(groups.values(), quantile)
    if threshold is None:                      # no source large enough for its own quantile
        threshold = float(np.quantile(scores["val"], quantile))
    return {"threshold": threshold, "val_quantile": quantile,
            "flagged": {split: float((s < threshold).mean()) for split, s in scores.items()},
            **({"val_flagged_per_source": {source: float((group < threshold).mean())
                                           for source, group in groups.items()}} if val_sources is not None else {})}


def add_to_run(run: Path, data_root: Path | None = None, progress: bool = True) -> dict:
    """Fits the threshold on the run's own splits and writes it into model_card.json and
    reports/metrics.json."""
    from train.config import TrainConfig         # lazily: these import TensorFlow
    from train.data import run_splits
    from train.pipeline import load_images

    card_path = run / "model_card.json"
    card = ModelCard.from_json(card_path.read_text())
    if card.input.lung_crop != "none":
        lungs.use(TrainConfig.from_file(run / "config.json").lung_model)
    dataset, _ = run_splits.load(run, data_root)
    records = {split: dataset.split(split) for split in ("val", "test")}
    result = fit({split: load_images(r, card.input, desc=split, progress=progress) for split, r in records.items()},
                 [r.source or "unknown" for r in records["val"]])
    card.thresholds = {**card.thresholds, "detail": result["threshold"]}
    card_path.write_text(card.to_json() + "\n")
    metrics_path = run / "reports" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, "detail": result}, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.detail", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-root", type=Path, help="the data folder, where a run was copied elsewhere")
    args = parser.parse_args(argv)
    for run in args.runs:
        result = add_to_run(run, args.data_root)
        print(f"{run}: detail threshold {result['threshold']:.4f} (val quantile {result['val_quantile']}); "
              "flagged " + ", ".join(f"{s} {v:.1%}" for s, v in result["flagged"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
