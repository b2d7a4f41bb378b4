"""The screening history: what a row holds, search, CSV export, and surviving kill -9."""
import csv
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from edge_app.classifier import Classifier
from edge_app.history import History, Screening, export_csv, file_sha256
from edge_app.screening import screen

pytestmark = pytest.mark.device  # make test-device: no training beyond device_run


@pytest.fixture(scope="module")
def classifier(device_run):
    return Classifier(device_run / "tflite" / "int8.tflite", accelerator="cpu")


def test_screenings_and_errors_are_recorded_in_full(tmp_path, classifier, tiny_dataset):
    history = History(tmp_path / "h.sqlite3")
    good = sorted((tiny_dataset / "test" / "pneumonia").iterdir())[0]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    ok, failed = screen(classifier, history, good), screen(classifier, history, bad)

    row = history.get(ok.screening.id)
    assert row.image_path == str(good) and row.image_sha256 == file_sha256(good)
    assert row.model_sha256 == classifier.model_sha256 and row.backend == classifier.backend.name
    assert row.label == ok.prediction.label and row.decision == ok.prediction.decision
    assert row.probabilities == ok.prediction.probabilities
    assert row.threshold == classifier.card.abnormal_threshold and row.error_code is None
    row = history.get(failed.screening.id)
    assert failed.prediction is None and row.error_code == "not_an_image" and row.label is None
    assert row.image_sha256 == file_sha256(bad)

    with sqlite3.connect(history.path) as conn:  # what another reader sees
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert history._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(sqlite3.IntegrityError):  # a row is a result or an error, never neither
        history.add(Screening("2026-01-01T00:00:00", "x", None, "m", "b"))


def test_search_by_text_label_and_date_and_csv_export(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    probs = {"normal": 0.2, "pneumonia": 0.7, "covid": 0.1}
    history.add(Screening("2026-03-01T10:00:00.000+00:00", "/clinic/a.jpg", "aa11", "m", "cpu",
                          label="pneumonia", probabilities=probs, abnormal_probability=0.8,
                          decision="refer", threshold=0.5, latency_ms=12.0))
    history.add(Screening("2026-03-02T09:00:00.000+00:00", "/clinic/b.dcm", "bb22", "m", "cpu",
                          label="normal", probabilities={**probs, "normal": 0.9}, abnormal_probability=0.1,
                          decision="no_abnormality", threshold=0.5, latency_ms=11.0))
    history.add(Screening("2026-03-03T08:00:00.000+00:00", "/clinic/c.png", None, "m", "cpu",
                          error_code="truncated", error_message="the image file is truncated"))
    paths = lambda rows: [r.image_path for r in rows]
    assert paths(history.search()) == ["/clinic/c.png", "/clinic/b.dcm", "/clinic/a.jpg"]
    assert paths(history.search("b.dcm")) == ["/clinic/b.dcm"]
    assert paths(history.search("aa1")) == ["/clinic/a.jpg"]              # by image hash
    assert paths(history.search("truncated")) == ["/clinic/c.png"]        # by error code
    assert paths(history.search(label="normal")) == ["/clinic/b.dcm"]
    assert paths(history.search(since="2026-03-02", until="2026-03-02")) == ["/clinic/b.dcm"]
    assert paths(history.search("clinic", since="2026-03-02")) == ["/clinic/c.png", "/clinic/b.dcm"]

    out = export_csv(history.search(), tmp_path / "history.csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["image_path"] for r in rows] == ["/clinic/c.png", "/clinic/b.dcm", "/clinic/a.jpg"]
    assert rows[2]["p_pneumonia"] == "0.7" and rows[2]["decision"] == "refer"
    assert rows[0]["error_code"] == "truncated" and rows[0]["p_normal"] == ""


# A screening loop as the app runs it: it prints a screening's id only once `screen` returned,
# i.e. after the commit, which is when the app shows a result.
WORKER = """
import itertools, sys
from edge_app.classifier import Classifier
from edge_app.history import History
from edge_app.screening import screen
model, db, *images = sys.argv[1:]
classifier, history = Classifier(model, accelerator="cpu"), History(db)
for image in itertools.cycle(images):
    print("shown", screen(classifier, history, image).screening.id, flush=True)
"""


def test_history_survives_kill_9_at_random_moments(tmp_path, device_run, tiny_dataset):
    db = tmp_path / "history.sqlite3"
    bad = tmp_path / "cut.jpg"
    good = sorted((tiny_dataset / "test").rglob("*.jpg"))[:5]
    bad.write_bytes(good[0].read_bytes()[:500])
    args = [sys.executable, "-c", WORKER, device_run / "tflite" / "int8.tflite", db, *good, bad]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(5)
    shown: list[int] = []
    kills = 25
    for _ in range(kills):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        first = threading.Event()

        def read(stream=proc.stdout):
            for line in stream:
                if line.endswith("\n"):   # the kill can cut the last line short: not shown
                    shown.append(int(line.split()[1]))
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), "the worker never screened an image"
        time.sleep(rng.uniform(0.0, 0.25))   # mid-loop: inference, hashing, insert or fsync
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0]: r for r in conn.execute("SELECT id, label, error_code, image_sha256 FROM screenings")}
    missing = sorted(set(shown) - set(stored))
    assert not missing, f"{len(missing)} screenings were shown but are not in the history: {missing[:10]}"
    assert len(shown) > kills * 5
    assert all((label is None) != (error is None) and sha for _, label, error, sha in stored.values())
    errors = [r for r in stored.values() if r[2] is not None]
    assert errors and all(r[2] == "truncated" for r in errors)
    print(f"{kills} kills, {len(shown)} screenings shown, {len(stored)} stored, integrity ok")
