"""The low-detail warning's threshold: the model card's thresholds["detail"].

The device warns ("too little fine detail", decision.LOW_DETAIL) when the model's square holds less
fine detail (`edge_app.preprocess.detail`) than all but 1 % of any source's validation squares: a
blurred film, or one enlarged from a small copy, which the model clears far more often than the
same film as stored (benchmarks/robustness.py). Training fits it on its cached squares; a run
trained before gets it once with

    python -m train.detail artifacts/RUN [artifacts/RUN ...] [--data-root DIR] [--leave-one-source-out]

(then convert the run again: every converted file carries the card's thresholds).
`--leave-one-source-out` asks what a hospital like one source would hear if the model had never seen it:
the threshold refitted without each source in turn, and the share of that source's films below it
(reports/detail_loso.json; the card is left alone).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_app import decision, lungs, preprocess
from edge_app.model_card import ModelCard
from train.data import sources


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
    threshold = _threshold(groups.values(), scores["val"], quantile)
    return {"threshold": threshold, "val_quantile": quantile,
            "flagged": {split: float((s < threshold).mean()) for split, s in scores.items()},
            **({"val_flagged_per_source": {source: float((group < threshold).mean())
                                           for source, group in groups.items()}} if val_sources is not None else {})}


def _threshold(groups, val_scores: np.ndarray, quantile: float) -> float:
    """decision.low_detail_threshold over the sources; no source large enough: the quantile of all val."""
    threshold = decision.low_detail_threshold(groups, quantile)
    return float(np.quantile(val_scores, quantile)) if threshold is None else threshold


def leave_one_source_out(scores, splits, sources, quantile: float = decision.LOW_DETAIL_QUANTILE) -> dict:
    """Per source: the threshold `fit` gives with that source left out of validation, the share of
    the source's films (every split) below it, and the share of the other sources' test films."""
    scores, splits, sources = np.asarray(scores), np.asarray(splits), np.asarray(sources)
    result = {}
    for held in sorted(set(sources)):
        rest_val = (splits == "val") & (sources != held)
        threshold = _threshold([scores[rest_val & (sources == s)] for s in sorted(set(sources[rest_val]))],
                               scores[rest_val], quantile)
        others_test = (splits == "test") & (sources != held)
        result[held] = {"threshold": threshold, "n": int((sources == held).sum()),
                        "held_out_warned": float((scores[sources == held] < threshold).mean()),
                        "other_test_warned": float((scores[others_test] < threshold).mean())}
    return result


def _run_squares(run: Path, data_root: Path | None, splits: tuple[str, ...], progress: bool):
    """(card, {split: records}, {split: squares}) as the run's card decodes them."""
    from train.config import TrainConfig         # lazily: these import TensorFlow
    from train.data import run_splits
    from train.pipeline import load_images

    card = ModelCard.from_json((run / "model_card.json").read_text())
    if card.input.lung_crop != "none":
        lungs.use(TrainConfig.from_file(run / "config.json").lung_model)
    dataset, _ = run_splits.load(run, data_root)
    records = {split: dataset.split(split) for split in splits}
    return card, records, {split: load_images(r, card.input, desc=split, progress=progress)
                           for split, r in records.items()}


def add_to_run(run: Path, data_root: Path | None = None, progress: bool = True) -> dict:
    """Fits the threshold on the run's own splits and writes it into model_card.json and
    reports/metrics.json."""
    card, records, squares = _run_squares(run, data_root, ("val", "test"), progress)
    result = fit(squares, [r.source or "unknown" for r in records["val"]])
    card_path = run / "model_card.json"
    card.thresholds = {**card.thresholds, "detail": result["threshold"]}
    card_path.write_text(card.to_json() + "\n")
    metrics_path = run / "reports" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, "detail": result}, indent=2))
    return result


def print_leave_one_source_out(run: Path, data_root: Path | None = None) -> dict:
    """`leave_one_source_out` over every film of the run's splits -> reports/detail_loso.json."""
    _, records, squares = _run_squares(run, data_root, ("train", "val", "test"), progress=True)
    every = [r for split in records.values() for r in split]
    result = leave_one_source_out([preprocess.detail(s) for split in squares.values() for s in split],
                                  [r.split for r in every], [sources.short_name(r.source) for r in every])
    (run / "reports" / "detail_loso.json").write_text(json.dumps(result, indent=2))
    for held, r in result.items():
        print(f"{run}: {held} held out ({r['n']} films): threshold {r['threshold']:.4f}, its films warned "
              f"{r['held_out_warned']:.1%}, the other sources' test films {r['other_test_warned']:.1%}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.detail", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-root", type=Path, help="the data folder, where a run was copied elsewhere")
    parser.add_argument("--leave-one-source-out", action="store_true",
                        help="refit without each source in turn; write reports/detail_loso.json, leave the card")
    args = parser.parse_args(argv)
    for run in args.runs:
        if args.leave_one_source_out:
            print_leave_one_source_out(run, args.data_root)
            continue
        result = add_to_run(run, args.data_root)
        print(f"{run}: detail threshold {result['threshold']:.4f} (val quantile {result['val_quantile']}); "
              "flagged " + ", ".join(f"{s} {v:.1%}" for s, v in result["flagged"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
