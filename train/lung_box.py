"""Does a model read the shape of the lung box it is cropped to?

The lung crop widens the lungs' box to a square on its longer side, so a narrow box fills the model's
square from top to bottom. Where the boxes' width / height differs between the sources of one class (the
Kermany copy squashed its children's films: docs/RESULTS.md, 2026-12-07 morning), the shape is a cue a
model can learn instead of the findings. Per source and class of a split: the boxes' width / height
(median and quartiles) and, within the group, where the label cannot explain it, the rank correlation
(Spearman) of that ratio with the run's P(abnormal) and the share it refers at its threshold, where the run
saved its logits (val, test, and the source a leave-one-source-out run held out of training: `holdout`).
`--by-view` splits each group by projection (PA / AP), as the run's splits.csv records it.

    python -m train.lung_box artifacts/RUN [--splits val test holdout] [--by-view] [--data-root DIR]

-> a table, reports/lung_box.json and reports/lung_box.png (the ratios of each group as box plots).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_app import decision, lungs, preprocess
from edge_app.errors import InputError
from edge_app.model_card import ModelCard
from train.data import sources
from train.data.records import projection

MIN_GROUP = 8   # films a group needs for its row


def box_ratio(path, spec: preprocess.InputSpec) -> float | None:
    """Width / height of a film's lung box as the run's preprocessing finds it (its margin is a share
    of each side, so it keeps the ratio unless the image's edge clips it); None when refused."""
    gray = preprocess.trimmed8(preprocess.decode(path, draft_size=spec.size), spec)   # as `preprocess.load8`
    try:
        top, left, bottom, right = lungs.find(gray, spec).box
    except InputError:
        return None
    return (right - left) / (bottom - top)


def spearman(a, b) -> float:
    """Rank correlation (ties broken by order: the ratios and probabilities are continuous)."""
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def groups(ratios, p_abnormal, names, threshold: float | None = None) -> dict:
    """{group: n, refused, ratio median / quartiles, Spearman(ratio, P(abnormal)) and the films with
    P(abnormal) >= threshold (None without p_abnormal)} for every group of at least MIN_GROUP films with a
    ratio (None: refused by the lung step)."""
    out = {}
    for name in sorted(set(names)):
        members = [i for i, n in enumerate(names) if n == name]
        kept = [i for i in members if ratios[i] is not None]
        if len(kept) < MIN_GROUP:
            continue
        r = np.array([ratios[i] for i in kept])
        q1, median, q3 = np.percentile(r, [25, 50, 75])
        out[name] = {"n": len(kept), "refused": len(members) - len(kept), "ratio_median": float(median),
                     "ratio_quartiles": [float(q1), float(q3)],
                     "spearman_ratio_p_abnormal": None if p_abnormal is None
                     else spearman(r, [p_abnormal[i] for i in kept]),
                     "referred": None if p_abnormal is None or threshold is None
                     else int(sum(p_abnormal[i] >= threshold for i in kept))}
    return out


def measure(run: Path, splits=("val", "test"), data_root: Path | None = None,
            by_view: bool = False) -> tuple[dict, dict]:
    """(`groups` of each split of a lung-cropping run, from its recorded splits and saved logits (the
    training split has none: its shapes only); {split: {group: its films' ratios}}, refused left out)."""
    from train.config import TrainConfig         # lazily: these import TensorFlow
    from train.data import run_splits

    card = ModelCard.from_json((run / "model_card.json").read_text())
    if card.input.lung_crop == "none":
        raise ValueError(f"{run} does not crop to the lung field (lung_crop 'none'): there is no box")
    lungs.use(TrainConfig.from_file(run / "config.json").lung_model)
    dataset, heldout = run_splits.load(run, data_root)
    saved = np.load(run / "reports" / "predictions.npz")
    result, ratios_of = {}, {}
    for split in splits:
        records = heldout if split == "holdout" else dataset.split(split)
        p_abnormal = None
        if f"{split}_logits" in saved.files:
            if [card.labels.index(r.label) for r in records] != saved[f"{split}_labels"].tolist():
                raise ValueError(f"{run}: reports/predictions.npz does not hold {split}'s films in the recorded order")
            p_abnormal = decision.abnormal_probability(
                decision.calibrated_probabilities(saved[f"{split}_logits"], card.temperature))
        ratios = [box_ratio(r.path, card.input) for r in records]
        names = [f"{sources.short_name(r.source)} {r.label}" + (f" {projection(r.view) or '?'}" if by_view else "")
                 for r in records]
        result[split] = groups(ratios, p_abnormal, names, card.abnormal_threshold)
        ratios_of[split] = {name: [r for r, n in zip(ratios, names) if n == name and r is not None]
                            for name in result[split]}
    return result, ratios_of


def plot(result: dict, ratios_of: dict, path: Path) -> None:
    """One panel per split: each group's box ratios as a box plot, labelled with its Spearman."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(result), 1, figsize=(8, 2.6 * len(result)), squeeze=False)
    for ax, (split, table) in zip(axes[:, 0], result.items()):
        names = list(table)
        ax.boxplot([ratios_of[split][n] for n in names], orientation="horizontal", showfliers=False)
        rho = [table[n]["spearman_ratio_p_abnormal"] for n in names]
        ax.set_yticks(range(1, len(names) + 1),
                      [n if r is None else f"{n} (rho {r:+.2f})" for n, r in zip(names, rho)], fontsize=8)
        ax.set_title(f"{split}: lung box width / height (rho: Spearman with P(abnormal))", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.lung_box", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["train", "val", "test", "holdout"])
    parser.add_argument("--by-view", action="store_true", help="each group split by projection (PA / AP)")
    parser.add_argument("--data-root", type=Path, help="the data folder, where a run was copied elsewhere")
    args = parser.parse_args(argv)
    result, ratios_of = measure(args.run, tuple(args.splits), args.data_root, args.by_view)
    (args.run / "reports" / "lung_box.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, ratios_of, args.run / "reports" / "lung_box.png")
    print("| split | group | films (refused) | box width / height, median [quartiles] | Spearman with P(abnormal) "
          "| referred at the run's threshold |")
    print("|---|---|---|---|---|---|")
    for split, table in result.items():
        for name, g in table.items():
            q1, q3 = g["ratio_quartiles"]
            rho, referred = g["spearman_ratio_p_abnormal"], g["referred"]
            shown = "–" if referred is None else f"{referred / g['n']:.2f} ({referred})"
            print(f"| {split} | {name} | {g['n']} ({g['refused']}) | {g['ratio_median']:.2f} [{q1:.2f}–{q3:.2f}] "
                  f"| {'–' if rho is None else f'{rho:+.2f}'} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
