"""The Kivy app in a real window (Xvfb, Mesa's software OpenGL), driven by tests/gui_driver.py in a
process that never imports TensorFlow (the two crash each other)."""
import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_module, with_card
from edge_app.history import file_sha256
from test_history import corrupt_middle_page, filled
from test_preprocess import write_dicom

pytestmark = pytest.mark.device  # make test-device: no training beyond device_run

DRIVER = REPO / "tests" / "gui_driver.py"


def drive(scenario, out, images, *flags, screen="1280x800"):
    """Runs one scenario of the driver under its own X server; returns what it saw."""
    assert shutil.which("xvfb-run"), "xvfb-run is missing: apt-get install xvfb xauth (see .ci/run)"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KIVY_HOME": str(out / "kivy"), "KIVY_NO_ARGS": "1"}
    cmd = ["xvfb-run", "-a", "-s", f"-screen 0 {screen}x24", sys.executable, DRIVER, scenario, out,
           json.dumps({k: v if isinstance(v, str) else list(map(str, v)) for k, v in images.items()}),
           "--", "--history", out / "history.sqlite3", "--exports", out / "exports",
           "--config", out / "app.json", *flags]
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=240)
    seen_file = out / "result.json"
    assert result.returncode == 0 and seen_file.is_file(), \
        f"the app exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    seen = json.loads(seen_file.read_text())
    assert not seen.get("timeout"), f"the scenario timed out: {seen}"
    assert seen["tensorflow_imported"] is False
    return seen


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory):
    """Two JPEGs, a MONOCHROME1 DICOM made from a third X-ray, and a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    bad = folder / "scan.jpg"
    bad.write_text("this is a referral letter, not an image")
    jpegs = [sorted((tiny_dataset / "test" / c).iterdir())[0] for c in ("pneumonia", "covid", "normal")]
    grey = np.asarray(Image.open(jpegs[2]).convert("L"), np.uint16)
    dicom = write_dicom(folder / "normal.dcm", (255 - grey) * 16, "MONOCHROME1")  # 12-bit, inverted
    return {"good": [*jpegs[:2], dicom], "bad": str(bad)}


@pytest.mark.parametrize("size", ["1280x800", "800x480"])
def test_app_screens_an_xray_like_the_cli_and_records_it(tmp_path, device_run, images, size):
    model = device_run / "tflite" / "int8.tflite"
    seen = drive("screen", tmp_path, images, "--model", model, "--accelerator", "cpu",
                 "--start-dir", images["good"][0].parent, "--size", size)
    cli = json.loads(run_module("edge_app", "predict", *images["good"], "--model", model, "--json").stdout)

    shown_all = [seen["first"], *seen["next"]]
    assert len(shown_all) == len(cli["results"]) == 3
    for shown, expected, image in zip(shown_all, cli["results"], images["good"]):
        p = shown["prediction"]
        assert shown["screen"] == "result" and p["source"] == str(image)
        assert p["label"] == expected["label"] and p["decision"] == expected["decision"]
        assert p["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert shown["message"] == expected["message"]
        assert shown["bars"][0].startswith("abnormal") and len(shown["bars"]) == 4

    # the bad file: its error is on screen, the app goes on (the next image above was screened)
    assert "[not_an_image]" in seen["bad"]["error"] and seen["bad"]["screen"] == "screening"
    assert seen["bad"]["error"] in seen["bad"]["visible"]
    assert seen["notice_visible"].startswith("Screening aid, not a diagnosis")
    assert seen["camera_button"] is bool(glob.glob("/dev/video*"))    # no camera here: no button

    db = sqlite3.connect(tmp_path / "history.sqlite3")
    rows = db.execute("SELECT id, image_path, image_sha256, label, probabilities, decision, model_sha256, "
                      "error_code FROM screenings ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [seen["first"]["screening_id"], seen["first"]["screening_id"] + 1,
                                    *(s["screening_id"] for s in seen["next"])]
    (_, path, sha, label, probs, decision, model_sha, error), bad, *_ = rows
    assert (path, sha, label, decision) == (str(images["good"][0]), file_sha256(images["good"][0]),
                                            cli["results"][0]["label"], cli["results"][0]["decision"])
    assert json.loads(probs) == seen["first"]["prediction"]["probabilities"]
    assert model_sha == cli["model_sha256"] and error is None
    assert bad[1] == images["bad"] and bad[7] == "not_an_image" and bad[3] is None
    assert len(seen["history_rows"]) == 4 and "NOT SCREENED [not_an_image]" in seen["history_rows"][2]
    assert open(seen["export"]).read().count("\n") == 5
    assert len(seen["search_bad"]) == 1 and "not_an_image" in seen["search_bad"][0]
    label = cli["results"][0]["label"]
    assert seen["label_choices"] == ["any result", *cli["results"][0]["probabilities"]]   # the card's labels
    assert len(seen["search_label"]) == sum(r["label"] == label for r in cli["results"]) >= 1
    assert all(f" {label} " in row for row in seen["search_label"])
    assert any("int8.tflite on litert-interpreter" in t for t in seen["settings"])
    assert seen["after_apply"]["threads"] == 1 and "int8.tflite on" in seen["after_apply"]["model_status"]
    assert json.loads((tmp_path / "app.json").read_text())["threads"] == 1   # Settings saved
    assert "[model_not_found]" in seen["bad_model"]["error"]
    assert seen["bad_model"]["model_status"].startswith("Model not loaded")
    assert seen["bad_model"]["screen_error"].startswith("No model is loaded")
    for name in ("screening", "result", "error", "history", "settings"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_app_withholds_the_label_of_an_image_unlike_the_training_images(tmp_path, device_run, images):
    model = device_run / "tflite" / "fp32.tflite"   # the float variants carry the OOD score
    card = json.loads(run_module("edge_app", "info", "--model", model).stdout)["card"]
    doctored = with_card(model, tmp_path / "strict.tflite", thresholds={**card["thresholds"], "ood": 0.0})
    seen = drive("screen", tmp_path / "app", images, "--model", doctored, "--accelerator", "cpu",
                 "--start-dir", images["good"][0].parent, "--size", "800x480")
    shown = seen["first"]
    assert shown["prediction"]["decision"] == "unreliable"
    assert shown["message"].startswith("This image is unlike the images the model was trained on")
    assert (tmp_path / "app" / "result.png").stat().st_size > 10_000


def test_app_on_a_damaged_history_stops_screening_until_a_new_one_is_started(tmp_path, device_run, images):
    damaged = filled(tmp_path / "history.sqlite3", rows=200)   # where drive() points the app
    corrupt_middle_page(damaged)
    before = file_sha256(damaged)

    seen = drive("broken_history", tmp_path, images, "--model", device_run / "tflite" / "int8.tflite",
                 "--accelerator", "cpu", "--start-dir", images["good"][0].parent, "--size", "800x480",
                 screen="800x480")
    assert seen["problem"].startswith("Screening is stopped") and "[history_corrupt]" in seen["problem"]
    assert seen["problem"] in seen["visible"] and "Start a new history" in seen["visible"]
    assert seen["files_disabled"] is True and seen["new_history_button"] is True
    assert seen["refused"] == {"error": "Screening is stopped until the history can record results (see below).",
                               "busy": False, "outcome": False}
    new = seen["after_new"]["history"]
    assert new != str(damaged) and os.path.dirname(new) == str(tmp_path)
    assert seen["after_new"]["problem"] == seen["after_new"]["error"] == ""
    assert seen["after_new"]["files_disabled"] is False
    assert str(damaged) in seen["after_new"]["status"]
    assert seen["screened"] == {"screen": "result", "id": 1}
    assert file_sha256(damaged) == before                                   # kept as it was
    assert json.loads((tmp_path / "app.json").read_text())["history"] == new   # and used from now on
    assert (tmp_path / "broken_history.png").stat().st_size > 10_000


def test_kiosk_is_fullscreen_needs_the_pin_and_resets_when_idle(tmp_path, device_run, images):
    seen = drive("kiosk", tmp_path, images, "--model", device_run / "tflite" / "int8.tflite",
                 "--accelerator", "cpu", "--kiosk", "--pin", "2468", "--idle-reset", "2",
                 "--start-dir", images["good"][0].parent, screen="800x480")
    assert seen["fullscreen"] == "auto" and seen["window"] == [800, 480]
    assert seen["nav"] == ["Screening", "Staff"]                  # no History/Settings for patients
    assert seen["close_refused"] is True                           # window close and Escape refused
    assert seen["after_wrong_pin"] == {"error": "Wrong PIN.", "running": True}
    assert seen["after_reset"] == {"result_message": "", "nav": ["Screening", "Staff"]}
    assert 1.5 <= seen["idle_reset_after_s"] <= 10
    assert seen["staff_nav"] == ["Screening", "History", "Settings", "Exit"]
    assert seen["exit_requested"]                                  # and the app then exited: PIN accepted


def test_kiosk_refuses_to_start_without_a_pin(tmp_path):
    result = run_module("edge_app", "--kiosk", "--config", tmp_path / "none.json", check=False)
    assert result.returncode == 2 and "kiosk mode needs a staff PIN" in result.stderr
