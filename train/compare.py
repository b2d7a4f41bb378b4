"""python -m train.compare artifacts/RUN ... : the headline figures of several runs as one Markdown table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("run", "model", "size", "strategy", "shortcut measures", "macro-F1", "accuracy", "abn. sens.",
           "abn. spec.", "abn. AUC", "COVID sens.", "COVID AUC", "ECE", "train min", "holdout sens.",
           "holdout spec.", "holdout AUC", "holdout OOD flagged")
SHORTCUTS_OFF = {"input_contrast": "none", "input_borders": "keep", "crop_scale": 1.0, "gamma": 0.0, "blur": 0.0,
                 "noise": 0.0, "min_resolution": 1.0, "jpeg_quality": 0, "balance_sources": False}


def measures(config: dict) -> str:
    """The measures against shortcuts a run had switched on (configs/shortcuts/)."""
    on = [f"{k} {config[k]}" for k, off in SHORTCUTS_OFF.items() if config.get(k, off) != off]
    return ", ".join(on) or "none"


def row(run: Path) -> list[str]:
    metrics = json.loads((run / "reports" / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    card = json.loads((run / "model_card.json").read_text())
    test = metrics["test"]
    covid = test.get("covid", {})
    holdout = metrics.get("holdout", {}).get("abnormal", {})
    flagged = metrics.get("ood", {}).get("flagged", {}).get("holdout")
    f = lambda v: "—" if v is None or v != v else f"{v:.3f}"
    return [run.name, card["name"], str(card["input"]["size"]), config["strategy"], measures(config),
            f(test["macro_f1"]), f(test["accuracy"]), f(test["abnormal"]["sensitivity"]),
            f(test["abnormal"]["specificity"]), f(test["abnormal"]["auc"]), f(covid.get("sensitivity")),
            f(covid.get("auc")), f(test["ece"]), f"{metrics['training_seconds'] / 60:.1f}",
            f(holdout.get("sensitivity")), f(holdout.get("specificity")), f(holdout.get("auc")), f(flagged)]


def table(runs: list[Path]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(run)) + " |" for run in runs]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "reports" / "metrics.json").is_file()]
    if missing:
        print(f"error: not a finished training run: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
