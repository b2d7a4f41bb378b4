"""The run's test split, decoded once with the device's own preprocessing (the headline metrics a
release is judged on are convert.parity.headline)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_app import preprocess
from edge_app.model_card import ModelCard
from train.data import run_splits
from train.data.records import label_indices

PIPELINE_IMAGES = 16  # files cycled through by the pipeline benchmark


@dataclass
class Split:
    card: ModelCard
    root: Path               # the data folder the images were read from
    paths: list[Path]
    y: np.ndarray            # class indices into card.labels
    fingerprint_matches: bool

    @classmethod
    def of_run(cls, run: Path, data_root: Path | None = None) -> "Split":
        """The run's test split as training recorded it (a held-out source is not in it)."""
        card = ModelCard.from_json((Path(run) / "model_card.json").read_text())
        dataset, _ = run_splits.load(run, data_root)
        records = dataset.split("test")
        if not records:
            raise ValueError(f"the test split of {dataset.root} is empty")
        return cls(card, dataset.root, [r.path for r in records], label_indices(records, card.labels),
                   dataset.fingerprint() == card.dataset.get("fingerprint"))

    def inputs(self, progress: bool = True) -> np.ndarray:
        """(N, size, size, channels) model inputs, exactly as the device prepares them."""
        spec = self.card.input
        grey = np.stack([preprocess.load(p, spec) for p in tqdm(self.paths, desc="test split", unit="img",
                                                                disable=not progress)])
        return preprocess.normalise(grey, spec)

    def pipeline_images(self) -> list[Path]:
        """A fixed spread of test files (every class) for the whole-pipeline timing."""
        return self.paths[:: max(1, len(self.paths) // PIPELINE_IMAGES)][:PIPELINE_IMAGES]


