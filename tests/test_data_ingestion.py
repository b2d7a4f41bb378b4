"""Dataset ingestion: every layout, label synonyms, task filtering, patient-level splits,
unreadable files, and the real shared set."""
from __future__ import annotations

import csv
import itertools
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data import TASKS, Dataset, Record, load_dataset
from train.data.labels import canonical_label
from train.data.readers import kaggle_patient_id, read_any
from train.data.splits import assign_splits

SHARED_CXR = Path(os.environ.get("CXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) \
    / "data" / "cxr"

_seeds = itertools.count()


def write_image(path: Path) -> Path:
    """A small grey image (72x64, above the decoder's 64 px minimum), different every call."""
    rng = np.random.default_rng(next(_seeds))
    y, x = np.mgrid[:64, :72]
    pixels = (2 * x + y + rng.integers(0, 80, (64, 72))) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "L").save(path)
    return path


def write_folders(root: Path, counts: dict[str, int], name="img{}.png") -> Path:
    """`counts` maps a folder relative to root to how many images to write into it."""
    for folder, n in counts.items():
        for i in range(n):
            write_image(root / folder / name.format(i))
    return root


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_class_counts(root: Path, splits=("train", "val", "test"), classes=("normal", "pneumonia", "covid"),
                       per_split=(2, 1, 1)) -> dict[str, int]:
    return {f"{s}/{c}": n for s, n in zip(splits, per_split) for c in classes}


def patients_in_one_split(records) -> bool:
    splits = defaultdict(set)
    for r in records:
        if r.patient_id:
            splits[r.patient_id].add(r.split)
    return all(len(s) == 1 for s in splits.values())


# --- layouts ---------------------------------------------------------------------------------

def test_split_class_folders_any_case_valid_is_val_and_junk_ignored(tmp_path):
    root = write_folders(tmp_path / "cxr", {"Train/NORMAL": 3, "Train/Pneumonia": 3, "Train/COVID-19": 3,
                                            "valid/normal": 1, "valid/pneumonia": 1, "valid/covid": 1,
                                            "TEST/normal": 1, "TEST/pneumonia": 1, "TEST/covid": 1})
    write_image(root / "Train/NORMAL/upper.PNG")
    write_image(root / "Train/NORMAL/.hidden.png")
    write_image(root / "Train/NORMAL/._appledouble.png")
    (root / "Train/NORMAL/notes.txt").write_text("not an image")
    (root / "Train/NORMAL/.DS_Store").write_bytes(b"\0" * 10)

    dataset = load_dataset(root, progress=False)

    assert dataset.layout == "split/class folders"
    assert dataset.labels == ("normal", "pneumonia", "covid")
    assert dataset.counts() == {"train": {"normal": 4, "pneumonia": 3, "covid": 3},
                                "val": {"normal": 1, "pneumonia": 1, "covid": 1},
                                "test": {"normal": 1, "pneumonia": 1, "covid": 1}}
    assert all(r.path.is_absolute() and r.source == "cxr" for r in dataset.records)
    assert {r.orig_label for r in dataset.split("train")} == {"NORMAL", "Pneumonia", "COVID-19"}
    assert not dataset.report.unreadable and not dataset.report.dropped


@pytest.mark.parametrize("filename, patient", [
    ("person1_bacteria_1.jpeg", "person1"), ("person1_virus_6.jpeg", "person1"),
    ("person1510_bacteria_3950.jpeg", "person1510"), ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"), ("scan_42.png", None), ("IM-0115.jpeg", None),
])
def test_kaggle_patient_ids(filename, patient):
    assert kaggle_patient_id(filename) == patient


def test_kaggle_pediatric_tree_from_the_folder_above(tmp_path):
    kaggle = tmp_path / "chest_xray"
    names = {"train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
             "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person3_bacteria_10.jpeg"],
             "val/NORMAL": ["NORMAL2-IM-1430-0001.jpeg"], "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
             "test/NORMAL": ["IM-0001-0001.jpeg"], "test/PNEUMONIA": ["person100_bacteria_475.jpeg"]}
    for folder, files in names.items():
        for name in files:
            write_image(kaggle / folder / name)
    write_image(kaggle / "__MACOSX/chest_xray/train/NORMAL/._IM-0115-0001.jpeg")
    write_image(tmp_path / "__MACOSX/train/NORMAL/IM-9999-0001.jpeg")

    dataset = load_dataset(tmp_path, task="pneumonia", progress=False)

    assert dataset.layout == "split/class folders"
    assert len(dataset.records) == 10
    assert all("__MACOSX" not in str(r.path) for r in dataset.records)
    patients = {r.path.name: r.patient_id for r in dataset.records}
    assert patients["IM-0115-0002.jpeg"] == "IM-0115"
    assert patients["person1_virus_6.jpeg"] == "person1"
    assert patients["NORMAL2-IM-1427-0001.jpeg"] == "NORMAL2-IM-1427"
    assert {r.source for r in dataset.records} == {"chest_xray"}
    assert dataset.counts()["train"] == {"normal": 3, "pneumonia": 3}


def test_class_folders_get_patient_level_stratified_splits(tmp_path):
    root = write_folders(tmp_path, {"normal": 10, "pneumonia": 10, "covid": 10})
    for i in range(3):  # one patient with three films
        write_image(tmp_path / "pneumonia" / f"person7_bacteria_{i}.jpeg")

    dataset = load_dataset(root, progress=False)

    assert dataset.layout == "class folders"
    assert all(r.split in ("train", "val", "test") for r in dataset.records)
    assert all(n > 0 for per_class in dataset.counts().values() for n in per_class.values())
    assert len({r.split for r in dataset.records if r.patient_id == "person7"}) == 1


def test_ieee8023_metadata_frontal_xrays_and_hierarchical_findings(tmp_path):
    rows = []

    def row(patient, finding, view="PA", modality="X-ray", suffix="jpg"):
        name = f"{len(rows)}.{suffix}"
        if suffix == "jpg":
            write_image(tmp_path / "images" / name)
        rows.append({"patientid": patient, "offset": "", "sex": "M", "age": "60", "finding": finding,
                     "view": view, "modality": modality, "date": "", "location": "",
                     "folder": "images", "filename": name, "doi": "", "url": "", "license": ""})

    for p in range(4):
        row(f"{p}", "COVID-19")
        row(f"{p}", "Pneumonia/Viral/COVID-19", view="AP Supine")
    row("10", "COVID-19, ARDS", view="AP")
    for p in range(20, 24):
        row(f"{p}", "Pneumonia/Bacterial/Streptococcus", view="AP Erect")
    row("24", "SARS")
    for p in range(30, 34):
        row(f"{p}", "No Finding")
    row("40", "Tuberculosis")
    row("41", "ARDS")
    row("1", "COVID-19", view="L")              # lateral: not read
    row("1", "COVID-19", modality="CT")         # CT: not read
    row("2", "COVID-19", modality="CT", suffix="nii.gz")
    write_csv(tmp_path / "metadata.csv", rows)

    dataset = load_dataset(tmp_path, progress=False)

    assert dataset.layout == "ieee8023 metadata"
    labels = {r.orig_label: r.label for r in dataset.records}
    assert labels == {"COVID-19": "covid", "Pneumonia/Viral/COVID-19": "covid", "COVID-19, ARDS": "covid",
                      "Pneumonia/Bacterial/Streptococcus": "pneumonia", "SARS": "pneumonia",
                      "No Finding": "normal"}
    assert dataset.report.dropped == {"excluded label: ARDS": 1, "excluded label: Tuberculosis": 1}
    assert dataset.report.counts == {"found": 20, "in task": 18, "readable": 18}
    assert {r.source for r in dataset.records} == {"ieee8023"}
    assert {r.patient_id for r in dataset.records} >= {"ieee8023:0", "ieee8023:10"}
    assert patients_in_one_split(dataset.records)


def test_coronahack_metadata_keeps_test_and_carves_val_from_train(tmp_path):
    images = tmp_path / "Coronahack-Chest-XRay-Dataset" / "Coronahack-Chest-XRay-Dataset"
    rows = []

    def row(name, split, label, virus="", kind=""):
        write_image(images / split.lower() / name)
        rows.append({"": len(rows), "X_ray_image_name": name, "Label": label, "Dataset_type": split,
                     "Label_2_Virus_category": virus, "Label_1_Virus_category": kind})

    for p in range(8):
        row(f"IM-{p:04d}-0001.jpeg", "TRAIN", "Normal")
        row(f"person{p}_bacteria_1.jpeg", "TRAIN", "Pnemonia", kind="bacteria")
        row(f"person{p}_virus_2.jpeg", "TRAIN", "Pnemonia", kind="Virus")
        row(f"covid-{p}.jpeg", "TRAIN", "Pnemonia", virus="COVID-19", kind="Virus")
    for p in range(100, 102):
        row(f"IM-{p:04d}-0001.jpeg", "TEST", "Normal")
        row(f"person{p}_bacteria_1.jpeg", "TEST", "Pnemonia", kind="bacteria")
        row(f"covid-{p}.jpeg", "TEST", "Pnemonia", virus="COVID-19", kind="Virus")
    write_csv(tmp_path / "Chest_xray_Corona_Metadata.csv", rows)

    dataset = load_dataset(tmp_path, progress=False)

    assert dataset.layout == "coronahack metadata"
    assert {r.orig_label: r.label for r in dataset.records} == {
        "Normal": "normal", "Pnemonia/bacteria": "pneumonia", "Pnemonia/Virus": "pneumonia",
        "Pnemonia/Virus/COVID-19": "covid"}
    counts = dataset.counts()
    assert counts["test"] == {"normal": 2, "pneumonia": 2, "covid": 2}
    assert all(counts["val"][c] > 0 for c in dataset.labels)
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 32
    assert {r.path.name for r in dataset.split("test")} == {r["X_ray_image_name"] for r in rows
                                                           if r["Dataset_type"] == "TEST"}
    assert patients_in_one_split(dataset.records)  # person0's bacterial and viral films stay together


def test_manifest_wins_over_folders(tmp_path):
    root = write_folders(tmp_path, split_class_counts(tmp_path))
    unlisted = root / "train/normal/img1.png"  # on disk, not in the manifest
    listed = sorted(p for p in root.rglob("*.png") if p != unlisted)
    rotated = {"train": "test", "val": "train", "test": "val"}  # the manifest's splits, not the folders'
    write_csv(root / "manifest.csv", [
        {"split": rotated[p.parent.parent.name], "class": p.parent.name,
         "file": p.relative_to(root).as_posix(), "patient_id": f"pt{i}", "source_repo": "someone/repo",
         "orig_label": f"raw {p.parent.name}"}
        for i, p in enumerate(listed)])

    dataset = load_dataset(root, progress=False)

    assert dataset.layout == "manifest"
    assert len(dataset.records) == len(listed) and unlisted not in {r.path for r in dataset.records}
    assert all(r.split == rotated[r.path.parent.parent.name] for r in dataset.records)
    assert {r.source for r in dataset.records} == {"someone/repo"}
    assert all(r.patient_id.startswith("pt") and r.orig_label.startswith("raw ") for r in dataset.records)


def test_no_layout_names_the_layouts_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="manifest.csv.*metadata.csv.*split/class folders.*class folders"):
        read_any(tmp_path)


# --- labels and tasks ------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("COVID-19", "covid"), ("COVID19", "covid"), ("covid", "covid"), ("Pneumonia/Viral/COVID-19", "covid"),
    ("COVID-19, ARDS", "covid"), ("Pnemonia/Virus/COVID-19", "covid"),
    ("NORMAL", "normal"), ("normal", "normal"), ("No Finding", "normal"),
    ("PNEUMONIA", "pneumonia"), ("bacteria", "pneumonia"), ("virus", "pneumonia"),
    ("Viral Pneumonia", "pneumonia"), ("Bacterial Pneumonia", "pneumonia"), ("Streptococcus", "pneumonia"),
    ("Klebsiella", "pneumonia"), ("Pneumonia/Bacterial/Streptococcus", "pneumonia"), ("SARS", "pneumonia"),
    ("MERS-CoV", "pneumonia"), ("Pneumonia/Fungal/Pneumocystis", "pneumonia"), ("Legionella", "pneumonia"),
    ("Chlamydophila", "pneumonia"), ("e.coli", "pneumonia"), ("Mycoplasma Bacterial Pneumonia", "pneumonia"),
    ("Lipoid", "pneumonia"), ("Pneumonia/Fungal/Aspergillosis", "pneumonia"),
    ("Tuberculosis", None), ("todo", None), ("Unknown", None), ("ARDS", None), ("No Finding, Tuberculosis", None),
])
def test_label_synonyms(raw, expected):
    assert canonical_label(raw, where="test") == expected


def test_excluded_labels_are_dropped_and_counted(tmp_path):
    root = write_folders(tmp_path, {**split_class_counts(tmp_path), "train/Tuberculosis": 2, "test/todo": 1})
    dataset = load_dataset(root, progress=False)
    assert dataset.report.dropped == {"excluded label: Tuberculosis": 2, "excluded label: todo": 1}
    assert len(dataset.records) == 12
    assert "excluded label: Tuberculosis: 2" in dataset.summary()


def test_unknown_label_fails_naming_it_and_where_to_add_it(tmp_path):
    root = write_folders(tmp_path, {**split_class_counts(tmp_path), "train/Lung_Nodule": 1})
    with pytest.raises(ValueError, match=r"'Lung_Nodule'.*Lung_Nodule[/\\]img0\.png.*SYNONYMS.*EXCLUDED.*labels\.py"):
        load_dataset(root, progress=False)


@pytest.mark.parametrize("task", ["pneumonia", "covid"])
def test_binary_tasks_drop_the_third_class(tmp_path, task):
    root = write_folders(tmp_path, split_class_counts(tmp_path))
    dataset = load_dataset(root, task=task, progress=False)
    other = ({"pneumonia", "covid"} - {task}).pop()
    assert dataset.labels == TASKS[task] and dataset.labels[0] == "normal"
    assert {r.label for r in dataset.records} == {"normal", task}
    assert dataset.report.dropped == {f"class not in task: {other}": 4}


# --- splits ----------------------------------------------------------------------------------

def records_of(patients_per_class=20, split=None) -> list[Record]:
    """1-3 films per patient; no files needed."""
    return [Record(path=Path(f"/data/{cls}/p{p}_{film}.png"), label=cls, split=split,
                   patient_id=f"{cls}-p{p}", source="test")
            for cls in ("normal", "pneumonia", "covid") for p in range(patients_per_class)
            for film in range(1 + p % 3)]


def split_of(records) -> dict[Path, str]:
    return {r.path: r.split for r in records}


def test_splits_are_per_patient_stratified_and_seeded():
    records = records_of()
    assigned = assign_splits(records, seed=1)

    assert [r.path for r in assigned] == [r.path for r in records]
    assert patients_in_one_split(assigned)
    for cls in ("normal", "pneumonia", "covid"):
        patients = {split: {r.patient_id for r in assigned if r.label == cls and r.split == split}
                    for split in ("train", "val", "test")}
        assert [len(patients[s]) for s in ("train", "val", "test")] == [14, 3, 3]  # of 20 patients
    shuffled = random.Random(0).sample(records, len(records))
    assert split_of(assign_splits(shuffled, seed=1)) == split_of(assigned)  # order does not matter
    assert split_of(assign_splits(records, seed=2)) != split_of(assigned)


def test_splits_of_tiny_datasets_fill_every_split_they_can():
    for groups, expected in [(1, {"train"}), (2, {"train", "val"}), (3, {"train", "val", "test"})]:
        records = [Record(Path(f"/d/{cls}/{i}.png"), cls, None, None, "t")
                   for cls in ("normal", "covid") for i in range(groups)]
        assigned = assign_splits(records, seed=0)
        for cls in ("normal", "covid"):
            assert {r.split for r in assigned if r.label == cls} == expected


def test_given_splits_are_kept_and_val_is_carved_from_train_when_missing():
    records = records_of(split="train") + [Record(Path(f"/data/test/{i}.png"), "normal", "test", f"t{i}", "x")
                                           for i in range(3)]
    records.append(Record(Path("/data/late.png"), "normal", None, "t0", "x"))  # joins its patient's split
    assigned = assign_splits(records, seed=0)
    assert {r.path: r.split for r in assigned if r.patient_id.startswith("t")} == \
        {**{Path(f"/data/test/{i}.png"): "test" for i in range(3)}, Path("/data/late.png"): "test"}
    for cls in ("normal", "pneumonia", "covid"):
        assert {r.split for r in assigned if r.label == cls and not r.patient_id.startswith("t")} == {"train", "val"}
    assert patients_in_one_split(assigned)

    with_val = records_of(split="train") + [Record(Path("/data/v.png"), "normal", "val", "v", "x")]
    assert {r.split for r in assign_splits(with_val, seed=0)} == {"train", "val"}  # nothing carved


# --- readability, validation, fingerprint ----------------------------------------------------

def test_unreadable_files_are_reported_and_left_out(tmp_path):
    root = write_folders(tmp_path, split_class_counts(tmp_path, per_split=(3, 1, 1)))
    good = write_image(root / "train/normal/whole.jpg").read_bytes()
    (root / "train/normal/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train/covid/letter.jpg").write_text("Dear colleague, this is not an X-ray.\n" * 5)

    dataset = load_dataset(root, progress=False)

    unreadable = {Path(path).name: code for path, code, message in dataset.report.unreadable}
    assert unreadable == {"truncated.jpg": "truncated", "letter.jpg": "not_an_image"}
    assert all(message for _, _, message in dataset.report.unreadable)
    assert {r.path.name for r in dataset.records}.isdisjoint(unreadable)
    assert dataset.report.counts == {"found": 18, "in task": 18, "readable": 16}
    assert "letter.jpg: not_an_image" in dataset.summary()
    # without the decode pass only existence is checked
    assert len(load_dataset(root, check_readable=False, progress=False).records) == 18


def test_a_task_class_without_images_fails_naming_it(tmp_path):
    root = write_folders(tmp_path, split_class_counts(tmp_path, classes=("normal", "pneumonia")))
    with pytest.raises(ValueError, match=r"class 'covid' has no images.*normal, pneumonia, covid"):
        load_dataset(root, progress=False)
    write_image(root / "test/covid/only_in_test.png")
    with pytest.raises(ValueError, match=r"class 'covid' has no training images(.|\n)*test +1 +1 +1"):
        load_dataset(root, check_readable=False, progress=False)


def test_fingerprint_is_stable_across_locations_and_sees_changes(tmp_path):
    root = write_folders(tmp_path / "a", split_class_counts(tmp_path))
    first = load_dataset(root, progress=False).fingerprint()
    moved = load_dataset(shutil.copytree(root, tmp_path / "elsewhere" / "b"), progress=False)
    assert len(first) == 64 and moved.fingerprint() == first
    (root / "val/covid/img0.png").rename(root / "val/pneumonia/moved.png")
    assert load_dataset(root, progress=False).fingerprint() != first


# --- the real shared set ---------------------------------------------------------------------

def test_shared_manifest_matches_its_readme():
    if not (SHARED_CXR / "manifest.csv").is_file():
        pytest.fail(f"the shared chest X-ray set is missing at {SHARED_CXR}; set CXR_SHARED")
    dataset = load_dataset(SHARED_CXR, check_readable=False, progress=False)
    assert isinstance(dataset, Dataset) and dataset.layout == "manifest"
    assert dataset.counts() == {"train": {"normal": 1262, "pneumonia": 843, "covid": 143},
                                "val": {"normal": 271, "pneumonia": 181, "covid": 31},
                                "test": {"normal": 270, "pneumonia": 180, "covid": 31}}
    assert len(dataset.records) == 3212 and not dataset.report.unreadable
    assert sum(n["covid"] for n in dataset.sources().values()) == 205
    assert patients_in_one_split(dataset.records)


def test_leave_one_source_out_on_the_shared_set():
    # sources are the manifest's source_repo: the Kermany copy, the RSNA-normals copy, ieee8023's
    # copy, and the RSNA lung-opacity (adult pneumonia) copy
    kermany, rsna, ieee, rsna_pneumonia = ("lecuong1502/BTL_Machine_Learning",
                                           "rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS",
                                           "s-mostafa-a/covid-chestxray-dataset", "jas127/PS_Covid19")
    dataset = load_dataset(SHARED_CXR, check_readable=False, progress=False)
    rest, held_out = dataset.without_source(rsna)
    assert len(held_out) == 800 and {r.source for r in held_out} == {rsna}
    assert {r.label for r in held_out} == {"normal"}
    assert len(rest.records) == len(dataset.records) - 800
    assert set(rest.sources()) == {kermany, ieee, rsna_pneumonia}
    rest, held_out = dataset.without_source(rsna_pneumonia)
    assert len(held_out) == 144 and {r.label for r in held_out} == {"pneumonia"}
    assert [sum(r.split == s for r in held_out) for s in ("train", "val", "test")] == [101, 22, 21]
    with pytest.raises(ValueError, match="sources: jas127/PS_Covid19, lecuong1502"):
        dataset.without_source("nih")
    # ieee8023 holds every COVID-19 image: without it the 3-class task cannot be trained
    with pytest.raises(ValueError, match="class 'covid' has no images .* without source 's-mostafa-a"):
        dataset.without_source(ieee)
