"""Benchmarks of a converted run: `CXR_RUN=artifacts/RUN pytest benchmarks` (or `make benchmark`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

RUN = Path(os.environ.get("CXR_RUN", "artifacts/mobilenet_v2-synthetic"))
VARIANTS = sorted(p.stem for p in (RUN / "tflite").glob("*.tflite"))


def pytest_collection_modifyitems(items):
    if not VARIANTS:
        raise pytest.UsageError(f"no .tflite models in {RUN}/tflite: run `make convert` first "
                                "or point CXR_RUN at a converted run")


@pytest.fixture(scope="session")
def test_images() -> list[Path]:
    from edge_app.model_card import ModelCard

    card = ModelCard.from_json((RUN / "model_card.json").read_text())
    root = Path(card.dataset["root"]) / "test"
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        raise pytest.UsageError(f"no test images under {root}")
    return images[:: max(1, len(images) // 16)][:16]
