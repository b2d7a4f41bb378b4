"""Readers for the dataset layouts people actually have, and `read_any`, which tells them apart.

Every reader returns Records with absolute paths and `label` still raw, the class as the
source names it ("PNEUMONIA", "Pneumonia/Viral/COVID-19"); `labels.to_task` makes it
canonical. `orig_label` keeps the most detailed label the source gives. Only files with an
image suffix are read; hidden files and macOS `__MACOSX` folders are ignored.

Layouts, in the order `read_any` looks for them (the first found wins, so a manifest beats
the folders beside it):

- manifest: `manifest.csv` with columns split, class, file[, patient_id, source_repo,
  orig_label]; `file` is relative to the manifest's folder.
- ieee8023 metadata: the COVID-19 image data collection's `metadata.csv`; frontal X-rays only.
- coronahack metadata: Kaggle CoronaHack's `Chest_xray_Corona_Metadata.csv`.
- split/class folders: `{train,val,test}/<class>/<image>`, in the root or in one folder
  below it (Kaggle's `chest_xray/`).
- class folders: `<class>/<image>`, no split yet.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from train.data.records import Record

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_FOLDERS = frozenset({"__MACOSX"})

IEEE8023_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
IEEE8023_FRONTAL_VIEWS = frozenset({"pa", "ap", "ap supine", "ap erect"})

CORONAHACK_COLUMNS = ("X_ray_image_name", "Label", "Dataset_type")
# Where the Kaggle download keeps the images, relative to the metadata CSV (first found wins).
CORONAHACK_IMAGE_FOLDERS = ("Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset",
                            "Coronahack-Chest-XRay-Dataset", ".")

# Kermany/Kaggle pediatric file names: person1_bacteria_1.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-1427-0001.jpeg (patients person1, IM-0115, NORMAL2-IM-1427).
_KAGGLE_PATIENT = re.compile(r"(person\d+)_|((?:NORMAL2-)?IM-\d+)-\d+")


def kaggle_patient_id(filename: str) -> str | None:
    """The patient a Kaggle pediatric file name encodes; None for any other name."""
    match = _KAGGLE_PATIENT.match(filename)
    return match and (match[1] or match[2])


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p) and p.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in JUNK_FOLDERS)


def _split_folders(folder: Path) -> list[tuple[str, Path]]:
    return [(SPLIT_NAMES[p.name.casefold()], p) for p in _subfolders(folder)
            if p.name.casefold() in SPLIT_NAMES]


def _split(name: str, where: str) -> str | None:
    if not name:
        return None
    if name.casefold() not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r} ({where}); expected one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[name.casefold()]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of `path`, values stripped, after checking that it has the `required` columns."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _columns(path: Path) -> set[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return set(next(csv.reader(f), ()))


def _class_folder_records(class_folder: Path, split: str | None, source: str) -> list[Record]:
    return [Record(path=p, label=class_folder.name, split=split, patient_id=kaggle_patient_id(p.name),
                   source=source, orig_label=class_folder.name)
            for p in _images(class_folder)]


def read_split_class_folders(root: str | Path) -> list[Record]:
    """`root/{train,val,test}/<class>/<image>`; split names in any case, valid/validation = val."""
    root = Path(root).resolve()
    return [record for split, split_folder in _split_folders(root)
            for class_folder in _subfolders(split_folder)
            for record in _class_folder_records(class_folder, split, root.name)]


def read_class_folders(root: str | Path) -> list[Record]:
    """`root/<class>/<image>`, with no split yet."""
    root = Path(root).resolve()
    return [record for class_folder in _subfolders(root)
            for record in _class_folder_records(class_folder, None, root.name)]


def read_manifest(path: str | Path) -> list[Record]:
    """`manifest.csv`: split, class, file[, patient_id, source_repo, orig_label, view]; an empty split is assigned
    later."""
    path = Path(path).resolve()
    return [Record(path=path.parent / row["file"], label=row["class"],
                   split=_split(row["split"], f"{path} row {number}"),
                   patient_id=row.get("patient_id") or None,
                   source=row.get("source_repo") or path.parent.name,
                   orig_label=row.get("orig_label") or row["class"], view=row.get("view") or "")
            for number, row in enumerate(_read_csv(path, ("split", "class", "file")), start=2)]


def read_ieee8023(path: str | Path) -> list[Record]:
    """The COVID-19 image data collection's `metadata.csv`: frontal (PA/AP) X-rays, no split.

    Images are in the row's `folder` (`images/` when the column is absent) beside the CSV.
    Patient ids get an `ieee8023:` prefix so that they cannot collide with another source's.
    """
    path = Path(path).resolve()
    return [Record(path=path.parent / (row.get("folder") or "images") / row["filename"],
                   label=row["finding"], split=None,
                   patient_id=f"ieee8023:{row['patientid']}" if row["patientid"] else None,
                   source="ieee8023", orig_label=row["finding"], view=row["view"])
            for row in _read_csv(path, IEEE8023_COLUMNS)
            if row["modality"].casefold() == "x-ray" and row["view"].casefold() in IEEE8023_FRONTAL_VIEWS
            and _is_image(Path(row["filename"]))]


def read_coronahack(path: str | Path) -> list[Record]:
    """Kaggle CoronaHack's `Chest_xray_Corona_Metadata.csv`.

    The label is Label/Label_1_Virus_category/Label_2_Virus_category joined
    ("Pnemonia/Virus/COVID-19"), which `labels` reads like a hierarchical finding. The set
    has only TRAIN and TEST: its train records keep split "train", and `assign_splits`
    carves val out of the train patients because no record has a val split.
    """
    path = Path(path).resolve()
    folders = [path.parent / name for name in CORONAHACK_IMAGE_FOLDERS]
    base = next((f for f in folders if (f / "train").is_dir() or (f / "test").is_dir()), None)
    if base is None:
        raise ValueError(f"{path}: no CoronaHack image folders (train/, test/) in any of "
                         + ", ".join(str(f) for f in folders))
    records = []
    for number, row in enumerate(_read_csv(path, CORONAHACK_COLUMNS), start=2):
        split = {"train": "train", "test": "test"}.get(row["Dataset_type"].casefold())
        if split is None:
            raise ValueError(f"{path} row {number}: Dataset_type {row['Dataset_type']!r} is not TRAIN or TEST")
        label = "/".join(v for v in (row["Label"], row.get("Label_1_Virus_category"),
                                     row.get("Label_2_Virus_category")) if v)
        name = row["X_ray_image_name"]
        records.append(Record(path=base / split / name, label=label, split=split,
                              patient_id=kaggle_patient_id(name), source="coronahack", orig_label=label))
    return records


READERS = {"manifest": read_manifest, "ieee8023 metadata": read_ieee8023,
           "coronahack metadata": read_coronahack, "split/class folders": read_split_class_folders,
           "class folders": read_class_folders}

LOOKED_FOR = ("manifest.csv; an ieee8023 metadata.csv or CoronaHack Chest_xray_Corona_Metadata.csv; "
              "split/class folders ({train,val,test}/<class>/<images>, in the folder or one folder "
              "down); class folders (<class>/<images>)")


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """The layout found at `root` (a key of READERS) and the file or folder its reader takes."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if (root / "manifest.csv").is_file():
        return "manifest", root / "manifest.csv"
    for table in sorted(root.glob("*.csv")):
        columns = _columns(table)
        if columns.issuperset(IEEE8023_COLUMNS):
            return "ieee8023 metadata", table
        if columns.issuperset(CORONAHACK_COLUMNS):
            return "coronahack metadata", table
    if _split_folders(root):
        return "split/class folders", root
    nested = [folder for folder in _subfolders(root) if _split_folders(folder)]
    if len(nested) > 1:
        raise ValueError(f"{root} holds several split/class trees ({', '.join(f.name for f in nested)}): "
                         "pass one of them")
    if nested:
        return "split/class folders", nested[0]
    if any(_images(folder) for folder in _subfolders(root)):
        return "class folders", root
    raise ValueError(f"no dataset layout found in {root}; looked for {LOOKED_FOR}")


def read_any(root: str | Path) -> tuple[str, list[Record]]:
    """The layout found at `root` and its records."""
    layout, path = detect_layout(root)
    return layout, READERS[layout](path)
