"""The leakage check: planted copies and shared patients are found, distinct films are not."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import run_module
from train.data.leakage import MAX_DISTANCE, LeakageReport, check_leakage, distances
from train.data.records import Record
from train.data.synthetic import generate


def _shared_rows(shared_data: Path) -> list[dict]:
    with open(shared_data / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def originals(shared_data) -> list[dict]:
    """Twelve real X-rays of twelve patients, four per class, spread over the shared set."""
    taken, patients = [], set()
    for row in _shared_rows(shared_data)[::37]:
        if sum(r["class"] == row["class"] for r in taken) < 4 and row["patient_id"] not in patients:
            taken.append(row)
            patients.add(row["patient_id"])
    assert len(taken) == 12
    return sorted(taken, key=lambda r: r["class"])


def _record(path: Path, split: str, patient: str, label: str = "normal") -> Record:
    return Record(path=path, label=label, split=split, patient_id=patient, source="test")


def _jpeg(image: Image.Image, path: Path, quality: int = 70) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=quality)
    return path


def _resize(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC)


def _crop(image: Image.Image, left=0.0, top=0.0, right=0.0, bottom=0.0) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round(w - right * w), round(h - bottom * h)))


PERTURBATIONS = {
    "jpeg q70": lambda im: im,
    "resized x0.8": lambda im: _resize(im, 0.8),
    "resized x1.25": lambda im: _resize(im, 1.25),
    "brighter 10%": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "darker 10%": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
    "5% cut off the bottom": lambda im: _crop(im, bottom=0.05),
    "5% cut off the left": lambda im: _crop(im, left=0.05),
    "5% cut around": lambda im: _crop(im, 0.02, 0.03, 0.03, 0.02),
    "all at once": lambda im: ImageEnhance.Brightness(_crop(_resize(im, 1.2), 0.01, 0.04, 0.04, 0.01))
                              .enhance(0.92),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared_data, originals):
    """The originals in train, and a copy of nine of them in val or test, perturbed a different way each.

    Returns the records and, per kind of perturbation, the pair of files the check must report.
    """
    root = tmp_path_factory.mktemp("planted")
    records = [_record(shared_data / r["file"], "train", r["patient_id"], r["class"]) for r in originals]
    expected = {}
    for i, (kind, perturb) in enumerate(PERTURBATIONS.items()):
        source, split = records[i].path, ("val", "test")[i % 2]
        with Image.open(source) as image:
            copy = _jpeg(perturb(image.convert("L")), root / split / f"copy{i}.jpg")
        records.append(_record(copy, split, f"other-{i}", records[i].label))  # filed under another patient
        expected[kind] = ((str(source), str(copy)), ("train", split))
    return records, expected


def test_planted_copies_are_found_and_nothing_else(planted):
    records, expected = planted
    report = check_leakage(records, progress=False)
    found = {(tuple(d["files"]), tuple(d["splits"])) for d in report.near_duplicates}
    missed = [kind for kind, pair in expected.items() if pair not in found]
    assert not missed and found == set(expected.values()), f"missed: {missed}; found: {found}"
    assert all(d["distance"] <= MAX_DISTANCE for d in report.near_duplicates)
    assert not report.ok and not report.shared_patients and not report.hash_failures
    assert report.images_hashed == len(records)


def test_a_patient_in_two_splits_is_found(shared_data, originals):
    a, b, c = (shared_data / r["file"] for r in originals[:3])
    records = [_record(a, "train", "p1"), _record(b, "test", "p1"), _record(c, "val", "p2")]
    report = check_leakage(records, progress=False)
    assert report.shared_patients == [{"patient_id": "p1", "splits": ["train", "test"],
                                       "files": sorted([str(a), str(b)])}]
    assert not report.near_duplicates and not report.ok
    assert "p1" in report.summary() and "1 patients in more than one split" in report.summary()


def test_distinct_real_and_synthetic_films_pass(tmp_path, shared_data, originals):
    synthetic = generate(tmp_path / "synthetic", per_class=(4, 2, 2), size=128, seed=1, progress=False)
    with open(synthetic / "manifest.csv", newline="") as f:
        records = [_record(synthetic / r["file"], r["split"], r["patient_id"], r["class"])
                   for r in csv.DictReader(f)]
    records += [_record(shared_data / r["file"], ("train", "val", "test")[i % 3], r["patient_id"], r["class"])
                for i, r in enumerate(originals)]
    report = check_leakage(records, progress=False)
    assert report.ok, report.summary()
    assert report.counts == {"shared_patients": 0, "near_duplicates": 0, "hash_failures": 0,
                             "images_hashed": 36, "pairs_compared": 16 * 10 + 16 * 10 + 10 * 10}
    assert report.summary().startswith("leakage check: ok")


def test_the_shared_set_has_no_copies_across_splits_and_is_checked_in_seconds(shared_data):
    rows = _shared_rows(shared_data)
    records = [_record(shared_data / r["file"], r["split"], r["patient_id"], r["class"]) for r in rows]
    start = time.perf_counter()
    report = check_leakage(records, progress=False)
    elapsed = time.perf_counter() - start
    assert report.images_hashed == len(rows) and report.ok, report.summary()
    assert elapsed < 60, f"{elapsed:.1f} s for {len(rows)} images"


def test_unreadable_images_are_listed_not_fatal(tmp_path, shared_data, originals):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((shared_data / originals[0]["file"]).read_bytes()[:300])
    records = [_record(broken, "test", "p1"), _record(shared_data / originals[1]["file"], "train", "p2")]
    report = check_leakage(records, progress=False)
    assert report.ok and report.images_hashed == 1
    assert report.hash_failures[0][0] == str(broken) and report.hash_failures[0][1].startswith("truncated")


def test_vectorised_distances_equal_a_plain_popcount():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 2 ** 63, (5, 4), dtype=np.uint64)
    windows = rng.integers(0, 2 ** 63, (7, 3, 4), dtype=np.uint64)
    expected = [[min(sum(bin(int(w) ^ int(v)).count("1") for w, v in zip(whole[i], windows[j, k]))
                     for k in range(3)) for j in range(7)] for i in range(5)]
    assert distances(whole, windows).tolist() == expected


def test_report_json_round_trip_and_summary(planted, shared_data, originals):
    records, _ = planted
    records = records + [_record(shared_data / originals[0]["file"], "test", originals[0]["patient_id"])]
    report = check_leakage(records, progress=False)
    assert report.shared_patients and report.near_duplicates
    data = json.loads(json.dumps(report.to_dict()))
    assert LeakageReport.from_dict(data) == report
    assert data["ok"] is False and data["counts"]["near_duplicates"] == len(report.near_duplicates)

    summary = report.summary(limit=3)
    assert f"... and {len(report.near_duplicates) - 3} more" in summary
    assert os.path.basename(report.near_duplicates[0]["files"][1]) in summary
    assert str(shared_data) not in summary.split("\n", 2)[2], "paths are shown relative to the data root"


def test_cli_exit_code_and_json(tmp_path, shared_data, originals):
    data = tmp_path / "data"
    for i, row in enumerate(originals):  # per class: train, train, val, test
        target = data / ("train", "train", "val", "test")[i % 4] / row["class"] / Path(row["file"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((shared_data / row["file"]).read_bytes())
    clean = run_module("train.data.leakage", data, "--json", tmp_path / "clean.json", "--no-progress",
                       check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads((tmp_path / "clean.json").read_text())["ok"] is True

    with Image.open(shared_data / originals[0]["file"]) as image:  # a train film, copied into test
        _jpeg(_resize(image.convert("L"), 0.9), data / "test" / originals[0]["class"] / "copy.jpg")
    leaky = run_module("train.data.leakage", data, "--json", tmp_path / "leaky.json", "--no-progress",
                       check=False)
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "1 near-duplicate pairs" in leaky.stdout and "copy.jpg" in leaky.stdout
    assert json.loads((tmp_path / "leaky.json").read_text())["counts"]["near_duplicates"] == 1
