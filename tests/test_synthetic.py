"""The synthetic set: deterministic, laid out like a real one, and with learnable findings."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from train.data.records import SPLITS
from train.data.synthetic import CLASSES, MANIFEST_COLUMNS, generate, patient_anatomy, render


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load(root: Path, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(Image.open(root / r["file"]), np.float32) / 255 for r in rows])
    return images, np.array([r["class"] for r in rows])


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative."""
    return float((positive[:, None] > negative[None, :]).mean()
                 + 0.5 * (positive[:, None] == negative[None, :]).mean())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic"), per_class=(12, 3, 3), size=96, seed=5,
                    progress=False)


def test_same_seed_gives_byte_identical_files(small_set, tmp_path):
    again = generate(tmp_path / "again", per_class=(12, 3, 3), size=96, seed=5, progress=False)
    assert _files(again) == _files(small_set)


def test_another_seed_gives_other_images(small_set, tmp_path):
    other = _files(generate(tmp_path / "other", per_class=(12, 3, 3), size=96, seed=6, progress=False))
    same = _files(small_set)
    pngs = [name for name in same if name.endswith(".png") and name != "preview.png"]
    assert len(pngs) == 54 and all(other[name] != same[name] for name in pngs)


def test_images_do_not_depend_on_how_many_are_made(small_set, tmp_path):
    """Each image has its own generator (seed, split, class, index): more images change none of these."""
    bigger = _files(generate(tmp_path / "bigger", per_class=(14, 4, 5), size=96, seed=5, progress=False))
    for name, data in _files(small_set).items():
        if name.endswith(".png") and name != "preview.png":
            assert bigger[name] == data, name


def test_a_smaller_run_leaves_no_stale_images(tmp_path):
    generate(tmp_path, per_class=(3, 2, 2), size=64, progress=False)
    generate(tmp_path, per_class=(2, 1, 1), size=64, progress=False)
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*/*.png")} == \
        {r["file"] for r in _manifest(tmp_path)}


def test_layout_manifest_readme_and_preview(small_set):
    rows = _manifest(small_set)
    with open(small_set / "manifest.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == MANIFEST_COLUMNS
    counts = defaultdict(int)
    for row in rows:
        counts[row["split"], row["class"]] += 1
        assert row["file"].startswith(f"{row['split']}/{row['class']}/") and row["file"].endswith(".png")
        assert row["source_repo"] == "synthetic" and row["orig_label"].startswith("synthetic")
        with Image.open(small_set / row["file"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (96, 96))
    assert counts == {(s, c): n for s, n in zip(SPLITS, (12, 3, 3)) for c in CLASSES}
    on_disk = {str(p.relative_to(small_set)) for p in small_set.glob("*/*/*.png")}
    assert on_disk == {r["file"] for r in rows}

    readme = (small_set / "README.md").read_text()
    assert "not X-rays" in readme and "nothing clinical" in readme
    with Image.open(small_set / "preview.png") as preview:
        assert preview.size[1] == 3 * preview.size[0] // 6  # one row per class, six films per row


def test_patients_never_span_splits_and_some_have_two_films(small_set):
    rows = _manifest(small_set)
    splits, files = defaultdict(set), defaultdict(list)
    for row in rows:
        splits[row["patient_id"]].add((row["split"], row["class"]))
        files[row["patient_id"]].append(row["file"])
    assert all(len(s) == 1 for s in splits.values())
    pairs = [f for f in files.values() if len(f) == 2]
    assert len(pairs) == 3 * 1  # 12 train images per class: films 8 and 9 are one patient's
    for a, b in pairs:  # two films of one patient, not one file twice
        assert (small_set / a).read_bytes() != (small_set / b).read_bytes()


def test_findings_lie_in_the_lungs_with_their_class_pattern():
    """One film rendered with and without its finding: the difference is the finding alone."""
    for seed in range(6):
        anatomy = patient_anatomy(np.random.default_rng([seed, 99]))
        films = {c: render(np.random.default_rng(seed), anatomy, c, 128).astype(int) for c in CLASSES}
        changes = {}
        for label in ("pneumonia", "covid"):
            change = films[label] - films["normal"]
            added = np.clip(change, 0, None)
            assert added.sum() > 20 * np.clip(-change, 0, None).sum(), "an opacity makes the film brighter"
            assert not change[:13].any(), "nothing changes above the lungs"
            changes[label] = added
        # Pneumonia: one lung. COVID-19: both lungs, lower zones, and fainter than a consolidation.
        pneumonia_left = changes["pneumonia"][:, :64].sum() / changes["pneumonia"].sum()
        covid_left = changes["covid"][:, :64].sum() / changes["covid"].sum()
        assert pneumonia_left < 0.05 or pneumonia_left > 0.95
        assert 0.2 < covid_left < 0.8
        rows = np.arange(128)[:, None]
        assert (changes["covid"] * rows).sum() / changes["covid"].sum() > 0.4 * 128
        density = {label: c.sum() / (c >= 3).sum() for label, c in changes.items()}
        assert density["covid"] < 0.8 * density["pneumonia"]


def test_classes_differ_in_the_lower_lungs_but_not_in_overall_brightness(tmp_path):
    root = generate(tmp_path, per_class=(40, 0, 0), size=128, seed=0, progress=False)
    images, labels = _load(root, _manifest(root))
    low, high = np.percentile(images, [5, 95], axis=(1, 2))
    scaled = (images - low[:, None, None]) / (high - low)[:, None, None]
    band = scaled[:, 64:92]  # lower lung zones: 50-72% of the height, both lateral thirds
    lower_lungs = np.concatenate([band[:, :, 15:51], band[:, :, 77:113]], axis=2).mean(axis=(1, 2))
    for label in ("pneumonia", "covid"):
        assert lower_lungs[labels == label].mean() > lower_lungs[labels == "normal"].mean() + 0.02
        mean = images.mean(axis=(1, 2))
        brightness = _auc(mean[labels == label], mean[labels == "normal"])
        assert 0.25 < brightness < 0.75, f"overall brightness alone separates {label} from normal"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="per_class"):
        generate(tmp_path, per_class=(1, 1), progress=False)
    with pytest.raises(ValueError, match="unknown class"):
        render(np.random.default_rng(0), patient_anatomy(np.random.default_rng(0)), "tuberculosis", 64)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    result = run_module("train.data.synthetic", "--out", out, "--per-class", "2", "1", "1",
                        "--size", "64", "--seed", "3", "--no-progress")
    assert "not real" in result.stdout
    assert len(_manifest(out)) == 12
    assert _files(out) == _files(generate(tmp_path / "api", per_class=(2, 1, 1), size=64, seed=3,
                                          progress=False))
