"""Shared fixtures: the real chest X-ray set beside the checkout, and small trained runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the checkout (CI has it), or $CXR_SHARED."""
    return Path(os.environ.get("CXR_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_dir() / "data" / "cxr"
    if not (path / "manifest.csv").is_file():
        pytest.fail(f"the shared chest X-ray set is missing at {path}; set CXR_SHARED to the folder "
                    "holding data/cxr (tests that need real images must not be skipped)")
    return path


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    path = shared_dir() / "weights" / "keras" / "models"
    if not path.is_dir():
        pytest.fail(f"the shared Keras weights are missing at {path}; set CXR_SHARED")
    return path


def run_module(*args, check=True, env=None, timeout=900) -> subprocess.CompletedProcess:
    """`python -m ...` in a fresh process, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def copy_subset(shared_data: Path, root: Path, per_split: dict[str, int], skip: set[str] = frozenset()) -> Path:
    """The first `per_split[split]` images per class and split of the shared set whose file names
    are not in `skip`, copied into `root` in the split/class layout."""
    import csv
    import shutil

    taken: dict[tuple[str, str], int] = {}
    with open(shared_data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["split"], row["class"])
            if Path(row["file"]).name in skip or taken.get(key, 0) >= per_split[row["split"]]:
                continue
            taken[key] = taken.get(key, 0) + 1
            dest = root / row["split"] / row["class"] / Path(row["file"]).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_data / row["file"], dest)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shared_data) -> Path:
    """A few real X-rays per class and split from the shared set, in the split/class layout."""
    return copy_subset(shared_data, tmp_path_factory.mktemp("tiny_cxr"), {"train": 12, "val": 6, "test": 6})


def gates_with_conversion_budgets(path: Path, **budget) -> Path:
    """A copy of benchmarks/gates.toml whose [conversion.*] tables all hold `budget`."""
    import tomllib

    from benchmarks.gates import GATES_FILE

    text = GATES_FILE.read_text()
    variants = tomllib.loads(text)["conversion"]
    text = text[:text.index("\n[conversion.") + 1]
    for variant in variants:
        text += f"[conversion.{variant}]\n" + "".join(f"{k} = {v}\n" for k, v in budget.items())
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def loose_gates(tmp_path_factory) -> Path:
    """Parity budgets that let any variant through: for runs that prove the pipeline, not accuracy."""
    return gates_with_conversion_budgets(tmp_path_factory.mktemp("gates") / "loose.toml", min_agreement=0.0,
                                         max_flipped=1.0, excused_margin=0.0, max_drop_points=100.0,
                                         max_covid_lost=10_000)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset, loose_gates) -> Path:
    """A small CNN trained for two epochs at 64 px and converted to every TFLite variant
    (quantisation-aware and 50 % pruned ones included, each fine-tuned for one short epoch).

    The parity budgets are opened wide here: a two-epoch model on 18 test images proves the
    pipeline, not accuracy (the parity gate itself is tested on its own). No CLAHE: at 64 px its
    8-pixel tiles mostly amplify noise and the two-epoch CNN answers a constant, which the parity
    tests cannot use (CLAHE's train/device identity: test_pipeline_parity).
    """
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_module("train", "--model", "cnn", "--weights", "none", "--data", tiny_dataset, "--out", run,
               "--image-size", "64", "--epochs", "2", "--strategy", "full", "--batch-size", "8",
               "--input-contrast", "none", "--bootstrap", "0", "--no-progress")
    run_module("convert", run, "--no-progress", "--prune", "0.5", "--gates", loose_gates)
    return run


def with_card(model: Path, dest: Path, **changes) -> Path:
    """A copy of a `.tflite` whose embedded model card has `changes` (ModelCard fields) applied."""
    import dataclasses

    from edge_app.classifier import load_model_file
    from edge_app.tflite_metadata import CARD_METADATA_NAME, write_metadata

    data, card = load_model_file(model)
    dest.write_bytes(write_metadata(data, CARD_METADATA_NAME,
                                    dataclasses.replace(card, **changes).to_json().encode()))
    return dest
