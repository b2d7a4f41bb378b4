"""Shared fixtures: the real chest X-ray set beside the checkout, and small trained runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_app.runtime import REQUIRE_GPU_ENV, gpu_required

REPO = Path(__file__).resolve().parents[1]
SWIFTSHADER = {"VK_ICD_FILENAMES": "/usr/lib/chromium/vk_swiftshader_icd.json", "XDG_RUNTIME_DIR": "/tmp"}


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


@pytest.fixture(scope="session")
def swiftshader():
    """SwiftShader's Vulkan, where chromium is installed. Without it the GPU path has nothing to
    run on: skipped with the reason, unless CXR_EDGE_REQUIRE_GPU=1 (CI) makes that a failure."""
    if not Path(SWIFTSHADER["VK_ICD_FILENAMES"]).is_file():
        why = f"no GPU adapter: SwiftShader is not installed ({SWIFTSHADER['VK_ICD_FILENAMES']}; " \
              "scripts/install-system-deps.sh installs chromium)"
        if gpu_required():
            pytest.fail(f"{REQUIRE_GPU_ENV}=1 but {why}")
        pytest.skip(why)
    return SWIFTSHADER


def tflite_outputs(model_bytes: bytes, x):
    """The first output of a .tflite model (float input) for each input of `x`, one at a time."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    result = []
    for image in x:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        result.append(interpreter.get_tensor(out["index"])[0])
    return np.array(result)


def run_module(*args, check=True, env=None, timeout=900) -> subprocess.CompletedProcess:
    """`python -m ...` in a fresh process, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def train_tiny_cnn(data: Path, out: Path, recipe: str) -> subprocess.CompletedProcess:
    """Two epochs of the seeds' CNN at 64 px on `data` with the TrainConfig settings `recipe` (TOML lines):
    a whole run in seconds, for tests of what a setting does to training."""
    config = out.parent / f"{out.name}.toml"
    config.write_text(recipe + "\nbootstrap = 0\n")
    return run_module("train", "--model", "cnn", "--weights", "none", "--data", data, "--out", out,
                      "--config", config, "--image-size", "64", "--epochs", "2", "--strategy", "full",
                      "--batch-size", "8", "--input-contrast", "none", "--no-progress")


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


def _train_and_convert(run: Path, tiny_dataset: Path, gates: Path, *convert_args) -> Path:
    """A small CNN trained for two epochs at 64 px and converted with `convert_args`.

    The parity budgets are opened wide here: a two-epoch model on 18 test images proves the
    pipeline, not accuracy (the parity gate itself is tested on its own). No CLAHE: at 64 px its
    8-pixel tiles mostly amplify noise and the two-epoch CNN answers a constant, which the parity
    tests cannot use (CLAHE's train/device identity: test_pipeline_parity).
    """
    run_module("train", "--model", "cnn", "--data", tiny_dataset, "--out", run,
               "--image-size", "64", "--epochs", "2", "--batch-size", "8",
               "--input-contrast", "none", "--bootstrap", "0", "--no-progress")
    run_module("convert", run, "--no-progress", *convert_args, "--gates", gates)
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset, loose_gates) -> Path:
    """The small CNN converted to every TFLite variant (quantisation-aware and 50 % pruned ones
    included, each fine-tuned for one short epoch)."""
    return _train_and_convert(tmp_path_factory.mktemp("runs") / "tiny", tiny_dataset, loose_gates, "--prune", "0.5")


@pytest.fixture(scope="session")
def device_run(request, tmp_path_factory, tiny_dataset, loose_gates) -> Path:
    """A run with the post-training variants only (fp32, dynamic, fp16, int8), for the device
    tests (`pytest -m device`, `make test-device`): no fine-tuned variant, so it is built in a
    fraction of tiny_run's time. Where this session needs tiny_run anyway, that one is used."""
    if any("tiny_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return request.getfixturevalue("tiny_run")
    return _train_and_convert(tmp_path_factory.mktemp("runs") / "device", tiny_dataset, loose_gates,
                              "--variants", "fp32", "dynamic", "fp16", "int8")


def with_card(model: Path, dest: Path, **changes) -> Path:
    """A copy of a `.tflite` whose embedded model card has `changes` (ModelCard fields) applied."""
    import dataclasses

    from edge_app.classifier import load_model_file
    from edge_app.tflite_metadata import CARD_METADATA_NAME, write_metadata

    data, card = load_model_file(model)
    dest.write_bytes(write_metadata(data, CARD_METADATA_NAME,
                                    dataclasses.replace(card, **changes).to_json().encode()))
    return dest


@pytest.fixture(scope="session")
def lung_segmenter(tmp_path_factory) -> Path:
    """A stand-in lung segmenter `.tflite` (96 px, card embedded): lung where the image is neither
    black nor white inside two lung-shaped ellipses, sure of it but at the edges of that grey band (a black or
    a white film: no lungs; lungs at grey 0.8 or 0.04: unsure, p 0.73). Not trained: it exercises the
    pipeline, not the segmentation (train.lungs trains the real one)."""
    import numpy as np

    import train  # noqa: F401
    import tensorflow as tf
    import tf_keras as keras

    from convert.export import convert
    from edge_app import lungs, preprocess

    size = 96
    yy, xx = np.mgrid[:size, :size] / size
    prior = np.full((size, size), -100.0, np.float32)
    for cx in (0.3, 0.7):
        prior[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = 1.0
    image = keras.Input((size, size, 1), name="image")   # lung: inside an ellipse, grey 0.04-0.8
    logits = keras.layers.Lambda(lambda x: prior[None, ..., None] + 200.0 * tf.minimum(x - 0.04, 0.8 - x),
                                 name="lung_logits")(image)
    card = lungs.LungCard(name="test-prior", input=preprocess.InputSpec(size=size, fit="pad"), variant="fp32")
    path = tmp_path_factory.mktemp("lungs") / "lungs.tflite"
    path.write_bytes(lungs.with_card(convert(keras.Model(image, logits), "fp32"), card))
    return path
