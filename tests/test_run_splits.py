"""The run folder is the contract: splits.csv written once by training, read back by every stage."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import copy_subset
from edge_app.model_card import ModelCard
from edge_app.preprocess import InputSpec
from train.data import load_dataset, run_splits


@pytest.fixture
def run_and_data(tmp_path, shared_data) -> tuple[Path, Path]:
    """A run folder (card + splits.csv, as training writes them) beside its data; the test split's
    COVID-19 images stand for a held-out source."""
    data = copy_subset(shared_data, tmp_path / "data" / "cxr", {"train": 4, "val": 2, "test": 2})
    dataset = load_dataset(data, progress=False)
    held_out = [r for r in dataset.split("test") if r.label == "covid"]
    dataset = dataclasses.replace(dataset, records=[r for r in dataset.records if r not in held_out])
    run = tmp_path / "artifacts" / "run"
    run.mkdir(parents=True)
    run_splits.write(run, dataset, held_out)
    card = ModelCard(name="m", task=dataset.task, labels=dataset.labels, input=InputSpec(size=64),
                     dataset={"root": run_splits.relative_to_run(data, run), "fingerprint": dataset.fingerprint()})
    (run / "model_card.json").write_text(card.to_json())
    return run, data


def test_splits_read_back_as_training_split_them(run_and_data):
    run, data = run_and_data
    card = json.loads((run / "model_card.json").read_text())
    assert card["dataset"]["root"] == "../../data/cxr"            # no absolute path in a shipped card
    dataset, held_out = run_splits.load(run)
    trained = load_dataset(data, progress=False)
    assert dataset.records + [dataclasses.replace(r, split="test") for r in held_out] == (
        [r for r in trained.records if r.path not in {h.path for h in held_out}]
        + [r for r in trained.records if r.path in {h.path for h in held_out}])   # every field, in order
    assert dataset.fingerprint() == card["dataset"]["fingerprint"]
    assert len(held_out) == 2 and all(r.split == run_splits.HOLDOUT and r.label == "covid" for r in held_out)
    assert {r.split for r in dataset.records} == {"train", "val", "test"}


def test_a_copied_run_reads_its_data_beside_it_or_where_the_flag_says(run_and_data, tmp_path):
    run, data = run_and_data
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run.parent.parent, elsewhere)                  # artifacts/ and data/ together
    shutil.rmtree(data)
    moved, _ = run_splits.load(elsewhere / "artifacts" / "run")
    assert moved.root == (elsewhere / "data" / "cxr").resolve() and all(r.path.is_file() for r in moved.records)
    lone = shutil.copytree(run, tmp_path / "lone" / "run")        # without its data: the flag names it
    with pytest.raises(FileNotFoundError, match="--data-root"):
        run_splits.load(lone)
    given, _ = run_splits.load(lone, data_root=elsewhere / "data" / "cxr")
    assert [r.path for r in given.records] == [r.path for r in moved.records]


def test_a_run_without_splits_or_with_unknown_labels_is_refused(run_and_data):
    run, _ = run_and_data
    text = (run / run_splits.SPLITS_FILE).read_text()
    (run / run_splits.SPLITS_FILE).write_text(text.replace(",covid,", ",tuberculosis,", 1))
    with pytest.raises(ValueError, match="tuberculosis"):
        run_splits.load(run)
    (run / run_splits.SPLITS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="splits.csv"):
        run_splits.load(run)


def test_a_trained_run_records_its_splits_and_ships_no_build_machine_path(tiny_run, tiny_dataset):
    from edge_app.classifier import load_model_file

    dataset, held_out = run_splits.load(tiny_run)
    card = json.loads((tiny_run / "model_card.json").read_text())
    assert dataset.root == tiny_dataset.resolve() and not held_out
    assert dataset.fingerprint() == card["dataset"]["fingerprint"] == load_dataset(tiny_dataset, progress=False).fingerprint()
    _, shipped = load_model_file(tiny_run / "tflite" / "int8.tflite")
    assert not Path(shipped.dataset["root"]).is_absolute()
    assert str(tiny_dataset.resolve()) not in json.dumps(shipped.to_dict())


def test_a_run_trained_before_splits_were_recorded_gets_them_once_and_only_from_its_own_data(tmp_path, shared_data):
    data = copy_subset(shared_data, tmp_path / "cxr", {"train": 4, "val": 2, "test": 2})
    dataset = load_dataset(data, progress=False)
    run = tmp_path / "old-run"
    run.mkdir()
    card = ModelCard(name="m", task=dataset.task, labels=dataset.labels, input=InputSpec(size=64),   # as cards were
                     dataset={"root": str(data.resolve()), "fingerprint": dataset.fingerprint(), "seed": 42})
    (run / "model_card.json").write_text(card.to_json())
    assert run_splits.main([str(run)]) == 0
    assert run_splits.load(run)[0].records == dataset.records
    assert run_splits.main([str(run)]) == 1                        # written once, never rewritten
    (run / run_splits.SPLITS_FILE).unlink()
    next((data / "test").rglob("*.*")).unlink()                    # not the data it was trained on
    assert run_splits.main([str(run)]) == 1 and not (run / run_splits.SPLITS_FILE).exists()
