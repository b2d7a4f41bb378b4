"""On-device commissioning (`python -m edge_app validate`), site configs and folder inputs, on real
X-rays of the shared test split copied into a site's class-folder layout."""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import run_module, with_card
from edge_app import metrics
from edge_app.errors import InputError
from edge_app.inputs import collect
from edge_app.progress import progress
from test_preprocess import write_dicom

PER_CLASS = 5
# Folder names as a site might spell them: edge_app.labels maps them onto the model's classes.
FOLDERS = {"normal": "NORMAL", "pneumonia": "Pneumonia", "covid": "COVID-19"}


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared_data) -> Path:
    """Real test images in class folders (some one level deeper), an extensionless DICOM made from a
    real X-ray, a non-image named .jpg, a truncated JPEG, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("site")
    for cls, folder in FOLDERS.items():
        files = sorted((shared_data / "test" / cls).iterdir())[:PER_CLASS]
        for i, f in enumerate(files):
            dest = root / folder / ("older" if i % 2 else "") / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    xray = sorted((shared_data / "test" / "pneumonia").iterdir())[PER_CLASS]
    pixels = np.asarray(Image.open(xray).convert("L"), np.uint16) * 16
    write_dicom(root / "Pneumonia" / "older" / "IM0001", pixels)            # PACS export, no suffix
    (root / "NORMAL" / "fake.jpg").write_text("not an image\n")
    jpeg = sorted((shared_data / "test" / "covid").iterdir())[PER_CLASS].read_bytes()
    (root / "COVID-19" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "NORMAL" / "notes.txt").write_text("scanned on the new detector\n")
    (root / "NORMAL" / ".DS_Store").write_bytes(b"\0" * 64)
    return root


@pytest.fixture
def model(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run's int8 model: site configs are written beside it."""
    return Path(shutil.copy(tiny_run / "tflite" / "int8.tflite", tmp_path / "int8.tflite"))


def _validate(model: Path, images, out: Path, *extra, check=False):
    result = run_module("edge_app", "validate", "--model", model, images, "--out", out, "--bootstrap", "200",
                        *extra, check=check)
    return result, json.loads((out / "validation.json").read_text())


def _predict_json(model: Path, *inputs) -> dict:
    return json.loads(run_module("edge_app", "predict", "--model", model, "--json", *inputs, check=False).stdout)


def wilson_by_hand(k: int, n: int) -> list[float]:
    """The Wilson score interval as textbooks write it, z = 1.959964."""
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def test_validate_equals_predict_image_for_image(model, site, tmp_path):
    result, report = _validate(model, site, tmp_path / "out")
    assert result.returncode == 1, result.stderr   # two images could not be read; the report is written
    predicted = _predict_json(model, site)
    by_source = {r["source"]: r for r in predicted["results"]}
    assert report["model_sha256"] == predicted["model_sha256"]

    # every image validate classified, exactly as predict --json classified it
    assert len(report["per_image"]) == 3 * PER_CLASS + 1 == report["n_scored"]
    for record in report["per_image"]:
        p = by_source[record["source"]]
        for key in ("label", "probabilities", "abnormal_probability", "decision", "threshold", "warning",
                    "ood_score", "detail"):
            assert record[key] == p[key], (record["source"], key)
    assert any(Path(r["source"]).name == "IM0001" and r["class"] == "pneumonia" for r in report["per_image"])

    # every unreadable image listed with its code, as predict reports it; the text file left out
    unreadable = {Path(u["source"]).name: u["code"] for u in report["unreadable"]}
    assert unreadable == {"fake.jpg": "not_an_image", "truncated.jpg": "truncated"}
    for u in report["unreadable"]:
        assert by_source[u["source"]]["error"]["code"] == u["code"]
    assert [Path(x["path"]).name for x in report["left_out"]] == ["notes.txt"]
    assert "notes.txt" in run_module("edge_app", "predict", "--model", model, site, check=False).stderr

    # the figures, recomputed from predict's answers
    labels = report["labels"]
    rows = [(labels.index(r["class"]), by_source[r["source"]]) for r in report["per_image"]]
    y = np.array([c for c, _ in rows])
    scores = np.array([p["abnormal_probability"] for _, p in rows])
    predicted_class = np.array([labels.index(p["label"]) for _, p in rows])
    flagged = scores >= report["card_threshold"]["threshold"]
    sens, spec = report["card_threshold"]["sensitivity"], report["card_threshold"]["specificity"]
    assert (sens["k"], sens["n"]) == (int(flagged[y != 0].sum()), int((y != 0).sum()))
    assert (spec["k"], spec["n"]) == (int((~flagged[y == 0]).sum()), int((y == 0).sum()))
    assert sens["ci95"] == pytest.approx(wilson_by_hand(sens["k"], sens["n"]), abs=1e-6)
    assert spec["ci95"] == pytest.approx(wilson_by_hand(spec["k"], spec["n"]), abs=1e-6)
    assert report["confusion_matrix"]["counts"] == metrics.confusion_matrix(y, predicted_class, 3).tolist()
    for c, label in enumerate(labels):
        assert report["per_class_recall"][label]["k"] == int(((predicted_class == c) & (y == c)).sum())
    assert report["abnormal_auc"]["value"] == pytest.approx(metrics.roc_auc(y != 0, scores))
    lo, hi = report["abnormal_auc"]["ci95"]
    assert lo <= report["abnormal_auc"]["value"] <= hi
    target = report["target"]
    assert target["threshold"] == metrics.threshold_for_sensitivity(y != 0, scores, 0.95)
    assert target["sensitivity"]["value"] >= 0.95
    assert target["threshold_ci95"][0] <= target["threshold_ci95"][1]
    # 11 abnormal images cannot show a sensitivity of 0.95: the report says so, and how many could
    assert target["abnormal_needed"] == 73 and target["sensitivity"]["n"] == 11
    assert "too few to show sensitivity >= 0.95" in result.stdout
    assert "too few to show sensitivity >= 0.95" in (tmp_path / "out" / "validation.md").read_text()
    unreliable = sum(p["decision"] == "unreliable" for _, p in rows)
    warned = Counter(p["warning"] for _, p in rows if p["warning"])
    assert report["ood"]["share"]["k"] == warned["out_of_distribution"]
    assert report["low_detail"]["share"]["k"] == warned["low_detail"]
    assert sum(warned.values()) == unreliable

    md = (tmp_path / "out" / "validation.md").read_text()
    assert "truncated.jpg" in md and "[not_an_image]" in md and "notes.txt" in md
    with Image.open(tmp_path / "out" / "reliability.png") as png:
        assert png.format == "PNG" and png.size == (480, 480)


def test_validate_reads_a_csv_like_the_folders(model, site, tmp_path):
    listing = tmp_path / "lists" / "labels.csv"
    listing.parent.mkdir()
    images, _ = collect([site])
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        for image in images:   # file names relative to the CSV's folder
            writer.writerow([os.path.relpath(image, listing.parent), Path(image).relative_to(site).parts[0]])
    _, from_folders = _validate(model, site, tmp_path / "folders")
    _, from_csv = _validate(model, listing, tmp_path / "csv")
    for report in (from_folders, from_csv):
        for record in report["per_image"] + report["unreadable"]:
            record["source"] = str(Path(record["source"]).resolve())
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images", "left_out", "n_left_out")}
    assert strip(from_csv) == strip(from_folders)

    # a `group` column (here the projection as a site might list it): the same figures, and per group the
    # sensitivity and specificity of exactly that group's images; an image with no group is listed as such
    grouped = tmp_path / "lists" / "grouped.csv"
    groups = {}
    with open(grouped, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "group"])
        for i, image in enumerate(images):
            groups[str(Path(image).resolve())] = ["PA", "AP", ""][i % 3]
            writer.writerow([image, Path(image).relative_to(site).parts[0], ["PA", "AP", ""][i % 3]])
    _, by_group = _validate(model, grouped, tmp_path / "grouped")
    assert by_group["card_threshold"] == from_folders["card_threshold"] and from_folders["per_group"] is None
    threshold = by_group["card_threshold"]["threshold"]
    for group, name in (("PA", "PA"), ("AP", "AP"), ("", "(none)")):
        mine = [r for r in by_group["per_image"] if groups[str(Path(r["source"]).resolve())] == group]
        assert {r["group"] for r in mine} <= {group}
        abnormal = [r["abnormal_probability"] >= threshold for r in mine if r["class"] != "normal"]
        normal = [r["abnormal_probability"] < threshold for r in mine if r["class"] == "normal"]
        row = by_group["per_group"][name]
        assert (row["sensitivity"]["k"], row["sensitivity"]["n"]) == (sum(abnormal), len(abnormal))
        assert (row["specificity"]["k"], row["specificity"]["n"]) == (sum(normal), len(normal))
    assert "## Per group" in (tmp_path / "grouped" / "validation.md").read_text()

    (tmp_path / "bad.csv").write_text("file,label\nNORMAL/x.png,tuberculosis-ish\n")
    result = run_module("edge_app", "validate", "--model", model, tmp_path / "bad.csv", check=False)
    assert result.returncode == 1 and "unknown_label" in result.stderr and "tuberculosis-ish" in result.stderr


def test_site_config_round_trip(model, site, tmp_path, tiny_run):
    before = model.read_bytes()
    result, report = _validate(model, site, tmp_path / "out", "--write-site-config", "--site", "Clinic A",
                               "--target-sensitivity", "0.9")
    assert model.read_bytes() == before                                    # the model is never changed
    config = json.loads((tmp_path / "int8.site.json").read_text())
    today = datetime.date.today().isoformat()
    assert config == {"site": "Clinic A", "threshold": report["target"]["threshold"], "date": today,
                      "n_images": report["n_scored"], "target_sensitivity": 0.9,
                      "model_sha256": hashlib.sha256(before).hexdigest(),
                      "detail_threshold": None}        # too few images for a site's own 1st percentile

    # predict uses it and says so
    note = f"commissioned for Clinic A on {today} with {report['n_scored']} images"
    predicted = _predict_json(model, site / "NORMAL")
    assert note in predicted["threshold_note"] and predicted["site"] == config
    assert {r["threshold"] for r in predicted["results"] if "threshold" in r} == {config["threshold"]}
    for r in predicted["results"]:
        if "error" not in r:
            expected = "refer" if r["abnormal_probability"] >= config["threshold"] else "no_abnormality"
            assert r["decision"] in (expected, "unreliable")
    assert note in run_module("edge_app", "predict", "--model", model, site / "NORMAL", check=False).stdout
    info = json.loads(run_module("edge_app", "info", "--model", model).stdout)
    assert info["site"] == config and info["threshold"] == config["threshold"]

    # commissioning again reports the stored site threshold beside the card's
    _, again = _validate(model, site, tmp_path / "again")
    assert again["site_threshold"]["threshold"] == config["threshold"] and note in again["site_threshold"]["site"]

    # a site config made for another model is refused, naming the problem
    other = Path(shutil.copy(tiny_run / "tflite" / "fp32.tflite", tmp_path / "fp32.tflite"))
    shutil.copy(tmp_path / "int8.site.json", tmp_path / "fp32.site.json")
    refused = run_module("edge_app", "predict", "--model", other, site / "NORMAL", check=False)
    assert refused.returncode == 2 and "site_config_mismatch" in refused.stderr
    assert "made for another model" in refused.stderr


def test_a_site_with_softer_films_gets_its_own_low_detail_threshold(tiny_run, shared_data, tmp_path):
    """A site whose films hold less fine detail than the card's threshold allows for (here: the card's
    threshold doctored to the median of 120 real films) would hear "unreliable" for half of them;
    commissioning on them stores their own 1st percentile, and a blurred copy is still warned about."""
    from edge_app import decision, preprocess
    from edge_app.classifier import Classifier

    site = tmp_path / "soft-site"
    for cls in ("normal", "pneumonia"):
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "test" / cls).iterdir())[:60]:
            shutil.copy(f, site / cls / f.name)
    original = tiny_run / "tflite" / "int8.tflite"
    card = Classifier(original, accelerator="cpu").card
    details = [preprocess.detail(preprocess.load8(f, card.input)) for f in sorted(site.rglob("*.*"))]
    soft = with_card(original, tmp_path / "soft.tflite", thresholds={**card.thresholds, "ood": 1e9,
                                                                     "detail": float(np.median(details))})
    _, report = _validate(soft, site, tmp_path / "out", "--write-site-config", "--target-sensitivity", "0.9")
    assert 0.4 <= report["low_detail"]["share"]["value"] <= 0.6            # at the card's threshold
    config = json.loads((tmp_path / "soft.site.json").read_text())
    assert config["detail_threshold"] == pytest.approx(np.quantile(details, decision.LOW_DETAIL_QUANTILE))
    assert config["detail_threshold"] < np.median(details)

    predicted = _predict_json(soft, site)["results"]
    assert sum(r["warning"] == "low_detail" for r in predicted) <= 2       # ~1 % of 120, not half
    blurred = tmp_path / "blurred.png"
    Image.open(sorted(site.rglob("*.*"))[0]).convert("L").filter(ImageFilter.GaussianBlur(3)).save(blurred)
    assert _predict_json(soft, blurred)["results"][0]["warning"] == "low_detail"

    # films sharper than the card's threshold: the card's stays (the site config stores none)
    sharp = with_card(original, tmp_path / "sharp.tflite", thresholds={**card.thresholds,
                                                                       "detail": 0.5 * min(details)})
    _validate(sharp, site, tmp_path / "sharp-out", "--write-site-config", "--target-sensitivity", "0.9")
    assert json.loads((tmp_path / "sharp.site.json").read_text())["detail_threshold"] is None


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.97, 0.99])
def test_abnormal_images_needed_is_the_fewest_whose_interval_clears_the_target(target):
    from edge_app.validate import abnormal_images_needed

    n = abnormal_images_needed(target)
    assert wilson_by_hand(n, n)[0] >= target - 1e-9 > wilson_by_hand(n - 1, n - 1)[0]


def test_a_site_config_from_before_loads_and_a_bad_one_is_refused(tmp_path):
    from edge_app import site_config
    from edge_app.errors import ModelError

    model = tmp_path / "m.tflite"
    older = {"site": "Clinic A", "threshold": 0.3, "date": "2026-12-01", "n_images": 40,
             "target_sensitivity": 0.97, "model_sha256": "ab" * 32}                # no detail_threshold
    site_config.path_for(model).write_text(json.dumps(older))
    assert site_config.load(model, "ab" * 32).detail_threshold is None
    for bad in ("soft", -0.1, float("nan")):
        site_config.path_for(model).write_text(json.dumps({**older, "detail_threshold": bad}))
        with pytest.raises(ModelError, match="detail_threshold") as caught:
            site_config.load(model, "ab" * 32)
        assert caught.value.code == "site_config_invalid"


def test_folders_are_searched_recursively(site, tmp_path):
    images, skipped = collect([site])
    names = sorted(Path(p).name for p in images)
    assert "IM0001" in names and ".DS_Store" not in names and "fake.jpg" in names
    assert len(images) == 3 * PER_CLASS + 3
    assert [Path(p).name for p in skipped] == ["notes.txt"]
    assert sum("older" in Path(p).parts for p in images) == 3 * (PER_CLASS // 2) + 1
    single = site / "NORMAL" / "notes.txt"
    assert collect([single]) == ([str(single)], [])   # a file named on the command line is always taken
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InputError) as err:
        collect([tmp_path / "empty"])
    assert err.value.code == "no_images"


def test_predict_csv_and_bench_take_folders(model, site, tmp_path):
    table = tmp_path / "results.csv"
    run_module("edge_app", "predict", "--model", model, site, "--csv", table, check=False)
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 3 * PER_CLASS + 3
    assert {r["error_code"] for r in rows if r["error_code"]} == {"not_an_image", "truncated"}
    assert all(float(r["p_normal"]) + float(r["p_pneumonia"]) + float(r["p_covid"]) == pytest.approx(1.0)
               for r in rows if not r["error_code"])
    bench = run_module("edge_app", "bench", "--model", model, "--image", site / "Pneumonia", check=False)
    timed = json.loads(bench.stdout)
    assert bench.returncode == 0 and timed["images"] == timed["runs"] == PER_CLASS + 1


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_only_on_a_terminal():
    terminal, pipe = _Stream(True), _Stream(False)
    assert list(progress(range(4), "validating", terminal)) == [0, 1, 2, 3]
    assert list(progress(range(4), "validating", pipe)) == [0, 1, 2, 3]
    assert pipe.getvalue() == ""
    assert "validating [" in terminal.getvalue() and "4/4" in terminal.getvalue()


def test_site_threshold_aims_at_the_models_own_target_sensitivity(model, site, tmp_path):
    """Without --target-sensitivity the site threshold is set for the sensitivity the model's own
    threshold was set for (its card's thresholds.target_sensitivity); the flag overrides it."""
    from edge_app.classifier import load_model_file

    card = load_model_file(model)[1]
    aimed = with_card(model, tmp_path / "aimed.tflite",
                      thresholds={**card.thresholds, "target_sensitivity": 0.9})
    _, report = _validate(aimed, site, tmp_path / "default")
    assert report["target"]["target_sensitivity"] == 0.9
    _, report = _validate(aimed, site, tmp_path / "flag", "--target-sensitivity", "0.8")
    assert report["target"]["target_sensitivity"] == 0.8
